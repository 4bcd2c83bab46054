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

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager

import torch
from torch import Tensor, nn

from sslam_core.audio.frontend import prepare_input
from sslam_core.inference.decoding import decode_files
from sslam_core.inference.options import PipelineOptions
from sslam_core.inference.windows import FileResult, Source, Window, file_error, num_frames, source_name
from sslam_core.models.onnx_runtime import one_window_per_pass
from sslam_core.models.precision import fp32_tail, strict_fp32
from sslam_core.models.transformer import FREQ_PATCHES, Classifier


@contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Autocast context for `precision` (fp32: full fp32, TF32 off on a GPU; int8 models are ONNX
    Runtime graphs: none). bf16 and fp16 run the encoder's last block in fp32 (`precision.fp32_tail`)."""
    if precision == "fp32":
        with strict_fp32(device):
            yield
        return
    if precision == "int8":
        yield
        return
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    with torch.autocast(device_type=device.type, dtype=dtype), fp32_tail(), strict_fp32(device):
        yield


Head = Callable[[Tensor], dict[str, Tensor]]


def default_batching(device: torch.device, batch_size: int | None, workers: int | None) -> tuple[int, int]:
    """Windows per forward pass and decoding processes. On CPU: batches of 4 (the most clips/s of a
    ViT-B on 2 cores) and 0 processes, decoding in line: on the loaded 2-core development machine,
    3,000 FSDD files through a one-block model ran at 349 files/s in line vs 318 / 267 with 1 / 2
    worker processes (one intra-op thread; scripts/bench.py scale), and decoding a 10 s 44.1 kHz
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


class Batches:
    """The batching state of one run: windows queued for the next forward pass, batches launched whose
    outputs are not fetched yet, and each file's results until all its windows are encoded. Files
    come out in input order. On a GPU a batch's outputs are fetched after the next batch was launched,
    so that the GPU computes while this process gathers the batch after."""

    def __init__(self, head: Head, options: PipelineOptions, device: torch.device, batch_size: int):
        self.head, self.options, self.device, self.batch_size = head, options, device, batch_size
        self.precomputed = device.type == "cpu"  # on CPU each window's input was made where it was decoded
        self.results: dict[int, FileResult] = {}
        self.pending: dict[int, int] = {}  # file -> windows queued or in flight, not yet encoded
        self.decoding: set[int] = set()  # files whose windows are still being cut
        self.queue: list[Window] = []
        self.in_flight: list[tuple[list[Window | None], dict[str, Tensor]]] = []
        self.next_out = 0

    def open_file(self, i: int, path: str) -> FileResult:
        """Start collecting the windows of file `i`."""
        res = self.results[i] = FileResult(path)
        self.decoding.add(i)
        self.pending[i] = 0
        return res

    def add(self, w: Window) -> bool:
        """Queue one window; True when a full batch is ready to `flush`."""
        self.results[w.file].starts.append(w.start_frame)
        self.queue.append(w)
        self.pending[w.file] += 1
        return len(self.queue) == self.batch_size

    def close_file(self, i: int) -> None:
        """File `i` has no more windows."""
        self.decoding.discard(i)

    def fail_file(self, i: int, result: FileResult) -> None:
        """File `i` broke part-way (a streamed file): drop what it queued or launched, keep `result`."""
        self.queue[:] = [w for w in self.queue if w.file != i]
        for windows, _ in self.in_flight:
            windows[:] = [None if w is not None and w.file == i else w for w in windows]
        self.results[i], self.pending[i] = result, 0
        self.decoding.discard(i)

    def skip_file(self, i: int, result: FileResult) -> None:
        """File `i` could not be decoded at all."""
        self.results[i] = result

    def flush(self) -> None:
        """Encode the queued windows (the front end in full fp32 whatever the model's precision)."""
        o = self.options
        if self.precomputed:
            x = torch.cat([w.input for w in self.queue])
        else:
            waves = _on_device([w.wave for w in self.queue], self.device)
            with torch.inference_mode(), strict_fp32(self.device):
                x = prepare_input(waves, target_length=o.target_length, norm=o.normalization)
        with torch.inference_mode(), autocast(self.device, o.precision):
            out = self.head(x)
        batch: list[Window | None] = list(self.queue)
        self.queue.clear()
        self.complete()
        self.in_flight.append((batch, out))
        if self.device.type != "cuda":
            self.complete()

    def complete(self) -> None:
        """The outputs of the batches in flight, row by row into their files' results."""
        for windows, out in self.in_flight:
            out = {name: value.float().cpu() for name, value in out.items()}
            for j, w in enumerate(windows):
                if w is None:  # its file broke after the batch was launched
                    continue
                for name, value in out.items():
                    # a copy, so that a kept row does not hold on to the whole batch's tensor
                    self.results[w.file].outputs.setdefault(name, []).append(value[j].clone())
                self.pending[w.file] -= 1
        self.in_flight.clear()

    def finished(self) -> Iterator[FileResult]:
        """The files, in input order, whose windows are all encoded."""
        while self.next_out in self.results and self.next_out not in self.decoding:
            if self.pending.get(self.next_out):
                return
            self.pending.pop(self.next_out, None)
            yield self.results.pop(self.next_out)
            self.next_out += 1

    def landed(self) -> Iterator[FileResult]:
        """On a stop: the files whose last batch was already launched are finished too."""
        self.complete()
        yield from self.finished()


def run_windows(
    model: nn.Module,
    sources: Iterable[Source],
    head: Head,
    options: PipelineOptions | None = None,
    *,
    stop: Callable[[], bool] | None = None,
    names: Sequence[str] | None = None,
) -> Iterator[FileResult]:
    """Run `model` over every window of every source; `head(input)` maps a (B,1,T,128) batch to named
    per-window outputs (B, ...). Yields one FileResult per source, in order. `options` say the windows,
    batching, decoding, device and precision (see `PipelineOptions`; batch size and workers default
    to what suits the device, `default_batching`; an int8 model runs one window per pass, so that a
    file's outputs are the same bits in any batch: `onnx_runtime.one_window_per_pass`). `names` are how
    results and messages refer to the sources (default: their paths). When `stop()` turns true (a
    signal, see `interrupts`), the run ends before the next batch: the files finished so far have been
    yielded, the rest are not, and no decoding process is left behind. Results on CPU do not depend on
    workers or processes."""
    o = options or PipelineOptions()
    device = torch.device(o.device)
    batch_size, workers = default_batching(device, o.batch_size, o.workers)
    if one_window_per_pass(model):  # a file's outputs must not depend on its neighbours
        batch_size = 1
    sources = list(sources)
    features = (o.target_length, o.normalization) if device.type == "cpu" else None
    batches = Batches(head, o, device, batch_size)

    def stopping() -> bool:
        return stop is not None and stop()

    names = list(names) if names is not None else [source_name(s, i) for i, s in enumerate(sources)]
    decoded = decode_files(sources, names, o.target_length, o.window_hop, workers, o.processes, features)
    with closing(decoded):  # ends the decoding processes however the run ends
        for i, item in decoded:
            if stopping():
                yield from batches.landed()
                return
            if isinstance(item, FileResult):
                batches.skip_file(i, item)
                yield from batches.finished()
                continue
            res = batches.open_file(i, item.path)
            try:
                for w in item.windows:
                    if batches.add(w):
                        if stopping():
                            yield from batches.landed()
                            return
                        batches.flush()
                        yield from batches.finished()
            except Exception as e:  # a streamed file broke part-way: drop what it queued
                batches.fail_file(i, file_error(item.path, e))
            else:
                res.duration, res.frames = item.duration, num_frames(item.samples)
                batches.close_file(i)
            yield from batches.finished()
    if batches.queue:
        if stopping():
            yield from batches.landed()
            return
        batches.flush()
    batches.complete()
    yield from batches.finished()


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
