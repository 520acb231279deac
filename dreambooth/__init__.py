"""DreamBooth fine-tuning of Stable Diffusion v1 in plain PyTorch.

    import dreambooth
    sd = dreambooth.load("weights/sd-v1-4.ckpt")   # or "tiny": a built-in random toy model
    dreambooth.save(sd, "model.safetensors")       # original CompVis layout, fp16
    sd.vae = dreambooth.load_vae("weights/vae-ft-mse-840000-ema-pruned.safetensors")  # another VAE
"""
from .tokenizer import Tokenizer
from .stable_diffusion import StableDiffusion
from .checkpoint import CheckpointError, load, load_vae, save

__all__ = ["Tokenizer", "StableDiffusion", "CheckpointError", "load", "load_vae", "save"]
