"""`sslam finetune`: fine-tune or linear-probe a checkpoint on a labelled audio set.

The flags (those given, over a `--config` file) become `finetune_run.FinetuneSettings`; the library
resolves them and sets up and trains the run.
"""

from __future__ import annotations

import warnings
from typing import Annotated

import typer

from sslam_cli.options import EXIT_OK, EXIT_SKIPPED, fail, finish, warn
from sslam_core.errors import SslamError


def finetune(
    ctx: typer.Context,
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
    output: Annotated[
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
    classes: Annotated[
        str,
        typer.Option(
            "--classes",
            help="Class list (index,mid,display_name CSV, or one name per line): the head's classes, "
            "which integer labels index [default: the labels found].",
        ),
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
    config: Annotated[
        str,
        typer.Option(
            "--config", help="JSON file of settings (flag names as keys), or a run's config.json; flags win."
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar or summary on stderr (errors still) [off].")
    ] = False,
) -> None:
    """Fine-tune (or linear-probe) a classifier; the run folder loads in `sslam tag` and `sslam extract`.
    SIGTERM, SIGINT or SIGUSR1 save at the next step and exit (143, 130, 143); --resume continues."""
    from sslam_core.data.training_clips import UnreadableAudioWarning
    from sslam_core.runs import distributed
    from sslam_core.training.finetune_run import (
        SETTING_NAMES,
        read_config_file,
        resolve_settings,
        setup_finetuning,
    )

    flags = {  # the flags given (by name: typer's click is its own copy), over the --config file
        name: value
        for name, value in ctx.params.items()
        if name in SETTING_NAMES and ctx.get_parameter_source(name).name != "DEFAULT"
    }
    warnings.filterwarnings("ignore", category=UnreadableAudioWarning)  # one skipped: line each, at the end
    settings = resolve_settings(read_config_file(config) if config else {}, flags)
    run = setup_finetuning(settings, resume=resume, overwrite=overwrite, progress=not quiet)
    try:
        summary = run.train()
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
    task = run.task
    skipped = summary["skipped"]
    for path in sorted(skipped):
        warn(skipped[path])

    def used(data) -> int:  # the clips of a set that were read (the unreadable ones are left out)
        return sum(e.path not in skipped for e in data.examples) if data is not None else 0

    report = {
        "task": task.kind,
        "steps": summary["steps"],
        "steps_this_run": summary["steps_this_run"],
        "seconds": summary["seconds"],
        "clips": used(task.train_set),
        "valid_clips": used(task.valid_set),
        "skipped": len(skipped),
        "classes": len(task.classes),
        "multilabel": task.multilabel,
        "loss": summary["last"].get("loss"),
        "best": summary["best"],
        "model": summary["model"],
    }
    finish(summary, report)
    raise typer.Exit(EXIT_SKIPPED if skipped and not distributed.launched() else EXIT_OK)
