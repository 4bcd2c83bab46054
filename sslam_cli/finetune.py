"""`sslam finetune`: fine-tune or linear-probe a checkpoint on a labelled audio set."""

from __future__ import annotations

import os

import typer

from sslam_cli.common import check_precision, fail, note, parse_folds, parse_norm, pick_device
from sslam_cli.pretrain import finish


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
    data: str = typer.Option(
        ..., "--data", help="Training set: folder with labels.csv, .csv/.tsv or manifest."
    ),
    checkpoint: str = typer.Option(
        None,
        "--checkpoint",
        "-c",
        help="Pre-trained or fine-tuned checkpoint (file, folder, run dir, hub id).",
    ),
    out_dir: str = typer.Option(
        ..., "--output", "-o", help="Run folder (model.safetensors, metrics, state)."
    ),
    valid: str = typer.Option(None, "--valid", help="Validation set, same formats as --data."),
    valid_fraction: float = typer.Option(
        None, "--valid-fraction", help="Hold out this fraction of --data (seeded) for validation."
    ),
    model: str = typer.Option(
        None, "--model", help="Without --checkpoint: random init of this preset (baselines)."
    ),
    linear: bool = typer.Option(
        False, "--linear", help="Frozen encoder; train fc_norm + head on the pooled features."
    ),
    pool: str = typer.Option(
        None, "--pool", help="Head input: cls (the CLS token) or mean (of the patch tokens) [default: cls]."
    ),
    steps: int = typer.Option(None, "--steps", help="Optimiser updates."),
    epochs: float = typer.Option(None, "--epochs", help="Passes [30; linear 50, >= 20k updates]."),
    batch_size: int = typer.Option(48, "--batch-size", "-b", help="Clips per update and process."),
    target_length: int = typer.Option(1024, "--target-length", help="Frames per crop (100 per second)."),
    seed: int = typer.Option(0, "--seed"),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate [default: 5e-5, linear 1e-3]."),
    warmup: int = typer.Option(None, "--warmup", help="Warm-up updates [default: 10 % of the steps]."),
    layer_decay: float = typer.Option(0.65, "--layer-decay", help="Layer-wise lr decay (full fine-tuning)."),
    drop_path: float = typer.Option(0.1, "--drop-path"),
    mixup: bool = typer.Option(None, "--mixup/--no-mixup", help="[default: on for multi-label only]"),
    specaugment: bool = typer.Option(True, "--specaugment/--no-specaugment"),
    roll: bool = typer.Option(True, "--roll/--no-roll"),
    label_smoothing: float = typer.Option(0.1, "--label-smoothing", help="Multi-class only."),
    weighted_sampling: bool = typer.Option(
        None, "--weighted-sampling/--no-weighted-sampling", help="[default: on for multi-label only]"
    ),
    multilabel: bool = typer.Option(
        None,
        "--multilabel/--multiclass",
        help="[default: multi-label when any clip has other than one label]",
    ),
    norm: str = typer.Option(
        None, help="audioset, esc50, spc2, spass or MEAN,STD [default: the checkpoint's]."
    ),
    audio_dir: str = typer.Option(
        None, "--audio-dir", help="Audio folder for formats that keep it elsewhere."
    ),
    folds: str = typer.Option(None, "--folds", help="Training folds (ESC-50), e.g. 1,2,3,4."),
    valid_folds: str = typer.Option(None, "--valid-folds", help="Validation folds (ESC-50), e.g. 5."),
    precision: str = typer.Option("bf16", help="fp32, bf16 or fp16 (mixed precision on GPU only)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1 or auto (torchrun sets the rank's GPU)."),
    workers: int = typer.Option(2, "--workers", "-w", help="Audio decoding workers."),
    save_every: int = typer.Option(None, "--save-every", help="Save and validate every N updates."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --output (same split of --valid-fraction)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a run already in --output (its files are removed) [off: refuse]."
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No progress bar or summary on stderr (errors still) [off]."
    ),
) -> None:
    """Fine-tune (or linear-probe) a classifier; the run folder loads in `sslam tag` and `sslam extract`.
    SIGTERM, SIGINT or SIGUSR1 save at the next step and exit (143, 130, 143); --resume continues."""
    from sslam_core.data.label_formats import DatasetError
    from sslam_core.models.checkpoint import CheckpointError
    from sslam_core.models.loading import read_checkpoint
    from sslam_core.models.transformer import preset
    from sslam_core.runs import distributed
    from sslam_core.training.finetuning import (
        FinetuneConfig,
        FinetuneError,
        FinetuneTask,
        default_steps,
        read_split,
        recipe,
    )
    from sslam_core.training.finetuning import finetune as run
    from sslam_core.training.trainer import RunFolderError, check_run_folder, fit_batch_size

    if steps is not None and epochs is not None:
        fail("give --steps or --epochs, not both")
    if (checkpoint is None) == (model is None):
        fail("give --checkpoint, or --model PRESET for a randomly initialised baseline")
    if valid is not None and valid_fraction:
        fail("give --valid or --valid-fraction, not both")
    try:
        check_run_folder(out_dir, resume, overwrite)
    except RunFolderError as e:
        fail(str(e))
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
    except (CheckpointError, DatasetError, FinetuneError, ValueError) as e:
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
    except (DatasetError, ValueError, OSError) as e:
        distributed.cleanup(sync=False)
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
