"""One training loop for pre-training and fine-tuning, readable top to bottom (nanoGPT style).

The loop is generic over a *task* that owns the model, the data and the loss:

    task.model                                   nn.Module; its trainable parameters are optimised
    task.batches(epoch_seed, rank, world_size, start_position)
                                                 iterator over one epoch's ready batches for this rank,
                                                 skipping the first `start_position` (exact resume)
    task.loss(batch, generator) -> dict          scalar 'loss' plus named float terms to log
    task.after_step(step) -> dict | None         optional, after each update (EMA); may return values to log
    task.export(path)                            write the model checkpoint other commands load
    task.evaluate() -> dict                      optional, at every save; `config.best_metric` picks the best
    task.generator_device                        optional, device of the loss generator (default CPU)
    task.find_unused_parameters                  optional, for DDP when some parameters get no gradient
    task.constant_state                          optional, state-dict key prefixes the task rebuilds the
                                                 same on resume (a probe's frozen encoder): not saved

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
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sslam_core.errors import OptionError, SslamError
from sslam_core.runs import distributed
from sslam_core.runs.interrupts import StopRequest
from sslam_core.runs.outputs import OutputError, atomic_write, output_error, torch_save, write_text
from sslam_core.training.optim import build_optimizer, cosine_schedule, set_lr

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


class TrainingTask(Protocol):
    """What `train` needs from pre-training or fine-tuning (see the module docstring)."""

    model: nn.Module

    def batches(self, epoch_seed: int, rank: int, world_size: int, start_position: int) -> Iterator[Any]: ...

    def loss(self, batch: Any, generator: torch.Generator) -> dict: ...

    def export(self, path: str | os.PathLike) -> None: ...


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
    device, main = info.device, info.rank == 0
    chatty = main and config.progress
    out = Path(config.out_dir)
    seed_everything(config.seed + info.rank)

    # Model, optimiser, precision, the loss generator.
    model = task.model.to(device)
    model.train()
    optimizer = build_optimizer(model, config.lr, config.weight_decay, config.layer_decay, config.betas)
    amp_dtype = PRECISIONS[config.precision] if device.type == "cuda" else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    generator = torch.Generator(getattr(task, "generator_device", "cpu"))
    generator.manual_seed(config.seed + 1_000_003 * info.rank)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    constant = tuple(getattr(task, "constant_state", ()))
    schedule = _schedule(config, task)

    # Resume: everything that decides the trajectory comes back from state.pt.
    step, epoch, position, best = 0, 0, 0, None
    state_path = out / "state.pt"
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        _load_saved_state(model, state["model"], constant, state_path)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, position, best = state["step"], state["epoch"], state["position"], state["best"]
        rngs = state["rng"]
        if info.rank < len(rngs):
            set_rng_state(rngs[info.rank], generator)
        else:
            warnings.warn(
                f"{state_path}: no RNG state for rank {info.rank}; resumed run is not exact", stacklevel=2
            )
        _say(chatty, f"resumed from {state_path} at step {step}")
        old = state.get("schedule") or _schedule(TrainConfig.from_dict(state["config"]), None)
        _say(main, schedule_change(old, schedule, step))
    elif resume:
        _say(chatty, f"no checkpoint in {out}; starting from step 0")
    start_step = step

    if main:
        resolved = {**config.to_dict(), "world_size": info.world_size, "device": str(device)}
        resolved["process_group"] = distributed.backend()
        write_text(out / "config.json", json.dumps({**resolved, **(meta or {})}, indent=2) + "\n")
        for name, text in files.items():
            write_text(out / name, text)
    metrics = MetricsLog(out / "metrics.jsonl", keep_through=step) if main else None
    writer = _tensorboard(out, step) if main and config.tensorboard else None

    if step >= config.steps or (stop_at is not None and step >= stop_at):
        if main:
            _export(task, out / "model.safetensors")
        distributed.barrier()
        return _summary(config, out, step, start_step, 0.0, {}, best, main)

    # Under torchrun (any number of processes): gradients averaged by DDP through a module whose
    # forward is the task's loss.
    loss_module = _LossModule(task)
    if distributed.joined():
        ddp = nn.parallel.DistributedDataParallel(
            loss_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=getattr(task, "find_unused_parameters", False),
        )
        compute_loss = ddp
    else:
        ddp, compute_loss = None, loss_module

    def save(evaluate: bool) -> None:
        """Model export, evaluation, best copy, then the resumable state (all ranks give RNGs). A write
        error on rank 0 stops every rank with one OutputError; the previous state.pt stays."""
        nonlocal best
        rngs = distributed.all_gather_objects(get_rng_state(generator))
        failure = None
        if main:
            try:
                _export(task, out / "model.safetensors")
                if evaluate and hasattr(task, "evaluate"):
                    scores = task.evaluate()
                    model.train()
                    best = _keep_best(config, out, scores, best, step, metrics, writer)
                state = {
                    "model": _saved_state(model, constant),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "step": step,
                    "epoch": epoch,
                    "position": position,
                    "best": best,
                    "rng": rngs,
                    "config": config.to_dict(),
                    "schedule": schedule,
                }
                atomic_write(state_path, lambda tmp: torch_save(state, tmp))
                if config.keep_last > 0:
                    _keep_numbered(out, step, config.keep_last)
            except OutputError as e:
                failure = e
        _raise_if_any(failure, device)

    stream = _endless_batches(task, config.seed, info, epoch, position)
    autocast = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    clips_per_update = config.batch_size * config.grad_accum * info.world_size
    bar = tqdm(total=config.steps, initial=step, disable=not chatty, dynamic_ncols=True, file=sys.stderr)
    sums: dict[str, Any] = {}
    micro_steps, clips_since_log = 0, 0
    run_start = log_start = time.perf_counter()
    last: dict[str, float] = {}
    end = config.steps if stop_at is None else min(stop_at, config.steps)
    stop_signal = 0

    while step < end and not stop_signal:
        lr = cosine_schedule(step, config.warmup, config.steps, config.lr, config.min_lr)
        set_lr(optimizer, lr)

        # Forward/backward over grad_accum micro-batches; DDP syncs gradients on the last one only.
        for micro in range(config.grad_accum):
            batch, epoch, position = next(stream)
            sync = ddp is None or micro == config.grad_accum - 1
            with nullcontext() if sync else ddp.no_sync():
                with autocast:
                    result = compute_loss(batch, generator)
                scaler.scale(result["loss"] / config.grad_accum).backward()
            for name, value in result.items():
                if _is_scalar(value):
                    value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
                    sums[name] = sums.get(name, 0.0) + value
            micro_steps += 1
            clips_since_log += _batch_len(batch, config.batch_size)

        # Update: unscale, clip, step, schedule.
        scaler.unscale_(optimizer)
        max_norm = config.clip_grad if config.clip_grad > 0 else math.inf
        # a tensor until it is logged: reading it here would make the host wait for the GPU each step
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        extra = task.after_step(step) if hasattr(task, "after_step") else None
        bar.update(1)

        # Stop on a signal at this step boundary: every rank learns of it here, so all stop together.
        stop_signal = distributed.all_reduce_max(stop.signum or 0, device)
        stopping = stop_signal > 0

        # Log: averages since the last log line, over micro-steps and ranks.
        if step % config.log_every == 0 or step == end or stopping:
            now = time.perf_counter()
            values = {k: float(v) / micro_steps for k, v in sums.items()}
            values["grad_norm"] = float(grad_norm)
            values = distributed.all_reduce_mean(values, device if device.type == "cuda" else None)
            clips_per_s = clips_since_log * info.world_size / max(now - log_start, 1e-9)
            last = {"step": step, "epoch": epoch, "lr": lr, **values, **(extra or {})}
            last["clips_per_s"] = clips_per_s
            failure = None
            if main:
                try:
                    metrics.write(last)
                except OutputError as e:
                    failure = e
                if writer is not None:
                    for k, v in last.items():
                        if k != "step":
                            writer.add_scalar(f"train/{k}", v, step)
                bar.set_postfix_str(_postfix(last), refresh=False)
            _raise_if_any(failure, device)
            sums, micro_steps, clips_since_log, log_start = {}, 0, 0, now

        # Save (an interrupted run skips the evaluation: the scheduler's grace period is short).
        if step % config.save_every == 0 or step == end or stopping:
            save(evaluate=not stopping)

    bar.close()
    if writer is not None:
        writer.close()
    elapsed = time.perf_counter() - run_start
    throughput = (step - start_step) * clips_per_update / max(elapsed, 1e-9)
    summary = _summary(
        config, out, step, start_step, elapsed, {**last, "clips_per_s": throughput}, best, main
    )
    if stop_signal:
        summary["interrupted"] = signal.Signals(stop_signal).name
        summary["exit_code"] = stop_exit_code(stop_signal)
    return summary


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


def _schedule(config: TrainConfig, task: Any) -> dict:
    """What shapes the trajectory's schedule: length, warm-up, lr range, plus the task's (EMA anneal)."""
    own = {"steps": config.steps, "warmup": config.warmup, "lr": config.lr, "min_lr": config.min_lr}
    return {**own, **(getattr(task, "schedule", None) or {})}


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


def _keep_best(config: TrainConfig, out: Path, scores: dict, best: dict | None, step: int, metrics, writer):
    """Log the evaluation and copy model.safetensors to model-best.safetensors when it improves."""
    scores = {k: float(v) for k, v in scores.items() if _is_scalar(v)}
    metrics.write({"step": step, **{f"eval/{k}": v for k, v in scores.items()}})
    if writer is not None:
        for k, v in scores.items():
            writer.add_scalar(f"eval/{k}", v, step)
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
