"""`sslam pack`: decode a corpus once into 16 kHz int16 HDF5 shards that training reads quickly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sslam_cli.options import fail, warn
from sslam_core.audio.constants import SAMPLE_RATE


def _replaced_shards(paths: list[str], out: Path, shard_size: int) -> list[str]:
    """Shard files in `out` that packing `paths` would replace (made from other inputs)."""
    from sslam_core.data.packing import reusable_shard, sources_digest

    names = []
    for k, first in enumerate(range(0, len(paths), shard_size)):
        shard = out / f"shard-{k:05d}.h5"
        if (
            shard.exists()
            and reusable_shard(shard, sources_digest(paths[first : first + shard_size])) is None
        ):
            names.append(shard.name)
    return names


def pack(
    data: Annotated[
        list[str],
        typer.Argument(help="Audio files, folders, path lists or fairseq .tsv manifests.", metavar="DATA"),
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder (shards + index.json; created).")],
    shard_size: Annotated[int, typer.Option("--shard-size", help="Input files per shard.")] = 1000,
    workers: Annotated[int, typer.Option("--workers", help="Decoding threads.")] = 2,
    recursive: Annotated[bool, typer.Option("--recursive/--no-recursive", help="Search sub-folders.")] = True,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace shards in OUT that were packed from other inputs.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Pack audio into shards for `sslam pretrain`; re-running with the same inputs skips finished shards."""
    from sslam_core.data.datasets import list_audio
    from sslam_core.data.packing import pack_audio
    from sslam_core.runs.outputs import output_error

    if shard_size < 1:
        fail(f"--shard-size must be at least 1, got {shard_size}")
    if out.exists() and not out.is_dir():
        fail(f"{out}: is a file, not a folder")
    try:
        paths = list_audio(data, recursive=recursive)
    except ValueError as e:  # not an SslamError
        fail(str(e))
    replaced = _replaced_shards(paths, out, shard_size) if out.is_dir() else []
    if replaced and not overwrite:
        shown = ", ".join(replaced[:3]) + (", ..." if len(replaced) > 3 else "")
        fail(
            f"{out} holds {len(replaced)} shard(s) packed from other inputs ({shown}); "
            "pass --overwrite to replace them"
        )
    try:
        report = pack_audio(paths, out, shard_size=shard_size, num_workers=workers, progress=not quiet)
    except ValueError as e:  # not an SslamError
        fail(str(e))
    except OSError as e:
        fail(str(output_error(out, e)))
    for path, reason in report.skipped:
        warn(f"{path}: {reason}")
    hours = report.samples / SAMPLE_RATE / 3600
    typer.echo(
        f"packed {report.clips} clips ({hours:.2f} h) into {out}: {report.shards_written} shards written, "
        f"{report.shards_reused} already done, {len(report.skipped)} unreadable files skipped"
    )
