"""Time the batched Kaldi fbank against a per-clip loop (torchaudio's kaldi.fbank when it imports).

Usage: python scripts/bench_frontend.py [--clips 32] [--passes 10] [--threads 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from sslam_core.audio.frontend import fbank


def reference_loop() -> tuple[str, Callable[[torch.Tensor], list[torch.Tensor]]]:
    """The per-clip baseline: torchaudio's kaldi.fbank if installed, else our fbank one clip at a time."""
    try:
        from torchaudio.compliance import kaldi
    except Exception:
        return "sslam fbank, one clip at a time", lambda waves: [fbank(w - w.mean()) for w in waves]
    options = dict(
        htk_compat=True,
        sample_frequency=16000,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    )
    return "torchaudio kaldi.fbank loop", lambda waves: [
        kaldi.fbank((w - w.mean())[None], **options) for w in waves
    ]


def timed(fns: list[Callable[[], object]], device: torch.device, passes: int) -> list[float]:
    """Median wall time of each function over `passes` interleaved rounds, after one warm-up round."""
    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(passes + 1):
        for fn, bucket in zip(fns, times, strict=True):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_:
                bucket.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    """Build seeded 10-s noise clips and print ms/clip for both paths and the speed-up."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--passes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    waves = (0.1 * torch.randn(args.clips, int(args.seconds * 16000), generator=generator)).to(device)

    name, loop = reference_loop()
    batched, looped = timed(
        [lambda: fbank(waves - waves.mean(dim=1, keepdim=True)), lambda: loop(waves)], device, args.passes
    )
    setup = f"{args.clips} x {args.seconds:g}-s clips, {args.threads} threads, median of {args.passes}"
    print(f"device {device}, {setup}")
    print(f"batched sslam fbank: {1000 * batched / args.clips:7.2f} ms/clip")
    print(f"{name + ':':<20} {1000 * looped / args.clips:7.2f} ms/clip")
    print(f"speed-up: {looped / batched:.2f}x")


if __name__ == "__main__":
    main()
