"""Reading and writing Stable Diffusion v1 checkpoints, safely and with checks.

A checkpoint is one flat dict of tensors in the original CompVis layout:

    model.diffusion_model.*                     the UNet                  (unet.py)
    first_stage_model.*                         the KL autoencoder        (vae.py)
    cond_stage_model.transformer.text_model.*   the CLIP text encoder     (clip.py)
    model_ema.*                                 EMA copy of the UNet, in some files
    alphas_cumprod, betas, ...                  the DDPM noise schedule

Our modules carry the same names, so loading is: split the keys by prefix, check every key and
shape, strict `load_state_dict`. Files are memory-mapped and the models are built on the meta
device, taking the file's tensors with `assign=True` (cast to the wanted dtype one by one), so
loading never holds two copies of the weights.

A `.ckpt` is a zip holding a pickle, and unpickling can run any code the file names: torchfile.py reads it
without running anything. What it holds is then checked as data: a dict of dense tensors under string names, the
weights finite, reached through at most a few Lightning-style "state_dict" wrappers.
"""
import math
import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .clip import IGNORED_KEYS as CLIP_IGNORED_KEYS
from .clip import CLIPConfig, CLIPTextModel
from .ddim import sd_alphas_cumprod
from .files import write_atomic
from .stable_diffusion import StableDiffusion
from .tokenizer import Tokenizer
from .torchfile import CheckpointError, first_line, read_pickle, what_it_is
from .unet import UNetConfig, UNetModel
from .vae import LATENT_SCALE, AutoencoderKL, VAEConfig

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."
EMA = "model_ema."  # LitEma stores the UNet as model_ema.diffusion_model<name with the dots removed>

# Keys of real SD v1 files that load() reads past on purpose.
IGNORED = {
    "model_ema.decay", "model_ema.num_updates",  # LitEma bookkeeping, not weights
    *(CLIP + key for key in CLIP_IGNORED_KEYS),  # position_ids: arange(77) saved by old transformers (clip.py)
    # The DDPM schedule: all of it follows from alphas_cumprod, which is checked against ddim.py instead.
    "betas", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar",
}


# Where the programs look when --ckpt is not given, in this order (relative to the working folder; cli.py), before
# they fall back on the toy model: SD v1's architecture at toy width, trained by make_toy.py on drawn shapes.
DEFAULT_FILES = ("weights/sd-v1-4.ckpt", "weights/sd-v1-4.safetensors")
TOY_FILE = Path(__file__).with_name("toy.safetensors")


def load(path: str | os.PathLike, device="cpu", dtype=torch.float32, ema: bool = False) -> StableDiffusion:
    """Load an SD v1 .ckpt / .safetensors file, "toy" (the toy model this repo trains and ships, make_toy.py), or
    "tiny": a small random model needing no file.

    Weights are cast to `dtype` one tensor at a time. ema=True takes the UNet from the file's
    model_ema.* weights (the -full-ema files). Anything else raises CheckpointError, one line
    naming the file and what is wrong: an unsafe pickle, another model family, a missing,
    unexpected or mis-shaped key, a different noise schedule, a truncated file."""
    if path == "tiny":
        return _tiny().to(device, dtype)
    name = "toy" if path == "toy" else None
    path = TOY_FILE if path == "toy" else Path(path)
    state = read_tensors(path)
    _check_family(path, state)
    parts = _split(path, state)

    unet = _build(UNetModel, UNetConfig, parts[UNET], "input_blocks.0.0.weight", 0, "model_channels")
    unet_weights = _ema_weights(path, unet, parts[EMA]) if ema else parts[UNET]
    unet = _assign(path, unet, unet_weights, _ema_key if ema else lambda k: UNET + k, device, dtype)

    vae = _build(AutoencoderKL, VAEConfig, parts[VAE], "encoder.conv_in.weight", 0, "ch",
                 **vae_groups(path, parts[VAE]))
    vae = _assign(path, vae, parts[VAE], lambda k: VAE + k, device, dtype)
    text_encoder = _build(CLIPTextModel, CLIPConfig, parts[CLIP], "embeddings.token_embedding.weight", 1, "width")
    text_encoder = _assign(path, text_encoder, parts[CLIP], lambda k: CLIP + k, device, dtype)
    return StableDiffusion(Tokenizer(), text_encoder, unet, vae, sd_alphas_cumprod().to(device),
                           name=name or path.name, resolution=64 if unet.config == UNetConfig.tiny() else 512,
                           latent_scale=latent_scale(path), sampling=sampling_settings(path))


