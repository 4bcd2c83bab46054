"""Benchmark our ViT-B encoder against an eager reference with the official structure.

The reference computes attention explicitly (q @ k^T * scale, softmax in fp32, @ v) in separate
modules, loaded from the same state dict. Prints seconds per clip, the speed-up, the largest output
difference and achieved GFLOP/s against a measured matmul peak.

    .venv/bin/python scripts/bench_encoder.py --batch 4
    python scripts/bench_encoder.py --device cuda --dtype bf16 --batch 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor, nn

from sslam_core.models.transformer import Encoder, count_flops, preset


class RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class RefMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=eps), RefAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=eps), RefMlp(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class RefEncoder(nn.Module):
    """Same parameter names as `Encoder`, official module structure and explicit attention."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.embed_dim
        self.patch_embed = nn.Conv2d(1, D, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer("pos_embed", torch.zeros(1, cfg.max_length * cfg.freq_patches, D))
        self.pre_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        hidden = int(D * cfg.mlp_ratio)
        self.blocks = nn.ModuleList(
            RefBlock(D, cfg.num_heads, hidden, cfg.norm_eps) for _ in range(cfg.depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = x + self.pos_embed[:, : x.shape[1]]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x)
        return x


def timed(fns: list, x: Tensor, repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Median seconds of each `fn(x)`; the functions take turns so that load changes hit all alike."""
    times: list[list[float]] = [[] for _ in fns]
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for fn, record in zip(fns, times, strict=True):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= warmup:
                    record.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    """Measured GFLOP/s of an n x n matmul (the practical ceiling for this model)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    (seconds,) = timed([lambda _: a @ b], a, repeats=10, warmup=3, device=device)
    return 2 * n**3 / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cfg = preset("base")
    ours = Encoder(cfg).eval()
    ref = RefEncoder(cfg).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours, ref = ours.to(device, dtype), ref.to(device, dtype)
    x = torch.randn(args.batch, 1, args.frames, cfg.mel_bins, device=device, dtype=dtype)

    with torch.inference_mode():
        diff = (ours(x).float() - ref(x).float()).abs().max().item()
    t_ref, t_ours = (t / args.batch for t in timed([ref, ours], x, args.repeats, args.warmup, device))
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


if __name__ == "__main__":
    main()
