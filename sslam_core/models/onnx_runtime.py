"""ONNX Runtime backend: an exported `.onnx` file (see `onnx_export`) loaded as a model object that the
inference pipeline runs exactly like the torch Encoder / Classifier.

`read_onnx` turns the file's metadata (config, labels, normalisation, target length, layer, kind) into
a weightless `Checkpoint` of layout "onnx"; `onnx_model` opens an ONNX Runtime session on it. The model
object takes the normalised input (B, 1, T, 128) as a tensor and returns tensors on the input's
device; the graph itself runs on ONNX Runtime's CPU provider, with torch's thread count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sslam_core.errors import OptionError, SslamError
from sslam_core.models.checkpoint import Checkpoint, CheckpointError, parse_metadata
from sslam_core.models.transformer import Classifier, ModelConfig

EXTRA_HINT = "install sslam[onnx] (pip install 'sslam[onnx]', or pip install onnx onnxruntime onnxscript)"
KINDS = ("encoder", "classifier")
INPUT = "input"


class OnnxUnavailable(SslamError, ImportError):
    """The `[onnx]` extra is not installed; the message is one line naming it."""


def require(*modules: str) -> None:
    """Import `modules` (default onnx and onnxruntime) or raise OnnxUnavailable naming the extra."""
    import importlib

    for name in modules or ("onnx", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise OnnxUnavailable(f"ONNX support needs the '{name}' package: {EXTRA_HINT}") from e


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `metadata_props` of an ONNX file (the weights are not loaded)."""
    require("onnx")
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, ValueError, OSError, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: not a readable ONNX file ({reason[:200]})") from None
    return {p.key: p.value for p in proto.metadata_props}


def read_onnx(path: Path, teacher: bool = False) -> Checkpoint:
    """A weightless Checkpoint (layout "onnx") describing an `sslam export` file."""
    if teacher:
        raise CheckpointError(f"{path}: an ONNX export holds one model, not an EMA teacher")
    try:
        props = read_metadata(path)
    except OnnxUnavailable as e:
        raise CheckpointError(f"{path}: {e}") from None
    if "sslam" not in props:
        raise CheckpointError(f"{path}: an ONNX file without 'sslam' metadata (export it with sslam export)")
    try:
        meta = json.loads(props["sslam"])
        config = ModelConfig.from_dict(meta["config"])
        onnx_meta = {k: meta[k] for k in ("kind", "layer", "target_length", "precision")}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid 'sslam' metadata ({e})") from None
    if onnx_meta["kind"] not in KINDS:
        raise CheckpointError(f"{path}: unknown export kind {onnx_meta['kind']!r}")
    labels, norm, extra = parse_metadata(meta, str(path))
    extra = {**extra, "onnx": {**onnx_meta, **{k: meta.get(k) for k in ("source", "source_sha256")}}}
    return Checkpoint(config, {}, labels=labels, normalization=norm, extra=extra, layout="onnx")


def session_options(threads: int | None = None) -> Any:
    """ONNX Runtime options: `threads` (default torch's) intra-op threads, one inter-op thread, no
    spinning."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # no busy-waiting between runs: spinning threads would take the cores from audio decoding and
    # from torch work in the same process
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def open_session(model: str | Path | bytes, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session on a file or serialised model."""
    require("onnxruntime")
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])


def run_session(session: Any, x: Tensor) -> dict[str, Tensor]:
    """Every output of `session` on input `x`, as float32 tensors on `x`'s device."""
    feed = {INPUT: x.detach().to("cpu", torch.float32).contiguous().numpy()}
    names = [o.name for o in session.get_outputs()]
    return {n: torch.from_numpy(v).to(x.device) for n, v in zip(names, session.run(names, feed), strict=True)}


def cached_int8(model: OnnxModel, checkpoint: str) -> OnnxModel:
    """Mark `model` as the int8 model cached for the torch checkpoint `checkpoint` (for messages)."""
    model.cached_for = checkpoint
    model.described = f"the int8 model cached for {checkpoint}"
    return model


