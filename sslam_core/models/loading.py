"""Reading and writing checkpoints whatever their layout: which layout a path holds, hub ids, and
the dispatch to each layout's reader and writer."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from sslam_core.models.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_state,
    finish,
    save_tensors,
    sha256_file,
)
from sslam_core.models.hub import HubUnavailable, looks_like_hub_id, snapshot
from sslam_core.models.layouts.fairseq import fairseq_container, read_fairseq
from sslam_core.models.layouts.huggingface import hf_config, hf_tensors, read_hf
from sslam_core.models.layouts.native import read_native, safetensors_metadata, save_checkpoint
from sslam_core.models.transformer import build_model
from sslam_core.runs.outputs import atomic_write, torch_save

LAYOUTS = ("sslam", "hf", "fairseq")


def resolve(path_or_id: str | os.PathLike, cache_dir: str | Path | None = None) -> Path:
    """A local file or folder for a path or a Hugging Face Hub id (downloaded or from the cache)."""
    text = str(path_or_id)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if looks_like_hub_id(text):
        try:
            return snapshot(text, cache_dir)
        except HubUnavailable as e:
            raise CheckpointError(str(e)) from None
    raise CheckpointError(f"{text}: no such file or folder (and not a Hugging Face Hub id 'owner/name')")


def reader_for(path: Path) -> tuple[Callable[[Path], Checkpoint], Path]:
    """Which layout a path holds, and the file whose hash identifies it."""
    if path.is_dir():
        weights = path / "model.safetensors"
        if weights.is_file() and "sslam" in safetensors_metadata(weights):
            return read_native, weights
        if weights.is_file() and (path / "config.json").is_file():
            return (lambda _: read_hf(path)), weights
        raise CheckpointError(
            f"{path}: folder has neither our model.safetensors nor config.json + model.safetensors"
        )
    if path.suffix == ".safetensors":
        if "sslam" in safetensors_metadata(path):
            return read_native, path
        raise CheckpointError(
            f"{path}: safetensors file without 'sslam' metadata (for HF weights pass the folder)"
        )
    return read_fairseq, path


def read_checkpoint(
    path_or_id: str | os.PathLike,
    teacher: bool = False,
    cache_dir: str | Path | None = None,
    allow_onnx: bool = False,
) -> Checkpoint:
    """Read any supported checkpoint; `teacher=True` returns the EMA teacher as the model weights.
    `allow_onnx`: also an `sslam export` file, as a weightless Checkpoint of layout "onnx" (only
    `model_from_checkpoint` can use it; without the flag it is refused)."""
    path = resolve(path_or_id, cache_dir)
    if path.suffix.lower() == ".onnx" and path.is_file():
        if not allow_onnx:
            raise CheckpointError(
                f"{path}: an ONNX export holds no torch weights (it runs in tag, extract and eval); "
                "use the checkpoint it was exported from"
            )
        from sslam_core.models.onnx_runtime import read_onnx

        ckpt = read_onnx(path, teacher)
        ckpt.source, ckpt.sha256 = str(path.resolve()), sha256_file(path)
        return ckpt
    read, weights_file = reader_for(path)
    ckpt = read(weights_file)
    ckpt.source = str(path.resolve())
    ckpt.sha256 = sha256_file(weights_file)
    return finish(ckpt, teacher)


def write_checkpoint(ckpt: Checkpoint, path: str | os.PathLike, layout: str) -> Path:
    """Write `ckpt` as "sslam" (one .safetensors), "hf" (folder) or "fairseq" (.pt); returns the path.

    Every layout keeps the labels, normalisation and `extra` metadata (target_length, multilabel, ...).
    The HF layout has no place for the EMA teacher or the pre-training decoder; they are left out.
    Each file is written through a rename; an OSError (full disk, ...) is an `outputs.OutputError`.
    """
    path = Path(path)
    if ckpt.layout == "onnx":
        raise CheckpointError(f"{ckpt.source}: an ONNX export holds a graph, not weights; convert its source")
    if layout == "sslam":
        save_checkpoint(
            path,
            ckpt.config,
            ckpt.state,
            ckpt.teacher,
            ckpt.decoder,
            ckpt.labels,
            ckpt.normalization,
            ckpt.extra,
        )
    elif layout == "hf":
        text = json.dumps(hf_config(ckpt), indent=2) + "\n"
        save_tensors(path / "model.safetensors", hf_tensors(ckpt), {"format": "pt"})
        atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(text))
    elif layout == "fairseq":
        container = fairseq_container(ckpt)
        atomic_write(path, lambda tmp: torch_save(container, tmp))
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint layout {layout!r} (choose from {', '.join(LAYOUTS)})"
        )
    return path


def torch_model(ckpt: Checkpoint, device: str | torch.device = "cpu") -> nn.Module:
    """The eval-mode Encoder / Classifier of a checkpoint with torch weights, carrying `.labels`,
    `.normalization`, `.checkpoint_info`, `.multilabel` and `.target_length` (see `factory.load_model`)."""
    check_state(ckpt.config, ckpt.state, "model", ckpt.source)
    with torch.device("meta"):
        model = build_model(ckpt.config)
    model.load_state_dict(ckpt.state, strict=True, assign=True)
    model = model.to(device).eval()
    model.labels = ckpt.labels
    model.normalization = ckpt.normalization
    model.checkpoint_info = ckpt.info
    model.multilabel = bool(ckpt.extra.get("multilabel", True))  # fine-tuned heads record it
    length = ckpt.extra.get("target_length")
    model.target_length = length if isinstance(length, int) and length > 0 else None
    return model
