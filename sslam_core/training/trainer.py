"""One training loop for pre-training and fine-tuning, readable top to bottom (nanoGPT style).

The loop is generic over a *task* (`sslam_core.training.task.TrainingTask`) that owns the model, the data
and the loss: `task.batches` gives one epoch's batches for this rank from a saved position, `task.loss`
turns a batch into a 'loss' and terms to log, `task.export` writes the checkpoint; `after_step` (EMA),
`evaluate` (best checkpoint), `schedule`, `constant_state`, `generator_device` and
`find_unused_parameters` are optional members with defaults on the base class.

`train` owns the run folder (refusal, cleanup after an early failure) and the signals; `_train` is the
loop, followed by its parts in the order they run: `_start` (model, optimiser, scaler, generator),
`_restore` (state.pt), `_write_config`, then per update `_step` (micro-batches to an optimiser step),
`_log` and `_save`.

Everything that decides the trajectory (weights, optimiser, grad scaler, step, data position, the Python/
NumPy/torch RNGs of every rank and the task's generator) goes into out_dir/state.pt, so `resume=True`
continues bit-identically. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sslam_core.errors import OptionError, SslamError
from sslam_core.runs import distributed
from sslam_core.runs.interrupts import StopRequest
from sslam_core.runs.outputs import OutputError, atomic_write, output_error, torch_save, write_text
from sslam_core.training.optim import build_optimizer, cosine_schedule, set_lr
from sslam_core.training.task import TrainingTask

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name)
)
RUN_FILES = ("config.json", "state.pt", "model.safetensors", "model-best.safetensors", "metrics.jsonl")
RUN_FILES += ("split.json",)
RUN_FOLDERS = ("checkpoints", "tensorboard")


class RunFolderError(SslamError, ValueError):
    """A run folder that may not be trained into as asked (it holds a run); the message says why."""


@dataclass
class TrainConfig:
    """Optimisation, checkpointing and logging settings; saved as out_dir/config.json."""

    steps: int = 1000  # optimiser updates (the cosine schedule spans them all)
    batch_size: int = 12  # clips per rank per micro-step (for throughput; the task makes the batches)
    grad_accum: int = 1  # micro-steps per update
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup: int = 0
    weight_decay: float = 0.05
    layer_decay: float | None = None  # layer-wise lr decay for fine-tuning (e.g. 0.65)
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 4.0  # max global grad norm; 0 disables clipping
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast on CUDA only; fp16 uses a GradScaler)
    seed: int = 0
    log_every: int = 10
    save_every: int = 1000
    best_metric: str = "metric"  # key of task.evaluate() used to keep model-best.safetensors
    best_mode: str = "max"  # max | min
    out_dir: str = "runs/train"
    keep_last: int = 0  # also keep this many numbered model exports in out_dir/checkpoints/
    tensorboard: bool = False
    device: str = "auto"
    progress: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs)

    def check(self) -> None:
        """Reject settings that cannot train, with a one-line reason."""
        if self.steps < 0 or self.grad_accum < 1 or self.log_every < 1 or self.save_every < 1:
            raise OptionError("steps must be >= 0 and grad_accum, log_every, save_every >= 1")
        if self.precision not in PRECISIONS:
            raise OptionError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.best_mode not in ("max", "min"):
            raise OptionError(f"best_mode must be 'max' or 'min', got {self.best_mode!r}")


class _LossModule(nn.Module):
    """Makes `task.loss` the forward of a module that owns the model, so DDP's hooks see every call."""

    def __init__(self, task: TrainingTask):
        super().__init__()
        self.model = task.model
        self._loss = task.loss

    def forward(self, batch: Any, generator: torch.Generator) -> dict:
        return self._loss(batch, generator)


