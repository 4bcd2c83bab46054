"""Packed training audio (`sslam pack`): a folder of HDF5 shards of 16 kHz int16 clips, read by offset.

Format: a folder with `index.json` and shards `shard-00000.h5`, each holding `audio` (M,) int16 at
16 kHz (all clips concatenated), `offsets` (n + 1,) int64 and `paths` (n,) utf-8, attribute
sample_rate = 16000. A shard whose sources are unchanged (same digest) is kept when packing again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from sslam_core.audio.constants import SAMPLE_RATE
from sslam_core.audio.decode import load_audio
from sslam_core.audio.files import AudioError
from sslam_core.errors import OptionError, SslamError

PACKED_FORMAT = "sslam-packed"

INDEX_NAME = "index.json"


class PackedDataError(SslamError):
    """A packed-audio folder or shard that cannot be read; the message names the file and why."""


def read_index(folder: str | os.PathLike) -> dict:
    """A packed folder's index.json, checked."""
    path = Path(folder) / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PackedDataError(f"{path}: cannot read packed-audio index ({err})") from err
    if index.get("format") != PACKED_FORMAT or index.get("sample_rate") != SAMPLE_RATE:
        raise PackedDataError(f"{path}: not an sslam packed-audio index at {SAMPLE_RATE} Hz")
    return index


def read_offsets(path: Path) -> np.ndarray:
    try:
        with h5py.File(path, "r") as f:
            offsets = f["offsets"][:].astype(np.int64)
            if len(offsets) != len(f["paths"]) + 1 or offsets[-1] != len(f["audio"]):
                raise PackedDataError(f"{path}: offsets do not match paths and audio")
            return offsets
    except (OSError, KeyError) as err:
        raise PackedDataError(f"{path}: cannot read shard ({err})") from err


def is_packed(path: str | os.PathLike) -> bool:
    """A folder holding index.json is a packed dataset."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, INDEX_NAME))


@dataclass
class PackReport:
    """What `pack_audio` did: clips and samples in the index, shards written or reused, inputs skipped."""

    clips: int = 0
    samples: int = 0
    shards_written: int = 0
    shards_reused: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def quantize(wave: torch.Tensor | np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1) -> int16 (x 32768, rounded, clipped)."""
    x = np.asarray(wave, dtype=np.float32)
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


def sources_digest(paths: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(paths).encode()).hexdigest()


def _decode(path: str) -> tuple[str, np.ndarray | None, str]:
    try:
        return path, quantize(load_audio(path, SAMPLE_RATE)), ""
    except AudioError as err:
        return path, None, err.reason


def reusable_shard(path: Path, digest: str) -> dict | None:
    """A finished shard made from the same inputs: its index entry and skipped list, else None."""
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("sources_sha1") != digest:
                return None
            return {
                "clips": len(f["paths"]),
                "samples": len(f["audio"]),
                "skipped": json.loads(f.attrs["skipped"]),
            }
    except (OSError, KeyError, json.JSONDecodeError):
        return None


def _write_shard(path: Path, sources: Sequence[str], digest: str, pool: ThreadPoolExecutor, bar) -> dict:
    """Decode `sources` (in order) into one shard file, written under a temporary name then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    offsets, names, skipped = [0], [], []
    with h5py.File(tmp, "w") as f:
        audio = f.create_dataset("audio", shape=(0,), maxshape=(None,), dtype=np.int16, chunks=(1 << 16,))
        for source, samples, reason in pool.map(_decode, sources):
            bar.update(1)
            if samples is None:
                skipped.append([source, reason])
                continue
            audio.resize((offsets[-1] + len(samples),))
            audio[offsets[-1] :] = samples
            offsets.append(offsets[-1] + len(samples))
            names.append(source)
        f.create_dataset("offsets", data=np.asarray(offsets, dtype=np.int64))
        f.create_dataset("paths", data=names, dtype=h5py.string_dtype("utf-8"))
        f.attrs["sample_rate"] = SAMPLE_RATE
        f.attrs["sources_sha1"] = digest
        f.attrs["skipped"] = json.dumps(skipped)
    os.replace(tmp, path)
    return {"clips": len(names), "samples": offsets[-1], "skipped": skipped}


def pack_audio(
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    shard_size: int = 1000,
    num_workers: int = 2,
    progress: bool = True,
) -> PackReport:
    """Decode audio files to 16 kHz int16 shards of `shard_size` inputs plus index.json.

    Re-running with the same inputs skips shards that are already finished; unreadable inputs are
    left out and listed in the report and in index.json.
    """
    if shard_size < 1:
        raise OptionError(f"shard size must be at least 1, got {shard_size}")
    sources = [os.fspath(p) for p in paths]
    if not sources:
        raise OptionError("no audio files to pack")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report, entries = PackReport(), []
    bar = tqdm(total=len(sources), disable=not progress, unit="file", desc="pack")
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        for k, first in enumerate(range(0, len(sources), shard_size)):
            chunk = sources[first : first + shard_size]
            name, digest = f"shard-{k:05d}.h5", sources_digest(chunk)
            done = reusable_shard(out / name, digest)
            if done is not None:
                report.shards_reused += 1
                bar.update(len(chunk))
            else:
                done = _write_shard(out / name, chunk, digest, pool, bar)
                report.shards_written += 1
            entries.append({"file": name, "clips": done["clips"], "samples": done["samples"]})
            report.clips += done["clips"]
            report.samples += done["samples"]
            report.skipped += [tuple(s) for s in done["skipped"]]
    bar.close()
    index = {
        "format": PACKED_FORMAT,
        "version": 1,
        "sample_rate": SAMPLE_RATE,
        "clips": report.clips,
        "samples": report.samples,
        "shards": entries,
        "skipped": [{"path": p, "reason": r} for p, r in report.skipped],
    }
    tmp = out / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, out / INDEX_NAME)
    return report


__all__ = [
    "INDEX_NAME",
    "PACKED_FORMAT",
    "PackReport",
    "PackedDataError",
    "is_packed",
    "pack_audio",
    "quantize",
    "read_index",
    "read_offsets",
    "reusable_shard",
    "sources_digest",
]
