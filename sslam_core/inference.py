"""Batched inference over audio files of any length: decode, cut windows, fbank on the device, encode.

Every command that runs a model over files (`tag`, `extract`, `eval`, the HEAR module) goes through
`run_windows`: files are decoded by worker threads, cut into windows of `target_length` frames,
batched across files, turned into model input on the device and encoded in one forward pass per
batch. Results come back per file, in input order, with per-file errors instead of exceptions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sslam_core.audio import AudioError, resample, stream_audio
from sslam_core.frontend import prepare_input
from sslam_core.model import Classifier

SAMPLE_RATE = 16000
HOP_SAMPLES = 160  # 10 ms frame shift
FRAME_SAMPLES = 400  # 25 ms frame
PATCH_FRAMES = 16  # one time patch = 160 ms


def window_samples(frames: int) -> int:
    """Samples needed for `frames` fbank frames."""
    return FRAME_SAMPLES + (frames - 1) * HOP_SAMPLES


def num_frames(samples: int) -> int:
    """Fbank frames of a wave of `samples` samples (Kaldi snip_edges)."""
    return 0 if samples < FRAME_SAMPLES else 1 + (samples - FRAME_SAMPLES) // HOP_SAMPLES


def num_windows(frames: int, window: int, hop: int) -> int:
    """Windows of `window` frames every `hop` frames covering `frames` frames (the last one padded)."""
    return 1 if frames <= window else 1 + math.ceil((frames - window) / hop)


def seconds_to_frames(seconds: float, multiple: int = PATCH_FRAMES) -> int:
    """Seconds -> fbank frames, rounded to a whole number of time patches."""
    frames = round(seconds * 100 / multiple) * multiple
    if frames <= 0:
        raise ValueError(f"{seconds} s is shorter than one {multiple * 10} ms patch")
    return frames


@dataclass
class Window:
    """One model input cut from a file: its wave and where it starts."""

    file: int
    index: int
    start_frame: int
    wave: Tensor


@dataclass
class FileWindows:
    """A decoded file cut into windows."""

    path: str
    duration: float
    frames: int
    windows: list[Window]


@dataclass
class FileResult:
    """Per-window outputs of one file, or the reason it was skipped."""

    path: str
    duration: float = 0.0
    frames: int = 0
    starts: list[int] = field(default_factory=list)  # window start frames
    outputs: dict[str, list[Tensor]] = field(default_factory=dict)  # name -> one tensor per window
    error: str | None = None

    def stacked(self, name: str) -> Tensor:
        return torch.stack(self.outputs[name])


Source = str | tuple[Tensor, int]  # a file path, or an in-memory (wave, sample_rate)


def source_name(source: Source, i: int) -> str:
    return source if isinstance(source, str) else f"<waveform {i}>"


def _blocks(source: Source, block_seconds: float) -> Iterable[Tensor]:
    if isinstance(source, str):
        return stream_audio(source, SAMPLE_RATE, block_seconds=block_seconds)
    wave, sr = source
    wave = torch.as_tensor(wave, dtype=torch.float32)
    if wave.ndim == 2:  # (channels, samples)
        wave = wave.mean(dim=0)
    if not torch.isfinite(wave).all():
        raise AudioError("waveform contains NaN or infinite values")
    return [resample(wave, sr, SAMPLE_RATE) if sr != SAMPLE_RATE else wave]


def cut_windows(source: Source, file: int, window: int, hop: int, block_seconds: float = 60.0) -> FileWindows:
    """Decode `source` as a stream and cut it into windows of `window` frames every `hop` frames.

    Memory holds the 16 kHz windows, never the file at its original rate.
    """
    path = source_name(source, file)
    span, step = window_samples(window), hop * HOP_SAMPLES
    buffer, offset, total = torch.zeros(0), 0, 0  # buffer[0] is sample `offset` of the file
    windows: list[Window] = []

    def emit(upto: int, final: bool) -> None:
        nonlocal buffer, offset
        while True:
            start = len(windows) * step
            if start + span > upto and not final:
                break
            if final and len(windows) >= num_windows(num_frames(upto), window, hop):
                break
            seg = buffer[start - offset : start - offset + span].clone()
            windows.append(Window(file, len(windows), start // HOP_SAMPLES, seg))
        keep_from = len(windows) * step
        if keep_from > offset:
            buffer = buffer[keep_from - offset :]
            offset = keep_from

    for block in _blocks(source, block_seconds):
        buffer = torch.cat([buffer, block.float()])
        total += len(block)
        emit(total, final=False)
    if total == 0:
        raise AudioError(f"{path}: no audio samples")
    if total < FRAME_SAMPLES:
        raise AudioError(f"{path}: too short ({total} samples at 16 kHz, the minimum is 400 = 25 ms)")
    emit(total, final=True)
    return FileWindows(path, total / SAMPLE_RATE, num_frames(total), windows)


def autocast(device: torch.device, precision: str):
    """Autocast context for `precision` (fp32 = none)."""
    if precision == "fp32":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def _decoded(
    paths: list[Source], window: int, hop: int, workers: int
) -> Iterator[tuple[int, FileWindows | FileResult]]:
    """Decode files in order with up to `workers` threads ahead; errors become FileResults."""

    def job(i: int) -> tuple[int, FileWindows | FileResult]:
        name = source_name(paths[i], i)
        try:
            return i, cut_windows(paths[i], i, window, hop)
        except AudioError as e:
            msg = str(e)
            return i, FileResult(name, error=msg if name in msg else f"{name}: {msg}")
        except (OSError, RuntimeError, ValueError) as e:
            return i, FileResult(name, error=f"{name}: {type(e).__name__}: {e}")

    if workers <= 1:
        for i in range(len(paths)):
            yield job(i)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: list[Future] = []
        nxt = 0
        while nxt < len(paths) or pending:
            while nxt < len(paths) and len(pending) < 2 * workers:
                pending.append(pool.submit(job, nxt))
                nxt += 1
            yield pending.pop(0).result()


Head = Callable[[Tensor], dict[str, Tensor]]


def run_windows(
    model: nn.Module,
    paths: Iterable[Source],
    head: Head,
    *,
    target_length: int = 1024,
    hop: int | None = None,
    batch_size: int = 8,
    workers: int = 2,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    normalization: str | tuple[float, float] = "audioset",
) -> Iterator[FileResult]:
    """Run `model` over every window of every file; `head(input)` maps a (B,1,T,128) batch to named
    per-window outputs (B, ...). Yields one FileResult per path, in order."""
    device = torch.device(device)
    paths = list(paths)
    hop = hop or target_length
    ready: dict[int, FileResult] = {}
    todo: dict[int, int] = {}  # file index -> windows not yet encoded
    queue: list[Window] = []
    next_out = 0

    def flush() -> None:
        waves = [w.wave for w in queue]
        x = prepare_input([w.to(device) for w in waves], target_length=target_length, norm=normalization)
        with torch.inference_mode(), autocast(device, precision):
            out = head(x)
        for j, w in enumerate(queue):
            res = ready[w.file]
            for name, value in out.items():
                res.outputs.setdefault(name, []).append(value[j].float().cpu())
            todo[w.file] -= 1
        queue.clear()

    def finished() -> Iterator[FileResult]:
        nonlocal next_out
        while next_out in ready and todo.get(next_out, 0) == 0:
            yield ready.pop(next_out)
            todo.pop(next_out, None)
            next_out += 1

    for i, item in _decoded(paths, target_length, hop, workers):
        if isinstance(item, FileResult):
            ready[i] = item
        else:
            ready[i] = FileResult(
                item.path, item.duration, item.frames, [w.start_frame for w in item.windows]
            )
            todo[i] = len(item.windows)
            for w in item.windows:
                queue.append(w)
                if len(queue) == batch_size:
                    flush()
                    yield from finished()
        yield from finished()
    if queue:
        flush()
    yield from finished()


def feature_head(model: nn.Module, layer: int | None = None) -> Head:
    """Per-window CLS, patch and per-160-ms-step features of block `layer`."""
    encode = model.features if isinstance(model, Classifier) else model

    def head(x: Tensor) -> dict[str, Tensor]:
        feats = encode(x, layer)
        patches = feats[:, 1:]
        B, N, D = patches.shape
        frames = patches.reshape(B, N // 8, 8, D).mean(dim=2)
        return {"clip": feats[:, 0], "patch": patches, "frame": frames}

    return head


def logits_head(model: Classifier, multilabel: bool = True) -> Head:
    """Per-window class probabilities: sigmoid for multi-label heads, softmax for multi-class."""

    def head(x: Tensor) -> dict[str, Tensor]:
        logits = model(x).float()
        return {"scores": torch.sigmoid(logits) if multilabel else logits.softmax(dim=-1)}

    return head
