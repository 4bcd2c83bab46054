"""`sslam convert`: rewrite a checkpoint in another layout (fairseq .pt, HF folder, our .safetensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sslam_core.checkpoints import LAYOUTS, CheckpointError, read_checkpoint, write_checkpoint


def infer_layout(dst: str) -> str:
    """.pt -> fairseq, .safetensors -> sslam, a folder or a name without suffix -> hf."""
    suffix = Path(dst).suffix.lower()
    if suffix == ".pt":
        return "fairseq"
    if suffix == ".safetensors":
        return "sslam"
    if Path(dst).is_dir() or not suffix:
        return "hf"
    raise CheckpointError(f"{dst}: cannot tell the layout from the suffix {suffix!r}; pass --to")


def convert(
    src: Annotated[str, typer.Argument(help="fairseq .pt, HF folder or hub id, or our .safetensors.")],
    dst: Annotated[str, typer.Argument(help="Output: .pt (fairseq), .safetensors (sslam) or a folder (hf).")],
    to: Annotated[str | None, typer.Option("--to", help="Output layout: sslam, hf or fairseq.")] = None,
    teacher: Annotated[bool, typer.Option("--teacher", help="Export the EMA teacher instead.")] = False,
) -> None:
    """Convert a checkpoint between the fairseq, Hugging Face and sslam layouts."""
    try:
        layout = to or infer_layout(dst)
        if layout not in LAYOUTS:
            raise CheckpointError(f"{dst}: unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")
        ckpt = read_checkpoint(src, teacher=teacher)
        out = write_checkpoint(ckpt, dst, layout)
    except (CheckpointError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {out} ({layout}, {ckpt.config.depth} blocks, dim {ckpt.config.embed_dim})")
