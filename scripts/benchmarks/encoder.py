"""Our ViT-B encoder against an eager reference with the official structure, same weights.

The reference (`benchmarks.reference`) computes attention explicitly (q @ k^T * scale, softmax in
fp32, @ v) in separate modules, loaded from the same state dict. Prints seconds per clip, the speed-up,
the largest output difference and achieved GFLOP/s against a measured matmul peak.

    python scripts/bench.py encoder --batch 4
    python scripts/bench.py encoder --device cuda --dtype bf16 --batch 32
"""

from __future__ import annotations

import argparse

import torch

from sslam_core.models.transformer import Encoder, count_flops, preset

from .common import print_machine, timed
from .reference import RefEncoder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    """Measured GFLOP/s of an n x n matmul (the practical ceiling for this model)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    with torch.inference_mode():
        seconds = timed({"matmul": lambda: a @ b}, repeats=10, warmup=3, device=device)["matmul"].median
    return 2 * n**3 / seconds / 1e9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")


def run(args: argparse.Namespace) -> None:
    """Seeded ViT-B twice (ours, the reference), one random batch: s/clip, speed-up, GFLOP/s, peak."""
    torch.set_num_threads(args.threads)
    print_machine()
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    cfg = preset("base")
    ours = Encoder(cfg).eval()
    ref = RefEncoder(cfg).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours, ref = ours.to(device, dtype), ref.to(device, dtype)
    x = torch.randn(args.batch, 1, args.frames, cfg.mel_bins, device=device, dtype=dtype)

    with torch.inference_mode():
        diff = (ours(x).float() - ref(x).float()).abs().max().item()
        times = timed(
            {"reference": lambda: ref(x), "ours": lambda: ours(x)}, args.repeats, args.warmup, device
        )
    t_ref, t_ours = (times[name].median / args.batch for name in ("reference", "ours"))
    flops = count_flops(cfg, args.frames)
    peak = matmul_peak(device, dtype)
    print(
        f"ViT-B, input ({args.batch}, 1, {args.frames}, 128), {args.dtype}, {device}, {args.threads} threads"
    )
    print(f"reference (explicit attention): {t_ref:.3f} s/clip  {flops / t_ref / 1e9:7.1f} GFLOP/s")
    print(f"ours (models.transformer):       {t_ours:.3f} s/clip  {flops / t_ours / 1e9:7.1f} GFLOP/s")
    print(f"speed-up: {t_ref / t_ours:.2f}x   max abs diff: {diff:.2e}")
    print(
        f"matmul peak (2048^2): {peak:.1f} GFLOP/s -> floor {flops / peak / 1e9:.3f} s/clip; ours at "
        f"{100 * flops / t_ours / peak / 1e9:.0f}% of peak"
    )
