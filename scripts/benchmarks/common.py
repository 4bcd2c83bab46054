"""What every benchmark shares: one timing helper and one report of the machine the run had.

Each target times its own code and its baseline with `timed`, in the same process and taking turns, so
that the ratio it prints compares runs under the same load; each prints `print_machine()`'s line first
(the CPU capability that decides `--precision auto`, cores, threads, load), since CPU figures mean
little without it.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sslam_core.models.precision import cpu_capability

ROOT = Path(__file__).resolve().parents[2]
TEST_DATA = ROOT / "tests" / "data"


@dataclass
class Timing:
    """The wall seconds of one run's timed calls and what its last call returned."""

    seconds: list[float] = field(default_factory=list)
    result: object = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the GPU's queued work, so that a call's time includes it (nothing to do on a CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(
    runs: Mapping[str, Callable[..., object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str | None = None,
    prepare: Mapping[str, Callable[[], object]] | None = None,
) -> dict[str, Timing]:
    """Time each run `repeats` times after `warmup` untimed rounds (first-call costs: allocator, kernels).

    The runs take turns within a round, so that a load that comes and goes weighs on all alike. On a
    GPU (`device`) each call is timed between two synchronisations. `prepare[name]`, where given, builds
    a fresh input for each call of that run outside the timing (e.g. a model to train), passed to it."""
    timings = {name: Timing() for name in runs}
    for round_ in range(warmup + repeats):
        for name, run in runs.items():
            given = (prepare[name](),) if prepare and name in prepare else ()
            synchronize(device)
            start = time.perf_counter()
            result = run(*given)
            synchronize(device)
            if round_ >= warmup:
                timings[name].seconds.append(time.perf_counter() - start)
                timings[name].result = result
            del given, result  # not held while the next call prepares and runs
    return timings


def machine() -> dict:
    """The CPU capability (`sslam_core.models.precision.cpu_capability`, what `--precision auto` reads),
    torch's kernel level, the cores this process may use, torch's threads and version, the load."""
    cpu = cpu_capability()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": platform.processor() or platform.machine(),
        "capability": cpu.name,
        "capability_source": cpu.source,
        "native_bf16": cpu.native_bf16,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_1min": load_average(),
    }


def load_average() -> float | None:
    """The 1-minute load average (other work on the machine slows every figure); None where unknown."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def print_machine() -> dict:
    """Print the line every benchmark starts with and return `machine()` for the JSON. Call it after
    setting torch's threads, so that the line shows the ones the run uses."""
    m = machine()
    print(
        f"CPU: {m['cpu']}, capability {m['capability']} ({m['capability_source']}; torch kernels "
        f"{m['torch_cpu_capability']}), native bf16 {m['native_bf16']}, {m['cores']} cores, "
        f"{m['torch_threads']} torch threads, torch {m['torch']}, load average {m['load_average_1min']}",
        flush=True,
    )
    return m
