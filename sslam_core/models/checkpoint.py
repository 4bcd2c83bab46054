"""A checkpoint in memory, whatever file it came from, and what every layout shares.

Every layout (`models.layouts`: the official fairseq `.pt`, Hugging Face folders, ours) is read into
one `Checkpoint`: a `ModelConfig` derived from the tensor shapes and
fp32 weights under our module names, plus the EMA teacher, the pre-training decoder and the class
names when the file has them. Our own format is a single `.safetensors` file whose header metadata
key "sslam" holds the config, labels, normalisation and `extra` (target_length, multilabel, ...) as
JSON. Written fairseq containers and HF `config.json` files carry the same block under a "sslam" key,
so that no layout loses them; files without it (official releases) get the defaults.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from sslam_core.audio.constants import NORMALIZATION
from sslam_core.data.labels import AUDIOSET_CLASSES, audioset_labels, labels_from_mids
from sslam_core.errors import SslamError
from sslam_core.models.transformer import ModelConfig, build_model
from sslam_core.runs.outputs import atomic_write

FORMAT_VERSION = 1
AUDIOSET_NORM = NORMALIZATION["audioset"]  # what a file without a recorded normalisation gets

HEAD = ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")


class CheckpointError(SslamError, ValueError):
    """A checkpoint that cannot be found, read or understood; the message names the file."""


@dataclass
class Checkpoint:
    """A model's weights (our names, fp32) with everything needed to rebuild and describe it."""

    config: ModelConfig
    state: dict[str, Tensor]
    teacher: dict[str, Tensor] | None = None
    decoder: dict[str, Tensor] | None = None
    labels: list[tuple[str, str]] | None = None
    normalization: tuple[float, float] | None = None
    source: str = ""
    sha256: str = ""
    layout: str = "sslam"
    extra: dict = field(default_factory=dict)

    @property
    def info(self) -> dict[str, str]:
        return {"source": self.source, "sha256": self.sha256, "layout": self.layout}


def rename_in(tensors: dict[str, Tensor], stem: dict[str, str], blocks: str) -> dict[str, Tensor]:
    """External encoder names -> ours (tensors outside the encoder are ignored)."""
    ours = {theirs: mine for mine, theirs in stem.items()}
    out = {}
    for name, t in tensors.items():
        if name in ours:
            out[ours[name]] = t
        elif name.startswith(blocks + "blocks."):
            out[name[len(blocks) :]] = t
    return out


def rename_out(encoder: dict[str, Tensor], stem: dict[str, str], blocks: str) -> dict[str, Tensor]:
    """Our encoder names -> external ones."""
    return {stem.get(name, blocks + name): t for name, t in encoder.items()}


def split_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Our model state -> (encoder tensors, head tensors) for both Encoder and Classifier states."""
    if any(k.startswith("encoder.") for k in state):
        encoder = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
        return encoder, {k: v for k, v in state.items() if k in HEAD}
    return dict(state), {}


def to_fp32(tensors: dict[str, Any], where: str) -> dict[str, Tensor]:
    """Detached, contiguous float32 tensors (fp16 training checkpoints are upcast; fp32 ones are not
    copied, so a ViT-B does not need twice its size in memory while loading)."""
    out = {}
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise CheckpointError(f"{where}: entry {name!r} is {type(t).__name__}, not a tensor")
        out[name] = t.detach().to(torch.float32).contiguous()
    return out


def config_from_state(state: dict[str, Tensor], num_heads: int | None, norm_eps: float | None) -> ModelConfig:
    """A ModelConfig read off the tensor shapes (depth, widths, table length, classes)."""
    encoder, head = split_state(state)
    try:
        dim = encoder["cls_token"].shape[-1]
        patch = encoder["patch_embed.weight"].shape[-1]
        depth = sum(1 for k in encoder if k.startswith("blocks.") and k.endswith(".norm1.weight"))
        hidden = encoder["blocks.0.mlp.fc1.weight"].shape[0]
        rows = encoder["pos_embed"].shape[1] // (ModelConfig.mel_bins // patch)
    except KeyError as e:
        raise CheckpointError(f"encoder tensor {e.args[0]!r} is missing") from None
    return ModelConfig(
        embed_dim=dim,
        depth=depth,
        num_heads=int(num_heads or max(dim // 64, 1)),
        mlp_ratio=hidden / dim,
        patch_size=patch,
        max_length=rows,
        norm_eps=float(norm_eps if norm_eps is not None else 1e-6),
        qkv_bias="blocks.0.attn.qkv.bias" in encoder,
        num_classes=head["head.weight"].shape[0] if "head.weight" in head else 0,
    )


def check_state(cfg: ModelConfig, state: dict[str, Tensor], what: str, where: str) -> None:
    """Names and shapes must match `build_model(cfg)` exactly."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        problems = [f"missing {', '.join(missing[:4])}"] if missing else []
        problems += [f"unexpected {', '.join(unexpected[:4])}"] if unexpected else []
        raise CheckpointError(f"{where}: {what} weights do not fit the model ({'; '.join(problems)})")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise CheckpointError(
                f"{where}: {what} tensor {k} has shape {tuple(state[k].shape)}, expected {shape}"
            )


