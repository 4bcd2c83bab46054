"""What the shared trainer optimises: a `TrainingTask` owns the model, the data and the loss.

A task must give `model`, `batches`, `loss` and `export`; the other members have defaults that suit a task
without an evaluation, an EMA teacher or frozen weights, and a task overrides the ones it needs
(`PretrainTask`: `after_step`, `schedule`; the fine-tuning tasks: `evaluate`; the linear probe:
`constant_state`). The trainer calls every member directly, so a task derives from this class.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class TrainingTask(ABC):
    """Model, batches, loss and export for `trainer.train`, plus optional members with documented defaults.

    model: the nn.Module whose trainable parameters are optimised (a task sets it in `__init__`).
    """

    model: nn.Module

    generator_device: str | torch.device = "cpu"
    """Device of the generator `loss` draws its randomness from (masks, mixing, augmentation)."""

    find_unused_parameters: bool = False
    """For DDP, when some trainable parameters get no gradient in a step."""

    constant_state: tuple[str, ...] = ()
    """State-dict key prefixes the task rebuilds identically on resume (a probe's frozen encoder), so
    state.pt leaves them out."""

    @abstractmethod
    def batches(self, epoch_seed: int, rank: int, world_size: int, start_position: int) -> Iterator[Any]:
        """One epoch's ready batches for this rank, skipping the first `start_position` (exact resume)."""

    @abstractmethod
    def loss(self, batch: Any, generator: torch.Generator) -> dict:
        """A scalar 'loss' to minimise, plus named scalar terms to log."""

    @abstractmethod
    def export(self, path: str | os.PathLike) -> None:
        """Write the model checkpoint other commands load."""

    def after_step(self, step: int) -> dict | None:
        """Called after each update (`step` counts them; an EMA teacher follows here); values to log."""
        return None

    def evaluate(self) -> dict | None:
        """Scores of the current weights, at every save (the trainer's `best_metric` picks the best);
        None: the task has no evaluation (nothing is logged)."""
        return None

    @property
    def schedule(self) -> dict:
        """Settings that shape the trajectory besides the trainer's (an EMA anneal), saved in state.pt so
        that a resumed run says when they changed."""
        return {}


__all__ = ["TrainingTask"]
