"""The independent references that tests and benchmarks compare our code with, built in one place.

- Seeded random weights for our models (`random_weights_`, `random_model`): nothing is downloaded.
- diffusers' UNet2DConditionModel and AutoencoderKL and transformers' CLIPTextModel holding the very same weights
  (`reference_unet`, `reference_vae`, `reference_clip`). Their configs are written here from the published SD v1
  configs, with our models' sizes. Our state dicts, under the original CompVis prefixes, go through diffusers' own
  LDM converters (the code diffusers runs on sd-v1-4 files) and load strictly: no key table of ours is involved.
- transformers' CLIPTokenizerFast from the vocabulary file we ship, and diffusers' DDIMScheduler and
  StableDiffusionPipeline set up as SD v1.
- The schedule buffers and the Lightning wrapping of an sd-v1-4.ckpt file, as CompVis' code writes them.
- `assert_close`: one tolerance, relative to the reference's magnitude.

diffusers and transformers are test-only dependencies, imported inside the functions that need them: only tests and
benchmarks import this module, and the benchmarks run (without their reference rows) where they are not installed.
"""
import gzip
import json
import sys
import tempfile
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from dreambooth.checkpoint import CLIP, UNET, VAE
from dreambooth.clip import CLIPConfig
from dreambooth.tokenizer import VOCAB_FILE
from dreambooth.unet import UNetConfig
from dreambooth.vae import LATENT_SCALE, VAEConfig


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    """The same shape, and every element within rel * max(1, max |ref|) of the reference: relative to the
    reference's magnitude, absolute where the reference is smaller than 1."""
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    tol = rel * max(1.0, ref.abs().max().item())
    diff = (ours - ref).abs().max().item()
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol:.3g}"


# ---- our models with seeded random weights ---------------------------------------------------------------------

