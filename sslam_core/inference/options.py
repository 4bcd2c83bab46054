"""How the inference pipeline runs a model over audio, as one frozen object (whisper's `DecodingOptions`).

The command line builds one `PipelineOptions` from its flags and passes it through tagging, events,
embeddings and evaluation down to `pipeline.run_windows`; the Python API's keyword arguments
(`embed(model, files, batch_size=8, device="cuda")`) are the same fields, checked by name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

from sslam_core.audio.constants import DEFAULT_TARGET_LENGTH

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PipelineOptions:
    """Windows, batching, decoding, device and arithmetic of one run over files.

    target_length: window length in fbank frames (multiple of 16); hop: frames between window starts
    (None: the window, no overlap); batch_size: windows per forward pass and workers: decoding
    processes ahead of the model (None: what suits the device, see `pipeline.default_batching`);
    processes: decode in processes (None: unless every source is a waveform in memory) or threads;
    device; precision: fp32, bf16, fp16 or int8 (an ONNX Runtime model); normalization: a preset name
    or (mean, std) of the log-mel features.
    """

    target_length: int = DEFAULT_TARGET_LENGTH
    hop: int | None = None
    batch_size: int | None = None
    workers: int | None = None
    processes: bool | None = None
    device: str | torch.device = "cpu"
    precision: str = "fp32"
    normalization: str | tuple[float, float] = "audioset"

    @property
    def window_hop(self) -> int:
        """Frames between window starts (the window itself when `hop` is None)."""
        return self.hop or self.target_length


OPTION_NAMES = frozenset(f.name for f in fields(PipelineOptions))


def pipeline_options(options: PipelineOptions | None = None, **overrides) -> PipelineOptions:
    """`options` (default: the defaults) with the given fields replaced; a name that is not a field is a
    TypeError naming it, as for any misspelt keyword argument."""
    unknown = sorted(set(overrides) - OPTION_NAMES)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    return replace(options or PipelineOptions(), **overrides)


__all__ = ["OPTION_NAMES", "PipelineOptions", "pipeline_options"]