# Keys of published VAE files that load_vae reads past on purpose: LitEma's bookkeeping (the EMA weights themselves
# are already the file's weights in the "ema-pruned" files). The loss network, loss.*, is skipped by its prefix:
# only training used it (LPIPS and the discriminator).
VAE_IGNORED = {"model_ema.decay", "model_ema.num_updates"}


def load_vae(path: str | os.PathLike, device="cpu", dtype=torch.float32) -> AutoencoderKL:
    """A KL-f8 VAE file as published (.ckpt or .safetensors, e.g. vae-ft-mse-840000-ema-pruned): CompVis names
    with or without the first_stage_model. prefix. Anything else raises CheckpointError naming what it is."""
    path = Path(path)
    state = read_tensors(path)
    keys = list(state)
    if any(k.startswith(UNET) for k in keys):
        raise CheckpointError(f"{path} is a full SD model ({UNET}* keys), not a VAE")
    _check_layout(path, keys, "a VAE")
    if any(k.startswith(("cond_stage_model.", "text_model.")) for k in keys):
        raise CheckpointError(f"{path} is a text encoder (keys like {keys[0]}), not a VAE")
    prefix = VAE if any(k.startswith(VAE) for k in keys) else ""
    weights = {k.removeprefix(prefix): v for k, v in state.items()
               if not k.startswith("loss.") and k not in VAE_IGNORED}
    if "encoder.conv_in.weight" not in weights:
        raise CheckpointError(f"{path} is not a VAE: it has no {prefix}encoder.conv_in.weight")
    vae = _build(AutoencoderKL, VAEConfig, weights, "encoder.conv_in.weight", 0, "ch", **vae_groups(path, weights))
    return _assign(path, vae, weights, lambda k: prefix + k, device, dtype)


def save(sd: StableDiffusion, path: str | os.PathLike, dtype=torch.float16, metadata: dict | None = None) -> None:
    """Write `sd` as a .safetensors file in the original CompVis layout, atomically (files.write_atomic).
    Weights are cast to `dtype`; the schedule buffers stay float32. The file's metadata holds the latent scale,
    the VAE's GroupNorm groups and the sampling settings where they are not SD v1's (load reads them back; the groups
    cannot be seen in the weights' shapes), and the strings in `metadata`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"save: {path} must end in .safetensors (the only format save writes)")
    if not path.parent.is_dir():
        raise CheckpointError(f"save: folder {path.parent} does not exist")
    tensors = {prefix + key: t.detach().to("cpu", dtype, copy=True).contiguous()
               for prefix, model in ((UNET, sd.unet), (VAE, sd.vae), (CLIP, sd.text_encoder))
               for key, t in model.state_dict().items()}
    tensors.update(schedule_buffers(sd.alphas_cumprod))
    # Only what differs from SD v1 is written: safetensors writes metadata in no fixed order, so one entry keeps
    # files of the same weights byte-identical.
    own_scale = {"latent_scale": repr(sd.latent_scale)} if sd.latent_scale != LATENT_SCALE else {}
    groups = sd.vae.config.norm_groups
    own_groups = {"vae_norm_groups": str(groups)} if groups != VAEConfig().norm_groups else {}
    own_sampling = {SAMPLING_KEYS[key]: str(value) for key, value in sd.sampling.items()}
    metadata = {"format": "pt", **own_scale, **own_groups, **own_sampling, **(metadata or {})}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def schedule_buffers(alphas_cumprod: torch.Tensor) -> dict[str, torch.Tensor]:
    """The buffers CompVis' DDPM.register_schedule (ldm/models/diffusion/ddpm.py) stores with a model:
    beta_t = 1 - alpha-bar_t / alpha-bar_{t-1} and the posterior q(x_{t-1} | x_t, x_0) of DDPM
    eqs. 6-7. Derived in float64 from the float32 alpha-bar: alphas_cumprod(_prev), which samplers
    read, are exact; the others agree with CompVis' float64 values to ~1e-4 relative."""
    ac = alphas_cumprod.detach().cpu().double()
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    betas = 1 - ac / ac_prev
    posterior_variance = betas * (1 - ac_prev) / (1 - ac)
    buffers = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1 - ac),
        "posterior_mean_coef2": (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac),
    }
    return {k: v.float() for k, v in buffers.items()}


