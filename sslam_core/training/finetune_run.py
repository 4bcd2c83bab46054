"""Fine-tuning runs as `sslam finetune` does them: settings, a config file, the data sets, the task, the run.

`FinetuneSettings` holds what a run is given, under the command's flag names (`--valid-fraction` ->
`valid_fraction`) with its defaults. `read_config_file` reads a JSON file of settings, or a run's
config.json (which records the settings it was given); `resolve_settings` layers them (later wins) and
checks the options that exclude each other. `setup_finetuning` resolves what depends on the data, the
checkpoint and the device (the sets and their split, the batch size, the step count, the precision), builds
the task (`FinetuneTask`, or `LinearProbeTask` for `linear`) and the trainer's settings; `FinetuneRun.train`
trains. `run_finetuning` does both.
"""

from __future__ import annotations

import json
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from sslam_core.audio.constants import NORMALIZATION
from sslam_core.data.datasets import LabelledSet, read_labelled, split_examples
from sslam_core.data.labels import read_label_csv
from sslam_core.errors import OptionError, SslamError
from sslam_core.models.checkpoint import Checkpoint
from sslam_core.models.loading import read_checkpoint
from sslam_core.models.transformer import ModelConfig, preset
from sslam_core.runs import distributed
from sslam_core.runs.outputs import atomic_write
from sslam_core.training.finetuning import (
    FULL_LR,
    LINEAR_LR,
    ClassifierTask,
    FinetuneConfig,
    FinetuneError,
    FinetuneTask,
    apply_split,
    default_epochs,
    default_steps,
    finetune,
    read_split,
    recipe,
    split_record,
)
from sslam_core.training.linear_probe import AugmentedLinearProbeTask, LinearProbeTask
from sslam_core.training.trainer import (
    RunFolderError,
    TrainConfig,
    check_run_folder,
    fit_batch_size,
    note,
    run_files,
)

