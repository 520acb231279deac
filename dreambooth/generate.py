"""Text to image: the one generation function behind sample.py, make_prior.py and train.py's preview grids.

    prompts --CLIP--> context --DDIM + guided UNet--> latents --VAE decoder--> images

Reproducibility: image k is made from its own CPU generator, torch.Generator().manual_seed(seeds[k]), which draws
first its initial latent noise [4, H/8, W/8] and then (when eta > 0) its noise for each DDIM step. So image k
depends only on its prompt, its seed and the settings, not on the other images in the batch or on the device's
RNG: one image of a batch can be regenerated alone. (On the same machine and batch layout the result is
bit-for-bit the same; a different batch size can change the last bits of the floating-point arithmetic.)
"""
import argparse
import contextlib
from pathlib import Path

import torch
from PIL import Image

from .ddim import ddim_sample, guided_eps_fn
from .images import to_pil
from .stable_diffusion import StableDiffusion
from .vae import LATENT_SCALE


@torch.no_grad()
def generate(sd: StableDiffusion, prompts: list[str], seeds: list[int], negative_prompt: str = "", steps: int = 50,
             scale: float = 7.5, eta: float = 0.0, height: int | None = None, width: int | None = None,
             slice_size: int = 1, progress: bool = True, precision: str = "full",
             cuda_graph: bool = True) -> list[Image.Image]:
    """Generate one PIL image per prompt, image k from seeds[k].

    negative_prompt is the "unconditional" prompt of classifier-free guidance ("" as in the CompVis code).
    height/width default to the model's native resolution and must be multiples of 8 (the VAE's factor).
    slice_size is how many images the VAE decodes at a time (1 keeps the decoder's memory small).
    precision "autocast" runs the networks in float16 under torch.autocast on CUDA (fp32 weights, as the CompVis
    scripts do); "full" and any CPU run stay in the models' own dtype. A caller's own autocast context is kept.
    On CUDA the UNet's weights are put in channels_last (the layout of cuDNN's convolutions; the values are the
    same) and, with cuda_graph, its guided call is replayed from a CUDA graph (see ReplayedEps).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
    height, width = height or sd.resolution, width or sd.resolution
    if height % 8 or width % 8 or height <= 0 or width <= 0:
        raise ValueError(f"--H/--W: image size {width}x{height} must be positive multiples of 8")
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    channels = sd.unet.config.in_channels
    latents = torch.stack([torch.randn(channels, height // 8, width // 8, generator=g) for g in generators])
    latents = latents.to(sd.device)

    cuda = sd.device.type == "cuda"
    if cuda:
        sd.unet.to(memory_format=torch.channels_last)
    # No autocast cache of the fp16 weights: a CUDA graph cannot keep it (PyTorch's CUDA-graph notes).
    use_autocast = precision == "autocast" and cuda
    with torch.autocast("cuda", dtype=torch.float16, cache_enabled=False) if use_autocast else contextlib.nullcontext():
        cond = sd.encode_text(prompts)
        uncond = sd.encode_text([negative_prompt])
        eps_fn = guided_eps_fn(sd.unet, cond, uncond, scale)
        if cuda and cuda_graph:
            eps_fn = ReplayedEps(eps_fn)
        latents = ddim_sample(eps_fn, latents, sd.alphas_cumprod, steps, eta, generators, progress)
        vae_dtype = next(sd.vae.parameters()).dtype
        images = sd.vae.decode((latents / LATENT_SCALE).to(vae_dtype), slice_size)  # the VAE works unscaled
    return [to_pil(img) for img in images]


class ReplayedEps:
    """A DDIM eps_fn(x, t) recorded once as a CUDA graph and replayed at every later step.

    The sampler calls the guided UNet with the same shapes at each of its steps, and each call launches over a
    thousand small kernels that take longer to launch than to run. A CUDA graph records the kernels once, with
    their memory addresses, and replay() launches them all at once (train.py's CUDAGraphStep says more). So x
    and t are copied into the recorded input tensors before each replay. The first call runs eagerly on a side
    stream and gives the first step's prediction; cuDNN and cuBLAS set themselves up then, before the recording,
    as PyTorch's CUDA-graph notes advise."""

    def __init__(self, eps_fn):
        self.eps_fn, self.graph = eps_fn, None

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        if self.graph is None:
            self.x, self.t = x.clone(), torch.tensor(t, device=x.device)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                eps = self.eps_fn(self.x, self.t)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.eps = self.eps_fn(self.x, self.t)
            return eps
        self.x.copy_(x)
        self.t.fill_(t)
        self.graph.replay()
        return self.eps.clone()


def check_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The flags sample.py and make_prior.py share (--H, --W, --ddim_steps, --ckpt, --device): refuse bad values
    with one line naming the flag, and resolve --device auto."""
    for flag in ("H", "W"):
        size = getattr(args, flag)
        if size is not None and (size <= 0 or size % 8):
            p.error(f"--{flag} {size}: must be a positive multiple of 8 (the VAE works on 8x8 pixel blocks)")
    if not 1 <= args.ddim_steps <= 999:
        p.error(f"--ddim_steps {args.ddim_steps}: must be from 1 to 999 (the model was trained on 1000 timesteps)")
    if args.ckpt not in (None, "tiny") and not Path(args.ckpt).is_file():
        p.error(f"--ckpt {args.ckpt}: no such file")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
