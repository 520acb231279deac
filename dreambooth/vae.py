"""The KL-f8 autoencoder of Stable Diffusion v1 (CompVis `ldm.models.autoencoder.AutoencoderKL`).

The UNet never sees pixels. The encoder turns an image [B, 3, H, W] in [-1, 1] into a diagonal
Gaussian over latents [B, 4, H/8, W/8] (mean and log-variance); the decoder turns a latent back
into an image. Module names and nesting are those of the sd-v1-4 checkpoint under
'first_stage_model.' (`encoder.down.0.block.1.conv2`, `decoder.up.3.upsample.conv`,
`encoder.mid.attn_1.q`), so loading is "strip the prefix, strict load_state_dict".

Latents here are unscaled. The UNet was trained on latents multiplied by a latent scale, the model's
(StableDiffusion.latent_scale: SD v1's LATENT_SCALE, or the toy model's own); callers apply it
(x scale after encode, / scale before decode).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# Rescales the latents to roughly unit variance for the diffusion model: 1 / std of the latents
# of the first training batch (Rombach et al. 2022, sec. 4.3.2 and appendix G; the `scale_factor`
# in the SD v1 config). A file of ours may carry another in its metadata (checkpoint.py).
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
    norm_groups: int = 32              # of every GroupNorm (diffusers' norm_num_groups); a file's metadata may say
                                       # otherwise (checkpoint.py): the toy model's VAE has 8 (make_toy.py says why)

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """Same topology, few channels (GroupNorm(32) needs channels % 32 == 0): for tests and the toy model."""
        return cls(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)  # eps 1e-6 throughout the VAE (unet.py's ResBlocks: 1e-5)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q, k, v and proj_out are 1x1 convs as stored."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = group_norm(ch, groups)
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


# Mid, Down and Up are nn.Sequentials with named layers: they run their layers in the order assigned, under the
# checkpoint's names.
class Mid(nn.Sequential):
    """The lowest resolution of encoder and decoder alike: ResnetBlock, self-attention, ResnetBlock."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)


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


class Down(nn.Sequential):
    """One encoder level `down.i`: ResnetBlocks `block.0`, `block.1`, ..., then a Downsample (none at the last)."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, groups: int, downsample: bool):
        super().__init__()
        self.block = nn.Sequential(*(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups)
                                     for i in range(num_blocks)))
        self.downsample = Downsample(out_ch) if downsample else nn.Identity()


class Up(nn.Sequential):
    """One decoder level `up.i`: ResnetBlocks `block.0`, `block.1`, ..., then an Upsample (none at full resolution)."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, groups: int, upsample: bool):
        super().__init__()
        self.block = nn.Sequential(*(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups)
                                     for i in range(num_blocks)))
        self.upsample = Upsample(out_ch) if upsample else nn.Identity()


class Encoder(nn.Module):
    """Image -> 2 * z_channels moments, halving the resolution after every level but the last."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs = [cfg.ch * mult for mult in cfg.ch_mult]  # channels per level
        in_chs = [cfg.ch] + chs[:-1]  # level i takes level i - 1's channels; the first takes conv_in's
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.Sequential(*(Down(in_chs[i], chs[i], cfg.num_res_blocks, cfg.norm_groups,
                                         downsample=i != len(chs) - 1) for i in range(len(chs))))
        self.mid = Mid(chs[-1], cfg.norm_groups)
        self.norm_out = group_norm(chs[-1], cfg.norm_groups)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image. `up` is stored lowest-resolution-last: up[0] is full resolution and
    runs last, so it is built, and the forward pass walks it, in reverse."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs = [cfg.ch * mult for mult in cfg.ch_mult]  # channels per level
        in_chs = chs[1:] + chs[-1:]  # level i takes level i + 1's channels; the deepest takes the mid's
        self.conv_in = nn.Conv2d(cfg.z_channels, chs[-1], 3, padding=1)
        self.mid = Mid(chs[-1], cfg.norm_groups)
        ups = [Up(in_chs[i], chs[i], cfg.num_res_blocks + 1, cfg.norm_groups, upsample=i != 0)
               for i in reversed(range(len(chs)))]
        self.up = nn.ModuleList(reversed(ups))
        self.norm_out = group_norm(chs[0], cfg.norm_groups)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for up in reversed(self.up):
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """img [B, 3, H, W] in [-1, 1] -> (mean, logvar), each [B, embed_dim, H/8, W/8].

        A sample is sample_latent(mean, logvar). logvar is clamped to [-30, 20] as in
        CompVis' DiagonalGaussianDistribution."""
        mean, logvar = self.quant_conv(self.encoder(img)).chunk(2, dim=1)
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


def sample_latent(mean: torch.Tensor, logvar: torch.Tensor, generator=None) -> torch.Tensor:
    """A latent z ~ q(z|x) = N(mean, exp(logvar)) from encode's posterior: mean + exp(logvar / 2) * noise (the
    reparameterisation trick), the noise drawn from `generator` (None: torch's global one) on mean's device."""
    return mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator, device=mean.device)
