"""`sslam stats`: fbank mean and std of a data set, to pass as `--norm MEAN,STD`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from tqdm import tqdm

from sslam_cli.options import (
    EXIT_OK,
    EXIT_SKIPPED,
    claim_or_fail,
    err_console,
    fail,
    note,
    output_format,
    pick_device,
    warn,
    write_text_atomic,
)


def _audio_paths(data: str, audio_dir: Path | None) -> list[str]:
    """Audio files of a labelled set, else of a folder, file list or manifest."""
    from sslam_core.data.datasets import list_audio, read_labelled
    from sslam_core.data.label_formats import DatasetError

    try:
        return [e.path for e in read_labelled(data, audio_dir=audio_dir).examples]
    except DatasetError as labelled_error:
        try:
            return list_audio(data, audio_dir=audio_dir)
        except DatasetError:
            fail(str(labelled_error))


def stats(
    data: Annotated[
        str,
        typer.Argument(
            help="A labelled set (as for `sslam eval`), an audio folder, a file list or a manifest."
        ),
    ],
    audio_dir: Annotated[
        Path, typer.Option("--audio-dir", help="Where the audio lives, if not beside the labels.")
    ] = None,
    target_length: Annotated[
        int,
        typer.Option(
            "--target-length",
            help="Count only each file's first N frames, as a model input of N frames keeps [default: all].",
        ),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format", "-f", help="table or json [default: json for an --output ending .json, else table]."
        ),
    ] = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Write the result to this file instead of stdout.")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Files per fbank batch.")] = 16,
    workers: Annotated[int, typer.Option("--workers", "-w", help="Threads decoding audio.")] = 2,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or auto.")] = "auto",
) -> None:
    """Print the fbank mean and std over all real frames and bins of all files (padding never counts)."""
    from sslam_core.audio.stats import fbank_stats

    fmt = output_format(fmt, output, ("table", "json"))
    if fmt not in ("table", "json"):
        fail(f"--format {fmt!r}: choose table or json")
    if target_length is not None and target_length <= 0:
        fail(f"--target-length must be positive, got {target_length}")
    if output is not None:
        claim_or_fail(output, overwrite)
    paths = _audio_paths(data, audio_dir)
    if not paths:
        fail(f"{data}: no audio files")
    bar = tqdm(total=len(paths), unit="file", disable=len(paths) < 2, file=err_console.file)

    def progress(error: str | None) -> None:
        if error is not None:
            bar.clear()
            warn(error)
        bar.update()

    result = fbank_stats(
        paths,
        target_length=target_length,
        batch_size=batch_size,
        workers=workers,
        device=pick_device(device),
        progress=progress,
    )
    bar.close()
    if result.frames == 0:
        fail(f"{data}: no file could be read")
    scope = f"first {target_length} frames of each file" if target_length else "all frames of each file"
    if fmt == "json":
        obj = {
            "mean": result.mean,
            "std": result.std,
            "norm": result.norm,
            "frames": result.frames,
            "files": result.files,
            "n_skipped": len(result.skipped),
            "target_length": target_length,
        }
        finite = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in obj.items()}
        text = json.dumps(finite) + "\n"
    else:
        text = (
            f"mean  {result.mean:.6f}\n"
            f"std   {result.std:.6f}\n"
            f"over  {result.frames} frames x 128 bins of {result.files} file(s) ({scope}; padding excluded)\n"
            f"use   --norm {result.norm}\n"
        )
    if output is None:
        typer.echo(text, nl=False)
    else:
        write_text_atomic(output, text)
        note(f"wrote {output}")
    if result.skipped:
        note(f"read {result.files} file(s), skipped {len(result.skipped)}")
    raise typer.Exit(EXIT_SKIPPED if result.skipped else EXIT_OK)
