"""Pre-training throughput and memory on one device, on random inputs (no files needed); prints JSON.

    python scripts/gpu_bench_pretrain.py                      # ViT-B, bf16, release batch shapes
    python scripts/gpu_bench_pretrain.py --device cpu --model tiny --steps 2

Stage 1 (EAT): clips/s of whole training steps (student + decoder + EMA teacher, backward, AdamW,
EMA update) through the real trainer and `PretrainTask`, batch 12 x 16 clones of 1024 frames; target
>= 150 clips/s on one H100. Stage 2 (SSLAM): the official batch shape 12 clips x (clean + mixed) x 8
clones, peak GPU memory (target within 24 GB) and clips/s. The first `--warmup-steps` steps of each
stage are run and discarded before timing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from sslam_core.model import preset
from sslam_core.objective import PretrainingModel
from sslam_core.pretraining import PretrainTask, objective_config, resolve_settings, train_config
from sslam_core.trainer import train


class RandomBatches:
    """A task's `batches`: a few fixed random log-mel batches on the device, cycled forever."""

    def __init__(self, batch_size: int, frames: int, device: torch.device, distinct: int = 4):
        g = torch.Generator().manual_seed(0)
        self.pool = [torch.randn(batch_size, 1, frames, 128, generator=g).to(device) for _ in range(distinct)]

    def __call__(self, epoch_seed: int, rank: int, world_size: int, start_position: int):
        i = start_position
        while True:
            yield {"source": self.pool[i % len(self.pool)]}
            i += 1


def bench_stage(stage: str, args, device: torch.device) -> dict:
    """Warm up, then time `args.steps` updates of one stage; peak memory over the timed steps."""
    settings = resolve_settings(
        {
            "stage": stage,
            "steps": args.warmup_steps + args.steps,
            "batch_size": args.batch_size,
            "target_length": args.target_length,
            "precision": args.precision,
            "clone_batch": args.clone_batch.get(stage),
            "device": str(device),
        }
    )
    torch.manual_seed(0)
    model = PretrainingModel(preset(args.model), objective_config(settings))
    task = PretrainTask(model, RandomBatches(settings.batch_size, settings.target_length, device), settings)
    with tempfile.TemporaryDirectory() as tmp:
        for phase, steps in (("warmup", args.warmup_steps), ("timed", args.steps)):
            if steps == 0:
                continue
            config = train_config(settings, device)
            config.steps, config.warmup, config.log_every, config.save_every = steps, 0, steps, 10**9
            config.out_dir, config.progress = f"{tmp}/{phase}", False
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            summary = train(task, config)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
    clips = settings.batch_size * args.steps
    return {
        "model": args.model,
        "batch_size": settings.batch_size,
        "clone_batch": settings.clone_batch,
        "student_rows": settings.batch_size * settings.clone_batch * (2 if stage == "sslam" else 1),
        "target_length": settings.target_length,
        "precision": config.precision,
        "steps_timed": args.steps,
        "seconds": round(seconds, 3),
        "steps_per_s": round(args.steps / seconds, 3),
        "clips_per_s": round(clips / seconds, 2),
        "peak_memory_gb": round(peak, 2) if peak is not None else None,
        "final_loss": round(summary["last"].get("loss", float("nan")), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="base")
    p.add_argument("--precision", default="auto", help="auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--target-length", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="timed updates per stage")
    p.add_argument(
        "--warmup-steps", type=int, default=None, help="untimed updates first [5 on GPU, 1 on CPU]"
    )
    p.add_argument("--stages", default="eat,sslam")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.warmup_steps is None:
        args.warmup_steps = 5 if device.type == "cuda" else 1
    args.clone_batch = {"eat": 16, "sslam": 8}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    for stage in args.stages.split(","):
        result[stage] = bench_stage(stage, args, device)
    if "eat" in result and device.type == "cuda":
        result["eat"]["target_clips_per_s"] = 150
    if "sslam" in result and device.type == "cuda":
        result["sslam"]["target_peak_memory_gb"] = 24
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
