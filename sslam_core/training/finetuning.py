"""Fine-tuning of a classifier on a labelled audio set, through the shared trainer.

`FinetuneTask` follows the trainer's task contract (`TrainingTask`): it owns the Classifier (initialised
from a pre-trained or fine-tuned checkpoint, or at random for baselines), the labelled batches, the
augmentation (mixup, SpecAugment, roll; `sslam_core.data.augment`), the loss (BCE with logits for
multi-label, label-smoothed cross-entropy for multi-class), the validation metric (mAP or accuracy) and the
export `sslam tag` / `sslam extract` load. The linear probe (`linear_probe.LinearProbeTask`) shares all
but the data, the forward pass and the export through the small base `ClassifierTask`.

Spec §5 recipe as defaults: layer-wise lr decay 0.65, drop-path 0.1, Adam (0.9, 0.95), weight decay 0.05,
cosine schedule to 1e-6 after a 10 % warm-up; mixup and weighted sampling for multi-label data; label
smoothing 0.1 and no mixup for multi-class data; linear probes at lr 1e-3 for 50 epochs (at least
20,000 updates).
"""

from __future__ import annotations

import json
import os
import warnings
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sslam_core.audio.constants import NORMALIZATION
from sslam_core.data.augment import (
    AugmentConfig,
    WeightedEpochs,
    augment,
    read_weights,
    roll_waves,
    sample_weights,
)
from sslam_core.data.datasets import Example, LabelledSet
from sslam_core.data.training_clips import AudioBatches, UnreadableAudioWarning, WaveformDataset
from sslam_core.errors import SslamError
from sslam_core.evaluation.metrics import multiclass_report, multilabel_report
from sslam_core.models.checkpoint import Checkpoint
from sslam_core.models.layouts.native import save_checkpoint
from sslam_core.models.loading import read_checkpoint
from sslam_core.models.transformer import Classifier, ModelConfig
from sslam_core.training.task import TrainingTask
from sslam_core.training.trainer import TrainConfig, train

FULL_LR, LINEAR_LR = 5e-5, 1e-3
FULL_EPOCHS, LINEAR_EPOCHS = 30, 50
LINEAR_MIN_STEPS = 20_000  # default probe length on small sets; see default_steps


class FinetuneError(SslamError, ValueError):
    """Settings or data that cannot be fine-tuned on; the message says which and why."""


@dataclass
class FinetuneConfig:
    """What the task does besides optimisation (that is `TrainConfig`)."""

    target_length: int = 1024  # frames per training crop and per evaluation window
    batch_size: int = 48
    linear: bool = False  # frozen encoder, train fc_norm + head
    probe: str = "cached"  # linear: "cached" pooled features, or "augmented" (the official linear evaluation)
    pool: str | None = None  # "cls" or "mean" (of the patch tokens); None: the checkpoint's, else "cls"
    drop_path: float = 0.1
    mixup: bool | None = None  # None: on for multi-label, off for multi-class (ESC-50 recipe)
    mixup_alpha: float = 0.8
    mixup_prob: float = 0.9
    specaugment: bool = True
    specaugment_ratio: float = 0.2  # largest masks: this fraction of the mel bins and of the frames
    noise: bool = False  # the Speech Commands recipe's fbank noise
    roll: bool = True  # waveform roll and gain
    label_smoothing: float = 0.1  # multi-class cross-entropy only
    loss: str | None = None  # "bce" or "ce"; None: BCE for multi-label, cross-entropy for multi-class
    weighted_sampling: bool | None = None  # None: on for multi-label
    weights: str | None = None  # a weight file for weighted sampling (default: the AudioSet formula)
    clips_per_epoch: int | None = None  # weighted sampling: distinct clips drawn per epoch (None: with
    # replacement, as many draws as clips)
    norm: str | tuple[float, float] | None = None  # None: the checkpoint's, else AudioSet's
    workers: int = 2
    eval_batch_size: int = 16
    precision: str = "fp32"  # for feature caching and validation (training autocast is TrainConfig's)


def resolve_norm(
    norm: str | tuple[float, float] | None, checkpoint: Checkpoint | None
) -> tuple[float, float]:
    """Mean and std of the fbank: given, preset name, the checkpoint's, or AudioSet's."""
    if norm is None:
        norm = checkpoint.normalization if checkpoint is not None and checkpoint.normalization else "audioset"
    if isinstance(norm, str):
        if norm not in NORMALIZATION:
            raise FinetuneError(f"unknown normalisation {norm!r}; choose from {', '.join(NORMALIZATION)}")
        norm = NORMALIZATION[norm]
    return float(norm[0]), float(norm[1])


