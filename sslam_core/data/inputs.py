"""Turning command-line inputs (files, folders, lists, manifests, tar shards) into sources and names."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sslam_core.audio.files import printable
from sslam_core.audio.tar import ShardSource, TarMember, Unreadable
from sslam_core.data.datasets import list_audio, read_file_list
from sslam_core.data.label_formats import DatasetError
from sslam_core.data.shards import is_shard_spec, shard_sources

LIST_SUFFIXES = (".txt", ".lst", ".tsv")


@dataclass
class Inputs:
    """The audio to run, as (source to read, name to report), and one line for every input that named
    no audio at all (an empty folder, an unreadable list); those are skipped, not fatal. A source is
    a path, or a `shards.TarMember` / `shards.Unreadable` for the clips of tar shards."""

    files: list[tuple[str | ShardSource, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def paths(self) -> list[str | ShardSource]:
        """The sources, in order (what `inference.run_windows` takes)."""
        return [p for p, _ in self.files]

    @property
    def names(self) -> list[str]:
        return [n for _, n in self.files]


def _absolute(source: str | ShardSource) -> str:
    """A name that tells apart two sources of the same name: the absolute path (of the shard)."""
    if isinstance(source, TarMember):
        return f"{os.path.abspath(source.shard)}/{source.member}"
    return source.name if isinstance(source, Unreadable) else os.path.abspath(source)


def collect_inputs(inputs: list[str], audio_dir: str | None = None) -> Inputs:
    """Every audio file under `inputs`, in a stable order, each named so that the name identifies it.

    Audio files keep the path as given (even when missing or unreadable: decoding reports why, file by
    file). Folders are searched recursively by extension; `.txt`/`.lst` file lists and `.tsv` fairseq
    manifests (root folder overridden by `audio_dir`) are expanded, their missing entries kept for
    decoding to report. Tar shards (`.tar` paths, brace patterns, `.txt` shard lists; see
    `sslam_core.data.shards`) give their audio members, in shard then member order, named
    `SHARD.tar/MEMBER`; their problems are kept for decoding to report, like missing files. Names: with
    a single folder or manifest as the only input, relative to it (as the official manifests name
    clips); otherwise the path as given, so that `a/x.wav` and `b/x.wav` stay apart. Files reached
    twice are kept once.
    """
    found: list[tuple[str | ShardSource, str]] = []  # (source, name relative to its input)
    problems: list[str] = []
    for item in inputs:
        root = Path(item)
        try:
            if is_shard_spec(item):
                found += [(s, s.name) for s in shard_sources(item)]
            elif root.is_dir():
                found += [(p, os.path.relpath(p, item)) for p in list_audio([item])]
            elif root.is_file() and root.suffix.lower() in LIST_SUFFIXES:
                base, paths = read_file_list(item, audio_dir, missing_ok=True)
                relative = root.suffix.lower() == ".tsv"
                found += [(p, os.path.relpath(p, base) if relative else p) for p in paths]
            else:
                found.append((item, item))
        except (DatasetError, OSError, UnicodeDecodeError) as e:
            problems.append(str(e) if item in str(e) else f"{item}: {e}")
    relative = len(inputs) == 1 and (Path(inputs[0]).is_dir() or inputs[0].lower().endswith(".tsv"))
    seen: set[str] = set()
    files: list[tuple[str | ShardSource, str]] = []
    for source, name in found:
        key = _absolute(source)
        if key not in seen:
            seen.add(key)
            named = isinstance(source, str) and not relative
            files.append((source, source if named else name))
    counts = Counter(n for _, n in files)
    files = [(p, printable(_absolute(p) if counts[n] > 1 else n)) for p, n in files]
    return Inputs(files, problems)
