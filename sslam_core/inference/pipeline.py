"""Batched inference over audio files of any length: decode, cut windows, fbank on the device, encode.

Every command that runs a model over files (`tag`, `extract`, `eval`, the HEAR module) goes through
`run_windows`: files are decoded in line or by worker processes (`decode_workers`), cut into windows of
`target_length` frames, batched across files, turned into model input and encoded in one forward
pass per batch. Results come back per file, in input order, with per-file errors instead of
exceptions. On a GPU the fbank of a batch is computed there in one go; on CPU each window's fbank is
computed where it was decoded (a worker process: off the model's cores), on one core, so that the
model inputs do not depend on how files were decoded or batched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sslam_core.audio.constants import (
    DEFAULT_TARGET_LENGTH,
    FRAME_SAMPLES,
    FRAMES_PER_SECOND,
    HOP_SAMPLES,
    PATCH_FRAMES,
    SAMPLE_RATE,
    frames_to_seconds,
)
from sslam_core.audio.decode import audio_info, stream_audio
from sslam_core.audio.files import AudioError, AudioFile, AudioSource
from sslam_core.audio.frontend import prepare_input
from sslam_core.audio.resample import resample
from sslam_core.errors import OptionError
from sslam_core.inference.workers import TaskFailed, ordered_map
from sslam_core.models.precision import strict_fp32
from sslam_core.models.transformer import FREQ_PATCHES, Classifier


def window_samples(frames: int) -> int:
    """Samples needed for `frames` fbank frames."""
    return FRAME_SAMPLES + (frames - 1) * HOP_SAMPLES


def num_frames(samples: int) -> int:
    """Fbank frames of a wave of `samples` samples (Kaldi snip_edges)."""
    return 0 if samples < FRAME_SAMPLES else 1 + (samples - FRAME_SAMPLES) // HOP_SAMPLES


def num_windows(frames: int, window: int, hop: int) -> int:
    """Windows of `window` frames every `hop` frames over `frames` frames of audio: enough to reach the
    end (the last one padded), but none starting at or past the end (a hop longer than the window
    leaves gaps instead)."""
    if frames <= window:
        return 1
    return min(1 + math.ceil((frames - window) / hop), 1 + (frames - 1) // hop)


def seconds_to_frames(seconds: float, multiple: int = PATCH_FRAMES) -> int:
    """Seconds -> fbank frames, rounded to a whole number of time patches."""
    frames = round(seconds * FRAMES_PER_SECOND / multiple) * multiple
    if frames <= 0:
        raise OptionError(f"{seconds} s is shorter than one {multiple * 10} ms patch")
    return frames


def resolve_window(
    model: nn.Module, window: float | None = None, hop: float | None = None, target_length: int | None = None
) -> tuple[int, int]:
    """(window, hop) in frames: `target_length` frames, else `window` seconds, else the length the
    model was trained with, else 1024; the hop defaults to the window."""
    for name, value in (("--window", window), ("--hop", hop)):
        if value is not None and not (math.isfinite(value) and value >= PATCH_FRAMES / FRAMES_PER_SECOND):
            raise OptionError(
                f"{name} {value}: expected at least {PATCH_FRAMES / FRAMES_PER_SECOND} s (one time patch)"
            )
    if target_length is not None and (target_length <= 0 or target_length % PATCH_FRAMES):
        raise OptionError(f"--target-length {target_length}: expected a positive multiple of {PATCH_FRAMES}")
    frames = target_length or (seconds_to_frames(window) if window else None)
    frames = frames or getattr(model, "target_length", None) or DEFAULT_TARGET_LENGTH
    if frames <= 0 or frames % PATCH_FRAMES:
        raise OptionError(f"the window must be a positive multiple of {PATCH_FRAMES} frames, got {frames}")
    limit = max_frames(model)
    if limit is not None and frames > limit:
        raise OptionError(
            f"a window of {frames} frames ({frames_to_seconds(frames):.2f} s) is longer than this model's "
            f"position table holds ({limit} frames, {frames_to_seconds(limit):.2f} s)"
        )
    return frames, seconds_to_frames(hop) if hop else frames


def max_frames(model: nn.Module) -> int | None:
    """The longest input in frames that `model`'s position table covers (None if it has none)."""
    encoder = getattr(model, "encoder", model)
    table, cfg = getattr(encoder, "pos_embed", None), getattr(encoder, "cfg", None)
    if table is None or cfg is None:
        return None
    return table.shape[1] // cfg.freq_patches * cfg.patch_size


