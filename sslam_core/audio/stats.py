"""Fbank mean and standard deviation of a data set, for the `(fbank - mean) / (2 * std)` normalisation.

Each file goes through the inference front end: decoded to 16 kHz mono, its mean removed, Kaldi fbank
(`sslam_core.audio.frontend.fbank`). Only real frames count: with `target_length` a file contributes its
first `target_length` frames (what a model input keeps) and padding never enters the sums. Files are
decoded by threads and their fbanks computed in batches on the device; sums are accumulated in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sslam_core.audio.constants import FRAME_SAMPLES, HOP_SAMPLES, N_MELS, SAMPLE_RATE
from sslam_core.audio.decode import load_audio
from sslam_core.audio.files import AudioError
from sslam_core.audio.frontend import fbank, num_frames


@dataclass
class FbankStats:
    """Mean and std over every (frame, bin) value of the files read, and how many there were."""

    mean: float
    std: float
    frames: int
    files: int
    skipped: list[str] = field(default_factory=list)
    target_length: int | None = None

    @property
    def norm(self) -> str:
        """The value to pass as `--norm MEAN,STD`."""
        return f"{self.mean:.6f},{self.std:.6f}"


def _decode(path: str, target_length: int | None) -> torch.Tensor:
    """16 kHz mono wave with its mean removed, cut to the samples of its first `target_length` frames."""
    wave = load_audio(path, SAMPLE_RATE)
    wave = wave - wave.mean()
    if target_length is not None:
        wave = wave[: (target_length - 1) * HOP_SAMPLES + FRAME_SAMPLES]
    if num_frames(wave.shape[0]) == 0:
        raise AudioError(
            path, f"too short ({wave.shape[0]} samples at 16 kHz, the minimum is {FRAME_SAMPLES})"
        )
    return wave


def _decoded(paths: Sequence[str], target_length: int | None, workers: int) -> Iterator[tuple[str, object]]:
    """(path, wave or error message) in order, decoded up to 2 x `workers` files ahead."""

    def job(path: str):
        try:
            return path, _decode(path, target_length)
        except (AudioError, OSError, RuntimeError, ValueError) as e:
            msg = str(e)
            return path, msg if path in msg else f"{path}: {msg}"

    if workers <= 1:
        yield from map(job, paths)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = []
        for path in paths:
            pending.append(pool.submit(job, path))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def fbank_stats(
    paths: Sequence[str],
    *,
    target_length: int | None = None,
    batch_size: int = 16,
    workers: int = 2,
    device: str | torch.device = "cpu",
    max_batch_samples: int = SAMPLE_RATE * 600,
    progress: Callable[[str | None], None] | None = None,
) -> FbankStats:
    """Mean and std of the fbank values of `paths` (real frames only, first `target_length` if given).

    Files that fail to decode are left out and listed in `skipped`; `progress(error_or_None)` is called
    once per file.
    """
    device = torch.device(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    squares = torch.zeros((), dtype=torch.float64, device=device)
    frames = files = 0
    skipped: list[str] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        nonlocal total, squares, frames
        longest = max(w.shape[0] for w in batch)
        x = torch.stack([F.pad(w, (0, longest - w.shape[0])) for w in batch]).to(device)
        fb = fbank(x)
        for row, w in enumerate(batch):
            real = fb[row, : num_frames(w.shape[0])].double()
            total += real.sum()
            squares += real.square().sum()
            frames += real.shape[0]
        batch.clear()

    for _, item in _decoded(list(paths), target_length, workers):
        if isinstance(item, str):
            skipped.append(item)
        else:
            files += 1
            batch.append(item)
            if len(batch) >= batch_size or sum(w.shape[0] for w in batch) >= max_batch_samples:
                flush()
        if progress is not None:
            progress(item if isinstance(item, str) else None)
    if batch:
        flush()
    values = frames * N_MELS
    if values == 0:
        return FbankStats(math.nan, math.nan, 0, files, skipped, target_length)
    mean = float(total) / values
    variance = max(float(squares) / values - mean * mean, 0.0)
    return FbankStats(mean, math.sqrt(variance), frames, files, skipped, target_length)


__all__ = ["FbankStats", "fbank_stats"]
