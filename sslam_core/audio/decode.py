"""Audio decoding, band-limited resampling and streaming: any file in, 1-D float32 mono at 16 kHz out."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from functools import lru_cache
from typing import BinaryIO, Protocol, runtime_checkable

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99

# Containers libsndfile reads natively; anything else with a known extension goes to PyAV.
SOUNDFILE_EXTENSIONS = {
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd",
    ".caf", ".w64", ".rf64", ".voc", ".sd2", ".htk", ".sph", ".nist", ".ircam", ".sf", ".mat",
}  # fmt: skip
AV_EXTENSIONS = {
    ".m4a", ".aac", ".mp4", ".m4b", ".mov", ".webm", ".mkv", ".mka", ".opus", ".wma", ".wmv",
    ".3gp", ".amr", ".ac3", ".avi", ".mpeg", ".mpg", ".ts",
}  # fmt: skip
# libsndfile support for these depends on its build; fall back to PyAV when it refuses them.
AV_FALLBACK_EXTENSIONS = {".mp3", ".ogg", ".oga"}


class AudioError(Exception):
    """An audio file that cannot be decoded into finite samples; the message names the file and why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


# ---------------------------------------------------------------------------------------------------------
# Resampling: windowed-sinc (Hann) polyphase filter, the same arithmetic as torchaudio's defaults.


def _reduced_rates(orig_sr: int, new_sr: int) -> tuple[int, int]:
    """Divide both rates by their gcd: the polyphase filter has one row per output phase."""
    if int(orig_sr) != orig_sr or int(new_sr) != new_sr or orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive integers, got {orig_sr} and {new_sr}")
    g = math.gcd(int(orig_sr), int(new_sr))
    return int(orig_sr) // g, int(new_sr) // g


