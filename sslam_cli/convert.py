"""`sslam convert`: rewrite a checkpoint in another layout (fairseq .pt, HF folder, our .safetensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sslam_cli.options import claim_or_fail, fail


def infer_layout(dst: str) -> str | None:
    """.pt -> fairseq, .safetensors -> sslam, a folder or a name without suffix -> hf; else None."""
    suffix = Path(dst).suffix.lower()
    if suffix == ".pt":
        return "fairseq"
    if suffix == ".safetensors":
        return "sslam"
    if Path(dst).is_dir() or not suffix:
        return "hf"
    return None


def _claim(dst: str, layout: str, overwrite: bool) -> list[Path]:
    """The files `layout` writes at `dst`, refused (one line, exit 2) if they may not be written."""
    path = Path(dst)
    if layout != "hf":
        return [claim_or_fail(path, overwrite)]
    if path.exists() and not path.is_dir():
        fail(f"{path}: is a file; the Hugging Face layout is a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        fail(f"{path} exists and is not empty; pass --overwrite to replace its files")
    return [claim_or_fail(path / name, overwrite=True) for name in ("model.safetensors", "config.json")]


def convert(
    src: Annotated[str, typer.Argument(help="fairseq .pt, HF folder or hub id, or our .safetensors.")],
    dst: Annotated[str, typer.Argument(help="Output: .pt (fairseq), .safetensors (sslam) or a folder (hf).")],
    to: Annotated[str | None, typer.Option("--to", help="Output layout: sslam, hf or fairseq.")] = None,
    teacher: Annotated[bool, typer.Option("--teacher", help="Export the EMA teacher instead.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output file (or the HF folder's files).")
    ] = False,
) -> None:
    """Convert a checkpoint between the fairseq, Hugging Face and sslam layouts, keeping its labels,
    normalisation and training metadata."""
    from sslam_core.models.loading import LAYOUTS, read_checkpoint, write_checkpoint

    layout = to or infer_layout(dst)
    if layout is None:
        fail(f"{dst}: cannot tell the layout from the suffix {Path(dst).suffix!r}; pass --to")
    if layout not in LAYOUTS:
        fail(f"{dst}: unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    _claim(dst, layout, overwrite)
    try:
        ckpt = read_checkpoint(src, teacher=teacher)
        out = write_checkpoint(ckpt, dst, layout)
    except OSError as e:  # not an OutputError (those are SslamErrors): a bare OS error of the writer
        fail(str(e))
    typer.echo(f"wrote {out} ({layout}, {ckpt.config.depth} blocks, dim {ckpt.config.embed_dim})")
