"""Turning command-line inputs (files, folders, lists, manifests) into audio paths and stored names."""

from __future__ import annotations

import os
from pathlib import Path

from sslam_core.datasets import list_audio

LIST_SUFFIXES = (".txt", ".lst", ".tsv")


def collect_inputs(inputs: list[str]) -> list[tuple[str, str]]:
    """(path to read, name to report) for every audio file under `inputs`, in a stable order.

    Audio files keep the path as given (even when unreadable: decoding reports why); folders are
    searched recursively by extension and their files named relative to the folder; `.txt`/`.lst`
    file lists and `.tsv` manifests are expanded. Duplicates are dropped.
    """
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for item in inputs:
        root = Path(item)
        listed = root.is_dir() or (root.is_file() and root.suffix.lower() in LIST_SUFFIXES)
        for path in list_audio([item]) if listed else [item]:
            name = os.path.relpath(path, root) if root.is_dir() else path
            key = os.path.abspath(path)
            if key not in seen:
                seen.add(key)
                out.append((path, name))
    return out
