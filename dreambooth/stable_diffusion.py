"""The whole Stable Diffusion v1 model as one object: what `dreambooth.load` returns.

Stable Diffusion is three networks and a noise schedule:
  text_encoder  CLIP ViT-L/14 text transformer: token ids -> context [B, 77, 768]
  unet          predicts the noise in a latent, given the timestep and the context
  vae           KL autoencoder: image [B, 3, H, W] <-> latent [B, 4, H/8, W/8]
  alphas_cumprod  the DDPM schedule, alpha-bar_t for t = 0..999
"""
from dataclasses import dataclass

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

    def to(self, device=None, dtype=None):
        for m in (self.text_encoder, self.unet, self.vae):
            m.to(device=device, dtype=dtype)
        self.alphas_cumprod = self.alphas_cumprod.to(device=device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> CLIP context [B, 77, width] on the model's device."""
        return self.text_encoder(self.tokenizer(prompts).to(self.device))