def _same_classes(ckpt: Checkpoint, classes: list[tuple[str, str]]) -> bool:
    if ckpt.config.num_classes != len(classes):
        return False
    return ckpt.labels is None or [tuple(c) for c in ckpt.labels] == [tuple(c) for c in classes]


def build_classifier(
    checkpoint: Checkpoint | None,
    classes: list[tuple[str, str]],
    drop_path: float = 0.1,
    seed: int = 0,
    model_config: ModelConfig | None = None,
    pool: str | None = None,
) -> tuple[Classifier, str]:
    """A Classifier for `classes` and how it was initialised.

    Pre-trained encoder -> its weights under a new fc_norm + head; fine-tuned with the same classes ->
    continue from all its weights; fine-tuned on other classes -> its encoder under a new head; no
    checkpoint -> random weights of `model_config` (baselines). The new head's init is seeded.
    """
    if checkpoint is None and model_config is None:
        raise FinetuneError("need a checkpoint or a model config to build the classifier from")
    base = checkpoint.config if checkpoint is not None else model_config
    cfg = replace(base, num_classes=len(classes), drop_path=drop_path, pool=pool or base.pool)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier(cfg)
    if checkpoint is None:
        return model, "random"
    if checkpoint.config.num_classes == 0:
        model.encoder.load_state_dict(checkpoint.state, strict=True)
        return model, "pre-trained encoder, new head"
    if _same_classes(checkpoint, classes):
        model.load_state_dict(checkpoint.state, strict=True)
        return model, "fine-tuned classifier, continued"
    encoder = {k[len("encoder.") :]: v for k, v in checkpoint.state.items() if k.startswith("encoder.")}
    model.encoder.load_state_dict(encoder, strict=True)
    return model, "fine-tuned encoder, new head"


def _target_rows(data: LabelledSet) -> list[np.ndarray]:
    return list(data.targets())


