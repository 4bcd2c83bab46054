"""Inference precision: what `--precision auto` picks on this machine, and the CPU capability it reads.

`auto` proposes the fastest precision the hardware computes well (`auto_precision`):
- CUDA: bf16 autocast where the GPU computes bf16, else fp32;
- CPU: bf16 autocast only where the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16; elsewhere
  bf16 is emulated and several times slower than fp32), else fp32.
The commands then check the model before using a faster precision (`sslam_core.inference.
precision_check`, cached per checkpoint): on a CPU int8 (ONNX Runtime) first where the command can run
it, then the proposal, and fall back to fp32 when the model's results move (docs/guides/
cpu-deployment.md).

The CPU's features come from `torch.cpu.get_capabilities()` where torch has it, else from the flags of
/proc/cpuinfo; `SSLAM_CPU_CAPABILITY` overrides both (tests, or a CPU the detection gets wrong): a
comma-separated list of flags as /proc/cpuinfo names them, e.g. `avx2`, `avx512f,avx512_bf16` or
`amx_bf16` (`none`: no feature at all).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch

from sslam_core.errors import OptionError

CHOICES = ("fp32", "bf16", "fp16", "int8", "auto")
ENV = "SSLAM_CPU_CAPABILITY"
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # strongest first: the name `CpuCapability.name` gives
# The flags that decide a precision, and the other x86 SIMD flags an override may name (as /proc/cpuinfo).
DECIDING_FLAGS = frozenset({"avx2", "avx512f", *BF16_FLAGS})
KNOWN_FLAGS = DECIDING_FLAGS | {
    "sse", "sse2", "ssse3", "sse4_1", "sse4_2", "avx", "fma", "f16c", "avx512bw", "avx512vl",
    "avx512dq", "avx512cd", "avx512_vnni", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_fp16",
    "default", "asimd", "sve", "sve2",
}  # fmt: skip
# torch's capability keys that differ from /proc/cpuinfo's flag names
_TORCH_NAMES = {"avx512_f": "avx512f", "avx512_bw": "avx512bw", "avx512_vl": "avx512vl"}


@dataclass(frozen=True)
class CpuCapability:
    """The CPU features that decide the precision: `flags` (lower case, /proc/cpuinfo's names) and
    where they were read (`source`: torch, /proc/cpuinfo or SSLAM_CPU_CAPABILITY)."""

    flags: frozenset[str]
    source: str

    @property
    def native_bf16(self) -> bool:
        """Whether bf16 matrix products run in hardware (AVX512-BF16 or AMX-BF16)."""
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def name(self) -> str:
        """A short name: AMX_BF16, AVX512_BF16, AVX512, AVX2 or DEFAULT."""
        for flag in (*BF16_FLAGS, "avx512f", "avx2"):
            if flag in self.flags:
                return flag.upper().replace("AVX512F", "AVX512")
        return "DEFAULT"

    def __str__(self) -> str:
        return f"{self.name} ({self.source})"


def parse_flags(text: str) -> frozenset[str]:
    """`avx512f, AVX512_BF16` (or separated by `+` or spaces, as /proc/cpuinfo lists them) ->
    {"avx512f", "avx512_bf16"}; `none` -> no flags."""
    flags = {f.lower() for f in re.split(r"[,+\s]+", text) if f}
    return frozenset(flags - {"none"})


def _torch_flags() -> frozenset[str] | None:
    """The features torch detected (torch >= 2.8 has `torch.cpu.get_capabilities`), None without it."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is None:
        return None
    try:
        caps = get()
    except RuntimeError:
        return None
    return frozenset(_TORCH_NAMES.get(k, k) for k, v in caps.items() if v is True)


def _cpuinfo_flags(path: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The `flags` line of /proc/cpuinfo (Linux x86), None where there is none."""
    try:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_capability() -> CpuCapability:
    """This CPU's features: `SSLAM_CPU_CAPABILITY` if set, else torch's detection, else /proc/cpuinfo;
    with none of them, no features (fp32 everywhere)."""
    override = os.environ.get(ENV)
    if override is not None:
        flags = parse_flags(override)
        unknown = sorted(flags - KNOWN_FLAGS)
        if unknown or (not flags and override.strip().lower() != "none"):
            raise OptionError(
                f"{ENV}={override!r}: {', '.join(unknown) or 'no flag'} is not a CPU feature sslam knows; "
                f"give flags as /proc/cpuinfo names them ({', '.join(sorted(DECIDING_FLAGS))}, ...) or none"
            )
        return CpuCapability(flags, ENV)
    flags = _torch_flags()
    if flags is not None:
        return CpuCapability(flags, "torch")
    flags = _cpuinfo_flags()
    if flags is not None:
        return CpuCapability(flags, "/proc/cpuinfo")
    return CpuCapability(frozenset(), f"no detection; torch says {torch.backends.cpu.get_cpu_capability()}")


def auto_precision(
    device: torch.device, cpu: CpuCapability | None = None, cuda_bf16: bool | None = None
) -> tuple[str, str]:
    """(precision, why) that `auto` means on `device`. `cpu` (default: `cpu_capability()`) and
    `cuda_bf16` (default: torch's answer for the current GPU) can be given, for tests."""
    if device.type == "cuda":
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported()
        if cuda_bf16:
            return "bf16", "this GPU computes bf16"
        return "fp32", "this GPU has no bf16 (fp16's fidelity is not documented)"
    if device.type != "cpu":
        return "fp32", f"no lower precision is documented on {device.type}"
    cpu = cpu or cpu_capability()
    if cpu.native_bf16:
        return "bf16", f"the CPU computes bf16 natively: {cpu}"
    return "fp32", f"the CPU has no native bf16 (bf16 would be emulated, slower): {cpu}"


def resolve_precision(requested: str, device: torch.device, cpu: CpuCapability | None = None) -> str:
    """`requested` as it runs on `device`: `auto` -> `auto_precision`, anything else unchanged."""
    if requested == "auto":
        return auto_precision(device, cpu)[0]
    return requested


__all__ = [
    "BF16_FLAGS",
    "CHOICES",
    "ENV",
    "CpuCapability",
    "auto_precision",
    "fp32_tail",
    "fp32_tail_blocks",
    "cpu_capability",
    "parse_flags",
    "resolve_precision",
]


# Encoder blocks at the end of a forward pass that run in fp32 inside a bf16 / fp16 autocast (inference).
_FP32_TAIL: ContextVar[int] = ContextVar("sslam_fp32_tail", default=0)
INFERENCE_FP32_TAIL = (
    1  # the last block: measured to carry most of bf16's error (docs/guides/cpu-deployment.md)
)


@contextmanager
def fp32_tail(blocks: int = INFERENCE_FP32_TAIL) -> Iterator[None]:
    """Run the last `blocks` encoder blocks of each forward pass, and a classifier's fc_norm and head,
    in fp32 while a reduced-precision autocast is on (`Encoder.contextualize` and `Classifier.classify`
    read it). The inference pipeline sets it for bf16 and fp16: the rounding of the output block and of
    the head's input moves a probe's decisions far more than the earlier blocks', at about one block's
    share of the time. Training does not set it."""
    token = _FP32_TAIL.set(blocks)
    try:
        yield
    finally:
        _FP32_TAIL.reset(token)


def fp32_tail_blocks() -> int:
    """How many blocks at the end of a forward pass run in fp32 under autocast here (see `fp32_tail`)."""
    return _FP32_TAIL.get()


@contextmanager
def strict_fp32(device: torch.device) -> Iterator[None]:
    """fp32 arithmetic in full precision on a GPU: TF32 off for matrix products and convolutions while
    the block runs, whatever the process set before. `--precision fp32` means fp32: PyTorch allows TF32
    in cuDNN convolutions by default, and training code often turns it on for matrix products
    (`torch.set_float32_matmul_precision("high")`), which would make the library's fp32 results depend
    on the caller. The user's settings come back afterwards. On a CPU (no TF32) it does nothing."""
    if torch.device(device).type != "cuda":
        yield
        return
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        knobs = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
        saved = [k.fp32_precision for k in knobs]
        for k in knobs:
            k.fp32_precision = "ieee"
        try:
            yield
        finally:
            for k, v in zip(knobs, saved, strict=True):
                k.fp32_precision = v
        return
    saved_flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_flags
