"""Crash-safe HDF5 output for `sslam extract`.

Finished files go first to a journal of small part files next to the output (`OUT.parts/`), each
written to a temporary name and renamed, so a run killed at any moment (SIGKILL included) loses at
most the batch in flight. `--resume` reads the journal and skips what is there. At the end the parts
are merged, in input order, into `OUT` through a temporary file and an atomic rename, so `OUT` is
either absent, the previous complete file, or the new complete file.

HDF5 layout (N files written, M vectors):
  paths (N,) str; duration (N,) float64 seconds; clip (N, D) float32
  patch/data (M, D), patch/offsets (N+1,) int64
  frame/data (M, D), frame/offsets (N+1,) int64, frame/times (M,) float64 seconds
  errors/paths (E,) str, errors/reasons (E,) str
  attrs: settings of the run (checkpoint, sha256, config, sample_rate, target_length, ...)
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

from sslam_core.outputs import OutputError, atomic_write, output_error, write_text

STR = h5py.string_dtype("utf-8")
SETTINGS = "settings.json"


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


class StoreError(Exception):
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
    _parts: int = 0
    _last_flush: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.parts = self.out.with_name(self.out.name + ".parts")
        settings_json = json.dumps(self.settings, sort_keys=True, default=str)
        if self.resume and (self.parts / SETTINGS).exists():
            previous = (self.parts / SETTINGS).read_text()
            if previous != settings_json:
                raise StoreError(
                    f"{self.out}: cannot resume, the unfinished run used other settings "
                    f"(see {self.parts / SETTINGS}); run without --resume to start over"
                )
        else:
            shutil.rmtree(self.parts, ignore_errors=True)
            try:
                self.parts.mkdir(parents=True)
            except OSError as e:
                raise output_error(self.parts, e, "cannot create the journal folder") from e
            write_text(self.parts / SETTINGS, settings_json)
        self._parts = len(self._part_files())

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
        atomic_write(self.parts / f"part-{self._parts:06d}.npz", lambda tmp: np.savez(tmp, **arrays))
        self._parts += 1
        self._buffer, self._buffered = [], 0
        self._last_flush = time.monotonic()

    def finish(self, order: list[str]) -> tuple[int, list[tuple[str, str]]]:
        """Merge the journal into the HDF5 output, files in `order`; returns (written, errors)."""
        self.flush()
        rank = {p: i for i, p in enumerate(order)}
        items: list[tuple[int, Path, int, int]] = []  # (rank, part, row among good, row)
        errors: list[tuple[int, str, str]] = []
        for part in self._part_files():
            with np.load(part) as z:
                g = 0
                for row, (path, err) in enumerate(zip(z["paths"].tolist(), z["error"].tolist(), strict=True)):
                    if err:
                        errors.append((rank.get(path, len(rank)), path, err))
                    else:
                        items.append((rank.get(path, len(rank)), part, g, row))
                        g += 1
        items.sort(key=lambda t: t[0])
        errors.sort()
        self._check_space()

        def write(tmp: str) -> None:
            with h5py.File(tmp, "w") as h5:
                self._write(h5, items, errors)

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

    def _write(self, h5: h5py.File, items: list, errors: list) -> None:
        for key, value in self.settings.items():
            h5.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value, default=str)
        n = len(items)
        h5.create_dataset("paths", (n,), dtype=STR)
        h5.create_dataset("duration", (n,), dtype=np.float64)
        dim = None
        offsets = {g: [0] for g in ("patch", "frame") if g in self.granularities}
        cache: dict[Path, dict] = {}
        for i, (_, part, g, row) in enumerate(items):
            if part not in cache:
                cache.clear()
                with np.load(part) as z:
                    cache[part] = {k: z[k] for k in z.files}
                    for name in offsets:
                        cache[part][f"{name}_start"] = np.concatenate([[0], np.cumsum(z[f"{name}_count"])])
            z = cache[part]
            if dim is None:
                dim = z["clip"].shape[1]
                h5.create_dataset("clip", (n, dim), dtype=np.float32)
                for name in offsets:
                    h5.create_dataset(
                        f"{name}/data", (0, dim), maxshape=(None, dim), dtype=np.float32, chunks=(256, dim)
                    )
                if "frame" in offsets:
                    h5.create_dataset("frame/times", (0,), maxshape=(None,), dtype=np.float64, chunks=(4096,))
            h5["paths"][i] = z["paths"][row]
            h5["duration"][i] = z["duration"][row]
            h5["clip"][i] = z["clip"][g]
            for name, offs in offsets.items():
                a, b = z[f"{name}_start"][g], z[f"{name}_start"][g + 1]
                _append(h5[f"{name}/data"], z[f"{name}_data"][a:b])
                if name == "frame":
                    _append(h5["frame/times"], z["frame_times"][a:b])
                offs.append(offs[-1] + int(b - a))
        if dim is None:
            h5.create_dataset("clip", (0, 0), dtype=np.float32)
            if "frame" in offsets:
                h5.create_dataset("frame/times", (0,), dtype=np.float64)
        for name, offs in offsets.items():
            if dim is None:
                h5.create_dataset(f"{name}/data", (0, 0), dtype=np.float32)
            h5.create_dataset(f"{name}/offsets", data=np.array(offs, dtype=np.int64))
        h5.create_dataset("errors/paths", data=np.array([p for _, p, _ in errors], dtype=object), dtype=STR)
        h5.create_dataset("errors/reasons", data=np.array([e for _, _, e in errors], dtype=object), dtype=STR)


def _append(ds: h5py.Dataset, values: np.ndarray) -> None:
    n = ds.shape[0]
    ds.resize(n + len(values), axis=0)
    ds[n:] = values
