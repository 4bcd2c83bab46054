"""`sslam eval` through the real CLI: argument checks before any work, outputs never replaced unasked
and written atomically, write failures as one line, missing clips, exit statuses, signals, tables."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, fill, sslam

from sslam_core.evaluation.classification import Predictions
from sslam_core.models.layouts.native import save_checkpoint
from sslam_core.models.transformer import ModelConfig, build_model

FINETUNED = str(ROOT / "tests" / "fixtures" / "checkpoints" / "tiny_finetuned.pt")
DIGITS = ROOT / "tests" / "data" / "polydigits" / "audio"
LABELS = [("1", "one"), ("3", "three"), ("0", "zero"), ("9", "nine")]


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random multi-class classifier over four digit classes; at most 1024 input frames."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(embed_dim=32, depth=1, num_heads=2, max_length=64, num_classes=4))
    path = tmp_path_factory.mktemp("ckpt") / "digits.safetensors"
    save_checkpoint(path, model.cfg, model.state_dict(), labels=LABELS, extra={"multilabel": False})
    return path


def labelled_set(folder: Path, rows: list[tuple[str, str]], broken: bool = False) -> Path:
    """labels.csv over copies of the polydigits clips (`broken` adds a corrupt first file)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["filename,labels"]
    if broken:
        (folder / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
        lines.append("broken.wav,one")
    for name, label in rows:
        if not (folder / name).exists() and (DIGITS / name).exists():
            shutil.copy(DIGITS / name, folder / name)
        lines.append(f"{name},{label}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture()
def data(tmp_path) -> Path:
    rows = [("train_00000.wav", "nine"), ("train_00002.wav", "three"), ("train_00015.wav", "one")]
    return labelled_set(tmp_path / "set", rows + [("gone_1.wav", "one"), ("gone_2.wav", "zero")])


def run_args(checkpoint, data) -> list:
    return ["eval", "-c", checkpoint, "--data", data, "--target-length", "96", "--device", "cpu"]


@pytest.fixture()
def saved(tmp_path) -> Path:
    """A predictions file to re-score without a model (so output tests do no model work)."""
    rng = np.random.default_rng(0)
    targets = np.eye(3)[[0, 1, 2, 1]]
    classes = [("a", "a [b]"), ("b", "b"), ("c", "[red]c[/red]")]
    pred = Predictions([f"{i}.wav" for i in range(4)], rng.random((4, 3)), targets, classes, False)
    pred.missing = ["gone_1", "gone_2"]
    path = tmp_path / "saved.npz"
    pred.save(path)
    return path


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--norm", "foo"], "--norm 'foo'"),
        (["--norm", "1,0"], "--norm '1,0'"),
        (["--norm", "nan,1"], "--norm 'nan,1'"),
        (["--hop", "0"], "--hop"),
        (["--hop", "-1"], "--hop"),
        (["--window", "0"], "--window"),
        (["--target-length", "0"], "--target-length"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_bad_arguments_are_one_line_before_any_work(checkpoint, tmp_path, extra, says):
    data = labelled_set(tmp_path / "set", [("train_00000.wav", "nine")], broken=True)
    result = sslam(*run_args(checkpoint, data), *extra, code=2)
    assert result.stderr.count("\n") == 1 and says in error_lines(result)[0]
    assert "skipped:" not in result.stderr  # nothing was decoded


def test_output_parents_created_and_existing_outputs_refused(checkpoint, data, tmp_path):
    out = tmp_path / "new" / "deeper"
    outputs = {
        "--predictions-out": out / "p.npz",
        "--per-class": out / "c.csv",
        "--plot": out / "ap.png",
        "--missing-out": out / "missing.txt",
    }
    flags = [x for item in outputs.items() for x in item]
    first = sslam(*run_args(checkpoint, data), *flags, "--format", "json")
    assert all(p.is_file() for p in outputs.values())
    assert (out / "missing.txt").read_text() == "gone_1.wav\ngone_2.wav\n"
    assert json.loads(first.stdout)["n_missing"] == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    for flag, path in outputs.items():
        before = path.read_bytes()
        result = sslam(*run_args(checkpoint, data), flag, path, code=2)
        assert error_lines(result) == [f"error: {path} exists; pass --overwrite to replace it"]
        assert "note:" not in result.stderr and path.read_bytes() == before
    path = outputs["--missing-out"]
    path.write_text("old\n")
    sslam(*run_args(checkpoint, data), "--missing-out", path, "--overwrite")
    assert path.read_text() == "gone_1.wav\ngone_2.wav\n"


def test_same_file_for_two_outputs_refused(saved, tmp_path):
    out = tmp_path / "x.csv"
    result = sslam("eval", "--predictions", saved, "--per-class", out, "--missing-out", out, code=2)
    assert len(error_lines(result)) == 1 and not out.exists()


@pytest.mark.parametrize(
    "code, cause",
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EACCES, "permission denied"),
        (errno.EROFS, "read-only file system"),
    ],
)
def test_write_failure_is_one_line_and_old_file_kept(saved, tmp_path, monkeypatch, code, cause):
    out = tmp_path / "classes.csv"
    out.write_text("old\n")
    real = os.replace

    def failing(src, dst):
        if str(dst) == str(out):
            raise OSError(code, os.strerror(code))
        real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    result = sslam("eval", "--predictions", saved, "--per-class", out, "--overwrite", code=2)
    assert error_lines(result) == [f"error: {out}: cannot write ({cause})"]
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "classes.csv",
        "saved.npz",
    ]


