"""PNG figures: tag heatmaps over time, per-class scores, training curves (matplotlib, an optional extra).

Every function writes its PNG atomically (`outputs.atomic_write`: a temporary file renamed over the
target, so an OSError such as a full disk leaves no partial file and raises `OutputError`) and returns
the matplotlib Figure (already closed), whose artists tests can inspect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sslam_core.errors import SslamError

DPI = 120


class PlotError(SslamError, RuntimeError):
    """A figure that cannot be drawn: matplotlib missing (the `plot` extra), or nothing to plot."""


def pyplot():
    """matplotlib.pyplot with a file-only backend, or a clear error naming the extra to install."""
    try:
        import matplotlib
    except ImportError as e:
        raise PlotError("plotting needs matplotlib: pip install 'sslam[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path) -> None:
    """Write `fig` to `path` as PNG through a temporary file and a rename, then close it."""
    from sslam_core.runs.outputs import atomic_write

    plt = pyplot()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    finally:
        plt.close(fig)


def timeline_grid(segments: Sequence[tuple[float, float, np.ndarray]], rows: Sequence[int]):
    """Scores of classes `rows` over time: (edges, grid, overlap) where `edges` are the times (s) at
    which any window starts or ends, `grid[r, i]` is the max score of class `rows[r]` over the windows
    covering [edges[i], edges[i + 1]] (NaN where no window does: a hop longer than the window) and
    `overlap` says whether some interval is covered by more than one window."""
    if not segments:
        raise PlotError("no windows to plot")
    spans = np.round(np.array([(a, b) for a, b, _ in segments], dtype=np.float64), 6)  # to the microsecond
    edges = np.unique(spans)
    if len(edges) == 1:  # a single zero-length window
        edges = np.array([edges[0], edges[0] + 1e-3])
    rows = np.asarray(rows, dtype=np.int64)
    grid = np.full((len(rows), len(edges) - 1), np.nan)
    overlap = False
    for i, (t0, t1) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        covering = [s[rows] for (a, b), (_, _, s) in zip(spans, segments, strict=True) if a <= t0 and b >= t1]
        if covering:
            grid[:, i] = np.max(covering, axis=0)
            overlap |= len(covering) > 1
    return edges, grid, overlap


def _annotate_cells(ax, edges: np.ndarray, grid: np.ndarray, duration: float, width_in: float) -> None:
    """Write each score in its cell when the cell is wide enough (about half an inch) to hold it."""
    for i, (t0, t1) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        if (min(t1, duration) - t0) / duration * width_in < 0.45:
            continue
        for r, value in enumerate(grid[:, i]):
            if not np.isnan(value):
                colour = "black" if value > 0.6 else "white"
                ax.text((t0 + min(t1, duration)) / 2, r, f"{value:.2f}", ha="center", va="center",
                        fontsize="small", color=colour)  # fmt: skip


def plot_timeline(result, labels: Sequence[tuple[str, str]], path: str | Path, top_k: int = 10):
    """Heatmap of the file's top classes (rows) over time, each window drawn at its real start and end
    in seconds; where windows overlap a time step shows the max of their scores (as the clip score
    does), and time no window covers is left grey."""
    plt = pyplot()
    from matplotlib.colors import Normalize

    top = np.argsort(-result.scores, kind="stable")[:top_k]
    edges, grid, overlap = timeline_grid(result.segments, top)
    duration = max(float(result.duration or 0.0), float(edges[-1]))
    names = [labels[i][1] for i in top]
    fig, ax = plt.subplots(figsize=(10.0, 0.32 * len(top) + 1.9))
    ax.set_facecolor("0.85")
    mesh = ax.pcolormesh(
        edges,
        np.arange(len(top) + 1) - 0.5,
        np.ma.masked_invalid(grid),
        cmap="magma",
        norm=Normalize(0.0, 1.0),
        shading="flat",
    )
    ax.set_xlim(0.0, duration)
    ax.set_ylim(len(top) - 0.5, -0.5)
    ax.set_yticks(range(len(top)), names)
    for start, _, _ in result.segments[1:] if len(result.segments) <= 60 else ():
        ax.axvline(start, color="white", linewidth=0.6, alpha=0.5)
    _annotate_cells(ax, edges, grid, duration, fig.get_figwidth() * 0.7)
    ax.set_xlabel("time (s)")
    n = len(result.segments)
    width = max(b - a for a, b, _ in result.segments)
    detail = "one window" if n == 1 else f"{n} windows of up to {width:.2f} s"
    if n > 1:
        detail += f" every {result.segments[1][0] - result.segments[0][0]:.2f} s"
    if np.isnan(grid).any():
        detail += "; grey: no window"
    ax.set_title(f"{Path(str(result.path)).name} ({duration:.2f} s): {detail}", fontsize="medium")
    label = "score (max over overlapping windows)" if overlap else "score"
    fig.colorbar(mesh, ax=ax, label=label, pad=0.02)
    fig.tight_layout()
    save_png(fig, path)
    return fig


def plot_class_ap(
    rows: Sequence[dict],
    path: str | Path,
    worst: int = 25,
    title: str = "",
    metric_name: str = "mAP",
    metric_value: float | None = None,
):
    """Per-class scores, worst first, with the metric the text output reports.

    `rows` are `classification.per_class` rows. With `metric_name="mAP"` the bars are each
    class's AP (classes without positives left out) and the line is the mAP; with
    `metric_name="accuracy"` (multi-class) they are each class's accuracy and the line is the accuracy
    over all clips (`metric_value`). Up to `worst` classes are drawn by name; with more, a second panel
    shows every class, sorted, without names.
    """
    plt = pyplot()
    key = "accuracy" if metric_name == "accuracy" and any("accuracy" in r for r in rows) else "AP"
    scored = sorted(
        (r for r in rows if r.get(key) is not None and not math.isnan(r[key])), key=lambda r: r[key]
    )
    if not scored:
        raise PlotError("no class has a positive clip, so there is no per-class score to plot")
    values = np.array([r[key] for r in scored])
    if metric_value is None:
        metric_value = float(values.mean()) if key == "AP" else None
    what = "average precision" if key == "AP" else "accuracy (fraction of its clips right)"
    shown = scored[:worst]
    whole = len(scored) > len(shown)
    height = max(3.0, 0.24 * len(shown) + 1.6)
    if whole:
        fig, (names_ax, all_ax) = plt.subplots(
            1, 2, figsize=(12, height), gridspec_kw={"width_ratios": [2, 3]}
        )
    else:
        fig, names_ax = plt.subplots(figsize=(8, height))
    names_ax.barh(np.arange(len(shown)), [r[key] for r in shown], color="tab:orange")
    names_ax.set_yticks(
        np.arange(len(shown)), [f"{r['name']} ({r['positives']})" for r in shown], fontsize="small"
    )
    names_ax.set_ylim(len(shown) - 0.5, -0.5)
    names_ax.set_xlim(0.0, 1.0)
    names_ax.set_xlabel(f"{what}; (n) = clips of the class")
    for i, r in enumerate(shown):
        names_ax.text(r[key] + 0.01, i, f"{r[key]:.2f}", va="center", fontsize="x-small")
    heading = f"{len(shown)} worst classes" if whole else f"all {len(shown)} classes, worst first"
    axes = [names_ax]
    if whole:
        all_ax.bar(np.arange(len(values)), values, width=1.0, color="tab:blue")
        all_ax.set_xticks([])
        all_ax.set_xlim(-0.5, len(values) - 0.5)
        all_ax.set_xlabel(f"{len(values)} classes, sorted by {key} (worst left)")
        all_ax.set_ylabel(what)
        all_ax.set_ylim(0.0, 1.0)
        axes.append(all_ax)
    if metric_value is not None:
        reported = f"{metric_name} {metric_value:.3f}" + (" over all clips" if key == "accuracy" else "")
        names_ax.axvline(metric_value, color="tab:red", linestyle="--")
        if whole:
            all_ax.axhline(metric_value, color="tab:red", linestyle="--")
            all_ax.set_title(f"every class; dashed: {reported}", fontsize="medium")
        else:
            heading += f"; dashed: {reported}"
    names_ax.set_title(heading, fontsize="medium")
    for ax in axes:
        ax.grid(alpha=0.3, axis="x" if ax is names_ax else "y")
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    save_png(fig, path)
    return fig


_NOT_PLOTTED = {"step", "epoch", "clips_per_s", "time", "elapsed", "samples", "seconds"}
_VALID_PREFIXES = ("valid_", "valid/", "val_", "val/", "eval/", "eval_", "test_")
_LOSS_TERMS = {"patch", "cls", "srl", "frame", "utterance"}  # pre-training loss terms
_FRACTION_METRICS = {"map", "auc", "accuracy", "acc", "top5", "top_k", "top1", "balanced_accuracy", "f1"}
_COUNTS = ("n_", "num_", "count")

# Panel name -> y-axis label (with units).
PANEL_LABELS = {
    "loss": "loss",
    "validation": "score (0 to 1)",
    "d'": "d' (sensitivity index)",
    "learning rate": "learning rate",
    "EMA decay": "EMA teacher decay",
    "other": "value",
}


def _bare(key: str) -> str:
    """`eval/mAP` -> `map`: the metric's name without its prefix, lower-case."""
    for prefix in _VALID_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    return key.lower()


