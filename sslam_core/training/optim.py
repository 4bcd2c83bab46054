"""Optimiser pieces shared by pre-training and fine-tuning: parameter groups, AdamW, cosine schedule.

Weight decay skips biases, every 1-D parameter (norm weights) and the CLS / position tables, as in
data2vec 2.0. Fine-tuning adds layer-wise learning-rate decay: the head learns at the full rate, each
block below it at `layer_decay` times the rate of the block above, the embeddings slowest.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import nn

NO_DECAY_NAMES = ("cls_token", "pos_embed")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBEDDING = re.compile(r"(?:^|\.)(?:patch_embed|cls_token|pos_embed|pre_norm)(?:\.|$)")


def model_depth(model: nn.Module) -> int:
    """Number of transformer blocks, read from the parameter names (`blocks.{i}.`)."""
    ids = [int(m.group(1)) for name, _ in model.named_parameters() if (m := _BLOCK.search(name))]
    return max(ids) + 1 if ids else 0


def layer_id(name: str, depth: int) -> int:
    """Layer index for lr decay: 0 = patch/CLS/position/pre-norm, i + 1 = block i, depth + 1 = the rest."""
    if m := _BLOCK.search(name):
        return int(m.group(1)) + 1
    if _EMBEDDING.search(name):
        return 0
    return depth + 1


def uses_weight_decay(name: str, param: torch.Tensor, no_decay_names: Iterable[str] = NO_DECAY_NAMES) -> bool:
    """False for biases, 1-D parameters and the named token/position tables."""
    last = name.rsplit(".", 1)[-1]
    return param.ndim > 1 and not name.endswith(".bias") and last not in set(no_decay_names)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
    depth: int | None = None,
    no_decay_names: Iterable[str] = NO_DECAY_NAMES,
) -> list[dict]:
    """Trainable parameters split by (decay or not, layer); each group carries `lr_scale` for the schedule."""
    no_decay_names = tuple(no_decay_names)
    depth = model_depth(model) if depth is None else depth
    groups: dict[tuple[bool, int], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = uses_weight_decay(name, param, no_decay_names)
        layer = layer_id(name, depth) if layer_decay is not None else 0
        scale = layer_decay ** (depth + 1 - layer) if layer_decay is not None else 1.0
        group = groups.setdefault(
            (decay, layer),
            {
                "params": [],
                "param_names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float | None = None,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """Adam (0.9, 0.95) with decoupled weight decay over `param_groups(model, ...)`."""
    groups = param_groups(model, weight_decay, layer_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def cosine_schedule(step: int, warmup: int, total: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Learning rate of update `step` (0-based): linear warm-up to peak_lr, then cosine down to min_lr.

    Warm-up reaches peak_lr at update warmup - 1 (never a wasted zero-lr update); the cosine runs over
    the remaining total - warmup updates and stays at min_lr after `total`.
    """
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every group `lr` times its own `lr_scale` (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


__all__ = [
    "NO_DECAY_NAMES",
    "model_depth",
    "layer_id",
    "uses_weight_decay",
    "param_groups",
    "build_optimizer",
    "cosine_schedule",
    "set_lr",
]
