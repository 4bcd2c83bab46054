"""Corpus-scale inference under `torchrun`: 2 CPU ranks (gloo) give the outputs of one process, and a
rank killed mid-run is finished by `--resume` under another world size."""

from __future__ import annotations

import json
import os
import re
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

from sslam_core.data.datasets import read_labelled
from sslam_core.data.inputs import collect_inputs
from sslam_core.inference.partition import balanced_ranges, durations

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


def bar_counts(stderr: str) -> list[tuple[int, int]]:
    """The (done, total) counts of the progress bars in `stderr` (tqdm's `N/M [` updates)."""
    return [(int(a), int(b)) for a, b in re.findall(r"(\d+)/(\d+) \[", stderr)]


def assert_one_bar_for_rank_0s_share(stderr: str, share: int) -> None:
    """One bar, labelled rank 0, counting rank 0's share to its end (not the whole set first, nor
    stopping at half of it)."""
    counts = bar_counts(stderr)
    assert counts and {total for _, total in counts} == {share}, counts
    assert counts[-1] == (share, share) and "rank 0:" in stderr, stderr


def rank_0_share(sources: list) -> int:
    """How many of `sources` rank 0 of 2 runs (`partition.my_share`)."""
    return len(balanced_ranges(durations(sources), 2)[0])


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
        assert not h5["errors/reasons"].asstr()[0].startswith("bad.wav")  # the path is in errors/paths
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
    assert_one_bar_for_rank_0s_share(sharded.stderr, rank_0_share(collect_inputs([str(corpus)]).paths))
    out = tmp_path / "tags.jsonl"
    sslam("tag", *args, "-o", str(out), torchrun=2)
    assert out.read_text() == single
    assert [json.loads(line)["path"] for line in single.splitlines()] == [f"c{i:02d}.wav" for i in range(18)]


@pytest.mark.slow
def test_int8_under_two_ranks_gives_one_process_bits(corpus, tmp_path):
    """int8 scores do not depend on the files batched or sharded with them: two ranks (each its own
    share and batches) write what one process writes, to the last digit of every score."""
    args = [str(corpus), "-c", FINETUNED, "--format", "json", "--top-k", "5", "--precision", "int8"]
    single = sslam("tag", *args, "--batch-size", "8", check=1).stdout  # quantises and caches first
    sharded = sslam("tag", *args, torchrun=2)
    assert sharded.stdout == single and len(single.splitlines()) == 18
    fp32 = sslam("tag", *args[:-2], check=1).stdout
    assert fp32 != single  # it ran int8


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
    examples = read_labelled(data).examples
    assert_one_bar_for_rank_0s_share(sharded.stderr, rank_0_share([e.source for e in examples]))
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


@pytest.mark.slow
@pytest.mark.distributed
def test_an_error_under_two_ranks_is_printed_once():
    proc = sslam("eval", "-c", FINETUNED, "--data", str(ROOT / "tests" / "data" / "real_32k.wav"),
                 torchrun=2, check=None)  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {ROOT}/tests/data/real_32k.wav: an audio file, not a labelled set (give a labels CSV, a "
        "folder with labels.csv, ESC-50, AudioSet CSV, fairseq manifest, strong-label TSV or tar shards)"
    ]


@pytest.mark.slow
@pytest.mark.distributed
def test_strong_eval_under_two_ranks_scores_once_what_one_process_scores(tmp_path):
    pytest.importorskip("sed_scores_eval")
    import torch

    from sslam_core.models.layouts.native import save_checkpoint
    from sslam_core.models.transformer import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(embed_dim=32, depth=1, num_heads=2, max_length=64, num_classes=10))
    torch.nn.init.normal_(model.head.weight, std=3.0)
    ckpt = tmp_path / "digits.safetensors"
    digits = [(str(i), str(i)) for i in range(10)]
    save_checkpoint(ckpt, model.cfg, model.state_dict(), labels=digits, extra={"multilabel": True})
    strong = ROOT / "tests" / "data" / "polydigits" / "strong.tsv"
    args = ["eval", "-c", str(ckpt), "--strong", str(strong), "--window", "0.64", "-f", "json"]
    single = sslam(*args)
    sharded = sslam(*args, torchrun=2)
    assert json.loads(sharded.stdout) == json.loads(single.stdout)  # one summary, printed by rank 0
    assert sharded.stderr.count("note: 1 listed clip(s) have no audio") == 1
