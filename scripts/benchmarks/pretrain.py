"""CPU pre-training speed: our batched on-device fbank vs the official per-clip fbank, both stages.

    python scripts/bench.py pretrain [--model tiny] [--steps 6] [--batch-size 8] [--target-length 512]

Both pipelines run the same `PretrainTask` through the real trainer on the same synthetic clips
(10 s of noise and tones, no files): ours (`AudioBatches`) turns a batch of raw waves into log-mel
input with one batched fbank call on the training device; the official pipeline computes each clip's
fbank on its own in the data loader and stacks the results. After one untimed round, runs alternate
between the pipelines and the median of `--repeats` is kept (each run's model is built outside its
timing). Prints steps/s and clips/s per stage and pipeline, the ratio (ours / official; must be >= 1
within noise) and the data-only cost per batch.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from sslam_core.audio.frontend import prepare_input
from sslam_core.data.training_clips import AudioBatches, ClipDataset, crop_samples, crop_start, shard_indices
from sslam_core.models.transformer import preset
from sslam_core.training.objective import PretrainingModel
from sslam_core.training.pretraining import PretrainTask, objective_config, resolve_settings, train_config
from sslam_core.training.trainer import train

from .common import print_machine, timed

PIPELINES = ("ours", "official")


class SyntheticClips(ClipDataset):
    """Seeded 10 s clips of noise plus a tone, randomly cropped like decoded files."""

    def __init__(self, count: int, target_length: int, seconds: float = 10.0):
        self.count, self.samples = count, int(seconds * 16000)
        super().__init__(target_length, random_crop=True, labels=None)

    def __len__(self) -> int:
        return self.count

    def path(self, index: int) -> str:
        return f"synthetic-{index}"

    def read(self, index: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(index)
        t = torch.arange(self.samples) / 16000
        wave = 0.1 * torch.randn(self.samples, generator=g) + 0.3 * torch.sin(
            2 * torch.pi * (200 + index) * t
        )
        wanted = crop_samples(self.target_length)
        start = crop_start(self.samples, wanted, seed, index)
        return wave[start : start + wanted].clone()


class PerClipBatches(AudioBatches):
    """The official pipeline: each clip's fbank computed alone in the data loader, then stacked."""

    def __call__(self, epoch_seed: int, rank: int, world_size: int, start_position: int):
        order = shard_indices(len(self.dataset), epoch_seed, rank, world_size, self.shuffle)
        count = len(order) // self.batch_size
        plan = [
            [(i, epoch_seed) for i in order[b * self.batch_size : (b + 1) * self.batch_size]]
            for b in range(start_position, count)
        ]
        T, norm = self.dataset.target_length, self.norm

        def collate(items: list[dict]) -> torch.Tensor:
            return torch.cat([prepare_input([item["wave"]], target_length=T, norm=norm) for item in items])

        loader = DataLoader(
            self.dataset, batch_sampler=plan, num_workers=self.num_workers, collate_fn=collate
        )
        for source in loader:
            yield {"source": source.to(self.device)}


def batches_of(pipeline: str) -> type[AudioBatches]:
    return AudioBatches if pipeline == "ours" else PerClipBatches


def prepared(stage: str, pipeline: str, args: argparse.Namespace, folder: str) -> Callable[[], tuple]:
    """A builder of one run's (task, config): `args.steps` updates of `stage` with `pipeline` (data
    included), writing into a fresh folder under `folder`."""

    def build() -> tuple:
        settings = resolve_settings(
            {
                "stage": stage,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "target_length": args.target_length,
                "clone_batch": args.clone_batch,
                "device": "cpu",
                "workers": args.workers,
            }
        )
        dataset = SyntheticClips(args.batch_size * (args.steps + 1), args.target_length)
        batches = batches_of(pipeline)(dataset, args.batch_size, num_workers=args.workers)
        torch.manual_seed(0)
        model = PretrainingModel(preset(args.model), objective_config(settings))
        task = PretrainTask(model, batches, settings)
        config = train_config(settings, torch.device("cpu"))
        config.out_dir, config.progress, config.save_every = tempfile.mkdtemp(dir=folder), False, 10**9
        return task, config

    return build


def data_only(args: argparse.Namespace, batches: int = 5) -> dict[str, float]:
    """Milliseconds per batch of each pipeline's data path alone (decode stand-in, fbank, stacking)."""
    streams = {
        pipeline: batches_of(pipeline)(SyntheticClips(args.batch_size * batches, args.target_length),
                                       args.batch_size, num_workers=0)
        for pipeline in PIPELINES
    }  # fmt: skip
    runs = {pipeline: lambda s=stream: sum(1 for _ in s(1, 0, 1, 0)) for pipeline, stream in streams.items()}
    times = timed(runs, repeats=1, warmup=0)
    return {pipeline: round(1000 * t.median / t.result, 1) for pipeline, t in times.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--clone-batch", type=int, default=4)
    parser.add_argument("--target-length", type=int, default=512)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())


def run(args: argparse.Namespace) -> None:
    """Both stages, both pipelines: one JSON object of steps/s, clips/s, ratios and data ms/batch."""
    torch.set_num_threads(args.threads)
    result: dict = {"config": vars(args), "machine": print_machine()}
    for stage in ("eat", "sslam"):
        with tempfile.TemporaryDirectory() as folder:
            runs = {pipeline: lambda job: train(*job) for pipeline in PIPELINES}
            builders = {pipeline: prepared(stage, pipeline, args, folder) for pipeline in PIPELINES}
            times = timed(runs, repeats=args.repeats, warmup=1, prepare=builders)
        row = {}
        for pipeline, timing in times.items():
            row[pipeline] = {
                "steps_per_s": round(args.steps / timing.median, 3),
                "clips_per_s": round(args.steps * args.batch_size / timing.median, 2),
            }
        row["ratio_ours_over_official"] = round(
            row["ours"]["clips_per_s"] / row["official"]["clips_per_s"], 3
        )
        result[stage] = row
    result["data_ms_per_batch"] = data_only(args)
    print(json.dumps(result, indent=2))
