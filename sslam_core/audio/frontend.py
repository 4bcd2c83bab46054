"""Kaldi-compatible log-mel front end (spec section 1): waveforms -> normalised (B, 1, T, 128) model input.

The chain is explicit: `prepare_input` = resample -> subtract each wave's mean -> `fbank` -> `pad_or_crop`
-> `normalize`. `fbank` (alias `log_mel`) is the raw Kaldi fbank and does not remove the waveform mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from sslam_core.audio.constants import FRAME_SAMPLES, HOP_SAMPLES, N_FFT, N_MELS, NORMALIZATION, SAMPLE_RATE
from sslam_core.audio.resample import resample
from sslam_core.errors import OptionError

LOW_HZ = 20.0
PREEMPHASIS = 0.97
EPS = torch.finfo(torch.float32).eps
CPU_BLOCK_FRAMES = 512
DEVICE_BLOCK_FRAMES = 1 << 20

Waves = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]


def _hz_to_mel(hz: torch.Tensor | float) -> torch.Tensor | float:
    """Kaldi's mel scale, 1127 ln(1 + f/700)."""
    if isinstance(hz, torch.Tensor):
        return 1127.0 * (1.0 + hz / 700.0).log()
    return 1127.0 * math.log(1.0 + hz / 700.0)


def mel_filter_bank() -> torch.Tensor:
    """(N_FFT//2 + 1, N_MELS) Kaldi triangular mel filters, built in float32; the Nyquist row is zero, and
    so is bin 3 (92-123 Hz holds no FFT bin). Public for ports of the front end to other languages."""
    low, high = _hz_to_mel(LOW_HZ), _hz_to_mel(SAMPLE_RATE / 2)
    delta = (high - low) / (N_MELS + 1)
    bins = torch.arange(N_MELS).unsqueeze(1)
    left = low + bins * delta
    center = low + (bins + 1.0) * delta
    right = low + (bins + 2.0) * delta
    mel = _hz_to_mel((SAMPLE_RATE / N_FFT) * torch.arange(float(N_FFT // 2))).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.max(torch.zeros(1), torch.min(up, down))
    return F.pad(banks, (0, 1)).T.contiguous()


@lru_cache(maxsize=16)
def _constants(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mel matrix, symmetric Hann window and log floor, cached per device and dtype."""
    mel = mel_filter_bank().to(device=device, dtype=dtype)
    window = torch.hann_window(FRAME_SAMPLES, periodic=False, device=device, dtype=dtype)
    eps = torch.tensor(EPS, device=device, dtype=dtype)
    return mel, window, eps


def num_frames(num_samples: int) -> int:
    """Frames Kaldi's snip_edges framing yields: 1 + (n - 400) // 160, or 0 below one window."""
    return 0 if num_samples < FRAME_SAMPLES else 1 + (num_samples - FRAME_SAMPLES) // HOP_SAMPLES


def _as_batch(waves: torch.Tensor | np.ndarray) -> torch.Tensor:
    """1-D or (B, samples) array/tensor -> floating (B, samples) tensor."""
    x = torch.as_tensor(waves)
    if not x.is_floating_point():
        x = x.float()
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"expected a 1-D wave or (batch, samples), got shape {tuple(x.shape)}")
    return x


def _log_mel_frames(
    frames: torch.Tensor, mel: torch.Tensor, window: torch.Tensor, eps: torch.Tensor, out: torch.Tensor
) -> None:
    """(n, 400) frames -> log-mel in out (n, 128): DC removal, pre-emphasis, Hann, |rfft|^2, mel, log."""
    x = frames - frames.mean(dim=-1, keepdim=True)
    previous = PREEMPHASIS * x[:, :-1]
    x[:, :1] -= PREEMPHASIS * x[:, :1]
    x[:, 1:] -= previous
    x *= window
    power = torch.fft.rfft(x, n=N_FFT).abs().pow_(2.0)
    torch.mm(power, mel, out=out)
    out.clamp_min_(eps).log_()


def fbank(waves: torch.Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Kaldi fbank (htk_compat, Hann, 128 bins, no dither/energy) of a batch: (B, frames, 128) log-mel."""
    x = _as_batch(waves)
    if sample_rate != SAMPLE_RATE:
        x = resample(x, sample_rate, SAMPLE_RATE)
    batch, n = x.shape
    frames = num_frames(n)
    out = x.new_empty(batch, frames, N_MELS)
    if frames == 0:
        return out
    mel, window, eps = _constants(x.device, x.dtype)
    x = x.contiguous()
    strided = x.as_strided((batch, frames, FRAME_SAMPLES), (x.stride(0), HOP_SAMPLES, 1))
    # Work in blocks of frames: on CPU small blocks stay in cache, elsewhere they bound peak memory.
    step = CPU_BLOCK_FRAMES if x.device.type == "cpu" else DEVICE_BLOCK_FRAMES
    if frames >= step:
        for b in range(batch):
            for start in range(0, frames, step):
                stop = min(start + step, frames)
                _log_mel_frames(strided[b, start:stop], mel, window, eps, out[b, start:stop])
    else:
        clips = max(1, step // frames)
        for start in range(0, batch, clips):
            chunk = strided[start : start + clips]
            _log_mel_frames(
                chunk.reshape(-1, FRAME_SAMPLES),
                mel,
                window,
                eps,
                out[start : start + clips].view(-1, N_MELS),
            )
    return out


log_mel = fbank


def pad_or_crop(fb: torch.Tensor, target_length: int) -> torch.Tensor:
    """Zero-pad (log-mel domain) at the end or keep the first target_length frames of (..., T, mels)."""
    frames = fb.shape[-2]
    if frames >= target_length:
        return fb[..., :target_length, :]
    return F.pad(fb, (0, 0, 0, target_length - frames))


def normalize(fb: torch.Tensor, norm: str | tuple[float, float] = "audioset") -> torch.Tensor:
    """(fb - mean) / (2 * std) with a named dataset preset or an explicit (mean, std)."""
    if isinstance(norm, str):
        if norm not in NORMALIZATION:
            raise OptionError(f"unknown normalisation {norm!r}; choose from {sorted(NORMALIZATION)}")
        norm = NORMALIZATION[norm]
    mean, std = norm
    return (fb - mean) / (2 * std)


def _wave_list(waves: Waves) -> list[torch.Tensor]:
    """Split any accepted input into a list of 1-D float32 tensors (the official chain runs in float32)."""
    if isinstance(waves, (torch.Tensor, np.ndarray)):
        return list(_as_batch(waves).float())
    out = []
    for w in waves:
        t = torch.as_tensor(w).float()
        if t.ndim != 1:
            raise ValueError(f"each wave in a list must be 1-D, got shape {tuple(t.shape)}")
        out.append(t)
    return out


def prepare_input(
    waves: Waves,
    sample_rate: int = SAMPLE_RATE,
    target_length: int = 1024,
    norm: str | tuple[float, float] = "audioset",
) -> torch.Tensor:
    """The official chain: resample, remove each wave's mean, fbank, pad/crop, normalise -> (B, 1, T, 128)."""
    items = _wave_list(waves)
    if not items:
        raise ValueError("prepare_input needs at least one wave")
    if sample_rate != SAMPLE_RATE:
        items = [resample(w, sample_rate, SAMPLE_RATE) for w in items]
    # Only the first target_length frames survive the crop; later samples never reach a kept frame.
    keep = (target_length - 1) * HOP_SAMPLES + FRAME_SAMPLES
    items = [(w - w.mean())[:keep] for w in items]
    longest = max(w.shape[0] for w in items)
    if all(w.shape[0] == longest for w in items):
        batch = torch.stack(items)
    else:
        batch = torch.stack([F.pad(w, (0, longest - w.shape[0])) for w in items])
    fb = pad_or_crop(fbank(batch), target_length)
    valid = torch.tensor([num_frames(w.shape[0]) for w in items], device=fb.device)
    rows = torch.arange(target_length, device=fb.device)
    fb = fb.masked_fill((rows[None, :] >= valid[:, None])[..., None], 0.0)
    return normalize(fb, norm)[:, None]