def _tiny() -> StableDiffusion:
    """The built-in toy model: SD v1's architecture with few channels, random weights from a
    fixed seed (the same on every call, whatever the global RNG state)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(CLIPConfig.tiny()).eval()
        unet = UNetModel(UNetConfig.tiny()).eval()
        vae = AutoencoderKL(VAEConfig.tiny()).eval()
    return StableDiffusion(Tokenizer(), text_encoder, unet, vae, sd_alphas_cumprod(), name="tiny", resolution=64)


# ---- reading files -------------------------------------------------------------------------

def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's flat dict of tensors, memory-mapped: a tensor's bytes are read when first used."""
    if path.is_dir():
        if (path / "model_index.json").exists() or (path / "unet").is_dir():
            raise CheckpointError(f"{path} is a diffusers-format folder; load a single-file .ckpt/.safetensors "
                                  "in the original layout (diffusers' convert_diffusers_to_original_stable_diffusion.py)")
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as f:
                return {key: f.get_tensor(key) for key in f.keys()}
        except SafetensorError as e:
            what = what_it_is(path) or f"is truncated or corrupt ({first_line(e)})"
            raise CheckpointError(f"{path} {what}") from None
    state = _state_dict(path, read_pickle(path))
    for key, tensor in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: key {key!r} is not a name; a state dict's keys are strings")
        if tensor.layout != torch.strided or tensor.is_meta or tensor.is_quantized:
            kind = "meta" if tensor.is_meta else "quantized" if tensor.is_quantized else str(tensor.layout)
            raise CheckpointError(f"{path}: {key} is a {kind} tensor; a checkpoint holds dense weights")
    return state


# How many {"state_dict": ...} wrappers read_tensors looks through: Lightning's one, and a little room.
MAX_WRAPPERS = 4


def _state_dict(path: Path, obj) -> dict:
    """The dict of tensors in an unpickled .ckpt: obj itself, or inside Lightning's {"state_dict": ..., ...}.
    A pickle can build a dict that holds itself, so the walk is bounded and never revisits a dict."""
    seen = set()
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        if id(obj) in seen or len(seen) == MAX_WRAPPERS:
            raise CheckpointError(f"{path}: its state_dict entries nest in a loop or more than {MAX_WRAPPERS} deep")
        seen.add(id(obj))
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return obj


def vae_groups(path: Path, weights: dict[str, torch.Tensor]) -> dict[str, int]:
    """{"norm_groups": n} where the file's metadata names the VAE's GroupNorm groups (save writes it), else {}.
    `weights` are the VAE's, without their first_stage_model. prefix (the count must divide their width)."""
    value = _metadata(path).get("vae_norm_groups")
    if value is None:
        return {}
    width = weights["encoder.conv_in.weight"].shape[0] if "encoder.conv_in.weight" in weights else 0
    if not value.isdigit() or int(value) == 0 or width % int(value):
        raise CheckpointError(f"{path}: metadata vae_norm_groups is {value!r}, not a number of groups that divides "
                              f"the VAE's {width} channels")
    return {"norm_groups": int(value)}


