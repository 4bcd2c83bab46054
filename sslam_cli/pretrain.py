"""`sslam pretrain`: EAT stage 1 or SSLAM stage 2 pre-training, on one device or under torchrun (DDP)."""

from __future__ import annotations

import warnings
from typing import Annotated

import typer

from sslam_cli.options import EXIT_OK, EXIT_SKIPPED, fail, finish, warn

Opt = typer.Option


def pretrain(
    data: Annotated[
        list[str] | None,
        typer.Argument(
            help="Unlabelled audio: files, folders, path lists, fairseq .tsv, tar shards or `sslam pack` "
            "folders.",
            metavar="DATA",
        ),
    ] = None,
    out: Annotated[
        str, Opt("-o", "--out", help="Run folder (model.safetensors, state.pt, config.json).")
    ] = "",
    stage: Annotated[
        str | None, Opt("--stage", help="eat (stage 1) or sslam (stage 2: mixtures + SRL).")
    ] = None,
    model: Annotated[str | None, Opt("--model", help="Preset: base, large, small, tiny [base].")] = None,
    steps: Annotated[
        int | None, Opt("--steps", help="Updates [eat 400k, sslam 200k]; 0 = write the init.")
    ] = None,
    batch_size: Annotated[
        int | None, Opt("--batch-size", "-b", help="Clips per device per step [12].")
    ] = None,
    target_length: Annotated[int | None, Opt("--target-length", help="Frames per crop, x16 [1024].")] = None,
    init: Annotated[
        str | None, Opt("--init", help="Start from a checkpoint (fairseq, HF, ours, run dir).")
    ] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue the run in --out from its state.pt.")] = False,
    overwrite: Annotated[
        bool,
        Opt("--overwrite", help="Replace a run already in --out (its files are removed) [off: refuse]."),
    ] = False,
    stop_at: Annotated[
        int | None,
        Opt("--stop-at", help="Save and exit at this step (split a run over jobs; then --resume)."),
    ] = None,
    seed: Annotated[int | None, Opt("--seed")] = None,
    lr: Annotated[float | None, Opt("--lr", help="Peak learning rate [eat 5e-4, sslam 5e-5].")] = None,
    warmup: Annotated[
        int | None, Opt("--warmup", help="Warm-up updates [same fraction as the release].")
    ] = None,
    clone_batch: Annotated[int | None, Opt("--clone-batch", help="Masked copies per clip [16 / 8].")] = None,
    window: Annotated[int | None, Opt("--window", help="Clean window frames (sslam) [240 per 1024].")] = None,
    num_windows: Annotated[
        int | None, Opt("--num-windows", help="Clean windows per step (sslam) [2].")
    ] = None,
    ema_decay: Annotated[float | None, Opt("--ema-decay", help="Teacher decay at step 0 [0.9998].")] = None,
    ema_end_decay: Annotated[
        float | None, Opt("--ema-end-decay", help="Final teacher decay [0.99999].")
    ] = None,
    ema_anneal_end_step: Annotated[
        int | None, Opt("--ema-anneal-end-step", help="[25% / 50% of steps]")
    ] = None,
    mask_prob: Annotated[
        float | None, Opt("--mask-prob", help="Fraction of patches hidden from the student [0.8].")
    ] = None,
    mask_length: Annotated[int | None, Opt("--mask-length", help="Inverse block mask size [5].")] = None,
    average_top_k: Annotated[
        int | None, Opt("--average-top-k", help="Teacher blocks averaged into targets [12].")
    ] = None,
    cls_weight: Annotated[float | None, Opt("--cls-weight", help="Utterance (CLS) loss weight [1].")] = None,
    srl_weight: Annotated[
        float | None, Opt("--srl-weight", help="Source Retention loss weight (sslam) [2].")
    ] = None,
    mix: Annotated[
        str | None,
        Opt("--mix", help="Stage-2 mixtures: partial (release) or none (clean batch only) [partial]."),
    ] = None,
    mix_partner: Annotated[
        str | None,
        Opt("--mix-partner", help="Mixing partner: roll (clip i-1, release) or random (derangement) [roll]."),
    ] = None,
    utterance_target: Annotated[
        str | None,
        Opt(
            "--utterance-target",
            help="CLS target: average (top-K blocks) or last (block) [eat average, sslam last].",
        ),
    ] = None,
    grad_accum: Annotated[int | None, Opt("--grad-accum", help="Micro-batches per update [1].")] = None,
    precision: Annotated[str | None, Opt("--precision", help="auto, fp32, bf16, fp16 [auto].")] = None,
    device: Annotated[str | None, Opt("--device", help="auto, cpu, cuda [auto].")] = None,
    workers: Annotated[int | None, Opt("--workers", "-w", help="Data loader processes per rank [2].")] = None,
    norm: Annotated[str | None, Opt("--norm", help="audioset, esc50, spc2, spass or MEAN,STD.")] = None,
    save_every: Annotated[int | None, Opt("--save-every", help="Checkpoint every N updates [1000].")] = None,
    log_every: Annotated[int | None, Opt("--log-every", help="Log every N updates [10].")] = None,
    keep_last: Annotated[int | None, Opt("--keep-last", help="Numbered exports to keep [0].")] = None,
    tensorboard: Annotated[
        bool | None, Opt("--tensorboard/--no-tensorboard", help="Also log events.")
    ] = None,
    config: Annotated[
        str | None,
        Opt("--config", help="JSON file of settings (flag names as keys), or a run's config.json."),
    ] = None,
    quiet: Annotated[
        bool, Opt("--quiet", "-q", help="No progress bar or summary on stderr (errors still) [off].")
    ] = False,
) -> None:
    """Pre-train an EAT/SSLAM encoder; under `torchrun --nproc_per_node N` every rank runs this command.
    SIGTERM, SIGINT or SIGUSR1 save at the next step and exit (143, 130, 143); --resume continues."""
    from sslam_core.audio.files import AudioError
    from sslam_core.data.label_formats import DatasetError
    from sslam_core.data.packing import PackedDataError
    from sslam_core.data.training_clips import UnreadableAudioWarning
    from sslam_core.models.checkpoint import CheckpointError
    from sslam_core.runs import distributed
    from sslam_core.training.pretraining import (
        PretrainConfigError,
        merge_settings,
        read_config_file,
        resolve_settings,
        run_pretraining,
        saved_settings,
    )
    from sslam_core.training.trainer import check_run_folder

    if not out:
        fail("-o/--out RUN_DIR is required")
    check_run_folder(out, resume, overwrite)
    warnings.filterwarnings("ignore", category=UnreadableAudioWarning)  # one skipped: line each, at the end
    parsed_norm = None
    if norm is not None and "," in norm:
        try:
            parsed_norm = [float(v) for v in norm.split(",")]
        except ValueError:
            fail(f"--norm {norm!r}: expected a preset name or MEAN,STD")
    flags = dict(
        data=data or None, out_dir=out, stage=stage, model=model, init=init, steps=steps,
        batch_size=batch_size, target_length=target_length, seed=seed, lr=lr, warmup=warmup,
        clone_batch=clone_batch, window=window, num_windows=num_windows, ema_decay=ema_decay,
        ema_end_decay=ema_end_decay, ema_anneal_end_step=ema_anneal_end_step, mask_prob=mask_prob,
        mask_length=mask_length, average_top_k=average_top_k, cls_weight=cls_weight, srl_weight=srl_weight,
        mix=mix, mix_partner=mix_partner, utterance_target=utterance_target, grad_accum=grad_accum,
        precision=precision, device=device, workers=workers, norm=parsed_norm or norm,
        save_every=save_every, log_every=log_every, keep_last=keep_last, tensorboard=tensorboard,
    )  # fmt: skip
    try:
        previous = saved_settings(out) if resume else {}
        from_file = read_config_file(config) if config else {}
        given = merge_settings(previous, from_file, flags)
        settings = resolve_settings(given)
        summary = run_pretraining(
            settings, resume=resume, progress=not quiet, stop_at=stop_at, overwrite=overwrite, given=given
        )
        rank = distributed.get_rank()
    except (
        PretrainConfigError, CheckpointError, DatasetError, PackedDataError, AudioError, ValueError, OSError,
    ) as e:  # fmt: skip
        distributed.cleanup(sync=False)
        fail(str(e))
    distributed.cleanup()
    if rank != 0:
        if "interrupted" in summary:
            raise typer.Exit(summary["exit_code"])
        return
    for path, reason in sorted(summary["skipped"].items()):
        warn(f"{path}: {reason}")
    last = summary["last"]
    report = {
        "stage": settings.stage,
        "steps": summary["steps"],
        "steps_this_run": summary["steps_this_run"],
        "seconds": summary["seconds"],
        "clips": summary["clips"] - len(summary["skipped"]),  # the clips read (unreadable ones left out)
        "unreadable_skipped": len(summary["skipped"]),
        "clips_per_s": round(last.get("clips_per_s", 0.0), 2),
        "loss": last.get("loss"),
        "ranks_in_sync": len(set(summary["rank_checksums"])) == 1,
        "rank_checksums": summary["rank_checksums"],
        "model": summary["model"],
    }
    finish(summary, report)
    raise typer.Exit(EXIT_SKIPPED if summary["skipped"] and not distributed.launched() else EXIT_OK)
