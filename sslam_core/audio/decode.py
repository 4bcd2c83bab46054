"""Audio decoding and streaming: any file (or tar member) in, 1-D float32 mono at 16 kHz out.

libsndfile (soundfile) reads the containers it knows; PyAV, an optional extra, reads the rest. Long
files are decoded block by block and resampled as they stream (`audio.resample`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import soundfile as sf
import torch

from sslam_core.audio.constants import SAMPLE_RATE
from sslam_core.audio.files import (
    AV_EXTENSIONS,
    AV_FALLBACK_EXTENSIONS,
    SOUNDFILE_EXTENSIONS,
    AudioError,
    AudioFile,
    AudioInput,
)
from sslam_core.audio.resample import StreamingResampler, resample
from sslam_core.audio.tar import member_by_name


def resolve_input(path: AudioInput) -> AudioInput:
    """A name `SHARD.tar/MEMBER` that is no file on disk stands for that member of the shard, so that
    the names stored in outputs, label sets and split files read their audio back; a shard itself is
    refused with the reason (see `tar.member_by_name`)."""
    if isinstance(path, AudioFile):
        return path
    text = os.fspath(path)
    lower = text.lower() if isinstance(text, str) else ""
    if ".tar" in lower and (lower.endswith(".tar") or not os.path.exists(text)):
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
    path: AudioInput, sample_rate: int = SAMPLE_RATE, block_seconds: float = 30.0
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


def load_audio(path: AudioInput, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
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
