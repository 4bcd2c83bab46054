"""Inverse block masking: exact visible counts, block structure like the official masks, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES

from sslam_core.training.masking import block_mask, visible_indices

OFFICIAL_MASKS = FIXTURES / "pretraining" / "step_fixture.npz"


def kept_neighbours(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Mean number of visible 4-neighbours of a visible patch, per row (random picks give ~0.7 on 64x8)."""
    kept = (~mask).float().view(-1, 1, *grid)
    cross = torch.tensor([[0.0, 1, 0], [1, 0, 1], [0, 1, 0]]).view(1, 1, 3, 3)
    neighbours = F.conv2d(kept, cross, padding=1)
    return (neighbours * kept).sum((1, 2, 3)) / kept.sum((1, 2, 3))


@pytest.mark.parametrize("grid", [(64, 8), (32, 8), (20, 8), (128, 8), (12, 12)])
def test_every_row_keeps_exactly_the_target_count(grid):
    n = grid[0] * grid[1]
    mask = block_mask(64, grid, generator=torch.Generator().manual_seed(3))
    assert mask.shape == (64, n) and mask.dtype == torch.bool
    assert ((~mask).sum(dim=1) == int(n * (1 - 0.8))).all()


def test_release_grid_counts_match_the_official_masks():
    official = torch.from_numpy(np.load(OFFICIAL_MASKS)["mask"]).bool()
    ours = block_mask(8, (64, 8), generator=torch.Generator().manual_seed(0))
    assert (official.sum(dim=1) == 410).all() and (ours.sum(dim=1) == 410).all()


def test_visible_patches_form_blocks_like_the_official_masks():
    official = torch.from_numpy(np.load(OFFICIAL_MASKS)["mask"]).bool()
    ours = block_mask(2000, (64, 8), generator=torch.Generator().manual_seed(1))
    official_mean = kept_neighbours(official, (64, 8)).mean().item()
    ours_mean = kept_neighbours(ours, (64, 8)).mean().item()
    assert 2.5 < official_mean < 3.2
    assert abs(ours_mean - official_mean) < 0.3
    scattered = block_mask(2000, (64, 8), block=1, adjust=0.0, generator=torch.Generator().manual_seed(1))
    assert kept_neighbours(scattered, (64, 8)).mean().item() < 1.0


def test_rows_are_independent_and_seeded():
    a = block_mask(16, (64, 8), generator=torch.Generator().manual_seed(7))
    b = block_mask(16, (64, 8), generator=torch.Generator().manual_seed(7))
    c = block_mask(16, (64, 8), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r.tolist()) for r in a}) == 16


def test_visible_indices_are_sorted_and_reject_ragged_masks():
    mask = block_mask(4, (16, 8), generator=torch.Generator().manual_seed(0))
    idx = visible_indices(mask)
    assert idx.shape == (4, int(128 * (1 - 0.8)))
    assert (idx.diff(dim=1) > 0).all() and not mask.gather(1, idx).any()
    mask[0, idx[0, 0]] = True
    with pytest.raises(ValueError, match="same number"):
        visible_indices(mask)


def test_impossible_settings_raise():
    with pytest.raises(ValueError, match="no visible patch"):
        block_mask(2, (2, 2), mask_prob=0.9)