@lru_cache(maxsize=32)
def _sinc_kernel(orig: int, new: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Hann-windowed sinc filter bank (new, 1, 2*width+orig) and its one-sided width, for reduced rates."""
    base = min(orig, new) * ROLLOFF
    width = math.ceil(LOWPASS_FILTER_WIDTH * orig / base)
    idx = torch.arange(-width, width + orig, dtype=dtype, device=device)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=dtype, device=device)[:, None, None] / new + idx
    t *= base
    t = t.clamp_(-LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)
    window = torch.cos(t * math.pi / LOWPASS_FILTER_WIDTH / 2) ** 2
    t *= math.pi
    kernel = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t)
    kernel *= window * (base / orig)
    return kernel, width


def _resampled_length(length: int, orig: int, new: int) -> int:
    """ceil(new * length / orig) in exact integer arithmetic."""
    return -(-new * length // orig)


def _polyphase(padded: torch.Tensor, kernel: torch.Tensor, orig: int) -> torch.Tensor:
    """Run the filter bank over (N, L) already-padded signals; phases interleaved into (N, L')."""
    out = F.conv1d(padded[:, None], kernel, stride=orig)
    return out.transpose(1, 2).reshape(padded.shape[0], -1)


def resample(x: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Band-limited resampling over the last axis; matches torchaudio.functional.resample's defaults."""
    orig, new = _reduced_rates(orig_sr, new_sr)
    if orig == new:
        return x
    if not x.is_floating_point():
        raise TypeError(f"resample needs a floating-point tensor, got {x.dtype}")
    kernel, width = _sinc_kernel(orig, new, x.device, x.dtype)
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    out = _polyphase(F.pad(flat, (width, width + orig)), kernel, orig)
    out = out[:, : _resampled_length(shape[-1], orig, new)]
    return out.reshape(*shape[:-1], out.shape[-1])


class StreamingResampler:
    """Feeds a long signal block by block; concatenated outputs equal one `resample` of the whole signal."""

    def __init__(self, orig_sr: int, new_sr: int, dtype: torch.dtype = torch.float32):
        self.orig, self.new = _reduced_rates(orig_sr, new_sr)
        self.kernel, self.width = _sinc_kernel(self.orig, self.new, torch.device("cpu"), dtype)
        self.dtype = dtype
        # The whole-signal filter starts `width` zeros before sample 0: keep that left context here.
        self.buffer = torch.zeros(self.width, dtype=dtype)
        self.seen = 0
        self.emitted = 0

    def push(self, block: torch.Tensor) -> torch.Tensor:
        """Consume 1-D samples; return every output sample whose filter window is now complete."""
        if self.orig == self.new:
            self.seen += block.shape[-1]
            return block
        self.seen += block.shape[-1]
        self.buffer = torch.cat([self.buffer, block.to(self.dtype)])
        return self._run(final=False)

    def flush(self) -> torch.Tensor:
        """Pad the tail with zeros exactly as the whole-signal filter does and emit the last samples."""
        if self.orig == self.new:
            return torch.zeros(0, dtype=self.dtype)
        self.buffer = torch.cat([self.buffer, torch.zeros(self.width + self.orig, dtype=self.dtype)])
        return self._run(final=True)

    def _run(self, final: bool) -> torch.Tensor:
        taps = self.kernel.shape[-1]
        steps = (self.buffer.shape[0] - taps) // self.orig + 1 if self.buffer.shape[0] >= taps else 0
        if steps <= 0:
            return torch.zeros(0, dtype=self.dtype)
        used = (steps - 1) * self.orig + taps
        out = _polyphase(self.buffer[None, :used], self.kernel, self.orig)[0]
        self.buffer = self.buffer[steps * self.orig :]
        if final:
            out = out[: _resampled_length(self.seen, self.orig, self.new) - self.emitted]
        self.emitted += out.shape[0]
        return out


# ---------------------------------------------------------------------------------------------------------
# Decoding.


@runtime_checkable
class AudioFile(Protocol):
    """Encoded audio held inside another file (a member of a tar shard), decoded without unpacking it:
    `name` for messages and the choice of decoder by extension, `size` in bytes, and `open()`, a
    seekable binary file object over exactly its bytes (libsndfile and PyAV both read those)."""

    name: str
    size: int

    def open(self) -> BinaryIO:
        """A new seekable binary file object positioned at its first byte."""
        ...


AudioInput = str | os.PathLike | AudioFile


def resolve_input(path: AudioInput) -> AudioInput:
    """A name `SHARD.tar/MEMBER` that is no file on disk stands for that member of the shard, so that
    the names stored in outputs, label sets and split files read their audio back; a shard itself is
    refused with the reason (see `shards.member_by_name`)."""
    if isinstance(path, AudioFile):
        return path
    text = os.fspath(path)
    lower = text.lower() if isinstance(text, str) else ""
    if ".tar" in lower and (lower.endswith(".tar") or not os.path.exists(text)):
        from sslam_core.data.shards import member_by_name

        return member_by_name(text) or path
    return path


def _name(path: AudioInput) -> str:
    """How messages name a file or member."""
    return path.name if isinstance(path, AudioFile) else str(path)


def _target(path: AudioInput):
    """What the decoders open: the path, or a new file object over the member (see `_release`)."""
    return path.open() if isinstance(path, AudioFile) else str(path)


def _release(target) -> None:
    """Close a file object made by `_target` (a path needs nothing)."""
    if not isinstance(target, str):
        target.close()


def _check_path(path: AudioInput) -> str:
    """Return the extension of an existing, non-empty regular file (or member), or raise AudioError."""
    if isinstance(path, AudioFile):
        if path.size == 0:
            raise AudioError(path.name, "file is empty (0 bytes)")
        return os.path.splitext(path.name)[1].lower()
    if not os.path.exists(path):
        raise AudioError(path, "file not found")
    if not os.path.isfile(path):
        raise AudioError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise AudioError(path, "file is empty (0 bytes)")
    return os.path.splitext(str(path))[1].lower()


def _backend(path: AudioInput) -> str:
    """Pick the decoder for a file: 'soundfile' or 'av'."""
    ext = _check_path(path)
    if ext in AV_EXTENSIONS:
        return "av"
    if ext in SOUNDFILE_EXTENSIONS:
        return "soundfile"
    target = _target(path)
    try:
        sf.info(target)
    except Exception as err:
        raise AudioError(_name(path), f"unsupported file type {ext or '(no extension)'!r}") from err
    finally:
        _release(target)
    return "soundfile"


def _import_av(path: AudioInput):
    """Import PyAV or explain how to install it."""
    try:
        import av
    except ImportError as err:
        ext = os.path.splitext(_name(path))[1].lower() or "these"
        raise AudioError(
            _name(path), f"install sslam[av] to read {ext} files (pip install 'sslam[av]')"
        ) from err
    return av


def _sf_error(path: AudioInput, err: Exception, target=None) -> AudioError:
    """Turn a libsndfile exception into a one-line AudioError (`target`: what libsndfile was given)."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    opened = str(path) if target is None or isinstance(target, str) else target
    reason = reason.replace(f"Error opening {opened!r}: ", "")
    return AudioError(_name(path), f"cannot decode audio ({reason.strip()})")


def _av_reason(err: Exception) -> str:
    """FFmpeg's reason without the errno and file name PyAV wraps it in."""
    reason = getattr(err, "strerror", None) or (str(err).splitlines() or [type(err).__name__])[0]
    return str(reason).strip()


def _mono(samples: np.ndarray) -> torch.Tensor:
    """(frames, channels) float32 -> 1-D float32 by the channel mean."""
    x = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    return x.mean(dim=1) if x.ndim == 2 else x


def _check_finite(path: AudioInput, x: torch.Tensor) -> None:
    """Reject NaN or infinite samples: they would silently poison every feature downstream."""
    if not bool(torch.isfinite(x).all()):
        raise AudioError(_name(path), "contains NaN or infinite samples")


def _check_riff_complete(path: AudioInput) -> None:
    """libsndfile silently reads a cut-off WAV; compare the declared data chunk size with the file size."""
    member = isinstance(path, AudioFile)
    size = path.size if member else os.path.getsize(path)
    with path.open() if member else open(path, "rb") as f:
        if f.read(4) != b"RIFF" or len(f.read(4)) < 4 or f.read(4) != b"WAVE":
            return
        offset = 12
        while offset + 8 <= size:
            f.seek(offset)
            chunk, declared = f.read(4), int.from_bytes(f.read(4), "little")
            if chunk == b"data":
                if declared not in (0, 0xFFFFFFFF) and offset + 8 + declared > size:
                    held = size - offset - 8
                    raise AudioError(
                        _name(path), f"truncated WAV: header declares {declared} data bytes, file has {held}"
                    )
                return
            offset += 8 + declared + (declared & 1)


def _sf_blocks(path: AudioInput, block_seconds: float) -> tuple[int, Iterator[torch.Tensor]]:
    """Open with libsndfile; return the rate and a generator of mono blocks."""
    target = _target(path)
    try:
        handle = sf.SoundFile(target)
    except Exception as err:
        _release(target)
        raise _sf_error(path, err, target) from err
    try:
        _check_riff_complete(path)
    except AudioError:
        handle.close()
        _release(target)
        raise
    block_frames = max(1, int(block_seconds * handle.samplerate))

    def blocks() -> Iterator[torch.Tensor]:
        try:
            with handle:
                while True:
                    try:
                        data = handle.read(block_frames, dtype="float32", always_2d=True)
                    except Exception as err:
                        raise _sf_error(path, err, target) from err
                    if data.shape[0] == 0:
                        return
                    yield _mono(data)
                    if data.shape[0] < block_frames:
                        return
        finally:
            _release(target)

    return handle.samplerate, blocks()


def _av_blocks(path: AudioInput) -> tuple[int, Iterator[torch.Tensor]]:
    """Open with PyAV; return the rate and a generator of mono blocks (one per decoded frame)."""
    av = _import_av(path)
    name, target, container = _name(path), _target(path), None
    try:
        container = av.open(target)
        stream = next(s for s in container.streams if s.type == "audio")
    except StopIteration as err:
        container.close()
        _release(target)
        raise AudioError(name, "no audio stream") from err
    except Exception as err:
        if container is not None:
            container.close()
        _release(target)
        raise AudioError(name, f"cannot decode audio ({_av_reason(err)})") from err
    rate = stream.codec_context.sample_rate or stream.rate
    if not rate:
        container.close()
        _release(target)
        raise AudioError(name, "audio stream has no sample rate")

    def blocks() -> Iterator[torch.Tensor]:
        with container:
            try:
                for frame in container.decode(stream):
                    data = frame.to_ndarray()
                    if frame.format.is_planar:
                        data = data.T
                    else:
                        data = data.reshape(-1, len(frame.layout.channels))
                    if data.dtype.kind in "iu":
                        scale = float(2 ** (8 * data.dtype.itemsize - 1))
                        offset = scale if data.dtype.kind == "u" else 0.0
                        data = (data.astype(np.float32) - offset) / scale
                    yield _mono(data)
            except Exception as err:
                raise AudioError(name, f"cannot decode audio ({_av_reason(err)})") from err
            finally:
                _release(target)

    return int(rate), blocks()


def _open_blocks(path: AudioInput, block_seconds: float) -> tuple[int, Iterator[torch.Tensor]]:
    """Open any supported file as (rate, mono blocks), choosing the decoder by extension."""
    if _backend(path) == "av":
        return _av_blocks(path)
    try:
        return _sf_blocks(path, block_seconds)
    except AudioError as err:
        ext = os.path.splitext(_name(path))[1].lower()
        if ext not in AV_FALLBACK_EXTENSIONS or not _av_available():
            raise err from None  # libsndfile's reason stands: PyAV, the fallback, is not installed
        return _av_blocks(path)


def _av_available() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def audio_info(path: AudioInput) -> tuple[int, int, int, float]:
    """(sample_rate, num_frames, channels, duration_s) from the header, without decoding the samples.
    `path` may also be an `AudioFile` (a tar member) or a `SHARD.tar/MEMBER` name."""
    path = resolve_input(path)
    name = _name(path)
    if _backend(path) == "soundfile":
        target = _target(path)
        try:
            _check_riff_complete(path)
            info = sf.info(target)
            return info.samplerate, info.frames, info.channels, info.frames / info.samplerate
        except AudioError:
            raise
        except Exception as err:
            ext = os.path.splitext(name)[1].lower()
            if ext not in AV_FALLBACK_EXTENSIONS or not _av_available():
                raise _sf_error(path, err, target) from err
        finally:
            _release(target)
    av = _import_av(path)
    target = _target(path)
    try:
        with av.open(target) as container:
            stream = next(s for s in container.streams if s.type == "audio")
            rate = int(stream.codec_context.sample_rate or stream.rate)
            channels = len(stream.codec_context.layout.channels)
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                seconds = container.duration / 1_000_000
            else:
                seconds = sum(f.samples for f in container.decode(stream)) / rate
    except StopIteration as err:
        raise AudioError(name, "no audio stream") from err
    except Exception as err:
        raise AudioError(name, f"cannot read audio header ({_av_reason(err)})") from err
    finally:
        _release(target)
    frames = round(seconds * rate)
    return rate, frames, channels, frames / rate


def stream_audio(
    path: AudioInput, sample_rate: int = 16000, block_seconds: float = 30.0
) -> Iterator[torch.Tensor]:
    """Yield 1-D float32 mono blocks at sample_rate; memory stays bounded however long the file is.
    `path` may also be an `AudioFile` (a tar member) or a `SHARD.tar/MEMBER` name."""
    path = resolve_input(path)
    rate, blocks = _open_blocks(path, block_seconds)
    resampler = StreamingResampler(rate, sample_rate)
    block_out = max(1, int(block_seconds * sample_rate))
    pending: list[torch.Tensor] = []
    pending_len = 0
    seen = 0
    for block in blocks:
        _check_finite(path, block)
        seen += block.shape[0]
        out = resampler.push(block)
        if out.numel():
            pending.append(out)
            pending_len += out.shape[0]
        while pending_len >= block_out:
            joined = torch.cat(pending)
            yield joined[:block_out]
            pending, pending_len = [joined[block_out:]], joined.shape[0] - block_out
    if seen == 0:
        raise AudioError(_name(path), "contains no samples")
    tail = resampler.flush()
    rest = torch.cat([*pending, tail])
    if rest.numel():
        yield rest


def load_audio(path: AudioInput, sample_rate: int = 16000) -> torch.Tensor:
    """Decode a whole file to 1-D float32 mono at sample_rate (channels averaged, then resampled).
    `path` may also be an `AudioFile` (a tar member) or a `SHARD.tar/MEMBER` name."""
    path = resolve_input(path)
    rate, blocks = _open_blocks(path, 60.0)
    parts = list(blocks)
    x = torch.cat(parts) if parts else torch.zeros(0)
    if x.numel() == 0:
        raise AudioError(_name(path), "contains no samples")
    _check_finite(path, x)
    return resample(x, rate, sample_rate).contiguous()
