"""Multi-process training helpers: torchrun environment, process group, rank-0-only side effects.

Launch with `torchrun --nproc_per_node N ...`; without those variables everything runs as one process
and every helper degrades to a no-op, so single-process code needs no special case.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, number of processes, rank on this machine, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def resolve_device(device: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """`auto`/None -> this process's CUDA device if there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


# Inference ranks meet only to share out the inputs and at the end, when one merges the others'
# journals: ranks that finish early may wait for hours, which the default 30 min would not allow.
INFERENCE_TIMEOUT = timedelta(days=7)


def under_torchrun() -> bool:
    """True when torchrun (or another launcher setting RANK and MASTER_ADDR) started this process,
    whatever the number of processes."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "MASTER_ADDR" in os.environ)


def init_distributed(
    device: str | torch.device | None = None,
    backend: str | None = None,
    timeout: timedelta | None = None,
    single: bool = True,
) -> DistInfo:
    """Join the process group from torchrun's RANK/WORLD_SIZE/LOCAL_RANK (NCCL on CUDA, gloo on CPU,
    unless `backend` says otherwise: inference passes gloo, as it exchanges only Python objects).
    single: join it under torchrun with one process too (training: a one-GPU `torchrun` trial then
    runs DDP over NCCL as N GPUs will); without torchrun nothing is joined."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    join = world_size > 1 or (single and under_torchrun())
    if join and not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world_size} but {name} is not set; launch with torchrun")
        dist.init_process_group(
            backend=backend or ("nccl" if dev.type == "cuda" else "gloo"),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
    return DistInfo(get_rank(), get_world_size(), local_rank, dev)


def init_inference(device: str | torch.device | None = None) -> DistInfo:
    """Join the ranks of a `torchrun` inference run (gloo, a week's timeout); a no-op single process."""
    return init_distributed(device, backend="gloo", timeout=INFERENCE_TIMEOUT, single=False)


def joined() -> bool:
    """True inside an initialised process group, of any size (see `init_distributed`'s `single`)."""
    return dist.is_available() and dist.is_initialized()


def backend() -> str | None:
    """The process group's backend (nccl, gloo), None outside one."""
    return str(dist.get_backend()) if joined() else None


def launched() -> bool:
    """True when this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def single_machine() -> bool:
    """True when every rank runs on this machine (so a local temporary folder is shared by all)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))) == int(
        os.environ.get("WORLD_SIZE", "1")
    )


def gather_objects(obj: object, dst: int = 0) -> list | None:
    """Every rank's `obj` in rank order on rank `dst` (None elsewhere); [obj] in a single process."""
    if not is_distributed():
        return [obj]
    out: list | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Only rank 0 writes files, logs and progress bars."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device | None = None) -> dict[str, float]:
    """Average named scalars over ranks, for logging (every rank must call it with the same keys)."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def all_reduce_max(value: int, device: torch.device | None = None) -> int:
    """The largest of every rank's `value` (an integer), on every rank; every rank must call it at the
    same point. `value` itself in a single process."""
    if not is_distributed():
        return int(value)
    if device is None or (dist.get_backend() == "nccl") != (device.type == "cuda"):
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank when `flag` is true on any rank (a failed write, a stop request)."""
    return all_reduce_max(1 if flag else 0, device) > 0


def all_gather_objects(obj: object) -> list:
    """Every rank's `obj`, in rank order (a one-element list in a single process)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """`fn()` run by rank 0 alone, its result returned on every rank, or the exception it raised
    raised on every rank (so that no rank waits for one that failed); `fn()` in a single process."""
    if not is_distributed():
        return fn()
    outcome: tuple[bool, object] | None = None
    if is_main():
        try:
            outcome = (True, fn())
        except Exception as e:  # handed to every rank, raised there
            outcome = (False, e)
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value
    return value


def cleanup(sync: bool = True) -> None:
    """Leave the process group (safe to call when none was joined).

    sync: wait for every rank first, so no rank tears its connections down while another still uses
    them; pass False on error paths, where the other ranks may never arrive. Unreachable DDP reducers
    are collected before the group goes, so no gloo worker thread outlives it into interpreter exit.
    """
    if dist.is_available() and dist.is_initialized():
        if sync and dist.get_world_size() > 1:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


__all__ = [
    "DistInfo",
    "resolve_device",
    "init_distributed",
    "init_inference",
    "launched",
    "single_machine",
    "gather_objects",
    "on_main",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main",
    "barrier",
    "all_reduce_mean",
    "all_reduce_max",
    "any_rank",
    "all_gather_objects",
    "broadcast_object",
    "cleanup",
]
