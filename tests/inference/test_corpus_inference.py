"""Corpus-scale inference under `torchrun`: 2 CPU ranks (gloo) give the outputs of one process, and a
rank killed mid-run is finished by `--resume` under another world size."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf
from conftest import CHECKPOINTS as FIX
from conftest import ROOT, child_pids
from conftest import sslam_process as sslam

from sslam_core.inference.partition import balanced_ranges

PRETRAIN = str(FIX / "tiny_pretrain.pt")
FINETUNED = str(FIX / "tiny_finetuned.pt")
DURATIONS = (0.5, 1.0, 2.5, 4.0, 0.3, 6.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """18 clips of mixed lengths (0.3 to 6 s) and one file that is not audio."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(18):
        seconds = DURATIONS[i % len(DURATIONS)]
        wave = 0.1 * rng.standard_normal(int(seconds * 16000)).astype(np.float32)
        sf.write(folder / f"c{i:02d}.wav", wave, 16000)
    (folder / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00not audio")
    return folder


def h5_contents(path: Path) -> tuple[dict, dict]:
    items: dict = {}
    with h5py.File(path) as h5:
        h5.visititems(
            lambda name, obj: items.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
        )
        attrs = dict(h5.attrs)
    return items, attrs


def assert_same_h5(a: Path, b: Path) -> None:
    (da, aa), (db, ab) = h5_contents(a), h5_contents(b)
    assert sorted(da) == sorted(db) and aa == ab
    for name in da:
        assert np.array_equal(da[name], db[name]), name


def test_balanced_ranges_split_by_weight_not_count():
    assert balanced_ranges([1, 1, 1, 1], 2) == [range(0, 2), range(2, 4)]
    assert balanced_ranges([10, 1, 1, 1], 2) == [range(0, 1), range(1, 4)]
    assert balanced_ranges([1, 1], 3) == [range(0, 1), range(1, 2), range(2, 2)]
    shares = balanced_ranges([float(d) for d in DURATIONS * 3], 2)
    assert shares[0].stop == shares[1].start and shares[1].stop == 18
    totals = [sum((DURATIONS * 3)[i] for i in r) for r in shares]
    assert abs(totals[0] - totals[1]) <= max(DURATIONS)


@pytest.mark.slow
def test_two_ranks_write_the_file_one_process_writes(corpus, tmp_path):
    common = ["-c", PRETRAIN, "-g", "all", "--frame-hop", "0.08", "--compression", "gzip"]
    single = tmp_path / "single.h5"
    sslam("extract", str(corpus), "-o", str(single), *common, check=1)  # 1: a file was skipped
    sharded = tmp_path / "sharded.h5"
    proc = sslam("extract", str(corpus), "-o", str(sharded), *common, torchrun=2)  # 0 under torchrun
    assert proc.stderr.count("skipped: bad.wav") == 1 and proc.stderr.count("wrote 18 file(s)") == 1
    assert_same_h5(single, sharded)
    with h5py.File(sharded) as h5:
        assert h5["clip"].compression == "gzip" and h5["clip"].chunks[1] == h5["clip"].shape[1]
        assert list(h5["errors/paths"].asstr()) == ["bad.wav"]
    assert not Path(str(sharded) + ".parts").exists()


def start_and_wait_for_parts(cmd: list[str], out: Path, parts: int) -> subprocess.Popen:
    """Start `cmd` and return once the journal of `out` holds `parts` parts (or the run ended)."""
    run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = Path(str(out) + ".parts")
    deadline = time.time() + 300
    while time.time() < deadline and len(list(journal.glob("part-*.npz"))) < parts and run.poll() is None:
        time.sleep(0.05)
    return run


@pytest.mark.slow
@pytest.mark.distributed
def test_a_killed_rank_is_finished_by_resume_under_one_process(corpus, tmp_path):
    common = ["-c", PRETRAIN, "-g", "clip", "--flush-every", "1"]
    reference = tmp_path / "reference.h5"
    sslam("extract", str(corpus), "-o", str(reference), *common, check=1)
    out = tmp_path / "killed.h5"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    run = start_and_wait_for_parts(
        [*launcher, "-m", "sslam_cli", "extract", str(corpus), "-o", str(out), *common], out, 3
    )
    parts = Path(str(out) + ".parts")
    ranks = child_pids(run.pid)
    assert run.poll() is None and len(ranks) == 2, "the run ended before a rank could be killed"
    os.kill(max(ranks), signal.SIGKILL)
    _, err = run.communicate(timeout=300)
    assert run.returncode != 0 and not out.exists(), err[-2000:]
    done = len(list(parts.glob("part-*.npz")))
    assert 0 < done < 19
    proc = sslam("extract", str(corpus), "-o", str(out), *common, "--resume", check=1)
    assert f"({done} from the interrupted run)" in proc.stderr
    assert_same_h5(reference, out)


@pytest.mark.slow
def test_resume_under_two_ranks_finishes_a_single_process_run(corpus, tmp_path):
    common = ["-c", PRETRAIN, "-g", "frame", "--flush-every", "2"]
    reference = tmp_path / "reference.h5"
    sslam("extract", str(corpus), "-o", str(reference), *common, check=1)
    out = tmp_path / "out.h5"
    run = start_and_wait_for_parts(
        [sys.executable, "-m", "sslam_cli", "extract", str(corpus), "-o", str(out), *common], out, 2
    )
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 143, err[-2000:]
    proc = sslam("extract", str(corpus), "-o", str(out), *common, "--resume", torchrun=2)
    assert "from the interrupted run" in proc.stderr
    assert_same_h5(reference, out)


@pytest.mark.slow
def test_tag_under_two_ranks_writes_results_in_input_order(corpus, tmp_path):
    args = [str(corpus), "-c", FINETUNED, "--format", "json", "--top-k", "3"]
    single = sslam("tag", *args, check=1).stdout
    sharded = sslam("tag", *args, torchrun=2)
    assert sharded.stdout == single and sharded.stderr.count("skipped: bad.wav") == 1
    out = tmp_path / "tags.jsonl"
    sslam("tag", *args, "-o", str(out), torchrun=2)
    assert out.read_text() == single
    assert [json.loads(line)["path"] for line in single.splitlines()] == [f"c{i:02d}.wav" for i in range(18)]


@pytest.mark.slow
def test_eval_under_two_ranks_scores_the_gathered_predictions(tmp_path):
    import torch

    from sslam_core.models.layouts.native import save_checkpoint
    from sslam_core.models.transformer import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(embed_dim=32, depth=1, num_heads=2, max_length=64, num_classes=10))
    ckpt = tmp_path / "digits.safetensors"
    labels = [(str(i), str(i)) for i in range(10)]
    save_checkpoint(ckpt, model.cfg, model.state_dict(), labels=labels, extra={"multilabel": False})
    data = ROOT / "tests" / "data" / "fsdd_mini"
    args = ["eval", "-c", str(ckpt), "--data", str(data), "--target-length", "64", "-f", "json"]
    single = sslam(*args, "--predictions-out", str(tmp_path / "one.npz"))
    sharded = sslam(*args, "--predictions-out", str(tmp_path / "two.npz"), torchrun=2)
    assert json.loads(sharded.stdout) == json.loads(single.stdout)
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert sorted(one.files) == sorted(two.files)
    for key in one.files:
        assert np.array_equal(one[key], two[key]), key


@pytest.mark.slow
def test_tar_shards_under_two_ranks_equal_one_process(corpus, tmp_path):
    import tarfile

    files = sorted(corpus.iterdir())
    for k in range(3):  # three shards of about a third of the clips each
        with tarfile.open(tmp_path / f"as-{k:03d}.tar", "w") as tar:
            for f in files[k::3]:
                tar.add(f, arcname=f"{k}/{f.name}")
    spec = str(tmp_path / "as-{000..002}.tar")
    single, sharded = tmp_path / "one.h5", tmp_path / "two.h5"
    sslam("extract", spec, "-o", str(single), "-c", PRETRAIN, "-g", "frame", check=1)
    sslam("extract", spec, "-o", str(sharded), "-c", PRETRAIN, "-g", "frame", torchrun=2)
    assert_same_h5(single, sharded)
    with h5py.File(sharded) as h5:
        assert h5["paths"].asstr()[0] == f"{tmp_path}/as-000.tar/0/{files[3].name}"  # files[0]: bad.wav