def finish(ckpt: Checkpoint, teacher: bool) -> Checkpoint:
    """Validate the weights; with `teacher`, make the EMA teacher the checkpoint's model."""
    check_state(ckpt.config, ckpt.state, "model", ckpt.source)
    if ckpt.teacher is not None:
        check_state(replace(ckpt.config, num_classes=0), ckpt.teacher, "teacher", ckpt.source)
    if not teacher:
        return ckpt
    if ckpt.teacher is None:
        raise CheckpointError(f"{ckpt.source}: has no EMA teacher weights (only pre-training checkpoints do)")
    extra = {**ckpt.extra, "weights": "ema_teacher"}
    return replace(ckpt, state=ckpt.teacher, teacher=None, decoder=None, extra=extra)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def jsonable(value: Any) -> Any:
    """Plain JSON types only (metadata from pickles may hold placeholders)."""
    return json.loads(json.dumps(value, default=lambda o: None))


# ModelConfig fields that neither the tensor shapes nor the fairseq / HF configs record.
UNRECORDED = ("drop_path",)


def metadata(ckpt: Checkpoint, derived: tuple[str, ...] = ()) -> dict:
    """Config, labels, normalisation and extra metadata as plain JSON types (the "sslam" block of
    every layout)."""
    return {
        "format_version": FORMAT_VERSION,
        "config": ckpt.config.to_dict(),
        "labels": [list(pair) for pair in ckpt.labels] if ckpt.labels else None,
        "normalization": list(ckpt.normalization) if ckpt.normalization else None,
        "extra": jsonable({k: v for k, v in ckpt.extra.items() if k not in derived}),
    }


def parse_metadata(
    meta: Any, where: str
) -> tuple[list[tuple[str, str]] | None, tuple[float, float] | None, dict]:
    """(labels, normalization, extra) from a "sslam" block written by `metadata`."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: the 'sslam' metadata is not a JSON object")
    try:
        labels = meta.get("labels")
        norm = meta.get("normalization")
        extra = meta.get("extra") or {}
        return (
            [(str(a), str(b)) for a, b in labels] if labels else None,
            (float(norm[0]), float(norm[1])) if norm else None,
            dict(extra),
        )
    except (TypeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{where}: invalid 'sslam' metadata ({e})") from None


def with_metadata(ckpt: Checkpoint, meta: Any, where: str) -> Checkpoint:
    """`ckpt` with the labels, normalisation and extra of a "sslam" block (if the file has one); what
    the layout itself records (its config sections, update count) wins over the block's extra."""
    if meta is None:
        return ckpt
    labels, norm, extra = parse_metadata(meta, where)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    try:
        unrecorded = {k: float(config[k]) for k in UNRECORDED if k in config}
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid 'sslam' metadata ({e})") from None
    return replace(
        ckpt,
        config=replace(ckpt.config, **unrecorded),
        labels=labels or ckpt.labels,
        normalization=norm or ckpt.normalization,
        extra={**extra, **ckpt.extra},
    )


def labels_for(num_classes: int, mids: Any = None) -> list[tuple[str, str]] | None:
    if isinstance(mids, dict) and len(mids) == num_classes > 0:
        try:
            return labels_from_mids(mids)
        except (TypeError, ValueError):
            pass
    return audioset_labels() if num_classes == AUDIOSET_CLASSES else None


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    owned = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(owned, tmp, metadata=metadata))


__all__ = [
    "AUDIOSET_NORM",
    "FORMAT_VERSION",
    "HEAD",
    "Checkpoint",
    "CheckpointError",
    "check_state",
    "config_from_state",
    "finish",
    "labels_for",
    "metadata",
    "parse_metadata",
    "rename_in",
    "rename_out",
    "save_tensors",
    "sha256_file",
    "split_state",
    "to_fp32",
    "with_metadata",
]
