"""Read, write and convert SSLAM / EAT checkpoints: official fairseq `.pt`, Hugging Face folders, ours.

Every layout is read into one `Checkpoint`: a `ModelConfig` derived from the tensor shapes and
fp32 weights under our module names, plus the EMA teacher, the pre-training decoder and the class
names when the file has them. Our own format is a single `.safetensors` file whose header metadata
key "sslam" holds the config, labels, normalisation and `extra` (target_length, multilabel, ...) as
JSON. Written fairseq containers and HF `config.json` files carry the same block under a "sslam" key,
so that no layout loses them; files without it (official releases) get the defaults.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from sslam_core.data.labels import AUDIOSET_CLASSES, audioset_labels, labels_from_mids
from sslam_core.models import safe_pickle
from sslam_core.models.hub import DEFAULT_ENCODER, DEFAULT_TAGGER, HubUnavailable, looks_like_hub_id, snapshot
from sslam_core.models.transformer import ModelConfig, build_model
from sslam_core.runs.outputs import atomic_write

FORMAT_VERSION = 1
LAYOUTS = ("sslam", "hf", "fairseq")
AUDIOSET_NORM = (-4.268, 4.569)
_TASK_NORMS = {"esc50_eval": (-6.627, 5.359), "spcv2_eval": (-6.846, 5.565)}

_IMAGE = "modality_encoders.IMAGE."
_DECODER = _IMAGE + "decoder."
# Our encoder names -> fairseq / HF names for everything outside `blocks.*` (which keep their names).
_FAIRSEQ_STEM = {
    "patch_embed.weight": _IMAGE + "local_encoder.proj.weight",
    "patch_embed.bias": _IMAGE + "local_encoder.proj.bias",
    "cls_token": _IMAGE + "extra_tokens",
    "pos_embed": _IMAGE + "fixed_positional_encoder.positions",
    "pre_norm.weight": _IMAGE + "context_encoder.norm.weight",
    "pre_norm.bias": _IMAGE + "context_encoder.norm.bias",
}
_HF_STEM = {
    "patch_embed.weight": "model.local_encoder.proj.weight",
    "patch_embed.bias": "model.local_encoder.proj.bias",
    "cls_token": "model.extra_tokens",
    "pos_embed": "model.fixed_positional_encoder.positions",
    "pre_norm.weight": "model.pre_norm.weight",
    "pre_norm.bias": "model.pre_norm.bias",
}
_HEAD = ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")


class CheckpointError(ValueError):
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


def _rename_in(tensors: dict[str, Tensor], stem: dict[str, str], blocks: str) -> dict[str, Tensor]:
    """External encoder names -> ours (tensors outside the encoder are ignored)."""
    ours = {theirs: mine for mine, theirs in stem.items()}
    out = {}
    for name, t in tensors.items():
        if name in ours:
            out[ours[name]] = t
        elif name.startswith(blocks + "blocks."):
            out[name[len(blocks) :]] = t
    return out


def _rename_out(encoder: dict[str, Tensor], stem: dict[str, str], blocks: str) -> dict[str, Tensor]:
    """Our encoder names -> external ones."""
    return {stem.get(name, blocks + name): t for name, t in encoder.items()}


def _split(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Our model state -> (encoder tensors, head tensors) for both Encoder and Classifier states."""
    if any(k.startswith("encoder.") for k in state):
        encoder = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
        return encoder, {k: v for k, v in state.items() if k in _HEAD}
    return dict(state), {}


def _fp32(tensors: dict[str, Any], where: str) -> dict[str, Tensor]:
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
    encoder, head = _split(state)
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


def _check_state(cfg: ModelConfig, state: dict[str, Tensor], what: str, where: str) -> None:
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


def _finish(ckpt: Checkpoint, teacher: bool) -> Checkpoint:
    """Validate the weights; with `teacher`, make the EMA teacher the checkpoint's model."""
    _check_state(ckpt.config, ckpt.state, "model", ckpt.source)
    if ckpt.teacher is not None:
        _check_state(replace(ckpt.config, num_classes=0), ckpt.teacher, "teacher", ckpt.source)
    if not teacher:
        return ckpt
    if ckpt.teacher is None:
        raise CheckpointError(f"{ckpt.source}: has no EMA teacher weights (only pre-training checkpoints do)")
    extra = {**ckpt.extra, "weights": "ema_teacher"}
    return replace(ckpt, state=ckpt.teacher, teacher=None, decoder=None, extra=extra)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    """Plain JSON types only (metadata from pickles may hold placeholders)."""
    return json.loads(json.dumps(value, default=lambda o: None))


