"""`sslam eval --strong` on real polydigits clips: the metrics equal sed_scores_eval's (and sed_eval's)
on the events `sslam tag --events` writes, token frame scores, the missing extra and bad label files
as one line, and strong-label files still loading for clip-level evaluation."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, sslam

from sslam_core.models.layouts.native import save_checkpoint
from sslam_core.models.transformer import ModelConfig, build_model

POLY = ROOT / "tests" / "data" / "polydigits"
STRONG = POLY / "strong.tsv"
CLIPS = sorted(str(p) for p in (POLY / "audio").glob("*.wav"))
DIGITS = [(str(d), str(d)) for d in range(10)]
WINDOW = ["--window", "0.64", "--hop", "0.16", "--device", "cpu"]
EVENTS = ["--event-threshold", "0.3", "--median", "0.32"]


def libraries():
    """sed_scores_eval, sed_eval and sed_scores_eval's score-table constructor (the test skips without
    the sed extra; the missing-extra test below runs either way)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sse, se = pytest.importorskip("sed_scores_eval"), pytest.importorskip("sed_eval")
    from sed_scores_eval.base_modules.scores import create_score_dataframe

    return sse, se, create_score_dataframe


def checkpoint(folder: Path, pool: str) -> Path:
    """A tiny multi-label digit classifier with a random head large enough to give varied scores."""
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(embed_dim=32, depth=1, num_heads=2, max_length=64, num_classes=10, pool=pool)
    )
    torch.nn.init.normal_(model.head.weight, std=3.0)
    path = folder / f"digits_{pool}.safetensors"
    save_checkpoint(path, model.cfg, model.state_dict(), labels=DIGITS, extra={"multilabel": True})
    return path


@pytest.fixture(scope="module")
def mean_ckpt(tmp_path_factory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("ckpt"), "mean")


def reference() -> dict[str, list[tuple[float, float, str]]]:
    """strong.tsv's events of the clips that have audio, read here independently of sslam."""
    rows = list(csv.DictReader(STRONG.open(), delimiter="\t"))
    have = {Path(c).stem for c in CLIPS}
    out: dict = {k: [] for k in have}
    for r in rows:
        if Path(r["filename"]).stem in have:
            out[Path(r["filename"]).stem].append((float(r["onset"]), float(r["offset"]), r["event_label"]))
    return out


def tagged_events(ckpt: Path, *extra: str) -> dict[str, list[tuple[float, float, str]]]:
    """The events `sslam tag --events --format dcase` writes, by clip."""
    text = sslam("tag", *CLIPS, "-c", ckpt, "--events", "-f", "dcase", *WINDOW, *EVENTS, *extra).stdout
    out: dict = {Path(c).stem: [] for c in CLIPS}
    for r in csv.DictReader(io.StringIO(text), delimiter="\t"):
        out[Path(r["filename"]).stem].append((float(r["onset"]), float(r["offset"]), r["event_label"]))
    return out


