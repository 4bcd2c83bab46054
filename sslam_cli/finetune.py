"""`sslam finetune`: fine-tune or linear-probe a checkpoint on a labelled audio set.

The flags (those given, over a `--config` file) become `finetune_run.FinetuneSettings`; the library
resolves them and sets up and trains the run.
"""

from __future__ import annotations

import json
import warnings
from typing import Annotated

import typer

from sslam_cli.options import EXIT_OK, EXIT_SKIPPED, fail, finish, note, warn
from sslam_core.errors import SslamError


def finetune(
    ctx: typer.Context,
    *,
    data: Annotated[
        str, typer.Option("--data", help="Training set: folder with labels.csv, .csv/.tsv or manifest.")
    ] = None,
    checkpoint: Annotated[
        str,
        typer.Option(
            "--checkpoint", "-c", help="Pre-trained or fine-tuned checkpoint (file, folder, run dir, hub id)."
        ),
    ] = None,
    output: Annotated[
        str, typer.Option("--output", "-o", help="Run folder (model.safetensors, metrics, state).")
    ] = None,
    recipe: Annotated[
        str,
        typer.Option(
            "--recipe",
            help="An official protocol: as2m, as20k, esc50, spcv2, spass-linear or spass-finetune; the flags "
            "given win.",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the resolved settings as one JSON object; train nothing."),
    ] = False,
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
    probe: Annotated[
        str,
        typer.Option(
            "--probe",
            help="Linear protocol: cached (features computed once, no augmentation; fast) or augmented (the "
            "official linear evaluation: the frozen encoder on every augmented batch).",
        ),
    ] = "cached",
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
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 0.05,
    min_lr: Annotated[float, typer.Option("--min-lr", help="End of the cosine schedule.")] = 1e-6,
    mixup: Annotated[
        bool, typer.Option("--mixup/--no-mixup", help="[default: on for multi-label only]")
    ] = None,
    mixup_alpha: Annotated[
        float, typer.Option("--mixup-alpha", help="Beta(a, a) of the mixing weight.")
    ] = 0.8,
    mixup_prob: Annotated[float, typer.Option("--mixup-prob", help="Share of batches mixed.")] = 0.9,
    specaugment: Annotated[bool, typer.Option("--specaugment/--no-specaugment")] = True,
    specaugment_ratio: Annotated[
        float,
        typer.Option(
            "--specaugment-ratio", help="Largest frequency and time masks, as a share of bins and frames."
        ),
    ] = 0.2,
    noise: Annotated[
        bool, typer.Option("--noise/--no-noise", help="Speech Commands fbank noise and shift [off].")
    ] = False,
    roll: Annotated[bool, typer.Option("--roll/--no-roll", help="Waveform roll and gain.")] = True,
    label_smoothing: Annotated[
        float, typer.Option("--label-smoothing", help="Multi-class cross-entropy only.")
    ] = 0.1,
    loss: Annotated[
        str,
        typer.Option(
            "--loss", help="bce or ce [default: bce for multi-label, ce (cross-entropy) otherwise]."
        ),
    ] = None,
    weighted_sampling: Annotated[
        bool,
        typer.Option("--weighted-sampling/--no-weighted-sampling", help="[default: on for multi-label only]"),
    ] = None,
    weights: Annotated[
        str,
        typer.Option(
            "--weights", help="Sampling weights (`sslam weights` CSV, or one per line) [default: computed]."
        ),
    ] = None,
    clips_per_epoch: Annotated[
        int,
        typer.Option(
            "--clips-per-epoch",
            help="Weighted sampling: distinct clips drawn per epoch [default: as many draws as clips, with "
            "replacement].",
        ),
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
    cross_validate: Annotated[
        bool,
        typer.Option(
            "--cross-validate/--no-cross-validate",
            help="One run per fold (ESC-50's five) in OUTPUT/foldK; mean and spread in "
            "OUTPUT/cross_validation.json (the esc50 recipe's way).",
        ),
    ] = False,
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
        resolved_values,
        setup_finetuning,
    )

    flags = {  # the flags given (by name: typer's click is its own copy), over the --config file
        name: value
        for name, value in ctx.params.items()
        if name in SETTING_NAMES and ctx.get_parameter_source(name).name != "DEFAULT"
    }
    layers = (read_config_file(config) if config else {}, flags)
    if dry_run:
        settings = resolve_settings(*layers, check_sources=False)
        typer.echo(json.dumps(resolved_values(settings)))
        raise typer.Exit(EXIT_OK)
    settings = resolve_settings(*layers)
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", category=UnreadableAudioWarning
        )  # one skipped: line each, at the end
        if settings.cross_validate:
            _cross_validate(settings, resume, overwrite, quiet)
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


def _cross_validate(settings, resume: bool, overwrite: bool, quiet: bool) -> None:
    """One run per fold, then the folds' best values, mean and spread (JSON on stdout); exits."""
    from sslam_core.runs import distributed
    from sslam_core.training.finetune_run import CROSS_VALIDATION, run_cross_validation

    try:
        report = run_cross_validation(settings, resume=resume, overwrite=overwrite, progress=not quiet)
    except (SslamError, ValueError, OSError) as e:
        distributed.cleanup(sync=False)
        if isinstance(e, SslamError):
            raise
        fail(str(e))
    distributed.cleanup()
    if "interrupted" in report:
        note(f"interrupted at step {report['steps']}; rerun with --resume to continue")
        raise typer.Exit(report["exit_code"])
    if distributed.get_rank() != 0:
        raise typer.Exit(EXIT_OK)
    for path in sorted(report["skipped"]):
        warn(report["skipped"][path])
    if not quiet:
        values = ", ".join(
            f"fold {r['fold']} {r['best']:.4f}" if r["best"] is not None else f"fold {r['fold']} -"
            for r in report["folds"]
        )
        spread = f" ± {report['std']:.4f}" if report["std"] is not None else ""
        mean = f"{report['mean']:.4f}" if report["mean"] is not None else "-"
        where = f"{settings.output}/{CROSS_VALIDATION}"
        note(f"{report['metric'] or 'metric'}: {values}; mean {mean}{spread} ({where})")
    typer.echo(
        json.dumps({k: v for k, v in report.items() if k != "skipped"} | {"skipped": len(report["skipped"])})
    )
    raise typer.Exit(EXIT_SKIPPED if report["skipped"] else EXIT_OK)
