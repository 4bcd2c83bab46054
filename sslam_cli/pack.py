"""`sslam pack`: decode a corpus once into 16 kHz int16 HDF5 shards that training reads quickly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sslam_cli.common import fail, warn


def pack(
    data: Annotated[
        list[str], typer.Argument(help="Audio files, folders, path lists or fairseq .tsv manifests.")
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder (shards + index.json).")],
    shard_size: Annotated[int, typer.Option("--shard-size", help="Input files per shard.")] = 1000,
    workers: Annotated[int, typer.Option("--workers", help="Decoding threads.")] = 2,
    recursive: Annotated[bool, typer.Option("--recursive/--no-recursive", help="Search sub-folders.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Pack audio into shards for `sslam pretrain`; re-running skips finished shards."""
    from sslam_core.datasets import DatasetError, list_audio
    from sslam_core.training_data import pack_audio

    try:
        paths = list_audio(data, recursive=recursive)
        report = pack_audio(paths, out, shard_size=shard_size, num_workers=workers, progress=not quiet)
    except (DatasetError, ValueError, OSError) as e:
        fail(str(e))
    for path, reason in report.skipped:
        warn(f"{path}: {reason}")
    hours = report.samples / 16000 / 3600
    typer.echo(
        f"packed {report.clips} clips ({hours:.2f} h) into {out}: {report.shards_written} shards written, "
        f"{report.shards_reused} already done, {len(report.skipped)} unreadable files skipped"
    )
