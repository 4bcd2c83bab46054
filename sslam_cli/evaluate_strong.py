"""`sslam eval --strong`: the events `sslam tag --events` finds, scored against DCASE strong labels."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.table import Table
from tqdm import tqdm

from sslam_cli.common import (
    EXIT_OK,
    EXIT_SKIPPED,
    cell,
    check_precision,
    err_console,
    fail,
    frames_or_fail,
    interrupted,
    load_model_or_fail,
    note,
    pick_device,
    pipeline_options,
    render,
    warn,
)
from sslam_cli.tag import event_options, events_hop, token_scores_or_fail
from sslam_core.audio.constants import frames_to_seconds


def evaluate_strong(
    checkpoint: str | None,
    strong: Path,
    audio_dir: Path | None,
    fmt: str,
    metric: dict,
    detection: dict,
    frames: dict,
    run: dict,
) -> None:
    """Run the model over the files of `strong` as `tag --events` would, score the events and the step
    scores (options in `metric`: collar, offset_collar_rate, segment_length), print a table or one
    JSON object; exits (status 1 when files were skipped)."""
    from sslam_core.data.datasets import read_labelled
    from sslam_core.data.label_formats import DatasetError
    from sslam_core.evaluation.classification import EvaluationError, class_columns
    from sslam_core.evaluation.strong import (
        SedUnavailable,
        StrongEvalError,
        StrongOptions,
        library,
        predict_events,
        read_strong_events,
        score_predictions,
    )
    from sslam_core.models.transformer import Classifier
    from sslam_core.runs.interrupts import StopRequest

    if checkpoint is None:
        fail("--strong scores a model's events: pass --checkpoint too")
    try:
        library()
        options = StrongOptions(**metric)
    except SedUnavailable as e:
        fail(str(e))
    except ValueError as e:
        fail(f"--strong: {e}")
    event_options(**detection, names=())
    try:
        truth = read_strong_events(str(strong))
        dataset = read_labelled(strong, audio_dir=audio_dir, multilabel=True)
    except (StrongEvalError, DatasetError) as e:
        fail(str(e))
    dev = pick_device(run["device"])
    check_precision(run["precision"], dev, int8=True)
    model = load_model_or_fail(checkpoint, dev, precision=run["precision"])
    if not isinstance(model, Classifier) or not model.labels:
        fail(f"{checkpoint}: events need a fine-tuned checkpoint with class names")
    found = event_options(**detection, names=model.labels)
    token_scores_or_fail(model, detection["frame_scores"])
    length, hop = frames_or_fail(model, frames["window"], frames["hop"], frames["target_length"])
    hop = events_hop(length, detection["frame_scores"]) if frames["hop"] is None else hop
    try:
        kept, cols = class_columns(model.labels, dataset, checkpoint)
    except EvaluationError as e:
        fail(str(e))
    if dataset.missing:
        note(f"note: {len(dataset.missing)} listed clip(s) have no audio under {dataset.root}")
    if not dataset.examples:
        fail(f"{strong}: no clips to evaluate")
    bar = tqdm(total=len(dataset), unit="clip", disable=len(dataset) < 2, file=err_console.file)

    def progress(error: str | None) -> None:
        if error is not None:
            bar.clear()
            warn(error)
        bar.update()

    with StopRequest() as stop:
        predictions, skipped = predict_events(
            model,
            [e.path for e in dataset.examples],
            [e.key for e in dataset.examples],
            model.labels,
            found,
            frame_scores=detection["frame_scores"],
            target_length=length,
            hop=hop,
            progress=progress,
            stop=lambda: stop.requested,
            **pipeline_options(run, dev, model, run["norm"]),
        )
        bar.close()
        if stop.requested:
            interrupted(stop, len(predictions) + len(skipped), resumable=False)
    if not predictions:
        fail(f"{strong}: all {len(skipped)} clip(s) were skipped (unreadable); nothing to evaluate")
    columns = {dataset.classes[i][1]: col for i, col in zip(kept, cols, strict=True)}
    try:
        summary = score_predictions(truth, predictions, model.labels, columns, options)
    except StrongEvalError as e:
        fail(str(e))
    summary.update(
        strong=str(strong), n_skipped=len(skipped), n_missing=len(dataset.missing),
        frame_scores=detection["frame_scores"], window=frames_to_seconds(length), hop=frames_to_seconds(hop),
    )  # fmt: skip
    if fmt == "json":
        typer.echo(json.dumps(summary))
    else:
        typer.echo(render(*_tables(summary)), nl=False)
    if skipped:
        note(f"evaluated {summary['n_clips']} clip(s), skipped {len(skipped)}")
        raise typer.Exit(EXIT_SKIPPED)
    raise typer.Exit(EXIT_OK)


def _number(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _tables(summary: dict) -> list[Table]:
    """The averaged metrics and the per-class table."""
    ev, seg, psds = summary["event_based"], summary["segment_based"], summary["psds"]
    table = Table(title=cell(f"strong evaluation: {summary['strong']}"), title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    collars = f"collar {ev['onset_collar']:g} s, offset {ev['offset_collar_rate']:g} x length"
    table.add_row(f"event-based F1, macro ({collars})", _number(ev["f1_macro"]))
    table.add_row("event-based F1, micro", _number(ev["f1_micro"]))
    table.add_row(f"segment-based F1, micro ({seg['segment_length']:g} s)", _number(seg["f1_micro"]))
    table.add_row("segment-based F1, macro", _number(seg["f1_macro"]))
    table.add_row(
        f"PSDS (dtc {psds['dtc_threshold']:g}, gtc {psds['gtc_threshold']:g})", _number(psds["value"])
    )
    for name, key in (("clips", "n_clips"), ("reference events", "n_reference_events"),
                      ("detected events", "n_detected_events"), ("files skipped (unreadable)", "n_skipped"),
                      ("clips missing (listed, no audio)", "n_missing")):  # fmt: skip
        table.add_row(name, str(summary[key]))
    per_class = Table(title="per class", title_justify="left")
    heads = ("class", "references", "detected", "event F1", "event P", "event R", "segment F1", "PSDS")
    for name in heads:
        per_class.add_column(name, justify="left" if name == "class" else "right")
    for c in summary["classes"]:
        per_class.add_row(
            cell(c["label"]), str(c["references"]), str(c["detections"]),
            *(_number(c[k]) for k in ("event_f1", "event_precision", "event_recall", "segment_f1", "psds")),
        )  # fmt: skip
    return [table, per_class]