def train(
    task: TrainingTask,
    config: TrainConfig,
    resume: bool = False,
    stop_at: int | None = None,
    meta: dict | None = None,
    overwrite: bool = False,
    files: dict[str, str] | None = None,
) -> dict:
    """Optimise task.model for config.steps updates; returns a summary dict.

    resume: continue from out_dir/state.pt when it exists. stop_at: save and return once this step is
    reached (the schedule still spans config.steps), to split one run over several jobs. meta: extra
    settings (model, data) recorded in config.json. overwrite: clear an old run's files first (see
    `check_run_folder`). files: more text files for the run folder (name -> text), written with
    config.json. SIGINT, SIGTERM and SIGUSR1 save at the next step boundary and return with
    summary["interrupted"] set. A run that fails before its first state.pt leaves no files behind.
    """
    if not isinstance(task, TrainingTask):
        raise TypeError(f"train() needs a TrainingTask (sslam_core.training.task), got {type(task).__name__}")
    config.check()
    info = distributed.init_distributed(config.device)
    out = Path(config.out_dir)
    resuming = resume and (out / "state.pt").exists()
    created, before = False, set()
    if info.rank == 0:
        created = not out.exists()
        _make_folder(out)
        if overwrite and not resuming:
            clear_run(out)
        before = set(run_files(out))
    try:
        with StopRequest(STOP_SIGNALS) as stop:
            return _train(task, config, info, resume, stop_at, meta, files or {}, stop)
    except BaseException:
        if info.rank == 0 and not resuming and not (out / "state.pt").exists():
            _remove_unsaved_run(
                out, created, [n for n in (*RUN_FILES, *RUN_FOLDERS, *(files or {})) if n not in before]
            )
        raise


# ---------------------------------------------------------------------------------------------------------
# The loop: `_train`, then its parts in the order they run.


@dataclass
class _Run:
    """What the parts of one run share: the task and settings, what is built once (the model on its device,
    the optimiser and the parameters it updates, the grad scaler, the loss generator, the schedule), the
    position that moves (step, epoch, batches of that epoch consumed, best evaluation) and, on rank 0, the
    metrics log and the tensorboard writer."""

    task: TrainingTask
    config: TrainConfig
    info: distributed.DistInfo
    model: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    schedule: dict
    step: int = 0
    epoch: int = 0
    position: int = 0
    best: dict | None = None
    metrics: MetricsLog | None = None
    writer: Any = None

    @property
    def out(self) -> Path:
        return Path(self.config.out_dir)

    @property
    def main(self) -> bool:
        return self.info.rank == 0


