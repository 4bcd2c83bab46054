"""GPU corpus-scale inference in one call: ViT-B (random weights), bf16, decoding in worker processes.

Measures, from 10 s wav files it writes to a temporary folder:
  files      clips/s of `embeddings.embed` end to end: 16 decoding processes, pinned copies, fbank
             on the GPU, one batch in flight                                     (target >= 1500)
  model      clips/s of the encoder on ready (B, 1, 1024, 128) inputs           (target >= 2000)
  memory     peak GPU memory of both
  fp32       largest |CUDA fp32 - CPU fp32| of the clip and patch vectors of a few files (<= 1e-3)
  bf16       smallest cosine of bf16 and fp32 clip vectors of the same files
and prints one JSON object. A smoke test on CPU (a tiny model, few files):

    python scripts/gpu_bench_scale.py [--files 3072] [--workers 16] [--batch 64] [--sample-rate 16000]
    python scripts/gpu_bench_scale.py --device cpu --files 16 --tiny
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from gpu_bench_extract import rate

from sslam_core.embeddings import embed
from sslam_core.frontend import prepare_input
from sslam_core.model import Encoder, preset


def write_clips(folder: Path, n: int, sr: int, seconds: float = 10.0) -> list[str]:
    """n seeded mono 16-bit wavs of `seconds` s at `sr` Hz: noise over a tone of its own pitch."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    paths = []
    for i in range(n):
        x = 0.3 * np.sin(2 * np.pi * (200 + 7 * i) * t) + 0.05 * rng.standard_normal(len(t))
        path = folder / f"{i:05d}.wav"
        sf.write(path, x.astype(np.float32), sr, subtype="PCM_16")
        paths.append(str(path))
    return paths


def vectors(model: torch.nn.Module, paths: list[str], **options) -> tuple[np.ndarray, np.ndarray]:
    """Clip and patch vectors of `paths` (every file decoded; one 10 s window each)."""
    recs = list(embed(model, paths, granularity="patch", **options))
    if any(r.error for r in recs):
        raise SystemExit("; ".join(r.error for r in recs if r.error))
    return np.stack([r.clip for r in recs]), np.stack([r.patch for r in recs])


def correctness(
    model: Encoder, cfg, paths: list[str], device: torch.device, batch: int, workers: int
) -> dict:
    """CUDA fp32 vs CPU fp32 (no TF32 anywhere), and bf16 vs fp32 on the device, over `paths`."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        on_cpu = Encoder(cfg).eval()
        on_cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
        ref_clip, ref_patch = vectors(on_cpu, paths, batch_size=4, workers=1)
        options = {"batch_size": batch, "workers": workers, "device": device}
        clip, patch = vectors(model, paths, precision="fp32", **options)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    low, _ = vectors(model, paths, precision="bf16", **options)
    cos = (low * clip).sum(1) / (np.linalg.norm(low, axis=1) * np.linalg.norm(clip, axis=1))
    return {
        "check_files": len(paths),
        "fp32_device_vs_cpu_max_abs_diff": float(
            max(np.abs(clip - ref_clip).max(), np.abs(patch - ref_patch).max())
        ),
        "bf16_vs_fp32_min_cosine": float(cos.min()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=3072, help="10 s wav files to write and run [3072]")
    parser.add_argument("--workers", type=int, default=16, help="decoding processes [16]")
    parser.add_argument("--batch", type=int, default=64, help="windows per forward pass [64]")
    parser.add_argument("--sample-rate", type=int, default=16000, help="of the wav files [16000]")
    parser.add_argument("--check-files", type=int, default=4, help="files compared across devices [4]")
    parser.add_argument("--repeats", type=int, default=20, help="model-only batches timed [20]")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset (a smoke test on CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = preset("tiny" if args.tiny else "base")
    model = Encoder(cfg).eval().to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out: dict = {"device": name, "model": "tiny" if args.tiny else "ViT-B", "dtype": "bf16"}
    out.update(batch=args.batch, workers=args.workers, files=args.files, sample_rate=args.sample_rate)

    x = prepare_input(torch.randn(args.batch, 160000, device=device) * 0.1)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
        out["model_clips_per_s"] = rate(lambda: model(x), args.batch, args.repeats, device)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = write_clips(Path(tmp), args.files, args.sample_rate)
        out["write_seconds"] = time.perf_counter() - start
        options = {"batch_size": args.batch, "workers": args.workers, "device": device, "precision": "bf16"}
        list(embed(model, paths[: 2 * args.batch], **options))  # warm-up: kernels, allocator
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        recs = list(embed(model, paths, **options))
        out["files_clips_per_s"] = len(recs) / (time.perf_counter() - start)
        out["files_skipped"] = sum(r.error is not None for r in recs)
        if device.type == "cuda":
            out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out.update(correctness(model, cfg, paths[: args.check_files], device, args.batch, args.workers))
    out["targets_met"] = {
        "files_clips_per_s>=1500": out["files_clips_per_s"] >= 1500,
        "model_clips_per_s>=2000": out["model_clips_per_s"] >= 2000,
        "fp32_device_vs_cpu<=1e-3": out["fp32_device_vs_cpu_max_abs_diff"] <= 1e-3,
    }
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
