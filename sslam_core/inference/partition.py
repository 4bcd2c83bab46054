"""Sharing a corpus out over `torchrun` ranks: deterministic, disjoint, balanced by audio duration.

Each rank takes one contiguous run of the inputs (in input order) holding about 1/world of the total
duration, so that ranks finish together however mixed the clip lengths are, and the merge reads each
rank's journal parts in sequence. Durations come from the audio headers (no decoding); each rank
reads the headers of every world-th input and the ranks pool them, so a corpus's headers are read
once in all, not once per rank. Inputs without a readable header weigh as much as the average one
(decoding will report them); tar members weigh their byte size at the corpus's bytes per second.

At the end each rank leaves a marker in the run's journal folder (`rank-RUN-RANK.json`: finished, or
stopped) and rank 0 waits for all of them before it merges. The wait polls files rather than
blocking in a collective call, so that it still honours a signal: when a rank is killed, torchrun
stops the others with SIGTERM, and a rank blocked inside gloo would never see it.
"""

from __future__ import annotations

import bisect
import itertools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sslam_core.audio.decode import audio_info
from sslam_core.audio.files import AudioFile, AudioSource
from sslam_core.inference.windows import Shifted, Source
from sslam_core.runs import distributed
from sslam_core.runs.outputs import write_text

__all__ = ["balanced_ranges", "duration_of", "durations", "my_share", "report_done", "wait_for_ranks"]


def duration_of(source: Source) -> float | None:
    """Seconds of audio in `source` from its header, or None when that is unknown or unreadable."""
    if isinstance(source, Shifted):
        return duration_of(source.source)
    if isinstance(source, str | AudioFile):
        try:
            return float(audio_info(source)[3])
        except Exception:  # decoding reports the file later; here it only weighs as an average one
            return None
    if isinstance(source, AudioSource):
        return source.seconds()
    wave, rate = source
    return wave.shape[-1] / rate


def _filled(seconds: Sequence[float | None], sizes: Sequence[int | None]) -> list[float]:
    """Unknown durations: byte size x the known files' seconds per byte, else the mean duration."""
    known = [(s, b) for s, b in zip(seconds, sizes, strict=True) if s is not None]
    mean = sum(s for s, _ in known) / len(known) if known else 1.0
    sized = [(s, b) for s, b in known if b]
    per_byte = sum(s for s, _ in sized) / sum(b for _, b in sized) if sized else None
    out = []
    for s, b in zip(seconds, sizes, strict=True):
        if s is None:
            s = b * per_byte if (b and per_byte) else (b / 32000.0 if b else mean)  # 16-bit 16 kHz
        out.append(max(float(s), 0.0))
    return out


def _size(source: Source) -> int | None:
    if isinstance(source, Shifted):
        return _size(source.source)
    return getattr(source, "size", None) if isinstance(source, AudioFile | AudioSource) else None


def durations(sources: Sequence[Source]) -> list[float]:
    """Every source's duration in seconds, the headers read once over all ranks (each reads every
    world-th one and the ranks exchange them); unknown ones estimated (see the module docstring)."""
    rank, world = distributed.get_rank(), distributed.get_world_size()
    mine = [duration_of(sources[i]) for i in range(rank, len(sources), world)]
    pooled = distributed.all_gather_objects(mine)
    seconds: list[float | None] = [None] * len(sources)
    for r, values in enumerate(pooled):
        seconds[r::world] = values
    return _filled(seconds, [_size(s) for s in sources])


def balanced_ranges(weights: Sequence[float], parts: int) -> list[range]:
    """`parts` contiguous ranges over the items, each holding about 1/parts of the total weight (the
    k-th boundary is the first item at which the running total reaches k/parts of it)."""
    if parts < 1:
        raise ValueError(f"cannot split into {parts} parts")
    total = list(itertools.accumulate(weights))
    whole = total[-1] if total else 0.0
    if whole <= 0:  # nothing to weigh by: split by count
        cuts = [round(k * len(weights) / parts) for k in range(parts + 1)]
    else:
        cuts = [0] + [bisect.bisect_left(total, k * whole / parts) + 1 for k in range(1, parts)]
        cuts = [min(c, len(weights)) for c in cuts] + [len(weights)]
        for k in range(1, len(cuts)):
            cuts[k] = max(cuts[k], cuts[k - 1])
    return [range(cuts[k], cuts[k + 1]) for k in range(parts)]


def my_share(sources: Sequence[Source]) -> range:
    """The indices of `sources` this rank runs (all of them in a single process)."""
    world = distributed.get_world_size()
    if world == 1:
        return range(len(sources))
    return balanced_ranges(durations(sources), world)[distributed.get_rank()]


def _marker(folder: Path, run: int, rank: int) -> Path:
    return folder / f"rank-{run:04d}-{rank:04d}.json"


def report_done(folder: str | Path, run: int, stopped: bool, files: int) -> None:
    """This rank's marker: its share is finished (or it was stopped after `files` files)."""
    if distributed.get_world_size() > 1:
        marker = _marker(Path(folder), run, distributed.get_rank())
        write_text(marker, json.dumps({"stopped": stopped, "files": files}))


def wait_for_ranks(folder: str | Path, run: int, stop: Callable[[], bool] | None = None) -> bool:
    """On rank 0: wait until every rank of `run` left its marker; False when any of them was stopped,
    or when `stop()` turns true meanwhile (the job is being torn down). True in a single process."""
    world = distributed.get_world_size()
    pending = set(range(1, world))
    while pending:
        for rank in sorted(pending):
            marker = _marker(Path(folder), run, rank)
            if marker.exists():
                pending.discard(rank)
                if json.loads(marker.read_text())["stopped"]:
                    return False
        if pending:
            if stop is not None and stop():
                return False
            time.sleep(0.1)
    return True
