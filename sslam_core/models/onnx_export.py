"""Export a checkpoint to ONNX: the encoder (features of one block, CLS first) or the classifier
(logits, plus the features of one block), with a dynamic batch and input length.

The file carries everything needed to tag or embed with it alone, as JSON under the `metadata_props`
key "sslam": the model config, labels, normalisation, the checkpoint's other metadata, and `kind`,
`layer`, `target_length` (the default window), `precision`, `source` and `source_sha256`. Every export
is checked against torch on a random batch before it is written (`Export.max_diff`); `int8=True`
quantises the MatMuls (`sslam_core.models.int8`) and reports the cosine of its outputs to the fp32
graph's.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from sslam_core.errors import SslamError
from sslam_core.models import int8
from sslam_core.models.checkpoint import Checkpoint, CheckpointError, metadata, sha256_file
from sslam_core.models.loading import read_checkpoint, reader_for, resolve, torch_model
from sslam_core.models.onnx_runtime import INPUT, cached_int8, onnx_model, open_session, require, run_session
from sslam_core.models.transformer import Classifier
from sslam_core.runs.outputs import OutputError, atomic_write

FP32_TOLERANCE = 1e-4
OPSET = 18
INT8_SCHEME = int8.SCHEME  # in the cached int8 models' names: a new scheme makes them again
EXPORT_MODULES = ("onnx", "onnxruntime", "onnxscript")


EXPORT_STEPS = ("exporting the graph", "checking it against torch", "quantising to int8", "checking int8")
_PROGRESS: ContextVar[Callable[[str], None] | None] = ContextVar("sslam_export_progress", default=None)


@contextlib.contextmanager
def export_progress(callback: Callable[[str], None]) -> Iterator[None]:
    """Call `callback(step)` as each step of `export_checkpoint` starts, in this context (one of
    `EXPORT_STEPS`; the last two for int8 only): a command's progress bar for a first int8 use."""
    token = _PROGRESS.set(callback)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def _step(name: str) -> None:
    callback = _PROGRESS.get()
    if callback is not None:
        callback(name)


class ExportError(SslamError, ValueError):
    """An export that cannot be made or that does not match torch; one line."""


class _Graph(nn.Module):
    """What is exported: features of block `depth` (an encoder), or (logits, features) (a classifier)."""

    def __init__(self, model: nn.Module, depth: int):
        super().__init__()
        self.model, self.depth = model, depth

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if not isinstance(self.model, Classifier):
            return self.model(x, self.depth)
        hidden = self.model.encoder.all_layers(x)
        return self.model.classify(hidden[-1]), hidden[self.depth - 1]


@dataclass
class Export:
    """A finished export: the serialised model and its check against torch (and fp32, for int8)."""

    data: bytes
    kind: str
    layer: int
    target_length: int
    precision: str
    max_diff: dict[str, float] = field(default_factory=dict)  # output -> max |ONNX - torch|
    cosine: dict[str, float] = field(default_factory=dict)  # int8: output -> cosine to fp32

    def write(self, path: str | os.PathLike) -> Path:
        """Write through a temporary file and a rename (an OSError becomes an OutputError)."""
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(self.data))


def tolerance(reference: Tensor) -> float:
    """The largest fp32 difference allowed on an output: FP32_TOLERANCE, times its largest magnitude
    where that is above 1 (a probe's logits reach 1e3, where fp32 itself steps by 1e-4)."""
    return FP32_TOLERANCE * max(1.0, reference.abs().max().item())


def _cosine(a: Tensor, b: Tensor) -> float:
    """Mean over rows of the cosine between `a` and `b` (rows = the last dimension)."""
    return torch.nn.functional.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1).mean().item()


