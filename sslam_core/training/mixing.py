"""SSLAM partial mixing: each clip is mixed with its batch neighbour except inside a few clean windows.

The mixture is the element-wise max of the two normalised log-mel spectrograms (spec §4, stage 2).
Window starts are multiples of the patch size so that every window covers whole rows of patches.
Partners: the release mixes clip i with clip i-1 of the device batch (`roll_partners`); the ablation
`--mix-partner random` draws a random derangement instead (`random_partners`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sslam_core.errors import OptionError
from sslam_core.training.transfer import to_device

PATCH = 16


def window_candidates(frames: int, previous_end: int, remaining: int, window: int, first: bool) -> list[int]:
    """Allowed starts for the next clean window.

    As in the official code (1024 frames, two windows of 240: first start in 0..496, second in
    first + 240 .. < 783): a start is a multiple of 16 after the previous window, leaves room for
    the `remaining` windows that follow with the last one ending before frame `frames - 1`, and the
    first window starts in the first half of the clip.
    """
    start = -(-previous_end // PATCH) * PATCH
    stop = frames - 1 - (remaining + 1) * window
    if first:
        stop = min(stop, frames // 2)
    return list(range(start, max(stop, start), PATCH))


def choose_windows(
    frames: int, window: int = 240, count: int = 2, generator: torch.Generator | None = None
) -> list[int]:
    """Random starts (frames, ascending, non-overlapping) of `count` clean windows of `window` frames."""
    if frames % PATCH or window % PATCH or window <= 0 or count < 1:
        raise OptionError(
            f"frames ({frames}) and window ({window}) must be positive multiples of {PATCH}, "
            f"count ({count}) at least 1"
        )
    starts: list[int] = []
    end = 0
    for k in range(count):
        options = window_candidates(frames, end, count - 1 - k, window, first=k == 0)
        if not options:
            raise OptionError(
                f"{count} clean windows of {window} frames do not fit in a clip of {frames} frames"
            )
        pick = int(torch.randint(len(options), (1,), generator=generator))
        starts.append(options[pick])
        end = starts[-1] + window
    return starts


def window_frames(frames: int, starts: list[int], window: int) -> Tensor:
    """Bool (frames,) that is True inside the clean windows."""
    inside = torch.zeros(frames, dtype=torch.bool)
    for s in starts:
        inside[s : s + window] = True
    return inside


def roll_partners(batch: int) -> Tensor:
    """The release's pairing: clip i is mixed with clip i-1 of the batch (cyclic), i.e. roll by one."""
    return torch.roll(torch.arange(batch), 1)


def random_partners(batch: int, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random derangement of the batch (no clip is its own partner), drawn by rejection."""
    if batch < 2:
        raise OptionError(f"mixing needs at least 2 clips in a batch, got {batch}")
    while True:
        perm = torch.randperm(batch, generator=generator)
        if not bool((perm == torch.arange(batch)).any()):
            return perm


def partial_mix(
    source: Tensor, starts: list[int], window: int = 240, partners: Tensor | None = None
) -> Tensor:
    """Mix clip i with clip partners[i] (default i-1, cyclic): element-wise max outside the windows,
    clip i alone inside."""
    partner = (
        torch.roll(source, 1, dims=0) if partners is None else source[to_device(partners, source.device)]
    )
    inside = to_device(window_frames(source.shape[2], starts, window), source.device)[None, None, :, None]
    return torch.where(inside, source, torch.maximum(source, partner))


def mix_batch(
    source: Tensor, window: int = 240, count: int = 2, generator: torch.Generator | None = None
) -> tuple[Tensor, list[int]]:
    """Partially mixed copy of a (B, 1, T, mel) batch and the window starts it used (one draw per batch)."""
    starts = choose_windows(source.shape[2], window, count, generator)
    return partial_mix(source, starts, window), starts


__all__ = [
    "window_candidates",
    "choose_windows",
    "window_frames",
    "roll_partners",
    "random_partners",
    "partial_mix",
    "mix_batch",
]
