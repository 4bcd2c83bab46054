"""An ordered map over worker processes that survives its workers: decoding audio off the GIL.

`ordered_map(fn, tasks, workers)` runs `fn(task)` in `workers` processes and yields the results in
task order, keeping 2 to 16 tasks per worker ahead of the consumer (as many as fit in 32 MiB of
results of the size seen so far: short files must not wait on a busy main process, long ones must
not fill its memory). Workers hold the task list
(inherited when forked) and receive the numbers of the tasks to run on their own pipe, so the main
process always knows which task a worker was on: when a worker dies (a signal, a
crash in a native decoder, `os._exit`), that task yields a `TaskFailed` naming how it died, the
tasks queued behind it go to a fresh worker, and the run goes on. An exception raised by `fn`
becomes a `TaskFailed` too. Workers leave SIGINT / SIGTERM to the main process (it decides when to
stop) and exit on their own if it dies; closing the generator, normally or early, ends and reaps
all of them.

Workers are forked where the platform can (no start-up cost, the parent's imports, state and task
list are inherited), else spawned, so `fn` and the tasks must pickle. Results travel through a pipe as
pickles: return numpy arrays rather than tensors, which would go through shared memory files.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import signal
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from typing import Any

TASKS_PER_WORKER = (2, 4, 16)  # tasks ahead per worker: the fewest, the first guess, the most
BYTES_AHEAD_PER_WORKER = 32 << 20  # results of this size in all, ahead of the consumer, per worker
PARENT_POLL_SECONDS = 1.0  # how often an idle worker checks that the main process still lives
GRACE_SECONDS = 5.0  # how long idle workers get to exit at the end before they are killed
PIPE_BYTES = 1 << 20  # a result pipe's capacity (Linux lets any process ask for up to 1 MiB)


@dataclass(frozen=True)
class TaskFailed:
    """The one-line reason a task has no result: `fn` raised, or its worker died."""

    reason: str


def one_line(e: BaseException) -> str:
    """`Type: first line of the message`."""
    reason = (str(e).splitlines() or [""])[0].strip()
    return type(e).__name__ + (f": {reason}" if reason else "")


def death(exitcode: int | None) -> str:
    """How a worker process ended, in words."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"its decoding process was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"its decoding process was killed by signal {-exitcode}"
    return f"its decoding process exited unexpectedly (status {exitcode})"


def _serve(
    fn: Callable[[Any], Any],
    tasks: Sequence[Any],
    keys: Connection,
    results: Connection,
    parent: int,
    inherited: list[Connection],
) -> None:
    """A worker's loop: a task number in, (number, result or TaskFailed) out, until None or orphaned.
    `inherited` are the main process's pipe ends that a fork copied: closed, so that the main
    process's death closes this worker's pipes (and the worker ends) instead of leaving it blocked."""
    import torch

    from sslam_core.runs.interrupts import ignore_stop_signals

    for conn in inherited:
        conn.close()
    ignore_stop_signals()
    torch.set_num_threads(1)  # one core per worker; the parent's thread pool is not usable after a fork
    while True:
        try:
            if not keys.poll(PARENT_POLL_SECONDS):
                if os.getppid() != parent:
                    return
                continue
            key = keys.recv()
        except (EOFError, OSError):
            return  # the main process is gone
        if key is None:
            return
        try:
            out = fn(tasks[key])
        except Exception as e:
            out = TaskFailed(one_line(e))
        try:
            results.send((key, out))
        except (BrokenPipeError, ConnectionError, EOFError):
            return
        except Exception as e:  # the result would not pickle; nothing was written
            results.send((key, TaskFailed(f"its result could not be sent back ({one_line(e)})")))


def _widen(pipe: Connection) -> None:
    """Let the pipe hold PIPE_BYTES, where the platform allows: a result is then written in one go
    and read in one go, instead of a wake-up of the reader for each 4 KiB page (and the writer
    waiting for it), which on a loaded machine costs a time slice each."""
    try:
        import fcntl

        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (ImportError, AttributeError, OSError):
        pass


class _Worker:
    """One process with a pipe each way, and the task numbers it was given, oldest first."""

    def __init__(self, ctx: Any, fn: Callable[[Any], Any], tasks: Sequence[Any], others: list[_Worker]):
        worker_keys, self.keys_out = ctx.Pipe(duplex=False)
        self.results, sender = ctx.Pipe(duplex=False)
        _widen(sender)
        inherited = []  # the main process's ends, copied by a fork (a spawn copies nothing)
        if ctx.get_start_method() == "fork":
            ends = [c for w in [self, *others] for c in (w.keys_out, w.results)]
            inherited = [c for c in ends if not c.closed]
        args = (fn, tasks, worker_keys, sender, os.getpid(), inherited)
        self.process = ctx.Process(target=_serve, args=args, daemon=True)
        self.process.start()
        worker_keys.close()  # the worker holds the only ends it uses
        sender.close()
        self.keys: deque[int] = deque()

    def give(self, key: int) -> None:
        self.keys.append(key)
        self.keys_out.send(key)  # a few bytes into a pipe that holds thousands: never blocks

    def stop(self, grace: float) -> None:
        """Ask the worker to exit, give it `grace` seconds, then kill it; reap it either way."""
        if grace > 0 and self.process.is_alive():
            try:
                self.keys_out.send(None)
            except OSError:
                pass
            self.process.join(grace)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.keys_out.close()
        self.results.close()