def _train(
    task: TrainingTask,
    config: TrainConfig,
    info: distributed.DistInfo,
    resume: bool,
    stop_at: int | None,
    meta: dict | None,
    files: dict[str, str],
    stop: StopRequest,
) -> dict:
    """Set up or restore the run, then one update per pass of the loop: batches to gradients to an
    optimiser step, then a log line and a save when due. Returns the summary."""
    run = _start(task, config, info)
    if resume:
        _restore(run)
    start_step = run.step
    _write_config(run, meta, files)
    if run.main:
        run.metrics = MetricsLog(run.out / "metrics.jsonl", keep_through=run.step)
        run.writer = _tensorboard(run.out, run.step) if config.tensorboard else None

    end = config.steps if stop_at is None else min(stop_at, config.steps)
    if run.step >= end:  # nothing to train (--steps 0, or a finished run): export the model as it is
        if run.main:
            _export(task, run.out / "model.safetensors")
        distributed.barrier()
        return _summary(config, run.out, run.step, start_step, 0.0, {}, run.best, run.main)

    compute_loss, ddp = _loss_function(task, info.device)
    stream = _endless_batches(task, config.seed, info, run.epoch, run.position)
    amp_dtype = _amp_dtype(config, info.device)
    autocast = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    chatty = run.main and config.progress
    bar = tqdm(total=config.steps, initial=run.step, disable=not chatty, dynamic_ncols=True, file=sys.stderr)
    run_start = time.perf_counter()
    terms = _Terms(run_start)
    last: dict[str, float] = {}
    stop_signal = 0

    while run.step < end and not stop_signal:
        lr = cosine_schedule(run.step, config.warmup, config.steps, config.lr, config.min_lr)
        set_lr(run.optimizer, lr)
        grad_norm = _step(run, stream, compute_loss, ddp, autocast, terms)
        extra = task.after_step(run.step)
        bar.update(1)

        # Stop on a signal at this step boundary: every rank learns of it here, so all stop together.
        stop_signal = distributed.all_reduce_max(stop.signum or 0, info.device)
        stopping = stop_signal > 0
        if run.step % config.log_every == 0 or run.step == end or stopping:
            last = _log(run, terms, lr, grad_norm, extra, bar)
        # An interrupted run saves without evaluating: the scheduler's grace period is short.
        if run.step % config.save_every == 0 or run.step == end or stopping:
            _save(run, evaluate=not stopping)

    bar.close()
    if run.writer is not None:
        run.writer.close()
    elapsed = time.perf_counter() - run_start
    clips_per_update = config.batch_size * config.grad_accum * info.world_size
    throughput = (run.step - start_step) * clips_per_update / max(elapsed, 1e-9)
    last = {**last, "clips_per_s": throughput}
    summary = _summary(config, run.out, run.step, start_step, elapsed, last, run.best, run.main)
    if stop_signal:
        summary["interrupted"] = signal.Signals(stop_signal).name
        summary["exit_code"] = stop_exit_code(stop_signal)
    return summary


def _start(task: TrainingTask, config: TrainConfig, info: distributed.DistInfo) -> _Run:
    """Seed this rank, then build the model on its device in training mode, the optimiser, the grad
    scaler (active for fp16 only) and the loss generator (seeded per rank)."""
    seed_everything(config.seed + info.rank)
    model = task.model.to(info.device)
    model.train()
    optimizer = build_optimizer(model, config.lr, config.weight_decay, config.layer_decay, config.betas)
    scaler = torch.amp.GradScaler(info.device.type, enabled=_amp_dtype(config, info.device) == torch.float16)
    generator = torch.Generator(task.generator_device)
    generator.manual_seed(config.seed + 1_000_003 * info.rank)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    schedule = _schedule(config, task.schedule)
    return _Run(task, config, info, model, optimizer, params, scaler, generator, schedule)


def _restore(run: _Run) -> None:
    """Continue from out_dir/state.pt when there is one: everything that decides the trajectory comes
    back (weights, optimiser, scaler, step, data position, best, this rank's RNGs); a note on rank 0
    when the schedule changed since it was saved."""
    path = run.out / "state.pt"
    chatty = run.main and run.config.progress
    if not path.exists():
        _say(chatty, f"no checkpoint in {run.out}; starting from step 0")
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    _load_saved_state(run.model, state["model"], tuple(run.task.constant_state), path)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    run.step, run.epoch, run.position = state["step"], state["epoch"], state["position"]
    run.best = state["best"]
    rngs = state["rng"]
    if run.info.rank < len(rngs):
        set_rng_state(rngs[run.info.rank], run.generator)
    else:
        warnings.warn(
            f"{path}: no RNG state for rank {run.info.rank}; resumed run is not exact", stacklevel=3
        )
    _say(chatty, f"resumed from {path} at step {run.step}")
    old = state.get("schedule") or _schedule(TrainConfig.from_dict(state["config"]), {})
    _say(run.main, schedule_change(old, run.schedule, run.step))


def _write_config(run: _Run, meta: dict | None, files: dict[str, str]) -> None:
    """Rank 0: config.json (the resolved settings, world size, device, process group and `meta`) and the
    task's extra files."""
    if not run.main:
        return
    resolved = {**run.config.to_dict(), "world_size": run.info.world_size, "device": str(run.info.device)}
    resolved["process_group"] = distributed.backend()
    write_text(run.out / "config.json", json.dumps({**resolved, **(meta or {})}, indent=2) + "\n")
    for name, text in files.items():
        write_text(run.out / name, text)


