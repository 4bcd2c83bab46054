"""Tagging a list of files into one output, as `sslam tag` does: the report formats (table, JSON lines,
CSV, and with events DCASE / Audacity / Raven tables), a journal that makes `-o FILE` crash-safe and
resumable, and the shares of `torchrun` ranks.

With an output file, every finished file's text goes to a journal (`runs.text_journal`) and the
file appears, in input order, once all are done; `resume` finishes an interrupted run without
redoing finished files. Under torchrun each rank tags a share of the files balanced by duration
(`partition.my_share`), and rank 0 writes everything once every rank has finished; without an output
file the ranks journal into a scratch folder of rank 0's and rank 0 prints it at the end. In one
process without an output file, results are printed as they finish.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from sslam_core.errors import OptionError
from sslam_core.inference.events import (
    EVENT_FORMATS,
    Event,
    EventOptions,
    detect,
    detect_from_windows,
    event_dicts,
    render_events,
    result_step_scores,
    tag_token_steps,
)
from sslam_core.inference.options import PipelineOptions
from sslam_core.inference.partition import my_share, report_done, wait_for_ranks
from sslam_core.inference.tagging import TagResult, tag
from sslam_core.runs import distributed
from sslam_core.runs.outputs import (
    OutputError,
    finished_refusal,
    is_finished,
    recorded_settings,
    settings_digest,
)
from sslam_core.runs.text_journal import TextJournal

FORMATS = ("table", "json", "csv")
CSV_HEADER = ["path", "scope", "start", "end", "rank", "label", "mid", "score"]
Labels = Sequence[tuple[str, str]]  # (mid, display name) per class


@dataclass(frozen=True)
class TagReport:
    """What each file's text holds: `fmt`, the top `top_k` labels scoring at least `threshold`, every
    window's scores with `timeline`, and the events of `detection` (None: no events), whose step scores
    come from the windows (`frame_scores` "window") or from each step's tokens ("token")."""

    fmt: str
    labels: Labels
    top_k: int = 5
    threshold: float | None = None
    timeline: bool = False
    detection: EventOptions | None = None
    frame_scores: str = "window"

    def formats(self) -> tuple[str, ...]:
        return (*FORMATS[:2], *EVENT_FORMATS) if self.detection is not None else FORMATS


@dataclass
class TagSummary:
    """How a run ended: files tagged and skipped (over every rank on rank 0, once all have finished),
    whether it was interrupted (here, or on another rank), and files done before this run."""

    tagged: int
    skipped: int
    interrupted: bool = False
    resumed: int = 0
    complete: bool = False  # --resume found the output finished with these settings: nothing was done


def header(fmt: str) -> str:
    """The first lines of an output in `fmt`, before any file's results."""
    if fmt == "csv":
        return csv_rows([CSV_HEADER])
    return render_events("", [], fmt, first=True) if fmt in ("dcase", "raven") else ""


