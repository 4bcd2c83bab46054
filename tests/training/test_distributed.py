"""Two CPU processes (gloo) through the same training loop: ranks stay in sync and resume exactly."""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port
from safetensors.torch import save_file
from torch import nn

from sslam_core.runs import distributed
from sslam_core.training.task import TrainingTask
from sslam_core.training.trainer import TrainConfig, train

WORLD = 2


class ShardedToyTask(TrainingTask):
    """Regression on fixed data; each rank reads its own slice of a per-epoch permutation."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, 1))
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(40, 6, generator=g)
        self.y = self.x.sum(1, keepdim=True)

    def batches(self, epoch_seed, rank, world_size, start_position):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(epoch_seed))
        mine = order[rank::world_size]
        for i in range(start_position, len(mine) // 4):
            yield self.x[mine[i * 4 : i * 4 + 4]], self.y[mine[i * 4 : i * 4 + 4]]

    def loss(self, batch, generator):
        x, y = batch
        x = x + 0.01 * torch.randn(x.shape, generator=generator)
        mse = ((self.model(x) - y) ** 2).mean()
        return {"loss": mse, "mse": mse.detach()}

    def export(self, path):
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(path))


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = distributed.init_distributed("cpu")
    assert (info.rank, info.world_size) == (rank, WORLD) and distributed.is_main() == (rank == 0)
    assert distributed.all_reduce_mean({"x": float(rank)}) == {"x": 0.5}

    def cfg(name):
        return TrainConfig(
            steps=6, batch_size=4, grad_accum=2, lr=1e-2, warmup=1, save_every=2, log_every=1,
            out_dir=os.path.join(root, name), progress=False, device="cpu",
        )  # fmt: skip

    whole = ShardedToyTask()
    train(whole, cfg("whole"))
    train(ShardedToyTask(), cfg("split"), stop_at=3)
    resumed = ShardedToyTask()
    train(resumed, cfg("split"), resume=True)
    torch.save(
        {"whole": whole.model.state_dict(), "resumed": resumed.model.state_dict()},
        os.path.join(root, f"rank{rank}.pt"),
    )
    distributed.cleanup()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_stay_in_sync_and_resume_exactly(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    start = ShardedToyTask().model.state_dict()
    for name, w in r0["whole"].items():
        assert torch.equal(w, r1["whole"][name]), f"ranks diverged in {name}"
        assert torch.equal(w, r0["resumed"][name]) and torch.equal(w, r1["resumed"][name]), name
    assert not torch.equal(r0["whole"]["0.weight"], start["0.weight"])
    state = torch.load(tmp_path / "split" / "state.pt", weights_only=True)
    assert state["step"] == 6 and len(state["rng"]) == WORLD
    steps = [json.loads(s)["step"] for s in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


class SignalledTask(ShardedToyTask):
    """Rank 1 alone gets SIGUSR1 after update 3, as when a scheduler signals one node."""

    def after_step(self, step):
        if step == 3 and distributed.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGUSR1)


def _stop_worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init_distributed("cpu")
    cfg = TrainConfig(
        steps=8, batch_size=4, save_every=100, out_dir=os.path.join(root, "run"), progress=False
    )
    summary = train(SignalledTask(), cfg)
    result = {"steps": summary["steps"], "interrupted": summary.get("interrupted")}

    # A full disk on rank 0 (the only writer) stops every rank with an error, none waits forever.
    from sslam_core.runs import outputs
    from sslam_core.runs.outputs import OutputError

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    if rank == 0:
        outputs._RecordingFile.write = full
    try:
        train(
            ShardedToyTask(), TrainConfig(**{**cfg.to_dict(), "betas": (0.9, 0.95), "steps": 9}), resume=True
        )
    except OutputError as e:
        result["error"] = str(e)
    with open(os.path.join(root, f"stop{rank}.json"), "w") as f:
        json.dump(result, f)
    distributed.cleanup(sync=False)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_signal_at_one_rank_stops_all_at_the_same_step(tmp_path):
    mp.spawn(_stop_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (json.loads((tmp_path / f"stop{r}.json").read_text()) for r in range(WORLD))
    assert (r0["steps"], r1["steps"]) == (3, 3)
    assert r0["interrupted"] == r1["interrupted"] == "SIGUSR1"
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["step"] == 3  # kept after the error
    assert r0["error"] == f"{tmp_path / 'run' / 'state.pt'}: cannot write (no space left on device)"
    assert r1["error"] == "rank 0 could not write the run folder; stopping"
