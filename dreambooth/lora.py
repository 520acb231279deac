"""LoRA: low-rank adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A LoRA leaves a layer's weight W0 [out, in] as it is and learns a change of rank r beside it (the paper's eq. 3):

    h = W0 x + (alpha / r) * up @ down @ x        down [r, in], up [out, r]

`up` starts at zero, so training starts exactly from the base model; `down` starts random (Gaussian, as in the
paper). Only up and down are trained: for SD v1 at rank 16, 6.8 M numbers instead of the UNet's 860 M, which is
why a LoRA file is megabytes and its training fits a small GPU. After training, W0 + (alpha / r) * up @ down is
an ordinary weight again: merging it in costs nothing per step.

Which layers: those kohya's sd-scripts adapt by default, which is what A1111 and ComfyUI expect. In the UNet,
every linear layer inside a spatial transformer (proj_in and proj_out, 1x1 convolutions in SD v1; q, k, v and out
of both attentions; the feed-forward layers); in CLIP, the attention and MLP linears.

The file is kohya's format: for each adapted layer `<name>.lora_down.weight`, `<name>.lora_up.weight` and
`<name>.alpha`, where <name> is `lora_unet_` or `lora_te_` and the layer's diffusers module path with dots as
underscores. Our layers keep their CompVis names; kohya_name() renames them.
"""
import contextlib
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .checkpoint import CheckpointError, read_tensors
from .files import write_atomic

