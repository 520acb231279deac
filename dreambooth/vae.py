"""The KL-f8 autoencoder of Stable Diffusion v1 (CompVis `ldm.models.autoencoder.AutoencoderKL`).

The UNet never sees pixels. The encoder turns an image [B, 3, H, W] in [-1, 1] into a diagonal
Gaussian over latents [B, 4, H/8, W/8] (mean and log-variance); the decoder turns a latent back
into an image. Module names and nesting are those of the sd-v1-4 checkpoint under
'first_stage_model.' (`encoder.down.0.block.1.conv2`, `decoder.up.3.upsample.conv`,
`encoder.mid.attn_1.q`), so loading is "strip the prefix, strict load_state_dict".

Latents here are unscaled. The UNet was trained on latents multiplied by LATENT_SCALE; callers
apply it (x LATENT_SCALE after encode, / LATENT_SCALE before decode).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# Rescales the latents to roughly unit variance for the diffusion model: 1 / std of the latents
# of the first training batch (Rombach et al. 2022, sec. 4.3.2 and appendix G; the `scale_factor`
# in the SD v1 config).
LATENT_SCALE = 0.18215


@dataclass
class VAEConfig:
    ch: int = 128                      # channels at full resolution
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # channel multiplier per level; 4 levels -> 3 downsamplings = f8
    num_res_blocks: int = 2            # ResnetBlocks per encoder level (the decoder has one more)
    z_channels: int = 4                # latent channels
    embed_dim: int = 4                 # channels after quant_conv (equal to z_channels in SD v1)
    in_channels: int = 3
    out_channels: int = 3

    @classmethod
    def tiny(cls) -> "VAEConfig":
        # same topology, few channels (GroupNorm(32) needs channels % 32 == 0)
        return cls(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = Normalize(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = Normalize(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q, k, v and proj_out are 1x1 convs as stored."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = Normalize(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(2, 3) for conv in (self.q, self.k, self.v))
        # (B, 1, HW, C): softmax(q k^T / sqrt(C)) v
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CompVis pads right and bottom by one, not symmetrically: padding=1 gives the same
        # shape but a latent shifted by half a pixel.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(ch: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(ch, ch)
    mid.attn_1 = AttnBlock(ch)
    mid.block_2 = ResnetBlock(ch, ch)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """Image -> 2 * z_channels moments, halving the resolution after every level but the last."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            down = nn.Module()  # holds `block` and `downsample`, as in the checkpoint
            down.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                down.block.append(ResnetBlock(block_in, cfg.ch * mult))
                block_in = cfg.ch * mult
            if level != len(cfg.ch_mult) - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = _mid(block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in self.down:
            for block in down.block:
                h = block(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image. `up` is stored lowest-resolution-last: up[0] is full resolution and
    runs last, so the forward pass walks `up` in reverse."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in)
        ups = []
        for level in reversed(range(len(cfg.ch_mult))):
            up = nn.Module()  # holds `block` and `upsample`, as in the checkpoint
            up.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, cfg.ch * cfg.ch_mult[level]))
                block_in = cfg.ch * cfg.ch_mult[level]
            if level != 0:
                up.upsample = Upsample(block_in)
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for up in reversed(self.up):
            for block in up.block:
                h = block(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        cfg = cfg or VAEConfig()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """img [B, 3, H, W] in [-1, 1] -> (mean, logvar), each [B, embed_dim, H/8, W/8].

        A sample is mean + exp(logvar / 2) * noise. logvar is clamped to [-30, 20] as in
        CompVis' DiagonalGaussianDistribution."""
        moments = self.quant_conv(self.encoder(img))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, slice_size: int = 1) -> torch.Tensor:
        """z [B, embed_dim, h, w] (unscaled) -> img [B, 3, 8h, 8w], roughly in [-1, 1].

        Decodes `slice_size` images at a time: the decoder's full-resolution activations
        (128 channels at 512 x 512, ~128 MiB per image in fp32, several alive at once) then
        exist for one slice only, so a batch of 8 at 512 px fits where the whole batch would not.
        Each image is decoded independently, so the result does not depend on slice_size."""
        if slice_size < 1:
            raise ValueError(f"AutoencoderKL.decode: slice_size must be >= 1, got {slice_size}")
        return torch.cat([self.decoder(self.post_quant_conv(part)) for part in z.split(slice_size)])
