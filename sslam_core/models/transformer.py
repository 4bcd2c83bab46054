"""The SSLAM / EAT audio transformer: patch embedding, post-LN ViT blocks and the classifier head.

One encoder serves inference, pre-training (student and EMA teacher) and fine-tuning. Attention
goes through `scaled_dot_product_attention`; the layout and numerics follow the official model
(spec §2), so the official checkpoints load without any change of weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslam_core.errors import OptionError
from sslam_core.models.precision import fp32_tail_blocks

FREQ_PATCHES = 8  # 128 mel bins / 16
POOLING = ("cls", "mean")


@dataclass
class ModelConfig:
    """Sizes of the encoder and (optionally) of its classification head."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    mel_bins: int = 128
    max_length: int = 768  # rows of time patches in the position table (768 * 16 = 12,288 frames)
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    num_classes: int = 0  # 0 = pre-trained encoder without a head
    pool: str = "cls"  # classifier input: the CLS token, or the mean of the patch tokens ("mean")
    drop_path: float = 0.0

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def freq_patches(self) -> int:
        return self.mel_bins // self.patch_size


PRESETS: dict[str, dict] = {
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "tiny": dict(embed_dim=192, depth=4, num_heads=3),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named model size (`base` = the release ViT-B) with optional overrides."""
    if name not in PRESETS:
        raise OptionError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def sincos_positions(dim: int, time_rows: int, freq_cols: int = FREQ_PATCHES) -> Tensor:
    """The fixed 2-D sin-cos table (1, time_rows * freq_cols, dim): frequency half first, then time."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def encode(pos: Tensor) -> Tensor:
        out = pos.double()[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    t = torch.arange(time_rows).repeat_interleave(freq_cols)
    f = torch.arange(freq_cols).repeat(time_rows)
    return torch.cat([encode(f), encode(t)], dim=1).float()[None]


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop the residual branch per sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Post-LN transformer block. Returns the output and the MLP output before the residual add
    (the data2vec 2.0 regression target)."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, eps: float, qkv_bias: bool, drop_path: float
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.norm1(x + drop_path(self.attn(x), self.drop_path, self.training))
        y = self.mlp(x)
        return self.norm2(x + drop_path(y, self.drop_path, self.training)), y


class Encoder(nn.Module):
    """Spectrogram (B, 1, T, mel) -> tokens (B, 1 + N, D), CLS first, patches time-major."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = nn.Conv2d(1, D, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer(
            "pos_embed", sincos_positions(D, cfg.max_length, cfg.freq_patches), persistent=True
        )
        self.pre_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.qkv_bias, r) for r in rates
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random initialisation as in data2vec 2.0: truncated-normal linear weights, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @property
    def dim(self) -> int:
        return self.cfg.embed_dim

    def patchify(self, x: Tensor) -> Tensor:
        """(B, 1, T, mel) -> patch tokens with positions added, (B, N, D), N = T/16 * 8."""
        B, _, T, mel = x.shape
        if T % self.cfg.patch_size or mel != self.cfg.mel_bins:
            raise OptionError(
                f"input must be (B, 1, T, {self.cfg.mel_bins}) with T a multiple of "
                f"{self.cfg.patch_size}, got {tuple(x.shape)}"
            )
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        n = tokens.shape[1]
        if n > self.pos_embed.shape[1]:
            max_frames = self.pos_embed.shape[1] // self.cfg.freq_patches * self.cfg.patch_size
            raise OptionError(f"input of {T} frames is longer than the model's maximum of {max_frames}")
        return tokens + self.pos_embed[:, :n].to(tokens.dtype)

    def contextualize(
        self, tokens: Tensor, depth: int | None = None, collect: str | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Prepend CLS, normalise and run the first `depth` blocks (all by default); under a bf16 / fp16
        autocast the last `precision.fp32_tail_blocks()` of them run in fp32 (inference sets one).

        collect: None, "hidden" (output of every block run) or "ffn" (every block's MLP output).
        """
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        x = self.pre_norm(x)
        out: list[Tensor] = []
        run = self.blocks[: depth if depth is not None else len(self.blocks)]
        fp32_from = len(run) - fp32_tail_blocks() if torch.is_autocast_enabled(x.device.type) else len(run)
        for i, block in enumerate(run):
            if i >= fp32_from:  # the output blocks in fp32 under a bf16 / fp16 autocast (precision.fp32_tail)
                with torch.autocast(x.device.type, enabled=False):
                    x, y = block(x.float())
            else:
                x, y = block(x)
            if collect == "hidden":
                out.append(x)
            elif collect == "ffn":
                out.append(y)
        return x, out

    def resolve_layer(self, layer: int | None) -> int:
        """`layer` counted from 1 (negative from the end, None = last) -> number of blocks to run."""
        depth = len(self.blocks)
        if layer is None:
            return depth
        n = layer if layer > 0 else depth + 1 + layer
        if not 1 <= n <= depth or layer == 0:
            raise OptionError(
                f"layer {layer} out of range for a {depth}-block model (use 1..{depth} or -1..-{depth})"
            )
        return n

    def forward(self, x: Tensor, layer: int | None = None) -> Tensor:
        """Features (B, 1 + N, D) at the output of block `layer` (1-based; default the last)."""
        out, _ = self.contextualize(self.patchify(x), depth=self.resolve_layer(layer))
        return out

    def all_layers(self, x: Tensor) -> list[Tensor]:
        """Output of every block, [(B, 1 + N, D)] * depth."""
        return self.contextualize(self.patchify(x), collect="hidden")[1]


class Classifier(nn.Module):
    """Encoder + `head(fc_norm(CLS))` (or of the mean patch token with `pool="mean"`): the fine-tuned
    AudioSet/ESC-50 model. `forward` gives logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.num_classes <= 0:
            raise OptionError("a classifier needs num_classes > 0")
        if cfg.pool not in POOLING:
            raise OptionError(f"unknown pooling {cfg.pool!r}; choose {' or '.join(POOLING)}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def features(self, x: Tensor, layer: int | None = None) -> Tensor:
        """Encoder features (B, 1 + N, D), as `Encoder.forward`."""
        return self.encoder(x, layer)

    def pooled(self, features: Tensor) -> Tensor:
        """The head's input: the CLS row, or the mean of the patch rows (official "MEAN_POOLING")."""
        return features[:, 0] if self.cfg.pool == "cls" else features[:, 1:].mean(dim=1)

    def classify(self, features: Tensor) -> Tensor:
        """Logits from encoder features (B, 1 + N, D), or from already pooled vectors (B, D). Where the
        output blocks run in fp32 under autocast (`precision.fp32_tail`), so do fc_norm and the head:
        a linear probe's head (with the feature standardisation folded in) turns the bf16 rounding of
        its input into changed decisions."""
        pooled = features if features.ndim == 2 else self.pooled(features)
        if fp32_tail_blocks() and torch.is_autocast_enabled(pooled.device.type):
            with torch.autocast(pooled.device.type, enabled=False):
                return self.head(self.fc_norm(pooled.float()))
        return self.head(self.fc_norm(pooled))

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.encoder(x))


def build_model(cfg: ModelConfig) -> Encoder | Classifier:
    """An encoder for pre-trained configs, a classifier when `cfg.num_classes > 0`."""
    return Classifier(cfg) if cfg.num_classes > 0 else Encoder(cfg)


def count_flops(cfg: ModelConfig, frames: int = 1024) -> float:
    """Multiply-add FLOPs (x2) of one forward pass over a clip of `frames` frames."""
    D, n = cfg.embed_dim, frames // cfg.patch_size * cfg.freq_patches + 1
    hidden = int(D * cfg.mlp_ratio)
    per_block = 2 * n * D * (3 * D + D + 2 * hidden) + 2 * 2 * n * n * D
    patch = 2 * (n - 1) * D * cfg.patch_size**2
    return float(cfg.depth * per_block + patch)


__all__ = [
    "ModelConfig",
    "PRESETS",
    "preset",
    "sincos_positions",
    "Encoder",
    "Classifier",
    "build_model",
    "count_flops",
]
