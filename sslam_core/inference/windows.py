"""Windows of audio: the arithmetic of frames, windows and hops, and files cut into model-sized windows.

A file is decoded block by block and cut into windows of `window` frames every `hop` frames; only the
samples of windows not yet emitted are held, so memory is bounded whatever the file's length. Each
file's errors become its `FileResult` (`file_error`), never an exception that stops the others.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sslam_core.audio.constants import (
    DEFAULT_TARGET_LENGTH,
    FRAME_SAMPLES,
    FRAMES_PER_SECOND,
    HOP_SAMPLES,
    PATCH_FRAMES,
    SAMPLE_RATE,
    frames_to_seconds,
)
from sslam_core.audio.decode import audio_info, stream_audio
from sslam_core.audio.files import AudioError, AudioFile, AudioSource
from sslam_core.audio.resample import resample
from sslam_core.errors import OptionError


def window_samples(frames: int) -> int:
    """Samples needed for `frames` fbank frames."""
    return FRAME_SAMPLES + (frames - 1) * HOP_SAMPLES


def num_frames(samples: int) -> int:
    """Fbank frames of a wave of `samples` samples (Kaldi snip_edges)."""
    return 0 if samples < FRAME_SAMPLES else 1 + (samples - FRAME_SAMPLES) // HOP_SAMPLES


def num_windows(frames: int, window: int, hop: int) -> int:
    """Windows of `window` frames every `hop` frames over `frames` frames of audio: enough to reach the
    end (the last one padded), but none starting at or past the end (a hop longer than the window
    leaves gaps instead)."""
    if frames <= window:
        return 1
    return min(1 + math.ceil((frames - window) / hop), 1 + (frames - 1) // hop)


def seconds_to_frames(seconds: float, multiple: int = PATCH_FRAMES) -> int:
    """Seconds -> fbank frames, rounded to a whole number of time patches."""
    frames = round(seconds * FRAMES_PER_SECOND / multiple) * multiple
    if frames <= 0:
        raise OptionError(f"{seconds} s is shorter than one {multiple * 10} ms patch")
    return frames


def resolve_window(
    model: nn.Module, window: float | None = None, hop: float | None = None, target_length: int | None = None
) -> tuple[int, int]:
    """(window, hop) in frames: `target_length` frames, else `window` seconds, else the length the
    model was trained with, else 1024; the hop defaults to the window."""
    for name, value in (("--window", window), ("--hop", hop)):
        if value is not None and not (math.isfinite(value) and value >= PATCH_FRAMES / FRAMES_PER_SECOND):
            raise OptionError(
                f"{name} {value}: expected at least {PATCH_FRAMES / FRAMES_PER_SECOND} s (one time patch)"
            )
    if target_length is not None and (target_length <= 0 or target_length % PATCH_FRAMES):
        raise OptionError(f"--target-length {target_length}: expected a positive multiple of {PATCH_FRAMES}")
    frames = target_length or (seconds_to_frames(window) if window else None)
    frames = frames or getattr(model, "target_length", None) or DEFAULT_TARGET_LENGTH
    if frames <= 0 or frames % PATCH_FRAMES:
        raise OptionError(f"the window must be a positive multiple of {PATCH_FRAMES} frames, got {frames}")
    limit = max_frames(model)
    if limit is not None and frames > limit:
        raise OptionError(
            f"a window of {frames} frames ({frames_to_seconds(frames):.2f} s) is longer than this model's "
            f"position table holds ({limit} frames, {frames_to_seconds(limit):.2f} s)"
        )
    return frames, seconds_to_frames(hop) if hop else frames


def max_frames(model: nn.Module) -> int | None:
    """The longest input in frames that `model`'s position table covers (None if it has none)."""
    encoder = getattr(model, "encoder", model)
    table, cfg = getattr(encoder, "pos_embed", None), getattr(encoder, "cfg", None)
    if table is None or cfg is None:
        return None
    return table.shape[1] // cfg.freq_patches * cfg.patch_size


def window_warning(model: nn.Module, frames: int) -> str | None:
    """A note when windows are longer than the audio the model was trained on: it still runs (the
    position table is longer), but on inputs it has never seen."""
    trained = getattr(model, "target_length", None) or DEFAULT_TARGET_LENGTH
    if frames > trained:
        return (
            f"note: windows of {frames_to_seconds(frames):.2f} s are longer than the "
            f"{frames_to_seconds(trained):.2f} s this model was trained on; its outputs on them are untested"
        )
    return None


@dataclass
class Window:
    """One model input cut from a file: its wave and where it starts; on CPU, `input` is its model
    input (1, 1, T, 128), computed where it was decoded, and `wave` is then dropped (None)."""

    file: int
    index: int
    start_frame: int
    wave: Tensor | None
    input: Tensor | None = None


@dataclass
class FileWindows:
    """A file being cut into windows. `windows` is a list for files decoded ahead by a worker, or
    a generator for long files streamed in place; `samples` is known once it is exhausted."""

    path: str
    windows: Iterable[Window]
    samples: int = 0

    @property
    def duration(self) -> float:
        return self.samples / SAMPLE_RATE


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


