"""Figures (`evaluation.plots`) and the outputs of `sslam plot`, `sslam stats -o` and `sslam pack`."""

from __future__ import annotations

import errno
import json
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from conftest import DATA, sslam
from matplotlib.text import Text  # noqa: E402

from sslam_core.evaluation import plots  # noqa: E402
from sslam_core.evaluation.plots import curve_groups, plot_class_ap, plot_timeline, plot_training_curves  # noqa: E402

DIGITS = sorted(str(p) for p in (DATA / "polydigits" / "audio").glob("*.wav"))
PNG = b"\x89PNG\r\n\x1a\n"
LABELS = [(f"/m/{i}", f"class {i}") for i in range(6)]

# Lines as `sslam pretrain` (EAT, tiny) and `sslam finetune` (multi-label and multi-class) log them.
PRETRAIN_LOG = [
    {"step": 2 * i, "epoch": i // 2, "lr": 1e-4 * i, "loss": 90.0 - i, "patch": 34.0 - i, "cls": 56.0,
     "grad_norm": 80.0 / i, "ema_decay": 0.99984 + 1e-5 * i, "clips_per_s": 26.2}
    for i in range(1, 16)
]  # fmt: skip
FINETUNE_LOG = [
    {"step": 10, "epoch": 4, "lr": 4.4e-05, "loss": 0.693, "grad_norm": 0.02, "clips_per_s": 60.1},
    {"step": 12, "eval/mAP": 0.8, "eval/AUC": 0.9, "eval/d_prime": 1.8, "eval/n_clips": 3.0},
    {"step": 20, "epoch": 9, "lr": 3.2e-05, "loss": 0.683, "grad_norm": 2.77, "clips_per_s": 88.0},
    {
        "step": 24,
        "eval/mAP": 0.9,
        "eval/AUC": float("nan"),
        "eval/d_prime": float("nan"),
        "eval/n_clips": 3.0,
    },
    {"step": 24, "eval/accuracy": 0.33, "eval/top5": 1.0, "eval/n_clips": 3.0},
]


def tagged(duration: float, windows: list[tuple[float, float]]) -> SimpleNamespace:
    """A TagResult-like object whose window k scores class c as (k + 1) / 10 + c / 100."""
    segments = [(a, b, (k + 1) / 10 + np.arange(6) / 100) for k, (a, b) in enumerate(windows)]
    scores = np.max([s for _, _, s in segments], axis=0)
    return SimpleNamespace(path="dir/clip.wav", duration=duration, scores=scores, segments=segments)


def mesh_x(fig) -> np.ndarray:
    """Column edges (seconds) of the heatmap drawn in `fig`."""
    return fig.axes[0].collections[0].get_coordinates()[0, :, 0]


def texts(fig) -> str:
    return " | ".join(t.get_text() for t in fig.findobj(Text))


def test_timeline_draws_windows_at_their_real_times(tmp_path):
    res = tagged(11.0, [(0.0, 10.24), (10.24, 11.0)])  # an 11 s file, 10.24 s windows
    fig = plot_timeline(res, LABELS, tmp_path / "t.png", top_k=3)
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG
    assert np.allclose(mesh_x(fig), [0.0, 10.24, 11.0])  # not 5.5 s
    assert fig.axes[0].get_xlim() == (0.0, 11.0)
    cells = fig.axes[0].collections[0].get_array().reshape(3, 2)
    assert np.allclose(cells[:, 1], 0.2 + np.array([5, 4, 3]) / 100)  # top classes first, 2nd window


def test_timeline_overlap_takes_the_max_and_gaps_stay_empty(tmp_path):
    overlapping = [(0.0, 10.24), (5.12, 15.36), (10.24, 20.0), (15.36, 20.0)]
    edges, grid, overlap = plots.timeline_grid(tagged(20.0, overlapping).segments, [5])
    assert overlap and np.allclose(edges, [0.0, 5.12, 10.24, 15.36, 20.0])
    assert np.allclose(grid[0], [0.15, 0.25, 0.35, 0.45])  # later windows score higher here
    fig = plot_timeline(tagged(20.0, overlapping), LABELS, tmp_path / "o.png")
    assert "max over overlapping windows" in fig.axes[1].get_ylabel()  # the colour bar says so

    abutting = [(t, t + 10.24, np.zeros(6)) for t in np.arange(0.0, 200.0, 10.24)]  # t + 10.24 != next t
    edges, _, overlap = plots.timeline_grid(abutting, [0])
    assert not overlap and len(edges) == len(abutting) + 1

    gaps = tagged(25.0, [(0.0, 5.0), (10.0, 15.0), (20.0, 25.0)])  # hop 10 s, window 5 s
    fig = plot_timeline(gaps, LABELS, tmp_path / "g.png")
    assert np.allclose(mesh_x(fig), [0, 5, 10, 15, 20, 25])
    cells = fig.axes[0].collections[0].get_array()
    assert cells.mask.reshape(6, 5)[:, [1, 3]].all() and not cells.mask.reshape(6, 5)[:, [0, 2, 4]].any()
    assert "grey: no window" in texts(fig) and "max over" not in fig.axes[1].get_ylabel()