# Keys of `Checkpoint.extra` that a layout derives from its own fields, so its "sslam" block omits them.
_FAIRSEQ_DERIVED = ("fairseq_model_cfg", "fairseq_task_cfg", "num_updates")
_HF_DERIVED = ("hf_config",)
# ModelConfig fields that neither the tensor shapes nor the fairseq / HF configs record.
_UNRECORDED = ("drop_path",)


def _metadata(ckpt: Checkpoint, derived: tuple[str, ...] = ()) -> dict:
    """Config, labels, normalisation and extra metadata as plain JSON types (the "sslam" block of
    every layout)."""
    return {
        "format_version": FORMAT_VERSION,
        "config": ckpt.config.to_dict(),
        "labels": [list(pair) for pair in ckpt.labels] if ckpt.labels else None,
        "normalization": list(ckpt.normalization) if ckpt.normalization else None,
        "extra": _jsonable({k: v for k, v in ckpt.extra.items() if k not in derived}),
    }


def _parse_metadata(
    meta: Any, where: str
) -> tuple[list[tuple[str, str]] | None, tuple[float, float] | None, dict]:
    """(labels, normalization, extra) from a "sslam" block written by `_metadata`."""
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


def _with_metadata(ckpt: Checkpoint, meta: Any, where: str) -> Checkpoint:
    """`ckpt` with the labels, normalisation and extra of a "sslam" block (if the file has one); what
    the layout itself records (its config sections, update count) wins over the block's extra."""
    if meta is None:
        return ckpt
    labels, norm, extra = _parse_metadata(meta, where)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    try:
        unrecorded = {k: float(config[k]) for k in _UNRECORDED if k in config}
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid 'sslam' metadata ({e})") from None
    return replace(
        ckpt,
        config=replace(ckpt.config, **unrecorded),
        labels=labels or ckpt.labels,
        normalization=norm or ckpt.normalization,
        extra={**extra, **ckpt.extra},
    )


def _labels_for(num_classes: int, mids: Any = None) -> list[tuple[str, str]] | None:
    if isinstance(mids, dict) and len(mids) == num_classes > 0:
        try:
            return labels_from_mids(mids)
        except (TypeError, ValueError):
            pass
    return audioset_labels() if num_classes == AUDIOSET_CLASSES else None


def torch_load(path: Path) -> Any:
    """`torch.load` through the restricted unpickler (memory-mapped for zip-format files)."""
    is_zip = zipfile.is_zipfile(path)
    try:
        return torch.load(
            path, map_location="cpu", pickle_module=safe_pickle, weights_only=False, mmap=is_zip
        )
    except Exception as e:
        refused = safe_pickle.refused_global(e)
        if refused:
            raise CheckpointError(
                f"{path}: checkpoint references {refused}, which no model file needs; refusing to load it"
            ) from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason[:200]})") from None


def _read_fairseq(path: Path) -> Checkpoint:
    obj = torch_load(path)
    weights = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' state dict)")
    cfg = safe_pickle.to_plain(obj.get("cfg"))
    if not isinstance(cfg, dict):
        args = obj.get("args")
        cfg = {"model": dict(args), "task": dict(args)} if isinstance(args, dict) else {}
    model_cfg = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    task_cfg = cfg.get("task") if isinstance(cfg.get("task"), dict) else {}
    history = obj.get("optimizer_history")
    extra: dict[str, Any] = {"fairseq_model_cfg": model_cfg, "fairseq_task_cfg": task_cfg}
    if isinstance(history, list) and history and isinstance(history[-1], dict):
        extra["num_updates"] = history[-1].get("num_updates")
    norm = next((v for k, v in _TASK_NORMS.items() if task_cfg.get(k)), AUDIOSET_NORM)
    where = str(path)

    if any(k.startswith("model." + _IMAGE) for k in weights):
        inner = {k[len("model.") :]: v for k, v in weights.items() if k.startswith("model.")}
        pretrain_cfg = model_cfg.get("pretrained_model_args") or {}
        pretrain_model = pretrain_cfg.get("model") if isinstance(pretrain_cfg, dict) else None
        pretrain_model = pretrain_model if isinstance(pretrain_model, dict) else {}
        encoder = _fp32(_rename_in(inner, _FAIRSEQ_STEM, ""), where)
        state = {"encoder." + k: v for k, v in encoder.items()}
        state.update(_fp32({k: weights[k] for k in _HEAD if k in weights}, where))
        heads = model_cfg.get("num_heads") or pretrain_model.get("num_heads")
        eps = model_cfg.get("norm_eps") or pretrain_model.get("norm_eps")
        config = replace(config_from_state(state, heads, eps), pool=_pool_from_fairseq(model_cfg, where))
        task_state = obj.get("task_state") if isinstance(obj.get("task_state"), dict) else {}
        labels = _labels_for(config.num_classes, task_state.get("labels"))
        ckpt = Checkpoint(
            config, state, labels=labels, normalization=norm, extra=_jsonable(extra), layout="fairseq"
        )
        return _with_metadata(ckpt, obj.get("sslam"), where)

    if _IMAGE + "extra_tokens" not in weights:
        raise CheckpointError(f"{where}: no SSLAM/EAT encoder weights found (expected '{_IMAGE}*' keys)")
    state = _fp32(_rename_in(weights, _FAIRSEQ_STEM, ""), where)
    decoder = _fp32({k[len(_DECODER) :]: v for k, v in weights.items() if k.startswith(_DECODER)}, where)
    ema = weights.get("_ema")
    teacher = _fp32(_rename_in(ema, _FAIRSEQ_STEM, ""), where) if isinstance(ema, dict) else None
    config = config_from_state(state, model_cfg.get("num_heads"), model_cfg.get("norm_eps"))
    ckpt = Checkpoint(
        config,
        state,
        teacher=teacher or None,
        decoder=decoder or None,
        normalization=norm,
        extra=_jsonable(extra),
        layout="fairseq",
    )
    return _with_metadata(ckpt, obj.get("sslam"), where)


