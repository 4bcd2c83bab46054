"""`sslam export`: a checkpoint to one ONNX file (encoder features or classifier logits), checked
against torch before it is written."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sslam_cli.options import claim_or_fail, fail


def export(
    checkpoint: Annotated[
        str, typer.Argument(help="Checkpoint: .pt, folder, .safetensors, run dir or hub id.")
    ],
    output: Annotated[Path, typer.Argument(help="The .onnx file to write.")],
    layer: Annotated[
        int | None,
        typer.Option(
            "--layer",
            "-l",
            help="Block whose features the graph gives, from 1; negative from the end [default: last].",
        ),
    ] = None,
    target_length: Annotated[
        int | None,
        typer.Option(
            "--target-length",
            help="Default window in frames, a multiple of 16 "
            "[default: the model's training length, else 1024].",
        ),
    ] = None,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="int8 matrix products (per-channel weights, per-token activation scales; the output "
            "block stays fp32).",
        ),
    ] = False,
    teacher: Annotated[
        bool, typer.Option("--teacher", help="Export the EMA teacher of a pre-training checkpoint.")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
) -> None:
    """Export a checkpoint to ONNX (dynamic batch and length; config, labels and normalisation inside),
    and print how far its outputs are from torch's on a random batch."""
    from sslam_core.models.loading import read_checkpoint
    from sslam_core.models.onnx_export import EXPORT_MODULES, export_checkpoint
    from sslam_core.models.onnx_runtime import require

    require(*EXPORT_MODULES)
    if output.suffix.lower() != ".onnx":
        fail(f"{output}: expected an .onnx file")
    claim_or_fail(output, overwrite)
    try:
        ckpt = read_checkpoint(checkpoint, teacher=teacher)
        result = export_checkpoint(ckpt, layer=layer, target_length=target_length, int8=int8)
        result.write(output)
    except OSError as e:  # not an OutputError (those are SslamErrors): a bare OS error of the writer
        fail(str(e))
    diffs = ", ".join(f"{name} {value:.2e}" for name, value in result.max_diff.items())
    typer.echo(
        f"wrote {output} ({result.kind}, block {result.layer} of {ckpt.config.depth}, dim "
        f"{ckpt.config.embed_dim}, {result.precision}, default window {result.target_length} frames)"
    )
    typer.echo(f"max |onnx - torch| on a random batch: {diffs}")
    if result.cosine:
        typer.echo("cosine int8 vs fp32: " + ", ".join(f"{n} {v:.5f}" for n, v in result.cosine.items()))