PRECISION_CHOICES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything a `sslam finetune` run is given, under the flag names, with the command's defaults.

    None leaves a value to be derived in `setup_finetuning`: the step count from `epochs` (30, or 50 and
    at least 20,000 updates for a linear probe), lr (5e-5, linear 1e-3), warm-up (10 % of the steps),
    saves (every 10 % of the steps), the normalisation (the checkpoint's), pooling (the checkpoint's),
    mixup, weighted sampling and multi-label (from the labels).
    """

    recipe: str | None = None  # an official protocol (`recipes.RECIPES`) beneath the other settings
    data: str | None = None  # training set (required)
    checkpoint: str | None = None  # or `model`: a random init of that preset
    output: str | None = None  # the run folder (required)
    valid: str | None = None
    valid_fraction: float | None = None
    model: str | None = None
    linear: bool = False
    probe: str = "cached"  # linear: "cached" features, or "augmented" (the official linear evaluation)
    pool: str | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 48
    target_length: int = 1024
    seed: int = 0
    lr: float | None = None
    warmup: int | None = None
    layer_decay: float = 0.65
    drop_path: float = 0.1
    weight_decay: float = 0.05
    min_lr: float = 1e-6
    mixup: bool | None = None
    mixup_alpha: float = 0.8
    mixup_prob: float = 0.9
    specaugment: bool = True
    specaugment_ratio: float = 0.2
    noise: bool = False
    roll: bool = True
    label_smoothing: float = 0.1
    loss: str | None = None  # "bce" or "ce"; None: BCE for multi-label, cross-entropy for multi-class
    weighted_sampling: bool | None = None
    weights: str | None = None  # a weight file (`sslam weights`, or the official one weight per line)
    clips_per_epoch: int | None = None  # weighted sampling: distinct clips drawn per epoch
    multilabel: bool | None = None
    norm: str | list[float] | None = None  # a preset name, "MEAN,STD" or [MEAN, STD]
    audio_dir: str | None = None
    classes: str | None = None  # a class list file (index,mid,display_name CSV or one name per line)
    folds: str | list[int] | None = None  # "1,2,3,4" or [1, 2, 3, 4]
    valid_folds: str | list[int] | None = None
    cross_validate: bool = False  # one run per fold (ESC-50), each validated on its fold; mean and spread
    precision: str = "bf16"
    device: str = "auto"
    workers: int = 2
    save_every: int | str | None = None  # updates, or "epoch"


SETTING_NAMES = tuple(f.name for f in fields(FinetuneSettings))
_SETTING_TYPES = typing.get_type_hints(FinetuneSettings)


# ---------------------------------------------------------------------------------------------------------
# Settings: a config file, layers, checks


def read_config_file(path: str | os.PathLike) -> dict:
    """A JSON object of settings (keys as the flags, `-` or `_`), checked against the known names and
    their types; or a fine-tuning run's config.json, whose settings are taken as that run was given them
    (values derived from the data, such as the step count and the warm-up, are derived again)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FinetuneError(f"{path}: cannot read the config file ({err})") from None
    if not isinstance(raw, dict):
        raise FinetuneError(f"{path}: the config file must hold one JSON object")
    if isinstance(raw.get("pretrain"), dict):
        raise FinetuneError(f"{path}: a pre-training run's config.json, not a fine-tuning one")
    if "world_size" in raw and "finetune" in raw:  # a fine-tuning run's config.json
        if not isinstance(raw.get("settings"), dict):
            raise FinetuneError(
                f"{path}: this run's config.json does not record its settings (an older run); "
                "write them in a JSON file"
            )
        values = {k: v for k, v in raw["settings"].items() if k in SETTING_NAMES}
    else:
        values = {k.replace("-", "_"): v for k, v in raw.items()}
        unknown = sorted(set(values) - set(SETTING_NAMES))
        if unknown:
            raise FinetuneError(f"{path}: unknown settings {', '.join(unknown)}")
    for name, value in values.items():
        if not _fits(value, _SETTING_TYPES[name]):
            raise FinetuneError(f"{path}: {name} must be {_type_name(_SETTING_TYPES[name])}, got {value!r}")
    return values


