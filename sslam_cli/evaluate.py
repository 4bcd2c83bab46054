"""`sslam eval`: score a fine-tuned checkpoint on a labelled set (or re-score saved predictions)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import typer
from rich.table import Table
from tqdm import tqdm

from sslam_cli.common import (
    EXIT_OK,
    BatchSize,
    Device,
    Hop,
    Norm,
    Precision,
    Window,
    Workers,
    cell,
    check_plot_output,
    check_precision,
    claim_or_fail,
    err_console,
    exit_status,
    fail,
    frames_or_fail,
    interrupted,
    join_ranks,
    note,
    parse_folds,
    parse_norm,
    pick_device,
    pipeline_options,
    rank_in_run,
    render,
    warn,
)
from sslam_cli.tag import EventThreshold, FrameScores, Median, MinDuration, MinGap, OffThreshold


def evaluate(
    checkpoint: str = typer.Option(
        None, "--checkpoint", "-c", help="Fine-tuned checkpoint or fine-tuning run folder."
    ),
    data: str = typer.Option(
        None,
        "--data",
        "-d",
        help="Test set: folder with labels.csv, ESC-50 folder, AudioSet segments csv, manifest .tsv/.lbl "
        "or DCASE strong labels.",
    ),
    audio_dir: Path = typer.Option(
        None, "--audio-dir", help="Where the audio lives, if not beside the labels."
    ),
    folds: str = typer.Option(None, "--folds", help="Keep only these folds, e.g. 5 or 4,5 (ESC-50)."),
    multilabel: bool = typer.Option(
        None,
        "--multilabel/--multiclass",
        help="Force the task kind [default: the checkpoint's, else guessed from the labels].",
    ),
    fmt: str = typer.Option("table", "--format", "-f", help="table or json (one object)."),
    per_class_out: Path = typer.Option(
        None, "--per-class", help="Write per-class name, mid, positives, AP, AUC (worst first) to this CSV."
    ),
    by_polyphony: bool = typer.Option(
        False, "--by-polyphony", help="Also report mAP of clips grouped by number of labels."
    ),
    predictions_out: Path = typer.Option(
        None, "--predictions-out", help="Save scores and targets (.npz or .h5) to re-score later."
    ),
    predictions: Path = typer.Option(
        None, "--predictions", help="Re-score a saved predictions file instead of running a model."
    ),
    plot: Path = typer.Option(None, "--plot", help="PNG of per-class AP (needs matplotlib)."),
    missing_out: Path = typer.Option(
        None, "--missing-out", help="Write the ids of the clips listed but without audio, one per line."
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace existing --predictions-out / --per-class / --plot / --missing-out files.",
    ),
    window: Window = None,
    hop: Hop = None,
    target_length: int = typer.Option(
        None, "--target-length", help="Window length in fbank frames (overrides --window)."
    ),
    norm: Norm = None,
    batch_size: BatchSize = None,
    workers: Workers = None,
    device: Device = "auto",
    precision: Precision = "fp32",
    strong: Path = typer.Option(
        None,
        "--strong",
        help="DCASE strong labels (filename, onset, offset, event_label): score the events of `tag "
        "--events` (event- and segment-based F1, PSDS) instead of clip tags; needs sslam[sed].",
    ),
    collar: float = typer.Option(0.2, "--collar", help="--strong: onset collar and least offset collar (s)."),
    offset_collar_rate: float = typer.Option(
        0.2, "--offset-collar-rate", help="--strong: offset collar as a share of the reference's length."
    ),
    segment_length: float = typer.Option(
        1.0, "--segment-length", help="--strong: segment length (s) of the segment-based F1."
    ),
    event_threshold: EventThreshold = "0.5",
    off_threshold: OffThreshold = None,
    median: Median = 0.48,
    min_duration: MinDuration = 0.16,
    min_gap: MinGap = 0.32,
    frame_scores: FrameScores = "window",
) -> None:
    """Evaluate: mAP, d' and AUC (multi-label) or accuracy and top-k accuracy (multi-class), with the
    windowing of `sslam tag` (a clip's score is the maximum over its windows); with --strong, sound
    events against strong labels."""
    from sslam_core.evaluation.classification import EvaluationError, Predictions, per_class, summarize

    if strong is not None:
        from sslam_cli.evaluate_strong import evaluate_strong

        others = {"--data": data, "--predictions": predictions, "--predictions-out": predictions_out,
                  "--per-class": per_class_out, "--plot": plot, "--missing-out": missing_out,
                  "--folds": folds, "--by-polyphony": by_polyphony or None}  # fmt: skip
        given = [flag for flag, value in others.items() if value is not None]
        if given:
            fail(f"--strong evaluates events on its own files; leave out {', '.join(given)}")
        _check_options(fmt, {"predictions": None, "plot": None}, window, hop, target_length, norm,
                       batch_size, workers)  # fmt: skip
        evaluate_strong(
            checkpoint, strong, audio_dir, fmt,
            {"collar": collar, "offset_collar_rate": offset_collar_rate, "segment_length": segment_length},
            {"threshold": event_threshold, "off": off_threshold, "median": median,
             "min_duration": min_duration, "min_gap": min_gap, "frame_scores": frame_scores},
            {"window": window, "hop": hop, "target_length": target_length},
            {"batch_size": batch_size, "workers": workers, "device": device, "precision": precision,
             "norm": norm},
        )  # fmt: skip

    outputs = {
        "predictions": predictions_out,
        "per_class": per_class_out,
        "plot": plot,
        "missing": missing_out,
    }
    _check_options(fmt, outputs, window, hop, target_length, norm, batch_size, workers)
    _check_distinct(outputs, [predictions, data, checkpoint])
    wanted_folds = parse_folds(folds)
    if predictions is not None:
        if checkpoint is not None or data is not None:
            fail("--predictions re-scores a saved file; leave out --checkpoint and --data")
    elif checkpoint is None or data is None:
        fail("pass --checkpoint and --data (or --predictions FILE)")
    for path in outputs.values():
        if path is not None:
            claim_or_fail(path, overwrite)
    if predictions is not None:
        try:
            pred = Predictions.load(predictions)
        except EvaluationError as e:
            fail(str(e))
        if multilabel is not None:
            pred.multilabel = multilabel
    else:
        frames = {"window": window, "hop": hop, "target_length": target_length}
        run = {"batch_size": batch_size, "workers": workers, "device": device, "precision": precision}
        pred = _run_model(checkpoint, data, audio_dir, wanted_folds, multilabel, norm, frames, run)
    try:
        summary = summarize(pred, by_polyphony=by_polyphony)
    except EvaluationError as e:
        fail(str(e))
    rows = per_class(pred)
    _write_reports(pred, rows, summary, outputs, title=str(predictions or data))
    if fmt == "json":
        typer.echo(json.dumps(summary))
    else:
        typer.echo(render(*_tables(summary, rows, str(predictions or data))), nl=False)
    if pred.skipped and predictions is not None:
        note(f"note: {len(pred.skipped)} file(s) were skipped when these predictions were made")
    elif pred.skipped:
        note(f"evaluated {summary['n_clips']} clip(s), skipped {len(pred.skipped)}")
        raise typer.Exit(exit_status(summary["n_clips"], len(pred.skipped)))
    raise typer.Exit(EXIT_OK)


def _check_options(
    fmt: str,
    outputs: dict[str, Path | None],
    window: float | None,
    hop: float | None,
    target_length: int | None,
    norm: str | None,
    batch_size: int | None,
    workers: int | None,
) -> None:
    """Every argument that can be checked without the model or the data, as one error line."""
    from sslam_core.evaluation.classification import PREDICTION_SUFFIXES
    from sslam_core.inference.pipeline import resolve_window

    if fmt not in ("table", "json"):
        fail(f"--format {fmt!r}: choose table or json")
    out = outputs["predictions"]
    if out is not None and out.suffix.lower() not in PREDICTION_SUFFIXES:
        fail(f"--predictions-out {out}: expected a {' or '.join(PREDICTION_SUFFIXES)} file")
    if batch_size is not None and batch_size < 1:
        fail(f"--batch-size {batch_size}: expected a positive number of windows")
    if workers is not None and workers < 0:
        fail(f"--workers {workers}: expected 0 or more decoding processes")
    try:
        resolve_window(None, window, hop, target_length)  # the arguments alone; the model's limits later
    except ValueError as e:
        fail(str(e))
    if norm is not None:
        parse_norm(norm)
    if outputs["plot"] is not None:
        check_plot_output(outputs["plot"])


def _check_distinct(outputs: dict[str, Path | None], inputs: list) -> None:
    """No file named for two outputs, and no output that is one of the input files."""
    given = [os.path.abspath(p) for p in outputs.values() if p is not None]
    twice = sorted({p for p in given if given.count(p) > 1})
    if twice:
        fail(f"the same file was given for two outputs: {', '.join(twice)}")
    files = [p for p in inputs if p is not None and os.path.isfile(p)]
    for path in given:
        if os.path.isfile(path) and any(os.path.samefile(path, p) for p in files):
            fail(f"{path}: is one of the inputs; write the output elsewhere")


def _write_reports(pred, rows: list[dict], summary: dict, outputs: dict[str, Path | None], title: str):
    """Write the requested report files atomically; a failure is one line naming the file, exit 2."""
    from sslam_core.evaluation.classification import headline, per_class_csv
    from sslam_core.runs.outputs import OutputError, write_text

    try:
        if outputs["predictions"] is not None:
            pred.save(outputs["predictions"])
        if outputs["per_class"] is not None:
            write_text(outputs["per_class"], per_class_csv(rows))
        if outputs["missing"] is not None:
            write_text(outputs["missing"], "".join(f"{clip}\n" for clip in pred.missing))
        if outputs["plot"] is not None:
            from sslam_core.evaluation.plots import plot_class_ap

            name, value = headline(summary)
            try:
                plot_class_ap(rows, outputs["plot"], title=title, metric_name=name, metric_value=value)
            except ValueError as e:
                fail(f"--plot: {e}")
    except OutputError as e:
        fail(str(e))


def _run_model(
    checkpoint: str,
    data: str,
    audio_dir: Path | None,
    folds: list[int] | None,
    multilabel: bool | None,
    norm: str | None,
    frames: dict,
    run: dict,
):
    """Load the checkpoint and the data set, run the model, report skipped files on stderr; a SIGINT or
    SIGTERM stops after the batch in flight with one line and exit status 130 / 143."""
    from sslam_core.runs.interrupts import StopRequest

    with StopRequest() as stop:
        return _predict(checkpoint, data, audio_dir, folds, multilabel, norm, frames, run, stop)


def _predict(
    checkpoint: str,
    data: str,
    audio_dir: Path | None,
    folds: list[int] | None,
    multilabel: bool | None,
    norm: str | None,
    frames: dict,
    run: dict,
    stop,
):
    """`_run_model` inside its StopRequest `stop`, checked after the set-up and after every file."""
    from sslam_core.data.datasets import read_labelled
    from sslam_core.data.label_formats import DatasetError
    from sslam_core.evaluation.classification import EvaluationError, class_columns, predict
    from sslam_core.models.checkpoint import CheckpointError
    from sslam_core.models.factory import model_from_checkpoint
    from sslam_core.models.loading import read_checkpoint
    from sslam_core.models.transformer import Classifier
    from sslam_core.runs import distributed

    dev = join_ranks(pick_device(run["device"]))
    run["precision"] = check_precision(run["precision"], dev, int8=True)
    try:
        ckpt = read_checkpoint(checkpoint, allow_onnx=True)
        model = model_from_checkpoint(ckpt, dev, run["precision"])
    except CheckpointError as e:
        fail(str(e))
    if not isinstance(model, Classifier):
        fail(f"{checkpoint}: an encoder without a classifier head cannot be evaluated (fine-tune it first)")
    if multilabel is None and isinstance(ckpt.extra.get("multilabel"), bool):
        multilabel = ckpt.extra["multilabel"]
    length, hop_frames = frames_or_fail(model, frames["window"], frames["hop"], frames["target_length"])
    try:
        dataset = read_labelled(data, audio_dir=audio_dir, folds=folds, multilabel=multilabel)
    except DatasetError as e:
        fail(str(e))
    if dataset.missing:
        naming = f" (audio named {dataset.naming})" if dataset.naming else ""
        note(f"note: {len(dataset.missing)} listed clip(s) have no audio under {dataset.root}{naming}")
    if not dataset.examples:
        fail(f"{data}: no clips to evaluate")
    if not model.labels or len(model.labels) != model.cfg.num_classes:
        fail(f"{checkpoint}: the model has {model.cfg.num_classes} classes but no class names to match")
    try:
        class_columns(model.labels, dataset, checkpoint)
    except EvaluationError as e:
        fail(str(e))
    if stop.requested:
        interrupted(stop, 0, resumable=False)
    quiet = len(dataset) < 2 or rank_in_run() > 0  # under torchrun rank 0 shows its progress
    bar = tqdm(total=len(dataset), unit="clip", disable=quiet, file=err_console.file)

    def progress(error: str | None) -> None:
        if error is not None:
            bar.clear()
            warn(error)
        bar.update()

    try:
        pred = predict(
            model,
            dataset,
            multilabel=dataset.multilabel,
            target_length=length,
            hop=hop_frames,
            where=checkpoint,
            progress=progress,
            stop=lambda: stop.requested,
            **pipeline_options(run, dev, model, norm),
        )
    except EvaluationError as e:
        fail(str(e))
    finally:
        bar.close()
    if stop.requested or not pred.complete:
        interrupted(stop, len(pred.paths) + len(pred.skipped), resumable=False)
    main = distributed.is_main()
    distributed.cleanup(sync=False)
    if not main:  # rank 0 reports on every rank's predictions
        raise typer.Exit(EXIT_OK)
    if not pred.paths:
        fail(f"{data}: all {len(pred.skipped)} clip(s) were skipped (unreadable); nothing to evaluate")
    return pred


def _number(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _tables(summary: dict, rows: list[dict], source: str) -> list[Table]:
    """The summary, the polyphony bins (when asked for) and the worst classes, as Rich tables."""
    table = Table(title=cell(f"evaluation: {source}"), title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if "mAP" in summary:
        table.add_row("mAP", _number(summary["mAP"]))
        table.add_row("d'", _number(summary["d_prime"]))
        table.add_row("AUC", _number(summary["auc"]))
        table.add_row("classes scored", str(summary["n_classes_scored"]))
        table.add_row("classes without positives (left out)", str(summary["n_classes_without_positives"]))
    else:
        table.add_row("accuracy", _number(summary["accuracy"]))
        table.add_row(f"top-{summary['k']} accuracy", _number(summary["top_k"]))
        table.add_row("balanced accuracy", _number(summary["balanced_accuracy"]))
    table.add_row("clips", str(summary["n_clips"]))
    table.add_row("files skipped (unreadable)", str(summary["n_skipped"]))
    table.add_row("clips missing (listed, no audio)", str(summary["n_missing"]))
    tables = [table]
    if "polyphony" in summary:
        poly = Table(title="by polyphony (labels per clip)", title_justify="left")
        for name in ("labels", "clips", "classes", "mAP"):
            poly.add_column(name, justify="right")
        for name, v in summary["polyphony"].items():
            poly.add_row(name, str(v["clips"]), str(v["classes"]), _number(v["mAP"]))
        tables.append(poly)
    worst = [r for r in rows if not math.isnan(r["AP"])][:10]
    if worst:
        table = Table(title="worst classes", title_justify="left")
        for name in ("class", "mid", "positives", "AP", "AUC"):
            table.add_column(name, justify="left" if name in ("class", "mid") else "right")
        for r in worst:
            table.add_row(
                cell(r["name"]), cell(r["mid"]), str(r["positives"]), _number(r["AP"]), _number(r["AUC"])
            )
        tables.append(table)
    return tables
