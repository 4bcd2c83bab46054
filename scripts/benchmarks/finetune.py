"""One full fine-tuning update (augment, forward, BCE, backward, clip, AdamW with layer decay).

    python scripts/bench.py finetune [--model small] [--batch-size 4] [--target-length 1024] [--steps 3]

Inputs are random normalised fbank batches on the chosen device, so the figure is the model's training
step alone (audio decoding and fbank run in DataLoader workers / one batched call in `AudioBatches`).
There is no baseline: it prints the best and mean s/step over --steps after one warm-up step.
"""

from __future__ import annotations

import argparse

import torch

from sslam_core.data.augment import AugmentConfig, augment
from sslam_core.models.transformer import Classifier, count_flops, preset
from sslam_core.training.finetuning import classification_loss
from sslam_core.training.optim import build_optimizer, set_lr

from .common import print_machine, timed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--target-length", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=527)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")


def run(args: argparse.Namespace) -> None:
    """A seeded classifier and one fixed random batch: s/step (best, mean), clips/s and GFLOP/s."""
    if args.threads:
        torch.set_num_threads(args.threads)
    print_machine()
    torch.manual_seed(0)
    cfg = preset(args.model, num_classes=args.classes, drop_path=0.1)
    model = Classifier(cfg).to(args.device).train()
    optimizer = build_optimizer(model, 5e-5, 0.05, 0.65)
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 1, args.target_length, 128)
    source = torch.randn(shape, generator=generator).to(args.device)
    target = (torch.rand(args.batch_size, args.classes, generator=generator) < 0.02).float().to(args.device)

    def step() -> float:
        set_lr(optimizer, 5e-5)
        x, y = augment(source, target, generator, AugmentConfig())
        loss = classification_loss(model(x), y, True, 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    timing = timed({"step": step}, repeats=args.steps, warmup=1, device=args.device)["step"]
    best, mean = timing.best, timing.mean
    flops = 3 * count_flops(cfg, args.target_length) * args.batch_size  # forward + ~2x for backward
    print(
        f"{args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params), batch "
        f"{args.batch_size} x {args.target_length} frames, {args.device}, {torch.get_num_threads()} threads: "
        f"{best:.2f} s/step best, {mean:.2f} s mean of {args.steps} ({args.batch_size / best:.2f} clips/s, "
        f"{flops / best / 1e9:.1f} GFLOP/s)"
    )