def _loss_function(task: TrainingTask, device: torch.device) -> tuple[nn.Module, Any]:
    """(what computes the loss, the DDP wrapper or None). Inside a process group (torchrun, any number of
    processes) DDP averages the gradients, through a module whose forward is the task's loss."""
    loss_module = _LossModule(task)
    if not distributed.joined():
        return loss_module, None
    ddp = nn.parallel.DistributedDataParallel(
        loss_module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=task.find_unused_parameters,
    )
    return ddp, ddp


def _step(
    run: _Run,
    stream: Iterator[tuple[Any, int, int]],
    compute_loss: nn.Module,
    ddp: Any,
    autocast: AbstractContextManager,
    terms: _Terms,
) -> torch.Tensor:
    """One update: forward and backward over grad_accum micro-batches (DDP syncs gradients on the last
    one only), then unscale, clip and step. Returns the gradient norm, a tensor until it is logged:
    reading it here would make the host wait for the GPU each step."""
    config = run.config
    for micro in range(config.grad_accum):
        batch, run.epoch, run.position = next(stream)
        sync = ddp is None or micro == config.grad_accum - 1
        with nullcontext() if sync else ddp.no_sync():
            with autocast:
                result = compute_loss(batch, run.generator)
            run.scaler.scale(result["loss"] / config.grad_accum).backward()
        terms.add(result, _batch_len(batch, config.batch_size))

    run.scaler.unscale_(run.optimizer)
    max_norm = config.clip_grad if config.clip_grad > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, max_norm).detach()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return grad_norm


class _Terms:
    """The loss terms summed over the micro-steps since the last log line, and the clips they saw since
    `start` (for the throughput)."""

    def __init__(self, start: float):
        self.reset(start)

    def reset(self, start: float) -> None:
        self.sums: dict[str, Any] = {}
        self.micro_steps, self.clips, self.start = 0, 0, start

    def add(self, result: dict, clips: int) -> None:
        for name, value in result.items():
            if _is_scalar(value):
                value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
                self.sums[name] = self.sums.get(name, 0.0) + value
        self.micro_steps += 1
        self.clips += clips


def _log(run: _Run, terms: _Terms, lr: float, grad_norm: torch.Tensor, extra: dict | None, bar: tqdm) -> dict:
    """One log line: the terms averaged since the last line over micro-steps and ranks, the gradient norm,
    lr, throughput and the task's `after_step` values, into metrics.jsonl, tensorboard and the progress
    bar (rank 0); a write error stops every rank. Starts the next averaging window; returns the line."""
    device = run.info.device
    now = time.perf_counter()
    values = {k: float(v) / terms.micro_steps for k, v in terms.sums.items()}
    values["grad_norm"] = float(grad_norm)
    values = distributed.all_reduce_mean(values, device if device.type == "cuda" else None)
    clips_per_s = terms.clips * run.info.world_size / max(now - terms.start, 1e-9)
    last = {"step": run.step, "epoch": run.epoch, "lr": lr, **values, **(extra or {})}
    last["clips_per_s"] = clips_per_s
    failure = None
    if run.main:
        try:
            run.metrics.write(last)
        except OutputError as e:
            failure = e
        if run.writer is not None:
            for k, v in last.items():
                if k != "step":
                    run.writer.add_scalar(f"train/{k}", v, run.step)
        bar.set_postfix_str(_postfix(last), refresh=False)
    _raise_if_any(failure, device)
    terms.reset(now)
    return last


