"""The loading factory (as timm's `create_model` sits over its builder and hub): a checkpoint path,
folder or hub id in, a ready model out: the torch Encoder / Classifier, an ONNX Runtime model for an
`.onnx` export, or the cached int8 model."""

from __future__ import annotations

import os

import torch
from torch import nn

from sslam_core.models.checkpoint import Checkpoint
from sslam_core.models.loading import read_checkpoint, torch_model


def model_from_checkpoint(
    ckpt: Checkpoint, device: str | torch.device = "cpu", precision: str = "fp32"
) -> nn.Module:
    """Build the Encoder/Classifier for a checkpoint, load its weights and put it in eval mode (for an
    ONNX export, its ONNX Runtime model: `onnx_runtime.onnx_model`). `precision="int8"`: the ONNX
    Runtime int8 model, quantised on first use and cached (`onnx_export.int8_model`)."""
    if precision == "int8":
        from sslam_core.models.onnx_export import int8_model

        return int8_model(ckpt, device)
    if ckpt.layout == "onnx":
        from sslam_core.models.onnx_runtime import onnx_model

        return onnx_model(ckpt, device)
    return torch_model(ckpt, device)


def load_model(
    path_or_id: str | os.PathLike,
    device: str | torch.device = "cpu",
    teacher: bool = False,
    precision: str = "fp32",
) -> nn.Module:
    """An eval-mode Encoder (pre-trained) or Classifier (fine-tuned) with `.labels`, `.normalization`,
    `.multilabel`, `.target_length` (the input length it was trained with, if recorded) and
    `.checkpoint_info` (source, sha256, layout). An `.onnx` export, or `precision="int8"`, gives the
    ONNX Runtime model with the same interface."""
    if precision == "int8":  # a cached int8 model is found from the file's hash, without its weights
        from sslam_core.models.onnx_export import load_int8

        return load_int8(path_or_id, device, teacher)
    return model_from_checkpoint(read_checkpoint(path_or_id, teacher, allow_onnx=True), device, precision)
