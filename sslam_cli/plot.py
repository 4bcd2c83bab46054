"""`sslam plot`: a PNG of a training run's curves (loss terms, learning rate, validation metrics)."""

from __future__ import annotations

from pathlib import Path

import typer

from sslam_cli.common import err_console, fail


def plot(
    run_dir: Path = typer.Argument(
        ..., help="Training run folder (holding metrics.jsonl) or the log itself."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="PNG file to write."),
) -> None:
    """Plot the curves logged in RUN_DIR/metrics.jsonl against the step."""
    from sslam_core.plots import curve_groups, plot_training_curves, read_metrics_log

    log = run_dir if run_dir.is_file() else run_dir / "metrics.jsonl"
    if not log.is_file():
        fail(f"{run_dir}: no metrics.jsonl (is this a training run folder?)")
    if output.suffix.lower() != ".png":
        fail(f"{output}: expected a .png file")
    try:
        records = read_metrics_log(log)
    except (OSError, UnicodeDecodeError) as e:
        fail(f"{log}: cannot read ({e})")
    if not records or not curve_groups(records):
        fail(f"{log}: no logged values to plot")
    plot_training_curves(records, output, title=str(run_dir))
    panels = ", ".join(f"{name}: {' '.join(keys)}" for name, keys in curve_groups(records).items())
    err_console.print(f"wrote {output} ({len(records)} log lines; {panels})")
