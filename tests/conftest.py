"""Shared test helpers: a real small file system for the full-disk and read-only tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "64k") mounted at `path` (created) for the block; the test is skipped
    where mounting needs a root this machine does not give. Always unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        )
    except OSError:
        pytest.skip("no mount command")
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path, name: str = "filler") -> Path:
    """Fill the file system holding `folder` to its last page with one file."""
    filler = folder / name
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 1024)
    return filler


@pytest.fixture()
def tmpfs(tmp_path):
    """`tmpfs(size, name="disk")`: a context manager mounting a tmpfs under the test's folder."""
    return lambda size, name="disk": mounted_tmpfs(tmp_path / name, size)


def child_pids(parent: int | None = None) -> list[int]:
    """Pids of the child processes of `parent` (default: this process), zombies included, read from
    /proc (not from multiprocessing, which knows only the children it started)."""
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry))
    return found