def latent_scale(path: Path) -> float:
    """The latent scale the file's metadata names (save writes it where it is not SD v1's), else SD v1's. The UNet
    works on latents times it and the decoder divides by it, so it must be a finite number above 0."""
    value = _metadata(path).get("latent_scale")
    if value is None:
        return LATENT_SCALE
    scale = _number(value)
    if not math.isfinite(scale) or scale <= 0:
        raise CheckpointError(f"{path}: metadata latent_scale is {value!r}, not a number above 0")
    return scale


# StableDiffusion.sampling's settings and the metadata keys that carry them.
SAMPLING_KEYS = {"scale": "guidance_scale", "ddim_steps": "ddim_steps"}


def sampling_settings(path: Path) -> dict:
    """{"scale": float, "ddim_steps": int} as far as the file's metadata names them (make_toy.py writes them, and so
    does save for a model fine-tuned from such a file); {} for SD v1's files, which name none."""
    metadata, settings = _metadata(Path(path)), {}
    for name, key in SAMPLING_KEYS.items():
        if key in metadata:
            value = metadata[key]
            number = _number(value)
            if name == "ddim_steps" and not (number.is_integer() and 1 <= number <= 999):
                raise CheckpointError(f"{path}: metadata {key} is {value!r}, not a number of steps from 1 to 999")
            if not math.isfinite(number):
                raise CheckpointError(f"{path}: metadata {key} is {value!r}, not a finite number")
            settings[name] = int(number) if name == "ddim_steps" else number
    return settings


