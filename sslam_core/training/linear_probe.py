"""Linear probes: a classifier head trained on a frozen encoder's pooled features, through the shared trainer.

Two protocols, named for what they do. `AugmentedLinearProbeTask` is the official linear evaluation
(SSLAM's SPASS runs): the frozen encoder runs on every augmented training batch (roll, mixup, SpecAugment,
its drop-path active as in training) and only fc_norm + head learn. `LinearProbeTask`, the fast probe,
freezes the encoder and computes its pooled features (CLS token, or the mean patch token)
of the training and validation sets once, so each epoch only trains fc_norm + head on cached features.
As in MAE's linear probes, the head sees fc_norm's output standardised with the training set's
statistics; the standardisation is folded into the head at export, so the result is still fc_norm +
Linear. What it shares with full fine-tuning (data checks, loss, validation metric, export) is
`finetuning.ClassifierTask`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sslam_core.data.augment import augment
from sslam_core.data.datasets import LabelledSet
from sslam_core.data.training_clips import shard_indices
from sslam_core.models.checkpoint import Checkpoint
from sslam_core.models.transformer import Classifier, ModelConfig
from sslam_core.training.finetuning import (
    ClassifierTask,
    FinetuneConfig,
    FinetuneError,
    FinetuneTask,
    build_classifier,
)


def freeze_encoder(model: Classifier) -> Classifier:
    """`model` with its encoder's weights frozen: a linear probe trains fc_norm + head only."""
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    return model


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


class LinearProbeTask(ClassifierTask):
    """A linear probe of a Classifier's frozen encoder on a LabelledSet; see the module docstring.

    Takes a FinetuneConfig with linear=True; its augmentation settings and drop-path do not apply (the
    encoder runs once, in eval mode). state.pt holds the head, not the encoder (`constant_state`).
    """

    kind, linear = "linear", True
    constant_state = ("encoder.",)

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
        self._features: dict[str, tuple[Tensor, Tensor]] = {}
        self._kept: dict[str, np.ndarray] = {}  # the readable clips' indices in each set
        self._standardize: tuple[Tensor, Tensor] | None = None

    def build_model(
        self, checkpoint: Checkpoint | None, seed: int, model_config: ModelConfig | None
    ) -> tuple[Classifier, str]:
        """The Classifier without drop-path, its encoder frozen."""
        model, init = build_classifier(checkpoint, self.classes, 0.0, seed, model_config, self.config.pool)
        return freeze_encoder(model), init

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
                [e.source for e in data.examples],  # tar members and their problems too
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
                    self.skip(data.examples[i].path, rec.error)
                    continue
                feats.append(torch.from_numpy(rec.patch.mean(axis=0) if mean_pool else rec.clip))
                keep.append(i)
            self.model.train(was_training)
            if not feats:
                raise FinetuneError(f"no readable audio in the {which} set")
            targets = torch.from_numpy(data.targets()[keep])
            self._features[which] = (torch.stack(feats).to(self.device), targets.to(self.device))
            self._kept[which] = np.array(keep, dtype=np.int64)
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
        """Batches of cached pooled features: this rank's share of a seeded shuffle, or of weighted draws."""
        feats, targets = self.cached_features("train")
        if self.weighted:
            from sslam_core.data.augment import weighted_draw

            weights = self.sampling_weights()[self._kept["train"]]  # of the readable clips
            if self.config.clips_per_epoch is None:
                drawn = weighted_draw(weights, len(feats), epoch_seed)
            else:
                n = min(self.config.clips_per_epoch, int((weights > 0).sum()))
                drawn = weighted_draw(weights, n, epoch_seed, replace=False)
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

    def logits_and_targets(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The probe on the batch's cached features (no augmentation)."""
        return self.probe_logits(batch["features"]), batch["label"].float()

    def validation_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """The validation set's cached features through the probe: probabilities and targets."""
        self.model.eval()
        feats, targets = self.cached_features("valid")
        with torch.no_grad():
            logits = self.probe_logits(feats).float()
        probs = logits.sigmoid() if self.multilabel else logits.softmax(dim=-1)
        return probs.cpu().numpy(), targets.cpu().numpy()

    def exported_state(self) -> dict[str, Tensor]:
        """The weights with the standardisation folded into the head: an ordinary fc_norm + Linear."""
        state = super().exported_state()
        mean, std = (t.detach().cpu() for t in self.probe_statistics())
        state["head.weight"], state["head.bias"] = fold_standardization(
            state["head.weight"], state["head.bias"], mean, std
        )
        return state


class AugmentedLinearProbeTask(FinetuneTask):
    """The official linear evaluation: fc_norm + head trained on the frozen encoder's output for every
    augmented batch, as full fine-tuning's batches (waveform roll, noise, mixup, SpecAugment) and with the
    encoder in training mode (drop-path on) but without gradients. Costs an encoder forward per step, where
    `LinearProbeTask` computes the features once; state.pt holds the head (`constant_state`)."""

    kind, linear = "linear-augmented", True
    constant_state = ("encoder.",)

    def build_model(
        self, checkpoint: Checkpoint | None, seed: int, model_config: ModelConfig | None
    ) -> tuple[Classifier, str]:
        """The Classifier with the configured drop-path, its encoder frozen."""
        model, init = build_classifier(
            checkpoint, self.classes, self.config.drop_path, seed, model_config, self.config.pool
        )
        return freeze_encoder(model), init

    def logits_and_targets(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The augmented batch through the frozen encoder (no gradients), then fc_norm + head."""
        source, target = augment(batch["source"], batch["label"].float(), generator, self.augment)
        with torch.no_grad():
            features = self.model.encoder(source)
        return self.model.classify(features), target


__all__ = [
    "LinearProbeTask",
    "AugmentedLinearProbeTask",
    "feature_statistics",
    "fold_standardization",
    "freeze_encoder",
]
