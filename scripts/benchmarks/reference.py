"""The baseline encoder of the encoder and extract benchmarks: the official module structure with
explicit attention (q @ k^T * scale, softmax in fp32, @ v), under `Encoder`'s parameter names, so that
it loads the same state dict and the outputs can be compared."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class RefMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=eps), RefAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=eps), RefMlp(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class RefEncoder(nn.Module):
    """Same parameter names as `Encoder`, official module structure and explicit attention."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.embed_dim
        self.patch_embed = nn.Conv2d(1, D, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer("pos_embed", torch.zeros(1, cfg.max_length * cfg.freq_patches, D))
        self.pre_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        hidden = int(D * cfg.mlp_ratio)
        self.blocks = nn.ModuleList(
            RefBlock(D, cfg.num_heads, hidden, cfg.norm_eps) for _ in range(cfg.depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = x + self.pos_embed[:, : x.shape[1]]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x)
        return x