class OnnxModel(nn.Module):
    """An exported model run by ONNX Runtime, with the torch model's attributes (`cfg`, `labels`,
    `normalization`, `target_length`, `multilabel`, `checkpoint_info`). Its graph holds the features of
    one block (`layer`, 1-based), which is the only layer it can give."""

    def __init__(self, ckpt: Checkpoint, session: Any):
        nn.Module.__init__(self)  # not the torch model's __init__: the weights live in the graph
        # an empty parameter that follows `.to(device)`, for callers that find the model's device
        # with `next(model.parameters()).device` (the HEAR module)
        self.device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)
        onnx_meta = ckpt.extra["onnx"]
        self.cfg = ckpt.config
        self.session = session
        self.layer = int(onnx_meta["layer"])
        self.precision = str(onnx_meta["precision"])
        self.labels = ckpt.labels
        self.normalization = ckpt.normalization
        self.multilabel = bool(ckpt.extra.get("multilabel", True))
        self.target_length = int(onnx_meta["target_length"])
        # how messages name it: an .onnx file given as the checkpoint, or the int8 model cached for a
        # torch checkpoint (`onnx_export.int8_model` says so, and `cached_for` names that checkpoint)
        self.described = "this ONNX export"
        self.cached_for: str | None = None
        self.uncached: str | None = None  # why an int8 model made from a torch checkpoint is not cached
        self.checkpoint_info = {
            **ckpt.info,
            "exported_from": str(onnx_meta.get("source") or ""),
            "exported_from_sha256": str(onnx_meta.get("source_sha256") or ""),
        }

    @property
    def pos_embed(self) -> Tensor:
        """An empty tensor shaped like the position table (1, rows, 0): the input length limit."""
        return torch.empty(1, self.cfg.max_length * self.cfg.freq_patches, 0)

    def resolve_layer(self, layer: int | None) -> int:
        """`layer` (1-based, negative from the end, None = the exported one) -> the exported block; any
        other block is a ValueError, since the graph does not compute it."""
        depth = self.cfg.depth
        if layer is None:
            return self.layer
        n = layer if layer > 0 else depth + 1 + layer
        if n != self.layer or layer == 0:
            again = (
                f"export again with --layer {layer}"
                if self.cached_for is None
                else f"run another --precision, or `sslam export --int8 --layer {layer}` and run that file"
            )
            raise OptionError(
                f"layer {layer}: {self.described} gives block {self.layer} of {depth} only ({again})"
            )
        return n

    def _run(self, x: Tensor) -> dict[str, Tensor]:
        return run_session(self.session, x)

    def features(self, x: Tensor, layer: int | None = None) -> Tensor:
        """Features (B, 1 + N, D) of the exported block, CLS first."""
        self.resolve_layer(layer)
        return self._run(x)["features"]

    def forward(self, x: Tensor, layer: int | None = None) -> Tensor:
        return self.features(x, layer)


class OnnxEncoder(OnnxModel):
    """An exported encoder: `model(x, layer)` -> features of the exported block."""


class OnnxClassifier(OnnxModel, Classifier):
    """An exported classifier: `model(x)` -> logits, `model.features(x, layer)` -> the exported block's
    features. It is a `Classifier` for the pipeline's checks; the head's weights are inside the graph."""

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x)["logits"]

    def classify(self, features: Tensor) -> Tensor:
        raise TypeError("an ONNX classifier computes its logits from the input only: call model(x)")


def onnx_model(ckpt: Checkpoint, device: str | torch.device = "cpu") -> OnnxModel:
    """The model object of an "onnx" Checkpoint (from `read_onnx`); `device` is where its outputs go."""
    try:
        session = open_session(ckpt.source)
    except OnnxUnavailable as e:
        raise CheckpointError(f"{ckpt.source}: {e}") from None
    except Exception as e:  # onnxruntime's own exception types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{ckpt.source}: ONNX Runtime cannot load it ({reason[:200]})") from None
    kind = ckpt.extra["onnx"]["kind"]
    model = (OnnxClassifier if kind == "classifier" else OnnxEncoder)(ckpt, session)
    return model.to(device).eval()


__all__ = [
    "EXTRA_HINT",
    "OnnxClassifier",
    "OnnxEncoder",
    "OnnxModel",
    "OnnxUnavailable",
    "one_window_per_pass",
    "cached_int8",
    "onnx_model",
    "open_session",
    "read_metadata",
    "read_onnx",
    "require",
    "run_session",
]


def one_window_per_pass(model: nn.Module) -> bool:
    """Whether the pipeline runs `model` one window per pass, so that its outputs for one input cannot
    depend on the other inputs of a batch: every int8 graph. Exports made before per-token scales (ONNX
    Runtime's dynamic quantisation, `int8_scheme` < 3 or absent in their metadata) scale activations
    per batch; per-token graphs do not, and one window per pass also keeps their fp32 parts' bits (and
    is no slower in ONNX Runtime)."""
    return isinstance(model, OnnxModel) and model.precision == "int8"
