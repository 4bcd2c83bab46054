"""Crash-safe HDF5 output for `sslam extract`, from one process or many `torchrun` ranks.

Finished files go first to a journal of small part files next to the output (`OUT.parts/`), each
written to a temporary name and renamed, so a run killed at any moment (SIGKILL included) loses at
most the batch in flight. Parts are named by run, rank and sequence (`part-RUN-RANK-SEQ.npz`), so the
ranks of a run, and the runs that resume it under any number of ranks, never write the same name.
`--resume` reads the journal and skips what is there. At the end one process merges the parts, in
input order, into `OUT` through a temporary file and an atomic rename, so `OUT` is either absent,
the previous complete file, or the new complete file. The merge streams: it holds only the parts
that still have rows to give (each rank's parts are in input order, so a handful at a time) and
writes rows in slabs.

HDF5 layout (N files written, M vectors):
  paths (N,) str; duration (N,) float64 seconds; clip (N, D) float32
  patch/data (M, D), patch/offsets (N+1,) int64
  frame/data (M, D), frame/offsets (N+1,) int64, frame/times (M,) float64 seconds
  errors/paths (E,) str, errors/reasons (E,) str
  attrs: settings of the run (checkpoint, sha256, config, sample_rate, target_length, ...)
Datasets are chunked by rows (one file's rows read without loading the rest) and optionally gzip- or
lzf-compressed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from sslam_core.errors import OptionError, SslamError
from sslam_core.runs import distributed
from sslam_core.runs.outputs import OutputError, atomic_write, output_error, settings_digest, write_text

STR = h5py.string_dtype("utf-8")
SETTINGS = "settings.json"
DIGEST = "settings_digest"  # attribute: the fingerprint of the settings and inputs (outputs.settings_digest)
COMPRESSIONS = ("none", "gzip", "lzf")
SLAB_ROWS = 1024  # rows gathered before one write of each dataset
ROW_CHUNK_BYTES = 1 << 20  # about this much per chunk of a (rows, D) dataset
MAX_OPEN_PARTS = 16  # parts held at once by the merge, beyond those with rows still to give


@dataclass
class Record:
    """What one input produced: features, or the reason it was skipped."""

    path: str
    duration: float = 0.0
    clip: np.ndarray | None = None  # (D,)
    patch: np.ndarray | None = None  # (P, D)
    frame: np.ndarray | None = None  # (S, D)
    frame_times: np.ndarray | None = None  # (S,)
    error: str | None = None


class StoreError(SslamError):
    """The output or its journal cannot be used (e.g. resume with different settings)."""


@dataclass
class FeatureStore:
    """Journal of finished files plus the final merge into one HDF5 file."""

    out: Path
    settings: dict
    granularities: tuple[str, ...]
    resume: bool = False
    flush_bytes: int = 64 << 20
    flush_files: int = 256
    flush_seconds: float = 30.0
    _buffer: list[Record] = field(default_factory=list)
    _buffered: int = 0
    _parts: int = 0  # parts this process has written
    _run: int = 0
    _rank: int = 0
    _last_flush: float = field(default_factory=time.monotonic)
    _order: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.parts = self.out.with_name(self.out.name + ".parts")
        self._run = distributed.on_main(self._open_journal)  # the other ranks wait for rank 0's journal
        self._rank = distributed.get_rank()

    @property
    def run(self) -> int:
        """This run's number among the runs that wrote to the journal (1 for a fresh one)."""
        return self._run

    def _open_journal(self) -> int:
        """Check (resume) or start the journal; the number of this run (see `_next_run`)."""
        settings_json = json.dumps(self.settings, sort_keys=True, default=str)
        if self.resume and (self.parts / SETTINGS).exists():
            if (self.parts / SETTINGS).read_text() != settings_json:
                raise StoreError(
                    f"{self.out}: cannot resume, the unfinished run used other settings "
                    f"(see {self.parts / SETTINGS}); pass --overwrite to start over"
                )
            return self._next_run()
        shutil.rmtree(self.parts, ignore_errors=True)
        try:
            self.parts.mkdir(parents=True)
        except OSError as e:
            raise output_error(self.parts, e, "cannot create the journal folder") from e
        write_text(self.parts / SETTINGS, settings_json)
        return 1

    def _next_run(self) -> int:
        """1 + the highest run number among the journal's parts (parts of older layouts count as 0)."""
        runs = [0]
        for part in self._part_files():
            fields = part.stem.split("-")
            if len(fields) == 4 and fields[1].isdigit():
                runs.append(int(fields[1]))
        return max(runs) + 1

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.npz"))

    def done(self) -> set[str]:
        """Paths already in the journal (written or skipped)."""
        finished: set[str] = set()
        for part in self._part_files():
            with np.load(part) as z:
                finished.update(z["paths"].tolist())
        return finished

    def add(self, record: Record) -> None:
        """Queue one file's result; the journal is flushed by size, file count or time."""
        self._buffer.append(record)
        self._buffered += sum(a.nbytes for a in (record.clip, record.patch, record.frame) if a is not None)
        if (
            self._buffered >= self.flush_bytes
            or len(self._buffer) >= self.flush_files
            or time.monotonic() - self._last_flush >= self.flush_seconds
        ):
            self.flush()

    def flush(self) -> None:
        """Write the queued results as one part file (atomically)."""
        if not self._buffer:
            return
        recs, arrays = self._buffer, {}
        arrays["paths"] = np.array([r.path for r in recs], dtype=str)
        arrays["duration"] = np.array([r.duration for r in recs], dtype=np.float64)
        arrays["error"] = np.array([r.error or "" for r in recs], dtype=str)
        good = [r for r in recs if r.error is None]
        if good:
            arrays["clip"] = np.stack([r.clip for r in good]).astype(np.float32)
            for name in ("patch", "frame"):
                if name in self.granularities:
                    chunks = [getattr(r, name) for r in good]
                    arrays[f"{name}_data"] = np.concatenate(chunks).astype(np.float32)
                    arrays[f"{name}_count"] = np.array([len(c) for c in chunks], dtype=np.int64)
            if "frame" in self.granularities:
                arrays["frame_times"] = np.concatenate([r.frame_times for r in good])
        name = f"part-{self._run:04d}-{self._rank:04d}-{self._parts:06d}.npz"
        atomic_write(self.parts / name, lambda tmp: np.savez(tmp, **arrays))
        self._parts += 1
        self._buffer, self._buffered = [], 0
        self._last_flush = time.monotonic()

    def finish(self, order: list[str], compression: str = "none") -> tuple[int, list[tuple[str, str]]]:
        """Merge the journal into the HDF5 output, files in `order`; returns (written, errors). One
        process merges (rank 0 under torchrun, once every rank has flushed its parts)."""
        self.flush()
        self._order = list(order)
        if compression not in COMPRESSIONS:
            raise OptionError(f"compression {compression!r}: choose {', '.join(COMPRESSIONS)}")
        rank = {p: i for i, p in enumerate(order)}
        items: list[tuple[int, int, int]] = []  # (rank in order, part, row among the part's good rows)
        errors: list[tuple[int, str, str]] = []
        parts = self._part_files()
        for p, part in enumerate(parts):
            with np.load(part) as z:
                g = 0
                for path, err in zip(z["paths"].tolist(), z["error"].tolist(), strict=True):
                    if err:
                        errors.append((rank.get(path, len(rank)), path, err))
                    else:
                        items.append((rank.get(path, len(rank)), p, g))
                        g += 1
        items.sort(key=lambda t: t[0])
        errors.sort()
        self._check_space()

        def write(tmp: str) -> None:
            with h5py.File(tmp, "w") as h5:
                self._write(h5, parts, [(p, g) for _, p, g in items], errors, compression)

        atomic_write(self.out, write)
        shutil.rmtree(self.parts, ignore_errors=True)
        return len(items), [(p, e) for _, p, e in errors]

    def _check_space(self) -> None:
        """Refuse the merge up front when the output's file system cannot hold it (the journal's size
        and a margin): HDF5 fails badly on a disk that fills up while it writes."""
        need = sum(p.stat().st_size for p in self._part_files()) * 1.05 + (1 << 20)
        stat = os.statvfs(self.out.parent)
        free = stat.f_bavail * stat.f_frsize
        if free < need:
            raise OutputError(
                errno.ENOSPC,
                f"{self.out}: cannot write (no space left on device: about {need / 1e6:.1f} MB needed, "
                f"{free / 1e6:.1f} MB free)",
            )

    def _write(self, h5: h5py.File, parts: list[Path], items: list, errors: list, compression: str) -> None:
        """The HDF5 file from `items` ((part, good row) in output order), slab by slab."""
        for key, value in self.settings.items():
            h5.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value, default=str)
        h5.attrs[DIGEST] = settings_digest(self.settings, self._order)  # for --resume on a finished file
        n = len(items)
        ragged = [g for g in ("patch", "frame") if g in self.granularities]
        reader = _PartReader(parts, items, ragged)
        dim = reader.dim()
        packed = {"compression": None if compression == "none" else compression}
        empty = not n  # no rows: plain empty datasets (chunks cannot exceed a zero dimension)
        rows = {} if empty else {"chunks": (min(n, 16384),), **packed}
        h5.create_dataset("paths", (n,), dtype=STR, **rows)
        h5.create_dataset("duration", (n,), dtype=np.float64, **rows)
        h5.create_dataset(
            "clip", (n, dim), dtype=np.float32, **({} if empty else {"chunks": _row_chunks(n, dim), **packed})
        )
        for name in ragged:
            grow = {} if empty else {"maxshape": (None, dim), "chunks": _row_chunks(4096, dim), **packed}
            h5.create_dataset(f"{name}/data", (0, dim), dtype=np.float32, **grow)
        if "frame" in ragged:
            grow = {} if empty else {"maxshape": (None,), "chunks": (16384,), **packed}
            h5.create_dataset("frame/times", (0,), dtype=np.float64, **grow)
        offsets = {name: [np.zeros(1, dtype=np.int64)] for name in ragged}
        for a in range(0, n, SLAB_ROWS):
            slab = reader.rows(a, min(a + SLAB_ROWS, n))
            b = a + len(slab["paths"])
            h5["paths"][a:b] = slab["paths"]
            h5["duration"][a:b] = slab["duration"]
            h5["clip"][a:b] = slab["clip"]
            for name in ragged:
                _append(h5[f"{name}/data"], slab[f"{name}_data"])
                offsets[name].append(offsets[name][-1][-1] + np.cumsum(slab[f"{name}_count"]))
                if name == "frame":
                    _append(h5["frame/times"], slab["frame_times"])
        for name in ragged:
            h5.create_dataset(f"{name}/offsets", data=np.concatenate(offsets[name]))
        h5.create_dataset("errors/paths", data=np.array([p for _, p, _ in errors], dtype=object), dtype=STR)
        reasons = [e.removeprefix(f"{p}: ") for _, p, e in errors]  # the path is in errors/paths already
        h5.create_dataset("errors/reasons", data=np.array(reasons, dtype=object), dtype=STR)


