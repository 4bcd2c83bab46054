"""Fine-tuning and linear probing of a classifier on a labelled audio set, through the shared trainer.

`FinetuneTask` follows the task contract of `trainer`: it owns the Classifier (initialised from
a pre-trained or fine-tuned checkpoint, or at random for baselines), the labelled batches, the
augmentation (mixup, SpecAugment, roll; `sslam_core.data.augment`), the loss (BCE with logits for multi-label,
label-smoothed cross-entropy for multi-class), the validation metric (mAP or accuracy) and the export
`sslam tag` / `sslam extract` load. With `linear=True` the encoder is frozen and its pooled features
are computed once, so each epoch only trains fc_norm + head, on features standardised with the training
set's statistics (folded into the head at export, so the result is still fc_norm + Linear).

Spec §5 recipe as defaults: layer-wise lr decay 0.65, drop-path 0.1, Adam (0.9, 0.95), weight decay 0.05,
cosine schedule to 1e-6 after a 10 % warm-up; mixup and weighted sampling for multi-label data; label
smoothing 0.1 and no mixup for multi-class data; linear probes at lr 1e-3 for 50 epochs (at least
20,000 updates).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sslam_core.audio.constants import NORMALIZATION
from sslam_core.data.augment import AugmentConfig, WeightedEpochs, augment, sample_weights
from sslam_core.data.datasets import Example, LabelledSet
from sslam_core.data.training_clips import AudioBatches, WaveformDataset, shard_indices
from sslam_core.errors import SslamError
from sslam_core.evaluation.metrics import multiclass_report, multilabel_report
from sslam_core.models.checkpoint import Checkpoint
from sslam_core.models.layouts.native import save_checkpoint
from sslam_core.models.loading import read_checkpoint
from sslam_core.models.transformer import Classifier, ModelConfig
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
    linear: bool = False  # frozen encoder, train fc_norm + head on cached pooled features
    pool: str | None = None  # "cls" or "mean" (of the patch tokens); None: the checkpoint's, else "cls"
    drop_path: float = 0.1
    mixup: bool | None = None  # None: on for multi-label, off for multi-class (ESC-50 recipe)
    mixup_alpha: float = 0.8
    mixup_prob: float = 0.9
    specaugment: bool = True
    roll: bool = True
    label_smoothing: float = 0.1  # multi-class only
    weighted_sampling: bool | None = None  # None: on for multi-label
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


def feature_statistics(features: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and std of layer-normalised (no affine) probe features.

    The linear probe standardises fc_norm's output with them before the head (MAE's BatchNorm without
    affine): frozen CLS features can vary across clips by a few percent of their size, which a head
    trained with Adam from a tiny init cannot otherwise resolve. Folded into the head at export.
    """
    z = F.layer_norm(features.float(), features.shape[-1:], eps=eps)
    return z.mean(dim=0), z.std(dim=0).clamp_min(1e-6)