def _save(run: _Run, evaluate: bool) -> None:
    """Model export, evaluation and best copy (when `evaluate` and the task evaluates), then the resumable
    state (every rank gives its RNGs) and the numbered copies. A write error on rank 0 stops every rank
    with one OutputError; the previous state.pt stays."""
    rngs = distributed.all_gather_objects(get_rng_state(run.generator))
    failure = None
    if run.main:
        try:
            _export(run.task, run.out / "model.safetensors")
            scores = run.task.evaluate() if evaluate else None
            if scores is not None:
                run.model.train()
                run.best = _keep_best(run, scores)
            state = {
                "model": _saved_state(run.model, tuple(run.task.constant_state)),
                "optimizer": run.optimizer.state_dict(),
                "scaler": run.scaler.state_dict(),
                "step": run.step,
                "epoch": run.epoch,
                "position": run.position,
                "best": run.best,
                "rng": rngs,
                "config": run.config.to_dict(),
                "schedule": run.schedule,
            }
            atomic_write(run.out / "state.pt", lambda tmp: torch_save(state, tmp))
            if run.config.keep_last > 0:
                _keep_numbered(run.out, run.step, run.config.keep_last)
        except OutputError as e:
            failure = e
    _raise_if_any(failure, run.info.device)


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: config.precision's on CUDA, none (fp32) elsewhere."""
    return PRECISIONS[config.precision] if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------------------
# Run folders, signals, schedule changes


def run_files(out: str | os.PathLike) -> list[str]:
    """The names of a run's files and folders present in `out` (empty for an empty or new folder)."""
    out = Path(out)
    return [name for name in (*RUN_FILES, *RUN_FOLDERS) if (out / name).exists()]