def merge_settings(*layers: dict) -> dict:
    """Setting dicts merged (later wins; None values ignored): what a run was given."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in SETTING_NAMES:
                raise FinetuneError(f"unknown setting {key!r}")
            if value is not None:
                merged[key] = value
    return merged


def resolve_settings(*layers: dict, check_sources: bool = True) -> FinetuneSettings:
    """Merge setting dicts (see `merge_settings`, e.g. a config file, then the flags given) into
    settings, beneath the recipe a layer names (`recipes.with_recipe`), refusing options that exclude
    each other and values out of range. `check_sources=False` leaves out the check for a checkpoint or
    a model (a dry run shows the settings without them)."""
    from sslam_core.training.recipes import with_recipe

    named = merge_settings(*layers).get("recipe")
    s = FinetuneSettings(**merge_settings(*with_recipe(named, *layers)))
    _check_values(s)
    if not check_sources:
        return s
    if s.steps is not None and s.epochs is not None:
        raise FinetuneError("give --steps or --epochs, not both")
    if (s.checkpoint is None) == (s.model is None):
        raise FinetuneError("give --checkpoint, or --model PRESET for a randomly initialised baseline")
    if s.valid is not None and s.valid_fraction:
        raise FinetuneError("give --valid or --valid-fraction, not both")
    return s


def resolved_values(s: FinetuneSettings) -> dict:
    """The settings as one JSON-ready dict (what `--dry-run` prints and config.json records), with the
    defaults that do not depend on the data filled in: the learning rate, and the warm-up (10 % of a
    given step count). Values the data decide stay null (the step count from epochs, multi-label, mixup
    and weighted sampling by default)."""
    values = asdict(s)
    if values["lr"] is None:
        values["lr"] = LINEAR_LR if s.linear else FULL_LR
    if values["warmup"] is None and s.steps:
        values["warmup"] = s.steps // 10
    return values


def _check_values(s: FinetuneSettings) -> None:
    """One error line for a setting outside what it can be."""
    if s.probe not in ("cached", "augmented"):
        raise FinetuneError(f"probe {s.probe!r}: choose cached or augmented")
    if s.loss not in (None, "bce", "ce"):
        raise FinetuneError(f"loss {s.loss!r}: choose bce or ce")
    if isinstance(s.save_every, str) and s.save_every != "epoch":
        raise FinetuneError(f"save_every {s.save_every!r}: a number of updates, or epoch")
    if not 0.0 <= s.specaugment_ratio < 1.0:
        raise FinetuneError(f"--specaugment-ratio {s.specaugment_ratio:g}: must be in [0, 1)")
    if not 0.0 <= s.mixup_prob <= 1.0 or s.mixup_alpha <= 0:
        raise FinetuneError("--mixup-prob must be in [0, 1] and --mixup-alpha above 0")
    if s.clips_per_epoch is not None and s.clips_per_epoch < 1:
        raise FinetuneError(f"--clips-per-epoch {s.clips_per_epoch}: must be at least 1")
    if s.cross_validate and (s.valid is not None or s.valid_fraction or s.valid_folds):
        raise FinetuneError("--cross-validate validates on each fold in turn; leave out --valid, "
                            "--valid-fraction and --valid-folds")  # fmt: skip


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a setting's type (an int fits a float; a bool is no number)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_fits(value, option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("NoneType", "None")


# ---------------------------------------------------------------------------------------------------------
# Setting up a run: device, data, batch size, steps, task, trainer settings


@dataclass
class FinetuneRun:
    """A fine-tuning run set up and ready to train (see `setup_finetuning`): its settings, the task
    (its data sets included), the trainer's settings and the split of `valid_fraction`."""

    settings: FinetuneSettings
    task: ClassifierTask
    train_config: TrainConfig
    split: dict | None = None
    resume: bool = False
    overwrite: bool = False

    def train(self, stop_at: int | None = None) -> dict:
        """Train (single process or one torchrun rank); returns the trainer's summary, with `skipped`
        (the unreadable clips of every rank, path -> reason). config.json records the data paths as
        given and the settings, split.json the split."""
        s = self.settings
        sources = dict(
            data=s.data, valid=s.valid, audio_dir=s.audio_dir, folds=s.folds, valid_folds=s.valid_folds,
            valid_fraction=s.valid_fraction, checkpoint=s.checkpoint, model=s.model,
        )  # fmt: skip
        summary = finetune(
            self.task,
            self.train_config,
            resume=self.resume,
            stop_at=stop_at,
            overwrite=self.overwrite,
            data=sources,
            split=self.split,
            settings=asdict(s),
        )
        skipped: dict[str, str] = {}  # the unreadable clips every rank met: path -> one-line reason
        for part in distributed.all_gather_objects(self.task.unreadable()):
            skipped.update(part)
        summary["skipped"] = skipped
        return summary


