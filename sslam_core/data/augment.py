"""Fine-tuning augmentation as the official EAT / SSLAM fine-tuning runs it, and weighted clip sampling.

On the waveform of each training clip (`roll_waves`, before the fbank): a circular roll by a uniform
number of samples and a gain of Beta(10, 10) + 0.5. On the normalised fbank batch (`augment`): the Speech
Commands noise (`add_noise`), mixup of the batch with its reversed copy (`mixup`), and SpecAugment with
one frequency and one time mask whose largest widths are a ratio of the bins and frames (`spec_augment`).
Every random draw comes from a `torch.Generator` the caller seeds, so a resumed run augments exactly as
the uninterrupted one would. Batches are (B, 1, T, mel) normalised log-mels, where 0 is the data mean;
masks fill with 0 for that reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from sslam_core.errors import OptionError

ROLL_GAIN_BETA = 10.0  # the waveform gain is Beta(10, 10) + 0.5: 0.5 to 1.5 around 1
NOISE_SCALE = 0.1  # Speech Commands noise: uniform [0, 1) times a per-clip level uniform in [0, 0.1)
NOISE_SHIFT = 10  # ... then a circular time shift of -10 to 9 frames


@dataclass
class AugmentConfig:
    """Which fbank-batch augmentations run and how strong (the official fine-tuning's defaults); the
    waveform roll is `roll_waves`, applied where the clips are loaded."""

    mixup: bool = True
    mixup_alpha: float = 0.8
    mixup_prob: float = 0.9
    specaugment: bool = True
    specaugment_ratio: float = 0.2  # largest mask: this fraction of the mel bins, and of the frames
    noise: bool = False  # the Speech Commands recipe's fbank noise and shift
    roll: bool = True  # recorded here; applied to the waveforms (`roll_waves`)


def _uniform(n: int, generator: torch.Generator) -> Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


def beta_sample(alpha: float, generator: torch.Generator, beta: float | None = None) -> float:
    """One draw from Beta(alpha, beta or alpha), seeded from `generator` (torch has no seeded Beta
    sampler)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha if beta is None else beta))


def mixup(
    source: Tensor, target: Tensor, generator: torch.Generator, alpha: float = 0.8, prob: float = 0.9
) -> tuple[Tensor, Tensor, float]:
    """With probability `prob`, mix the batch with its reversed copy: x = l*x + (1-l)*x.flip(0), one
    l ~ Beta(alpha, alpha) for the batch (the official "batch" mode). Targets (B, C) are mixed with the
    same weight. Returns (source, target, l); l = 1 when not mixed."""
    if float(_uniform(1, generator)) >= prob or source.shape[0] < 2:
        return source, target, 1.0
    lam = beta_sample(alpha, generator)
    mixed = lam * source + (1.0 - lam) * source.flip(0)
    return mixed, lam * target + (1.0 - lam) * target.flip(0), lam


def _band_mask(n: int, size: int, largest: float, generator: torch.Generator) -> Tensor:
    """(n, size) bool: per row one band as torchaudio's iid masking draws it: a width w = u1 * largest
    (floored) starting at floor(u2 * (size - u1 * largest))."""
    value = _uniform(n, generator) * largest
    start = (_uniform(n, generator) * (size - value)).floor().long()
    end = start + value.floor().long()
    positions = torch.arange(size)[None, :]
    return (positions >= start[:, None]) & (positions < end[:, None])


def spec_augment(source: Tensor, generator: torch.Generator, ratio: float = 0.2) -> Tensor:
    """Zero one frequency band and one time band per clip, of widths up to `ratio` of the mel bins and
    of the frames (the official fine-tuning's `mask_ratio`: 0.2, or 0.4 for ESC-50)."""
    B, _, T, F = source.shape
    freq = _band_mask(B, F, ratio * F, generator).to(source.device)
    time = _band_mask(B, T, ratio * T, generator).to(source.device)
    drop = freq[:, None, None, :] | time[:, None, :, None]
    return source.masked_fill(drop, 0.0)


def add_noise(source: Tensor, generator: torch.Generator) -> Tensor:
    """The Speech Commands recipe's noise, per clip: uniform noise in [0, 1) times a level uniform in
    [0, 0.1), added to the normalised fbank, then a circular time shift of -10 to 9 frames."""
    B, _, T, F = source.shape
    level = _uniform(B, generator).float() * NOISE_SCALE
    noise = torch.rand((B, 1, T, F), generator=generator) * level[:, None, None, None]
    shifts = torch.randint(-NOISE_SHIFT, NOISE_SHIFT, (B,), generator=generator)
    noisy = source + noise.to(source.device, source.dtype)
    rows = (torch.arange(T)[None, :] - shifts[:, None]) % T
    return torch.gather(noisy, 2, rows.to(source.device)[:, None, :, None].expand_as(noisy))