UNET_TARGETS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def delta(down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """(alpha / r) * up @ down in the layer's weight shape ([out, in], or [out, in, 1, 1] for a 1x1 conv): what
    merging a LoRA adds to W0."""
    rank = down.shape[0]
    return (up.flatten(1).float() @ down.flatten(1).float() * (alpha / rank)).view(up.shape[:1] + down.shape[1:])


class Adapter(nn.Module):
    """The trained part of one LoRA layer: x -> (alpha / r) * up(down(x)), added to the frozen layer's output.
    For a 1x1 convolution (proj_in, proj_out) down and up are 1x1 convolutions too; the names are kohya's."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, rank: int, alpha: float, generator=None):
        super().__init__()
        conv = isinstance(layer, nn.Conv2d)
        n_in, n_out = (layer.in_channels, layer.out_channels) if conv else (layer.in_features, layer.out_features)
        make = (lambda i, o: nn.Conv2d(i, o, 1, bias=False)) if conv else (lambda i, o: nn.Linear(i, o, bias=False))
        self.lora_down, self.lora_up = make(n_in, rank), make(rank, n_out)
        nn.init.normal_(self.lora_down.weight, std=1 / rank, generator=generator)
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.to(layer.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x)) * (self.alpha / self.lora_down.weight.shape[0])


def kohya_name(part: str, name: str, num_res_blocks: int = 2) -> str:
    """Our CompVis module name -> kohya's key name. part: "unet" or "te" (the text encoder).

    CLIP's names are already diffusers' (under text_model.). The UNet's blocks are numbered differently: CompVis
    counts input_blocks 0..11 in one list (block 0 is the first convolution, then each level has num_res_blocks
    ResBlocks, each followed by its transformer at index .1, and a downsampler), diffusers nests them by level:
        input_blocks.1.1  -> down_blocks.0.attentions.0     input_blocks.n.1  -> down_blocks.(n-1)//3.attentions.(n-1)%3
        middle_block.1    -> mid_block.attentions.0
        output_blocks.3.1 -> up_blocks.1.attentions.0       output_blocks.n.1 -> up_blocks.n//3.attentions.n%3
    (3 = num_res_blocks + 1; the decoder has one ResBlock more per level and no downsampler)."""
    if part == "te":
        return "lora_te_text_model_" + name.replace(".", "_")
    block, n, *rest = name.split(".")  # "input_blocks", "4", "1", "transformer_blocks", "0", "attn1", "to_q"
    per_level = num_res_blocks + 1
    if block == "input_blocks":
        path = ["down_blocks", (int(n) - 1) // per_level, "attentions", (int(n) - 1) % per_level, *rest[1:]]
    elif block == "middle_block":
        path = ["mid_block", "attentions", 0, *rest]
    else:
        path = ["up_blocks", int(n) // per_level, "attentions", int(n) % per_level, *rest[1:]]
    return "lora_unet_" + "_".join(map(str, path))


def target_layers(sd, text_encoder: bool = True) -> dict[str, nn.Module]:
    """{kohya name: layer} of every layer a LoRA adapts, in the UNet and (if text_encoder) in CLIP."""
    layers = {kohya_name("unet", name, sd.unet.config.num_res_blocks): m for name, m in sd.unet.named_modules()
              if (".transformer_blocks." in name or name.endswith((".proj_in", ".proj_out")))
              and name.endswith(UNET_TARGETS)}
    if text_encoder:
        layers |= {kohya_name("te", name): m for name, m in sd.text_encoder.named_modules()
                   if name.endswith(CLIP_TARGETS)}
    return layers


def base_dtype(device_type: str, autocast_dtype: torch.dtype, merged_saved: bool = False) -> torch.dtype:
    """The dtype to hold the frozen base model in while its LoRA trains. On a GPU under autocast, the autocast dtype
    itself: the weights get no gradient, so nothing needs fp32, and autocast then uses them as they are instead of
    casting all 860 M of them at every forward (and every checkpoint recompute). Except bf16 when the merged model
    is saved: that file is fp16, and bf16 (8 significant bits against 11) would round its weights more; the base
    then stays fp16, cast to bf16 per forward. On the CPU (and in fp32) it stays fp32."""
    if device_type != "cuda" or autocast_dtype == torch.float32:
        return torch.float32
    return torch.float16 if merged_saved else autocast_dtype


class LoRA(nn.ModuleDict):
    """The adapters being trained, {kohya name: Adapter}; its state_dict is the file's (kohya) keys.

    attach() makes each adapted layer add its adapter's output to its own, through a forward hook, so the base
    model's modules and weights stay as they are (frozen, and saved as they are)."""

    def __init__(self, sd, rank: int, alpha: float, text_encoder: bool, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        layers = target_layers(sd, text_encoder)
        super().__init__({name: Adapter(layer, rank, alpha, generator) for name, layer in layers.items()})
        self.layers = layers

    def attach(self):
        """From now on each adapted layer computes W0 x + (alpha / r) * up(down(x))."""
        self.enabled = True
        for name, layer in self.layers.items():
            layer.register_forward_hook(lambda layer, inputs, output, adapter=self[name]:
                                        output + adapter(inputs[0]).to(output.dtype) if self.enabled else output)
        return self

    def off(self, module):
        """module as a function that runs it with the adapters off: the base model's own layers, W0 x alone."""
        def base(*inputs):
            self.enabled = False
            try:
                return module(*inputs)
            finally:
                self.enabled = True
        return base

    @contextlib.contextmanager
    def merged(self):
        """While inside, the adapted layers hold W0 + delta (for saving the merged model); W0 exactly after."""
        with torch.no_grad():
            base = {name: layer.weight.clone() for name, layer in self.layers.items()}
            for name, adapter in self.items():
                weight = self.layers[name].weight
                weight += delta(adapter.lora_down.weight, adapter.lora_up.weight, adapter.alpha).to(weight.dtype)
            try:
                yield
            finally:
                for name, layer in self.layers.items():
                    layer.weight.copy_(base[name])


def save_lora(lora: LoRA, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write the adapters as a kohya-format .safetensors file (fp16, alpha as a float32 scalar), atomically."""
    tensors = {k: v.detach().to("cpu", torch.float16 if k.endswith(".weight") else torch.float32).contiguous()
               for k, v in lora.state_dict().items()}
    write_atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})}))


def kohya_metadata(rank: int, alpha: float, base_model: str, **training) -> dict[str, str]:
    """A LoRA file's metadata under the names kohya's sd-scripts give it (A1111 and ComfyUI show them): the network,
    the base model, and ss_<name> for each training setting given (learning_rate=1e-4 -> ss_learning_rate)."""
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_base_model_version": "sd_v1", "ss_sd_model_name": base_model} | {
            f"ss_{name}": str(value) for name, value in training.items()}


def load_lora(sd, path: str | os.PathLike, scale: float = 1.0) -> None:
    """Merge a kohya-format LoRA file for SD v1 (ours, or another tool's) into sd's weights, in place:
    W0 += scale * (alpha / r) * up @ down. Sampling then costs what it costs without a LoRA. A file that is not
    one raises CheckpointError, one line naming the file and why (a LoRA for SD 2.x or SDXL, LyCORIS keys, a full
    model, a key that names no layer of ours)."""
    path = Path(path)
    if not math.isfinite(scale):
        raise ValueError(f"{path}: the scale {scale} is not a finite number")
    adapters = _read_adapters(path, read_tensors(path))
    layers = target_layers(sd, text_encoder=True)
    for name, (down, up, alpha) in adapters.items():
        if name not in layers:
            locon = down.ndim == 4 and down.shape[-1] > 1 or "_resnets_" in name or "_conv" in name
            raise CheckpointError(f"{path}: {name} adapts a convolution layer (LoCon), which is not supported"
                                  if locon else f"{path}: {name}.lora_down.weight names no SD v1 layer we adapt")
        weight = layers[name].weight
        shape = up.shape[:1] + down.shape[1:]
        if shape != weight.shape:
            raise CheckpointError(f"{path}: {name} is for a layer of shape {list(shape)}, SD v1's is "
                                  f"{list(weight.shape)}: a LoRA for another model (SD 2.x?)")
        if not (scale * delta(down, up, alpha)).to(weight.dtype).isfinite().all():
            raise CheckpointError(f"{path}: {name} at scale {scale:g} changes its layer by values that are not finite")
    with torch.no_grad():
        for name, (down, up, alpha) in adapters.items():
            weight = layers[name].weight
            weight += scale * delta(down.to(weight.device), up.to(weight.device), alpha).to(weight.dtype)


def _read_adapters(path: Path, state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """{kohya name: (down, up, alpha)} of a kohya LoRA file, after the checks that say what else it is."""
    keys = list(state)
    model = next((k for k in keys if k.startswith(("model.diffusion_model.", "first_stage_model.", "encoder."))), None)
    if model:
        raise CheckpointError(f"{path} is a model or VAE (keys like {model}), not a LoRA")
    for marks, what in ((("hada_", "lokr_", ".lokr"), "a LyCORIS LoHa/LoKr file"), (("dora_scale",), "a DoRA file"),
                        (("lora_te1_", "lora_te2_", "lora_unet_input_blocks", "lora_unet_output_blocks",
                          "lora_unet_middle_block"), "a LoRA for SDXL")):
        hit = next((k for k in keys if any(m in k for m in marks)), None)
        if hit:
            raise CheckpointError(f"{path} is {what} (keys like {hit}); only LoRAs for SD v1 (lora_down/lora_up) apply")
    adapters = {}
    for key in keys:
        name, _, kind = key.partition(".")
        if not name.startswith(("lora_unet_", "lora_te_")) or kind not in ("lora_down.weight", "lora_up.weight",
                                                                             "alpha"):
            raise CheckpointError(f"{path}: unexpected key {key}; a LoRA in kohya's format (the one A1111 and ComfyUI "
                                  "read) has lora_unet_*/lora_te_* keys ending in .lora_down.weight, .lora_up.weight, "
                                  ".alpha")
        adapters.setdefault(name, {})[kind] = state[key]
    if not adapters:
        raise CheckpointError(f"{path} holds no LoRA weights")
    out = {}
    for name, parts in adapters.items():
        missing = next((kind for kind in ("lora_down.weight", "lora_up.weight") if kind not in parts), None)
        if missing:
            raise CheckpointError(f"{path}: {name} has no {missing}")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        if down.ndim not in (2, 4) or up.ndim != down.ndim or not 0 < down.shape[0] == up.shape[1]:
            raise CheckpointError(f"{path}: {name} has lora_down {list(down.shape)} and lora_up {list(up.shape)}, "
                                  "not [rank, in] and [out, rank] with a rank above 0")
        alpha = parts.get("alpha", torch.tensor(down.shape[0]))  # no alpha: alpha = r
        if alpha.numel() != 1 or not alpha.isfinite().all():
            what = f"{alpha.numel()} values" if alpha.numel() != 1 else alpha.item()
            raise CheckpointError(f"{path}: {name}.alpha is {what}, not one finite number")
        out[name] = (down, up, alpha.item())
    return out
