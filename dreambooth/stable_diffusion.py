"""The whole Stable Diffusion v1 model as one object: what `dreambooth.load` returns.

Stable Diffusion is three networks and a noise schedule:
  text_encoder  CLIP ViT-L/14 text transformer: token ids -> context [B, 77, 768]
  unet          predicts the noise in a latent, given the timestep and the context
  vae           KL autoencoder: image [B, 3, H, W] <-> latent [B, 4, H/8, W/8]
  alphas_cumprod  the DDPM schedule, alpha-bar_t for t = 0..999
"""
from dataclasses import dataclass, field

import torch

from .clip import CLIPTextModel
from .tokenizer import Tokenizer
from .unet import UNetModel
from .vae import LATENT_SCALE, AutoencoderKL


@dataclass
class StableDiffusion:
    tokenizer: Tokenizer
    text_encoder: CLIPTextModel
    unet: UNetModel
    vae: AutoencoderKL
    alphas_cumprod: torch.Tensor  # [1000] float32
    name: str = "tiny"            # file name (or "tiny"), written into image metadata
    resolution: int = 512         # native image size: 512 for SD v1, small for the tiny model
    latent_scale: float = LATENT_SCALE  # the UNet sees VAE latents times this (vae.py); the toy model has its own
    # How the model is sampled where a program is not told: {"scale": guidance, "ddim_steps": n} as the file's metadata
    # names them (the toy's: 3.0 and 25); {} for SD v1, whose programs keep their own (sample.py: 7.5 and 50).
    sampling: dict = field(default_factory=dict)

    def to(self, device=None, dtype=None):
        for m in (self.text_encoder, self.unet, self.vae):
            m.to(device=device, dtype=dtype)
        self.alphas_cumprod = self.alphas_cumprod.to(device=device)
        return self

    @property
    def device(self) -> torch.device:
        return device_of(self.unet)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> CLIP context [B, 77, width] on the model's device."""
        return self.text_encoder(self.tokenizer(prompts).to(self.device))


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a module's weights are."""
    return next(module.parameters()).device