def window_warning(model: nn.Module, frames: int) -> str | None:
    """A note when windows are longer than the audio the model was trained on: it still runs (the
    position table is longer), but on inputs it has never seen."""
    trained = getattr(model, "target_length", None) or DEFAULT_TARGET_LENGTH
    if frames > trained:
        return (
            f"note: windows of {frames_to_seconds(frames):.2f} s are longer than the "
            f"{frames_to_seconds(trained):.2f} s this model was trained on; its outputs on them are untested"
        )
    return None


@dataclass
class Window:
    """One model input cut from a file: its wave and where it starts; on CPU, `input` is its model
    input (1, 1, T, 128), computed where it was decoded, and `wave` is then dropped (None)."""

    file: int
    index: int
    start_frame: int
    wave: Tensor | None
    input: Tensor | None = None


@dataclass
class FileWindows:
    """A file being cut into windows. `windows` is a list for files decoded ahead by a worker, or
    a generator for long files streamed in place; `samples` is known once it is exhausted."""

    path: str
    windows: Iterable[Window]
    samples: int = 0

    @property
    def duration(self) -> float:
        return self.samples / SAMPLE_RATE


@dataclass
class FileResult:
    """Per-window outputs of one file, or the reason it was skipped."""

    path: str
    duration: float = 0.0
    frames: int = 0
    starts: list[int] = field(default_factory=list)  # window start frames
    outputs: dict[str, list[Tensor]] = field(default_factory=dict)  # name -> one tensor per window
    error: str | None = None

    def stacked(self, name: str) -> Tensor:
        return torch.stack(self.outputs[name])


@dataclass(frozen=True)
class Shifted:
    """A source read from its `frames`-th 10 ms frame on: the windows of a shifted pass (finer time
    steps than one 160 ms patch, see `embeddings.embed`'s `frame_hop`)."""

    source: str | tuple[Tensor, int]
    frames: int


# a file path, an in-memory (wave, sample_rate), a member of another file (a tar shard's), a
# self-decoding source, or any of these shifted
Source = str | tuple[Tensor, int] | AudioFile | AudioSource | Shifted
STREAM_SECONDS = 300.0  # files longer than this are cut while decoding, not decoded ahead


def source_name(source: Source, i: int) -> str:
    # paths and waveforms first: an isinstance check against a Protocol costs microseconds
    if isinstance(source, str | tuple):
        return source if isinstance(source, str) else f"<waveform {i}>"
    if isinstance(source, Shifted):
        return source_name(source.source, i)
    return source.name


def _skip(blocks: Iterable[Tensor], samples: int) -> Iterator[Tensor]:
    for block in blocks:
        if samples >= len(block):
            samples -= len(block)
            continue
        yield block[samples:]
        samples = 0


def _blocks(source: Source, name: str, block_seconds: float) -> Iterable[Tensor]:
    if isinstance(source, Shifted):
        return _skip(_blocks(source.source, name, block_seconds), source.frames * HOP_SAMPLES)
    if isinstance(source, str | AudioFile):
        return stream_audio(source, SAMPLE_RATE, block_seconds=block_seconds)
    if isinstance(source, AudioSource):
        return source.blocks(block_seconds)
    wave, sr = source
    wave = torch.as_tensor(wave, dtype=torch.float32)
    if wave.ndim == 2:  # (channels, samples)
        wave = wave.mean(dim=0)
    if not torch.isfinite(wave).all():
        raise AudioError(name, "waveform contains NaN or infinite values")
    return [resample(wave, sr, SAMPLE_RATE) if sr != SAMPLE_RATE else wave]


