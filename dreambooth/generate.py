"""Text to image: the one generation function behind sample.py, make_prior.py and train.py's preview grids.

    prompts --CLIP--> context --DDIM + guided UNet--> latents --VAE decoder--> images

Reproducibility: image k is made from its own CPU generator, torch.Generator().manual_seed(seeds[k]), which draws
first its initial latent noise [4, H/8, W/8] and then (when eta > 0) its noise for each DDIM step. So image k
depends only on its prompt, its seed and the settings, not on the other images in the batch or on the device's
RNG: one image of a batch can be regenerated alone. (On the same machine and batch layout the result is
bit-for-bit the same; a different batch size can change the last bits of the floating-point arithmetic.)
"""
import contextlib
import math

import torch
from PIL import Image

from .ddim import ddim_sample, guided_eps_fn
from .images import to_pil
from .speed import CUDAGraphReplay
from .stable_diffusion import StableDiffusion

# One stream per GPU for the graphs of all generate() calls: each call's graph is gone when it returns, so they never
# live at once, and none of them takes the stream of another live graph (train.py's step) as new streams would once
# torch's pool of streams came round again.
_streams = {}


@torch.no_grad()
def generate(sd: StableDiffusion, prompts: list[str], seeds: list[int], negative_prompt: str = "", steps: int = 50,
             scale: float = 7.5, eta: float = 0.0, height: int | None = None, width: int | None = None,
             slice_size: int = 1, progress: bool = True, precision: str = "fp32",
             cuda_graph: bool = True) -> list[Image.Image]:
    """Generate one PIL image per prompt, image k from seeds[k].

    negative_prompt is the "unconditional" prompt of classifier-free guidance ("" as in the CompVis code).
    height/width default to the model's native resolution and must be multiples of 8 (the VAE's factor).
    slice_size is how many images the VAE decodes at a time (1 keeps the decoder's memory small).
    precision "fp16" or "bf16" runs the networks in that dtype under torch.autocast on CUDA (fp32 weights, as the
    CompVis scripts' "autocast" does); "fp32" and any CPU run stay in the models' own dtype. A caller's own autocast
    context is kept.
    On CUDA the UNet's weights are put in channels_last (the layout of cuDNN's convolutions; the values are the
    same) and, with cuda_graph, its guided call is replayed from a CUDA graph (speed.CUDAGraphReplay).
    Sampled latents that are not finite raise ValueError: they would decode to black images.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
    if not (math.isfinite(scale) and math.isfinite(eta)):
        raise ValueError(f"generate: the guidance scale {scale} and eta {eta} must be finite numbers")
    height, width = height or sd.resolution, width or sd.resolution
    if height % 8 or width % 8 or height <= 0 or width <= 0:
        raise ValueError(f"image size {width}x{height}: height and width must be positive multiples of 8")
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    shape = (sd.unet.config.in_channels, height // 8, width // 8)
    latents = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(sd.device)

    cuda = sd.device.type == "cuda"
    if cuda:
        sd.unet.to(memory_format=torch.channels_last)
    # No autocast cache of the fp16 weights: a CUDA graph cannot keep it (PyTorch's CUDA-graph notes).
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision) if cuda else None
    with torch.autocast("cuda", dtype=dtype, cache_enabled=False) if dtype else contextlib.nullcontext():
        eps_fn = guided_eps_fn(sd.unet, sd.encode_text(prompts), sd.encode_text([negative_prompt]), scale)
        if cuda and cuda_graph:  # the same shapes at every step: record the guided UNet call once, then replay it
            stream = _streams.get(sd.device) or _streams.setdefault(sd.device, torch.cuda.Stream(sd.device))
            graph = CUDAGraphReplay(eps_fn, stream=stream)  # after a recording that failed in this process: eager
            eps_fn = lambda x, t: graph(x, torch.full((), t, device=x.device))  # noqa: E731 (t: a recorded input)
        latents = ddim_sample(eps_fn, latents, sd.alphas_cumprod, steps, eta, generators, progress)
        if not latents.isfinite().all():  # it would decode to black images
            raise ValueError("the sampled latents are not finite (nan or inf): the model overflows with these weights "
                             "and settings (a LoRA's scale, the guidance scale, fp16)")
        vae_dtype = next(sd.vae.parameters()).dtype
        images = sd.vae.decode((latents / sd.latent_scale).to(vae_dtype), slice_size)  # the VAE works unscaled
    return [to_pil(img) for img in images]
