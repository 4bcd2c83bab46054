"""`sslam eval`, `stats` and `plot`: metrics against scikit-learn, re-scoring, class matching, skips."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import ROOT, sslam
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score, top_k_accuracy_score

from sslam_core.audio.decode import load_audio
from sslam_core.audio.frontend import fbank
from sslam_core.data.labels import audioset_labels
from sslam_core.evaluation.classification import Predictions, match_classes
from sslam_core.evaluation.plots import curve_groups
from sslam_core.inference.tagging import tag
from sslam_core.models.factory import load_model
from sslam_core.models.layouts.native import save_checkpoint
from sslam_core.models.transformer import ModelConfig, build_model

FINETUNED = str(ROOT / "tests" / "fixtures" / "checkpoints" / "tiny_finetuned.pt")
CLIP = ROOT / "tests" / "data" / "real_32k.wav"
DIGITS = ROOT / "tests" / "data" / "polydigits" / "audio"
FRAMES = "128"  # 1.28 s windows keep the runs fast; 2.5 s clips give two windows each

# YTID -> labels (real AudioSet mids); label counts 1, 2, 3, 4, 6 cover every polyphony bin.
SEGMENTS = {
    "--PJHxphWEs": ["/m/09x0r"],
    "--ZhevVpy1s": ["/m/09x0r", "/m/04rlf"],
    "--aE2O5G5WE": ["/m/03fwl", "/m/04rlf", "/m/09x0r"],
    "--aO5cdqSAg": ["/t/dd00003", "/t/dd00005", "/m/04rlf", "/m/05zppz"],
    "--aaILOrkII": ["/m/032s66", "/m/073cg4", "/m/09x0r", "/m/04rlf", "/m/03fwl", "/m/05zppz"],
}


@pytest.fixture(scope="module")
def audioset(tmp_path_factory) -> Path:
    """Five 2.5 s clips cut from the fixture clip, named by YTID, a segments csv and one missing clip."""
    root = tmp_path_factory.mktemp("audioset")
    wave, sr = sf.read(CLIP, dtype="float32")
    lines = ["# Segments csv", "# num_ytids=6", "# YTID, start_seconds, end_seconds, positive_labels"]
    for i, (ytid, mids) in enumerate(SEGMENTS.items()):
        start = int(i * 1.5 * sr)
        sf.write(root / f"{ytid}.wav", wave[start : start + int(2.5 * sr)], sr)
        lines.append(f'{ytid}, 0.000, 10.000, "{",".join(mids)}"')
    lines.append('--missing000, 0.000, 10.000, "/m/09x0r"')
    (root / "segments.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def audioset_run(audioset, tmp_path_factory):
    """One evaluation with every output: JSON summary, npz/h5 predictions, per-class CSV, AP plot."""
    out = tmp_path_factory.mktemp("eval")
    args = ["eval", "-c", FINETUNED, "--data", audioset / "segments.csv", "--target-length", FRAMES]
    args += ["--device", "cpu", "--format", "json", "--by-polyphony", "--per-class", out / "classes.csv"]
    args += ["--predictions-out", out / "pred.npz", "--plot", out / "ap.png"]
    result = sslam(*args)
    return json.loads(result.stdout), result.stderr, out


def sklearn_summary(pred: Predictions) -> dict:
    with_pos = [c for c in range(pred.targets.shape[1]) if pred.targets[:, c].any()]
    both = [c for c in with_pos if not pred.targets[:, c].all()]
    ap = [average_precision_score(pred.targets[:, c], pred.scores[:, c]) for c in with_pos]
    auc = np.mean([roc_auc_score(pred.targets[:, c], pred.scores[:, c]) for c in both])
    return {
        "mAP": np.mean(ap),
        "auc": auc,
        "d_prime": math.sqrt(2) * NormalDist().inv_cdf(auc),
        "n": len(with_pos),
    }


@pytest.mark.slow
def test_audioset_eval_matches_sklearn_and_tag(audioset_run, audioset):
    summary, stderr, out = audioset_run
    pred = Predictions.load(out / "pred.npz")
    assert pred.multilabel and len(pred.classes) == 527 and pred.classes[0] == ("/m/09x0r", "Speech")
    assert [Path(p).stem for p in pred.paths] == list(SEGMENTS)
    for row, mids in enumerate(SEGMENTS.values()):  # targets are the listed mids, matched by mid
        assert sorted(pred.classes[c][0] for c in np.flatnonzero(pred.targets[row])) == sorted(mids)
    ref = sklearn_summary(pred)
    assert summary["n_clips"] == 5 and summary["n_classes_scored"] == ref["n"] == 8
    assert summary["n_classes_without_positives"] == 527 - 8 and summary["n_skipped"] == 0
    assert summary["mAP"] == pytest.approx(ref["mAP"], abs=1e-12)
    assert summary["auc"] == pytest.approx(ref["auc"], abs=1e-12)
    assert summary["d_prime"] == pytest.approx(ref["d_prime"], abs=1e-9)
    assert "1 listed clip(s) have no audio" in stderr
    # The scores are exactly those of `sslam tag`'s pipeline: max over 128-frame windows.
    model = load_model(FINETUNED)
    files = [str(audioset / p) for p in pred.paths]  # named relative to the set's audio folder
    tagged = list(tag(model, files, target_length=int(FRAMES), batch_size=3, workers=1))
    assert all(len(t.segments) == 2 for t in tagged)
    np.testing.assert_allclose(pred.scores, np.stack([t.scores for t in tagged]), atol=1e-6)
    assert (out / "ap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_class_csv_worst_first(audioset_run):
    _, _, out = audioset_run
    pred = Predictions.load(out / "pred.npz")
    with open(out / "classes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["name", "mid", "positives", "AP", "AUC"] and len(rows) == 527
    scored = [r for r in rows if r["AP"]]
    assert len(scored) == 8 and rows[:8] == scored  # classes without positives last, AP left empty
    assert [float(r["AP"]) for r in scored] == sorted(float(r["AP"]) for r in scored)
    index = {mid: c for c, (mid, _) in enumerate(pred.classes)}
    for r in scored:
        c = index[r["mid"]]
        assert int(r["positives"]) == pred.targets[:, c].sum()
        assert float(r["AP"]) == pytest.approx(
            average_precision_score(pred.targets[:, c], pred.scores[:, c]), abs=1e-6
        )
        if int(r["positives"]) < 5:
            assert float(r["AUC"]) == pytest.approx(
                roc_auc_score(pred.targets[:, c], pred.scores[:, c]), abs=1e-6
            )
    assert rows[0]["name"] == dict(audioset_labels())[rows[0]["mid"]]


def test_by_polyphony_bins(audioset_run):
    summary, _, out = audioset_run
    pred = Predictions.load(out / "pred.npz")
    poly = summary["polyphony"]
    assert list(poly) == ["1", "2-3", "4-5", "6+"]
    assert [poly[b]["clips"] for b in poly] == [1, 2, 1, 1]
    rows = {"2-3": [1, 2], "6+": [4]}
    for name, chosen in rows.items():
        t, s = pred.targets[chosen], pred.scores[chosen]
        aps = [average_precision_score(t[:, c], s[:, c]) for c in range(t.shape[1]) if t[:, c].any()]
        assert poly[name]["classes"] == len(aps)
        assert poly[name]["mAP"] == pytest.approx(np.mean(aps), abs=1e-12)


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_rescore_from_predictions_gives_same_json(audioset_run, tmp_path, suffix):
    summary, _, out = audioset_run
    path = out / "pred.npz"
    if suffix == ".h5":
        path = tmp_path / "pred.h5"
        Predictions.load(out / "pred.npz").save(path)
        again = Predictions.load(path)
        assert (
            again.paths == Predictions.load(out / "pred.npz").paths and again.classes[4][1] == "Conversation"
        )
    result = sslam("eval", "--predictions", path, "--format", "json", "--by-polyphony")
    assert json.loads(result.stdout) == summary
    table = sslam("eval", "--predictions", path).stdout
    assert "mAP" in table and f"{summary['mAP']:.4f}" in table and "worst classes" in table


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    """A small random multi-class Classifier in our format, classes (digit, name), one not in the data."""
    torch.manual_seed(0)
    labels = [("1", "one"), ("3", "three"), ("0", "zero"), ("9", "nine")]
    model = build_model(
        ModelConfig(embed_dim=32, depth=1, num_heads=2, max_length=64, num_classes=len(labels))
    )
    torch.nn.init.normal_(model.head.weight, std=1.0)
    path = tmp_path_factory.mktemp("ckpt") / "digits.safetensors"
    save_checkpoint(path, model.cfg, model.state_dict(), labels=labels, extra={"multilabel": False})
    return path


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")  # k = classes, on purpose
def test_multiclass_custom_checkpoint_and_corrupt_file(digits_checkpoint, tmp_path):
    """labels.csv by class name, one corrupt file: accuracy / top-k equal sklearn, the file is skipped."""
    for name in ("train_00000", "train_00002", "train_00015"):
        shutil.copy(DIGITS / f"{name}.wav", tmp_path / f"{name}.wav")
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
    rows = ["filename,labels", "train_00000.wav,nine", "train_00002.wav,three", "broken.wav,one"]
    (tmp_path / "labels.csv").write_text("\n".join([*rows, "train_00015.wav,three"]) + "\n")
    pred_path = tmp_path / "pred.npz"
    args = ["eval", "-c", digits_checkpoint, "--data", tmp_path, "--target-length", "96", "--device", "cpu"]
    result = sslam(*args, "--format", "json", "--predictions-out", pred_path, code=1)
    summary = json.loads(result.stdout)
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 1 and "broken.wav" in skipped[0]
    assert "evaluated 3 clip(s), skipped 1" in result.stderr
    pred = Predictions.load(pred_path)
    assert pred.paths == ["train_00000.wav", "train_00002.wav", "train_00015.wav"]  # named as given
    assert not pred.multilabel and pred.classes == [("nine", "nine"), ("one", "one"), ("three", "three")]
    assert summary["n_clips"] == 3 and summary["n_skipped"] == 1 and len(pred.skipped) == 1
    truth = pred.targets.argmax(axis=1)
    assert summary["accuracy"] == pytest.approx(accuracy_score(truth, pred.scores.argmax(axis=1)))
    assert summary["k"] == 3  # top-k with k = min(5, classes)
    assert summary["top_k"] == top_k_accuracy_score(truth, pred.scores, k=3, labels=[0, 1, 2]) == 1.0
    assert sslam("eval", "--predictions", pred_path, "--format", "json").stdout == result.stdout
    # the scores are the model's softmax columns for (nine, one, three), max over windows
    model = load_model(digits_checkpoint)
    probs = np.stack(
        [
            t.scores
            for t in tag(
                model, [str(tmp_path / p) for p in pred.paths], target_length=96, multilabel=False, workers=1
            )
        ]  # fmt: skip
    )
    np.testing.assert_allclose(pred.scores, probs[:, [3, 0, 1]], atol=1e-6)
    table = sslam(*args, code=1).stdout
    assert "accuracy" in table and "top-3 accuracy" in table


def test_classes_not_covered_is_one_error_line(digits_checkpoint, audioset):
    args = ["eval", "-c", digits_checkpoint, "--data", audioset / "segments.csv", "--target-length", FRAMES]
    assert "has 2 labels in a multi-class set" in sslam(*args, code=2).stderr  # the checkpoint is multi-class
    result = sslam(*args, "--multilabel", code=2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("note: 1 listed clip")
    assert lines[1].startswith("error:") and "do not cover 8 of the dataset's labels" in lines[1]
    assert "'Speech'" in lines[1]


def test_match_classes_by_mid_then_name():
    model = [("/m/09x0r", "Speech"), ("/m/04rlf", "Music"), ("dog", "Dog")]
    data = [("/m/04rlf", "Music"), ("x", "Speech"), ("dog", "dog"), ("DOG2", "DOG"), ("cat", "cat")]
    assert match_classes(model, data) == [1, 0, 2, 2, None]


def test_stats_equal_numpy_over_fbank(tmp_path):
    paths = [str(DIGITS / "train_00000.wav"), str(CLIP)]
    result = sslam("stats", *[], str(tmp_path / "missing"), code=2)
    assert "no such file or folder" in result.stderr
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(paths) + "\n")
    for length in (None, 150):
        extra = ["--target-length", str(length)] if length else []
        obj = json.loads(sslam("stats", listing, "--format", "json", "--device", "cpu", *extra).stdout)
        feats = []
        for p in paths:
            wave = load_audio(p, 16000)
            fb = fbank((wave - wave.mean())[None])[0].numpy().astype(np.float64)
            feats.append(fb[:length] if length else fb)
        values = np.concatenate(feats)
        assert obj["frames"] == len(values) == (198 + 998 if length is None else 150 + 150)
        assert obj["files"] == 2 and obj["target_length"] == length
        assert obj["mean"] == pytest.approx(values.mean(), abs=1e-6)
        assert obj["std"] == pytest.approx(values.std(), abs=1e-6)
        assert obj["norm"] == f"{obj['mean']:.6f},{obj['std']:.6f}"
    text = sslam("stats", DIGITS, "--device", "cpu").stdout
    assert "padding excluded" in text and "--norm " in text
    sslam("stats", DIGITS, "--device", "cpu", "-o", tmp_path / "stats.json")  # .json: JSON, not a table
    written = json.loads((tmp_path / "stats.json").read_text())
    assert written["norm"] in text and written["files"] > 0


def test_plot_training_curves(tmp_path):
    lines = [
        {"step": s, "epoch": 0, "lr": 1e-4 * s / 30, "loss": 2.0 / s, "loss_cls": 1.0 / s, "grad_norm": 1.0}
        for s in range(1, 31)
    ]
    lines += [{"step": 10, "valid_mAP": 0.2, "valid_loss": 1.2}, {"step": 30, "eval/valid_mAP": 0.3}]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 31, "lo'  # a half-written last line
    (tmp_path / "metrics.jsonl").write_text(text)
    groups = curve_groups([json.loads(line) for line in text.splitlines()[:-1]])
    assert groups == {
        "loss": ["loss", "loss_cls", "valid_loss"],
        "validation": ["valid_mAP", "eval/valid_mAP"],
        "learning rate": ["lr"],
        "other": ["grad_norm"],
    }
    out = tmp_path / "curves.png"
    result = sslam("plot", tmp_path, "-o", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "32 log lines" in result.stderr
    assert "no metrics.jsonl" in sslam("plot", tmp_path / "nothing", "-o", out, code=2).stderr
