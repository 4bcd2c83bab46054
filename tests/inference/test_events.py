"""Sound events from window scores: the step-score rule, thresholds with hysteresis, smoothing, merging,
the output formats, and `sslam tag --events` end to end."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from conftest import ROOT
from conftest import sslam_process as sslam

from sslam_core.inference.events import Event, EventOptions, detect, render_events, step_scores

FINETUNED = str(ROOT / "tests" / "fixtures" / "checkpoints" / "tiny_finetuned.pt")
CLIP = ROOT / "tests" / "data" / "real_32k.wav"
LABELS = [("/m/a", "A"), ("/m/b", "B")]


def windows(scores_by_start: dict[float, tuple[float, float]], length: float, duration: float):
    return [(t, min(t + length, duration), np.array(s)) for t, s in sorted(scores_by_start.items())]


def test_step_score_is_the_mean_of_the_windows_covering_the_step_centre():
    segs = windows({0.0: (0.2, 0.0), 0.96: (0.8, 0.0), 1.92: (0.5, 1.0)}, 1.92, 3.2)
    starts, scores = step_scores(segs, 3.2, step=0.32)
    assert np.allclose(starts, np.arange(10) * 0.32)
    # centre 0.16: window 0 only; 1.12: windows 0 and 1; 2.08: windows 1 and 2; 3.04: window 2
    np.testing.assert_allclose(scores[0], [0.2, 0.0])
    np.testing.assert_allclose(scores[3], [0.5, 0.0])
    np.testing.assert_allclose(scores[6], [0.65, 0.5])
    np.testing.assert_allclose(scores[9], [0.5, 1.0])


def test_gaps_between_windows_score_nan_and_detect_nothing():
    segs = windows({0.0: (0.9, 0.9), 3.2: (0.9, 0.9)}, 0.96, 4.0)
    starts, scores = step_scores(segs, 4.0, step=0.32)
    assert np.isnan(scores[5]).all() and not np.isnan(scores[0]).any()
    events = detect(starts, scores, 4.0, LABELS, EventOptions(threshold=0.5, step=0.32), classes=[0])
    assert [(e.onset, e.offset) for e in events] == [(0.0, 0.96), (3.2, 4.0)]


def test_hysteresis_median_min_duration_and_gap_merge():
    step = 0.1
    a = np.array([0.0, 0.6, 0.45, 0.45, 0.2, 0.7, 0.0, 0.0, 0.0, 0.9, 0.95, 0.9, 0.0, 0.0])
    scores = np.stack([a, np.zeros_like(a)], axis=1)
    starts = np.arange(len(a)) * step
    plain = detect(starts, scores, 1.4, LABELS, EventOptions(threshold=0.5, step=step))
    assert [(e.onset, e.offset) for e in plain] == [(0.1, 0.2), (0.5, 0.6), (0.9, 1.2)]
    held = detect(starts, scores, 1.4, LABELS, EventOptions(threshold=0.5, off_threshold=0.4, step=step))
    assert [(e.onset, e.offset) for e in held] == [(0.1, 0.4), (0.5, 0.6), (0.9, 1.2)]
    merged = detect(starts, scores, 1.4, LABELS, EventOptions(0.5, 0.4, min_gap=0.15, step=step))
    assert [(e.onset, e.offset) for e in merged] == [(0.1, 0.6), (0.9, 1.2)]
    assert merged[0].score == pytest.approx(0.7) and merged[1].score == pytest.approx(0.95)
    long_only = detect(starts, scores, 1.4, LABELS, EventOptions(0.5, 0.4, min_duration=0.25, step=step))
    assert [(e.onset, e.offset) for e in long_only] == [(0.1, 0.4), (0.9, 1.2)]
    smooth = detect(starts, scores, 1.4, LABELS, EventOptions(0.5, median=0.3, step=step))
    assert [(e.onset, e.offset) for e in smooth] == [(0.9, 1.2)]  # 3-step median removes the blips


def test_bad_options_are_refused():
    for kwargs in ({"threshold": 1.5}, {"threshold": 0.5, "off_threshold": 0.6}, {"median": -1}):
        with pytest.raises(ValueError):
            EventOptions(**kwargs)


def test_formats():
    ev = [Event(1.0, 2.5, "Dog", "/m/dog", 0.8), Event(3.0, 4.0, "Cat", "/m/cat", 0.6)]
    dcase = render_events("x.wav", [], "dcase", first=True) + render_events("x.wav", ev, "dcase", first=False)
    rows = list(csv.reader(io.StringIO(dcase), delimiter="\t"))
    assert rows == [
        ["filename", "onset", "offset", "event_label", "score"],
        ["x.wav", "1.000", "2.500", "Dog", "0.800000"],
        ["x.wav", "3.000", "4.000", "Cat", "0.600000"],
    ]
    assert render_events("x.wav", ev, "audacity", first=False).splitlines()[0] == "1.000000\t2.500000\tDog"
    raven = list(csv.reader(io.StringIO(render_events("x.wav", ev, "raven", True, number=7)), delimiter="\t"))
    assert raven[0][:5] == ["Selection", "View", "Channel", "Begin Time (s)", "End Time (s)"]
    assert [r[0] for r in raven[1:]] == ["7", "8"] and raven[2][6] == "Cat"
    assert json.loads(render_events("x.wav", ev, "json", False))["events"][1] == {
        "label": "Cat", "mid": "/m/cat", "onset": 3.0, "offset": 4.0, "score": 0.6,
    }  # fmt: skip


@pytest.mark.slow
def test_tag_events_end_to_end(tmp_path):
    out = sslam(
        "tag", str(CLIP), "-c", FINETUNED, "--events", "-f", "json", "--event-threshold", "0.9"
    ).stdout
    obj = json.loads(out)
    assert obj["events"] and all(
        e["score"] >= 0.9 and 0 <= e["onset"] < e["offset"] <= 10.0 for e in obj["events"]
    )
    top = {e["label"] for e in obj["events"]}
    assert obj["labels"][0]["label"] in top  # the best clip label is an event somewhere
    tsv = tmp_path / "events.tsv"
    sslam("tag", str(CLIP), str(CLIP.with_name("robin.ogg")), "-c", FINETUNED, "--events", "-f", "dcase",
          "--event-threshold", "0.9", "-o", str(tsv))  # fmt: skip
    rows = list(csv.DictReader(tsv.open(), delimiter="\t"))
    assert {r["filename"] for r in rows} == {str(CLIP), str(CLIP.with_name("robin.ogg"))}
    bad = sslam(
        "tag",
        str(CLIP),
        str(CLIP.with_name("robin.ogg")),
        "-c",
        FINETUNED,
        "--events",
        "-f",
        "audacity",
        check=2,
    )
    assert "one file" in bad.stderr
    assert "--events" in sslam("tag", str(CLIP), "-c", FINETUNED, "-f", "dcase", check=2).stderr


@pytest.mark.slow
def test_raven_selections_number_on_over_files():
    clips = [str(CLIP), str(CLIP.with_name("robin.ogg"))]
    args = ["tag", *clips, "-c", FINETUNED, "--events", "-f", "raven", "--event-threshold", "0.9"]
    rows = list(csv.DictReader(io.StringIO(sslam(*args).stdout), delimiter="\t"))
    assert [int(r["Selection"]) for r in rows] == list(range(1, len(rows) + 1))
    assert {r["Begin File"] for r in rows} == set(clips)


@pytest.mark.slow
def test_per_class_thresholds(tmp_path):
    from sslam_core.inference.events import read_thresholds

    a = np.array([0.0, 0.6, 0.6, 0.0, 0.3, 0.3, 0.0])
    scores = np.stack([a, a], axis=1)
    starts = np.arange(len(a)) * 0.1
    table = tmp_path / "thr.csv"
    table.write_text("label,threshold\nB,0.25\n")
    per = read_thresholds(str(table), LABELS)
    assert per == ((1, 0.25),)
    events = detect(starts, scores, 0.7, LABELS, EventOptions(0.5, step=0.1, per_class=per))
    assert [(e.label, e.onset, e.offset) for e in events] == [
        ("A", 0.1, 0.3), ("B", 0.1, 0.3), ("B", 0.4, 0.6),
    ]  # fmt: skip
    table.write_text("Z,0.3\n")
    with pytest.raises(ValueError, match="line 1"):
        read_thresholds(str(table), LABELS)
    bad = sslam("tag", str(CLIP), "-c", FINETUNED, "--events", "--event-threshold", str(table), check=2)
    assert "--event-threshold" in bad.stderr and "line 1" in bad.stderr and "Traceback" not in bad.stderr


def test_token_steps_keep_the_clip_scores_and_cover_every_step():
    import torch

    from sslam_core.audio.constants import STEP_SECONDS
    from sslam_core.inference.events import check_token_scores, result_step_scores, tag_token_steps
    from sslam_core.inference.tagging import tag
    from sslam_core.models.transformer import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(embed_dim=32, depth=1, num_heads=2, num_classes=3, pool="mean")).eval()
    check_token_scores(model)
    plain = next(tag(model, [str(CLIP)], target_length=208, hop=208))
    steps = next(tag_token_steps(model, [str(CLIP)], target_length=208, hop=208))
    np.testing.assert_allclose(steps.scores, plain.scores, rtol=1e-5)
    assert len(steps.segments) == len(plain.segments) == 5  # 10 s in 2.08 s windows
    starts = np.array([a for a, _, _ in steps.steps])
    np.testing.assert_allclose(starts, np.arange(len(starts)) * STEP_SECONDS, atol=1e-9)
    assert len(starts) == int(np.ceil(plain.duration / STEP_SECONDS - 1e-9))
    times, scores = result_step_scores(steps)
    assert scores.shape == (len(starts), 3) and not np.isnan(scores).any()
    assert scores.std(axis=0).max() > 0  # per-step scores vary, unlike one window's score
    with pytest.raises(ValueError, match="mean pooling"):
        check_token_scores(build_model(ModelConfig(embed_dim=32, depth=1, num_heads=2, num_classes=3)))


def dense_step_scores(segments, duration, step=0.16):
    """The definition of step scores, written the direct way (a windows x steps cover matrix): the
    reference the linear implementation must equal."""
    n = max(1, int(np.ceil(duration / step - 1e-9)))
    starts = np.arange(n) * step
    centres = np.minimum(starts + step / 2, duration)
    spans = np.array([(a, b) for a, b, _ in segments])
    scores = np.stack([s for _, _, s in segments]).astype(np.float64)
    covers = (spans[:, :1] <= centres[None]) & (centres[None] <= spans[:, 1:])
    count = covers.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return starts, np.where(
            count[:, None] > 0, (covers.T.astype(float) @ scores) / count[:, None], np.nan
        )


def random_windows(rng, duration, window, hop, classes):
    segments, t = [], 0.0
    while t < duration:
        segments.append((t, min(t + window, duration), rng.uniform(0, 1, classes).astype(np.float32)))
        t += hop
    return segments


def test_events_from_windows_equal_the_dense_definition():
    from sslam_core.inference.events import detect_from_windows

    rng = np.random.default_rng(0)
    labels = [(f"/m/{i}", f"c{i}") for i in range(12)]
    for trial in range(25):
        duration = float(rng.uniform(1, 90))
        window = float(rng.choice([2.56, 5.12, 10.24]))
        hop = window / float(rng.choice([1, 2, 4])) * float(rng.choice([1, 1.5]))  # gaps when > window
        segments = random_windows(rng, duration, window, hop, len(labels))
        off = None if trial % 2 else 0.25
        options = EventOptions(
            float(rng.uniform(0.3, 0.7)), off, float(rng.choice([0, 0.48, 0.8])), 0.16, 0.32
        )
        starts, dense = dense_step_scores(segments, duration)
        np.testing.assert_allclose(step_scores(segments, duration)[1], dense, atol=1e-12)
        expected = detect(starts, dense, duration, labels, options)
        assert detect_from_windows(segments, duration, labels, options) == expected


@pytest.mark.slow
def test_events_of_a_two_hour_file_take_memory_of_one_class_not_of_all():
    """Step scores of all classes at once grew with steps x classes (and the cover matrix with windows
    x steps): 1.9 GB and 24 s for two hours of AudioSet windows. Class by class it is a few MB."""
    import tracemalloc

    from sslam_core.inference.events import detect_from_windows

    rng = np.random.default_rng(1)
    segments = random_windows(rng, 7200.0, 10.24, 2.56, 527)
    labels = [(f"/m/{i}", f"c{i}") for i in range(527)]
    tracemalloc.start()
    try:
        detect_from_windows(segments, 7200.0, labels, EventOptions(0.9))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64e6, f"{peak / 1e6:.0f} MB"


@pytest.mark.slow
def test_tag_events_of_a_long_file_use_the_memory_plain_tag_uses(tmp_path):
    """`sslam tag --events` on a 2-hour recording: its peak memory stays within plain `tag`'s (it used
    to need gigabytes more for the dense step scores of 527 classes)."""
    import subprocess
    import sys

    import soundfile as sf

    long = tmp_path / "two_hours.wav"
    rng = np.random.default_rng(2)
    with sf.SoundFile(long, "w", 16000, 1, subtype="PCM_16") as f:
        for _ in range(120):
            f.write((0.05 * rng.standard_normal(16000 * 60)).astype(np.float32))
    code = (
        "import resource, sys\n"
        "from typer.testing import CliRunner\n"
        "from sslam_cli.main import app\n"
        "r = CliRunner().invoke(app, sys.argv[1:])\n"
        "assert r.exit_code == 0, r.stderr\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    common = [str(long), "-c", str(ROOT / "tests/fixtures/checkpoints/tiny_finetuned.pt"), "-f", "json"]
    peaks = {}
    for name, extra in (("tag", ["--hop", "2.56"]), ("events", ["--events"])):
        out = subprocess.run(
            [sys.executable, "-c", code, "tag", *common, *extra], capture_output=True, text=True, check=True
        )
        peaks[name] = int(out.stdout.strip().splitlines()[-1]) * 1024  # KiB on Linux
    assert peaks["events"] < peaks["tag"] + 150e6, {k: f"{v / 1e6:.0f} MB" for k, v in peaks.items()}