@dataclass(frozen=True)
class Shifted:
    """A source read from its `frames`-th 10 ms frame on: the windows of a shifted pass (finer time
    steps than one 160 ms patch, see `embeddings.embed`'s `frame_hop`)."""

    source: str | tuple[Tensor, int]
    frames: int


# a file path, an in-memory (wave, sample_rate), a member of another file (a tar shard's), a
# self-decoding source, or any of these shifted
Source = str | tuple[Tensor, int] | AudioFile | AudioSource | Shifted

STREAM_SECONDS = 300.0  # files longer than this are cut while decoding, not decoded ahead


def source_name(source: Source, i: int) -> str:
    # paths and waveforms first: an isinstance check against a Protocol costs microseconds
    if isinstance(source, str | tuple):
        return source if isinstance(source, str) else f"<waveform {i}>"
    if isinstance(source, Shifted):
        return source_name(source.source, i)
    return source.name


def _skip(blocks: Iterable[Tensor], samples: int) -> Iterator[Tensor]:
    for block in blocks:
        if samples >= len(block):
            samples -= len(block)
            continue
        yield block[samples:]
        samples = 0


def _blocks(source: Source, name: str, block_seconds: float) -> Iterable[Tensor]:
    if isinstance(source, Shifted):
        return _skip(_blocks(source.source, name, block_seconds), source.frames * HOP_SAMPLES)
    if isinstance(source, str | AudioFile):
        return stream_audio(source, SAMPLE_RATE, block_seconds=block_seconds)
    if isinstance(source, AudioSource):
        return source.blocks(block_seconds)
    wave, sr = source
    wave = torch.as_tensor(wave, dtype=torch.float32)
    if wave.ndim == 2:  # (channels, samples)
        wave = wave.mean(dim=0)
    if not torch.isfinite(wave).all():
        raise AudioError(name, "waveform contains NaN or infinite values")
    return [resample(wave, sr, SAMPLE_RATE) if sr != SAMPLE_RATE else wave]


def _window_stream(
    source: Source, file: int, window: int, hop: int, out: FileWindows, block_seconds: float
) -> Iterator[Window]:
    """Decode `source` block by block and yield its windows of `window` frames every `hop` frames.

    Only the samples of windows not yet emitted are held, never the file at its original rate.
    """
    span, step = window_samples(window), hop * HOP_SAMPLES
    buffer, offset, total, count = torch.zeros(0), 0, 0, 0  # buffer[0] is sample `offset`

    def emit(final: bool) -> Iterator[Window]:
        nonlocal buffer, offset, count
        while True:
            start = count * step
            if not final and start + span > total:
                break
            if final and count >= num_windows(num_frames(total), window, hop):
                break
            yield Window(
                file, count, start // HOP_SAMPLES, buffer[start - offset : start - offset + span].clone()
            )
            count += 1
        if count * step > offset:
            buffer = buffer[count * step - offset :]
            offset = count * step

    for block in _blocks(source, out.path, block_seconds):
        buffer = torch.cat([buffer, block.float()])
        total += len(block)
        yield from emit(final=False)
    if total == 0:
        raise AudioError(out.path, "no audio samples")
    if total < FRAME_SAMPLES:
        raise AudioError(out.path, f"too short ({total} samples at 16 kHz, the minimum is 400 = 25 ms)")
    out.samples = total
    yield from emit(final=True)


def cut_windows(
    source: Source,
    file: int,
    window: int,
    hop: int,
    lazy: bool = False,
    block_seconds: float = 10.0,
    name: str | None = None,
) -> FileWindows:
    """Cut `source` into windows: all at once (a list), or `lazy`ly while decoding (a generator).
    `name` is how messages refer to it (default: its path)."""
    out = FileWindows(name or source_name(source, file), [])
    stream = _window_stream(source, file, window, hop, out, block_seconds)
    out.windows = stream if lazy else list(stream)
    return out


def file_error(name: str, e: Exception) -> FileResult:
    """The one-line reason a file was skipped: `NAME: reason`."""
    if isinstance(e, AudioError):
        return FileResult(name, error=f"{name}: {e.reason}")
    reason = (str(e).splitlines() or [""])[0].strip()
    return FileResult(name, error=f"{name}: {type(e).__name__}" + (f": {reason}" if reason else ""))


def is_long(source: Source) -> bool:
    if isinstance(source, tuple):
        return False
    if isinstance(source, Shifted):
        return is_long(source.source)
    if isinstance(source, AudioSource) and not isinstance(source, AudioFile):
        return (source.seconds() or 0.0) > STREAM_SECONDS
    try:
        return audio_info(source)[3] > STREAM_SECONDS
    except Exception:  # decoding will report the problem
        return False


def in_memory(source: Source) -> bool:
    """A waveform already in this process: nothing to decode, only to resample and cut."""
    return in_memory(source.source) if isinstance(source, Shifted) else isinstance(source, tuple)
