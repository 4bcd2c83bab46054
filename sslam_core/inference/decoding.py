"""The decoding stage of the pipeline: files decoded and cut ahead of the model, in line, by threads or
by worker processes (`workers`), in input order, each file's errors its own.

On CPU each window's model input (fbank) is computed where it was decoded, on one core, so results are
the same bits however the files were decoded; long files are streamed lazily by the consumer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass

import torch

from sslam_core.audio.frontend import prepare_input
from sslam_core.inference.windows import (
    FileResult,
    FileWindows,
    Source,
    Window,
    cut_windows,
    file_error,
    in_memory,
    is_long,
)
from sslam_core.inference.workers import TaskFailed, ordered_map

Features = tuple[int, str | tuple[float, float]]  # (target_length, normalization) of model inputs


@dataclass(frozen=True)
class DecodeJob:
    """Decode and cut one file, and with `features`, compute each window's model input; None for a
    long file (the consumer streams it). This is each file's error boundary: whatever goes wrong
    while opening, decoding, resampling or cutting one file (any Exception, a missing optional module
    included) becomes that file's FileResult, and the other files go on. It pickles, so that it can
    run in worker processes."""

    window: int
    hop: int
    features: Features | None

    def prepared(self, w: Window) -> Window:
        if self.features is not None and w.wave is not None:
            target_length, norm = self.features
            w.input, w.wave = prepare_input([w.wave], target_length=target_length, norm=norm), None
        return w

    def __call__(self, task: tuple[int, Source, str]) -> FileWindows | FileResult | None:
        i, source, name = task
        try:
            if is_long(source):
                return None
            out = cut_windows(source, i, self.window, self.hop, name=name)
            out.windows = [self.prepared(w) for w in out.windows]
            return out
        except Exception as e:  # the per-file error boundary (see the docstring)
            return file_error(name, e)


@dataclass(frozen=True)
class _Packed:
    """A decoded file on its way back from a worker process: numpy arrays pickle through the pipe,
    where tensors would go through one shared-memory file each."""

    path: str
    samples: int
    windows: list[tuple[int, int, object, object]]  # (index, start frame, wave, input); arrays or None

    @staticmethod
    def pack(item: FileWindows | FileResult | None) -> _Packed | FileResult | None:
        if not isinstance(item, FileWindows):
            return item
        arrays = [
            (w.index, w.start_frame, *(None if t is None else t.numpy() for t in (w.wave, w.input)))
            for w in item.windows
        ]
        return _Packed(item.path, item.samples, arrays)

    def unpack(self, file: int) -> FileWindows:
        windows = [
            Window(file, k, start, *(None if a is None else torch.from_numpy(a) for a in (wave, x)))
            for k, start, wave, x in self.windows
        ]
        return FileWindows(self.path, windows, self.samples)


@dataclass(frozen=True)
class _InWorker:
    """`job` as a worker process runs it: its result packed for the pipe."""

    job: DecodeJob

    def __call__(self, task: tuple[int, Source, str]) -> _Packed | FileResult | None:
        return _Packed.pack(self.job(task))


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch ops on one core for the block: decoding and the fbank round the same way in this process
    as in a worker process (more intra-op threads may split a matmul differently)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _in_line(job: DecodeJob, tasks: list[tuple[int, Source, str]]) -> Iterator:
    for task in tasks:
        with one_thread():
            out = job(task)
        yield out


def lazily(job: DecodeJob, windows: Iterable[Window]) -> Iterator[Window]:
    """A streamed file's windows, each decoded and prepared on one core (see `one_thread`)."""
    stream = iter(windows)
    while True:
        with one_thread():
            w = next(stream, None)
            if w is None:
                return
            w = job.prepared(w)
        yield w


def _threaded(job: DecodeJob, tasks: list[tuple[int, Source, str]], workers: int) -> Iterator:
    """`job` over `tasks` in order by `workers` threads, up to 2 x `workers` ahead."""
    pool = ThreadPoolExecutor(workers)
    try:
        pending: list[Future] = []
        nxt = 0
        while nxt < len(tasks) or pending:
            while nxt < len(tasks) and len(pending) < 2 * workers:
                pending.append(pool.submit(job, tasks[nxt]))
                nxt += 1
            yield pending.pop(0).result()
    finally:  # also when the consumer stops early (an interrupted run): drop the files not started
        pool.shutdown(wait=True, cancel_futures=True)


def _processed(job: DecodeJob, tasks: list[tuple[int, Source, str]], workers: int) -> Iterator:
    """`job` over `tasks` in order by `workers` processes; a file whose process died is skipped."""
    with closing(ordered_map(_InWorker(job), tasks, min(workers, len(tasks)))) as results:
        for (i, _, name), out in zip(tasks, results, strict=False):
            if isinstance(out, TaskFailed):
                yield FileResult(name, error=f"{name}: {out.reason}")
            else:
                yield out.unpack(i) if isinstance(out, _Packed) else out


def decode_files(
    sources: list[Source],
    names: list[str],
    window: int,
    hop: int,
    workers: int,
    processes: bool | None = None,
    features: Features | None = None,
) -> Iterator[tuple[int, FileWindows | FileResult]]:
    """Files in order, decoded ahead by `workers` processes (`processes`; None: unless every source
    is a waveform in memory already, which the caller's threads resample at no pickling cost) or
    threads (one, or `workers` 0: in line); long files are streamed lazily by the consumer instead.
    Each file's errors stay its own (`DecodeJob`); on CPU every window's model input is computed on one
    core, so the results are the same bits whichever way the files were decoded."""
    job = DecodeJob(window, hop, features)
    tasks = [(i, s, names[i]) for i, s in enumerate(sources)]
    if processes is None:
        processes = not all(in_memory(s) for s in sources)
    if processes and workers >= 1 and tasks:
        results = _processed(job, tasks, workers)
    elif workers > 1:  # threads: the model inputs are computed here, on one core
        results = _threaded(DecodeJob(window, hop, None), tasks, workers)
    else:
        results = _in_line(job, tasks)
    with closing(results):
        for (i, source, name), item in zip(tasks, results, strict=False):
            if item is None:  # a long file: streamed here, its errors caught by the consumer
                try:
                    item = cut_windows(source, i, window, hop, lazy=True, name=name)
                except Exception as e:
                    item = file_error(name, e)
            if isinstance(item, FileWindows):
                item.windows = lazily(job, item.windows)
            yield i, item
