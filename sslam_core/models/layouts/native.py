"""Our layout: one `.safetensors` file (teacher./decoder. prefixes for pre-training state) whose
header key "sslam" holds the config, labels, normalisation and `extra` as JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import Tensor

from sslam_core.models.checkpoint import (
    Checkpoint,
    CheckpointError,
    metadata,
    parse_metadata,
    save_tensors,
    to_fp32,
)
from sslam_core.models.transformer import ModelConfig


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).strip()[:200]})") from None


def safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).strip()[:200]})") from None


def read_native(path: Path) -> Checkpoint:
    tensors, metadata = read_safetensors(path)
    try:
        meta = json.loads(metadata["sslam"])
        config = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: missing or invalid 'sslam' metadata ({e})") from None
    where = str(path)
    teacher = {k[len("teacher.") :]: v for k, v in tensors.items() if k.startswith("teacher.")}
    decoder = {k[len("decoder.") :]: v for k, v in tensors.items() if k.startswith("decoder.")}
    state = {k: v for k, v in tensors.items() if not k.startswith(("teacher.", "decoder."))}
    labels, norm, extra = parse_metadata(meta, where)
    return Checkpoint(
        config,
        to_fp32(state, where),
        teacher=to_fp32(teacher, where) or None,
        decoder=to_fp32(decoder, where) or None,
        labels=labels,
        normalization=norm,
        extra=extra,
        layout="sslam",
    )


def save_checkpoint(
    path: str | os.PathLike,
    config: ModelConfig,
    state: dict[str, Tensor],
    teacher: dict[str, Tensor] | None = None,
    decoder: dict[str, Tensor] | None = None,
    labels: list[tuple[str, str]] | None = None,
    normalization: tuple[float, float] | None = None,
    extra: dict | None = None,
) -> None:
    """Write our single-file format: fp32 safetensors (teacher./decoder. prefixes) + JSON metadata."""
    tensors = dict(state)
    tensors.update({"teacher." + k: v for k, v in (teacher or {}).items()})
    tensors.update({"decoder." + k: v for k, v in (decoder or {}).items()})
    ckpt = Checkpoint(config, state, labels=labels, normalization=normalization, extra=extra or {})
    save_tensors(Path(path), tensors, {"sslam": json.dumps(metadata(ckpt)), "format": "pt"})