def fold_standardization(weight: Tensor, bias: Tensor, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """head((z - mean) / std) as one Linear on z: W / std and b - (W / std) @ mean."""
    folded = weight / std[None, :]
    return folded, bias - folded @ mean


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


class FinetuneTask:
    """Fine-tuning (or linear probing) of a Classifier on a LabelledSet; see the module docstring."""

    def __init__(
        self,
        train_set: LabelledSet,
        valid_set: LabelledSet | None,
        checkpoint: str | os.PathLike | Checkpoint | None,
        config: FinetuneConfig,
        seed: int = 0,
        model_config: ModelConfig | None = None,
    ):
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
        self.classes = list(train_set.classes)
        self.multilabel = train_set.multilabel
        self.norm = resolve_norm(config.norm, ckpt)
        drop_path = 0.0 if config.linear else config.drop_path
        self.model, self.init = build_classifier(
            ckpt, self.classes, drop_path, seed, model_config, config.pool
        )
        self.source = ckpt.source if ckpt is not None else "random"
        self.best_metric = "mAP" if self.multilabel else "accuracy"
        mix = self.multilabel if config.mixup is None else config.mixup
        self.augment = AugmentConfig(
            mix, config.mixup_alpha, config.mixup_prob, config.specaugment, roll=config.roll
        )
        self.weighted = self.multilabel if config.weighted_sampling is None else config.weighted_sampling
        self.find_unused_parameters = False
        self.constant_state: tuple[str, ...] = ()
        if config.linear:
            for p in self.model.encoder.parameters():
                p.requires_grad_(False)
            self.constant_state = ("encoder.",)
        self._batches: AudioBatches | None = None
        self._features: dict[str, tuple[Tensor, Tensor]] = {}
        self._standardize: tuple[Tensor, Tensor] | None = None

    # -- data ------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def batches_per_epoch(self, world_size: int = 1) -> int:
        return len(self.train_set) // world_size // self.config.batch_size

    def _audio_batches(self) -> AudioBatches:
        if self._batches is None:
            paths = [e.path for e in self.train_set.examples]
            dataset = WaveformDataset(paths, self.config.target_length, True, _target_rows(self.train_set))
            if self.weighted:
                dataset = WeightedEpochs(dataset, sample_weights(self.train_set.targets()))
            self._batches = AudioBatches(
                dataset,
                self.config.batch_size,
                self.device,
                self.norm,
                self.config.workers,
                shuffle=not self.weighted,
            )
        return self._batches

    def cached_features(self, which: str) -> tuple[Tensor, Tensor]:
        """Frozen-encoder pooled features (N, D) (CLS, or mean patch token) and targets (N, C) of 'train'
        or 'valid', computed once; for files of several windows, the mean over windows."""
        if which not in self._features:
            from sslam_core.inference.embeddings import embed

            data = self.train_set if which == "train" else self.valid_set
            was_training = self.model.training
            self.model.eval()
            mean_pool = self.model.cfg.pool == "mean"
            records = embed(
                self.model.encoder,
                [e.path for e in data.examples],
                granularity="patch" if mean_pool else "clip",
                target_length=self.config.target_length,
                batch_size=self.config.eval_batch_size,
                workers=self.config.workers,
                device=self.device,
                precision=self.config.precision,
                normalization=self.norm,
            )
            feats, keep = [], []
            for i, rec in enumerate(records):
                if rec.error is not None:
                    warnings.warn(f"{rec.error}; left out of the {which} set", stacklevel=2)
                    continue
                feats.append(torch.from_numpy(rec.patch.mean(axis=0) if mean_pool else rec.clip))
                keep.append(i)
            self.model.train(was_training)
            if not feats:
                raise FinetuneError(f"no readable audio in the {which} set")
            targets = torch.from_numpy(data.targets()[keep])
            self._features[which] = (torch.stack(feats).to(self.device), targets.to(self.device))
            if which == "train":
                self._standardize = feature_statistics(self._features["train"][0], self.model.fc_norm.eps)
        return self._features[which]

    def probe_statistics(self) -> tuple[Tensor, Tensor]:
        """Mean and std that standardise the probe's input, from the training features (cached)."""
        if self._standardize is None:
            self.cached_features("train")
        return self._standardize

    def probe_logits(self, features: Tensor) -> Tensor:
        """Linear probe: head(standardise(fc_norm(features))), the statistics from the training features."""
        mean, std = self.probe_statistics()
        return self.model.head((self.model.fc_norm(features) - mean) / std)

    def batches(self, epoch_seed: int, rank: int, world_size: int, start_position: int) -> Iterator[dict]:
        """Audio batches (full fine-tuning) or batches of cached CLS features (linear probe)."""
        if not self.config.linear:
            yield from self._audio_batches()(epoch_seed, rank, world_size, start_position)
            return
        feats, targets = self.cached_features("train")
        if self.weighted:
            from sslam_core.data.augment import weighted_draw

            drawn = weighted_draw(sample_weights(targets.cpu().numpy()), len(feats), epoch_seed)
            per_rank = len(drawn) // world_size
            order = drawn[rank * per_rank : (rank + 1) * per_rank].tolist()
        else:
            order = shard_indices(len(feats), epoch_seed, rank, world_size)
        size = self.config.batch_size
        if len(order) < size:
            raise FinetuneError(f"{len(feats)} clips too few for batches of {size} on {world_size} rank(s)")
        for b in range(start_position, len(order) // size):
            index = torch.tensor(order[b * size : (b + 1) * size], device=feats.device)
            yield {"features": feats[index], "label": targets[index], "index": index}

    # -- training --------------------------------------------------------------------------------------

    def loss(self, batch: dict, generator: torch.Generator) -> dict:
        target = batch["label"].float()
        if self.config.linear:
            logits = self.probe_logits(batch["features"])
        else:
            source, target = augment(batch["source"], target, generator, self.augment)
            logits = self.model(source)
        smoothing = 0.0 if self.multilabel else self.config.label_smoothing
        return {"loss": classification_loss(logits, target, self.multilabel, smoothing)}

    def predict(self, data: LabelledSet) -> tuple[np.ndarray, np.ndarray]:
        """Scores (N, C) and targets (N, C) of the readable clips of `data` (windowing as `sslam tag`)."""
        from sslam_core.inference.tagging import tag

        self.model.eval()
        results = tag(
            self.model,
            [e.path for e in data.examples],
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
        return np.stack(scores), data.targets()[keep]

    def validation_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """Scores (N, C) and targets (N, C) of the validation set: cached features through the probe,
        or windowed like `sslam tag` after full fine-tuning."""
        if not self.config.linear:
            return self.predict(self.valid_set)
        self.model.eval()
        feats, targets = self.cached_features("valid")
        with torch.no_grad():
            logits = self.probe_logits(feats).float()
        probs = logits.sigmoid() if self.multilabel else logits.softmax(dim=-1)
        return probs.cpu().numpy(), targets.cpu().numpy()

    def evaluate(self) -> dict:
        """Validation mAP / accuracy of the current weights ({} without a validation set)."""
        if self.valid_set is None:
            return {}
        return scores_report(*self.validation_scores(), self.multilabel)

    def export(self, path: str | os.PathLike) -> None:
        """Our checkpoint format with the dataset's labels, normalisation and task settings."""
        extra = {
            "multilabel": self.multilabel,
            "target_length": self.config.target_length,
            "linear": self.config.linear,
            "init": self.init,
            "init_checkpoint": self.source,
        }
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        if self.config.linear:
            mean, std = (t.detach().cpu() for t in self.probe_statistics())
            state["head.weight"], state["head.bias"] = fold_standardization(
                state["head.weight"], state["head.bias"], mean, std
            )
        save_checkpoint(
            path, self.model.cfg, state, labels=self.classes, normalization=self.norm, extra=extra
        )


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
    task: FinetuneTask,
    train_config: TrainConfig,
    resume: bool = False,
    stop_at: int | None = None,
    overwrite: bool = False,
    data: dict | None = None,
    split: dict | None = None,
) -> dict:
    """Run the shared trainer on `task`, recording the data and task settings in config.json.

    data: where the clips came from (paths as given), recorded in config.json; split: a
    `split_record`, saved as RUN/split.json so that the run can be repeated and resumed on it."""
    train_config.batch_size = task.config.batch_size
    train_config.best_metric = task.best_metric
    meta = {
        "task": "linear" if task.config.linear else "finetune",
        "finetune": {**asdict(task.config), "norm": list(task.norm)},
        "init": task.init,
        "init_checkpoint": task.source,
        "classes": len(task.classes),
        "multilabel": task.multilabel,
        "train_clips": len(task.train_set),
        "valid_clips": len(task.valid_set) if task.valid_set is not None else 0,
        "augment": asdict(task.augment) if not task.config.linear else None,
        "weighted_sampling": task.weighted,
        "data": {**(data or {}), "split": "split.json" if split is not None else None},
    }
    files = {"split.json": json.dumps(split) + "\n"} if split is not None else None
    return train(
        task, train_config, resume=resume, stop_at=stop_at, meta=meta, overwrite=overwrite, files=files
    )


__all__ = [
    "FinetuneError",
    "FinetuneConfig",
    "FinetuneTask",
    "build_classifier",
    "classification_loss",
    "feature_statistics",
    "fold_standardization",
    "finetune",
    "apply_split",
    "clip_id",
    "read_split",
    "split_record",
    "recipe",
    "resolve_norm",
    "scores_report",
    "steps_for_epochs",
    "default_steps",
]