def test_curve_panels_hold_one_kind_of_quantity_each(tmp_path):
    groups = curve_groups(PRETRAIN_LOG)
    assert groups == {
        "loss": ["loss", "patch", "cls"],
        "learning rate": ["lr"],
        "EMA decay": ["ema_decay"],
        "other": ["grad_norm"],
    }
    groups = curve_groups(FINETUNE_LOG)
    assert groups["validation"] == ["eval/mAP", "eval/AUC", "eval/accuracy", "eval/top5"]
    assert groups["d'"] == ["eval/d_prime"]
    assert not any("n_clips" in k for keys in groups.values() for k in keys)
    assert "eval/n_clips" in plots.unplotted_keys(FINETUNE_LOG)

    fig = plot_training_curves(PRETRAIN_LOG + FINETUNE_LOG[1:2], tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert labels == ["loss", "score (0 to 1)", "d' (sensitivity index)", "learning rate",
                      "EMA teacher decay", "gradient norm (L2, before clipping)"]  # fmt: skip
    ticks = fig.axes[-1].get_xticks()
    assert len(ticks) >= 3 and np.allclose(ticks, np.round(ticks))  # whole steps only
    ema = fig.axes[4]
    assert ema.yaxis.get_major_formatter().get_offset() == ""  # 0.99985, not "1e-5 + 0.9998"


def test_class_plot_shows_the_reported_metric_and_class_names(tmp_path):
    names = ["dog", "rooster", "rain", "sea waves"]
    rows = [
        {"name": n, "mid": n, "positives": 8, "AP": 0.2 * (i + 1), "AUC": 0.5, "accuracy": 0.25 * i}
        for i, n in enumerate(names)
    ]
    fig = plot_class_ap(rows, tmp_path / "mc.png", metric_name="accuracy", metric_value=0.62)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{n} (8)" for n in names]
    assert [p.get_width() for p in ax.patches] == [0.0, 0.25, 0.5, 0.75]  # per-class accuracy bars
    assert "accuracy 0.620" in texts(fig) and "mAP" not in texts(fig)

    many = [{"name": f"c{i}", "mid": f"/m/{i}", "positives": 3, "AP": i / 40, "AUC": 0.5} for i in range(40)]
    fig = plot_class_ap(many, tmp_path / "ml.png", worst=10, metric_value=0.4875)
    assert "mAP 0.487" in texts(fig) or "mAP 0.488" in texts(fig)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()][:2] == ["c0 (3)", "c1 (3)"]
    assert len(fig.axes[1].get_xticks()) == 0  # no rank numbers that look like class ids


def test_plot_command_claims_its_output_and_writes_atomically(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PRETRAIN_LOG))
    out = tmp_path / "figs [v1]" / "deep" / "curves.png"
    result = sslam("plot", run, "-o", out)
    assert out.read_bytes()[:8] == PNG and f"wrote {out}" in result.stderr  # brackets printed as-is
    assert "EMA decay: ema_decay" in result.stderr and "not plotted" in result.stderr
    out.write_bytes(b"keep")
    refused = sslam("plot", run, "-o", out, code=2)
    assert "exists; pass --overwrite" in refused.stderr and out.read_bytes() == b"keep"
    sslam("plot", run, "-o", out, "--overwrite")
    assert out.read_bytes()[:8] == PNG

    import matplotlib.figure

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    failed = sslam("plot", run, "-o", out, "--overwrite", code=2)
    assert failed.stderr.strip().count("\n") == 0 and "no space left on device" in failed.stderr
    assert out.read_bytes()[:8] == PNG  # the old figure is untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["curves.png"]  # no temporary file left


def test_stats_output_file(tmp_path):
    out = tmp_path / "new" / "stats.json"
    args = ["stats", DIGITS[0], "--format", "json", "--device", "cpu", "-o", out]
    assert sslam(*args).stdout == ""
    assert json.loads(out.read_text())["files"] == 1
    out.write_text("keep")
    assert "exists; pass --overwrite" in sslam(*args, code=2).stderr and out.read_text() == "keep"
    sslam(*args, "--overwrite")
    assert json.loads(out.read_text())["files"] == 1


def test_pack_refuses_to_replace_shards_of_other_inputs(tmp_path, monkeypatch):
    out = tmp_path / "packed"
    sslam("pack", *DIGITS[:2], "-o", out, "--shard-size", "2", "-q")
    before = (out / "shard-00000.h5").read_bytes()
    assert "already done" in sslam("pack", *DIGITS[:2], "-o", out, "--shard-size", "2", "-q").stdout
    refused = sslam("pack", *DIGITS[1:], "-o", out, "--shard-size", "2", "-q", code=2)
    assert "packed from other inputs (shard-00000.h5)" in refused.stderr and "--overwrite" in refused.stderr
    assert (out / "shard-00000.h5").read_bytes() == before
    sslam("pack", *DIGITS[1:], "-o", out, "--shard-size", "2", "-q", "--overwrite")
    assert (out / "shard-00000.h5").read_bytes() != before
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in sslam("pack", *DIGITS, "-o", tmp_path / "file", code=2).stderr

    import sslam_core.data.packing

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sslam_core.data.packing, "pack_audio", full_disk)
    failed = sslam("pack", *DIGITS, "-o", tmp_path / "p2", "-q", code=2)
    assert failed.stderr.strip() == f"error: {tmp_path / 'p2'}: cannot write (no space left on device)"