def test_event_and_segment_f1_equal_the_libraries_on_the_events_tag_writes(mean_ckpt):
    sed_scores_eval, sed_eval, create_score_dataframe = libraries()
    args = ["--strong", STRONG, "-f", "json", "--collar", "0.5", *WINDOW, *EVENTS]
    summary = json.loads(sslam("eval", "-c", mean_ckpt, *args).stdout)
    truth, detected = reference(), tagged_events(mean_ckpt)
    assert summary["n_clips"] == 3 and summary["n_missing"] == 1 and summary["n_detected_events"] > 0
    classes = sorted({label for v in truth.values() for _, _, label in v})
    assert [c["label"] for c in summary["classes"]] == classes
    assert summary["n_detected_events"] == sum(c in classes for v in detected.values() for _, _, c in v)

    # sed_eval, the DCASE 2016-2020 reference implementation, straight from the event lists
    ref_list = [{"filename": k, "onset": a, "offset": b, "event_label": c} for k, v in truth.items()
                for a, b, c in v]  # fmt: skip
    est_list = [{"filename": k, "onset": a, "offset": b, "event_label": c} for k, v in detected.items()
                for a, b, c in v if c in classes]  # fmt: skip
    event_based = sed_eval.sound_event.EventBasedMetrics(classes, t_collar=0.5, percentage_of_length=0.2)
    for k in truth:
        event_based.evaluate(
            [e for e in ref_list if e["filename"] == k], [e for e in est_list if e["filename"] == k]
        )
    results = event_based.results()
    assert summary["event_based"]["f1_micro"] == pytest.approx(
        results["overall"]["f_measure"]["f_measure"], abs=1e-12
    )
    # sed_eval leaves F undefined (NaN) for a class never detected and averages over the others;
    # sed_scores_eval (and so sslam) counts it as 0 in the macro average
    class_wise = [results["class_wise"][c]["f_measure"]["f_measure"] for c in classes]
    assert [row["event_f1"] for row in summary["classes"]] == pytest.approx(
        np.nan_to_num(class_wise), abs=1e-12
    )
    assert summary["event_based"]["f1_macro"] == pytest.approx(np.nan_to_num(class_wise).mean(), abs=1e-12)
    assert max(row["event_f1"] for row in summary["classes"]) > 0

    # sed_scores_eval on 0/1 scores made here from the same events, thresholded at 0.5
    durations = {k: 2.0 for k in truth}
    binary = {}
    for k in truth:
        bounds = sorted({0.0, 2.0, *(t for a, b, c in detected[k] if c in classes for t in (a, b))})
        centres = (np.array(bounds[:-1]) + np.array(bounds[1:])) / 2
        on = [
            [float(any(a < t < b and c == label for a, b, c in detected[k])) for label in classes]
            for t in centres
        ]
        binary[k] = create_score_dataframe(np.array(on), np.array(bounds), classes)
    f, *_ = sed_scores_eval.collar_based.fscore(
        binary, truth, 0.5, onset_collar=0.5, offset_collar=0.5, offset_collar_rate=0.2
    )
    assert summary["event_based"]["f1_macro"] == f["macro_average"]
    assert summary["event_based"]["f1_micro"] == f["micro_average"] > 0
    seg, *_ = sed_scores_eval.segment_based.fscore(binary, truth, durations, 0.5, segment_length=1.0)
    assert summary["segment_based"]["f1_micro"] == seg["micro_average"]
    assert [c["segment_f1"] for c in summary["classes"]] == [seg[c] for c in classes]


@pytest.mark.slow
def test_psds_equals_sed_scores_eval_on_the_step_scores(mean_ckpt):
    sed_scores_eval, _, create_score_dataframe = libraries()
    from sslam_core.inference.events import EventOptions, result_step_scores, smoothed
    from sslam_core.inference.tagging import tag

    summary = json.loads(sslam("eval", "-c", mean_ckpt, "--strong", STRONG, "-f", "json", *WINDOW, *EVENTS,
                               "--collar", "0.3", "--segment-length", "0.5").stdout)  # fmt: skip
    from sslam_core.models.factory import load_model

    model = load_model(str(mean_ckpt))
    truth = reference()
    classes = [c["label"] for c in summary["classes"]]
    columns = [int(c) for c in classes]
    tables, durations = {}, {}
    for res in tag(model, CLIPS, target_length=64, hop=16):
        starts, scores = result_step_scores(res)
        values = smoothed(scores, EventOptions(median=0.32))[:, columns]
        key = Path(res.path).stem
        tables[key] = create_score_dataframe(values, np.append(starts, res.duration), classes)
        durations[key] = res.duration
    psds, per_class, *_ = sed_scores_eval.intersection_based.psds(
        tables,
        truth,
        durations,
        dtc_threshold=0.7,
        gtc_threshold=0.7,
        alpha_ct=0.0,
        alpha_st=1.0,
        max_efpr=100.0,
    )
    assert summary["psds"]["value"] == psds
    assert [c["psds"] for c in summary["classes"]] == [per_class[c] for c in classes]
    assert summary["event_based"]["onset_collar"] == 0.3 and summary["segment_based"]["segment_length"] == 0.5
    table = sslam("eval", "-c", mean_ckpt, "--strong", STRONG, *WINDOW, *EVENTS).stdout
    assert "event-based F1" in table and "PSDS" in table and "per class" in table


def test_token_frame_scores(mean_ckpt, tmp_path):
    libraries()
    args = ["--frame-scores", "token", "--window", "2.08", "--device", "cpu"]
    summary = json.loads(sslam("eval", "-c", mean_ckpt, "--strong", STRONG, "-f", "json", *args).stdout)
    assert summary["frame_scores"] == "token" and summary["hop"] == 2.08  # one window per 2 s clip
    found = json.loads(sslam("tag", CLIPS[0], "-c", mean_ckpt, "--events", "-f", "json", *args).stdout)
    assert found["events"] and all(0 <= e["onset"] < e["offset"] <= 2.0 for e in found["events"])
    assert summary["n_detected_events"] >= len(found["events"])
    cls = checkpoint(tmp_path, "cls")
    bad = sslam("eval", "-c", cls, "--strong", STRONG, *args, code=2)
    assert "mean pooling" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert "--frame-scores" in sslam("tag", CLIPS[0], "-c", cls, "--events", *args, code=2).stderr


