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

from sslam_core.audio.constants import FRAMES_PER_SECOND, PATCH_FRAMES
from sslam_core.errors import OptionError
from sslam_core.inference.options import PipelineOptions, pipeline_options
from sslam_core.inference.partition import my_share, report_done, wait_for_ranks
from sslam_core.inference.pipeline import feature_head, run_windows
from sslam_core.inference.windows import FileResult, Shifted, Source
from sslam_core.runs import distributed
from sslam_core.runs.feature_store import FeatureStore, Record, finished_digest
from sslam_core.runs.outputs import finished_refusal, is_finished, settings_digest

GRANULARITIES = ("clip", "frame", "patch")
FRAME_HOPS = (0.16, 0.08, 0.04, 0.02, 0.01)  # 160 ms / 1, 2, 4, 8, 16 passes, in whole 10 ms frames


@dataclass(frozen=True)
class FeatureOptions:
    """What an extraction keeps: `granularity` (clip, frame, patch or all), the block `layer` (1-based,
    negative from the end, None = the last) and `frame_hop` (seconds between frame vectors, None =
    one per 160 ms patch; see `frame_shifts`)."""

    granularity: str = "clip"
    layer: int | None = None
    frame_hop: float | None = None


def frame_shifts(frame_hop: float | None) -> list[int]:
    """Start offsets, in 10 ms frames, of the passes whose frame vectors together come every
    `frame_hop` seconds: one pass gives a vector per 160 ms patch; pass k of n starts k * 160 / n ms
    later. Each pass costs one more run of the model over the file."""
    if frame_hop is None:
        return [0]
    passes = round(PATCH_FRAMES / FRAMES_PER_SECOND / frame_hop)
    if passes not in (1, 2, 4, 8, 16) or not math.isclose(
        passes * frame_hop, PATCH_FRAMES / FRAMES_PER_SECOND
    ):
        raise OptionError(f"frame hop {frame_hop} s: choose one of {', '.join(map(str, FRAME_HOPS))}")
    return [k * PATCH_FRAMES // passes for k in range(passes)]


def _passes(
    model: nn.Module,
    sources: Sequence[Source],
    features: FeatureOptions,
    options: PipelineOptions,
    stop: Callable[[], bool] | None = None,
    names: Sequence[str] | None = None,
) -> Iterator[list[FileResult]]:
    """Each source's results from every shifted pass (the first unshifted), file by file in order."""
    keep = granularities(features.granularity)
    streams = [
        run_windows(
            model,
            [Shifted(s, k) for s in sources] if k else sources,
            feature_head(model, features.layer, keep if not k else ("clip", "frame")),
            options,
            stop=stop,
            names=names,
        )
        for k in frame_shifts(features.frame_hop)
    ]
    yield from zip(*streams, strict=False)  # shorter when stopped


def _records(passes: list[FileResult], name: str, window: int, hop: int, keep) -> list[Record]:
    """One file's Record from each pass; the shifted passes carry no patch tokens (see `_passes`)."""
    shifted = tuple(g for g in keep if g != "patch")
    return [to_record(r, name, window, hop, keep if k == 0 else shifted) for k, r in enumerate(passes)]


def merge_shifted(records: list[Record], shifts: list[int]) -> Record:
    """The first pass's record with the frame vectors of the shifted passes interleaved by time
    (those starting past the end of the audio left out); a shifted pass that failed (a clip too
    short once shifted) only contributes nothing."""
    base = records[0]
    if base.error is not None or base.frame is None or len(records) == 1:
        return base
    frames, times = [base.frame], [base.frame_times]
    for rec, k in zip(records[1:], shifts[1:], strict=True):
        if rec.error is None and rec.frame is not None:
            t = rec.frame_times + k / FRAMES_PER_SECOND
            kept = t < base.duration
            frames.append(rec.frame[kept])
            times.append(t[kept])
    t = np.concatenate(times)
    order = np.argsort(t, kind="stable")
    base.frame, base.frame_times = np.concatenate(frames)[order], t[order]
    return base


def granularities(name: str) -> tuple[str, ...]:
    """`clip|frame|patch|all` -> the outputs to keep (the clip vector is always kept)."""
    if name == "all":
        return GRANULARITIES
    if name not in GRANULARITIES:
        raise OptionError(f"unknown granularity {name!r}; choose clip, frame, patch or all")
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
            times.append((start + PATCH_FRAMES * np.arange(n)) / FRAMES_PER_SECOND)
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
    complete: bool = False  # --resume found the output finished with these settings: nothing was done


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
    options: PipelineOptions,
    features: FeatureOptions,
    *,
    settings: dict,
    resume: bool = False,
    compression: str = "none",
    flush_files: int = 256,
    stop: Callable[[], bool] | None = None,
    on_file: Callable[[Record], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> ExtractSummary:
    """Extract features of every source into one HDF5 file (layout in `feature_store`).

    `names` are the paths as stored in the file. Files already in an unfinished run's journal are
    skipped with `resume=True`; bad files are recorded in `errors` and reported via `on_file`;
    `on_start(todo, done)` is called once with the number of files this process will run (a torchrun
    rank's share) and of those done before (resumed). When
    `stop()` turns true the files finished so far go to the journal and the HDF5 file is not written
    (`interrupted` in the summary); `resume=True` later finishes the rest. `features` say what is
    kept (granularity, layer, frame hop); `compression` (none, gzip, lzf) applies to the HDF5 datasets.

    Under `torchrun` every rank calls this with the same arguments: each runs its share of the files
    not yet done (`partition.my_share`), and rank 0, once all have finished, merges the journal into
    one file equal to a single process's (the summary of the others counts only their own files); a
    rank stopped or killed leaves the output unwritten, to be finished with `resume=True` under any
    number of ranks.
    """
    keep = granularities(features.granularity)
    window, hop = options.target_length, options.window_hop
    if resume and is_finished(out):  # a finished output is left as it is
        if finished_digest(out) != settings_digest(settings, names):
            raise finished_refusal(out)
        return ExtractSummary(0, [], len(names), Path(out), complete=True)
    store = FeatureStore(Path(out), settings, keep, resume=resume, flush_files=flush_files)
    done = store.done() if resume else set()
    todo = [(s, n) for s, n in zip(sources, names, strict=True) if n not in done]
    share = my_share([s for s, _ in todo])  # all of them in one process; a torchrun rank's part
    todo = todo[share.start : share.stop]
    if on_start is not None:
        on_start(len(todo), len(done))
    shifts = frame_shifts(features.frame_hop)
    results = _passes(model, [s for s, _ in todo], features, options, stop, [n for _, n in todo])
    finished = 0
    for (_, name), passes in zip(todo, results, strict=False):  # shorter when stopped
        rec = merge_shifted(_records(passes, name, window, hop, keep), shifts)
        store.add(rec)
        finished += 1
        if on_file:
            on_file(rec)
    store.flush()
    stopped = finished < len(todo)
    report_done(store.parts, store.run, stopped, finished)
    if stopped or not distributed.is_main():  # the other ranks leave the merge to rank 0
        return ExtractSummary(finished, [], len(done), Path(out), interrupted=stopped)
    if not wait_for_ranks(store.parts, store.run, stop):
        return ExtractSummary(finished, [], len(done), Path(out), interrupted=True)
    written, skipped = store.finish(list(names), compression)
    return ExtractSummary(written, skipped, len(done), Path(out))


def embed(
    model: nn.Module,
    sources: Sequence[Source],
    options: PipelineOptions | None = None,
    *,
    granularity: str = "clip",
    layer: int | None = None,
    frame_hop: float | None = None,
    stop: Callable[[], bool] | None = None,
    names: Sequence[str] | None = None,
    **overrides,
) -> Iterator[Record]:
    """Features of each file path or (wave, sample_rate) pair, as numpy arrays in Records; frame
    vectors every `frame_hop` seconds (default 0.16, see `frame_shifts`). `options` (or their fields
    as keywords: `target_length=`, `hop=`, `batch_size=`, `device=`, ...) say how the model runs."""
    o = pipeline_options(options, **overrides)
    features = FeatureOptions(granularity, layer, frame_hop)
    keep = granularities(granularity)
    shifts = frame_shifts(frame_hop)
    for passes in _passes(model, sources, features, o, stop, names):
        yield merge_shifted(_records(passes, passes[0].path, o.target_length, o.window_hop, keep), shifts)
