"""`sslam finetune`: fine-tune or linear-probe a checkpoint on a labelled audio set."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from sslam_cli.options import check_precision, fail, finish, note, parse_folds, parse_norm, pick_device
from sslam_core.errors import SslamError


def _read_sets(data, valid, valid_fraction, audio_dir, folds, valid_folds, multilabel, seed, saved_split):
    """Training and validation LabelledSets from the options (validation uses the training classes), and
    the split record of --valid-fraction (`saved_split` on resume, else a new seeded split)."""
    from dataclasses import replace

    from sslam_core.data.datasets import read_labelled, split_examples
    from sslam_core.training.finetuning import apply_split, split_record

    train_set = read_labelled(data, audio_dir, folds=folds or None, multilabel=multilabel)
    for name in train_set.missing[:1]:
        note(f"note: {len(train_set.missing)} listed clip(s) have no audio (e.g. {name})")
    if valid is not None or valid_folds:
        valid_set = read_labelled(
            valid or data,
            audio_dir,
            classes=train_set,
            folds=valid_folds or None,
            multilabel=train_set.multilabel,
        )
    elif saved_split is not None:  # resume: the split the run was started on
        train_set, valid_set = apply_split(train_set, saved_split)
        return train_set, valid_set, saved_split
    elif valid_fraction:
        kept, held = split_examples(train_set.examples, valid_fraction, seed)
        train_set, valid_set = replace(train_set, examples=kept), replace(train_set, examples=held)
        return train_set, valid_set, split_record(train_set, valid_set, valid_fraction, seed)
    else:
        valid_set = None
    return train_set, valid_set, None


def finetune(
    *,
    data: Annotated[
        str, typer.Option("--data", help="Training set: folder with labels.csv, .csv/.tsv or manifest.")
    ],
    checkpoint: Annotated[
        str,
        typer.Option(
            "--checkpoint", "-c", help="Pre-trained or fine-tuned checkpoint (file, folder, run dir, hub id)."
        ),
    ] = None,
    out_dir: Annotated[
        str, typer.Option("--output", "-o", help="Run folder (model.safetensors, metrics, state).")
    ],
    valid: Annotated[str, typer.Option("--valid", help="Validation set, same formats as --data.")] = None,
    valid_fraction: Annotated[
        float,
        typer.Option("--valid-fraction", help="Hold out this fraction of --data (seeded) for validation."),
    ] = None,
    model: Annotated[
        str, typer.Option("--model", help="Without --checkpoint: random init of this preset (baselines).")
    ] = None,
    linear: Annotated[
        bool, typer.Option("--linear", help="Frozen encoder; train fc_norm + head on the pooled features.")
    ] = False,
    pool: Annotated[
        str,
        typer.Option(
            "--pool", help="Head input: cls (the CLS token) or mean (of the patch tokens) [default: cls]."
        ),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimiser updates.")] = None,
    epochs: Annotated[float, typer.Option("--epochs", help="Passes [30; linear 50, >= 20k updates].")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Clips per update and process.")] = 48,
    target_length: Annotated[
        int, typer.Option("--target-length", help="Frames per crop (100 per second).")
    ] = 1024,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    lr: Annotated[
        float, typer.Option("--lr", help="Peak learning rate [default: 5e-5, linear 1e-3].")
    ] = None,
    warmup: Annotated[
        int, typer.Option("--warmup", help="Warm-up updates [default: 10 % of the steps].")
    ] = None,
    layer_decay: Annotated[
        float, typer.Option("--layer-decay", help="Layer-wise lr decay (full fine-tuning).")
    ] = 0.65,
    drop_path: Annotated[float, typer.Option("--drop-path")] = 0.1,
    mixup: Annotated[
        bool, typer.Option("--mixup/--no-mixup", help="[default: on for multi-label only]")
    ] = None,
    specaugment: Annotated[bool, typer.Option("--specaugment/--no-specaugment")] = True,
    roll: Annotated[bool, typer.Option("--roll/--no-roll")] = True,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Multi-class only.")] = 0.1,
    weighted_sampling: Annotated[
        bool,
        typer.Option("--weighted-sampling/--no-weighted-sampling", help="[default: on for multi-label only]"),
    ] = None,
    multilabel: Annotated[
        bool,
        typer.Option(
            "--multilabel/--multiclass", help="[default: multi-label when any clip has other than one label]"
        ),
    ] = None,
    norm: Annotated[
        str, typer.Option(help="audioset, esc50, spc2, spass or MEAN,STD [default: the checkpoint's].")
    ] = None,
    audio_dir: Annotated[
        str, typer.Option("--audio-dir", help="Audio folder for formats that keep it elsewhere.")
    ] = None,
    folds: Annotated[str, typer.Option("--folds", help="Training folds (ESC-50), e.g. 1,2,3,4.")] = None,
    valid_folds: Annotated[
        str, typer.Option("--valid-folds", help="Validation folds (ESC-50), e.g. 5.")
    ] = None,
    precision: Annotated[
        str, typer.Option(help="fp32, bf16 or fp16 (mixed precision on GPU only).")
    ] = "bf16",
    device: Annotated[
        str, typer.Option(help="cpu, cuda, cuda:1 or auto (torchrun sets the rank's GPU).")
    ] = "auto",
    workers: Annotated[int, typer.Option("--workers", "-w", help="Audio decoding workers.")] = 2,
    save_every: Annotated[
        int, typer.Option("--save-every", help="Save and validate every N updates.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --output (same split of --valid-fraction).")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace a run already in --output (its files are removed) [off: refuse]."
        ),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar or summary on stderr (errors still) [off].")
    ] = False,
) -> None:
    """Fine-tune (or linear-probe) a classifier; the run folder loads in `sslam tag` and `sslam extract`.
    SIGTERM, SIGINT or SIGUSR1 save at the next step and exit (143, 130, 143); --resume continues."""
    from sslam_core.models.loading import read_checkpoint
    from sslam_core.models.transformer import preset
    from sslam_core.runs import distributed
    from sslam_core.training.finetuning import (
        FinetuneConfig,
        FinetuneTask,
        default_steps,
        read_split,
        recipe,
    )
    from sslam_core.training.finetuning import finetune as run
    from sslam_core.training.trainer import check_run_folder, fit_batch_size

    if steps is not None and epochs is not None:
        fail("give --steps or --epochs, not both")
    if (checkpoint is None) == (model is None):
        fail("give --checkpoint, or --model PRESET for a randomly initialised baseline")
    if valid is not None and valid_fraction:
        fail("give --valid or --valid-fraction, not both")
    check_run_folder(out_dir, resume, overwrite)
    dev = pick_device(device)
    train_precision = check_precision(precision, dev) if dev.type == "cuda" else "fp32"
    try:
        ckpt = read_checkpoint(checkpoint) if checkpoint else None
        model_config = None if ckpt else preset(model)
        train_set, valid_set, split = _read_sets(
            data,
            valid,
            valid_fraction,
            audio_dir,
            parse_folds(folds),
            parse_folds(valid_folds, "--valid-folds"),
            multilabel,
            seed,
            read_split(out_dir) if resume else None,
        )
        world, main = int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("RANK", "0") == "0"
        fitted = fit_batch_size(batch_size, len(train_set), world)
        if fitted < batch_size and main:
            note(f"note: --batch-size {batch_size} is more than {len(train_set)} clips allow; using {fitted}")
        batch_size = fitted
        config = FinetuneConfig(
            target_length=target_length,
            batch_size=batch_size,
            linear=linear,
            pool=pool,
            drop_path=drop_path,
            mixup=mixup,
            specaugment=specaugment,
            roll=roll,
            label_smoothing=label_smoothing,
            weighted_sampling=weighted_sampling,
            norm=parse_norm(norm, ckpt.normalization if ckpt else None),
            workers=workers,
            precision=train_precision,
        )
        total = steps or default_steps(linear, len(train_set), batch_size, world, epochs)
        task = FinetuneTask(train_set, valid_set, ckpt, config, seed=seed, model_config=model_config)
        train_config = recipe(
            linear,
            total,
            task.multilabel,
            out_dir,
            lr=lr,
            warmup=warmup,
            layer_decay=None if linear else layer_decay,
            save_every=save_every,
            seed=seed,
            precision=train_precision,
            device=str(dev) if device != "auto" else "auto",
            progress=not quiet,
        )
    except ValueError as e:  # not an SslamError: a setting torch or the data refused
        fail(str(e))
    kind = "multi-label" if task.multilabel else "multi-class"
    if main and not quiet:
        note(
            f"{'linear probe' if linear else 'fine-tuning'}: {len(train_set)} clips, {len(task.classes)} "
            f"classes ({kind}), {len(valid_set) if valid_set else 0} validation clips, {total} steps; "
            f"init: {task.init}"
        )
    sources = dict(
        data=data, valid=valid, audio_dir=audio_dir, folds=folds, valid_folds=valid_folds,
        valid_fraction=valid_fraction, checkpoint=checkpoint, model=model,
    )  # fmt: skip
    try:
        summary = run(task, train_config, resume=resume, overwrite=overwrite, data=sources, split=split)
        rank = distributed.get_rank()
    except (SslamError, ValueError, OSError) as e:  # every rank leaves the group before the error line
        distributed.cleanup(sync=False)
        if isinstance(e, SslamError):
            raise
        fail(str(e))
    distributed.cleanup()
    if rank != 0:
        if "interrupted" in summary:
            raise typer.Exit(summary["exit_code"])
        return
    report = {
        "task": "linear" if linear else "finetune",
        "steps": summary["steps"],
        "steps_this_run": summary["steps_this_run"],
        "seconds": summary["seconds"],
        "clips": len(train_set),
        "valid_clips": len(valid_set) if valid_set else 0,
        "classes": len(task.classes),
        "multilabel": task.multilabel,
        "loss": summary["last"].get("loss"),
        "best": summary["best"],
        "model": summary["model"],
    }
    finish(summary, report)