_PREDICTION_MODES = {"CLS_TOKEN": "cls", "MEAN_POOLING": "mean"}


def _pool_from_fairseq(model_cfg: dict, where: str) -> str:
    """The classifier's pooling from fairseq's `prediction_mode` (released models use CLS_TOKEN)."""
    mode = str(model_cfg.get("prediction_mode") or "CLS_TOKEN").rsplit(".", 1)[-1]
    if mode not in _PREDICTION_MODES:
        raise CheckpointError(
            f"{where}: prediction_mode {mode} is not supported (only CLS_TOKEN, MEAN_POOLING)"
        )
    return _PREDICTION_MODES[mode]


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).strip()[:200]})") from None


def _safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).strip()[:200]})") from None


def _read_sslam(path: Path) -> Checkpoint:
    tensors, metadata = _read_safetensors(path)
    try:
        meta = json.loads(metadata["sslam"])
        config = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: missing or invalid 'sslam' metadata ({e})") from None
    where = str(path)
    teacher = {k[len("teacher.") :]: v for k, v in tensors.items() if k.startswith("teacher.")}
    decoder = {k[len("decoder.") :]: v for k, v in tensors.items() if k.startswith("decoder.")}
    state = {k: v for k, v in tensors.items() if not k.startswith(("teacher.", "decoder."))}
    labels, norm, extra = _parse_metadata(meta, where)
    return Checkpoint(
        config,
        _fp32(state, where),
        teacher=_fp32(teacher, where) or None,
        decoder=_fp32(decoder, where) or None,
        labels=labels,
        normalization=norm,
        extra=extra,
        layout="sslam",
    )


def _read_hf(folder: Path) -> Checkpoint:
    weights = folder / "model.safetensors"
    try:
        hf_cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: cannot read ({e})") from None
    if not isinstance(hf_cfg, dict):
        raise CheckpointError(f"{folder / 'config.json'}: not a JSON object")
    tensors, _ = _read_safetensors(weights)
    if _HF_STEM["cls_token"] not in tensors:
        raise CheckpointError(f"{weights}: no EAT/SSLAM weights found (expected 'model.*' keys)")
    encoder = _fp32(_rename_in(tensors, _HF_STEM, "model."), str(weights))
    head = _fp32(
        {k[len("model.") :]: tensors[k] for k in ("model." + h for h in _HEAD) if k in tensors}, str(weights)
    )
    state = {**{"encoder." + k: v for k, v in encoder.items()}, **head} if head else encoder
    config = config_from_state(state, hf_cfg.get("num_heads"), hf_cfg.get("norm_eps"))
    meta = hf_cfg.pop("sslam", None)
    ckpt = Checkpoint(
        config,
        state,
        labels=_labels_for(config.num_classes),
        normalization=AUDIOSET_NORM,
        extra={"hf_config": hf_cfg},
        layout="hf",
    )
    return _with_metadata(ckpt, meta, str(folder / "config.json"))


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


