"""`sslam eval`: score a fine-tuned checkpoint on a labelled set (or re-score saved predictions)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from tqdm import tqdm

from sslam_cli.options import (
    EXIT_OK,
    EXIT_SKIPPED,
    BatchSize,
    Calibration,
    Device,
    EventThreshold,
    FrameScores,
    Median,
    MinDuration,
    MinGap,
    Norm,
    OffThreshold,
    Precision,
    StrongHop,
    Window,
    Workers,
    cell,
    check_plot_output,
    check_precision,
    claim_or_fail,
    err_console,
    event_flags,
    event_options,
    events_hop,
    exit_status,
    fail,
    frames_or_fail,
    interrupted,
    join_ranks,
    load_model_or_fail,
    note,
    note_export_precision,
    note_ignored,
    parse_folds,
    parse_norm,
    pick_device,
    pipeline_options,
    rank_in_run,
    render,
    settle_auto,
    token_scores_or_fail,
    warn,
)
from sslam_core.audio.constants import frames_to_seconds


def evaluate(
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", "-c", help="Fine-tuned checkpoint or fine-tuning run folder.")
    ] = None,
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            help="Test set: folder with labels.csv, ESC-50 folder, AudioSet segments csv, manifest .tsv/.lbl "
            "or DCASE strong labels.",
        ),
    ] = None,
    classes: Annotated[
        Path,
        typer.Option(
            "--classes",
            help="Class list (index,mid,display_name CSV, or one name per line) for a model without "
            "class names, or for integer labels [default: the model's].",
        ),
    ] = None,
    audio_dir: Annotated[
        Path, typer.Option("--audio-dir", help="Where the audio lives, if not beside the labels.")
    ] = None,
    folds: Annotated[
        str, typer.Option("--folds", help="Keep only these folds, e.g. 5 or 4,5 (ESC-50).")
    ] = None,
    multilabel: Annotated[
        bool,
        typer.Option(
            "--multilabel/--multiclass",
            help="Force the task kind [default: the checkpoint's, else guessed from the labels].",
        ),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table or json (one object).")] = "table",
    per_class_out: Annotated[
        Path,
        typer.Option(
            "--per-class", help="Write per-class name, mid, positives, AP, AUC (worst first) to this CSV."
        ),
    ] = None,
    by_polyphony: Annotated[
        bool, typer.Option("--by-polyphony", help="Also report mAP of clips grouped by number of labels.")
    ] = False,
    predictions_out: Annotated[
        Path,
        typer.Option("--predictions-out", help="Save scores and targets (.npz or .h5) to re-score later."),
    ] = None,
    predictions: Annotated[
        Path,
        typer.Option("--predictions", help="Re-score a saved predictions file instead of running a model."),
    ] = None,
    plot: Annotated[Path, typer.Option("--plot", help="PNG of per-class AP (needs matplotlib).")] = None,
    missing_out: Annotated[
        Path,
        typer.Option(
            "--missing-out", help="Write the ids of the clips listed but without audio, one per line."
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace existing --predictions-out / --per-class / --plot / --missing-out files.",
        ),
    ] = False,
    window: Window = None,
    hop: StrongHop = None,
    target_length: Annotated[
        int, typer.Option("--target-length", help="Window length in fbank frames (overrides --window).")
    ] = None,
    norm: Norm = None,
    batch_size: BatchSize = None,
    workers: Workers = None,
    device: Device = "auto",
    precision: Precision = "fp32",
    calibration: Calibration = None,
    strong: Annotated[
        Path,
        typer.Option(
            "--strong",
            help="DCASE strong labels (filename, onset, offset, event_label): score the events of `tag "
            "--events` (event- and segment-based F1, PSDS) instead of clip tags; needs sslam[sed].",
        ),
    ] = None,
    collar: Annotated[
        float, typer.Option("--collar", help="--strong: onset collar and least offset collar (s).")
    ] = 0.2,
    offset_collar_rate: Annotated[
        float,
        typer.Option(
            "--offset-collar-rate", help="--strong: offset collar as a share of the reference's length."
        ),
    ] = 0.2,
    segment_length: Annotated[
        float, typer.Option("--segment-length", help="--strong: segment length (s) of the segment-based F1.")
    ] = 1.0,
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
    from sslam_core.evaluation.classification import Predictions, per_class, summarize

    if strong is not None:
        others = {"--data": data, "--predictions": predictions, "--predictions-out": predictions_out,
                  "--per-class": per_class_out, "--plot": plot, "--missing-out": missing_out,
                  "--folds": folds, "--by-polyphony": by_polyphony or None}  # fmt: skip
        given = [flag for flag, value in others.items() if value is not None]
        if given:
            fail(f"--strong evaluates events on its own files; leave out {', '.join(given)}")
        _check_options(fmt, {"predictions": None, "plot": None}, window, hop, target_length, norm,
                       batch_size, workers)  # fmt: skip
        _evaluate_strong(
            checkpoint, strong, audio_dir, fmt,
            {"collar": collar, "offset_collar_rate": offset_collar_rate, "segment_length": segment_length},
            {"threshold": event_threshold, "off": off_threshold, "median": median,
             "min_duration": min_duration, "min_gap": min_gap, "frame_scores": frame_scores},
            {"window": window, "hop": hop, "target_length": target_length},
            {"batch_size": batch_size, "workers": workers, "device": device, "precision": precision,
             "calibration": calibration,
             "norm": norm, "classes": classes},
        )  # fmt: skip
    strong_only = {
        "--collar": collar != 0.2,
        "--offset-collar-rate": offset_collar_rate != 0.2,
        "--segment-length": segment_length != 1.0,
        **event_flags(event_threshold, off_threshold, median, min_duration, min_gap, frame_scores),
    }
    note_ignored(strong_only, "--strong")

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
        pred = Predictions.load(predictions)
        if multilabel is not None:
            pred.multilabel = multilabel
    else:
        frames = {"window": window, "hop": hop, "target_length": target_length}
        run = {"batch_size": batch_size, "workers": workers, "device": device, "precision": precision,
               "calibration": calibration}  # fmt: skip
        run["classes"] = classes
        pred = _run_model(checkpoint, data, audio_dir, wanted_folds, multilabel, norm, frames, run)
    summary = summarize(pred, by_polyphony=by_polyphony)
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
    from sslam_core.inference.windows import resolve_window

    if fmt not in ("table", "json"):
        fail(f"--format {fmt!r}: choose table or json")
    out = outputs["predictions"]
    if out is not None and out.suffix.lower() not in PREDICTION_SUFFIXES:
        fail(f"--predictions-out {out}: expected a {' or '.join(PREDICTION_SUFFIXES)} file")
    if batch_size is not None and batch_size < 1:
        fail(f"--batch-size {batch_size}: expected a positive number of windows")
    if workers is not None and workers < 0:
        fail(f"--workers {workers}: expected 0 or more decoding processes")
    resolve_window(None, window, hop, target_length)  # the arguments alone; the model's limits later
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
    from sslam_core.runs.outputs import write_text

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
    from sslam_core.evaluation.classification import class_columns, predict
    from sslam_core.models.factory import model_from_checkpoint
    from sslam_core.models.loading import read_checkpoint
    from sslam_core.models.transformer import Classifier
    from sslam_core.runs import distributed

    dev = join_ranks(pick_device(run["device"]))
    requested, run["precision"] = run["precision"], check_precision(run["precision"], dev, int8=True)
    ckpt = read_checkpoint(checkpoint, allow_onnx=True)
    model = model_from_checkpoint(ckpt, dev, run["precision"])
    note_export_precision(model, run["precision"])
    run["precision"], model = settle_auto(
        model, requested, run["precision"], dev, run.pop("calibration", None), checkpoint, int8_ok=True
    )
    if not isinstance(model, Classifier):
        fail(f"{checkpoint}: an encoder without a classifier head cannot be evaluated (fine-tune it first)")
    if multilabel is None and isinstance(ckpt.extra.get("multilabel"), bool):
        multilabel = ckpt.extra["multilabel"]
    length, hop_frames = frames_or_fail(model, frames["window"], frames["hop"], frames["target_length"])
    names_from_list(model, run.get("classes"), checkpoint)
    dataset = read_labelled(
        data, audio_dir=audio_dir, folds=folds, multilabel=multilabel, index_classes=model.labels
    )
    if dataset.missing:
        naming = f" (audio named {dataset.naming})" if dataset.naming else ""
        note(f"note: {len(dataset.missing)} listed clip(s) have no audio under {dataset.root}{naming}")
    if not dataset.examples:
        fail(f"{data}: no clips to evaluate")
    if not model.labels or len(model.labels) != model.cfg.num_classes:
        fail(f"{checkpoint}: the model has {model.cfg.num_classes} classes but no class names to match")
    class_columns(model.labels, dataset, checkpoint)
    if stop.requested:
        interrupted(stop, 0, resumable=False)
    bar = ClipBar(len(dataset))
    try:
        pred = predict(
            model,
            dataset,
            pipeline_options(run, dev, model, norm, length, hop_frames),
            multilabel=dataset.multilabel,
            where=checkpoint,
            progress=bar.progress,
            on_start=bar.start,
            stop=lambda: stop.requested,
        )
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


class ClipBar:
    """The progress bar of an evaluation: one bar, on rank 0 only, for the clips this process runs
    (its share under torchrun, said in the bar's label), made once the run knows that number."""

    def __init__(self, clips: int) -> None:
        self.clips = clips
        self.bar = tqdm(disable=True)

    def start(self, share: int) -> None:
        from sslam_core.runs import distributed

        quiet = self.clips < 2 or rank_in_run() > 0
        label = "rank 0" if distributed.launched() else None
        self.bar = tqdm(total=share, unit="clip", desc=label, disable=quiet, file=err_console.file)

    def progress(self, error: str | None) -> None:
        if error is not None:
            self.bar.clear()
            warn(error)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


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


def _evaluate_strong(
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
    from sslam_core.evaluation.classification import class_columns
    from sslam_core.evaluation.strong import (
        SedUnavailable,
        StrongOptions,
        library,
        predict_events,
        read_strong_events,
        score_predictions,
    )
    from sslam_core.models.transformer import Classifier
    from sslam_core.runs import distributed
    from sslam_core.runs.interrupts import StopRequest

    if checkpoint is None:
        fail("--strong scores a model's events: pass --checkpoint too")
    try:
        library()
        options = StrongOptions(**metric)
    except SedUnavailable:
        raise
    except ValueError as e:
        fail(f"--strong: {e}")
    event_options(**detection, names=())
    truth = read_strong_events(str(strong))
    dataset = read_labelled(strong, audio_dir=audio_dir, multilabel=True, kind="strong")
    dev = join_ranks(pick_device(run["device"]))
    requested, run["precision"] = run["precision"], check_precision(run["precision"], dev, int8=True)
    model = load_model_or_fail(checkpoint, dev, precision=run["precision"])
    int8_ok = detection["frame_scores"] != "token"  # the int8 graph gives no token scores
    run["precision"], model = settle_auto(
        model, requested, run["precision"], dev, run.pop("calibration", None), checkpoint, int8_ok
    )
    if isinstance(model, Classifier):
        names_from_list(model, run.get("classes"), checkpoint)
    if not isinstance(model, Classifier) or not model.labels:
        fail(f"{checkpoint}: events need a fine-tuned checkpoint with class names (or --classes)")
    found = event_options(**detection, names=model.labels)
    truth.check_labels({key for label in model.labels for key in label}, checkpoint)
    token_scores_or_fail(model, detection["frame_scores"])
    length, hop = frames_or_fail(model, frames["window"], frames["hop"], frames["target_length"])
    hop = events_hop(length, detection["frame_scores"]) if frames["hop"] is None else hop
    kept, cols = class_columns(model.labels, dataset, checkpoint)
    if dataset.missing:
        note(f"note: {len(dataset.missing)} listed clip(s) have no audio under {dataset.root}")
    if not dataset.examples:
        fail(f"{strong}: no clips to evaluate")
    bar = ClipBar(len(dataset))
    with StopRequest() as stop:
        try:
            predictions, skipped = predict_events(
                model,
                [e.path for e in dataset.examples],
                [e.key for e in dataset.examples],
                model.labels,
                found,
                pipeline_options(run, dev, model, run["norm"], length, hop),
                frame_scores=detection["frame_scores"],
                progress=bar.progress,
                on_start=bar.start,
                stop=lambda: stop.requested,
                names=[dataset.name(e) for e in dataset.examples],
            )
        finally:
            bar.close()
        if stop.requested:
            interrupted(stop, len(predictions) + len(skipped), resumable=False)
    main = distributed.is_main()
    distributed.cleanup(sync=False)
    if not main:  # rank 0 scores every rank's predictions
        raise typer.Exit(EXIT_OK)
    if not predictions:
        fail(f"{strong}: all {len(skipped)} clip(s) were skipped (unreadable); nothing to evaluate")
    late = truth.past_the_end({key: p.duration for key, p in predictions.items()})
    for line in late[:3]:
        note(f"note: {line}")
    if late:
        note(f"note: {len(late)} reference event(s) end after their file; they are scored cut at its end")
    columns = {dataset.classes[i][1]: col for i, col in zip(kept, cols, strict=True)}
    summary = score_predictions(truth, predictions, model.labels, columns, options)
    summary.update(
        strong=str(strong), n_skipped=len(skipped), n_missing=len(dataset.missing),
        frame_scores=detection["frame_scores"], window=frames_to_seconds(length), hop=frames_to_seconds(hop),
    )  # fmt: skip
    if fmt == "json":
        typer.echo(json.dumps(summary))
    else:
        typer.echo(render(*_strong_tables(summary)), nl=False)
    if skipped:
        note(f"evaluated {summary['n_clips']} clip(s), skipped {len(skipped)}")
        raise typer.Exit(EXIT_SKIPPED)
    raise typer.Exit(EXIT_OK)


def _strong_number(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _strong_tables(summary: dict) -> list[Table]:
    """The averaged metrics and the per-class table."""
    ev, seg, psds = summary["event_based"], summary["segment_based"], summary["psds"]
    table = Table(title=cell(f"strong evaluation: {summary['strong']}"), title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    collars = f"collar {ev['onset_collar']:g} s, offset {ev['offset_collar_rate']:g} x length"
    table.add_row(f"event-based F1, macro ({collars})", _strong_number(ev["f1_macro"]))
    table.add_row("event-based F1, micro", _strong_number(ev["f1_micro"]))
    table.add_row(f"segment-based F1, micro ({seg['segment_length']:g} s)", _strong_number(seg["f1_micro"]))
    table.add_row("segment-based F1, macro", _strong_number(seg["f1_macro"]))
    table.add_row(
        f"PSDS (dtc {psds['dtc_threshold']:g}, gtc {psds['gtc_threshold']:g})", _strong_number(psds["value"])
    )
    for name, key in (("clips", "n_clips"), ("reference events", "n_reference_events"),
                      ("detected events", "n_detected_events"), ("files skipped (unreadable)", "n_skipped"),
                      ("clips missing (listed, no audio)", "n_missing")):  # fmt: skip
        table.add_row(name, str(summary[key]))
    per_class = Table(title="per class", title_justify="left")
    heads = ("class", "references", "detected", "event F1", "event P", "event R", "segment F1", "PSDS")
    for name in heads:
        per_class.add_column(name, justify="left" if name == "class" else "right")
    scores = ("event_f1", "event_precision", "event_recall", "segment_f1", "psds")
    for c in summary["classes"]:
        per_class.add_row(
            cell(c["label"]),
            str(c["references"]),
            str(c["detections"]),
            *(_strong_number(c[k]) for k in scores),
        )
    return [table, per_class]


def names_from_list(model, classes: Path | None, checkpoint: str) -> None:
    """With --classes, the class names of a model that has none (or the list integer labels index):
    its length must be the model's number of classes."""
    from sslam_core.data.labels import read_label_csv

    if classes is None:
        return
    names = read_label_csv(classes)
    if len(names) != model.cfg.num_classes:
        fail(f"--classes {classes}: {len(names)} classes, but {checkpoint} predicts {model.cfg.num_classes}")
    model.labels = names