def check_run_folder(out: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> None:
    """Before any work: refuse to train into a folder that holds a run unless `resume` (continue it) or
    `overwrite` (clear it and start again); an empty or missing folder is fine."""
    if resume and overwrite:
        raise RunFolderError("give --resume or --overwrite, not both")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{out}: exists and is not a folder")
    found = run_files(out)
    if found and not (resume or overwrite):
        raise RunFolderError(
            f"{out} holds a run ({', '.join(found[:3])}); pass --resume to continue it "
            "or --overwrite to replace it"
        )


def clear_run(out: str | os.PathLike) -> None:
    """Remove a run's files (and numbered checkpoints, events) from `out`; other files stay."""
    out = Path(out)
    for name in run_files(out):
        try:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            else:
                (out / name).unlink()
        except OSError as e:
            raise output_error(out / name, e, "cannot remove") from e


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(out, e, "cannot create the folder") from e


def _remove_unsaved_run(out: Path, created: bool, names: list[str]) -> None:
    """After a failure before the first state.pt: remove the files this run made (best effort; files
    that were there before it, such as a `--steps 0` export, stay)."""
    for name in names:
        if (out / name).is_dir():
            shutil.rmtree(out / name, ignore_errors=True)
        else:
            (out / name).unlink(missing_ok=True)
    if created:
        try:
            out.rmdir()  # only when empty
        except OSError:
            pass


def stop_exit_code(signum: int) -> int:
    """Exit status after a signal-stopped run: 128 + signal (130 SIGINT, 143 SIGTERM); SIGUSR1 (the
    scheduler's warning before its time limit) gives 143 too: saved but not finished."""
    return 143 if signum == getattr(signal, "SIGUSR1", None) else 128 + signum


def _raise_if_any(failure: OutputError | None, device: torch.device) -> None:
    """Raise `failure` (rank 0's write error) on rank 0 and a one-line error on every other rank."""
    if distributed.any_rank(failure is not None, device):
        raise failure or OutputError(errno.EIO, "rank 0 could not write the run folder; stopping")


def _schedule(config: TrainConfig, task_schedule: dict) -> dict:
    """What shapes the trajectory's schedule: length, warm-up, lr range, plus the task's (EMA anneal)."""
    own = {"steps": config.steps, "warmup": config.warmup, "lr": config.lr, "min_lr": config.min_lr}
    return {**own, **(task_schedule or {})}


def schedule_change(old: dict, new: dict, step: int) -> str:
    """One line naming what changed in the schedule since state.pt was saved ('' when nothing did)."""
    changed = [f"{k} {old[k]} -> {new[k]}" for k in new if k in old and old[k] != new[k]]
    if not changed:
        return ""
    return (
        f"note: resuming at step {step} with a changed schedule ({', '.join(changed)}): the warm-up, "
        "the cosine decay and any EMA anneal follow the new values from here, so this is not the "
        "trajectory the run started on"
    )


def fit_batch_size(batch_size: int, clips: int, world_size: int = 1) -> int:
    """`batch_size`, or the clips per rank when there are fewer (one batch per epoch); an error when
    there is not one clip per rank."""
    per_rank = clips // world_size
    if per_rank < 1:
        raise OptionError(f"{clips} clip(s) are too few for {world_size} rank(s)")
    return min(batch_size, per_rank)


def note(text: str) -> None:
    """One line on stderr from rank 0 (through tqdm, so a progress bar is not broken)."""
    _say(distributed.is_main(), text)


# ---------------------------------------------------------------------------------------------------------
# Data stream


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of one epoch's shuffle and crops: differs per epoch, fixed by the run seed."""
    return (seed * 1_000_003 + epoch) % (2**63)


def _endless_batches(
    task: TrainingTask, seed: int, info: distributed.DistInfo, epoch: int, position: int
) -> Iterator[tuple[Any, int, int]]:
    """(batch, epoch, batches consumed in that epoch) forever, starting at a saved data position."""
    while True:
        yielded = 0
        for batch in task.batches(epoch_seed(seed, epoch), info.rank, info.world_size, position):
            position += 1
            yielded += 1
            yield batch, epoch, position
        if yielded == 0 and position == 0:
            raise RuntimeError(
                "the training data produced no batches (too few clips for one batch per rank?)"
            )
        epoch, position = epoch + 1, 0


def _batch_len(batch: Any, default: int) -> int:
    """Clips in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim else default
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        if isinstance(item, torch.Tensor) and item.ndim:
            return item.shape[0]
    return default


def _is_scalar(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------------
# Random state: plain containers and tensors only, so state.pt loads with weights_only=True.


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state(generator: torch.Generator | None = None) -> dict:
    """Python, NumPy, torch CPU/CUDA and `generator` states as tensors and lists."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state() if generator is not None else None,
    }


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    """Inverse of `get_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"])


# ---------------------------------------------------------------------------------------------------------
# Files: atomic writes, metrics log, exports, best and numbered copies.


def _export(task: TrainingTask, path: Path) -> None:
    """task.export into a temporary name first, so a crash never leaves a half-written model."""
    atomic_write(path, task.export)


def _copy(src: Path, dst: Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


class MetricsLog:
    """out_dir/metrics.jsonl, one JSON object per log step; on resume, lines past the resumed step go."""

    def __init__(self, path: Path, keep_through: int = 0):
        self.path = path
        kept = []
        if keep_through > 0 and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", math.inf) <= keep_through:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
        write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise output_error(self.path, e) from e


def _tensorboard(out: Path, step: int):
    """A SummaryWriter that drops events past `step` (resume), or None when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn(
            "tensorboard is not installed (pip install tensorboard); logging to metrics.jsonl only",
            stacklevel=3,
        )
        return None
    return SummaryWriter(str(out / "tensorboard"), purge_step=step if step > 0 else None)


def _keep_best(run: _Run, scores: dict) -> dict | None:
    """Log the evaluation and copy model.safetensors to model-best.safetensors when it improves; returns
    the best so far."""
    config, out, best, step = run.config, run.out, run.best, run.step
    scores = {k: float(v) for k, v in scores.items() if _is_scalar(v)}
    run.metrics.write({"step": step, **{f"eval/{k}": v for k, v in scores.items()}})
    if run.writer is not None:
        for k, v in scores.items():
            run.writer.add_scalar(f"eval/{k}", v, step)
    value = scores.get(config.best_metric)
    if value is None:
        return best
    better = best is None or (value > best["value"] if config.best_mode == "max" else value < best["value"])
    if better:
        _copy(out / "model.safetensors", out / "model-best.safetensors")
        return {"step": step, "metric": config.best_metric, "value": value}
    return best