def _reader(path: Path) -> tuple[Callable[[Path], Checkpoint], Path]:
    """Which layout a path holds, and the file whose hash identifies it."""
    if path.is_dir():
        weights = path / "model.safetensors"
        if weights.is_file() and "sslam" in _safetensors_metadata(weights):
            return _read_sslam, weights
        if weights.is_file() and (path / "config.json").is_file():
            return (lambda _: _read_hf(path)), weights
        raise CheckpointError(
            f"{path}: folder has neither our model.safetensors nor config.json + model.safetensors"
        )
    if path.suffix == ".safetensors":
        if "sslam" in _safetensors_metadata(path):
            return _read_sslam, path
        raise CheckpointError(
            f"{path}: safetensors file without 'sslam' metadata (for HF weights pass the folder)"
        )
    return _read_fairseq, path


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
        ckpt.source, ckpt.sha256 = str(path.resolve()), _sha256(path)
        return ckpt
    read, weights_file = _reader(path)
    ckpt = read(weights_file)
    ckpt.source = str(path.resolve())
    ckpt.sha256 = _sha256(weights_file)
    return _finish(ckpt, teacher)


def model_from_checkpoint(
    ckpt: Checkpoint, device: str | torch.device = "cpu", precision: str = "fp32"
) -> nn.Module:
    """Build the Encoder/Classifier for a checkpoint, load its weights and put it in eval mode (for an
    ONNX export, its ONNX Runtime model: `onnx_backend.onnx_model`). `precision="int8"`: the ONNX
    Runtime int8 model, quantised on first use and cached (`onnx_export.int8_model`)."""
    if precision == "int8":
        from sslam_core.models.onnx_export import int8_model

        return int8_model(ckpt, device)
    if ckpt.layout == "onnx":
        from sslam_core.models.onnx_runtime import onnx_model

        return onnx_model(ckpt, device)
    _check_state(ckpt.config, ckpt.state, "model", ckpt.source)
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


