"""Pre-training runs: settings with the spec §4 defaults per stage, the task the trainer optimises, the run.

`resolve_settings` layers the stage defaults, a saved run's settings (on resume), a JSON config file and
explicit overrides, then fills what is still open: the release values when `steps` is the release
length, otherwise warm-up and EMA anneal as the same fraction of the run, and clean windows scaled to
the target length. `PretrainTask` ties `PretrainingModel` (objective), `AudioBatches` (data, fbank on
the device) and the trainer's task contract; `run_pretraining` does one whole command.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from sslam_core.errors import SslamError
from sslam_core.models.transformer import ModelConfig, preset
from sslam_core.runs import distributed
from sslam_core.training.objective import (
    MIX_MODES,
    MIX_PARTNERS,
    STAGES,
    UTTERANCE_TARGETS,
    ObjectiveConfig,
    PretrainingModel,
)
from sslam_core.training.task import TrainingTask

STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "eat": dict(lr=5e-4, warmup=53_000, steps=400_000, clone_batch=16),
    "sslam": dict(lr=5e-5, warmup=25_000, steps=200_000, clone_batch=8),
}
EMA_ANNEAL_STEPS = 100_000  # spec §4: decay 0.9998 -> 0.99999 over the first 100k updates
RELEASE_FRAMES, RELEASE_WINDOW = 1024, 240
PATCH = 16


class PretrainConfigError(SslamError, ValueError):
    """Pre-training settings that cannot run; the message names the setting (and file) and why."""


@dataclass
class PretrainSettings:
    """Everything a `sslam pretrain` run needs; None = the stage default (see `resolve_settings`)."""

    data: list[str] = field(default_factory=list)
    out_dir: str = "runs/pretrain"
    stage: str = "eat"
    model: str | None = None  # preset; None = `base`, or the --init checkpoint's architecture
    init: str | None = None
    steps: int | None = None
    batch_size: int = 12
    target_length: int = RELEASE_FRAMES
    seed: int = 0
    lr: float | None = None
    min_lr: float = 0.0
    warmup: int | None = None
    weight_decay: float = 0.05
    clip_grad: float = 4.0
    clone_batch: int | None = None
    window: int | None = None
    num_windows: int = 2
    ema_decay: float = 0.9998
    ema_end_decay: float = 0.99999
    ema_anneal_end_step: int | None = None
    mask_prob: float = 0.8
    mask_length: int = 5
    average_top_k: int = 12
    cls_weight: float = 1.0
    srl_weight: float = 2.0
    mix: str = "partial"  # stage-2 ablation: "none" = the clean batch only
    mix_partner: str = "roll"  # stage-2 ablation: "random" = a random derangement of the batch
    utterance_target: str | None = None  # None = the stage's: eat "average", sslam "last"
    grad_accum: int = 1
    precision: str = "auto"  # bf16 on CUDA, fp32 on CPU
    device: str = "auto"
    workers: int = 2
    norm: str | list[float] = "audioset"
    recursive: bool = True
    save_every: int = 1000
    log_every: int = 10
    keep_last: int = 0
    tensorboard: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


SETTING_NAMES = tuple(f.name for f in fields(PretrainSettings))


def read_config_file(path: str | os.PathLike) -> dict:
    """A JSON object of settings (keys as the flags, `-` or `_`), checked against the known names; or a
    run's config.json, whose settings are taken as that run was given them (values derived from the
    run length, such as the warm-up, are derived again for this run's)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PretrainConfigError(f"{path}: cannot read the config file ({err})") from None
    if not isinstance(raw, dict):
        raise PretrainConfigError(f"{path}: the config file must hold one JSON object")
    if isinstance(raw.get("pretrain"), dict):
        return _run_settings(raw["pretrain"])
    if "world_size" in raw and "finetune" in raw:
        raise PretrainConfigError(f"{path}: a fine-tuning run's config.json, not a pre-training one")
    values = {k.replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - set(SETTING_NAMES))
    if unknown:
        raise PretrainConfigError(f"{path}: unknown settings {', '.join(unknown)}")
    return values


def _run_settings(saved: dict) -> dict:
    """The settings of a run's config.json "pretrain" entry: as given (newer runs) or as resolved."""
    values = saved.get("given", saved.get("settings", {}))
    return {k: v for k, v in dict(values).items() if k in SETTING_NAMES}


def saved_settings(out_dir: str | os.PathLike) -> dict:
    """The settings a previous run stored in out_dir/config.json, as it was given them (empty when there
    are none), so that on resume the values derived from --steps follow a changed --steps."""
    path = Path(out_dir) / "config.json"
    if not path.is_file():
        return {}
    try:
        return _run_settings(json.loads(path.read_text()).get("pretrain", {}))
    except (json.JSONDecodeError, AttributeError, TypeError):
        return {}


