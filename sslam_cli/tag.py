"""`sslam tag`: AudioSet (or custom) tags of audio files, for the whole clip and over time."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from sslam_cli.common import (
    EXIT_OK,
    EXIT_SKIPPED,
    BatchSize,
    Device,
    Hop,
    Norm,
    Precision,
    Window,
    Workers,
    check_precision,
    err_console,
    fail,
    frames_or_fail,
    load_model_or_fail,
    parse_norm,
    pick_device,
    warn,
    write_text_atomic,
)


def tag(
    paths: list[str] = typer.Argument(
        ..., help="Audio files, folders (searched recursively), or file lists."
    ),
    checkpoint: str = typer.Option(
        None,
        "--checkpoint",
        "-c",
        help="Fine-tuned checkpoint: .pt, folder, .safetensors, run dir or hub id "
        "[default: ta012/SSLAM_AS2M_Finetuned].",
    ),
    top_k: int = typer.Option(5, "--top-k", "-k", help="Labels to report per file."),
    threshold: float = typer.Option(
        None, "--threshold", "-t", help="Only report labels scoring at least this."
    ),
    window: Window = None,
    hop: Hop = None,
    timeline: bool = typer.Option(False, "--timeline", help="Also report the scores of every window."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, json (one object per line) or csv."),
    output: Path = typer.Option(
        None, "--output", "-o", help="Write the results to this file instead of stdout."
    ),
    plot: Path = typer.Option(
        None, "--plot", help="PNG heatmap of the top classes over time (needs matplotlib)."
    ),
    labels: Path = typer.Option(None, "--labels", help="CSV of class names for a custom head."),
    norm: Norm = None,
    batch_size: BatchSize = None,
    workers: Workers = None,
    device: Device = "auto",
    precision: Precision = "fp32",
) -> None:
    """Tag audio. The clip score of each class is its maximum over the windows of the file."""
    from sslam_core.checkpoints import DEFAULT_TAGGER
    from sslam_core.inputs import collect_inputs
    from sslam_core.labels import read_label_csv
    from sslam_core.model import Classifier
    from sslam_core.tagging import tag as run_tag

    if fmt not in ("table", "json", "csv"):
        fail(f"--format {fmt!r}: choose table, json or csv")
    dev = pick_device(device)
    check_precision(precision, dev)
    model = load_model_or_fail(checkpoint or DEFAULT_TAGGER, dev)
    if not isinstance(model, Classifier):
        fail(f"{checkpoint or DEFAULT_TAGGER}: an encoder without a classifier head cannot tag")
    names = model.labels
    if labels is not None:
        try:
            names = read_label_csv(labels)
        except (OSError, ValueError) as e:
            fail(f"{labels}: {e}")
    if names is None or len(names) != model.cfg.num_classes:
        found = "no" if names is None else len(names)
        fail(f"the model has {model.cfg.num_classes} classes but {found} label names; pass --labels CSV")
    frames, hop_frames = frames_or_fail(model, window, hop)
    inputs = collect_inputs(paths)
    if not inputs:
        fail("no audio files found in " + ", ".join(paths))

    multilabel = getattr(model, "multilabel", True)
    results, skipped = [], []
    bar = tqdm(total=len(inputs), unit="file", disable=len(inputs) < 2, file=err_console.file)
    stream = run_tag(
        model,
        [p for p, _ in inputs],
        target_length=frames,
        hop=hop_frames,
        multilabel=multilabel,
        batch_size=batch_size,
        workers=workers,
        device=dev,
        precision=precision,
        normalization=parse_norm(norm, model.normalization),
    )
    for (_, name), res in zip(inputs, stream, strict=True):
        res.path = name
        bar.update()
        if res.error:
            warn(res.error)
            skipped.append(res)
        else:
            results.append(res)
    bar.close()

    text = _render(results, names, fmt, top_k, threshold, timeline)
    if output is not None:
        write_text_atomic(str(output), text)
    elif fmt == "table":
        Console().print(text, end="")
    else:
        typer.echo(text, nl=False)
    if plot is not None:
        from sslam_core.plots import plot_timeline

        for i, res in enumerate(results):
            target = plot if len(results) == 1 else plot.with_name(f"{plot.stem}-{i:03d}{plot.suffix}")
            plot_timeline(res, names, target, top_k=max(top_k, 1))
    if len(inputs) > 1 or skipped:
        err_console.print(f"tagged {len(results)} file(s), skipped {len(skipped)}")
    raise typer.Exit(EXIT_SKIPPED if skipped else EXIT_OK)


def _labels(res, names, top_k, threshold) -> list[dict]:
    return [{"label": n, "mid": m, "score": round(s, 6)} for n, m, s in res.top(names, top_k, threshold)]


def _render(results, names, fmt, top_k, threshold, timeline) -> str:
    if fmt == "json":
        lines = []
        for res in results:
            chosen = _labels(res, names, top_k, threshold)
            obj = {"path": res.path, "duration": round(res.duration, 4), "labels": chosen}
            if timeline:
                idx = [next(i for i, (m, _) in enumerate(names) if m == c["mid"]) for c in chosen]
                obj["segments"] = [
                    {
                        "start": round(a, 3),
                        "end": round(b, 3),
                        "scores": {names[i][1]: round(float(s[i]), 6) for i in idx},
                    }
                    for a, b, s in res.segments
                ]
            lines.append(json.dumps(obj, ensure_ascii=False))
        return "".join(line + "\n" for line in lines)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "scope", "start", "end", "rank", "label", "mid", "score"])
        for res in results:
            chosen = res.top(names, top_k, threshold)
            for r, (n, m, s) in enumerate(chosen, 1):
                w.writerow([res.path, "clip", 0.0, round(res.duration, 3), r, n, m, f"{s:.6f}"])
            if timeline:
                idx = {m: i for i, (m, _) in enumerate(names)}
                for a, b, s in res.segments:
                    for r, (n, m, _) in enumerate(chosen, 1):
                        w.writerow(
                            [res.path, "segment", round(a, 3), round(b, 3), r, n, m, f"{s[idx[m]]:.6f}"]
                        )
        return buf.getvalue()
    out = Console(record=True, width=100, file=io.StringIO())
    for res in results:
        table = Table(title=f"{res.path} ({res.duration:.2f} s)", title_justify="left")
        table.add_column("label")
        table.add_column("mid")
        table.add_column("score", justify="right")
        for n, m, s in res.top(names, top_k, threshold):
            table.add_row(n, m, f"{s:.3f}")
        out.print(table)
        if timeline:
            seg = Table(show_header=True)
            seg.add_column("start")
            seg.add_column("end")
            seg.add_column("top labels")
            for a, b, s in res.segments:
                best = sorted(range(len(s)), key=lambda i: -s[i])[: max(top_k, 1)]
                seg.add_row(f"{a:.2f}", f"{b:.2f}", ", ".join(f"{names[i][1]} {s[i]:.2f}" for i in best))
            out.print(seg)
    return out.export_text()
