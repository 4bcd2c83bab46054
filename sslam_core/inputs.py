"""Turning command-line inputs (files, folders, lists, manifests) into audio paths and stored names."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sslam_core.datasets import DatasetError, list_audio, read_file_list

LIST_SUFFIXES = (".txt", ".lst", ".tsv")


@dataclass
class Inputs:
    """The audio files to run, as (path to read, name to report), and one line for every input that
    named no audio at all (an empty folder, an unreadable list); those are skipped, not fatal."""

    files: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.files]

    @property
    def names(self) -> list[str]:
        return [n for _, n in self.files]


def collect_inputs(inputs: list[str], audio_dir: str | None = None) -> Inputs:
    """Every audio file under `inputs`, in a stable order, each named so that the name identifies it.

    Audio files keep the path as given (even when missing or unreadable: decoding reports why, file by
    file). Folders are searched recursively by extension; `.txt`/`.lst` file lists and `.tsv` fairseq
    manifests (root folder overridden by `audio_dir`) are expanded, their missing entries kept for
    decoding to report. Names: with a single folder or manifest as the only input, relative to it (as
    the official manifests name clips); otherwise the path as given, so that `a/x.wav` and `b/x.wav`
    stay apart. Files reached twice are kept once.
    """
    found: list[tuple[str, str]] = []  # (path to read, name relative to its input)
    problems: list[str] = []
    for item in inputs:
        root = Path(item)
        try:
            if root.is_dir():
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
    files: list[tuple[str, str]] = []
    for path, name in found:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            files.append((path, name if relative else path))
    counts = Counter(n for _, n in files)
    files = [(p, printable(os.path.abspath(p) if counts[n] > 1 else n)) for p, n in files]
    return Inputs(files, problems)


def printable(name: str) -> str:
    """`name` as valid UTF-8 text: bytes of a file name that are not UTF-8 (held by Python as lone
    surrogates) become `\\xNN` escapes, so that the name can be printed, written to JSON / CSV and
    stored in HDF5; the file itself is still read by its real path."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