@torch.no_grad()
def random_weights_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter with seeded noise, in place, on the model's device (no zero-initialised layer left, so
    nothing can hide): norm scales 1 + noise, biases small noise, matrices and convs scaled by fan-in so that
    activations stay O(1) through the network. The same seed gives the same weights on the same device."""
    g = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            p.normal_(generator=g)
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and name == "weight":
                p.mul_(0.05).add_(1)
            else:
                p.mul_(p[0].numel() ** -0.5 if p.ndim >= 2 else 0.05)
    return model


def random_model(cls, cfg, device="cpu", seed: int = 0, dtype=torch.float32):
    """One of our models (UNetModel, AutoencoderKL, CLIPTextModel) with `random_weights_` in `dtype`, built without
    the default initialisation (which random_weights_ overwrites anyway)."""
    with torch.device("meta"):
        model = cls(cfg).to(dtype)
    return random_weights_(model.to_empty(device=device), seed)


def random_batches(side: int, device, seed: int = 0):
    """train.py's cache for 1 subject + 1 prior photo, with random numbers: the VAE posteriors (mean, logvar) of each
    photo and its mirror image, [2, 2, 8, side, side], logvar around -8 (posterior sigmas ~0.02, like a real VAE's),
    in the train.Batches that a step draws from (SD v1's latent scale)."""
    from train import Batches  # a program: imported only where it is used
    posteriors = torch.randn(2, 2, 8, side, side, generator=torch.Generator().manual_seed(seed))
    posteriors[:, :, 4:] -= 8
    zero = torch.zeros(1, dtype=torch.long, device=device)  # the subject photo's prompt and concept, the first
    return Batches(posteriors.to(device), None, None, instance_rows=zero, instance_concepts=zero,
                   prior_rows=zero + 1, prior_first=zero, prior_counts=[1], batch_size=1, latent_scale=LATENT_SCALE)


def random_lora(sd, path, rank=4, alpha=2.0, seed=1, std=0.5):
    """A LoRA file for sd with random, non-zero up (a trained one's are; a new one's are 0)."""
    from dreambooth.lora import LoRA, save_lora

    lora = LoRA(sd, rank, alpha, text_encoder=True, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in lora.values():
            adapter.lora_up.weight.normal_(0, std, generator=generator)
    save_lora(lora, path)
    return lora


# ---- the reference models, holding our weights -----------------------------------------------------------------

def diffusers_unet_config(cfg: UNetConfig) -> dict:
    """diffusers' UNet2DConditionModel config for the SD v1 architecture (sd-v1-4's unet/config.json) with cfg's
    sizes."""
    levels = range(len(cfg.channel_mult))
    return dict(
        sample_size=64,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=["CrossAttnDownBlock2D" if lv in cfg.attention_levels else "DownBlock2D" for lv in levels],
        up_block_types=["CrossAttnUpBlock2D" if lv in cfg.attention_levels else "UpBlock2D" for lv in reversed(levels)],
        block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult],
        layers_per_block=cfg.num_res_blocks,
        attention_head_dim=cfg.num_heads,  # diffusers' legacy name: for SD v1 it is the number of heads
        cross_attention_dim=cfg.context_dim,
        use_linear_projection=False,
    )


def diffusers_vae_config(cfg: VAEConfig) -> dict:
    """diffusers' AutoencoderKL config of SD v1 (sd-v1-4's vae/config.json) with cfg's sizes."""
    levels = len(cfg.ch_mult)
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[cfg.ch * m for m in cfg.ch_mult], layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels, norm_num_groups=cfg.norm_groups, sample_size=512,
    )


def transformers_clip_config(cfg: CLIPConfig, attention: str = "sdpa"):
    """transformers' CLIPTextConfig of SD v1 (sd-v1-4's text_encoder/config.json) with cfg's sizes. attention "eager"
    is an explicit softmax and mask, independent of the SDPA call our model makes; "sdpa" is transformers' default."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_length,
        hidden_act="quick_gelu", layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        projection_dim=cfg.width, attn_implementation=attention,
    )


def _load_strictly(ref, converted: dict, ours: torch.nn.Module):
    """ref takes the converted tensors as its own (no copy), strictly, in ours' train/eval mode. The converter may
    rename and reshape our tensors; it must use each exactly once, none dropped, merged or made up."""
    if _storages(converted.values()) != _storages(ours.state_dict().values()):
        raise RuntimeError(f"{type(ref).__name__}: the converter dropped, merged or added tensors")
    ref.load_state_dict(converted, strict=True, assign=True)
    if any(t.is_meta for t in [*ref.parameters(), *ref.buffers()]):
        raise RuntimeError(f"{type(ref).__name__}: tensors left on the meta device")
    return ref.train(ours.training)


def _storages(tensors) -> list[int]:
    return sorted(t.untyped_storage().data_ptr() for t in tensors)


def reference_unet(unet):
    """diffusers' UNet2DConditionModel holding our UNet's weights."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**diffusers_unet_config(unet.config))
    checkpoint = {UNET + k: v for k, v in unet.state_dict().items()}
    return _load_strictly(ref, convert_ldm_unet_checkpoint(checkpoint, ref.config), unet)


def reference_vae(vae):
    """diffusers' AutoencoderKL holding our VAE's weights."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**diffusers_vae_config(vae.config))
    checkpoint = {VAE + k: v for k, v in vae.state_dict().items()}
    return _load_strictly(ref, convert_ldm_vae_checkpoint(checkpoint, ref.config), vae)


def reference_clip(text_encoder, attention: str = "sdpa"):
    """transformers' CLIPTextModel holding our text encoder's weights (see transformers_clip_config for
    `attention`)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextModel

    ref = CLIPTextModel(transformers_clip_config(text_encoder.config, attention))  # not on meta: position_ids
    checkpoint = {CLIP + k: v for k, v in text_encoder.state_dict().items()}
    converted = convert_ldm_clip_checkpoint(checkpoint)
    if not any(k.startswith("text_model.") for k in ref.state_dict()):  # transformers 5 dropped that wrapper
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    ref = _load_strictly(ref, converted, text_encoder)
    return ref.to(next(text_encoder.parameters()).device)  # the position_ids buffer


# ---- tokenizer, scheduler, pipeline ----------------------------------------------------------------------------

def write_clip_vocab(folder: Path) -> Path:
    """vocab.json + merges.txt in `folder`, from the shipped bpe_simple_vocab_16e6.txt.gz, built the way OpenAI's
    simple_tokenizer.py builds its tables (with transformers' bytes_to_unicode)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = gzip.open(VOCAB_FILE).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def reference_tokenizer():
    """transformers' CLIPTokenizerFast from our shipped BPE file, padding with <|endoftext|> as SD v1 does."""
    from transformers import CLIPTokenizerFast

    with tempfile.TemporaryDirectory() as d:
        return CLIPTokenizerFast.from_pretrained(write_clip_vocab(Path(d)), pad_token="<|endoftext|>",
                                                 model_max_length=77)


def sd_v1_ddim(steps: int | None = None):
    """diffusers' DDIMScheduler as sd-v1-4's scheduler_config.json configures it, set to `steps` steps if given."""
    import diffusers

    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
                                        clip_sample=False, prediction_type="epsilon")
    if steps is not None:
        scheduler.set_timesteps(steps)
    return scheduler


