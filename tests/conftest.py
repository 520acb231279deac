"""Shared fixtures: full-size SD v1 checkpoint files with random weights, and what independent
implementations (diffusers, transformers) compute from those weights.

Built once per session. The weights are seeded random values in the shapes of our models,
rounded to fp16 (half the disk and time; the fp32 references see the very same rounded values),
under the original CompVis key names, written as
  (a) a PyTorch Lightning style .ckpt like sd-v1-4.ckpt (state_dict, global_step, epoch and a
      `callbacks` entry keyed by a class from a fake `pytorch_lightning` module, removed again
      before anything is loaded), and
  (b) a .safetensors.
The key layout is proven to be the real one by diffusers' own LDM -> diffusers converters (the
code diffusers runs on sd-v1-4 files) followed by strict loads into diffusers' UNet2DConditionModel
and AutoencoderKL and transformers' CLIPTextModel: no key table of ours is involved.
"""
import json
import sys
import types
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from benchmarks.same_weights import diffusers_unet_config, diffusers_vae_config, transformers_clip_config
from dreambooth.clip import CLIPConfig, CLIPTextModel
from dreambooth.unet import UNetConfig, UNetModel
from dreambooth.vae import AutoencoderKL, VAEConfig

# The prefixes of the original CompVis checkpoints (ldm.models.diffusion.ddpm.LatentDiffusion).
UNET, VAE, CLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."


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


def random_weights(unet_cfg, vae_cfg, clip_cfg, seed=0, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """Seeded random weights for every tensor of our three models, under CompVis key names.

    Noise everywhere, so no zero-initialised layer can hide a wrong layout: norm scales 1 + noise,
    biases small noise, matrices and convs scaled by fan-in so activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for prefix, cls, cfg in ((UNET, UNetModel, unet_cfg), (VAE, AutoencoderKL, vae_cfg), (CLIP, CLIPTextModel, clip_cfg)):
        with torch.device("meta"):
            model = cls(cfg)
        for module_name, module in model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=gen)
                if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and name == "weight":
                    noise = 1 + 0.05 * noise
                elif p.ndim >= 2:
                    noise /= p[0].numel() ** 0.5
                else:
                    noise *= 0.05
                weights[prefix + (f"{module_name}.{name}" if module_name else name)] = noise.to(dtype)
    return weights


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
    gen = torch.Generator().manual_seed(1)
    return dict(
        x=torch.randn(2, unet_cfg.in_channels, latent, latent, generator=gen),
        t=torch.tensor([10, 700]),
        context=torch.randn(2, 77, unet_cfg.context_dim, generator=gen),
        image=torch.rand(2, 3, image, image, generator=gen) * 2 - 1,
        z=torch.randn(2, 4, image // 8, image // 8, generator=gen),
        ids=torch.randint(0, clip_cfg.vocab_size, (2, clip_cfg.max_length), generator=gen),
    )


@torch.no_grad()
def reference_outputs(weights: dict[str, torch.Tensor], unet_cfg, vae_cfg, clip_cfg, inputs) -> dict[str, torch.Tensor]:
    """Outputs of diffusers' UNet and VAE and transformers' CLIP, loaded strictly (in fp32) from
    the CompVis-layout weights through diffusers' converters. The models are dropped on return."""
    import diffusers
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    from transformers import CLIPTextModel as ReferenceCLIP

    def strict_load(model, converted, source_prefix):
        n_source = sum(k.startswith(source_prefix) for k in weights)
        assert len(converted) == n_source == len(model.state_dict()), "converter dropped or merged keys"
        model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True, assign=True)
        assert not any(t.is_meta for t in model.state_dict().values())
        return model.eval()

    out = {}
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**diffusers_unet_config(unet_cfg))
    unet = strict_load(unet, convert_ldm_unet_checkpoint(weights, unet.config), UNET)
    out["eps"] = unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"]).sample
    del unet

    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(**diffusers_vae_config(vae_cfg))
    vae = strict_load(vae, convert_ldm_vae_checkpoint(weights, vae.config), VAE)
    posterior = vae.encode(inputs["image"]).latent_dist
    out["mean"], out["logvar"] = posterior.mean, posterior.logvar
    out["decoded"] = vae.decode(inputs["z"]).sample
    del vae

    clip = ReferenceCLIP(transformers_clip_config(clip_cfg))
    # transformers 5 keeps CLIP's text_model.* names only in its file-loading conversions
    converted = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(weights).items()}
    clip = strict_load(clip, converted, CLIP)
    out["context"] = clip(inputs["ids"]).last_hidden_state
    return out


@pytest.fixture(scope="session")
def sd_v1_files(tmp_path_factory):
    """Full-size SD v1 files (.ckpt and .safetensors, fp16 random weights) and the reference outputs.

    Yields a namespace: ckpt, safetensors (paths), inputs and expected (dicts of tensors)."""
    pytest.importorskip("diffusers")
    unet_cfg, vae_cfg, clip_cfg = UNetConfig(), VAEConfig(), CLIPConfig()
    weights = random_weights(unet_cfg, vae_cfg, clip_cfg)
    inputs = parity_inputs(unet_cfg, clip_cfg)
    expected = reference_outputs(weights, unet_cfg, vae_cfg, clip_cfg, inputs)

    folder = tmp_path_factory.mktemp("sd_v1")
    files = SimpleNamespace(ckpt=folder / "sd-v1-random.ckpt", safetensors=folder / "sd-v1-random.safetensors",
                            inputs=inputs, expected=expected)
    weights.update(compvis_schedule())
    save_file(weights, files.safetensors)
    # What else sd-v1-4.ckpt carries: LitEma's bookkeeping and transformers' position_ids buffer.
    weights.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(470000),
                    CLIP + "embeddings.position_ids": torch.arange(77)[None]})
    write_lightning_ckpt(weights, files.ckpt)
    del weights
    yield files
    files.ckpt.unlink()  # 4 GB of disk: do not leave it to pytest's basetemp rotation
    files.safetensors.unlink()


def write_diffusers_config(folder, sd) -> None:
    """A local StableDiffusionPipeline config folder with the tiny model's sizes (no download)."""
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
    diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                            clip_sample=False, set_alpha_to_one=False, steps_offset=1).save_config(folder / "scheduler")