def setup_finetuning(
    settings: FinetuneSettings, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> FinetuneRun:
    """Everything before training, on every rank and before the ranks meet (one-line errors, no files
    written): the run folder check, device and precision, checkpoint, data sets and split (the saved one
    on `resume`), the batch size (lowered to the clips per rank, with a note), the step count, the task and
    the trainer's settings; on rank 0 a line saying what will run, unless not `progress`."""
    s = settings
    if s.data is None:
        raise FinetuneError("no training data given (--data)")
    if s.output is None:
        raise FinetuneError("no run folder given (-o/--output)")
    check_run_folder(s.output, resume, overwrite)
    device = _pick_device(s.device)
    precision = _training_precision(s.precision, device)
    try:
        ckpt = read_checkpoint(s.checkpoint) if s.checkpoint else None
        model_config = None if ckpt else preset(s.model)
        folds, valid_folds = _folds(s.folds, "--folds"), _folds(s.valid_folds, "--valid-folds")
        saved_split = read_split(s.output) if resume else None
        train_set, valid_set, split = read_sets(s, folds, valid_folds, saved_split)
        world, main = int(os.environ.get("WORLD_SIZE", "1")), _rank_zero()
        batch_size = fit_batch_size(s.batch_size, len(train_set), world)
        if batch_size < s.batch_size and main:
            clips = len(train_set)
            note(f"note: --batch-size {s.batch_size} is more than {clips} clips allow; using {batch_size}")
        config = FinetuneConfig(
            target_length=s.target_length,
            batch_size=batch_size,
            linear=s.linear,
            probe=s.probe,
            pool=s.pool,
            drop_path=s.drop_path,
            mixup=s.mixup,
            mixup_alpha=s.mixup_alpha,
            mixup_prob=s.mixup_prob,
            specaugment=s.specaugment,
            specaugment_ratio=s.specaugment_ratio,
            noise=s.noise,
            roll=s.roll,
            label_smoothing=s.label_smoothing,
            loss=s.loss,
            weighted_sampling=s.weighted_sampling,
            weights=s.weights,
            clips_per_epoch=s.clips_per_epoch,
            norm=_parse_norm(s.norm, ckpt.normalization if ckpt else None),
            workers=s.workers,
            precision=precision,
        )
        task = classifier_task(train_set, valid_set, ckpt, config, seed=s.seed, model_config=model_config)
        per_epoch = task.batches_per_epoch(world)
        if per_epoch == 0:
            clips = len(train_set)
            raise FinetuneError(f"{clips} clips too few for batches of {batch_size} on {world} rank(s)")
        if s.steps:
            total = s.steps
        else:
            total = max(1, round((s.epochs or default_epochs(s.linear)) * per_epoch))
            if s.linear and s.epochs is None and s.probe == "cached":
                total = max(total, default_steps(True, len(train_set), batch_size, world))
        drawn = task.draws_per_epoch() if task.weighted else None
        if drawn is not None and s.clips_per_epoch and drawn < s.clips_per_epoch and main:
            note(f"note: --clips-per-epoch {s.clips_per_epoch} is more than the {drawn} weighted clips; "
                 f"each epoch draws all {drawn}")  # fmt: skip
        train_config = recipe(
            s.linear,
            total,
            task.multilabel,
            s.output,
            lr=s.lr,
            warmup=s.warmup,
            weight_decay=s.weight_decay,
            min_lr=s.min_lr,
            layer_decay=None if s.linear else s.layer_decay,
            save_every=per_epoch if s.save_every == "epoch" else s.save_every,
            seed=s.seed,
            precision=precision,
            device=str(device) if s.device != "auto" else "auto",
            progress=progress,
        )
    except ValueError as e:  # one line for a setting torch or the data refused, too
        if isinstance(e, SslamError):
            raise
        raise FinetuneError(str(e)) from None
    if main and progress:
        kind = "multi-label" if task.multilabel else "multi-class"
        what = "fine-tuning"
        if s.linear:
            what = f"linear probe ({'augmented batches' if s.probe == 'augmented' else 'cached features'})"
        what += f", recipe {s.recipe}" if s.recipe else ""
        note(
            f"{what}: {len(train_set)} clips, {len(task.classes)} "
            f"classes ({kind}), {len(valid_set) if valid_set else 0} validation clips, {total} steps; "
            f"init: {task.init}"
        )
    return FinetuneRun(s, task, train_config, split, resume, overwrite)


def run_finetuning(
    settings: FinetuneSettings,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
) -> dict:
    """One `sslam finetune` run (single process or one torchrun rank): `setup_finetuning`, then train;
    returns the trainer's summary."""
    return setup_finetuning(settings, resume, overwrite, progress).train(stop_at)


CROSS_VALIDATION = "cross_validation.json"


def run_cross_validation(
    settings: FinetuneSettings,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
) -> dict:
    """`settings` once per fold of the data (ESC-50's five): fold k validates the run trained on the
    others, in OUTPUT/foldK. Returns, and writes as OUTPUT/cross_validation.json, each fold's best
    validation value (by the task's metric, accuracy or mAP) with its step, their mean, sample standard
    deviation, minimum and maximum, and the unreadable clips (`skipped`). An interrupted fold returns its
    summary (with `interrupted`); `resume` continues from it, leaving finished folds as they are."""
    s = settings
    if s.data is None or s.output is None:
        raise FinetuneError("cross-validation needs the training data (--data) and a run folder (-o)")
    class_list = read_label_csv(s.classes) if s.classes else None
    full = read_labelled(s.data, s.audio_dir, classes=class_list, multilabel=s.multilabel)
    folds = sorted({e.fold for e in full.examples if e.fold is not None})
    if len(folds) < 2 or any(e.fold is None for e in full.examples):
        raise FinetuneError(
            f"{s.data}: cross-validation needs a set whose clips all have a fold, in two folds or more "
            "(as ESC-50's meta/esc50.csv); use --valid, --valid-fraction or --no-cross-validate"
        )
    out = Path(s.output)
    if (out / CROSS_VALIDATION).exists() and not (resume or overwrite):
        raise RunFolderError(
            f"{out / CROSS_VALIDATION} exists; pass --resume to continue the folds or --overwrite to "
            "replace them"
        )
    runs = {k: out / f"fold{k}" for k in folds}
    for run in runs.values():  # every refusal before the first fold trains
        check_run_folder(run, resume and bool(run_files(run)), overwrite)
    results, skipped = [], {}
    for k in folds:
        fold = replace(
            s, output=str(runs[k]), folds=[f for f in folds if f != k], valid_folds=[k], cross_validate=False
        )
        if progress and _rank_zero():
            note(f"fold {k} of {len(folds)}: validating on fold {k}, training on the others")
        summary = run_finetuning(fold, resume and bool(run_files(runs[k])), overwrite, progress, stop_at)
        skipped.update(summary.get("skipped", {}))
        if "interrupted" in summary:
            return {**summary, "skipped": skipped}
        best = summary.get("best") or {}
        results.append(
            {"fold": k, "run": str(runs[k]), "metric": best.get("metric"), "best": best.get("value"),
             "best_step": best.get("step"), "steps": summary.get("steps")}
        )  # fmt: skip
    values = [r["best"] for r in results if r["best"] is not None]
    mean = sum(values) / len(values) if values else None
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    report = {
        "recipe": s.recipe,
        "metric": next((r["metric"] for r in results if r["metric"]), None),
        "folds": results,
        "mean": mean,
        "std": spread,
        "min": min(values) if values else None,
        "max": max(values) if values else None,
        "skipped": skipped,
    }
    if _rank_zero():
        text = json.dumps(report, indent=2) + "\n"
        atomic_write(out / CROSS_VALIDATION, lambda tmp: Path(tmp).write_text(text))
    return report


def classifier_task(
    train_set: LabelledSet,
    valid_set: LabelledSet | None,
    checkpoint: str | os.PathLike | Checkpoint | None,
    config: FinetuneConfig,
    seed: int = 0,
    model_config: ModelConfig | None = None,
) -> ClassifierTask:
    """The task `config` asks for: a FinetuneTask, or for config.linear a LinearProbeTask (cached
    features) or an AugmentedLinearProbeTask (the official linear evaluation)."""
    if config.linear:
        task = AugmentedLinearProbeTask if config.probe == "augmented" else LinearProbeTask
    else:
        task = FinetuneTask
    return task(train_set, valid_set, checkpoint, config, seed=seed, model_config=model_config)


def read_sets(
    s: FinetuneSettings,
    folds: list[int] | None = None,
    valid_folds: list[int] | None = None,
    saved_split: dict | None = None,
) -> tuple[LabelledSet, LabelledSet | None, dict | None]:
    """Training and validation sets of the settings (validation uses the training classes; `folds` and
    `valid_folds` as parsed from them), and the split record of `valid_fraction`: `saved_split` on
    resume, else a new seeded split."""
    class_list = read_label_csv(s.classes) if s.classes else None
    train_set = read_labelled(
        s.data, s.audio_dir, classes=class_list, folds=folds or None, multilabel=s.multilabel
    )
    for name in train_set.missing[:1]:
        _note(f"note: {len(train_set.missing)} listed clip(s) have no audio (e.g. {name})")
    if s.valid is not None or valid_folds:
        valid_set = read_labelled(
            s.valid or s.data,
            s.audio_dir,
            classes=train_set,
            folds=valid_folds or None,
            multilabel=train_set.multilabel,
        )
    elif saved_split is not None:  # resume: the split the run was started on
        train_set, valid_set = apply_split(train_set, saved_split)
        return train_set, valid_set, saved_split
    elif s.valid_fraction:
        kept, held = split_examples(train_set.examples, s.valid_fraction, s.seed)
        train_set, valid_set = replace(train_set, examples=kept), replace(train_set, examples=held)
        return train_set, valid_set, split_record(train_set, valid_set, s.valid_fraction, s.seed)
    else:
        valid_set = None
    return train_set, valid_set, None


def _rank_zero() -> bool:
    """Rank 0 of a torchrun run (read from RANK: the ranks join their group later, in the trainer)."""
    return os.environ.get("RANK", "0") == "0"


def _note(text: str) -> None:
    if _rank_zero():
        note(text)


def _pick_device(device: str) -> torch.device:
    """`auto` -> CUDA when available, else the CPU; an unknown or missing device is an OptionError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise OptionError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("CUDA was requested but is not available")
    return dev


def _training_precision(precision: str, device: torch.device) -> str:
    """The precision of training, feature caching and validation: as asked on CUDA, fp32 elsewhere."""
    if device.type != "cuda":
        return "fp32"
    if precision not in PRECISION_CHOICES:
        raise OptionError(f"unknown precision {precision!r}; choose {', '.join(PRECISION_CHOICES)}")
    return precision


def _folds(value: str | list[int] | None, flag: str) -> list[int] | None:
    """`1,2,3` (or [1, 2, 3]) -> [1, 2, 3] (ESC-50 style folds); nothing -> None."""
    if not value:
        return None
    if isinstance(value, list):
        return [int(f) for f in value]
    try:
        return [int(f) for f in value.split(",") if f.strip()]
    except ValueError:
        raise OptionError(f"{flag} {value!r}: expected fold numbers such as 5 or 1,2,3,4") from None


def _parse_norm(norm: str | list[float] | None, default: Any = None) -> str | tuple[float, float]:
    """A preset name, `MEAN,STD` or [MEAN, STD] (finite, STD > 0); None -> `default` (the checkpoint's) or
    AudioSet's."""
    presets = ", ".join(NORMALIZATION)
    if norm is None:
        return default or "audioset"
    if isinstance(norm, list) or "," in norm:
        try:
            mean, std = (float(v) for v in (norm if isinstance(norm, list) else norm.split(",")))
        except ValueError:
            raise OptionError(f"--norm {norm!r}: expected a preset ({presets}) or MEAN,STD") from None
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise OptionError(f"--norm {norm!r}: MEAN and STD must be finite and STD positive")
        return mean, std
    if norm not in NORMALIZATION:
        raise OptionError(f"--norm {norm!r}: unknown preset; choose {presets} or MEAN,STD")
    return norm


__all__ = [
    "FinetuneRun",
    "FinetuneSettings",
    "SETTING_NAMES",
    "classifier_task",
    "merge_settings",
    "read_config_file",
    "read_sets",
    "resolve_settings",
    "resolved_values",
    "run_finetuning",
    "run_cross_validation",
    "CROSS_VALIDATION",
    "setup_finetuning",
]