def _row_chunks(rows: int, dim: int) -> tuple[int, int]:
    """Chunks of whole rows, about ROW_CHUNK_BYTES each (h5py's advice: 10 KiB to 1 MiB)."""
    return max(1, min(rows, ROW_CHUNK_BYTES // (4 * max(dim, 1)))), max(dim, 1)


class _PartReader:
    """Rows of the journal's parts in output order, holding only the parts still needed.

    A part is loaded when its first row is wanted and dropped after its last one; each rank's parts
    are in input order, so only about one part per rank (and per resumed run) is held at a time.
    Should the order jump about more than that, the least recently used parts beyond
    MAX_OPEN_PARTS are dropped and read again when needed."""

    def __init__(self, parts: list[Path], items: list[tuple[int, int]], ragged: list[str]):
        self.parts, self.items, self.ragged = parts, items, ragged
        self.left = np.bincount([p for p, _ in items], minlength=len(parts)) if items else np.zeros(0, int)
        self.open: dict[int, dict] = {}

    def dim(self) -> int:
        if not self.items:
            return 0
        return int(self._part(self.items[0][0])["clip"].shape[1])

    def _part(self, p: int) -> dict:
        if p in self.open:
            self.open[p] = self.open.pop(p)  # most recently used last
            return self.open[p]
        with np.load(self.parts[p]) as z:
            data = {k: z[k] for k in z.files}
        good = np.flatnonzero(data["error"] == "")
        data["good_paths"], data["good_duration"] = data["paths"][good], data["duration"][good]
        for name in self.ragged:
            data[f"{name}_start"] = np.concatenate([[0], np.cumsum(data[f"{name}_count"])])
        self.open[p] = data
        while len(self.open) > MAX_OPEN_PARTS:
            self.open.pop(next(iter(self.open)))
        return data

    def rows(self, a: int, b: int) -> dict[str, np.ndarray]:
        """Items a..b-1 as arrays: paths, duration, clip, NAME_data / NAME_count, frame_times."""
        cols: dict[str, list] = {"paths": [], "duration": [], "clip": []}
        for name in self.ragged:
            cols[f"{name}_data"], cols[f"{name}_count"] = [], []
        if "frame" in self.ragged:
            cols["frame_times"] = []
        for p, g in self.items[a:b]:
            z = self._part(p)
            cols["paths"].append(z["good_paths"][g])
            cols["duration"].append(z["good_duration"][g])
            cols["clip"].append(z["clip"][g])
            for name in self.ragged:
                s, e = z[f"{name}_start"][g], z[f"{name}_start"][g + 1]
                cols[f"{name}_data"].append(z[f"{name}_data"][s:e])
                cols[f"{name}_count"].append(e - s)
                if name == "frame":
                    cols["frame_times"].append(z["frame_times"][s:e])
            self.left[p] -= 1
            if not self.left[p]:
                self.open.pop(p, None)
        out = {
            "paths": np.array(cols["paths"], dtype=object),
            "duration": np.array(cols["duration"], dtype=np.float64),
            "clip": np.stack(cols["clip"]).astype(np.float32),
        }
        for name in self.ragged:
            out[f"{name}_data"] = np.concatenate(cols[f"{name}_data"]).astype(np.float32)
            out[f"{name}_count"] = np.array(cols[f"{name}_count"], dtype=np.int64)
        if "frame" in self.ragged:
            out["frame_times"] = np.concatenate(cols["frame_times"]).astype(np.float64)
        return out


def _append(ds: h5py.Dataset, values: np.ndarray) -> None:
    n = ds.shape[0]
    ds.resize(n + len(values), axis=0)
    ds[n:] = values


def finished_digest(out: str | Path) -> str | None:
    """The settings fingerprint a finished HDF5 output records (None: none, or not readable)."""
    try:
        with h5py.File(out, "r") as h5:
            value = h5.attrs.get(DIGEST)
    except (OSError, ValueError):
        return None
    return str(value) if value is not None else None