@contextlib.contextmanager
def _muted(logger: str) -> Iterator[None]:
    """Python-level stdout / stderr, warnings and `logger`'s records below ERROR swallowed: the
    exporter's and the quantiser's chatter (errors still raise)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
    finally:
        log.setLevel(level)


def _to_onnx(graph: _Graph, example: Tensor, outputs: list[str]) -> object:
    """The ONNX ModelProto of `graph` (dynamo exporter), batch and time dynamic; its chatter is muted."""
    import onnx  # noqa: F401  (the exporter needs it; `require` has checked)

    frames = graph.model.cfg.max_length
    batch, steps = torch.export.Dim("batch", min=1, max=1 << 16), torch.export.Dim("steps", min=1, max=frames)
    try:
        with _muted("torch.onnx"):
            program = torch.onnx.export(
                graph,
                (example,),
                input_names=[INPUT],
                output_names=outputs,
                dynamic_shapes={"x": {0: batch, 2: 16 * steps}},
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"the ONNX exporter failed ({reason[:300]})") from None
    return program.model_proto


def quantize_int8(proto: object) -> object:
    """The int8 graph of an fp32 export (`sslam_core.models.int8`: per-channel weight scales, per-token
    activation scales, the output block in fp32); a graph it cannot quantise is an ExportError."""
    try:
        return int8.quantize_int8(proto)
    except int8.QuantizationError as e:
        raise ExportError(f"cannot quantise to int8: {e}") from None


def export_checkpoint(
    ckpt: Checkpoint,
    layer: int | None = None,
    target_length: int | None = None,
    int8: bool = False,
    check_batch: int = 2,
    seed: int = 0,
) -> Export:
    """Export `ckpt` (a torch checkpoint) and check it: fp32 must match torch within `tolerance` (1e-4,
    relative to outputs larger than 1).

    `layer`: the block whose features are exported (1-based, negative from the end; default the
    last). `target_length`: the default window in frames (default the checkpoint's, else 1024); any
    multiple of 16 up to the position table's length runs."""
    require(*EXPORT_MODULES)
    import onnx

    if ckpt.layout == "onnx":
        raise ExportError(f"{ckpt.source}: is already an ONNX export; export its source checkpoint")
    model = torch_model(ckpt, "cpu")
    encoder = getattr(model, "encoder", model)
    try:
        depth = encoder.resolve_layer(layer)
    except ValueError as e:
        raise ExportError(str(e)) from None
    recorded = ckpt.extra.get("target_length")
    frames = target_length or (recorded if isinstance(recorded, int) and recorded > 0 else 1024)
    limit = ckpt.config.max_length * ckpt.config.patch_size
    if frames <= 0 or frames % 16 or frames > limit:
        raise ExportError(f"--target-length {frames}: expected a multiple of 16 from 16 to {limit}")
    kind = "classifier" if isinstance(model, Classifier) else "encoder"
    outputs = ["logits", "features"] if kind == "classifier" else ["features"]
    graph = _Graph(model, depth).eval()
    example = torch.randn(
        check_batch, 1, frames, ckpt.config.mel_bins, generator=torch.Generator().manual_seed(seed)
    )
    _step(EXPORT_STEPS[0])
    proto = _to_onnx(graph, example, outputs)
    _step(EXPORT_STEPS[1])
    meta = metadata(ckpt)
    meta["extra"] = {**meta["extra"], "target_length": frames}
    meta.update(kind=kind, layer=depth, target_length=frames, source=ckpt.source, source_sha256=ckpt.sha256)
    with torch.inference_mode():
        expected = graph(example)
    expected = dict(zip(outputs, expected if kind == "classifier" else (expected,), strict=True))
    fp32 = run_session(open_session(proto.SerializeToString()), example)
    max_diff = {n: (fp32[n] - expected[n]).abs().max().item() for n in outputs}
    for name in outputs:
        allowed = tolerance(expected[name])
        if max_diff[name] > allowed:
            raise ExportError(
                f"the ONNX graph differs from torch by {max_diff[name]:.2e} in {name} "
                f"(more than {allowed:.2g}); not written"
            )
    result = Export(b"", kind, depth, frames, "int8" if int8 else "fp32", max_diff)
    if int8:
        _step(EXPORT_STEPS[2])
        proto = quantize_int8(proto)
        _step(EXPORT_STEPS[3])
        quant = run_session(open_session(proto.SerializeToString()), example)
        result.max_diff = {n: (quant[n] - expected[n]).abs().max().item() for n in outputs}
        result.cosine = {"cls": _cosine(quant["features"][:, 0], fp32["features"][:, 0])}
        result.cosine.update({n: _cosine(quant[n], fp32[n]) for n in outputs})
    meta["precision"] = result.precision
    if int8:
        meta["int8_scheme"] = INT8_SCHEME
    onnx.helper.set_model_props(proto, {"sslam": json.dumps(meta)})
    result.data = proto.SerializeToString()
    return result


def cache_dir() -> Path:
    """Where int8 models of torch checkpoints are kept: `$SSLAM_CACHE`, else `$XDG_CACHE_HOME/sslam`,
    else `~/.cache/sslam`."""
    root = os.environ.get("SSLAM_CACHE")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "sslam"


def int8_path(ckpt: Checkpoint) -> Path:
    """The cache file of `ckpt`'s int8 model: keyed by the checkpoint file's sha256 and the weights
    used (the model or the EMA teacher)."""
    return _int8_file(ckpt.sha256, ckpt.extra.get("weights") == "ema_teacher")


def int8_cached(sha256: str, teacher: bool = False) -> bool:
    """Whether the int8 model of the checkpoint file with this sha256 is in the cache (no quantising)."""
    return _int8_file(sha256, teacher).is_file()


def _int8_file(sha256: str, teacher: bool) -> Path:
    return cache_dir() / "int8" / f"{sha256}{'-teacher' if teacher else ''}-v{OPSET}-q{INT8_SCHEME}.onnx"


class Int8CacheError(OutputError):
    """An int8 model was made but its cache file cannot be written; `data` holds the model."""

    def __init__(self, error: OutputError, data: bytes):
        super().__init__(error.errno, str(error))
        self.filename, self.data = error.filename, data


def int8_checkpoint(ckpt: Checkpoint) -> tuple[Path, bool]:
    """The int8 ONNX model of a torch checkpoint (last block, default window), quantised on first use
    and cached (`int8_path`); returns (path, whether it was made now). A checkpoint that is already
    an ONNX export is returned as it is when it is int8. A cache that cannot be written (read-only,
    full, not a folder) is an Int8CacheError holding the model made; `int8_model` then runs it."""
    if ckpt.layout == "onnx":
        if ckpt.extra["onnx"]["precision"] != "int8":
            raise ExportError(f"{ckpt.source}: an fp32 ONNX export; export it with --int8 for int8")
        return Path(ckpt.source), False
    if not ckpt.sha256:
        raise ExportError(f"{ckpt.source}: no file hash to cache its int8 model under")
    path = int8_path(ckpt)
    if path.is_file():
        return path, False
    made = export_checkpoint(ckpt, int8=True)
    try:
        made.write(path)
    except OutputError as e:
        raise Int8CacheError(e, made.data) from None
    return path, True


def int8_model(ckpt: Checkpoint, device: str | torch.device = "cpu") -> nn.Module:
    """`int8_checkpoint`'s model, loaded; any failure is a one-line CheckpointError. Where the cache
    cannot be written the model made is run for this process only, and its `uncached` attribute says
    why (the commands print it as a warning); otherwise `uncached` is None."""
    from sslam_core.models.onnx_runtime import OnnxUnavailable

    try:
        try:
            path, _ = int8_checkpoint(ckpt)
        except Int8CacheError as e:
            with tempfile.TemporaryDirectory(prefix="sslam-int8-") as tmp:
                path = Path(tmp) / int8_path(ckpt).name
                path.write_bytes(e.data)
                model = onnx_model(read_checkpoint(path, allow_onnx=True), device)  # the session holds it
            model.described = f"the int8 model of {ckpt.source}"
            model.checkpoint_info = {**model.checkpoint_info, "source": ckpt.source}
            model.uncached = str(e)
            return model
    except (ExportError, OnnxUnavailable, OSError) as e:  # OSError includes outputs.OutputError
        raise CheckpointError(f"int8 model of {ckpt.source}: {e}") from None
    model = onnx_model(read_checkpoint(path, allow_onnx=True), device)
    return model if ckpt.layout == "onnx" else cached_int8(model, ckpt.source)


def load_int8(
    path_or_id: str | os.PathLike, device: str | torch.device = "cpu", teacher: bool = False
) -> nn.Module:
    """`load_model(path_or_id, precision="int8")`: when the int8 model is cached, the checkpoint file is
    only hashed to find it, its torch weights are not read (seconds saved on every run of a ViT-B)."""
    path = resolve(path_or_id)
    if path.suffix.lower() != ".onnx":
        try:
            _, weights = reader_for(path)
        except CheckpointError:
            weights = None  # read_checkpoint below says what is wrong with it
        cached = _int8_file(sha256_file(weights), teacher) if weights is not None else None
        if cached is not None and cached.is_file():
            return cached_int8(onnx_model(read_checkpoint(cached, allow_onnx=True), device), str(path_or_id))
    return int8_model(read_checkpoint(path, teacher, allow_onnx=True), device)


__all__ = [
    "EXPORT_MODULES",
    "EXPORT_STEPS",
    "export_progress",
    "FP32_TOLERANCE",
    "Export",
    "ExportError",
    "Int8CacheError",
    "cache_dir",
    "export_checkpoint",
    "int8_checkpoint",
    "int8_model",
    "int8_path",
    "int8_cached",
    "load_int8",
    "quantize_int8",
    "tolerance",
]
