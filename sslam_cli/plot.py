"""`sslam plot`: a PNG of a training run's curves (loss terms, learning rate, validation metrics)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sslam_cli.options import check_plot_output, claim_or_fail, fail, note


def plot(
    run_dir: Annotated[
        Path, typer.Argument(help="Training run folder (holding metrics.jsonl) or the log itself.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write (folders are created).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")] = False,
) -> None:
    """Plot the curves logged in RUN_DIR/metrics.jsonl against the step, one panel per kind of value."""
    log = run_dir if run_dir.is_file() else run_dir / "metrics.jsonl"
    if not log.is_file():
        fail(f"{run_dir}: no metrics.jsonl (is this a training run folder?)")
    check_plot_output(output, "--output")
    claim_or_fail(output, overwrite)
    from sslam_core.evaluation.plots import (
        curve_groups,
        plot_training_curves,
        read_metrics_log,
        unplotted_keys,
    )

    try:
        records = read_metrics_log(log)
    except (OSError, UnicodeDecodeError) as e:
        from sslam_core.runs.outputs import os_reason

        fail(f"{log}: cannot read ({os_reason(e) if isinstance(e, OSError) else e})")
    groups = curve_groups(records)
    if not records or not groups:
        fail(f"{log}: no logged values to plot")
    try:
        plot_training_curves(records, output, title=str(run_dir))
    except (OSError, RuntimeError) as e:
        fail(str(e))
    panels = "; ".join(f"{name}: {' '.join(keys)}" for name, keys in groups.items())
    left_out = unplotted_keys(records)
    note(f"wrote {output} ({len(records)} log lines; {panels})")
    if left_out:
        note(f"not plotted (step counters, counts, throughput or no finite value): {' '.join(left_out)}")