def roll_waves(waves: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    """The official roll augmentation of training clips: each waveform rolled circularly by a uniform
    number of samples and scaled by a gain of Beta(10, 10) + 0.5."""
    out = []
    for wave in waves:
        shift = int(torch.randint(0, max(int(wave.shape[-1]), 1), (1,), generator=generator))
        gain = beta_sample(ROLL_GAIN_BETA, generator) + 0.5
        out.append(torch.roll(wave, shift, dims=-1) * gain)
    return out


def time_roll(source: Tensor, generator: torch.Generator) -> Tensor:
    """Roll each clip of an fbank batch circularly along time by a uniform number of frames."""
    B, _, T, _ = source.shape
    shifts = (_uniform(B, generator) * T).long().clamp(max=T - 1).to(source.device)
    rows = (torch.arange(T, device=source.device)[None, :] - shifts[:, None]) % T
    return torch.gather(source, 2, rows[:, None, :, None].expand_as(source))


def augment(
    source: Tensor, target: Tensor, generator: torch.Generator, config: AugmentConfig
) -> tuple[Tensor, Tensor]:
    """The fbank-batch chain of the official runs: noise (per clip, as the dataset adds it), then mixup,
    then SpecAugment, as `config` enables them."""
    if config.noise:
        source = add_noise(source, generator)
    if config.mixup:
        source, target, _ = mixup(source, target, generator, config.mixup_alpha, config.mixup_prob)
    if config.specaugment:
        source = spec_augment(source, generator, config.specaugment_ratio)
    return source, target


# ---------------------------------------------------------------------------------------------------------
# Weighted sampling for imbalanced multi-label data


LABEL_WEIGHT_SCALE, LABEL_COUNT_EPS = 1000.0, 0.01  # the AudioSet weight files' formula (see below)


def sample_weights(targets: np.ndarray) -> np.ndarray:
    """Per-clip sampling weight for imbalanced multi-label data: the sum over the clip's labels of
    1000 / (clips carrying that label + 0.01), the formula of the AudioSet weight files the official AS-2M
    fine-tuning draws from (AudioMAE's `gen_weight`); 0 for a clip without labels. Only ratios matter."""
    targets = np.asarray(targets, dtype=np.float64) > 0
    counts = targets.sum(axis=0)
    return targets.astype(np.float64) @ (LABEL_WEIGHT_SCALE / (counts + LABEL_COUNT_EPS))


def weighted_draw(
    weights: Sequence[float] | np.ndarray, n: int, seed: int, replace: bool = True
) -> np.ndarray:
    """`n` clip indices drawn in proportion to `weights`, a function of `seed` only: with replacement, or
    without (`replace=False`, as the official AS-2M epochs of 200,000 distinct clips: successive weighted
    draws, done at once by the Efraimidis-Spirakis keys u ** (1 / w))."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise OptionError("sampling weights must be finite, non-negative and not all zero")
    rng = np.random.default_rng(seed)
    if replace:
        return rng.choice(len(w), size=n, replace=True, p=w / w.sum())
    positive = int((w > 0).sum())
    if n > positive:
        raise OptionError(f"cannot draw {n} distinct clips: {positive} have a sampling weight above 0")
    with np.errstate(divide="ignore"):
        keys = np.where(w > 0, np.log(rng.random(len(w))) / np.where(w > 0, w, 1.0), -np.inf)
    top = np.argpartition(-keys, n - 1)[:n] if n < len(w) else np.arange(len(w))
    return top[np.argsort(-keys[top], kind="stable")]


def read_weights(path: str, names: Sequence[str]) -> np.ndarray:
    """A weight file for the clips `names` (in their order): `sslam weights`' CSV (a header, then
    `path,weight` rows, matched by path), or the official one weight per line in the clips' order."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError) as err:
        raise OptionError(f"{path}: cannot read the weight file ({err})") from None
    if rows and len(rows[0]) >= 2 and rows[0][0].strip().lower() in ("path", "filename"):
        by_name = {}
        for line, row in enumerate(rows[1:], start=2):
            try:
                by_name[row[0]] = float(row[1])
            except (IndexError, ValueError):
                raise OptionError(f"{path}:{line}: expected PATH,WEIGHT") from None
        missing = [n for n in names if n not in by_name]
        if missing:
            raise OptionError(f"{path}: no weight for {len(missing)} clip(s) of the data (e.g. {missing[0]})")
        return np.array([by_name[n] for n in names], dtype=np.float64)
    try:
        values = np.array([float(r[0]) for r in rows], dtype=np.float64)
    except ValueError:
        raise OptionError(f"{path}: expected one weight per line, or PATH,WEIGHT rows") from None
    if len(values) != len(names):
        raise OptionError(f"{path}: {len(values)} weights for {len(names)} clips (one per line, in order)")
    return values


class WeightedEpochs(Dataset):
    """A clip dataset seen through weighted draws: item (i, epoch_seed) is the i-th draw of that epoch.

    Use it with `AudioBatches(..., shuffle=False)`: the draws are already random, so each rank takes an
    equal contiguous slice. A clip drawn twice in an epoch gets a different crop each time.
    """

    def __init__(
        self,
        dataset,
        weights: Sequence[float] | np.ndarray,
        per_epoch: int | None = None,
        replace: bool = True,
    ):
        self.dataset = dataset
        self.weights = np.asarray(weights, dtype=np.float64)
        if len(self.weights) != len(dataset):
            raise OptionError(f"{len(self.weights)} weights for {len(dataset)} clips")
        self.per_epoch = per_epoch or len(dataset)
        self.replace = replace
        self.target_length = dataset.target_length
        self._drawn: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.per_epoch

    def draws(self, epoch_seed: int) -> np.ndarray:
        """The clip indices of one epoch, in order."""
        if self._drawn is None or self._drawn[0] != epoch_seed:
            self._drawn = (epoch_seed, weighted_draw(self.weights, self.per_epoch, epoch_seed, self.replace))
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
    "add_noise",
    "roll_waves",
    "time_roll",
    "read_weights",
    "augment",
    "sample_weights",
    "weighted_draw",
    "WeightedEpochs",
]
