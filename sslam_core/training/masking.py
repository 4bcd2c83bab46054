"""Inverse block masking on the patch grid (data2vec 2.0 / EAT): the student sees a few square islands.

Square blocks of `block` x `block` patches are the patches that stay VISIBLE; single random patches
are then added or removed so that every row keeps exactly `int(N * (1 - mask_prob))` patches, which
lets the student batch the visible tokens without padding (spec §4).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sslam_core.errors import OptionError


def block_mask(
    rows: int,
    grid: tuple[int, int],
    mask_prob: float = 0.8,
    block: int = 5,
    adjust: float = 0.07,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Independent masks (rows, H * W), True = masked, each with exactly N - int(N * (1 - mask_prob)) True.

    grid is (time patches, frequency patches); patch n = t * W + f, as the encoder orders tokens.
    """
    H, W = grid
    n = H * W
    keep_prob = 1 - mask_prob
    target = int(n * keep_prob)
    if not 0 < target <= n or block < 1:
        raise OptionError(f"mask_prob {mask_prob} and block {block} leave no visible patch on a {H}x{W} grid")
    centres = int(n * (keep_prob + adjust) / block**2)

    kept = torch.zeros(rows, H, W)
    if centres > 0:
        flat = torch.randint(0, n, (rows, centres), generator=generator)
        t, f = flat // W, flat % W
        offsets = torch.arange(block) - block // 2
        ti = (t[:, :, None, None] + offsets[:, None]).clamp(0, H - 1).expand(-1, -1, block, block)
        fi = (f[:, :, None, None] + offsets[None, :]).clamp(0, W - 1).expand(-1, -1, block, block)
        ri = torch.arange(rows)[:, None, None, None].expand_as(ti)
        kept[ri, ti, fi] = 1.0

    # Exactly `target` kept per row: blocks first (a random subset if they overshoot), then random fill.
    priority = kept.view(rows, n) + torch.rand(rows, n, generator=generator)
    chosen = priority.topk(target, dim=1).indices
    mask = torch.ones(rows, n, dtype=torch.bool)
    mask.scatter_(1, chosen, False)
    return mask


def visible_indices(mask: Tensor) -> Tensor:
    """Indices (rows, K) of the unmasked patches, ascending; every row must keep the same number K."""
    counts = (~mask).sum(dim=1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError(
            f"every mask row must keep the same number of patches, got {counts.unique().tolist()}"
        )
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    return order[:, : int(counts[0]) if counts.numel() else 0]


__all__ = ["block_mask", "visible_indices"]