class _RecordingFile:
    """A file wrapper that keeps the OSError of a failed write: torch.save reports it as a RuntimeError
    without the cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def torch_save(obj: Any, path: str) -> None:
    """`torch.save` to `path` such that a write error surfaces as its OSError (for `atomic_write`)."""
    with open(path, "wb") as f:
        writer = _RecordingFile(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def _save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    owned = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(owned, tmp, metadata=metadata))


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
    _save_tensors(Path(path), tensors, {"sslam": json.dumps(_metadata(ckpt)), "format": "pt"})


def hf_config(ckpt: Checkpoint) -> dict:
    """config.json in the field set of the EAT remote-code models on the Hugging Face Hub, plus our
    "sslam" block (labels, normalisation, training metadata). There is no `auto_map`: the folder does
    not ship the remote-code modules, and naming absent files would only make transformers fail later."""
    cfg = ckpt.config
    if cfg.num_classes and cfg.pool != "cls":
        raise CheckpointError(f"{ckpt.source}: the Hugging Face EAT layout has no mean-pooling classifier")
    return {
        "architectures": ["EATModel"],
        "model_type": "eat",
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "patch_size": cfg.patch_size,
        "stride": cfg.patch_size,
        "in_chans": 1,
        "mel_bins": cfg.mel_bins,
        "max_length": cfg.max_length,
        "num_classes": cfg.num_classes or AUDIOSET_CLASSES,
        "model_variant": "finetune" if cfg.num_classes else "pretrain",
        "mlp_ratio": cfg.mlp_ratio,
        "qkv_bias": cfg.qkv_bias,
        "drop_rate": 0.0,
        "attn_drop_rate": 0.0,
        "activation_dropout": 0.0,
        "post_mlp_drop": 0.0,
        "start_drop_path_rate": 0.0,
        "end_drop_path_rate": 0.0,
        "layer_norm_first": False,
        "norm_eps": cfg.norm_eps,
        "norm_affine": True,
        "fixed_positions": True,
        "img_size": [1024, cfg.mel_bins],
        "torch_dtype": "float32",
        "transformers_version": "4.51.3",
        "sslam": _metadata(ckpt, _HF_DERIVED),
    }


def hf_tensors(ckpt: Checkpoint) -> dict[str, Tensor]:
    """The model weights under the Hugging Face EAT names."""
    encoder, head = _split(ckpt.state)
    tensors = _rename_out(encoder, _HF_STEM, "model.")
    tensors.update({"model." + k: v for k, v in head.items()})
    return tensors


def _fairseq_pretrain_cfg(ckpt: Checkpoint) -> dict:
    """The `cfg['model']` section of a data2vec_multi pre-training run, sized from the config."""
    cfg = ckpt.config
    known = ckpt.extra.get("fairseq_model_cfg") or {}
    if known.get("_name") == "mae_image_classification":
        known = (known.get("pretrained_model_args") or {}).get("model") or {}
    decoder_dim = ckpt.decoder["proj.weight"].shape[1] if ckpt.decoder else cfg.embed_dim
    sizes = {
        "depth": cfg.depth,
        "embed_dim": cfg.embed_dim,
        "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio,
    }
    image = {
        **((known.get("modalities") or {}).get("image") or {}),
        "type": "IMAGE",
        "prenet_depth": 0,
        "num_extra_tokens": 1,
        "model_depth": cfg.depth,
        "in_chans": 1,
        "patch_size": cfg.patch_size,
        "embed_dim": cfg.embed_dim,
        "fixed_positions": True,
        "max_length": cfg.max_length,
    }
    image["decoder"] = {
        "decoder_dim": decoder_dim,
        "decoder_groups": 16,
        "decoder_kernel": 3,
        "decoder_layers": 6,
        "decoder_residual": True,
        "projection_layers": 1,
        **(image.get("decoder") or {}),
    }
    image["decoder"]["decoder_dim"] = decoder_dim
    return {
        **known,
        "_name": "data2vec_multi",
        **sizes,
        "norm_eps": cfg.norm_eps,
        "norm_affine": True,
        "layer_norm_first": False,
        "supported_modality": "IMAGE",
        "modalities": {"_name": None, "image": image},
    }


def fairseq_container(ckpt: Checkpoint) -> dict:
    """The official fairseq checkpoint dict (plain types only) holding this checkpoint's weights, plus
    a "sslam" key with the labels, normalisation and training metadata (fairseq ignores it)."""
    encoder, head = _split(ckpt.state)
    task = dict(ckpt.extra.get("fairseq_task_cfg") or {})
    if isinstance(ckpt.extra.get("target_length"), int):
        task["target_length"] = ckpt.extra["target_length"]
    pretrain = _fairseq_pretrain_cfg(ckpt)
    if ckpt.config.num_classes:
        weights = {"model." + k: v for k, v in _rename_out(encoder, _FAIRSEQ_STEM, "").items()}
        weights.update(head)
        model_cfg = {
            **(ckpt.extra.get("fairseq_model_cfg") or {}),
            "_name": "mae_image_classification",
            "num_classes": ckpt.config.num_classes,
            "use_fc_norm": True,
            "prediction_mode": {v: k for k, v in _PREDICTION_MODES.items()}[ckpt.config.pool],
            "pretrained_model_args": {"model": pretrain, "task": {"_name": "mae_image_pretraining"}},
        }
        task = {"_name": "mae_image_classification", **task}
        labels = {mid: str(i) for i, (mid, _) in enumerate(ckpt.labels or [])}
        task_state = {"labels": labels} if labels else {}
    else:
        weights = _rename_out(encoder, _FAIRSEQ_STEM, "")
        weights.update({_DECODER + k: v for k, v in (ckpt.decoder or {}).items()})
        if ckpt.teacher is not None:
            weights["_ema"] = _rename_out(ckpt.teacher, _FAIRSEQ_STEM, "")
        model_cfg = pretrain
        task = {"_name": "mae_image_pretraining", **task}
        task_state = {}
    return {
        "args": None,
        "cfg": {"model": model_cfg, "task": task},
        "model": weights,
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "ModelCriterion",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {},
                "num_updates": int(ckpt.extra.get("num_updates") or 0),
            }
        ],
        "task_state": task_state,
        "extra_state": {},
        "last_optimizer_state": None,
        "sslam": _metadata(ckpt, _FAIRSEQ_DERIVED),
    }


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
        _save_tensors(path / "model.safetensors", hf_tensors(ckpt), {"format": "pt"})
        atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(text))
    elif layout == "fairseq":
        container = fairseq_container(ckpt)
        atomic_write(path, lambda tmp: torch_save(container, tmp))
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint layout {layout!r} (choose from {', '.join(LAYOUTS)})"
        )
    return path


__all__ = [
    "DEFAULT_ENCODER",
    "DEFAULT_TAGGER",
    "LAYOUTS",
    "Checkpoint",
    "CheckpointError",
    "config_from_state",
    "fairseq_container",
    "hf_config",
    "hf_tensors",
    "load_model",
    "model_from_checkpoint",
    "read_checkpoint",
    "resolve",
    "save_checkpoint",
    "write_checkpoint",
]
