"""Embeddings of whole files: clip, per-160-ms-step and patch features, in memory or to HDF5."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sslam_core.feature_store import FeatureStore, Record
from sslam_core.inference import PATCH_FRAMES, FileResult, Source, feature_head, run_windows

GRANULARITIES = ("clip", "frame", "patch")


def granularities(name: str) -> tuple[str, ...]:
    """`clip|frame|patch|all` -> the outputs to keep (the clip vector is always kept)."""
    if name == "all":
        return GRANULARITIES
    if name not in GRANULARITIES:
        raise ValueError(f"unknown granularity {name!r}; choose clip, frame, patch or all")
    return ("clip", name) if name != "clip" else ("clip",)


def to_record(res: FileResult, name: str, window: int, hop: int, keep: tuple[str, ...]) -> Record:
    """Reduce per-window outputs to one file's features.

    clip: the mean of the windows' CLS vectors. patch: every window's patch tokens in order.
    frame: one vector per 160 ms step; each window contributes the steps up to the next window's
    start (the last one up to the end of the audio), so steps never repeat.
    """
    if res.error is not None:
        return Record(name, error=res.error)
    rec = Record(name, res.duration, clip=res.stacked("clip").mean(dim=0).numpy())
    if "patch" in keep:
        rec.patch = torch.cat(res.outputs["patch"]).numpy()
    if "frame" in keep:
        steps, times = [], []
        for k, (start, vecs) in enumerate(zip(res.starts, res.outputs["frame"], strict=True)):
            last = k == len(res.starts) - 1
            n = math.ceil((res.frames - start) / PATCH_FRAMES) if last else min(hop, window) // PATCH_FRAMES
            n = max(1, min(n, window // PATCH_FRAMES))
            steps.append(vecs[:n])
            times.append((start + PATCH_FRAMES * np.arange(n)) / 100.0)
        rec.frame = torch.cat(steps).numpy()
        rec.frame_times = np.concatenate(times)
    return rec


@dataclass
class ExtractSummary:
    """What a run did: files written, files skipped (path, reason), files taken from the journal of an
    interrupted run; `interrupted` when it stopped on a signal (its journal is kept for --resume)."""

    written: int
    skipped: list[tuple[str, str]]
    resumed: int
    out: Path
    interrupted: bool = False


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file (checkpoints are identified by it in outputs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def extract_to_h5(
    model: nn.Module,
    sources: Sequence[str],
    names: Sequence[str],
    out: str | Path,
    *,
    settings: dict,
    granularity: str = "clip",
    layer: int | None = None,
    target_length: int = 1024,
    hop: int | None = None,
    resume: bool = False,
    on_file: Callable[[Record], None] | None = None,
    flush_files: int = 256,
    stop: Callable[[], bool] | None = None,
    **run_options,
) -> ExtractSummary:
    """Extract features of every source into one HDF5 file (layout in `feature_store`).

    `names` are the paths as stored in the file. Files already in an unfinished run's journal are
    skipped with `resume=True`; bad files are recorded in `errors` and reported via `on_file`. When
    `stop()` turns true the files finished so far go to the journal and the HDF5 file is not written
    (`interrupted` in the summary); `resume=True` later finishes the rest.
    """
    keep = granularities(granularity)
    hop = hop or target_length
    store = FeatureStore(Path(out), settings, keep, resume=resume, flush_files=flush_files)
    done = store.done() if resume else set()
    todo = [(s, n) for s, n in zip(sources, names, strict=True) if n not in done]
    results = run_windows(
        model,
        [s for s, _ in todo],
        feature_head(model, layer, keep),
        target_length=target_length,
        hop=hop,
        stop=stop,
        names=[n for _, n in todo],
        **run_options,
    )
    finished = 0
    for (_, name), res in zip(todo, results, strict=False):  # shorter when stopped
        rec = to_record(res, name, target_length, hop, keep)
        store.add(rec)
        finished += 1
        if on_file:
            on_file(rec)
    if finished < len(todo):
        store.flush()
        return ExtractSummary(finished, [], len(done), Path(out), interrupted=True)
    written, skipped = store.finish(list(names))
    return ExtractSummary(written, skipped, len(done), Path(out))


def embed(
    model: nn.Module,
    sources: Sequence[Source],
    *,
    granularity: str = "clip",
    layer: int | None = None,
    target_length: int = 1024,
    hop: int | None = None,
    **run_options,
) -> Iterator[Record]:
    """Features of each file path or (wave, sample_rate) pair, as numpy arrays in Records."""
    keep = granularities(granularity)
    hop = hop or target_length
    results = run_windows(
        model, sources, feature_head(model, layer, keep), target_length=target_length, hop=hop, **run_options
    )
    for res in results:
        yield to_record(res, res.path, target_length, hop, keep)
