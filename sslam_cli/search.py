"""`sslam search`: the nearest clips or segments of an embedding store for audio queries (query by example).

Parses the options and calls `sslam_core.search.Index`; formats the matches as a table, JSON lines or
CSV, and writes each match's segment as a wav file with `--export`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sslam_cli.options import (
    EXIT_OK,
    EXIT_SKIPPED,
    BatchSize,
    Device,
    Workers,
    cell,
    check_precision,
    claim_or_fail,
    echo,
    err_console,
    fail,
    note,
    output_format,
    pick_device,
    render,
    report_inputs,
    warn,
    write_text_atomic,
)

FORMATS = ("table", "json", "csv")


def search(
    queries: Annotated[
        list[str],
        typer.Argument(
            metavar="QUERY",
            help="Audio files, folders, file lists, manifests or tar shards to search for.",
            show_default=False,
        ),
    ] = None,
    index: Annotated[
        str, typer.Option("--index", help="The embedding store (`sslam extract` HDF5) to search.")
    ] = None,
    k: Annotated[int, typer.Option("-k", "--top", min=1, help="Matches per query.")] = 10,
    granularity: Annotated[
        str,
        typer.Option(
            "--granularity",
            "-g",
            help="clip (files) or frame (segments) [default: frame when the store has them].",
        ),
    ] = None,
    group: Annotated[
        bool, typer.Option("--group", help="Frame stores: the best segment of each file.")
    ] = False,
    query_store: Annotated[
        str,
        typer.Option(
            "--query-store", help="Take the files of another store as queries (same model and layer)."
        ),
    ] = None,
    checkpoint: Annotated[
        str,
        typer.Option(
            "--checkpoint", "-c", help="Embed the queries with this checkpoint [default: the store's own]."
        ),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="table, json (one line per query) or csv [default: from the --output extension (.csv, "
            ".json, .jsonl), else table].",
        ),
    ] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="Write the matches to this file.")] = None,
    export: Annotated[
        str,
        typer.Option("--export", help="Write each match's segment (or file) as a wav file in this folder."),
    ] = None,
    audio_root: Annotated[
        str,
        typer.Option("--audio-root", help="Where the store's files are, for --export [default: as named]."),
    ] = None,
    pad: Annotated[
        float, typer.Option("--pad", min=0.0, help="Seconds of context around an exported segment.")
    ] = 1.0,
    approximate: Annotated[
        bool,
        typer.Option(
            "--approximate/--exact",
            help="Force the approximate index (faiss) or the exact search [default: exact up to 250,000 "
            "vectors].",
            show_default=False,
        ),
    ] = None,
    audio_dir: Annotated[
        str, typer.Option("--audio-dir", help="Root folder of the files in a .tsv manifest.")
    ] = None,
    batch_size: BatchSize = None,
    workers: Workers = None,
    device: Device = "auto",
    precision: Annotated[str, typer.Option(help="fp32, bf16 or fp16 for embedding the queries.")] = "fp32",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output or exports.")
    ] = False,
) -> None:
    """Query by example: the nearest clips (or segments) of an embedding store, by cosine."""
    from sslam_core.search.index import Index

    fmt = output_format(fmt, output, FORMATS)
    if fmt not in FORMATS:
        fail(f"--format {fmt}: choose {', '.join(FORMATS)}")
    if not index:
        fail("--index STORE.h5 is required: the embedding store to search (written by `sslam extract`)")
    if bool(queries) == bool(query_store):
        both = "give QUERY audio, or --query-store Q.h5, not both"
        fail(
            both
            if queries
            else "nothing to search for: give QUERY audio files (or folders), or --query-store Q.h5"
        )
    if output:
        claim_or_fail(output, overwrite)
    with Index(index, granularity, approximate=approximate, note=note, progress=_progress) as idx:
        if query_store:
            results = _store_queries(idx, query_store, k, group)
        else:
            results = _audio_queries(idx, queries, k, group, checkpoint, audio_dir, device, precision,
                                     batch_size, workers)  # fmt: skip
        frames = idx.granularity == "frame"
    answered = [r for r in results if r.error is None]
    for r in results:
        if r.error is not None:
            warn(r.error)
    text = _format(answered, fmt, frames)
    if output:
        write_text_atomic(output, text)
    else:
        echo(text)
    failed_exports = _export(answered, Path(export), pad, overwrite, audio_root) if export else 0
    if not answered:
        fail(f"none of the {len(results)} queries could be answered")
    note(f"searched {len(answered)} quer{'y' if len(answered) == 1 else 'ies'} in {index} ({idx.mode}, "
         f"{idx.store.rows} {idx.granularity} vectors of {idx.store.files} files)")  # fmt: skip
    raise typer.Exit(EXIT_SKIPPED if len(answered) < len(results) or failed_exports else EXIT_OK)


def _progress(total: int, what: str):
    from tqdm import tqdm

    bar = tqdm(total=total, unit="vec", desc=what, file=err_console.file, delay=0.5, unit_scale=True)

    def done(rows: int) -> None:
        bar.update(rows)
        if bar.n >= total:
            bar.close()

    return done


def _audio_queries(idx, queries, k, group, checkpoint, audio_dir, device, precision, batch_size, workers):
    from sslam_core.data.inputs import collect_inputs
    from sslam_core.runs.interrupts import StopRequest

    inputs = collect_inputs(queries, audio_dir)
    report_inputs(inputs, queries)
    dev = pick_device(device)
    precision = check_precision(precision, dev)
    with StopRequest() as stop:
        results = idx.search_audio(
            inputs.paths, k, group, checkpoint, names=inputs.names, device=dev, precision=precision,
            batch_size=batch_size, workers=workers, stop=lambda: stop.requested,
        )  # fmt: skip
    if stop.requested:
        from sslam_cli.options import interrupted

        interrupted(stop, len(results), resumable=False)
    return results


def _store_queries(idx, query_store, k, group):
    """Each file of another store as a query: its clip vector, or for a frame index the mean of its frame
    vectors; refused when the two stores were made with other models or layers."""
    from sslam_core.search.index import QueryResult
    from sslam_core.search.store import EmbeddingStore

    with EmbeddingStore(query_store, idx.granularity) as q:
        mine, theirs = idx.store.settings, q.settings
        for key in ("checkpoint_sha256", "layer", "teacher"):
            if key in mine and key in theirs and mine[key] != theirs[key]:
                fail(f"{query_store} and {idx.store.path} were extracted with other settings ({key} "
                     f"{theirs[key]} and {mine[key]}); their vectors are not comparable")  # fmt: skip
        if q.dim != idx.store.dim:
            dims = f"{q.dim}-dimensional vectors, {idx.store.path} {idx.store.dim}-dimensional ones"
            fail(f"{query_store} holds {dims}")
        vectors = [q.vectors(range(q.offsets[i], q.offsets[i + 1])).mean(axis=0) for i in range(q.files)]
        names = list(q.paths)
    matches = idx.search(vectors, k, group)
    return [QueryResult(name, m) for name, m in zip(names, matches, strict=True)]


def _format(results, fmt: str, frames: bool) -> str:
    if fmt == "json":
        lines = []
        for r in results:
            matches = [{"rank": m.rank, "path": m.path, "score": m.score, "start": m.start, "end": m.end}
                       for m in r.matches]  # fmt: skip
            lines.append(json.dumps({"query": r.query, "matches": matches}))
        return "".join(line + "\n" for line in lines)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["query", "rank", "path", "score", "start", "end"])
        for r in results:
            for m in r.matches:
                writer.writerow([r.query, m.rank, m.path, f"{m.score:.6f}", _num(m.start), _num(m.end)])
        return buffer.getvalue()
    tables = []
    for r in results:
        tables.append(cell(r.query))  # a line of its own: a table title would wrap at the table's width
        table = Table()
        for column in ("rank", "score", "path", *(("start", "end") if frames else ())):
            table.add_column(column, justify="right" if column != "path" else "left")
        for m in r.matches:
            row = [str(m.rank), f"{m.score:.4f}", m.path, *((_num(m.start), _num(m.end)) if frames else ())]
            table.add_row(*map(cell, row))
        tables.append(table)
    return render(*tables)


def _num(value) -> str:
    return "" if value is None else f"{value:.2f}"


def _export(results, folder: Path, pad: float, overwrite: bool, root: str | None) -> int:
    """Each match's segment (with `pad` seconds around it) or whole file, as 16 kHz mono wav files named
    qQUERY_RANK_NAME[_START-END].wav; existing files are refused unless `overwrite`. The stored names
    are read relative to `root` (the folder the store was extracted from) or as they are. Returns how
    many could not be written (one `skipped:` line each)."""
    import soundfile as sf

    from sslam_core.audio.constants import SAMPLE_RATE
    from sslam_core.audio.decode import load_audio
    from sslam_core.audio.files import AudioError
    from sslam_core.runs.outputs import atomic_write

    plan = []
    for qi, r in enumerate(results, start=1):
        for m in r.matches:
            stem = Path(m.path).stem.replace("/", "_")[:80]
            span = "" if m.start is None else f"_{m.start:.2f}-{m.end:.2f}"
            plan.append((folder / f"q{qi:03d}_{m.rank:02d}_{stem}{span}.wav", m))
    clashes = [p for p, _ in plan if p.exists()]
    if clashes and not overwrite:
        fail(f"{clashes[0]} exists ({len(clashes)} export(s) would be replaced); pass --overwrite")
    written = 0
    for path, m in plan:
        try:
            wave = load_audio(str(Path(root) / m.path) if root else m.path)
        except (AudioError, OSError) as err:
            hint = "" if root else "; give --audio-root, the folder the store was extracted from"
            warn(f"cannot export {m.path}: {getattr(err, 'reason', err)}{hint}")
            continue
        wave = wave.numpy() if hasattr(wave, "numpy") else wave
        if m.start is not None:
            first = max(0, math.floor((m.start - pad) * SAMPLE_RATE))
            wave = wave[first : math.ceil((m.end + pad) * SAMPLE_RATE)]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp, w=wave: sf.write(tmp, w, SAMPLE_RATE, format="WAV", subtype="PCM_16"))
        written += 1
    note(f"exported {written} segment(s) to {folder}")
    return len(plan) - written
