"""Our models with seeded random weights, and the reference implementations built from the very same weights.

Our models' state dicts, put under the original CompVis prefixes, go through diffusers' own LDM converters (the
code diffusers runs on sd-v1-4 files) and load strictly into diffusers' UNet2DConditionModel / AutoencoderKL and
transformers' CLIPTextModel; the tokenizer is transformers' CLIPTokenizerFast built from the vocabulary file we ship.
So both sides compute the same function from the same numbers. diffusers and transformers are test-only
dependencies: only the benchmarks and tests import this module.
"""
import gzip
import json
import tempfile
from pathlib import Path

import torch

from dreambooth.clip import CLIPConfig
from dreambooth.unet import UNetConfig
from dreambooth.vae import VAEConfig

UNET, VAE, CLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."
VOCAB = Path(__file__).resolve().parents[1] / "dreambooth" / "bpe_simple_vocab_16e6.txt.gz"


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


def random_model(cls, cfg, device="cpu", seed: int = 0):
    """One of our models (UNetModel, AutoencoderKL, CLIPTextModel) with `random_weights_`, built without the
    default initialisation (which random_weights_ overwrites anyway)."""
    with torch.device("meta"):
        model = cls(cfg)
    return random_weights_(model.to_empty(device=device), seed)


def diffusers_unet_config(cfg: UNetConfig) -> dict:
    """diffusers' UNet2DConditionModel config for the SD v1 architecture with cfg's sizes."""
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
    levels = len(cfg.ch_mult)
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[cfg.ch * m for m in cfg.ch_mult], layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels, norm_num_groups=32, sample_size=512,
    )


def transformers_clip_config(cfg: CLIPConfig):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_length,
        hidden_act="quick_gelu", layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        projection_dim=cfg.width,
    )


def _strict_load(model, converted: dict, n_ours: int):
    if not len(converted) == n_ours == len(model.state_dict()):
        raise RuntimeError(f"{type(model).__name__}: the converter dropped or merged keys")
    model.load_state_dict({k: v.detach().clone() for k, v in converted.items()}, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise RuntimeError(f"{type(model).__name__}: tensors left on the meta device")
    return model


def reference_unet(unet):
    """diffusers' UNet2DConditionModel holding a copy of our UNet's weights."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**diffusers_unet_config(unet.config))
    ours = {UNET + k: v for k, v in unet.state_dict().items()}
    return _strict_load(ref, convert_ldm_unet_checkpoint(ours, ref.config), len(ours)).train(unet.training)


def reference_vae(vae):
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**diffusers_vae_config(vae.config))
    ours = {VAE + k: v for k, v in vae.state_dict().items()}
    return _strict_load(ref, convert_ldm_vae_checkpoint(ours, ref.config), len(ours)).eval()


def reference_clip(text_encoder):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextModel

    ref = CLIPTextModel(transformers_clip_config(text_encoder.config))  # not on meta: it has a position_ids buffer
    ours = {CLIP + k: v for k, v in text_encoder.state_dict().items()}
    converted = convert_ldm_clip_checkpoint(ours)
    if not any(k.startswith("text_model.") for k in ref.state_dict()):  # transformers 5 dropped that wrapper
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    ref = _strict_load(ref, converted, len(ours)).eval()
    return ref.to(next(text_encoder.parameters()).device)  # the position_ids buffer


def reference_tokenizer():
    """transformers' CLIPTokenizerFast from our shipped BPE file (vocab.json + merges.txt written the way OpenAI's
    simple_tokenizer.py builds its tables), padding with <|endoftext|> as SD v1 does."""
    from transformers import CLIPTokenizerFast

    merges = gzip.open(VOCAB).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    chars = [chr(b) for b in _bytes_to_unicode()]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
        (Path(d) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizerFast.from_pretrained(d, pad_token="<|endoftext|>", model_max_length=77)


def _bytes_to_unicode() -> list[int]:
    """GPT-2's byte -> printable code point table, in OpenAI's order (printable bytes first)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return cs


def sd_v1_ddim():
    """diffusers' DDIMScheduler as sd-v1-4's scheduler_config.json configures it."""
    import diffusers

    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
                                   clip_sample=False, prediction_type="epsilon")


def reference_pipeline(sd):
    """diffusers' StableDiffusionPipeline with the weights of our StableDiffusion `sd` (no safety checker)."""
    import diffusers

    # The references take our tensors as they are (assign=True), so they are on our device in our dtype already.
    pipe = diffusers.StableDiffusionPipeline(
        vae=reference_vae(sd.vae), text_encoder=reference_clip(sd.text_encoder), tokenizer=reference_tokenizer(),
        unet=reference_unet(sd.unet).eval(), scheduler=sd_v1_ddim(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_photos(side: int, device, seed: int = 0):
    """train.py's cache for 1 subject + 1 prior photo, with random numbers: the VAE posteriors (mean, logvar) of each
    photo and its mirror image, [2, 2, 8, side, side], logvar around -8 (posterior sigmas ~0.02, like a real VAE's),
    in the train.Photos that a step draws its batches from."""
    import train

    posteriors = torch.randn(2, 2, 8, side, side, generator=torch.Generator().manual_seed(seed))
    posteriors[:, :, 4:] -= 8
    return train.Photos(posteriors.to(device), None, None, n_instance=1, n_prior=1, batch_size=1)