@pytest.mark.slow
def test_without_the_extra_one_line_names_it(mean_ckpt, tmp_path):
    shim = tmp_path / "shim" / "sed_scores_eval"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('sed_scores_eval is blocked for this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim.parent), str(ROOT)])}
    cmd = [sys.executable, "-m", "sslam_cli", "eval", "-c", str(mean_ckpt), "--strong", str(STRONG)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: strong-label evaluation needs the sed extra: pip install 'sslam[sed]' (sed_scores_eval)"
    ]


def test_bad_strong_file_is_one_line_naming_it(mean_ckpt, tmp_path):
    libraries()
    bad = tmp_path / "strong.tsv"
    bad.write_text("filename\tonset\toffset\tevent_label\nx.wav\t0.5\tsoon\tdog\n")
    result = sslam("eval", "-c", mean_ckpt, "--strong", bad, code=2)
    assert result.stderr.strip().splitlines() == [
        f"error: {bad}:2: expected filename<TAB>onset<TAB>offset<TAB>event_label"
    ]
    bad.write_text("x.wav\t0.9\t0.5\tdog\n")
    assert (
        f"{bad}:1: onset 0.9 and offset 0.5" in sslam("eval", "-c", mean_ckpt, "--strong", bad, code=2).stderr
    )
    both = sslam("eval", "-c", mean_ckpt, "--strong", STRONG, "--data", STRONG, code=2)
    assert "leave out --data" in both.stderr


def test_strong_labels_still_load_for_clip_level_eval(mean_ckpt):
    summary = json.loads(sslam("eval", "-c", mean_ckpt, "--data", STRONG, "-f", "json", *WINDOW).stdout)
    assert summary["n_clips"] == 3 and summary["n_missing"] == 1 and "mAP" in summary


def test_events_become_scores_that_give_them_back():
    libraries()
    from sed_scores_eval.base_modules.detection import scores_to_event_list

    from sslam_core.evaluation.strong import event_scores

    events = [(0.1, 0.48, "a"), (0.3, 1.2, "b"), (1.5, 2.0, "a")]
    table = event_scores(events, 2.0, ["a", "b"])
    back = scores_to_event_list(table, 0.5)
    assert sorted(back) == sorted(events)


def test_strong_file_faults_name_the_file_and_line(mean_ckpt, tmp_path):
    """A comma-separated file, a label the model lacks and an event past its file's end each name
    strong.tsv:LINE (they were taken for a fairseq manifest, blamed on the checkpoint, accepted)."""
    libraries()
    (tmp_path / "audio").symlink_to(POLY / "audio")
    rows = STRONG.read_text().splitlines()
    commas = tmp_path / "commas.tsv"
    commas.write_text("\n".join(r.replace("\t", ",") for r in rows) + "\n")
    result = sslam("eval", "-c", mean_ckpt, "--strong", commas, *WINDOW, code=2)
    assert result.stderr.strip().splitlines() == [
        f"error: {commas}:1: the line is comma-separated; strong labels are tab-separated: "
        "filename<TAB>onset<TAB>offset<TAB>event_label"
    ]
    unknown = tmp_path / "unknown.tsv"
    unknown.write_text("\n".join([*rows[:3], "train_00001.wav\t0.1\t0.5\tdog", *rows[3:]]) + "\n")
    result = sslam("eval", "-c", mean_ckpt, "--strong", unknown, *WINDOW, code=2)
    assert result.stderr.strip().splitlines() == [
        f"error: {unknown}:4: label 'dog' is not a class of {mean_ckpt} (matched by id or name)"
    ]
    late = tmp_path / "late.tsv"
    late.write_text("\n".join([*rows[:2], "train_00000.wav\t1.9\t2.6\t4", *rows[2:]]) + "\n")
    base = json.loads(sslam("eval", "-c", mean_ckpt, "--strong", STRONG, "-f", "json", *WINDOW).stdout)
    result = sslam("eval", "-c", mean_ckpt, "--strong", late, "-f", "json", *WINDOW)
    notes = [line for line in result.stderr.splitlines() if "after" in line]
    assert notes == [
        f"note: {late}:3: the event ends at 2.6 s, after the end of train_00000 (2.000 s)",
        "note: 1 reference event(s) end after their file; they are scored cut at its end",
    ]
    summary = json.loads(result.stdout)
    assert summary["n_reference_events"] == base["n_reference_events"] + 1
