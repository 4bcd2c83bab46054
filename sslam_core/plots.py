"""PNG figures: tag heatmaps over time, per-class AP, training curves (matplotlib, an optional extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot with a file-only backend, or a clear error naming the extra to install."""
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("plotting needs matplotlib: pip install 'sslam[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_timeline(result, labels: Sequence[tuple[str, str]], path: str | Path, top_k: int = 10) -> None:
    """Heatmap of the file's top classes (rows) over its windows (columns)."""
    plt = pyplot()
    top = np.argsort(-result.scores, kind="stable")[:top_k]
    grid = np.stack([s[top] for _, _, s in result.segments], axis=1)
    starts = [a for a, _, _ in result.segments]
    end = result.segments[-1][1]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(starts) + 3), 0.35 * len(top) + 1.5))
    extent = (0.0, max(end, starts[-1] + 1e-3), len(top) - 0.5, -0.5)
    im = ax.imshow(
        grid, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0, extent=extent, interpolation="nearest"
    )
    ax.set_yticks(range(len(top)), [labels[i][1] for i in top])
    ax.set_xlabel("time (s)")
    ax.set_title(str(result.path))
    fig.colorbar(im, ax=ax, label="score")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_class_ap(rows: Sequence[dict], path: str | Path, worst: int = 25, title: str = "") -> None:
    """Per-class AP: every class's AP sorted (left) and the `worst` classes by name (right).

    `rows` are `sslam_core.evaluation.per_class` rows; classes without positives are left out.
    """
    plt = pyplot()
    scored = sorted((r for r in rows if not np.isnan(r["AP"])), key=lambda r: r["AP"])
    if not scored:
        raise ValueError("no class has a positive clip, so there is no AP to plot")
    ap = np.array([r["AP"] for r in scored])
    shown = scored[:worst]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(12, max(4.0, 0.28 * len(shown) + 1.5)), gridspec_kw={"width_ratios": [3, 2]}
    )
    left.bar(np.arange(len(ap)), ap, width=1.0, color="tab:blue")
    left.axhline(ap.mean(), color="tab:red", linestyle="--", label=f"mAP {ap.mean():.3f}")
    left.set_xlabel(f"class (sorted by AP, {len(ap)} with positives)")
    left.set_ylabel("average precision")
    left.set_ylim(0.0, 1.0)
    left.set_xlim(-0.5, len(ap) - 0.5)
    left.legend(loc="upper left")
    right.barh(np.arange(len(shown)), [r["AP"] for r in shown], color="tab:orange")
    right.set_yticks(
        np.arange(len(shown)), [f"{r['name']} ({r['positives']})" for r in shown], fontsize="small"
    )
    right.invert_yaxis()
    right.set_xlim(0.0, 1.0)
    right.set_xlabel("AP (positives)")
    right.set_title(f"{len(shown)} worst classes")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_NOT_PLOTTED = {"step", "epoch", "clips_per_s", "time", "elapsed", "samples"}
_VALID_PREFIXES = ("valid_", "valid/", "val_", "val/", "eval/", "eval_", "test_")


def curve_groups(records: Sequence[dict]) -> dict[str, list[str]]:
    """Metric names of a metrics.jsonl log grouped into panels: loss, validation, lr, other."""
    names: list[str] = []
    for record in records:
        for key, value in record.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and key not in _NOT_PLOTTED and key not in names:
                names.append(key)
    groups: dict[str, list[str]] = {"loss": [], "validation": [], "learning rate": [], "other": []}
    for key in names:
        if key.startswith(_VALID_PREFIXES):
            groups["loss" if "loss" in key else "validation"].append(key)
        elif "loss" in key:
            groups["loss"].append(key)
        elif key == "lr" or key.startswith(("lr_", "lr/")):
            groups["learning rate"].append(key)
        else:
            groups["other"].append(key)
    return {name: keys for name, keys in groups.items() if keys}


def plot_training_curves(records: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Loss terms, validation metrics, learning rate and other logged values against the step."""
    plt = pyplot()
    groups = curve_groups(records)
    if not groups:
        raise ValueError("the log holds no numeric values to plot")
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 2.6 * len(groups) + 0.6), sharex=True, squeeze=False)
    for ax, (group, keys) in zip(axes[:, 0], groups.items(), strict=True):
        for key in keys:
            points = [
                (r.get("step", i), r[key])
                for i, r in enumerate(records)
                if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])
            ]
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            dashed = key.startswith(_VALID_PREFIXES) and group == "loss"
            marker = "o" if len(points) < 30 else None
            ax.plot(steps, values, label=key, linestyle="--" if dashed else "-", marker=marker, markersize=3)
        ax.set_ylabel(group)
        if group == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_metrics_log(path: str | Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl file, skipping unreadable lines (e.g. a half-written last one)."""
    import json

    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