def reference_pipeline(sd):
    """diffusers' StableDiffusionPipeline with the weights of our StableDiffusion `sd` (no safety checker)."""
    import diffusers

    # The references take our tensors as they are, so they are on our device in our dtype already.
    pipe = diffusers.StableDiffusionPipeline(
        vae=reference_vae(sd.vae), text_encoder=reference_clip(sd.text_encoder), tokenizer=reference_tokenizer(),
        unet=reference_unet(sd.unet), scheduler=sd_v1_ddim(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def single_file_pipeline(path, sd, folder: Path):
    """diffusers' StableDiffusionPipeline.from_single_file on our file `path` (which holds `sd`), the way users open
    our files in diffusers: its config written to `folder` first (no download), fp32, no safety checker."""
    import diffusers

    write_diffusers_config(folder, sd)
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, torch_dtype=torch.float32, safety_checker=None,
        feature_extractor=None, tokenizer=reference_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_diffusers_config(folder: Path, sd) -> None:
    """A local StableDiffusionPipeline config folder with the sizes of our StableDiffusion `sd`, for diffusers'
    `from_single_file(..., config=folder)` (no download)."""
    import diffusers

    components = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
                  "text_encoder": ("transformers", "CLIPTextModel"), "scheduler": ("diffusers", "DDIMScheduler"),
                  "tokenizer": ("transformers", "CLIPTokenizer"), "safety_checker": (None, None),
                  "feature_extractor": (None, None)}
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False, **components}))
    with torch.device("meta"):
        diffusers.UNet2DConditionModel(**diffusers_unet_config(sd.unet.config)).save_config(folder / "unet")
        diffusers.AutoencoderKL(**diffusers_vae_config(sd.vae.config)).save_config(folder / "vae")
    transformers_clip_config(sd.text_encoder.config).save_pretrained(folder / "text_encoder")
    sd_v1_ddim().save_config(folder / "scheduler")


# ---- what an sd-v1-4 file holds besides the weights ------------------------------------------------------------

def compvis_schedule() -> dict[str, torch.Tensor]:
    """The schedule buffers of an sd-v1 file, as CompVis' DDPM.register_schedule computes them
    (ldm/models/diffusion/ddpm.py, "linear" schedule, linear_start=0.00085, linear_end=0.012)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    buffers = dict(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=np.log(np.maximum(posterior_variance, 1e-20)),
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    )
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in buffers.items()}


@contextmanager
def fake_lightning():
    """A stand-in `pytorch_lightning.callbacks.model_checkpoint` module, there only while pickling.

    Yields its ModelCheckpoint class; afterwards the modules are gone, so loading a file that
    names the class can only succeed without importing anything."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    assert not any(n in sys.modules for n in names), "the real pytorch_lightning is imported"
    modules = {n: types.ModuleType(n) for n in names}
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    modules[names[-1]].ModelCheckpoint = cls
    sys.modules.update(modules)
    try:
        yield cls
    finally:
        for n in names:
            del sys.modules[n]


def write_lightning_ckpt(state: dict[str, torch.Tensor], path) -> None:
    """A .ckpt shaped like sd-v1-4.ckpt: the weights wrapped with Lightning's training metadata."""
    with fake_lightning() as model_checkpoint:
        torch.save({
            "epoch": 6,
            "global_step": 470000,
            "pytorch-lightning_version": "1.4.2",
            "state_dict": state,
            "callbacks": {model_checkpoint: {"monitor": None, "best_model_score": None, "best_model_path": "",
                                             "current_score": None, "dirpath": "logs/checkpoints",
                                             "kth_value": torch.tensor(float("inf"))}},
        }, path)


def parity_inputs(unet_cfg: UNetConfig, clip_cfg: CLIPConfig, latent=32, image=64) -> dict[str, torch.Tensor]:
    """Seeded inputs for the three models: UNet (x, t, context), VAE encoder (image) and decoder (z), CLIP (ids)."""
    gen = torch.Generator().manual_seed(1)
    return dict(
        x=torch.randn(2, unet_cfg.in_channels, latent, latent, generator=gen),
        t=torch.tensor([10, 700]),
        context=torch.randn(2, 77, unet_cfg.context_dim, generator=gen),
        image=torch.rand(2, 3, image, image, generator=gen) * 2 - 1,
        z=torch.randn(2, 4, image // 8, image // 8, generator=gen),
        ids=torch.randint(0, clip_cfg.vocab_size, (2, clip_cfg.max_length), generator=gen),
    )