def _finite(value) -> bool:
    """A number worth plotting: int or float (not bool), not NaN or infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(key: str) -> bool:
    bare = _bare(key)
    return bare.startswith(_COUNTS) or bare.endswith(("_clips", "_classes"))


def curve_groups(records: Sequence[dict]) -> dict[str, list[str]]:
    """Metric names of a metrics.jsonl log grouped into panels of one kind of quantity each: loss,
    validation (scores in [0, 1]: mAP, AUC, accuracy), d', learning rate, EMA decay, other. Counts such
    as `eval/n_clips` and throughput are left out (see `unplotted_keys`)."""
    names: list[str] = []
    for record in records:
        for key, value in record.items():
            if _finite(value) and key not in _NOT_PLOTTED and not _is_count(key) and key not in names:
                names.append(key)
    groups: dict[str, list[str]] = {name: [] for name in PANEL_LABELS}
    for key in names:
        bare = _bare(key)
        if "loss" in bare or bare in _LOSS_TERMS:
            groups["loss"].append(key)
        elif bare in ("d_prime", "dprime", "d'"):
            groups["d'"].append(key)
        elif key.startswith(_VALID_PREFIXES) or bare in _FRACTION_METRICS:
            groups["validation"].append(key)
        elif key == "lr" or key.startswith(("lr_", "lr/")):
            groups["learning rate"].append(key)
        elif "ema" in bare and "decay" in bare:
            groups["EMA decay"].append(key)
        else:
            groups["other"].append(key)
    return {name: keys for name, keys in groups.items() if keys}


def unplotted_keys(records: Sequence[dict]) -> list[str]:
    """Numeric keys of the log that `plot_training_curves` leaves out (step, counts, throughput)."""
    plotted = {k for keys in curve_groups(records).values() for k in keys}
    seen: list[str] = []
    for record in records:
        for key, value in record.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and key not in plotted and key != "step" and key not in seen:
                seen.append(key)
    return seen


def _other_label(keys: Sequence[str]) -> str:
    if list(keys) == ["grad_norm"]:
        return "gradient norm (L2, before clipping)"
    return PANEL_LABELS["other"]


def plot_training_curves(records: Sequence[dict], path: str | Path, title: str = ""):
    """One panel per kind of logged quantity (loss terms, validation scores, d', learning rate, EMA
    decay, others) against the update step."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    groups = curve_groups(records)
    if not groups:
        raise PlotError("the log holds no numeric values to plot")
    fig, axes = plt.subplots(
        len(groups), 1, figsize=(10, 2.3 * len(groups) + 0.8), sharex=True, squeeze=False
    )
    for ax, (group, keys) in zip(axes[:, 0], groups.items(), strict=True):
        for key in keys:
            points = [(r.get("step", i), r[key]) for i, r in enumerate(records) if _finite(r.get(key))]
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            dashed = key.startswith(_VALID_PREFIXES) and group == "loss"
            marker = "o" if len(points) < 30 else None
            ax.plot(steps, values, label=key, linestyle="--" if dashed else "-", marker=marker, markersize=3)
        ax.set_ylabel(_other_label(keys) if group == "other" else PANEL_LABELS[group], fontsize="small")
        if group == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        elif group == "EMA decay":
            formatter = ScalarFormatter(useOffset=False)
            formatter.set_scientific(False)
            ax.yaxis.set_major_formatter(formatter)
        elif group == "validation":
            low = min(line.get_ydata().min() for line in ax.get_lines())
            ax.set_ylim(0.0 if low >= 0 else None, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("step (optimiser updates)")
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    save_png(fig, path)
    return fig


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
