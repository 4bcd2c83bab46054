"""`sslam tag`: AudioSet (or custom) tags of audio files, for the whole clip and over time."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer
from tqdm import tqdm

from sslam_cli.options import (
    EXIT_OK,
    BatchSize,
    Calibration,
    Device,
    EventsHop,
    EventThreshold,
    FrameScores,
    Median,
    MinDuration,
    MinGap,
    Norm,
    OffThreshold,
    Precision,
    Window,
    Workers,
    check_plot_output,
    check_precision,
    claim_or_fail,
    claim_resumable,
    echo,
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
    note_ignored,
    output_format,
    parse_norm,
    pick_device,
    report_inputs,
    settle_auto,
    stdout_is_tty,
    token_scores_or_fail,
    warn,
)
from sslam_core.inference.options import PipelineOptions


def tag(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="Audio files, folders (searched recursively), file lists, or tar shards (a .tar, a brace "
            "pattern or a list of shards).",
            metavar="PATHS",
        ),
    ],
    checkpoint: Annotated[
        str,
        typer.Option(
            "--checkpoint",
            "-c",
            help="Fine-tuned checkpoint: .pt, folder, .safetensors, run dir or hub id "
            "[default: ta012/SSLAM_AS2M_Finetuned].",
        ),
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Labels to report per file.")] = 5,
    threshold: Annotated[
        float, typer.Option("--threshold", "-t", help="Only report labels scoring at least this.")
    ] = None,
    window: Window = None,
    hop: EventsHop = None,
    timeline: Annotated[
        bool, typer.Option("--timeline", help="Also report the scores of every window.")
    ] = False,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="table, json (one object per line) or csv; with --events also dcase (TSV), audacity "
            "or raven [default: from the --output extension (.csv, .json, .jsonl; .tsv: dcase), else "
            "table].",
        ),
    ] = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Write the results to this file instead of stdout.")
    ] = None,
    plot: Annotated[
        Path, typer.Option("--plot", help="PNG heatmap of the top classes over time (needs matplotlib).")
    ] = None,
    labels: Annotated[
        Path,
        typer.Option(
            "--labels", help="Class names for a custom head: a CSV (index,mid,display_name) or one per line."
        ),
    ] = None,
    audio_dir: Annotated[
        str,
        typer.Option(
            "--audio-dir", help="Root folder of the files in a .tsv manifest (overrides its first line)."
        ),
    ] = None,
    norm: Norm = None,
    batch_size: BatchSize = None,
    workers: Workers = None,
    device: Device = "auto",
    precision: Precision = "fp32",
    calibration: Calibration = None,
    events: Annotated[
        bool,
        typer.Option(
            "--events", help="Detect sound events (onset, offset) from overlapping windows' scores."
        ),
    ] = False,
    event_threshold: EventThreshold = "0.5",
    off_threshold: OffThreshold = None,
    median: Median = 0.48,
    min_duration: MinDuration = 0.16,
    min_gap: MinGap = 0.32,
    frame_scores: FrameScores = "window",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing --output / --plot files.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Finish an interrupted run with --output without redoing finished files."
        ),
    ] = False,
) -> None:
    """Tag audio. The clip score of each class is its maximum over the windows of the file.

    Under `torchrun` each process tags a share of the files balanced by duration, and rank 0 writes
    all results in input order once every rank has finished (see docs/guides/large-corpora.md)."""
    from sslam_core.data.inputs import collect_inputs
    from sslam_core.data.labels import read_label_csv
    from sslam_core.inference.events import EVENT_FORMATS
    from sslam_core.inference.tag_files import FORMATS, TagReport, tag_files
    from sslam_core.models.hub import DEFAULT_TAGGER
    from sslam_core.models.transformer import Classifier
    from sslam_core.runs import distributed
    from sslam_core.runs.interrupts import StopRequest

    formats = (*FORMATS[:2], *EVENT_FORMATS) if events else FORMATS
    fmt = output_format(fmt, output, formats)
    if fmt not in formats:
        fail(f"--format {fmt!r}: choose {', '.join(formats)}" + ("" if events else " (more with --events)"))
    if events:
        event_options(event_threshold, off_threshold, median, min_duration, min_gap, (), frame_scores)
    else:
        flags = event_flags(event_threshold, off_threshold, median, min_duration, min_gap, frame_scores)
        note_ignored(flags, "--events")
    if resume and output is None:
        fail("--resume continues a run written with --output FILE")
    if norm is not None:
        parse_norm(norm)
    if output is not None:
        claim_resumable(output, overwrite, resume)
    if plot is not None:
        check_plot_output(plot)
    dev = join_ranks(pick_device(device))
    requested, precision = precision, check_precision(precision, dev, int8=True)
    model = load_model_or_fail(checkpoint or DEFAULT_TAGGER, dev, precision=precision)
    int8_ok = not (events and frame_scores == "token")  # the int8 graph gives no token scores
    precision, model = settle_auto(
        model, requested, precision, dev, calibration, checkpoint or DEFAULT_TAGGER, int8_ok
    )
    if not isinstance(model, Classifier):
        fail(f"{checkpoint or DEFAULT_TAGGER}: an encoder without a classifier head cannot tag")
    names = read_label_csv(labels) if labels is not None else model.labels
    if labels is not None and len(names) != model.cfg.num_classes:
        fail(f"--labels {labels}: {len(names)} class names, but the model has {model.cfg.num_classes}")
    if names is None or len(names) != model.cfg.num_classes:
        found = "no" if names is None else len(names)
        fail(f"the model has {model.cfg.num_classes} classes but {found} label names; pass --labels CSV")
    detection = None
    if events:
        detection = event_options(event_threshold, off_threshold, median, min_duration, min_gap, names)
        token_scores_or_fail(model, frame_scores)
    frames, hop_frames = frames_or_fail(model, window, hop)
    if events and hop is None:
        hop_frames = events_hop(frames, frame_scores)
    inputs = collect_inputs(paths, audio_dir)
    report_inputs(inputs, paths)
    if fmt == "audacity" and len(inputs) > 1:
        fail("audacity labels hold the events of one file; tag one file at a time or use --format dcase")
    plots = _plot_paths(plot, len(inputs)) if plot is not None else None
    for target in plots or ():
        claim_or_fail(target, overwrite or resume)

    settings = {"inputs": inputs.names, "checkpoint": checkpoint or DEFAULT_TAGGER, "format": fmt}
    settings.update(top_k=top_k, threshold=threshold, timeline=timeline, window=frames, hop=hop_frames)
    settings.update(norm=norm, labels=str(labels) if labels else None, events=repr(detection))
    if events and frame_scores != "window":
        settings.update(frame_scores=frame_scores)
    report = TagReport(fmt, names, top_k, threshold, timeline, detection, frame_scores)
    options = PipelineOptions(
        target_length=frames,
        hop=hop_frames,
        batch_size=batch_size,
        workers=workers,
        device=dev,
        precision=precision,
        normalization=parse_norm(norm, model.normalization),
    )
    quiet = len(inputs) < 2 or not distributed.is_main()
    bar = tqdm(disable=True)  # replaced once the run knows its share

    def on_start(todo: int, done: int) -> None:
        nonlocal bar
        if done:
            note(f"resuming: {done} file(s) already done in {output}.parts")
        resumed = 0 if distributed.launched() else done  # under torchrun the bar counts rank 0's share
        label = "rank 0" if distributed.launched() else None
        bar = tqdm(
            total=todo + resumed,
            initial=resumed,
            unit="file",
            desc=label,
            disable=quiet,
            file=err_console.file,
        )

    def on_file(i: int, res) -> None:
        bar.update()
        if res.error:
            bar.clear()
            warn(res.error)
        elif plots is not None:
            _plot(res, names, plots[i], top_k)

    width = shutil.get_terminal_size().columns if output is None and stdout_is_tty() else None
    with StopRequest() as stop:
        try:
            summary = tag_files(
                model,
                inputs.files,
                options,
                report,
                output=output,
                settings=settings,
                resume=resume,
                width=width,
                echo=echo,
                on_start=on_start,
                on_file=on_file,
                stop=lambda: stop.requested,
            )
        finally:
            bar.close()
        if summary.interrupted:
            interrupted(stop, summary.tagged + summary.skipped, resumable=output is not None)
    distributed.cleanup(sync=False)
    if summary.complete:
        note(f"{output} is already complete ({summary.resumed} file(s), these settings); nothing to resume")
        raise typer.Exit(EXIT_OK)
    if len(inputs) > 1 or summary.skipped:
        note(f"tagged {summary.tagged} file(s), skipped {summary.skipped}")
    raise typer.Exit(exit_status(summary.tagged, summary.skipped))


def _plot_paths(plot: Path, n: int) -> list[Path]:
    """One PNG per input: PLOT itself for one input, else PLOT-000.png ... numbered by input."""
    if n == 1:
        return [plot]
    return [plot.with_name(f"{plot.stem}-{i:03d}{plot.suffix}") for i in range(n)]


def _plot(res, names, target: Path, top_k: int) -> None:
    from sslam_core.evaluation.plots import plot_timeline
    from sslam_core.runs.outputs import OutputError

    try:
        plot_timeline(res, names, target, top_k=max(top_k, 1))
    except OutputError as e:
        fail(f"{e}; the files tagged so far are kept")