class _Pool:
    """The workers of one `ordered_map` run."""

    def __init__(self, fn: Callable[[Any], Any], tasks: Sequence[Any], workers: int):
        methods = mp.get_all_start_methods()
        self.ctx = mp.get_context("fork" if "fork" in methods else "spawn")
        self.fn, self.tasks = fn, tasks
        self.received, self.bytes = 0, 0  # results read and their pickled size, for `depth`
        self.workers: list[_Worker] = []
        _open_pools.add(self)
        try:
            for _ in range(workers):
                self.workers.append(self._start())
        except BaseException:
            self.close(grace=0)
            raise

    def _start(self) -> _Worker:
        return _Worker(self.ctx, self.fn, self.tasks, self.workers)

    def submit(self, key: int, done: dict[int, Any]) -> None:
        """Give task `key` to the least busy worker. A worker found dead here (it died idle, or since
        the last `collect`) is replaced as `collect` would, and the task goes to another one."""
        while True:
            w = min(self.workers, key=lambda w: len(w.keys))
            try:
                if not w.process.is_alive():
                    raise BrokenPipeError("the worker has died")
                w.give(key)
                return
            except OSError:
                if key in w.keys:
                    w.keys.remove(key)
                self._drain(w, done, block=False)  # results it sent before it died
                self._replace(w, done)

    @property
    def depth(self) -> int:
        """Tasks ahead per worker: as many results of the mean size so far as fit the byte budget."""
        fewest, guess, most = TASKS_PER_WORKER
        if not self.received:
            return guess
        return max(fewest, min(most, BYTES_AHEAD_PER_WORKER * self.received // max(1, self.bytes)))

    def has_room(self) -> bool:
        return any(len(w.keys) < self.depth for w in self.workers)

    def collect(self, done: dict[int, Any]) -> None:
        """Wait for at least one result or death and record it in `done`; a dead worker's first task
        fails, the rest go to its replacement."""
        busy = [w for w in self.workers if w.keys]
        ready = set(wait([w.results for w in busy] + [w.process.sentinel for w in busy]))
        for w in busy:
            dead = w.process.sentinel in ready
            if w.results in ready or dead:
                dead = not self._drain(w, done, block=not dead) or dead
            if dead:
                self._replace(w, done)

    def _drain(self, w: _Worker, done: dict[int, Any], block: bool) -> bool:
        """Read the results waiting in `w`'s pipe (at least one if `block`); False once it is closed."""
        try:
            while block or w.results.poll():
                message = w.results.recv_bytes()
                key, out = ForkingPickler.loads(message)
                self.received, self.bytes = self.received + 1, self.bytes + len(message)
                w.keys.remove(key)
                done[key] = out
                block = False
        except Exception:  # closed, or a message cut short by the worker's death
            return False
        return True

    def _replace(self, w: _Worker, done: dict[int, Any]) -> None:
        w.process.join()
        reason = death(w.process.exitcode)
        keys = list(w.keys)
        w.keys.clear()
        w.stop(grace=0)
        self.workers[self.workers.index(w)] = fresh = self._start()
        if keys:
            done[keys[0]] = TaskFailed(reason)
        for key in keys[1:]:
            fresh.give(key)

    def close(self, grace: float) -> None:
        _open_pools.discard(self)
        for w in self.workers:
            if w.keys:
                w.stop(grace=0)  # busy with a task whose result nobody wants
        for w in self.workers:
            if not w.keys:
                w.stop(grace)


_open_pools: weakref.WeakSet[_Pool] = weakref.WeakSet()


@atexit.register
def _kill_open_pools() -> None:
    """At exit, kill the workers of runs nobody closed, before multiprocessing's own exit handler
    terminates and joins them (they ignore its first SIGTERM; registered later, this runs first)."""
    for pool in list(_open_pools):
        pool.close(grace=0)


def ordered_map(fn: Callable[[Any], Any], tasks: Sequence[Any], workers: int) -> Iterator[Any]:
    """`fn(task)` for each task, in order, computed by `workers` processes a bounded number of tasks
    ahead (see the module's docstring); a task that raised or whose worker died yields a
    `TaskFailed` instead. Closing the generator early (or an exception in the consumer) kills the
    workers at once; at the end they exit."""
    pool = _Pool(fn, tasks, workers)
    done: dict[int, Any] = {}
    submitted, finished = 0, False
    try:
        for nxt in range(len(tasks)):
            while nxt not in done:
                while submitted < len(tasks) and submitted - nxt < pool.depth * workers and pool.has_room():
                    pool.submit(submitted, done)
                    submitted += 1
                pool.collect(done)
            yield done.pop(nxt)
        finished = True
    finally:
        pool.close(grace=GRACE_SECONDS if finished else 0)
