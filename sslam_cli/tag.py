"""`sslam tag`: AudioSet (or custom) tags of audio files, for the whole clip and over time."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from tqdm import tqdm

from sslam_cli.options import (
    BatchSize,
    Device,
    EventThreshold,
    FrameScores,
    Hop,
    Median,
    MinDuration,
    MinGap,
    Norm,
    OffThreshold,
    Precision,
    Window,
    Workers,
    cell,
    check_plot_output,
    check_precision,
    claim_or_fail,
    claim_resumable,
    echo,
    err_console,
    event_options,
    events_hop,
    exit_status,
    fail,
    frames_or_fail,
    interrupted,
    join_ranks,
    load_model_or_fail,
    note,
    parse_norm,
    pick_device,
    render,
    token_scores_or_fail,
    warn,
)

FORMATS = ("table", "json", "csv")
CSV_HEADER = ["path", "scope", "start", "end", "rank", "label", "mid", "score"]


def tag(
    paths: Annotated[
        list[str], typer.Argument(help="Audio files, folders (searched recursively), or file lists.")
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
    hop: Hop = None,
    timeline: Annotated[
        bool, typer.Option("--timeline", help="Also report the scores of every window.")
    ] = False,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="table, json (one object per line) or csv; with --events also dcase (TSV), audacity "
            "or raven.",
        ),
    ] = "table",
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
    all results in input order once every rank has finished (see the README's "Large corpora")."""
    from sslam_core.data.inputs import collect_inputs
    from sslam_core.data.labels import read_label_csv
    from sslam_core.inference.events import EVENT_FORMATS, tag_token_steps
    from sslam_core.inference.partition import my_share, report_done, wait_for_ranks
    from sslam_core.inference.tagging import tag as run_tag
    from sslam_core.models.hub import DEFAULT_TAGGER
    from sslam_core.models.transformer import Classifier
    from sslam_core.runs import distributed
    from sslam_core.runs.interrupts import StopRequest
    from sslam_core.runs.outputs import OutputError

    formats = (*FORMATS[:2], *EVENT_FORMATS) if events else FORMATS
    if fmt not in formats:
        fail(f"--format {fmt!r}: choose {', '.join(formats)}" + ("" if events else " (more with --events)"))
    if events:
        event_options(event_threshold, off_threshold, median, min_duration, min_gap, (), frame_scores)
    if resume and output is None:
        fail("--resume continues a run written with --output FILE")
    if norm is not None:
        parse_norm(norm)
    if output is not None:
        claim_resumable(output, overwrite, resume)
    if plot is not None:
        check_plot_output(plot)
    dev = join_ranks(pick_device(device))
    precision = check_precision(precision, dev, int8=True)
    model = load_model_or_fail(checkpoint or DEFAULT_TAGGER, dev, precision=precision)
    if not isinstance(model, Classifier):
        fail(f"{checkpoint or DEFAULT_TAGGER}: an encoder without a classifier head cannot tag")
    names = model.labels
    if labels is not None:
        names = read_label_csv(labels)
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
    for problem in inputs.problems:
        warn(problem)
    if not inputs:
        fail("no audio files found in " + ", ".join(paths))
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
    journal, scratch = _open_journal(output, settings, resume, _header(fmt), fmt)
    if journal is None:
        echo(_header(fmt))
    done = journal.done if journal else {}
    if done:
        note(f"resuming: {len(done)} file(s) already done in {journal.parts}")
    todo = [(i, path, name) for i, (path, name) in enumerate(inputs.files) if name not in done]
    share = my_share([path for _, path, _ in todo])  # all of them in one process; a torchrun rank's part
    todo = todo[share.start : share.stop]
    selection = 1 + (journal.lines() if fmt == "raven" and done else 0)  # Raven numbers run on

    tagged = sum(e is None for e in done.values())
    skipped = len(done) - tagged
    resumed = 0 if distributed.launched() else len(done)  # under torchrun the bar counts rank 0's share
    bar = tqdm(
        total=len(todo) + resumed,
        initial=resumed,
        unit="file",
        disable=len(inputs) < 2 or not distributed.is_main(),
        file=err_console.file,
    )
    with StopRequest() as stop:
        stream = (tag_token_steps if events and frame_scores == "token" else run_tag)(
            model,
            [path for _, path, _ in todo],
            target_length=frames,
            hop=hop_frames,
            multilabel=getattr(model, "multilabel", True),
            batch_size=batch_size,
            workers=workers,
            device=dev,
            precision=precision,
            normalization=parse_norm(norm, model.normalization),
            stop=lambda: stop.requested,
            names=[name for _, _, name in todo],
        )
        try:
            for (i, _, name), res in zip(todo, stream, strict=False):  # shorter when interrupted
                bar.update()
                found = _events(res, names, detection) if detection and not res.error else None
                text = (
                    ""
                    if res.error
                    else _render(res, names, fmt, top_k, threshold, timeline, output, found, selection)
                )
                if res.error:
                    bar.clear()
                    warn(res.error)
                    skipped += 1
                else:
                    tagged += 1
                    selection += len(found or ())
                    if plots is not None:
                        _plot(res, names, plots[i], top_k)
                if journal is not None:
                    journal.add(name, text, res.error)
                elif text:
                    echo(text)
                if stop.requested:
                    break
        except OutputError as e:
            bar.close()
            fail(f"{e}; the finished files are kept, rerun with --resume once it is fixed")
        finally:
            stream.close()
        bar.close()
        if journal is not None:
            journal.close()
            report_done(journal.parts, journal.run, stop.requested, tagged + skipped)
        if stop.requested:
            interrupted(stop, tagged + skipped, resumable=output is not None)
        if journal is not None and distributed.is_main():
            if not wait_for_ranks(journal.parts, journal.run, lambda: stop.requested):
                interrupted(stop, tagged + skipped, resumable=output is not None)
            journal.reload()
            tagged = sum(journal.done.get(n, "") is None for n in inputs.names)
            skipped = sum(journal.done.get(n) is not None for n in inputs.names)
            journal.finish(inputs.names)
            if scratch is not None:
                echo(journal.out.read_text(encoding="utf-8"))
                shutil.rmtree(scratch, ignore_errors=True)
    distributed.cleanup(sync=False)
    if len(inputs) > 1 or skipped:
        note(f"tagged {tagged} file(s), skipped {skipped}")
    raise typer.Exit(exit_status(tagged, skipped))


