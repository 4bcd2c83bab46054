"""Shared test helpers: the fixture paths, one in-process and one subprocess runner of the `sslam`
command, a free port, real child processes, and a real small file system for full-disk tests.

Markers: `slow` (a test of more than a few seconds on the 2-core CI machine) and `distributed`
(several processes under torchrun, or signals sent to real processes). `pytest -m "not slow and not
distributed"` is the fast suite, about a minute; CI runs everything.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
DATA = TESTS / "data"  # real, licensed audio and label files (data/LICENSES.md)
FIXTURES = TESTS / "fixtures"
CHECKPOINTS = FIXTURES / "checkpoints"
TINY_FINETUNED = str(CHECKPOINTS / "tiny_finetuned.pt")  # fairseq layout, 527 AudioSet classes
TINY_PRETRAIN = str(CHECKPOINTS / "tiny_pretrain.pt")  # fairseq layout, student + EMA teacher + decoder


def tiny_config():
    """The small encoder config the training tests build (2 blocks x 64, 16 time patches at most)."""
    from sslam_core.models.transformer import ModelConfig

    return ModelConfig(embed_dim=64, depth=2, num_heads=2, max_length=16)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A seeded random 'pre-trained' encoder checkpoint of `tiny_config()` in our format."""
    import torch

    from sslam_core.models.layouts.native import save_checkpoint
    from sslam_core.models.transformer import Encoder

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "encoder.safetensors"
    save_checkpoint(path, tiny_config(), Encoder(tiny_config()).state_dict(), normalization=(-5.0, 4.0))
    return path


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory) -> Iterator[None]:
    """Caches the commands keep (int8 models, precision checks) go to a folder of the test session, not
    the user's ~/.cache: SSLAM_CACHE, inherited by the processes the tests start. A test may set its own."""
    saved = os.environ.get("SSLAM_CACHE")
    os.environ["SSLAM_CACHE"] = str(tmp_path_factory.mktemp("sslam-cache"))
    yield
    if saved is None:
        os.environ.pop("SSLAM_CACHE", None)
    else:
        os.environ["SSLAM_CACHE"] = saved


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds on the 2-core CI machine")
    config.addinivalue_line("markers", "distributed: several processes (torchrun) or real signals")


def sslam(*args, code: int = 0, env: dict[str, str] | None = None):
    """Run `sslam ARGS` in this process (click's runner); the exit status must be `code` and no
    traceback may reach stderr. Returns the result (`.stdout`, `.stderr`, `.exit_code`)."""
    from typer.testing import CliRunner

    from sslam_cli.main import app

    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.stderr
    return result


def sslam_process(
    *args,
    check: int | None = 0,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    torchrun: int = 0,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Run `python -m sslam_cli ARGS` as a real process (signals, exit statuses, stdout as a pipe), or
    under `torchrun --nproc_per_node TORCHRUN`; with `check`, its exit status must be that."""
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(torchrun)]
        launcher += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    proc = subprocess.run(
        [*launcher, "-m", "sslam_cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check is not None:
        assert proc.returncode == check, proc.stderr[-3000:]
    return proc


def free_port() -> int:
    """A TCP port free on this machine now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