def _window_stream(
    source: Source, file: int, window: int, hop: int, out: FileWindows, block_seconds: float
) -> Iterator[Window]:
    """Decode `source` block by block and yield its windows of `window` frames every `hop` frames.

    Only the samples of windows not yet emitted are held, never the file at its original rate.
    """
    span, step = window_samples(window), hop * HOP_SAMPLES
    buffer, offset, total, count = torch.zeros(0), 0, 0, 0  # buffer[0] is sample `offset`

    def emit(final: bool) -> Iterator[Window]:
        nonlocal buffer, offset, count
        while True:
            start = count * step
            if not final and start + span > total:
                break
            if final and count >= num_windows(num_frames(total), window, hop):
                break
            yield Window(
                file, count, start // HOP_SAMPLES, buffer[start - offset : start - offset + span].clone()
            )
            count += 1
        if count * step > offset:
            buffer = buffer[count * step - offset :]
            offset = count * step

    for block in _blocks(source, out.path, block_seconds):
        buffer = torch.cat([buffer, block.float()])
        total += len(block)
        yield from emit(final=False)
    if total == 0:
        raise AudioError(out.path, "no audio samples")
    if total < FRAME_SAMPLES:
        raise AudioError(out.path, f"too short ({total} samples at 16 kHz, the minimum is 400 = 25 ms)")
    out.samples = total
    yield from emit(final=True)


def cut_windows(
    source: Source,
    file: int,
    window: int,
    hop: int,
    lazy: bool = False,
    block_seconds: float = 10.0,
    name: str | None = None,
) -> FileWindows:
    """Cut `source` into windows: all at once (a list), or `lazy`ly while decoding (a generator).
    `name` is how messages refer to it (default: its path)."""
    out = FileWindows(name or source_name(source, file), [])
    stream = _window_stream(source, file, window, hop, out, block_seconds)
    out.windows = stream if lazy else list(stream)
    return out


def autocast(device: torch.device, precision: str):
    """Autocast context for `precision` (fp32: full fp32, TF32 off on a GPU; int8 models are ONNX
    Runtime graphs: none)."""
    if precision == "fp32":
        return strict_fp32(device)
    if precision == "int8":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def _error(name: str, e: Exception) -> FileResult:
    """The one-line reason a file was skipped: `NAME: reason`."""
    if isinstance(e, AudioError):
        return FileResult(name, error=f"{name}: {e.reason}")
    reason = (str(e).splitlines() or [""])[0].strip()
    return FileResult(name, error=f"{name}: {type(e).__name__}" + (f": {reason}" if reason else ""))


def _is_long(source: Source) -> bool:
    if isinstance(source, tuple):
        return False
    if isinstance(source, Shifted):
        return _is_long(source.source)
    if isinstance(source, AudioSource) and not isinstance(source, AudioFile):
        return (source.seconds() or 0.0) > STREAM_SECONDS
    try:
        return audio_info(source)[3] > STREAM_SECONDS
    except Exception:  # decoding will report the problem
        return False


def _in_memory(source: Source) -> bool:
    """A waveform already in this process: nothing to decode, only to resample and cut."""
    return _in_memory(source.source) if isinstance(source, Shifted) else isinstance(source, tuple)


Features = tuple[int, str | tuple[float, float]]  # (target_length, normalization) of model inputs


@dataclass(frozen=True)
class _Decode:
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
            if _is_long(source):
                return None
            out = cut_windows(source, i, self.window, self.hop, name=name)
            out.windows = [self.prepared(w) for w in out.windows]
            return out
        except Exception as e:  # the per-file error boundary (see the docstring)
            return _error(name, e)


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

    job: _Decode

    def __call__(self, task: tuple[int, Source, str]) -> _Packed | FileResult | None:
        return _Packed.pack(self.job(task))


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch ops on one core for the block: decoding and the fbank round the same way in this process
    as in a worker process (more intra-op threads may split a matmul differently)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _in_line(job: _Decode, tasks: list[tuple[int, Source, str]]) -> Iterator:
    for task in tasks:
        with _one_thread():
            out = job(task)
        yield out


def _lazily(job: _Decode, windows: Iterable[Window]) -> Iterator[Window]:
    """A streamed file's windows, each decoded and prepared on one core (see `_one_thread`)."""
    stream = iter(windows)
    while True:
        with _one_thread():
            w = next(stream, None)
            if w is None:
                return
            w = job.prepared(w)
        yield w


def _threaded(job: _Decode, tasks: list[tuple[int, Source, str]], workers: int) -> Iterator:
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