def scaled_window(target_length: int) -> int:
    """The release window (240 of 1024 frames) scaled to `target_length`, in whole patch rows (>= 1)."""
    return max(PATCH, PATCH * round(target_length * RELEASE_WINDOW / RELEASE_FRAMES / PATCH))


def merge_settings(*layers: dict) -> dict:
    """Setting dicts merged (later wins; None values ignored): what a run was given."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in SETTING_NAMES:
                raise PretrainConfigError(f"unknown setting {key!r}")
            if value is not None:
                merged[key] = value
    return merged


def resolve_settings(*layers: dict) -> PretrainSettings:
    """Merge setting dicts (see `merge_settings`) and fill the stage-dependent defaults."""
    s = PretrainSettings(**merge_settings(*layers))
    if s.stage not in STAGES:
        raise PretrainConfigError(f"--stage {s.stage!r}: choose from {', '.join(STAGES)}")
    d = STAGE_DEFAULTS[s.stage]
    if s.steps is None:
        s.steps = d["steps"]
    if s.steps < 0:
        raise PretrainConfigError(f"--steps must be >= 0, got {s.steps}")
    fraction = s.steps / d["steps"]
    s.lr = d["lr"] if s.lr is None else s.lr
    s.clone_batch = d["clone_batch"] if s.clone_batch is None else s.clone_batch
    if s.warmup is None:
        s.warmup = round(d["warmup"] * fraction)
    if s.ema_anneal_end_step is None:
        s.ema_anneal_end_step = max(1, round(EMA_ANNEAL_STEPS * fraction))
    if s.window is None:
        s.window = RELEASE_WINDOW if s.target_length == RELEASE_FRAMES else scaled_window(s.target_length)
    if s.target_length <= 0 or s.target_length % PATCH:
        raise PretrainConfigError(
            f"--target-length must be a positive multiple of {PATCH}, got {s.target_length}"
        )
    if s.batch_size < 1 or s.clone_batch < 1:
        raise PretrainConfigError("--batch-size and --clone-batch must be at least 1")
    if not 0.0 < s.mask_prob < 1.0:
        raise PretrainConfigError(f"--mask-prob must be in (0, 1), got {s.mask_prob}")
    if s.mask_length < 1 or s.average_top_k < 1:
        raise PretrainConfigError("--mask-length and --average-top-k must be at least 1")
    if s.cls_weight < 0 or s.srl_weight < 0:
        raise PretrainConfigError("--cls-weight and --srl-weight must be >= 0")
    for flag, value, allowed in (
        ("--mix", s.mix, MIX_MODES),
        ("--mix-partner", s.mix_partner, MIX_PARTNERS),
        ("--utterance-target", s.utterance_target, (None, *UTTERANCE_TARGETS)),
    ):
        if value not in allowed:
            choices = ", ".join(a for a in allowed if a is not None)
            raise PretrainConfigError(f"{flag} {value!r}: choose from {choices}")
    if s.utterance_target is None:
        s.utterance_target = "average" if s.stage == "eat" else "last"
    if s.stage == "sslam" and s.mix == "partial" and s.batch_size < 2:
        raise PretrainConfigError("--stage sslam mixes each clip with its batch neighbour: --batch-size >= 2")
    return s


def objective_config(s: PretrainSettings) -> ObjectiveConfig:
    """The objective's hyper-parameters from resolved settings."""
    return ObjectiveConfig(
        stage=s.stage,
        clone_batch=s.clone_batch,
        window=s.window,
        num_windows=s.num_windows,
        ema_decay=s.ema_decay,
        ema_end_decay=s.ema_end_decay,
        ema_anneal_end_step=s.ema_anneal_end_step,
        mask_prob=s.mask_prob,
        mask_length=s.mask_length,
        average_top_k=s.average_top_k,
        cls_loss=s.cls_weight,
        srl_weight=s.srl_weight,
        mix=s.mix,
        mix_partner=s.mix_partner,
        utterance_target=s.utterance_target,
    )


def train_config(s: PretrainSettings, device: torch.device) -> Any:
    """The trainer's settings (precision `auto` -> bf16 on CUDA, fp32 elsewhere)."""
    from sslam_core.training.trainer import TrainConfig

    precision = s.precision if s.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return TrainConfig(
        steps=s.steps,
        batch_size=s.batch_size,
        grad_accum=s.grad_accum,
        lr=s.lr,
        min_lr=s.min_lr,
        warmup=s.warmup,
        weight_decay=s.weight_decay,
        clip_grad=s.clip_grad,
        precision=precision,
        seed=s.seed,
        log_every=s.log_every,
        save_every=s.save_every,
        out_dir=s.out_dir,
        keep_last=s.keep_last,
        tensorboard=s.tensorboard,
        device=str(device),
    )