def _open_journal(output: Path | None, settings: dict, resume: bool, header: str, fmt: str):
    """The journal the results go to: --output's; under torchrun without --output, one in a scratch
    folder of rank 0's (the ranks must share this machine), printed when all have finished. (None,
    None) for a single process printing as it goes; else (journal, scratch folder or None)."""
    from sslam_core.runs import distributed
    from sslam_core.runs.text_journal import TextJournal

    scratch = None
    if distributed.launched():
        if fmt == "raven":
            fail("raven selection numbers run on over files: write raven tables from one process")
        if output is None:
            if not distributed.single_machine():
                fail("ranks on several machines need --output FILE on a file system they share")
            scratch = distributed.on_main(lambda: tempfile.mkdtemp(prefix="sslam-tag-"))
            output = Path(scratch) / "tags"
    if output is None:
        return None, None
    return TextJournal(output, settings, resume=resume, header=header), scratch


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


def _labels(res, names, top_k, threshold) -> list[dict]:
    return [{"label": n, "mid": m, "score": round(s, 6)} for n, m, s in res.top(names, top_k, threshold)]


def _csv_rows(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _header(fmt: str) -> str:
    """The first lines of an output in `fmt`, before any file's results."""
    from sslam_core.inference.events import render_events

    if fmt == "csv":
        return _csv_rows([CSV_HEADER])
    return render_events("", [], fmt, first=True) if fmt in ("dcase", "raven") else ""


def _events(res, names, detection):
    from sslam_core.inference.events import detect, result_step_scores

    starts, scores = result_step_scores(res, detection.step)
    return detect(starts, scores, res.duration, names, detection)


def _render(
    res, names, fmt: str, top_k: int, threshold, timeline: bool, output, events=None, selection: int = 1
) -> str:
    """One file's results in `fmt`: a JSON line, its CSV rows, its event rows, or its table(s)."""
    from sslam_core.inference.events import EVENT_FORMATS, event_dicts, render_events

    if fmt in EVENT_FORMATS:
        return render_events(res.path, events, fmt, first=False, number=selection)
    chosen = res.top(names, top_k, threshold)
    index = {m: i for i, (m, _) in enumerate(names)}
    if fmt == "json":
        obj = {
            "path": res.path,
            "duration": round(res.duration, 4),
            "labels": _labels(res, names, top_k, threshold),
        }
        if timeline:
            obj["segments"] = [
                {
                    "start": round(a, 3),
                    "end": round(b, 3),
                    "scores": {n: round(float(s[index[m]]), 6) for n, m, _ in chosen},
                }
                for a, b, s in res.segments
            ]
        if events is not None:
            obj["events"] = event_dicts(events)
        return json.dumps(obj, ensure_ascii=False) + "\n"
    if fmt == "csv":
        rows = [
            [res.path, "clip", 0.0, round(res.duration, 3), r, n, m, f"{s:.6f}"]
            for r, (n, m, s) in enumerate(chosen, 1)
        ]
        if timeline:
            for a, b, s in res.segments:
                rows += [
                    [res.path, "segment", round(a, 3), round(b, 3), r, n, m, f"{s[index[m]]:.6f}"]
                    for r, (n, m, _) in enumerate(chosen, 1)
                ]
        return _csv_rows(rows)
    table = Table()  # the title goes above as a line of its own: a table title wraps at its width
    for name in ("label", "mid", "score"):
        table.add_column(name, justify="right" if name == "score" else "left")
    for n, m, s in chosen:
        table.add_row(cell(n), cell(m), f"{s:.3f}")
    tables = [cell(f"{res.path} ({res.duration:.2f} s)"), table]
    if timeline:
        seg = Table(show_header=True)
        for name in ("start", "end", "top labels"):
            seg.add_column(name)
        for a, b, s in res.segments:
            best = sorted(range(len(s)), key=lambda i: -s[i])[: max(top_k, 1)]
            seg.add_row(f"{a:.2f}", f"{b:.2f}", cell(", ".join(f"{names[i][1]} {s[i]:.2f}" for i in best)))
        tables.append(seg)
    if events is not None:
        ev = Table(show_header=True)
        for name in ("onset", "offset", "event", "score"):
            ev.add_column(name, justify="left" if name == "event" else "right")
        for e in events:
            ev.add_row(f"{e.onset:.2f}", f"{e.offset:.2f}", cell(e.label), f"{e.score:.3f}")
        tables += [cell(f"{len(events)} event(s)"), ev]
    return render(*tables, terminal=None if output is None else False)