def _processed(job: _Decode, tasks: list[tuple[int, Source, str]], workers: int) -> Iterator:
    """`job` over `tasks` in order by `workers` processes; a file whose process died is skipped."""
    with closing(ordered_map(_InWorker(job), tasks, min(workers, len(tasks)))) as results:
        for (i, _, name), out in zip(tasks, results, strict=False):
            if isinstance(out, TaskFailed):
                yield FileResult(name, error=f"{name}: {out.reason}")
            else:
                yield out.unpack(i) if isinstance(out, _Packed) else out


def _decoded(
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
    Each file's errors stay its own (`_Decode`); on CPU every window's model input is computed on one
    core, so the results are the same bits whichever way the files were decoded."""
    job = _Decode(window, hop, features)
    tasks = [(i, s, names[i]) for i, s in enumerate(sources)]
    if processes is None:
        processes = not all(_in_memory(s) for s in sources)
    if processes and workers >= 1 and tasks:
        results = _processed(job, tasks, workers)
    elif workers > 1:  # threads: the model inputs are computed here, on one core
        results = _threaded(_Decode(window, hop, None), tasks, workers)
    else:
        results = _in_line(job, tasks)
    with closing(results):
        for (i, source, name), item in zip(tasks, results, strict=False):
            if item is None:  # a long file: streamed here, its errors caught by the consumer
                try:
                    item = cut_windows(source, i, window, hop, lazy=True, name=name)
                except Exception as e:
                    item = _error(name, e)
            if isinstance(item, FileWindows):
                item.windows = _lazily(job, item.windows)
            yield i, item


Head = Callable[[Tensor], dict[str, Tensor]]


def default_batching(device: torch.device, batch_size: int | None, workers: int | None) -> tuple[int, int]:
    """Windows per forward pass and decoding processes. On CPU: batches of 4 (the most clips/s of a
    ViT-B on 2 cores) and 0 processes, decoding in line: on the loaded 2-core development machine,
    3,000 FSDD files through a one-block model ran at 349 files/s in line vs 318 / 267 with 1 / 2
    worker processes (one intra-op thread; scripts/bench_scale.py), and decoding a 10 s 44.1 kHz
    stereo file (~19 ms there) is ~3% of a ViT-B's 0.6 s per clip. On GPU: batches of 32 and 4
    processes to keep it fed (on one H200, scripts/gpu_check.py measured 8 / 16 / 24 processes at
    543 / 515 / 426 clips/s: the main process is the limit there, see docs/gpu.md)."""
    cpu = torch.device(device).type == "cpu"
    return batch_size or (4 if cpu else 32), workers if workers is not None else (0 if cpu else 4)


def _on_device(waves: list[Tensor], device: torch.device) -> list[Tensor]:
    """`waves` on `device`; to a GPU as one pinned buffer copied without waiting."""
    if device.type != "cuda":
        return [w.to(device) for w in waves]
    flat = torch.empty(sum(len(w) for w in waves), pin_memory=True)
    torch.cat(waves, out=flat)
    return list(flat.to(device, non_blocking=True).split([len(w) for w in waves]))


def run_windows(
    model: nn.Module,
    sources: Iterable[Source],
    head: Head,
    *,
    target_length: int = 1024,
    hop: int | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    processes: bool | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    normalization: str | tuple[float, float] = "audioset",
    stop: Callable[[], bool] | None = None,
    names: Sequence[str] | None = None,
) -> Iterator[FileResult]:
    """Run `model` over every window of every source; `head(input)` maps a (B,1,T,128) batch to named
    per-window outputs (B, ...). Yields one FileResult per source, in order. `batch_size` and
    `workers` default to what suits the device (see `default_batching`); `workers` decode in
    processes (0: in line), or in threads with `processes=False` and for sources that are all
    waveforms in memory already (see `_decoded`). `names` are how results and messages refer to the
    sources (default: their paths). When `stop()` turns true (a signal, see `interrupts`), the run
    ends before the next batch: the files finished so far have been yielded, the rest are not, and
    no decoding process is left behind. Results on CPU do not depend on `workers` or `processes`."""
    device = torch.device(device)
    batch_size, workers = default_batching(device, batch_size, workers)
    sources = list(sources)
    hop = hop or target_length
    features = (target_length, normalization) if device.type == "cpu" else None
    results: dict[int, FileResult] = {}
    pending: dict[int, int] = {}  # file -> windows queued but not yet encoded
    decoding: set[int] = set()  # files whose windows are still being cut
    queue: list[Window] = []
    in_flight: list[tuple[list[Window | None], dict[str, Tensor]]] = []  # launched, outputs not fetched
    next_out = 0

    def stopping() -> bool:
        return stop is not None and stop()

    def flush() -> None:
        """Encode the queued windows; on a GPU, their outputs are fetched after the next batch was
        launched, so that it computes while this process gathers the batch after."""
        if features is not None:  # computed per window where it was decoded
            x = torch.cat([w.input for w in queue])
        else:  # the front end in full fp32 whatever the model's precision
            waves = _on_device([w.wave for w in queue], device)
            with torch.inference_mode(), strict_fp32(device):
                x = prepare_input(waves, target_length=target_length, norm=normalization)
        with torch.inference_mode(), autocast(device, precision):
            out = head(x)
        batch: list[Window | None] = list(queue)
        queue.clear()
        complete()
        in_flight.append((batch, out))
        if device.type != "cuda":
            complete()

    def complete() -> None:
        """The outputs of the batches in flight, row by row into their files' results."""
        for windows, out in in_flight:
            out = {name: value.float().cpu() for name, value in out.items()}
            for j, w in enumerate(windows):
                if w is None:  # its file broke after the batch was launched
                    continue
                for name, value in out.items():
                    # a copy, so that a kept row does not hold on to the whole batch's tensor
                    results[w.file].outputs.setdefault(name, []).append(value[j].clone())
                pending[w.file] -= 1
        in_flight.clear()

    def finished() -> Iterator[FileResult]:
        nonlocal next_out
        while next_out in results and next_out not in decoding and not pending.get(next_out):
            pending.pop(next_out, None)
            yield results.pop(next_out)
            next_out += 1

    def landed() -> Iterator[FileResult]:
        """On a stop: the files whose last batch was already launched are finished too."""
        complete()
        yield from finished()

    names = list(names) if names is not None else [source_name(s, i) for i, s in enumerate(sources)]
    decoded = _decoded(sources, names, target_length, hop, workers, processes, features)
    with closing(decoded):  # ends the decoding processes however the run ends
        for i, item in decoded:
            if stopping():
                yield from landed()
                return
            if isinstance(item, FileResult):
                results[i] = item
                yield from finished()
                continue
            res = results[i] = FileResult(item.path)
            decoding.add(i)
            pending[i] = 0
            try:
                for w in item.windows:
                    res.starts.append(w.start_frame)
                    queue.append(w)
                    pending[i] += 1
                    if len(queue) == batch_size:
                        if stopping():
                            yield from landed()
                            return
                        flush()
                        yield from finished()
            except Exception as e:  # a streamed file broke part-way: drop what it queued
                queue[:] = [w for w in queue if w.file != i]
                for windows, _ in in_flight:
                    windows[:] = [None if w is not None and w.file == i else w for w in windows]
                results[i], pending[i] = _error(item.path, e), 0
            else:
                res.duration, res.frames = item.duration, num_frames(item.samples)
            decoding.discard(i)
            yield from finished()
    if queue:
        if stopping():
            yield from landed()
            return
        flush()
    complete()
    yield from finished()


def feature_head(
    model: nn.Module, layer: int | None = None, keep: tuple[str, ...] = ("clip", "frame", "patch")
) -> Head:
    """Per-window CLS ("clip"), patch tokens ("patch") and per-160-ms-step means of the frequency
    patches ("frame") of block `layer`; only the outputs named in `keep` are returned."""
    encode = model.features if isinstance(model, Classifier) else model

    def head(x: Tensor) -> dict[str, Tensor]:
        feats = encode(x, layer)
        patches = feats[:, 1:]
        B, N, D = patches.shape
        out = {"clip": feats[:, 0], "patch": patches}
        if "frame" in keep:
            out["frame"] = patches.reshape(B, N // FREQ_PATCHES, FREQ_PATCHES, D).mean(dim=2)
        return {k: v for k, v in out.items() if k in keep}

    return head


def logits_head(model: Classifier, multilabel: bool = True) -> Head:
    """Per-window class probabilities: sigmoid for multi-label heads, softmax for multi-class."""

    def head(x: Tensor) -> dict[str, Tensor]:
        logits = model(x).float()
        return {"scores": torch.sigmoid(logits) if multilabel else logits.softmax(dim=-1)}

    return head
