"""Fine-tuning augmentation on fbank batches (mixup, SpecAugment, time roll) and weighted clip sampling.

Every random draw comes from the `torch.Generator` the trainer hands to `task.loss`, so a resumed run
augments exactly as the uninterrupted one would. Batches are (B, 1, T, mel) normalised log-mels, where 0
is the data mean; masks fill with 0 for that reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from sslam_core.errors import OptionError


@dataclass
class AugmentConfig:
    """Which augmentations run and how strong (spec §5 defaults)."""

    mixup: bool = True
    mixup_alpha: float = 0.8
    mixup_prob: float = 0.9
    specaugment: bool = True
    freq_mask_fraction: float = 0.2  # one frequency mask of up to this fraction of the mel bins
    time_mask_fraction: float = 0.2  # one time mask of up to this fraction of the frames
    roll: bool = True


def _uniform(n: int, generator: torch.Generator) -> Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


def beta_sample(alpha: float, generator: torch.Generator) -> float:
    """One draw from Beta(alpha, alpha), seeded from `generator` (torch has no seeded Beta sampler)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mixup(
    source: Tensor, target: Tensor, generator: torch.Generator, alpha: float = 0.8, prob: float = 0.9
) -> tuple[Tensor, Tensor, float]:
    """With probability `prob`, mix the batch with a shuffled copy of itself: x = l*x + (1-l)*x[perm].

    Targets (B, C) are mixed with the same weight. Returns (source, target, l); l = 1 when not mixed.
    """
    if float(_uniform(1, generator)) >= prob or source.shape[0] < 2:
        return source, target, 1.0
    lam = beta_sample(alpha, generator)
    perm = torch.randperm(source.shape[0], generator=generator).to(source.device)
    mixed = lam * source + (1.0 - lam) * source[perm]
    return mixed, lam * target + (1.0 - lam) * target[perm], lam


def _band_mask(n: int, size: int, fraction: float, generator: torch.Generator) -> Tensor:
    """(n, size) bool: per row one band of width uniform in [0, fraction*size] at a uniform start."""
    widths = (_uniform(n, generator) * (int(fraction * size) + 1)).long().clamp(max=int(fraction * size))
    starts = (_uniform(n, generator) * (size - widths + 1)).long()
    positions = torch.arange(size)[None, :]
    return (positions >= starts[:, None]) & (positions < (starts + widths)[:, None])


def spec_augment(
    source: Tensor, generator: torch.Generator, freq_fraction: float = 0.2, time_fraction: float = 0.2
) -> Tensor:
    """Zero one frequency band and one time band per clip, each up to the given fraction wide."""
    B, _, T, F = source.shape
    freq = _band_mask(B, F, freq_fraction, generator).to(source.device)
    time = _band_mask(B, T, time_fraction, generator).to(source.device)
    drop = freq[:, None, None, :] | time[:, None, :, None]
    return source.masked_fill(drop, 0.0)


def time_roll(source: Tensor, generator: torch.Generator) -> Tensor:
    """Roll each clip circularly along time by a uniform random number of frames."""
    B, _, T, _ = source.shape
    shifts = (_uniform(B, generator) * T).long().clamp(max=T - 1).to(source.device)
    rows = (torch.arange(T, device=source.device)[None, :] - shifts[:, None]) % T
    return torch.gather(source, 2, rows[:, None, :, None].expand_as(source))


def augment(
    source: Tensor, target: Tensor, generator: torch.Generator, config: AugmentConfig
) -> tuple[Tensor, Tensor]:
    """The training chain: mixup, then SpecAugment, then roll, as `config` enables them."""
    if config.mixup:
        source, target, _ = mixup(source, target, generator, config.mixup_alpha, config.mixup_prob)
    if config.specaugment:
        source = spec_augment(source, generator, config.freq_mask_fraction, config.time_mask_fraction)
    if config.roll:
        source = time_roll(source, generator)
    return source, target


# ---------------------------------------------------------------------------------------------------------
# Weighted sampling for imbalanced multi-label data


def sample_weights(targets: np.ndarray) -> np.ndarray:
    """Per-clip weight: sum over its labels of 1 / (clips carrying that label); 0 for unlabelled clips."""
    targets = np.asarray(targets, dtype=np.float64) > 0
    counts = targets.sum(axis=0)
    inverse = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    return targets.astype(np.float64) @ inverse


def weighted_draw(weights: Sequence[float] | np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` clip indices drawn with replacement in proportion to `weights`, a function of `seed` only."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise OptionError("sampling weights must be finite, non-negative and not all zero")
    return np.random.default_rng(seed).choice(len(w), size=n, replace=True, p=w / w.sum())


class WeightedEpochs(Dataset):
    """A clip dataset seen through weighted draws: item (i, epoch_seed) is the i-th draw of that epoch.

    Use it with `AudioBatches(..., shuffle=False)`: the draws are already random, so each rank takes an
    equal contiguous slice. A clip drawn twice in an epoch gets a different crop each time.
    """

    def __init__(self, dataset, weights: Sequence[float] | np.ndarray, per_epoch: int | None = None):
        self.dataset = dataset
        self.weights = np.asarray(weights, dtype=np.float64)
        if len(self.weights) != len(dataset):
            raise OptionError(f"{len(self.weights)} weights for {len(dataset)} clips")
        self.per_epoch = per_epoch or len(dataset)
        self.target_length = dataset.target_length
        self._drawn: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.per_epoch

    def draws(self, epoch_seed: int) -> np.ndarray:
        """The clip indices of one epoch, in order."""
        if self._drawn is None or self._drawn[0] != epoch_seed:
            self._drawn = (epoch_seed, weighted_draw(self.weights, self.per_epoch, epoch_seed))
        return self._drawn[1]

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        position, seed = key if isinstance(key, tuple) else (key, 0)
        clip = int(self.draws(seed)[position])
        return self.dataset[(clip, (seed * 31 + position) % (2**63))]


__all__ = [
    "AugmentConfig",
    "beta_sample",
    "mixup",
    "spec_augment",
    "time_roll",
    "augment",
    "sample_weights",
    "weighted_draw",
    "WeightedEpochs",
]
