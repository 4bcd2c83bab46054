"""`sslam extract`: embeddings of audio files to one HDF5 file (layout in docs/guides/outputs.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from tqdm import tqdm

from sslam_cli.options import (
    EXIT_OK,
    BatchSize,
    Calibration,
    Device,
    Hop,
    Norm,
    Precision,
    Workers,
    check_precision,
    claim_resumable,
    err_console,
    exit_status,
    fail,
    frames_or_fail,
    interrupted,
    join_ranks,
    load_model_or_fail,
    note,
    parse_norm,
    pick_device,
    report_inputs,
    settle_auto,
    warn,
)
from sslam_core.audio.constants import SAMPLE_RATE, frames_to_seconds


def extract(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="Audio files, folders (searched recursively), file lists, or tar shards (a .tar, a brace "
            "pattern or a list of shards).",
            metavar="PATHS",
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="HDF5 file to write.")],
    checkpoint: Annotated[
        str,
        typer.Option(
            "--checkpoint",
            "-c",
            help="Checkpoint: .pt, folder, .safetensors, run dir or hub id. [default: ta012/SSLAM_pretrain]",
        ),
    ] = None,
    teacher: Annotated[
        bool, typer.Option("--teacher", help="Use the EMA teacher weights of a pre-training checkpoint.")
    ] = False,
    granularity: Annotated[
        str, typer.Option("--granularity", "-g", help="clip, frame, patch or all.")
    ] = "clip",
    layer: Annotated[
        int,
        typer.Option(
            "--layer", "-l", help="Block whose output to take, from 1; negative from the end [default: last]."
        ),
    ] = None,
    target_length: Annotated[
        int,
        typer.Option(
            "--target-length",
            help="Window in frames, a multiple of 16 [default: the model's training length, else 1024].",
        ),
    ] = None,
    hop: Hop = None,
    norm: Norm = None,
    batch_size: BatchSize = None,
    workers: Workers = None,
    device: Device = "auto",
    precision: Precision = "fp32",
    calibration: Calibration = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Finish an interrupted run without redoing finished files.")
    ] = False,
    flush_every: Annotated[
        int,
        typer.Option(
            "--flush-every",
            min=1,
            help="Files per journal part: at most this much work is redone after a crash.",
        ),
    ] = 256,
    audio_dir: Annotated[
        str,
        typer.Option(
            "--audio-dir", help="Root folder of the files in a .tsv manifest (overrides its first line)."
        ),
    ] = None,
    frame_hop: Annotated[
        float,
        typer.Option(
            "--frame-hop",
            help="Seconds between frame vectors: 0.16, 0.08, 0.04, 0.02 or 0.01, each halving costs one more "
            "pass of the model [default: 0.16].",
        ),
    ] = None,
    compression: Annotated[
        str,
        typer.Option("--compression", help="HDF5 dataset compression: none, gzip (smaller) or lzf (faster)."),
    ] = "none",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
) -> None:
    """Extract clip, per-time-step or patch embeddings of any layer to HDF5.

    Under `torchrun` each process takes a share of the files balanced by duration and rank 0 merges
    them into the same file one process would write (see docs/guides/large-corpora.md)."""
    import sslam_core
    from sslam_core.data.inputs import collect_inputs
    from sslam_core.inference.embeddings import FeatureOptions, extract_to_h5, frame_shifts, granularities
    from sslam_core.inference.options import PipelineOptions
    from sslam_core.models.hub import DEFAULT_ENCODER
    from sslam_core.runs import distributed
    from sslam_core.runs.feature_store import COMPRESSIONS
    from sslam_core.runs.interrupts import StopRequest
    from sslam_core.runs.outputs import OutputError

    keep = granularities(granularity)
    frame_shifts(frame_hop)
    if frame_hop is not None and "frame" not in keep:
        fail("--frame-hop sets the step of frame vectors: use it with --granularity frame or all")
    if output.suffix.lower() not in (".h5", ".hdf5"):
        fail(f"{output}: expected an .h5 or .hdf5 file")
    if compression not in COMPRESSIONS:
        fail(f"--compression {compression}: choose {', '.join(COMPRESSIONS)}")
    if norm is not None:
        parse_norm(norm)
    claim_resumable(output, overwrite, resume)
    dev = join_ranks(pick_device(device))
    requested, precision = precision, check_precision(precision, dev, int8=True)
    ckpt = checkpoint or DEFAULT_ENCODER
    model = load_model_or_fail(ckpt, dev, teacher=teacher, precision=precision)
    int8_ok = layer in (None, -1, model.cfg.depth)  # the int8 graph gives the last block only
    precision, model = settle_auto(model, requested, precision, dev, calibration, ckpt, int8_ok, teacher)
    encoder = getattr(model, "encoder", model)
    encoder.resolve_layer(layer)
    target_length, hop_frames = frames_or_fail(model, None, hop, target_length)
    inputs = collect_inputs(paths, audio_dir)
    report_inputs(inputs, paths)
    normalization = parse_norm(norm, model.normalization)
    info = model.checkpoint_info
    settings = {
        "checkpoint": str(info.get("source", ckpt)) if isinstance(info, dict) else str(ckpt),
        "checkpoint_sha256": info.get("sha256", "") if isinstance(info, dict) else "",
        "teacher": teacher,
        "model_config": json.dumps(model.cfg.to_dict(), sort_keys=True),
        "sample_rate": SAMPLE_RATE,
        "target_length": target_length,
        "window": frames_to_seconds(target_length),
        "hop": frames_to_seconds(hop_frames),
        "layer": layer if layer is not None else -1,
        "granularity": granularity,
        "frame_hop": frame_hop or 0.16,
        "normalization": json.dumps(normalization),
        "version": sslam_core.__version__,
    }
    bar = tqdm(disable=True)  # replaced once the run knows this process's share

    def on_start(todo: int, done: int) -> None:
        nonlocal bar
        resumed = 0 if distributed.launched() else done  # under torchrun the bar counts rank 0's share
        bar = tqdm(
            total=todo + resumed,
            initial=resumed,
            unit="file",
            desc="rank 0" if distributed.launched() else None,
            file=err_console.file,
            disable=not distributed.is_main(),
            delay=0.5,
        )

    def on_file(rec) -> None:
        bar.update()
        if rec.error:
            bar.clear()
            warn(rec.error)

    try:
        with StopRequest() as stop:
            summary = extract_to_h5(
                model,
                inputs.paths,
                inputs.names,
                output,
                PipelineOptions(
                    target_length=target_length,
                    hop=hop_frames,
                    batch_size=batch_size,
                    workers=workers,
                    device=dev,
                    precision=precision,
                    normalization=normalization,
                ),
                FeatureOptions(granularity=granularity, layer=layer, frame_hop=frame_hop),
                settings=settings,
                resume=resume,
                compression=compression,
                flush_files=flush_every,
                stop=lambda: stop.requested,
                on_file=on_file,
                on_start=on_start,
            )
    except OutputError as e:
        fail(f"{e}; the finished files are kept in the journal, rerun with --resume once it is fixed")
    finally:
        bar.close()
    distributed.cleanup(sync=False)  # every rank has passed the last collective step
    if summary.interrupted:
        interrupted(stop, summary.resumed + summary.written)
    if summary.complete:
        note(f"{output} is already complete ({summary.resumed} file(s), these settings); nothing to resume")
        raise typer.Exit(EXIT_OK)
    note(
        f"wrote {summary.written} file(s) to {output}"
        + (f" ({summary.resumed} from the interrupted run)" if summary.resumed else "")
        + (f", skipped {len(summary.skipped)} (listed in 'errors')" if summary.skipped else "")
    )
    raise typer.Exit(exit_status(summary.written, len(summary.skipped)))