def csv_rows(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def file_events(res: TagResult, report: TagReport) -> list[Event]:
    """The events of one tagged file."""
    steps = getattr(res, "steps", None)  # token frame scores: one row per step already
    if steps:
        starts, scores = result_step_scores(res, report.detection.step)
        return detect(starts, scores, res.duration, report.labels, report.detection)
    return detect_from_windows(res.segments, res.duration, report.labels, report.detection)


def render_tables(*renderables, width: int | None = None) -> str:
    """Rich tables and text as a string: wrapped at `width` columns (a terminal's), or not wrapped at all
    (pipes, files), so that long paths and rows stay on one line. Cells are `Text`, never markup."""
    out = Console(record=True, width=width or 100_000, file=io.StringIO())
    for r in renderables:
        out.print(r)
    text = out.export_text()
    if width is not None:
        return text
    return "".join(line.rstrip() + "\n" for line in text.splitlines())


def render_result(
    res: TagResult,
    report: TagReport,
    events: list[Event] | None = None,
    selection: int = 1,
    width: int | None = None,
) -> str:
    """One file's results in the report's format: a JSON line, its CSV rows, its event rows (Raven
    selections numbered from `selection`), or its table(s) (wrapped at `width`)."""
    names, fmt, top_k, threshold = report.labels, report.fmt, report.top_k, report.threshold
    if fmt in EVENT_FORMATS:
        return render_events(res.path, events, fmt, first=False, number=selection)
    chosen = res.top(names, top_k, threshold)
    index = {m: i for i, (m, _) in enumerate(names)}
    if fmt == "json":
        labels = [{"label": n, "mid": m, "score": round(s, 6)} for n, m, s in chosen]
        obj = {"path": res.path, "duration": round(res.duration, 4), "labels": labels}
        if report.timeline:
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
        if report.timeline:
            for a, b, s in res.segments:
                rows += [
                    [res.path, "segment", round(a, 3), round(b, 3), r, n, m, f"{s[index[m]]:.6f}"]
                    for r, (n, m, _) in enumerate(chosen, 1)
                ]
        return csv_rows(rows)
    table = Table()  # the title goes above as a line of its own: a table title wraps at its width
    for name in ("label", "mid", "score"):
        table.add_column(name, justify="right" if name == "score" else "left")
    for n, m, s in chosen:
        table.add_row(Text(n), Text(m), f"{s:.3f}")
    tables = [Text(f"{res.path} ({res.duration:.2f} s)"), table]
    if report.timeline:
        seg = Table(show_header=True)
        for name in ("start", "end", "top labels"):
            seg.add_column(name)
        for a, b, s in res.segments:
            best = sorted(range(len(s)), key=lambda i: -s[i])[: max(top_k, 1)]
            seg.add_row(f"{a:.2f}", f"{b:.2f}", Text(", ".join(f"{names[i][1]} {s[i]:.2f}" for i in best)))
        tables.append(seg)
    if events is not None:
        ev = Table(show_header=True)
        for name in ("onset", "offset", "event", "score"):
            ev.add_column(name, justify="left" if name == "event" else "right")
        for e in events:
            ev.add_row(f"{e.onset:.2f}", f"{e.offset:.2f}", Text(e.label), f"{e.score:.3f}")
        tables += [Text(f"{len(events)} event(s)"), ev]
    return render_tables(*tables, width=width)


def open_journal(
    output: Path | None, settings: dict, resume: bool, report: TagReport
) -> tuple[TextJournal | None, str | None]:
    """The journal the results go to: `output`'s; under torchrun without `output`, one in a scratch
    folder of rank 0's (the ranks must share this machine), printed when all have finished. (None,
    None) for a single process printing as it goes; else (journal, scratch folder or None)."""
    scratch = None
    if distributed.launched():
        if report.fmt == "raven":
            raise OptionError(
                "raven selection numbers run on over files: write raven tables from one process"
            )
        if output is None:
            if not distributed.single_machine():
                raise OptionError("ranks on several machines need --output FILE on a file system they share")
            scratch = distributed.on_main(lambda: tempfile.mkdtemp(prefix="sslam-tag-"))
            output = Path(scratch) / "tags"
    if output is None:
        return None, None
    return TextJournal(output, settings, resume=resume, header=header(report.fmt)), scratch


def tag_files(
    model,
    files: Sequence[tuple[object, str]],
    options: PipelineOptions,
    report: TagReport,
    *,
    output: Path | None = None,
    settings: dict | None = None,
    resume: bool = False,
    width: int | None = None,
    echo: Callable[[str], None] = print,
    on_start: Callable[[int, int], None] | None = None,
    on_file: Callable[[int, TagResult], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> TagSummary:
    """Tag `files` ((source, name) pairs) and write every file's text in the report's format.

    With `output`, the text goes through a journal (`settings` identify the run: a journal of other
    settings is refused; `resume` continues one); without it, `echo(text)` prints each file's text as
    it finishes (tables wrapped at `width`). `on_start(todo, done)` is called once with the number of
    files this process will tag and of those done before (resumed); `on_file(index, result)` after
    each file, skipped ones included (their `error` says why); `stop()` ends the run after the
    current file. Under torchrun rank 0 writes (or echoes) everything once every rank has finished.
    """
    stop = stop or (lambda: False)
    if resume and output is not None and is_finished(output):  # a finished output is left as it is
        if recorded_settings(output) != settings_digest(settings or {}):
            raise finished_refusal(output)
        return TagSummary(0, 0, resumed=len(files), complete=True)
    journal, scratch = open_journal(output, settings or {}, resume, report)
    if journal is None:
        echo(header(report.fmt))
    done = journal.done if journal else {}
    todo = [(i, source, name) for i, (source, name) in enumerate(files) if name not in done]
    share = my_share([source for _, source, _ in todo])  # all of them in one process; a rank's part
    todo = todo[share.start : share.stop]
    selection = 1 + (journal.lines() if report.fmt == "raven" and done else 0)  # Raven numbers run on
    tagged = sum(e is None for e in done.values())
    skipped = len(done) - tagged
    if on_start is not None:
        on_start(len(todo), len(done))
    token = report.detection is not None and report.frame_scores == "token"
    stream = (tag_token_steps if token else tag)(
        model,
        [source for _, source, _ in todo],
        options,
        multilabel=getattr(model, "multilabel", True),
        stop=stop,
        names=[name for _, _, name in todo],
    )
    try:
        for (i, _, name), res in zip(todo, stream, strict=False):  # shorter when interrupted
            found = file_events(res, report) if report.detection is not None and not res.error else None
            text = "" if res.error else render_result(res, report, found, selection, width)
            if res.error:
                skipped += 1
            else:
                tagged += 1
                selection += len(found or ())
            if on_file is not None:
                on_file(i, res)
            if journal is not None:
                try:
                    journal.add(name, text, res.error)
                except OutputError as e:
                    hint = "the finished files are kept, rerun with --resume once it is fixed"
                    raise OutputError(e.errno, f"{e}; {hint}") from None
            elif text:
                echo(text)
            if stop():
                break
    finally:
        stream.close()
    if journal is not None:
        journal.close()
        report_done(journal.parts, journal.run, stop(), tagged + skipped)
    if stop():
        return TagSummary(tagged, skipped, interrupted=True, resumed=len(done))
    if journal is not None and distributed.is_main():
        if not wait_for_ranks(journal.parts, journal.run, stop):
            return TagSummary(tagged, skipped, interrupted=True, resumed=len(done))
        journal.reload()
        names = [name for _, name in files]
        tagged = sum(journal.done.get(n, "") is None for n in names)
        skipped = sum(journal.done.get(n) is not None for n in names)
        journal.finish(names)
        if scratch is not None:
            echo(journal.out.read_text(encoding="utf-8"))
            shutil.rmtree(scratch, ignore_errors=True)
    return TagSummary(tagged, skipped, resumed=len(done))


__all__ = [
    "CSV_HEADER",
    "FORMATS",
    "TagReport",
    "TagSummary",
    "file_events",
    "header",
    "open_journal",
    "render_result",
    "render_tables",
    "tag_files",
]
