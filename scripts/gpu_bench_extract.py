"""GPU throughput of inference: ViT-B (random weights, release layout), bf16, batch 64.

Measures, in one process on one GPU:
  model        encoder forward on ready (64, 1, 1024, 128) inputs          (target >= 2000 clips/s)
  frontend     batched fbank + normalisation of 64 x 10 s waves on the GPU
  wave->feat   both together, from 16 kHz waves already on the GPU
  files        the `sslam extract` pipeline (decode threads, windows, batches) from wav files
and the fp32 eager reference with explicit attention for comparison. Prints one JSON object.

    python scripts/gpu_bench_extract.py [--batch 64] [--dtype bf16] [--files 256]
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
from bench_encoder import RefEncoder

from sslam_core.embeddings import embed
from sslam_core.frontend import prepare_input
from sslam_core.model import Encoder, count_flops, preset


def rate(fn, batch: int, repeats: int, device: torch.device) -> float:
    """Clips per second of `fn()` over `repeats` calls after two warm-up calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _: None)
    for _ in range(2):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--files", type=int, default=256, help="wav files for the pipeline test (0 = skip)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)

    cfg = preset("base")
    model = Encoder(cfg).eval().to(device)
    waves = torch.randn(args.batch, 160000, device=device) * 0.1
    x = prepare_input(waves)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out: dict = {"device": name, "batch": args.batch, "dtype": args.dtype}

    with torch.inference_mode():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out["model_clips_per_s"] = rate(lambda: model(x), args.batch, args.repeats, device)
            out["wave_to_features_clips_per_s"] = rate(
                lambda: model(prepare_input(waves)), args.batch, args.repeats, device
            )
        out["frontend_clips_per_s"] = rate(lambda: prepare_input(waves), args.batch, args.repeats, device)
        ref = RefEncoder(cfg).eval().to(device)
        ref.load_state_dict(model.state_dict())
        out["reference_fp32_clips_per_s"] = rate(
            lambda: ref(x), args.batch, max(3, args.repeats // 4), device
        )
        out["model_fp32_clips_per_s"] = rate(lambda: model(x), args.batch, max(3, args.repeats // 4), device)
    out["model_tflops"] = out["model_clips_per_s"] * count_flops(cfg) / 1e12
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30

    if args.files:
        with tempfile.TemporaryDirectory() as tmp:
            rng = np.random.default_rng(0)
            paths = []
            for i in range(args.files):
                path = Path(tmp) / f"{i:04d}.wav"
                sf.write(path, (0.1 * rng.standard_normal((441000, 2))).astype(np.float32), 44100)
                paths.append(str(path))
            start = time.perf_counter()
            n = sum(
                1
                for _ in embed(
                    model, paths, batch_size=args.batch, workers=8, device=device, precision=args.dtype
                )
            )
            out["files_clips_per_s"] = n / (time.perf_counter() - start)
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
