"""An `sslam extract` HDF5 file read as a searchable store of unit vectors.

A clip store holds one vector per file (`clip`); a frame store one per 160 ms step (`frame/data`, with
`frame/offsets` giving each file's rows and `frame/times` their start). `EmbeddingStore` reads the rows a
search needs chunk by chunk, names the file (and for frames the start and end) of any row, and gives a
fingerprint of its first rows, which tells an index built from them whether the store still holds them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from sslam_core.errors import SslamError

GRANULARITIES = ("clip", "frame")
SETTINGS = ("checkpoint", "checkpoint_sha256", "teacher", "model_config", "target_length", "window", "hop",
            "layer", "normalization", "frame_hop")  # fmt: skip
FINGERPRINT_SAMPLES = 4096  # rows hashed (evenly spread) besides the file names and the settings


class SearchError(SslamError, ValueError):
    """A store, an index or a query that cannot be searched; the message names it and says why."""


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32), so that dot products are cosines; zero rows stay zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class Hit:
    """Where a store row comes from: its file and, for frame rows, the segment in seconds."""

    path: str
    start: float | None
    end: float | None


class EmbeddingStore:
    """An `sslam extract` file opened for search at one granularity (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, granularity: str | None = None):
        self.path = Path(path)
        self._file = _open(self.path)
        try:
            self._check_layout()
            self.attrs = {k: _plain(v) for k, v in self._file.attrs.items()}
            self.granularity = self._pick(granularity)
            self.paths = [p.decode() if isinstance(p, bytes) else str(p) for p in self._file["paths"][()]]
            if self.granularity == "clip":
                self._data = self._file["clip"]
                self.offsets = np.arange(len(self.paths) + 1, dtype=np.int64)
                self.times = None
            else:
                self._data = self._file["frame/data"]
                self.offsets = np.asarray(self._file["frame/offsets"][()], dtype=np.int64)
                self.times = np.asarray(self._file["frame/times"][()], dtype=np.float64)
        except BaseException:
            self._file.close()
            raise
        self.rows, self.dim = int(self._data.shape[0]), int(self._data.shape[1])
        if self.rows == 0:
            self._file.close()
            raise SearchError(
                f"{self.path}: the store holds no {self.granularity} vectors (no file was written)"
            )

    # -- opening ------------------------------------------------------------------------------------------

    def _check_layout(self) -> None:
        if "paths" not in self._file or "clip" not in self._file:
            raise SearchError(f"{self.path}: an HDF5 file, but not an embedding store of `sslam extract` "
                              "(no 'paths' and 'clip' datasets)")  # fmt: skip

    def _pick(self, granularity: str | None) -> str:
        has_frames = "frame" in self._file and "data" in self._file["frame"]
        if granularity is None:
            return "frame" if has_frames else "clip"
        if granularity not in GRANULARITIES:
            raise SearchError(f"granularity {granularity!r}: choose clip or frame")
        if granularity == "frame" and not has_frames:
            made = self.attrs.get("granularity", "clip")
            raise SearchError(f"{self.path}: the store holds no frame vectors (extracted with --granularity "
                              f"{made}); search it with --granularity clip, or extract with --granularity "
                              "frame")  # fmt: skip
        return granularity

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what it holds --------------------------------------------------------------------------------------

    @property
    def settings(self) -> dict:
        """How the vectors were made (checkpoint, layer, window, normalisation, ...), from the attributes."""
        return {k: self.attrs[k] for k in SETTINGS if k in self.attrs}

    @property
    def files(self) -> int:
        return len(self.paths)

    def chunks(self, start: int = 0, rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, unit vectors) of consecutive blocks of rows from `start`."""
        for first in range(start, self.rows, rows):
            yield first, unit_rows(self._data[first : min(first + rows, self.rows)])

    def vectors(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Unit vectors of `rows` (all rows when None)."""
        if rows is None:
            return unit_rows(self._data[()])
        unique, where = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        return unit_rows(self._data[unique])[where]  # h5py reads sorted, distinct rows

    def file_of(self, rows: np.ndarray) -> np.ndarray:
        """The file index of each row."""
        return np.searchsorted(self.offsets, np.asarray(rows, dtype=np.int64), side="right") - 1

    def hit(self, row: int) -> Hit:
        """The file and segment a row comes from. A frame row's segment is its step: from its start time
        to the next step of the same pass (the frame hop, 0.16 s unless extracted with --frame-hop)."""
        path = self.paths[int(self.file_of(np.array([row]))[0])]
        if self.times is None:
            return Hit(path, None, None)
        start = float(self.times[row])
        step = float(self.attrs.get("frame_hop") or 0.16)
        return Hit(path, round(start, 6), round(start + step, 6))

    def fingerprint(self, rows: int | None = None) -> str:
        """A digest of the first `rows` rows (all by default): the settings, the granularity, the names of
        the files they come from and an even sample of the vectors themselves. Equal digests mean an index
        of those rows still describes this store."""
        rows = self.rows if rows is None else rows
        files = int(self.file_of(np.array([rows - 1]))[0]) + 1 if rows else 0
        h = hashlib.sha256()
        h.update(
            json.dumps(
                [self.granularity, self.dim, rows, self.settings], sort_keys=True, default=str
            ).encode()
        )
        for name in self.paths[:files]:
            h.update(name.encode() + b"\0")
        sample = np.unique(np.linspace(0, rows - 1, min(rows, FINGERPRINT_SAMPLES)).astype(np.int64))
        if len(sample):
            h.update(np.ascontiguousarray(self._data[sample], dtype=np.float32).tobytes())
        return h.hexdigest()


def _open(path: Path) -> h5py.File:
    if not path.exists():
        parts = Path(f"{path}.parts")
        if parts.is_dir():
            raise SearchError(f"{path}: not finished ({parts} holds an interrupted extract); finish it with "
                              "`sslam extract ... --resume`")  # fmt: skip
        raise SearchError(f"{path}: no such file")
    if path.is_dir():
        raise SearchError(f"{path}: a folder, not an embedding store (.h5)")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        reason = "not an HDF5 file" if not h5py.is_hdf5(path) else f"cannot be read ({err})"
        raise SearchError(f"{path}: {reason}") from None


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


__all__ = ["EmbeddingStore", "Hit", "SearchError", "GRANULARITIES", "unit_rows"]