@pytest.fixture()
def full_disk(tmpfs):
    """A 16 KiB tmpfs filled to the last byte (needs root; skipped otherwise)."""
    with tmpfs("16k", "tiny") as mount:
        fill(mount)
        yield mount


@pytest.mark.slow
@pytest.mark.parametrize("flag, name", [("--per-class", "c.csv"), ("--predictions-out", "p.npz")])
def test_real_full_disk(saved, full_disk, flag, name):
    out = full_disk / name
    result = subprocess.run(
        [sys.executable, "-m", "sslam_cli", "eval", "--predictions", str(saved), flag, str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {out}: cannot write (no space left on device)"]
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_rescore_keeps_missing_and_top_k(saved, tmp_path):
    obj = json.loads(sslam("eval", "--predictions", saved, "--format", "json").stdout)
    assert obj["n_missing"] == 2 and obj["k"] == 3 and "top_k" in obj and "top5" not in obj
    out = tmp_path / "m.txt"
    sslam("eval", "--predictions", saved, "--missing-out", out)
    assert out.read_text() == "gone_1\ngone_2\n"
    with np.load(saved) as f:
        assert {"class_ids", "class_names", "paths", "scores", "targets", "missing"} <= set(f.files)


def test_table_keeps_brackets_and_long_names_unwrapped(saved):
    table = sslam("eval", "--predictions", saved).stdout
    assert "top-3 accuracy" in table and "missing" in table
    lines = sslam("eval", "--predictions", saved).stdout.splitlines()
    assert any("a [b]" in line for line in lines) and any("[red]c[/red]" in line for line in lines)


@pytest.mark.slow
def test_long_names_not_wrapped_when_piped(tmp_path):
    name = "a very long class name " * 6 + "[x]"
    pred = Predictions(
        ["1.wav", "2.wav"], [[0.9, 0.1], [0.2, 0.8]], np.eye(2), [("a", name), ("b", "b")], True
    )
    pred.save(tmp_path / "p.npz")
    out = subprocess.run(
        [sys.executable, "-m", "sslam_cli", "eval", "--predictions", str(tmp_path / "p.npz")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0 and any(name in line for line in out.stdout.splitlines())


def test_all_clips_skipped_is_exit_2(checkpoint, tmp_path):
    data = labelled_set(tmp_path / "set", [], broken=True)
    result = sslam(*run_args(checkpoint, data), "--format", "json", code=2)
    assert len(error_lines(result)) == 1 and "skipped" in error_lines(result)[0]
    assert result.stdout == ""


def test_window_longer_than_the_model_refused_or_warned(checkpoint, data):
    result = sslam(*run_args(checkpoint, data)[:-4], "--target-length", "2048", "--device", "cpu", code=2)
    assert error_lines(result) and "1024" in error_lines(result)[0] and "skipped:" not in result.stderr
    result = sslam(*run_args(checkpoint, data)[:-4], "--window", "100", "--device", "cpu", code=2)
    assert "10000 frames" in error_lines(result)[0]
    result = sslam("eval", "-c", FINETUNED, "--data", data, "--target-length", "2048", "--device", "cpu",
                   "--format", "json", code=2)  # fmt: skip
    warned = [line for line in result.stderr.splitlines() if "trained" in line]
    assert len(warned) == 1 and "20.48 s" in warned[0]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_after_the_batch_in_flight(checkpoint, tmp_path, sig):
    rows = [("train_00000.wav", "nine")] * 3000
    data = labelled_set(tmp_path / "set", rows, broken=True)
    args = [sys.executable, "-m", "sslam_cli", *map(str, run_args(checkpoint, data)), "--batch-size", "1"]
    out = tmp_path / "p.npz"
    proc = subprocess.Popen(
        [*args, "--predictions-out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    for _ in range(20):  # the broken file comes first: once it is reported, the model run has begun
        if "skipped:" in proc.stderr.readline():
            break
    else:
        pytest.fail("no 'skipped:' line")
    time.sleep(0.5)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    lines = [s for s in stderr.replace("\r", "\n").splitlines() if s.strip() and "clip/s" not in s]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    assert lines[0].startswith(f"interrupted ({sig.name}) after ") and "--resume" not in lines[0]
    assert stdout == "" and not out.exists()


def test_plot_shows_the_metric_the_text_reports(saved, tmp_path, monkeypatch):
    from sslam_core.evaluation import plots

    calls, real = [], plots.plot_class_ap

    def record(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(plots, "plot_class_ap", record)
    out = tmp_path / "ap.png"
    summary = json.loads(sslam("eval", "--predictions", saved, "--format", "json", "--plot", out).stdout)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert calls[0]["metric_name"] == "accuracy" and calls[0]["metric_value"] == summary["accuracy"]


def test_output_that_is_an_input_refused_even_with_overwrite(saved):
    before = saved.read_bytes()
    result = sslam("eval", "--predictions", saved, "--predictions-out", saved, "--overwrite", code=2)
    assert len(error_lines(result)) == 1 and "is one of the inputs" in result.stderr
    assert saved.read_bytes() == before
