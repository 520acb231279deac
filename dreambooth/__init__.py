"""DreamBooth fine-tuning of Stable Diffusion v1 in plain PyTorch.

    import dreambooth
    sd = dreambooth.load("weights/sd-v1-4.ckpt")   # or "tiny": a built-in random toy model
    dreambooth.save(sd, "model.safetensors")       # original CompVis layout, fp16
    sd.vae = dreambooth.load_vae("weights/vae-ft-mse-840000-ema-pruned.safetensors")  # another VAE
    dreambooth.load_lora(sd, "runs/dog/lora.safetensors", scale=0.8)  # merge a LoRA (kohya format) into sd
"""
from .tokenizer import Tokenizer
from .stable_diffusion import StableDiffusion
from .checkpoint import CheckpointError, load, load_vae, save
from .lora import LoRA, load_lora, save_lora

__all__ = ["Tokenizer", "StableDiffusion", "CheckpointError", "load", "load_vae", "save", "LoRA", "load_lora",
           "save_lora"]
