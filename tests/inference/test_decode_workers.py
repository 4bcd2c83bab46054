"""Decoding in worker processes: the same results as in line, each file's errors its own, workers that
die or are left behind by an early end."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import DATA, TINY_PRETRAIN, child_pids

from sslam_core.audio.files import AudioSource
from sslam_core.inference.options import PipelineOptions
from sslam_core.inference.pipeline import feature_head, run_windows
from sslam_core.inference.windows import Shifted
from sslam_core.models.transformer import Encoder, preset
from sslam_core.runs.interrupts import StopRequest

MAIN = os.getpid()


class Tone:
    """A self-decoding source (an `AudioSource`); with `fail`, decoding it in a worker process raises,
    kills the worker with SIGKILL or ends it with os._exit(3) ("raise", "kill", "exit")."""

    def __init__(self, name: str, seconds: float = 1.3, fail: str | None = None):
        self.name, self.length, self.fail = name, seconds, fail

    def seconds(self) -> float:
        return self.length

    def blocks(self, block_seconds: float):
        if self.fail == "raise":
            raise RuntimeError("no such member\nsecond line")
        if self.fail and os.getpid() != MAIN:  # never kill the test process itself
            if self.fail == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(3)
        t = torch.arange(int(self.length * 16000)) / 16000
        yield (0.3 * torch.sin(2 * torch.pi * 440 * t)).float()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Encoder(preset("tiny", depth=1)).eval()


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: with more, oneMKL may split the model's matmuls differently from one batch
    to the next on a loaded machine, whatever decodes the files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    """Real recordings and generated wavs at several rates, channel counts and lengths."""
    folder = tmp_path_factory.mktemp("wavs")
    rng = np.random.default_rng(0)
    paths = [str(DATA / "real_32k.wav"), str(DATA / "typing_stereo_48k.flac"), str(DATA / "robin.ogg")]
    for i, (sr, channels, seconds) in enumerate([(8000, 1, 0.4), (44100, 2, 3.1), (16000, 1, 2.0)]):
        path = folder / f"gen{i}.wav"
        sf.write(path, (0.1 * rng.standard_normal((int(sr * seconds), channels))).astype(np.float32), sr)
        paths.append(str(path))
    return paths


def run(model, sources, stop=None, names=None, **options):
    options = {"target_length": 128, "hop": 96, "batch_size": 3, **options}
    head = feature_head(model, keep=("clip", "frame"))
    return run_windows(model, sources, head, PipelineOptions(**options), stop=stop, names=names)


def same(a, b) -> None:
    assert [r.path for r in a] == [r.path for r in b]
    for x, y in zip(a, b, strict=True):
        assert (x.error, x.duration, x.frames, x.starts) == (y.error, y.duration, y.frames, y.starts)
        for name in x.outputs:
            assert all(torch.equal(u, v) for u, v in zip(x.outputs[name], y.outputs[name], strict=True))


def test_worker_processes_equal_in_line_decoding_bit_for_bit(model, files):
    wave, sr = sf.read(files[3], dtype="float32")
    sources = [
        *files,
        (torch.from_numpy(wave), sr),
        Shifted(files[4], 7),
        Tone("tone"),
        Shifted(Tone("t2"), 3),
    ]
    assert isinstance(sources[-2], AudioSource)
    in_line = list(run(model, sources, workers=0))
    assert all(r.error is None for r in in_line) and max(len(r.starts) for r in in_line) > 1
    same(list(run(model, sources, workers=2)), in_line)  # processes
    same(list(run(model, sources, workers=2, processes=False)), in_line)  # threads
    same(
        list(run(model, sources, workers=1, batch_size=2)), list(run(model, sources, workers=0, batch_size=2))
    )
    assert child_pids() == []


def test_each_files_errors_stay_its_own_in_a_worker(model, files, tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really a wave file")
    sf.write(tmp_path / "short.wav", np.zeros(100, np.float32), 16000)
    bad = [str(tmp_path / "junk.wav"), str(tmp_path / "missing.wav"), str(tmp_path / "short.wav")]
    sources = [files[0], *bad, Tone("member", fail="raise"), files[3]]
    results = list(run(model, sources, workers=2))
    assert [r.error is None for r in results] == [True, False, False, False, False, True]
    for r in results[1:5]:
        assert r.error.startswith(f"{r.path}: ") and "\n" not in r.error
    assert "too short" in results[3].error
    assert results[4].error == "member: RuntimeError: no such member"
    same([results[0], results[5]], list(run(model, [files[0], files[3]], workers=0)))


def test_a_worker_that_dies_costs_only_its_file(model, files):
    sources = [files[0], Tone("killed", fail="kill"), files[3], Tone("exited", fail="exit"), *files[4:]]
    results = list(run(model, sources, workers=2))
    assert results[1].error == "killed: its decoding process was killed by SIGKILL"
    assert results[3].error == "exited: its decoding process exited unexpectedly (status 3)"
    good = [r for r in results if r.error is None]
    same(good, list(run(model, [files[0], files[3], *files[4:]], workers=0)))
    assert child_pids() == []


def test_early_close_and_errors_leave_no_process_behind(model, files):
    results = run(model, files * 4, workers=2)
    next(results)
    assert len(child_pids()) == 2
    results.close()
    assert child_pids() == [] and multiprocessing.active_children() == []
    with pytest.raises(KeyError):
        for _ in run(model, files * 4, workers=2):
            raise KeyError("the consumer failed")
    assert child_pids() == []


@pytest.mark.distributed
def test_stop_requests_end_the_run_and_workers_leave_signals_to_it(model, files):
    done = []
    for r in run(model, files * 4, workers=2, stop=lambda: bool(done)):
        done.append(r)
    assert 1 <= len(done) < len(files * 4) and child_pids() == []
    with StopRequest() as request:
        got = []
        for r in run(model, files * 3, workers=2, stop=lambda: request.requested):
            got.append(r)
            if len(got) == 1:
                for pid in child_pids():  # the workers ignore a first SIGINT / SIGTERM ...
                    os.kill(pid, signal.SIGTERM)
                    os.kill(pid, signal.SIGINT)
            if len(got) == 3:
                os.kill(os.getpid(), signal.SIGINT)  # ... the main process decides
    assert request.signum == signal.SIGINT and 3 <= len(got) < len(files * 3)
    assert all(r.error is None for r in got) and child_pids() == []


@pytest.mark.slow
@pytest.mark.distributed
def test_workers_exit_when_the_main_process_is_killed(files, tmp_path):
    code = (
        "import sys, torch\n"
        "from sslam_core.inference.options import PipelineOptions\n"
        "from sslam_core.inference.pipeline import feature_head, run_windows\n"
        "from sslam_core.models.transformer import Encoder, preset\n"
        "m = Encoder(preset('tiny', depth=1)).eval()\n"
        "o = PipelineOptions(target_length=128, workers=2)\n"
        "for r in run_windows(m, sys.argv[1:] * 500, feature_head(m), o):\n"
        "    print('result', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, *files], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "result\n"
        workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(workers) == 2
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers)


def alive(pid: int) -> bool:
    """Running, not ended (a zombie waiting for init to reap it counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.distributed
def test_sigkill_to_a_worker_mid_run_costs_at_most_its_file(tmp_path):
    """A real `sslam extract --workers 2` over many files, one of its decoding processes SIGKILLed from
    outside in the middle of the run: the run goes on to the end, every other file is written, and
    the killed process's file (if it held one) is one `skipped:` line naming the signal. It used to
    stop the whole run at once, silently, with exit status 1."""
    folder = tmp_path / "clips"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(400):
        sf.write(folder / f"c{i:03d}.wav", (0.1 * rng.standard_normal(4000)).astype(np.float32), 8000)
    out = tmp_path / "out.h5"
    cmd = [sys.executable, "-m", "sslam_cli", "extract", str(folder), "-c", TINY_PRETRAIN, "-o", str(out)]
    proc = subprocess.Popen([*cmd, "--workers", "2", "--flush-every", "1"], stderr=subprocess.PIPE, text=True)
    parts = tmp_path / "out.h5.parts"
    deadline = time.monotonic() + 120
    while len(list(parts.glob("part-*.npz"))) < 20 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)  # wait for the run to be well under way
    workers = child_pids(proc.pid)
    assert proc.poll() is None and workers, "the run ended before a worker could be killed"
    os.kill(workers[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    skipped = [line for line in stderr.splitlines() if line.startswith("skipped:")]
    assert len(skipped) <= 1 and all("killed by SIGKILL" in line for line in skipped), stderr
    assert proc.returncode == (1 if skipped else 0), stderr
    import h5py

    with h5py.File(out) as h5:
        assert len(h5["paths"]) + len(skipped) == 400
    assert child_pids(proc.pid) == []