def _number(text: str) -> float:
    """A metadata string as a number; nan where it is none, which the checks then refuse."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _metadata(path: Path) -> dict[str, str]:
    """A .safetensors file's string metadata (a .ckpt has none)."""
    if path.suffix != ".safetensors":
        return {}
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def _check_family(path: Path, state: dict[str, torch.Tensor]) -> None:
    """One-line errors for the checkpoints people most often mistake for an SD v1 one."""
    keys = list(state)
    _check_layout(path, keys, "a full SD v1 model")
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise CheckpointError(f"{path} is an SDXL model (conditioner.embedders.*); only SD v1 is supported")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise CheckpointError(f"{path} is an SD 2.x model (OpenCLIP text encoder, cond_stage_model.model.*); "
                              "only SD v1 is supported")
    stem = state.get(UNET + "input_blocks.0.0.weight")
    if stem is None:
        if any(k.startswith(("encoder.", "decoder.", VAE)) for k in keys):
            raise CheckpointError(f"{path} is a VAE-only file (no model.diffusion_model.* keys), not a full SD v1 model")
        raise CheckpointError(f"{path} is not an SD v1 checkpoint: it has no {UNET}* keys")
    if stem.ndim != 4 or stem.shape[1] != 4:
        kind = "an inpainting model" if stem.ndim == 4 and stem.shape[1] == 9 else "not a text-to-image SD v1 model"
        raise CheckpointError(f"{path} is {kind}: its UNet takes {stem.shape[1]} input channels, not 4")
    to_k = next((v for k, v in state.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    if to_k is not None and to_k.shape[-1] == 1024:
        raise CheckpointError(f"{path} is an SD 2.x model (1024-dim text context); only SD v1 (768) is supported")


def _check_layout(path: Path, keys: list[str], wanted: str) -> None:
    """One-line errors for a LoRA or a diffusers-format file given where `wanted` (a full model, a VAE) is."""
    lora = next((k for k in keys if "lora" in k.lower()), None)
    if lora:
        raise CheckpointError(f"{path} is a LoRA (keys like {lora}), not {wanted}")
    if any("down_blocks." in k or "mid_block." in k for k in keys):
        raise CheckpointError(f"{path} is in diffusers format (keys like down_blocks.*); "
                              "load a file in the original CompVis layout")


def _split(path: Path, state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{prefix: {key without prefix: tensor}}; checks alphas_cumprod and that no key is left over.
    parts[EMA] is only used with ema=True (model_ema.* is read past otherwise)."""
    parts = {UNET: {}, VAE: {}, CLIP: {}, EMA: {}}
    for key, tensor in state.items():
        if key == "alphas_cumprod":
            _check_schedule(path, tensor)
        elif key not in IGNORED:
            prefix = next((p for p in parts if key.startswith(p)), None)
            if prefix is None:
                raise CheckpointError(f"{path}: unexpected key {key}")
            parts[prefix][key[len(prefix):]] = tensor
    return parts


def _check_schedule(path: Path, stored: torch.Tensor) -> None:
    expected = sd_alphas_cumprod()
    tol = max(1e-5, torch.finfo(stored.dtype).eps) if stored.is_floating_point() else 0.0
    if stored.shape != expected.shape or (stored.float() - expected).abs().max() > tol:
        raise CheckpointError(f"{path}: alphas_cumprod is not SD v1's schedule "
                              "(scaled-linear betas 0.00085 -> 0.012, 1000 steps)")


def _ema_key(key: str) -> str:
    return EMA + "diffusion_model" + key.replace(".", "")


def _ema_weights(path: Path, unet: UNetModel, ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """model_ema.* back to UNet names, matching against our names with the dots removed."""
    if not ema:
        raise CheckpointError(f"{path} has no EMA weights (model_ema.*); load it with ema=False")
    names = {_ema_key(k): k for k in unet.state_dict()}
    unexpected = next((EMA + key for key in ema if EMA + key not in names), None)
    if unexpected:
        raise CheckpointError(f"{path}: unexpected key {unexpected}")
    return {names[EMA + key]: tensor for key, tensor in ema.items()}


# ---- building models -----------------------------------------------------------------------

def _build(model_cls, config_cls, tensors: dict[str, torch.Tensor], key: str, dim: int, field: str, **fields):
    """A model with shapes but no memory (its tensors come from the file): of SD v1's config, or of the tiny one
    when the width at tensors[key].shape[dim] is the tiny's.

    Head counts cannot be read off shapes, so a file has SD v1's sizes (8 UNet heads, 12 CLIP
    heads) or the tiny model's (a saved tiny model loads back); any other size then fails the
    shape checks against SD v1, which name the key. `fields` replace the config's own (a file's metadata)."""
    tiny = config_cls.tiny()
    cfg = tiny if key in tensors and tensors[key].shape[dim] == getattr(tiny, field) else config_cls()
    cfg = replace(cfg, **fields)
    with torch.device("meta"):
        return model_cls(cfg)


def _assign(path: Path, model: torch.nn.Module, tensors: dict[str, torch.Tensor], file_key, device, dtype):
    """Strict load after our own checks, so an error names the key as the file spells it."""
    expected = model.state_dict()
    for key, t in expected.items():
        if key not in tensors:
            raise CheckpointError(f"{path}: missing key {file_key(key)}")
        if tensors[key].shape != t.shape:
            raise CheckpointError(f"{path}: {file_key(key)} has shape {list(tensors[key].shape)}, "
                                  f"expected {list(t.shape)}")
    for key in tensors:
        if key not in expected:
            raise CheckpointError(f"{path}: unexpected key {file_key(key)}")
    model.load_state_dict(_finite(path, tensors, file_key, device, dtype), strict=True, assign=True)
    return model.eval()


def _finite(path: Path, tensors: dict[str, torch.Tensor], file_key, device, dtype) -> dict[str, torch.Tensor]:
    """The tensors on `device` as `dtype`, each checked to be finite: one nan weight makes every image black
    (and a value beyond float16's range becomes inf when cast to it)."""
    out = {}
    for key, t in tensors.items():
        # To the device first, then cast: on a GPU the cast runs there, and an fp16 file sends half the bytes.
        out[key] = t.to(device).to(dtype)
        if out[key].is_floating_point() and not out[key].isfinite().all():
            raise CheckpointError(f"{path}: {file_key(key)} holds values that are not finite (nan or inf) as {dtype}")
    return out