def _keep_numbered(out: Path, step: int, keep: int) -> None:
    """Copy this step's export to checkpoints/model-{step}.safetensors and drop all but the newest `keep`."""
    folder = out / "checkpoints"
    _copy(out / "model.safetensors", folder / f"model-{step:08d}.safetensors")
    for old in sorted(folder.glob("model-*.safetensors"))[:-keep]:
        old.unlink()


# ---------------------------------------------------------------------------------------------------------
# Console


def _say(show: bool, text: str) -> None:
    """A line on stderr when `show` (rank 0, and for progress lines not --quiet) and `text`."""
    if show and text:
        tqdm.write(text, file=sys.stderr)


def _is_constant(key: str, constant: tuple[str, ...]) -> bool:
    return key.startswith(constant)


def _saved_state(model: nn.Module, constant: tuple[str, ...]) -> dict:
    """The model's state without the keys under `constant` prefixes: weights the task rebuilds
    identically on resume (a linear probe's frozen encoder), so state.pt holds the head, not another
    copy of the encoder. Anything updated during training, an EMA teacher included, is kept."""
    return {k: v for k, v in model.state_dict().items() if not _is_constant(k, constant)}


def _load_saved_state(model: nn.Module, state: dict, constant: tuple[str, ...], path: Path) -> None:
    """Load a `_saved_state`; only keys under the `constant` prefixes may be missing."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    wrong = [k for k in missing if not _is_constant(k, constant)] + list(unexpected)
    if wrong:
        raise ValueError(f"{path}: the saved state does not match the model ({', '.join(wrong[:5])})")


def _term(name: str, value: float) -> str:
    """`name=value`; an EMA decay shows its distance from 1 (0.99999 and 0.999994 differ)."""
    if name == "ema_decay":
        return f"{name}={value:.7f}".rstrip("0")
    return f"{name}={value:.4g}"


def _postfix(record: dict) -> str:
    """The live progress line: loss terms, lr, EMA decay if reported, throughput."""
    skip = {"step", "epoch", "clips_per_s", "lr", "sample_size"}
    terms = " ".join(_term(k, v) for k, v in record.items() if k not in skip)
    return f"{terms} lr={record['lr']:.3g} {record['clips_per_s']:.1f} clips/s"


def _summary(config, out: Path, step: int, start: int, elapsed: float, last: dict, best, main: bool) -> dict:
    summary = {
        "steps": step,
        "steps_this_run": step - start,
        "seconds": round(elapsed, 3),
        "out_dir": str(out),
        "model": str(out / "model.safetensors"),
        "last": last,
        "best": best,
    }
    if main and config.progress:
        terms = ", ".join(_term(k, v) for k, v in last.items() if k not in ("step", "epoch"))
        _say(
            True,
            f"done: step {step} ({step - start} this run, {elapsed:.1f} s){'; ' + terms if terms else ''}",
        )
        if best is not None:
            _say(True, f"best {best['metric']} {best['value']:.4g} at step {best['step']}")
        _say(True, f"model: {out / 'model.safetensors'}")
    return summary


__all__ = [
    "TrainConfig",
    "TrainingTask",
    "train",
    "epoch_seed",
    "seed_everything",
    "get_rng_state",
    "set_rng_state",
    "MetricsLog",
    "RunFolderError",
    "STOP_SIGNALS",
    "check_run_folder",
    "clear_run",
    "fit_batch_size",
    "note",
    "run_files",
    "schedule_change",
    "stop_exit_code",
]
