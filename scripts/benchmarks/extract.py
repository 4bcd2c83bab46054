"""End-to-end extraction: `sslam extract`'s pipeline vs a per-file loop, then its peak memory.

Ours: decoding threads, windows batched across files, fbank on the device, SDPA encoder.
Baseline (the official route): for each file, decode, resample, fbank, forward with batch 1 through an
encoder with explicit attention (the official structure), same weights. Both run ViT-B with random
weights in fp32 on CPU with 2 threads over 64 x 10 s 44.1 kHz stereo wavs, and must agree to 1e-4.
Then the peak memory of `sslam extract` on one 1-hour 48 kHz stereo file, in a child process.

    python scripts/bench.py extract [--clips 64] [--audio DIR] [--hours 1.0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from sslam_core.audio.frontend import prepare_input
from sslam_core.audio.resample import resample
from sslam_core.inference.embeddings import embed
from sslam_core.inference.pipeline import default_batching
from sslam_core.models.layouts.native import save_checkpoint
from sslam_core.models.transformer import Encoder, preset

from .common import print_machine, timed
from .reference import RefEncoder


def make_clips(folder: Path, n: int, audio: Path | None, seconds: float = 10.0, sr: int = 44100) -> list[str]:
    """n stereo 44.1 kHz wavs: cut from real recordings under `audio` if given, else seeded noise + tones."""
    rng = np.random.default_rng(0)
    sources = sorted(p for p in audio.rglob("*") if p.suffix in (".wav", ".flac", ".ogg")) if audio else []
    paths = []
    for i in range(n):
        if sources:
            x, r = sf.read(sources[i % len(sources)], dtype="float32", always_2d=True)
            x = resample(torch.from_numpy(x.T.copy()), r, sr).numpy().T
            x = np.tile(x, (int(np.ceil(seconds * sr / len(x))), 1))[: int(seconds * sr)]
            if x.shape[1] == 1:
                x = np.repeat(x, 2, axis=1)
            x = np.roll(x, 997 * i, axis=0)
        else:
            t = np.arange(int(seconds * sr)) / sr
            tone = 0.3 * np.sin(2 * np.pi * (200 + 37 * i) * t)
            x = np.stack([tone + 0.05 * rng.standard_normal(len(t)), tone], axis=1).astype(np.float32)
        path = folder / f"clip{i:03d}.wav"
        sf.write(path, x, sr)
        paths.append(str(path))
    return paths


def baseline(paths: list[str], ref: torch.nn.Module) -> np.ndarray:
    """The official per-file route: decode, mono, resample, fbank, batch-1 forward."""
    out = []
    with torch.inference_mode():
        for p in paths:
            x, sr = sf.read(p, dtype="float32", always_2d=True)
            wave = resample(torch.from_numpy(x.mean(axis=1)), sr, 16000)
            out.append(ref(prepare_input(wave[None]))[0, 0].numpy())
    return np.stack(out)


def peak_memory_mb(hours: float, ckpt: Path, folder: Path) -> tuple[float, float]:
    """Peak RSS (MB) and seconds of `sslam extract` on one long 48 kHz stereo file."""
    sr, path = 48000, folder / "long.wav"
    with sf.SoundFile(path, "w", sr, 2, subtype="PCM_16") as f:
        rng = np.random.default_rng(1)
        for _ in range(int(hours * 60)):  # one minute at a time
            f.write((0.1 * rng.standard_normal((60 * sr, 2))).astype(np.float32))
    code = (
        "import resource, sys; from sslam_cli.main import app\n"
        "try:\n    app(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    cmd = [sys.executable, "-c", code, "extract", str(path), "-o", str(folder / "long.h5"), "-c", str(ckpt)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--audio", type=Path, help="folder of real recordings to cut the clips from")
    parser.add_argument("--batch-size", type=int, help="default: the library's CPU default")
    parser.add_argument("--workers", type=int, help="default: the library's CPU default")
    parser.add_argument("--hours", type=float, default=1.0, help="length of the memory test file (0 = skip)")


def run(args: argparse.Namespace) -> None:
    """Both routes once over the same clips (after a warm-up on two): clips/s, speed-up, difference;
    then the memory test; the last line is JSON."""
    torch.set_num_threads(2)
    machine = print_machine()
    torch.manual_seed(0)
    args.batch_size, args.workers = default_batching(torch.device("cpu"), args.batch_size, args.workers)

    cfg = preset("base")
    ours = Encoder(cfg).eval()
    ref = RefEncoder(cfg).eval()
    ref.load_state_dict(ours.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_clips(tmp, args.clips, args.audio)
        ckpt = tmp / "vitb.safetensors"
        save_checkpoint(ckpt, cfg, ours.state_dict())
        baseline(paths[:2], ref)  # warm-up
        list(embed(ours, paths[:2], batch_size=2))

        runs = {
            "baseline": lambda: baseline(paths, ref),
            "ours": lambda: list(embed(ours, paths, batch_size=args.batch_size, workers=args.workers)),
        }
        times = timed(runs, repeats=1, warmup=0)
        t_ref, t_ours = times["baseline"].median, times["ours"].median
        clips = np.stack([r.clip for r in times["ours"].result])
        diff = float(np.abs(clips - times["baseline"].result).max())
        result = {
            "clips": args.clips,
            "baseline_clips_per_s": round(args.clips / t_ref, 3),
            "ours_clips_per_s": round(args.clips / t_ours, 3),
            "speedup": round(t_ref / t_ours, 3),
            "max_abs_diff": diff,
        }
        print(f"per-file loop (batch 1, explicit attention): {args.clips / t_ref:.3f} clips/s")
        print(
            f"sslam pipeline (batch {args.batch_size}, {args.workers} workers): "
            f"{args.clips / t_ours:.3f} clips/s"
        )
        print(f"speed-up {t_ref / t_ours:.2f}x (target >= 1.5x), max abs diff of clip vectors {diff:.1e}")
        if args.hours > 0:
            mb, secs = peak_memory_mb(args.hours, ckpt, tmp)
            result.update(
                peak_rss_mb=round(mb, 1), long_file_hours=args.hours, long_file_seconds=round(secs, 1)
            )
            print(
                f"peak memory of sslam extract on a {args.hours} h 48 kHz stereo file: {mb:.0f} MB "
                "(target <= 1536)"
            )
        result["machine"] = machine
        print(json.dumps(result))
