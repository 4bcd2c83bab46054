"""Band-limited resampling: a Hann-windowed sinc polyphase filter with torchaudio's default arithmetic,
for whole signals (`resample`) and block by block (`StreamingResampler`, equal to one whole call)."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

LOWPASS_FILTER_WIDTH = 6

ROLLOFF = 0.99


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
