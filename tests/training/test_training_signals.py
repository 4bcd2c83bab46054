"""Real signals to real `sslam pretrain` / `sslam finetune` processes: the run saves at the next step,
exits with 143 / 130 / 143, and `--resume` ends on the same weights as an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DATA, ROOT
from safetensors.torch import load_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PRETRAIN = ["pretrain", str(DATA / "polydigits" / "audio"), str(DATA / "real_32k.wav"), "--model", "tiny"]
PRETRAIN += ["--batch-size", "2", "--target-length", "256", "--clone-batch", "2", "--device", "cpu"]
PRETRAIN += ["--log-every", "1", "--save-every", "100", "--steps", "12", "--seed", "3"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sslam_cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=300,
    )


def interrupt(args: list[str], out: Path, signum: int, group: bool, after: int = 2):
    """Start the command, send `signum` once metrics.jsonl shows step `after` (to the whole process group,
    DataLoader workers included, as Ctrl-C or a scheduler does, when `group`), and wait for it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sslam_cli", *args, "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV, start_new_session=True,
    )  # fmt: skip
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if any(json.loads(s).get("step", 0) >= after for s in lines if s.strip()):
            break
        time.sleep(0.02)
    (os.killpg if group else os.kill)(proc.pid, signum)
    stdout, stderr = proc.communicate(timeout=240)
    return proc.returncode, stdout, stderr


def same_file_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def whole_pretrain(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    proc = run(*PRETRAIN, "--workers", "1", "-o", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name, code, group", [("SIGTERM", 143, False), ("SIGUSR1", 143, True)])
def test_pretrain_signal_saves_and_resume_is_bit_identical(tmp_path, whole_pretrain, name, code, group):
    out = tmp_path / "run"
    rc, stdout, stderr = interrupt([*PRETRAIN, "--workers", "1"], out, getattr(signal, name), group)
    assert rc == code, stderr
    m = re.search(r"interrupted at step (\d+); rerun with --resume to continue", stderr)
    assert m and "Traceback" not in stderr, stderr
    step = int(m.group(1))
    assert 2 <= step < 12
    report = json.loads(stdout.strip())  # stdout: the JSON summary only
    assert (report["interrupted"], report["steps"]) == (name, step)
    assert torch.load(out / "state.pt", weights_only=True)["step"] == step
    resumed = run("pretrain", "-o", str(out), "--resume", "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.splitlines()[-1])["steps_this_run"] == 12 - step
    same_file_weights(whole_pretrain / "model.safetensors", out / "model.safetensors")


@pytest.mark.slow
@pytest.mark.distributed
def test_finetune_ctrl_c_saves_and_resume_is_bit_identical(tmp_path):
    from sslam_core.models.layouts.native import save_checkpoint
    from sslam_core.models.transformer import Encoder, ModelConfig

    cfg = ModelConfig(embed_dim=64, depth=2, num_heads=2, max_length=16)
    torch.manual_seed(0)
    ckpt = tmp_path / "encoder.safetensors"
    save_checkpoint(ckpt, cfg, Encoder(cfg).state_dict())
    args = ["finetune", "--data", str(DATA / "fsdd_mini"), "-c", str(ckpt), "--steps", "400", "-b", "4"]
    args += ["--target-length", "64", "--workers", "1", "--device", "cpu", "--seed", "1", "-q"]
    whole = run(*args, "-o", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "run"
    rc, stdout, stderr = interrupt(args, out, signal.SIGINT, group=True)
    assert rc == 130, stderr
    step = json.loads(stdout.strip())["steps"]
    assert f"interrupted at step {step}; rerun with --resume to continue" in stderr and step < 400
    resumed = run(*args, "-o", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.splitlines()[-1])["steps"] == 400
    same_file_weights(tmp_path / "whole" / "model.safetensors", out / "model.safetensors")