def classification_loss(logits: Tensor, target: Tensor, multilabel: bool, label_smoothing: float) -> Tensor:
    """BCE with logits (multi-label) or cross-entropy against smoothed soft targets (multi-class)."""
    logits = logits.float()
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, target)
    target = target * (1.0 - label_smoothing) + label_smoothing / target.shape[1]
    return -(target * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def scores_report(scores: np.ndarray, targets: np.ndarray, multilabel: bool) -> dict:
    """Validation numbers: mAP, AUC, d' (multi-label) or accuracy, top-5 (multi-class)."""
    if multilabel:
        r = multilabel_report(scores, targets)
        return {"mAP": r["mAP"], "AUC": r["AUC"], "d_prime": r["d_prime"], "n_clips": r["n_clips"]}
    r = multiclass_report(scores, targets.argmax(axis=1))
    return {"accuracy": r["accuracy"], "top5": r["top5"], "n_clips": r["n_clips"]}


def augment_config(config: FinetuneConfig, multilabel: bool) -> AugmentConfig:
    """The fbank-batch augmentation of `config` (mixup by default for multi-label data only)."""
    return AugmentConfig(
        mixup=multilabel if config.mixup is None else config.mixup,
        mixup_alpha=config.mixup_alpha,
        mixup_prob=config.mixup_prob,
        specaugment=config.specaugment,
        specaugment_ratio=config.specaugment_ratio,
        noise=config.noise,
        roll=config.roll,
    )


class ClassifierTask(TrainingTask):
    """What full fine-tuning and the linear probe share: the checks on the data, the Classifier and how it
    was initialised, the normalisation, the loss, validation (mAP or accuracy) and the export.

    A subclass gives its `kind` and `linear` (recorded in config.json and the checkpoint), `batches`,
    `logits_and_targets` and `validation_scores`, and may change `build_model` and `exported_state`.
    """

    kind: str = ""  # the run's "task" in config.json and in the command's summary
    linear: bool = False  # the FinetuneConfig.linear this task runs

    def __init__(
        self,
        train_set: LabelledSet,
        valid_set: LabelledSet | None,
        checkpoint: str | os.PathLike | Checkpoint | None,
        config: FinetuneConfig,
        seed: int = 0,
        model_config: ModelConfig | None = None,
    ):
        if config.linear != self.linear:
            raise FinetuneError(
                f"FinetuneConfig(linear={config.linear}) does not fit {type(self).__name__}: "
                "a linear probe is a LinearProbeTask, full fine-tuning a FinetuneTask"
            )
        if len(train_set) == 0:
            raise FinetuneError("the training set has no clips with audio")
        if valid_set is not None and list(valid_set.classes) != list(train_set.classes):
            raise FinetuneError("validation classes differ from the training classes; read it with classes=")
        used = sorted({i for e in train_set.examples for i in e.labels})
        if not train_set.multilabel and len(used) < 2:
            name = train_set.classes[used[0]][1] if used else "none"
            raise FinetuneError(
                f"the training clips are all of one class ({name}): a multi-class classifier learns nothing "
                "from them (loss 0); add clips of other classes, or use --multilabel for a detector"
            )
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) or checkpoint is None else None
        if ckpt is None and checkpoint is not None:
            ckpt = read_checkpoint(checkpoint)
        self.config, self.train_set, self.valid_set = config, train_set, valid_set
        self.skipped: dict[str, str] = {}  # unreadable clips met outside the training batches: path -> why
        self.classes = list(train_set.classes)
        self.multilabel = train_set.multilabel
        self.norm = resolve_norm(config.norm, ckpt)
        self.model, self.init = self.build_model(ckpt, seed, model_config)
        self.source = ckpt.source if ckpt is not None else "random"
        self.best_metric = "mAP" if self.multilabel else "accuracy"
        self.weighted = self.multilabel if config.weighted_sampling is None else config.weighted_sampling
        self.augment: AugmentConfig | None = None  # what full fine-tuning applies to its batches
        self._weights: np.ndarray | None = None

    def build_model(
        self, checkpoint: Checkpoint | None, seed: int, model_config: ModelConfig | None
    ) -> tuple[Classifier, str]:
        """The Classifier to train and how it was initialised (see `build_classifier`)."""
        return build_classifier(
            checkpoint, self.classes, self.config.drop_path, seed, model_config, self.config.pool
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def batches_per_epoch(self, world_size: int = 1) -> int:
        clips = self.draws_per_epoch() if self.weighted else len(self.train_set)
        return clips // world_size // self.config.batch_size

    def sampling_weights(self) -> np.ndarray:
        """Each training clip's weight for weighted sampling: from the weight file, or the AudioSet
        formula on the training labels (`augment.sample_weights`)."""
        if self._weights is None:
            if self.config.weights:
                self._weights = read_weights(self.config.weights, [e.path for e in self.train_set.examples])
            else:
                self._weights = sample_weights(self.train_set.targets())
        return self._weights

    def draws_per_epoch(self) -> int:
        """Clips drawn per epoch under weighted sampling: `clips_per_epoch` distinct clips (at most those
        with a weight above 0), else as many draws (with replacement) as there are clips."""
        if self.config.clips_per_epoch is None:
            return len(self.train_set)
        return min(self.config.clips_per_epoch, int((self.sampling_weights() > 0).sum()))

    @abstractmethod
    def logits_and_targets(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Logits (B, C) of a training batch and its targets (B, C), both after any augmentation."""

    @abstractmethod
    def validation_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """Scores (N, C) and targets (N, C) of the readable clips of the validation set."""

    def loss(self, batch: dict, generator: torch.Generator) -> dict:
        """BCE with logits (multi-label) or label-smoothed cross-entropy (multi-class)."""
        logits, target = self.logits_and_targets(batch, generator)
        bce = self.multilabel or self.config.loss == "bce"  # Speech Commands: BCE on one-hot targets
        smoothing = 0.0 if bce else self.config.label_smoothing
        return {"loss": classification_loss(logits, target, bce, smoothing)}

    def skip(self, path: str, error: str) -> None:
        """Note an unreadable clip (once): it is left out, and reported as one `skipped:` line."""
        if path not in self.skipped:
            self.skipped[path] = error
            warnings.warn(error, UnreadableAudioWarning, stacklevel=2)

    def unreadable(self) -> dict[str, str]:
        """Every unreadable clip this task has met (path -> the one-line reason)."""
        return dict(self.skipped)

    def used(self, data: LabelledSet | None) -> int:
        """How many clips of `data` were used: the listed ones less those found unreadable."""
        if data is None:
            return 0
        bad = self.unreadable()
        return sum(e.path not in bad for e in data.examples)

    def evaluate(self) -> dict:
        """Validation mAP / accuracy of the current weights ({} without a validation set)."""
        if self.valid_set is None:
            return {}
        return scores_report(*self.validation_scores(), self.multilabel)

    def exported_state(self) -> dict[str, Tensor]:
        """The weights the exported checkpoint holds, on the CPU."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def export(self, path: str | os.PathLike) -> None:
        """Our checkpoint format with the dataset's labels, normalisation and task settings."""
        extra = {
            "multilabel": self.multilabel,
            "target_length": self.config.target_length,
            "linear": self.linear,
            "init": self.init,
            "init_checkpoint": self.source,
        }
        save_checkpoint(
            path,
            self.model.cfg,
            self.exported_state(),
            labels=self.classes,
            normalization=self.norm,
            extra=extra,
        )


class FinetuneTask(ClassifierTask):
    """Full fine-tuning of a Classifier on a LabelledSet: audio batches (fbank on the device), mixup,
    SpecAugment and roll, validation windowed as `sslam tag` does; see the module docstring."""

    kind, linear = "finetune", False

    def __init__(
        self,
        train_set: LabelledSet,
        valid_set: LabelledSet | None,
        checkpoint: str | os.PathLike | Checkpoint | None,
        config: FinetuneConfig,
        seed: int = 0,
        model_config: ModelConfig | None = None,
    ):
        super().__init__(train_set, valid_set, checkpoint, config, seed, model_config)
        self.augment = augment_config(config, self.multilabel)
        self._batches: AudioBatches | None = None

    def _audio_batches(self) -> AudioBatches:
        if self._batches is None:
            paths = [e.path for e in self.train_set.examples]
            dataset = WaveformDataset(paths, self.config.target_length, True, _target_rows(self.train_set))
            if self.weighted:
                weights = self.sampling_weights()
                dataset = WeightedEpochs(
                    dataset, weights, self.draws_per_epoch(), replace=self.config.clips_per_epoch is None
                )
            self._batches = AudioBatches(
                dataset,
                self.config.batch_size,
                self.device,
                self.norm,
                self.config.workers,
                shuffle=not self.weighted,
                wave_transform=roll_waves if self.config.roll else None,
            )
        return self._batches

    def unreadable(self) -> dict[str, str]:
        """Every unreadable clip met: in the training batches and in validation."""
        met = {} if self._batches is None else {p: f"{p}: {why}" for p, why in self._batches.skipped.items()}
        return {**met, **self.skipped}

    def batches(self, epoch_seed: int, rank: int, world_size: int, start_position: int) -> Iterator[dict]:
        """Audio batches of random crops (weighted draws for multi-label data), fbank on the device."""
        yield from self._audio_batches()(epoch_seed, rank, world_size, start_position)

    def logits_and_targets(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The augmented batch (mixup mixes the targets too) through the whole Classifier."""
        source, target = augment(batch["source"], batch["label"].float(), generator, self.augment)
        return self.model(source), target

    def predict(self, data: LabelledSet) -> tuple[np.ndarray, np.ndarray]:
        """Scores (N, C) and targets (N, C) of the readable clips of `data` (windowing as `sslam tag`)."""
        from sslam_core.inference.tagging import tag

        self.model.eval()
        results = tag(
            self.model,
            [e.source for e in data.examples],  # tar members and their problems too
            target_length=self.config.target_length,
            multilabel=self.multilabel,
            batch_size=self.config.eval_batch_size,
            workers=self.config.workers,
            device=self.device,
            precision=self.config.precision,
            normalization=self.norm,
        )
        scores, keep = [], []
        for i, res in enumerate(results):
            if res.error is None:
                scores.append(res.scores)
                keep.append(i)
            else:
                self.skip(data.examples[i].path, res.error)
        if not scores:
            raise FinetuneError("no readable audio in the validation set")
        return np.stack(scores), data.targets()[keep]

    def validation_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """The validation set windowed like `sslam tag`."""
        return self.predict(self.valid_set)


def recipe(
    linear: bool, steps: int, multilabel: bool, out_dir: str | os.PathLike, **overrides
) -> TrainConfig:
    """The spec §5 optimisation settings for `steps` updates; keyword overrides win."""
    settings = dict(
        steps=steps,
        lr=LINEAR_LR if linear else FULL_LR,
        min_lr=1e-6,
        warmup=steps // 10,
        weight_decay=0.05,
        layer_decay=None if linear else 0.65,
        betas=(0.9, 0.95),
        best_metric="mAP" if multilabel else "accuracy",
        best_mode="max",
        out_dir=os.fspath(out_dir),
        save_every=max(1, steps // 10),
    )
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**settings)


def default_epochs(linear: bool) -> float:
    """Passes when neither steps nor epochs are given: 30, or 50 for a linear probe."""
    return LINEAR_EPOCHS if linear else FULL_EPOCHS


def default_steps(
    linear: bool, clips: int, batch_size: int, world_size: int = 1, epochs: float | None = None
) -> int:
    """Updates when no step count is given: `epochs` passes (default 30, or 50 for a linear probe).

    A linear probe with the default epochs runs at least LINEAR_MIN_STEPS updates: on a set of a few
    thousand clips, 50 epochs at lr 1e-3 leave the head far from converged (FSDD: 46 % test accuracy
    where a converged probe of the same features reaches 72 %), and an update costs about a millisecond.
    """
    steps = steps_for_epochs(
        epochs or (LINEAR_EPOCHS if linear else FULL_EPOCHS), clips, batch_size, world_size
    )
    return max(steps, LINEAR_MIN_STEPS) if linear and epochs is None else steps


def steps_for_epochs(epochs: float, clips: int, batch_size: int, world_size: int = 1) -> int:
    """Updates in `epochs` passes over `clips` with `batch_size` clips per rank (at least one)."""
    per_epoch = clips // world_size // batch_size
    if per_epoch == 0:
        raise FinetuneError(f"{clips} clips too few for batches of {batch_size} on {world_size} rank(s)")
    return max(1, round(epochs * per_epoch))


def clip_id(example: Example) -> str:
    """A clip's name in split.json: its path as listed, with `@offset` for part of a file."""
    return example.path if example.offset is None else f"{example.path}@{example.offset:g}"


def split_record(train: LabelledSet, valid: LabelledSet, fraction: float, seed: int) -> dict:
    """What RUN/split.json holds: the held-out fraction, its seed and the clips of each part."""
    return {
        "valid_fraction": fraction,
        "seed": seed,
        "train": [clip_id(e) for e in train.examples],
        "valid": [clip_id(e) for e in valid.examples],
    }


def apply_split(data: LabelledSet, record: dict) -> tuple[LabelledSet, LabelledSet]:
    """The training and validation parts of `data` as a saved split.json lists them; an error when the
    data no longer holds every listed clip."""
    by_id = {clip_id(e): e for e in data.examples}
    missing = [c for c in (*record["train"], *record["valid"]) if c not in by_id]
    if missing:
        raise FinetuneError(
            f"{len(missing)} clip(s) of the saved split are not in --data (e.g. {missing[0]})"
        )
    train = [by_id[c] for c in record["train"]]
    valid = [by_id[c] for c in record["valid"]]
    return replace(data, examples=train), replace(data, examples=valid)


def read_split(out_dir: str | os.PathLike) -> dict | None:
    """out_dir/split.json, or None when the run has none."""
    path = os.path.join(out_dir, "split.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise FinetuneError(f"{path}: cannot read the saved split ({e})") from None


def finetune(
    task: ClassifierTask,
    train_config: TrainConfig,
    resume: bool = False,
    stop_at: int | None = None,
    overwrite: bool = False,
    data: dict | None = None,
    split: dict | None = None,
    settings: dict | None = None,
) -> dict:
    """Run the shared trainer on `task` (fine-tuning or a linear probe), recording the data and task
    settings in config.json.

    data: where the clips came from (paths as given), recorded in config.json; split: a
    `split_record`, saved as RUN/split.json so that the run can be repeated and resumed on it; settings:
    the command's settings as given (`finetune_run.FinetuneSettings`), recorded in config.json so that
    `--config RUN/config.json` repeats the run."""
    train_config.batch_size = task.config.batch_size
    train_config.best_metric = task.best_metric
    meta = {
        "task": task.kind,
        "finetune": {**asdict(task.config), "norm": list(task.norm)},
        "init": task.init,
        "init_checkpoint": task.source,
        "classes": len(task.classes),
        "multilabel": task.multilabel,
        "train_clips": len(task.train_set),
        "valid_clips": len(task.valid_set) if task.valid_set is not None else 0,
        "augment": asdict(task.augment) if task.augment is not None else None,
        "weighted_sampling": task.weighted,
        "data": {**(data or {}), "split": "split.json" if split is not None else None},
    }
    if settings is not None:
        meta["settings"] = settings
    files = {"split.json": json.dumps(split) + "\n"} if split is not None else None
    return train(
        task, train_config, resume=resume, stop_at=stop_at, meta=meta, overwrite=overwrite, files=files
    )


__all__ = [
    "FinetuneError",
    "FinetuneConfig",
    "ClassifierTask",
    "FinetuneTask",
    "build_classifier",
    "classification_loss",
    "augment_config",
    "finetune",
    "apply_split",
    "clip_id",
    "read_split",
    "split_record",
    "recipe",
    "resolve_norm",
    "scores_report",
    "steps_for_epochs",
    "default_epochs",
    "default_steps",
]
