"""Corpus-scale inference, one function per measurement (`--only NAME` runs some of them).

overhead: the pipeline around the model: many short files (FSDD: ~3,000 wavs of ~0.4 s at 8 kHz)
  through a tiny seeded encoder (one block, 0.64 s windows) with `embeddings.embed`, decoded in the
  main process (in line, or by 2 threads) and by 1 and 2 worker processes. Prints files/s of each,
  the ratio to the best single-process figure and the largest difference of the clip vectors from
  the in-line run (the machine line first: other work on the machine slows every figure).

torchrun: `sslam extract` of 10 s clips through a seeded `small` encoder, `torchrun` with 2 processes
  vs 1 process, each with cores / 2 intra-op threads; clips/s end to end (start-up and merge
  included), the ratio, and whether the two HDF5 files hold the same values.

    python scripts/bench.py scale DATA_ROOT [--files N] [--rounds 2] [--torch-threads T]
                                  [--only overhead torchrun] [--torchrun-clips 32]

Prints one JSON object at the end: {"machine": {...}, NAME: {...}, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sslam_core.inference.embeddings import embed
from sslam_core.models.transformer import Encoder, preset

from .common import load_average, print_machine, timed

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def audio_files(root: Path, limit: int | None = None) -> list[str]:
    """The audio files under `root`, sorted; the first `limit` of them."""
    paths = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not paths:
        raise SystemExit(f"{root}: no .wav, .flac or .ogg files found")
    return paths[:limit]


def tiny_model(depth: int = 1, seed: int = 0) -> Encoder:
    """The `tiny` preset cut to `depth` blocks, seeded: small enough that the pipeline shows."""
    torch.manual_seed(seed)
    return Encoder(preset("tiny", depth=depth)).eval()


def measure_overhead(args: argparse.Namespace) -> dict:
    """Files/s of the inference pipeline over short files: decoding in the main process vs in workers."""
    paths = audio_files(args.data_root, args.files)
    model = tiny_model(args.depth)
    options = {"target_length": args.target_length, "batch_size": args.batch_size}
    configs = {  # name -> (workers, processes)
        "in_line": (1, False),
        "threads_2": (2, False),
        "processes_1": (1, True),
        "processes_2": (2, True),
    }
    list(embed(model, paths[:64], workers=0, **options))  # warm-up
    runs = {
        name: lambda w=workers, p=processes: list(embed(model, paths, workers=w, processes=p, **options))
        for name, (workers, processes) in configs.items()
    }
    times = timed(runs, repeats=args.rounds, warmup=0)  # best of each: other load comes and goes
    rates = {name: len(paths) / t.best for name, t in times.items()}
    clips = {name: np.stack([r.clip for r in t.result]) for name, t in times.items()}
    single = max(rates["in_line"], rates["threads_2"])
    out = {
        "files": len(paths),
        "model": f"tiny, {args.depth} block(s), {args.target_length}-frame windows",
        "batch_size": args.batch_size,
        "files_per_s": {k: round(v, 1) for k, v in rates.items()},
        "ratio_to_best_single_process": {k: round(v / single, 2) for k, v in rates.items()},
        "max_abs_diff_from_in_line": {k: float(np.abs(v - clips["in_line"]).max()) for k, v in clips.items()},
    }
    print(f"{len(paths)} files, {out['model']}, batch {args.batch_size}:")
    for name, rate in rates.items():
        print(f"  {name:12s} {rate:8.1f} files/s  {rate / single:5.2f}x the best single-process figure")
    return out


def measure_torchrun(args: argparse.Namespace) -> dict:
    """Throughput of `sslam extract` under `torchrun` with 2 processes vs 1, each process given the
    same intra-op threads (cores / 2), on 10 s clips through a seeded `small` encoder; end to end,
    start-up and merge included, and the two outputs compared value for value."""
    import h5py
    import soundfile as sf

    from sslam_core.models.layouts.native import save_checkpoint

    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        model = Encoder(preset(args.torchrun_model)).eval()
        ckpt = root / "model.safetensors"
        save_checkpoint(ckpt, model.cfg, model.state_dict())
        rng = np.random.default_rng(0)
        clips = root / "clips"
        clips.mkdir()
        for i in range(args.torchrun_clips):
            sf.write(clips / f"{i:04d}.wav", (0.1 * rng.standard_normal(160_000)).astype(np.float32), 16000)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        common = ["-m", "sslam_cli", "extract", str(clips), "-c", str(ckpt), "--device", "cpu"]
        launch = {
            "1_process": [sys.executable],
            "2_processes": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
        }
        runs = {
            name: lambda name=name, launcher=launcher: subprocess.run(
                [*launcher, *common, "-o", str(root / f"{name}.h5"), "--overwrite"],
                env=env,
                check=True,
                capture_output=True,
            )
            for name, launcher in launch.items()
        }
        seconds = {name: t.best for name, t in timed(runs, repeats=args.rounds, warmup=0).items()}
        with h5py.File(root / "1_process.h5") as a, h5py.File(root / "2_processes.h5") as b:
            same = bool(np.array_equal(a["clip"][()], b["clip"][()])) and list(a["paths"]) == list(b["paths"])
    rates = {k: args.torchrun_clips / v for k, v in seconds.items()}
    ratio = rates["2_processes"] / rates["1_process"]
    print(
        f"torchrun, {args.torchrun_clips} x 10 s clips, {args.torchrun_model} encoder, "
        f"{threads} thread(s) per process:"
    )
    for name, rate in rates.items():
        print(f"  {name:12s} {rate:8.2f} clips/s ({seconds[name]:.1f} s)")
    print(f"  ratio {ratio:.2f}x; outputs identical: {same}")
    return {
        "clips": args.torchrun_clips,
        "model": args.torchrun_model,
        "threads_per_process": threads,
        "clips_per_s": {k: round(v, 2) for k, v in rates.items()},
        "ratio": round(ratio, 2),
        "outputs_identical": same,
    }


MEASUREMENTS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "overhead": measure_overhead,
    "torchrun": measure_torchrun,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_root", type=Path, help="folder searched for audio files (e.g. FSDD)")
    parser.add_argument("--only", nargs="+", choices=list(MEASUREMENTS), help="measurements to run [all]")
    parser.add_argument("--files", type=int, help="use the first N files only [all]")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each [2]")
    parser.add_argument("--depth", type=int, default=1, help="encoder blocks of the tiny model [1]")
    parser.add_argument("--target-length", type=int, default=64, help="window in 10 ms frames [64]")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per forward pass [32]")
    parser.add_argument("--torch-threads", type=int, help="intra-op threads of the model [torch's default]")
    parser.add_argument("--torchrun-clips", type=int, default=32, help="torchrun: 10 s clips [32]")
    parser.add_argument("--torchrun-model", default="small", help="torchrun: encoder preset [small]")


def run(args: argparse.Namespace) -> None:
    """The chosen measurements in turn, then one JSON object of all of them."""
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    results: dict = {"machine": print_machine()}
    for name in args.only or MEASUREMENTS:
        results[name] = MEASUREMENTS[name](args)
    results["machine"]["load_average_1min_at_end"] = load_average()
    print(json.dumps(results))