def _encoder_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder tensors of an Encoder or Classifier state (a fine-tuned head is dropped)."""
    if any(k.startswith("encoder.") for k in state):
        return {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    return state


def build_model(s: PretrainSettings, model_config: dict | None = None) -> PretrainingModel:
    """Student, decoder and teacher: from `init` (its EMA teacher too when it has one), else a fresh preset.

    model_config: a saved run's architecture (resume), which wins over both.
    """
    from sslam_core.models.loading import read_checkpoint

    cfg = objective_config(s)
    torch.manual_seed(s.seed)  # identical initial weights on every rank
    if model_config is not None:
        return PretrainingModel(ModelConfig.from_dict(model_config), cfg)
    if s.init is None:
        try:
            return PretrainingModel(preset(s.model or "base"), cfg)
        except ValueError as err:
            raise PretrainConfigError(f"--model: {err}") from None
    ckpt = read_checkpoint(s.init)
    arch = replace(ckpt.config, num_classes=0, drop_path=0.0)
    if s.model is not None:
        wanted = preset(s.model)
        if (wanted.embed_dim, wanted.depth) != (arch.embed_dim, arch.depth):
            raise PretrainConfigError(
                f"{s.init}: --model {s.model} does not match the checkpoint "
                f"({arch.depth} blocks of dim {arch.embed_dim}); leave --model out with --init"
            )
    teacher = ckpt.teacher
    if teacher is None:
        warnings.warn(
            f"{s.init}: no EMA teacher in the checkpoint; the teacher starts as the student", stacklevel=2
        )
    return PretrainingModel.from_weights(arch, _encoder_part(ckpt.state), teacher, ckpt.decoder, cfg)


class PretrainTask(TrainingTask):
    """The trainer's task for pre-training: objective on on-device fbank batches, EMA after each update.

    batches: the `AudioBatches` (or any callable with its signature) the epochs are drawn from, kept as
    `loader`. Masks, clean windows (stage 2, with or without mixing, so that `--mix none` sees the same
    masks) and mixing partners are drawn with the trainer's CPU generator; the decoder's mask noise uses a
    generator on the batch's device seeded from it, so a resumed run is exact on any device.
    """

    def __init__(self, model: PretrainingModel, batches: Any, settings: PretrainSettings | None = None):
        self.model, self.loader, self.settings = model, batches, settings
        self.step = 0
        self._noise: torch.Generator | None = None

    def batches(self, epoch_seed: int, rank: int, world_size: int, start_position: int) -> Iterator[dict]:
        """One epoch of fbank batches on the device, from the loader."""
        return self.loader(epoch_seed, rank, world_size, start_position)

    def loss(self, batch: dict, generator: torch.Generator) -> dict:
        source = batch["source"]
        model = self.model
        cfg = model.cfg
        B, _, T, _ = source.shape
        masks = model.make_masks(B, T, generator)
        windows = partners = None
        if cfg.stage == "sslam":
            from sslam_core.training.mixing import choose_windows

            windows = choose_windows(T, cfg.window, cfg.num_windows, generator)
            if model.mixes:
                partners = model.partners(B, generator)
        seed = int(torch.randint(2**62, (1,), generator=generator))
        if self._noise is None or self._noise.device != source.device:
            self._noise = torch.Generator(source.device)
        self._noise.manual_seed(seed)
        out = model(source, self._noise, masks=masks, windows=windows, partners=partners)
        size = out["sample_size"].float()
        terms = {"loss": out["loss"], "patch": out["patch_loss"].detach() / size}
        terms["cls"] = out["cls_loss"].detach() / size
        if "srl_loss" in out:
            terms["srl"] = out["srl_loss"].detach() / size
        return terms

    @property
    def schedule(self) -> dict:
        """The EMA anneal, which the trainer reports when a resumed run changes it."""
        cfg = self.model.cfg
        return {"ema_anneal_end_step": cfg.ema_anneal_end_step, "ema_end_decay": cfg.ema_end_decay}

    def after_step(self, step: int) -> dict:
        """The EMA teacher follows the student; its decay is logged."""
        self.step = step
        return {"ema_decay": self.model.ema_step(step)}

    def export(self, path: str | os.PathLike) -> None:
        """Our checkpoint format with the EMA teacher and the decoder, loadable by every command."""
        from sslam_core.audio.constants import NORMALIZATION
        from sslam_core.models.layouts.native import save_checkpoint

        m = self.model
        norm = self.settings.norm if self.settings is not None else "audioset"
        norm = NORMALIZATION[norm] if isinstance(norm, str) else norm
        extra = {"pretraining": {"stage": m.cfg.stage, "step": self.step}}
        save_checkpoint(
            path,
            m.model_cfg,
            m.student.state_dict(),
            teacher=m.teacher.state_dict(),
            decoder=m.decoder.state_dict(),
            normalization=tuple(float(v) for v in norm),
            extra=extra,
        )


def build_task(s: PretrainSettings, device: torch.device, model_config: dict | None = None) -> PretrainTask:
    """Model + data for resolved settings; batches are made on `device`."""
    from sslam_core.data.training_clips import AudioBatches, open_audio_dataset

    if not s.data:
        raise PretrainConfigError(
            "no training data given (DATA: audio files, folders, lists, .tsv or packed)"
        )
    model = build_model(s, model_config)
    rows = s.target_length // model.model_cfg.patch_size
    if rows > model.model_cfg.max_length:
        raise PretrainConfigError(
            f"--target-length {s.target_length} exceeds the model's position table "
            f"({model.model_cfg.max_length * model.model_cfg.patch_size} frames)"
        )
    if s.stage == "sslam":
        from sslam_core.training.mixing import choose_windows

        try:
            choose_windows(s.target_length, s.window, s.num_windows)
        except ValueError as err:
            raise PretrainConfigError(f"--window/--num-windows: {err}") from None
    dataset = open_audio_dataset(s.data, target_length=s.target_length, recursive=s.recursive)
    if len(dataset) == 0:
        raise PretrainConfigError(f"no audio files found in {', '.join(s.data)}")
    from sslam_core.training.trainer import fit_batch_size, note

    batch_size = fit_batch_size(s.batch_size, len(dataset), distributed.get_world_size()) if s.steps else 0
    if 0 < batch_size < s.batch_size:  # (--steps 0 makes no batches)
        note(f"note: --batch-size {s.batch_size} is more than {len(dataset)} clips allow; using {batch_size}")
        if s.stage == "sslam" and s.mix == "partial" and batch_size < 2:
            raise PretrainConfigError(
                "--stage sslam mixes each clip with its batch neighbour: need 2 clips a rank"
            )
        s.batch_size = batch_size
    norm = tuple(s.norm) if isinstance(s.norm, list) else s.norm
    batches = AudioBatches(dataset, s.batch_size, device=device, norm=norm, num_workers=s.workers)
    return PretrainTask(model, batches, s)


def weights_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (name order), to check that DDP ranks hold the same model."""
    import hashlib

    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_pretraining(
    settings: PretrainSettings,
    resume: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
    overwrite: bool = False,
    given: dict | None = None,
) -> dict:
    """One `sslam pretrain` run (single process or one torchrun rank); returns the trainer's summary plus
    `clips`, `skipped` (unreadable files, over all ranks), `rank_checksums` (weights of every rank, which
    must agree) and the resolved settings. stop_at: save and return at this step (split a run over jobs).
    overwrite: replace a run in out_dir. given: the settings as given (`merge_settings`), saved so that a
    resumed run or `--config RUN/config.json` derives the length-dependent values again."""
    from sslam_core.training.trainer import train

    info = distributed.init_distributed(settings.device)
    saved_model = None
    state = Path(settings.out_dir) / "state.pt"
    if resume and state.exists():
        saved = json.loads((Path(settings.out_dir) / "config.json").read_text()).get("pretrain", {})
        saved_model = saved.get("model_config")
    task = build_task(settings, info.device, saved_model)
    config = train_config(settings, info.device)
    config.progress = progress
    meta = {
        "pretrain": {
            "settings": settings.to_dict(),
            "given": given if given is not None else settings.to_dict(),
            "model_config": task.model.model_cfg.to_dict(),
            "objective": asdict(task.model.cfg),
            "clips": len(task.loader.dataset),
        }
    }
    summary = train(task, config, resume=resume, stop_at=stop_at, meta=meta, overwrite=overwrite)
    checksums = distributed.all_gather_objects(weights_checksum(task.model))
    if len(set(checksums)) > 1:
        warnings.warn(f"DDP ranks hold different weights: {checksums}", stacklevel=2)
    skipped: dict[str, str] = {}
    for part in distributed.all_gather_objects(task.loader.skipped):
        skipped.update(part)
    summary.update(clips=len(task.loader.dataset), skipped=skipped, rank_checksums=checksums)
    summary["settings"] = settings.to_dict()
    return summary


__all__ = [
    "STAGE_DEFAULTS",
    "PretrainConfigError",
    "PretrainSettings",
    "read_config_file",
    "saved_settings",
    "scaled_window",
    "merge_settings",
    "resolve_settings",
    "objective_config",
    "train_config",
    "build_model",
    "PretrainTask",
    "build_task",
    "weights_checksum",
    "run_pretraining",
]
