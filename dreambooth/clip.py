"""CLIP ViT-L/14 text transformer: token ids [B, 77] -> context [B, 77, 768] for the UNet.

The text half of CLIP (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision", sec. 2.4): a GPT-2 style pre-norm transformer with a causal
mask, quick-GELU and a final layer norm. Stable Diffusion v1 conditions on the final layer
norm's output at all 77 positions (not on CLIP's pooled embedding).

Module names are the checkpoint's under 'cond_stage_model.transformer.text_model.', so
loading is "strip the prefix, strict load_state_dict".
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Checkpoint keys with no parameter here: the int64 buffer arange(77) that some checkpoints
# store; positions are always 0..L-1, so checkpoint.py drops it before loading.
IGNORED_KEYS = ("embeddings.position_ids",)


@dataclass
class CLIPConfig:
    vocab_size: int = 49408  # byte-level BPE vocabulary (see tokenizer.py)
    max_length: int = 77     # context length: positions with a learned embedding
    width: int = 768         # hidden size of the residual stream
    layers: int = 12         # transformer blocks
    heads: int = 12          # attention heads, width // heads = 64 channels each
    mlp_width: int = 3072    # hidden size of each block's MLP (4 x width)

    @classmethod
    def tiny(cls) -> "CLIPConfig":
        """A few-kilobyte model for tests: same vocabulary and length, same code path."""
        return cls(width=32, layers=2, heads=2, mlp_width=64)


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]  # (B, L, width)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention: each token sees itself and the tokens before it."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = (p(x).view(B, L, self.heads, C // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, heads, L, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # softmax(q k^T / sqrt(head_dim)) v
        return self.out_proj(y.transpose(1, 2).reshape(B, L, C))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x)  # quick-GELU: CLIP's sigmoid approximation of GELU
        return self.fc2(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Sequential):  # a Sequential of one layer: the checkpoint nests the blocks as `layers`
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layers = nn.Sequential(*(CLIPEncoderLayer(cfg) for _ in range(cfg.layers)))


class CLIPTextModel(nn.Module):
    """ids LongTensor [B, L<=77] -> last hidden state after the final layer norm [B, L, width]."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.shape[1] > self.config.max_length:
            raise ValueError(f"CLIPTextModel expects token ids [B, <={self.config.max_length}], got {tuple(ids.shape)}")
        return self.final_layer_norm(self.encoder(self.embeddings(ids)))
