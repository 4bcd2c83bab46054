"""The batched Kaldi fbank against a per-clip loop (torchaudio's kaldi.fbank when it imports).

    python scripts/bench.py frontend [--clips 32] [--passes 10] [--threads 2] [--device cpu|cuda]

Seeded 10 s noise clips; prints ms/clip of both paths (median of --passes interleaved rounds after
one warm-up round) and the speed-up.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from sslam_core.audio.frontend import fbank

from .common import print_machine, timed


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--passes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> None:
    """Build seeded noise clips and print ms/clip for both paths and the speed-up."""
    torch.set_num_threads(args.threads)
    print_machine()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    waves = (0.1 * torch.randn(args.clips, int(args.seconds * 16000), generator=generator)).to(device)

    name, loop = reference_loop()
    runs = {"batched": lambda: fbank(waves - waves.mean(dim=1, keepdim=True)), "looped": lambda: loop(waves)}
    times = timed(runs, repeats=args.passes, warmup=1, device=device)
    batched, looped = times["batched"].median, times["looped"].median
    setup = f"{args.clips} x {args.seconds:g}-s clips, {args.threads} threads, median of {args.passes}"
    print(f"device {device}, {setup}")
    print(f"batched sslam fbank: {1000 * batched / args.clips:7.2f} ms/clip")
    print(f"{name + ':':<20} {1000 * looped / args.clips:7.2f} ms/clip")
    print(f"speed-up: {looped / batched:.2f}x")
