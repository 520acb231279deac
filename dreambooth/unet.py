"""The Stable Diffusion v1 noise-prediction UNet (CompVis `openaimodel.UNetModel`).

Given a noisy latent x_t, its timestep t and the CLIP text context, the UNet predicts the
noise eps that was added (the epsilon-parameterisation of DDPM, Ho et al. 2020). It is a
U-shaped stack of residual blocks: an encoder path (`input_blocks`) that halves the
resolution three times, a `middle_block`, and a decoder path (`output_blocks`) that
upsamples back, each decoder block concatenating the activation saved by its mirror in the
encoder. The timestep enters every residual block as a learned bias; the text enters
through cross-attention in the `SpatialTransformer` blocks at the first three levels.

Module names and nesting are those of the checkpoint under `model.diffusion_model.`, so
loading is "strip the prefix, strict load_state_dict". Where the checkpoint uses
positional keys, the module is a real nn.Sequential laid out the same way.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class UNetConfig:
    in_channels: int = 4                    # latent channels of the KL-f8 autoencoder
    out_channels: int = 4                   # predicted noise has the latent's shape
    model_channels: int = 320               # channels at the first level
    channel_mult: tuple = (1, 2, 4, 4)      # per level: 320, 640, 1280, 1280
    num_res_blocks: int = 2                 # residual blocks per level (+1 in the decoder)
    attention_levels: tuple = (0, 1, 2)     # levels with a SpatialTransformer after each ResBlock
    num_heads: int = 8                      # attention heads; head size = channels // num_heads
    context_dim: int = 768                  # CLIP ViT-L/14 text width
    transformer_depth: int = 1              # BasicTransformerBlocks per SpatialTransformer

    @classmethod
    def tiny(cls) -> "UNetConfig":
        """Few channels and one ResBlock per level where SD has two (two, not three, on the way up): for tests and
        the toy model, whose file must stay under 10 MB (docs/toy-world.md)."""
        return cls(model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, num_heads=4, context_dim=32)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [B] -> [B, dim].

    As in "Attention Is All You Need" sec. 3.5, with frequencies max_period^(-i/half) for
    i = 0..half-1, and the cosine half first (diffusers calls this flip_sin_to_cos=True).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=eps)


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between, plus a skip connection."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        # indices are the checkpoint's: in_layers.0 / .2, emb_layers.1, out_layers.0 / .3
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(group_norm(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of x over context (self-attention when context is None)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))  # to_out.0 is the checkpoint's

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, N, C = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (y.view(B, -1, self.heads, C // self.heads).transpose(1, 2) for y in (q, k, v))  # (B, heads, L, d)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020, "GLU Variants Improve Transformer"): a * gelu(b)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Sequential):  # a Sequential of one layer: the checkpoint nests it as `net`
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # indices are the checkpoint's: net.0.proj (GEGLU), net.2
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the text, feed-forward."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the h*w pixels of a feature map, conditioned on the text context."""

    def __init__(self, channels: int, context_dim: int, heads: int, depth: int):
        super().__init__()
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)  # SD v1: 1x1 convs, not Linear (SD 2.x)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(channels, context_dim, heads)
                                                for _ in range(depth))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Sequential):  # a Sequential of one layer: the checkpoint nests the conv as `op`
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        # Nearest x2, or to `size`: the size of the skip activation it meets next, which differs
        # from x2 when a latent side is not a multiple of 8 (an image side not a multiple of 64).
        return self.conv(F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the timestep embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                upsample_size: torch.Size | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """The SD v1 UNet: `time_embed`, then `input_blocks`, `middle_block`, `output_blocks` and `out`.

    The blocks of sd-v1-4 at 512 x 512 px (64 x 64 latents), as UNetModel(UNetConfig()) builds them.
    `attn` is a SpatialTransformer: its cross-attention (Q from the feature map's pixels, K and V from the
    CLIP context) is how the text conditions the image (Rombach et al. 2022, "High-Resolution Image
    Synthesis with Latent Diffusion Models", sec. 3.3). output_blocks.i first concatenates the activation
    saved after input_blocks.(11 - i), hence its wider input.

        block                  latent side  channels in -> out  layers
        input_blocks.0         64           4 -> 320            conv
        input_blocks.1, .2     64           320 -> 320          ResBlock + attn
        input_blocks.3         64 -> 32     320                 Downsample
        input_blocks.4         32           320 -> 640          ResBlock + attn
        input_blocks.5         32           640 -> 640          ResBlock + attn
        input_blocks.6         32 -> 16     640                 Downsample
        input_blocks.7         16           640 -> 1280         ResBlock + attn
        input_blocks.8         16           1280 -> 1280        ResBlock + attn
        input_blocks.9         16 -> 8      1280                Downsample
        input_blocks.10, .11   8            1280 -> 1280        ResBlock
        middle_block           8            1280 -> 1280        ResBlock + attn + ResBlock
        output_blocks.0, .1    8            2560 -> 1280        ResBlock
        output_blocks.2        8 -> 16      2560 -> 1280        ResBlock + Upsample
        output_blocks.3, .4    16           2560 -> 1280        ResBlock + attn
        output_blocks.5        16 -> 32     1920 -> 1280        ResBlock + attn + Upsample
        output_blocks.6        32           1920 -> 640         ResBlock + attn
        output_blocks.7        32           1280 -> 640         ResBlock + attn
        output_blocks.8        32 -> 64     960 -> 640          ResBlock + attn + Upsample
        output_blocks.9        64           960 -> 320          ResBlock + attn
        output_blocks.10, .11  64           640 -> 320          ResBlock + attn

    Every attn has 8 heads (head size 40, 80, 160); `out` maps 320 channels to the 4 of the noise.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        self.grad_checkpointing = False
        ch = cfg.model_channels
        emb_ch = 4 * ch

        def res_and_attn(in_ch: int, out_ch: int, level: int) -> list[nn.Module]:
            layers = [ResBlock(in_ch, emb_ch, out_ch)]
            if level in cfg.attention_levels:
                layers.append(SpatialTransformer(out_ch, cfg.context_dim, cfg.num_heads, cfg.transformer_depth))
            return layers

        # indices are the checkpoint's: time_embed.0 / .2
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        # Encoder: a conv, then per level num_res_blocks (ResBlock [+ SpatialTransformer]) and a Downsample
        # (except at the last level). skip_chs records the channels of every activation saved for the decoder.
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_chs = [ch]
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(TimestepEmbedSequential(*res_and_attn(ch, mult * cfg.model_channels, level)))
                ch = mult * cfg.model_channels
                skip_chs.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chs.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_ch, ch),
            SpatialTransformer(ch, cfg.context_dim, cfg.num_heads, cfg.transformer_depth),
            ResBlock(ch, emb_ch, ch),
        )

        # Decoder: per level (deepest first) num_res_blocks + 1 blocks, each eating one saved activation;
        # the last block of every level but the top one ends in an Upsample.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = res_and_attn(ch + skip_chs.pop(), mult * cfg.model_channels, level)
                ch = mult * cfg.model_channels
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        # indices are the checkpoint's: out.0 (GroupNorm) / out.2 (conv)
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def set_grad_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enabled

    def _run(self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
             upsample_size: torch.Size | None = None) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            # preserve_rng_state=False: nothing here is random, and saving CUDA's RNG state cannot be captured in a
            # CUDA graph (torch < 2.10)
            return checkpoint(block, h, emb, context, upsample_size, use_reentrant=False, preserve_rng_state=False)
        return block(h, emb, context, upsample_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Noisy latent x [B, 4, h, w], timesteps t [B] (or a scalar), context [B, 77, C] -> eps [B, 4, h, w]."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(block, h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)
