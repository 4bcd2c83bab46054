"""Benchmark the CPU backends of a seeded ViT-B encoder in one process: torch fp32 (the baseline),
torch bf16 autocast (only where the CPU has native bf16), torch dynamic int8 (`quantize_dynamic` on
the Linear layers; deprecated in torch, kept for comparison), ONNX Runtime fp32 and ONNX Runtime int8
(dynamic, MatMul weights). Prints seconds per clip, the ratio to torch fp32, the cosine of the CLS and
patch outputs to torch fp32 on real clips, and the CPU capability it ran on; the last line is JSON.

    .venv/bin/python scripts/bench_cpu_backends.py                 # batch 4, T = 1024, 2 threads
    .venv/bin/python scripts/bench_cpu_backends.py --repeats 9 --threads 4
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from sslam_core.audio import load_audio
from sslam_core.checkpoints import Checkpoint
from sslam_core.frontend import prepare_input
from sslam_core.model import Encoder, preset
from sslam_core.onnx_backend import open_session, run_session
from sslam_core.onnx_export import export_checkpoint, quantize_int8

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
CLIPS = ("real_32k.wav", "acoustic_scene_2s.mp3", "robin.ogg", "typing_stereo_48k.flac")


def native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return True
    return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


def clips(batch: int, frames: int) -> Tensor:
    """`batch` real clips (the test data, repeated as needed) as normalised model input."""
    waves = [load_audio(str(DATA / CLIPS[i % len(CLIPS)])) for i in range(batch)]
    return prepare_input(waves, target_length=frames)


def seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each run over `repeats` rounds, after one warm-up call each. The backends
    take turns within a round, so a load that changes during the benchmark weighs on all alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cosine(a: Tensor, b: Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = preset("base")
    model = Encoder(cfg).eval()
    x = clips(args.batch, args.frames)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"CPU: {platform.processor() or platform.machine()}, torch capability {capability}, "
          f"native bf16 {native_bf16()}, {args.threads} threads, torch {torch.__version__}")  # fmt: skip

    def torch_run(net: nn.Module, precision: str = "fp32") -> Callable[[], Tensor]:
        def run() -> Tensor:
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                return net(x).float()

        return run

    ckpt = Checkpoint(cfg, model.state_dict(), source="seeded ViT-B", extra={"target_length": args.frames})
    start = time.perf_counter()
    exported = export_checkpoint(ckpt)
    print(
        f"exported fp32 in {time.perf_counter() - start:.1f} s, max diff {exported.max_diff['features']:.1e}"
    )
    import onnx

    int8 = quantize_int8(onnx.load_model_from_string(exported.data)).SerializeToString()
    runs: dict[str, Callable[[], Tensor]] = {"torch fp32": torch_run(model)}
    if native_bf16():
        runs["torch bf16"] = torch_run(model, "bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, torch.qint8)
    runs["torch int8"] = torch_run(quantized)
    for name, data in (("onnxruntime fp32", exported.data), ("onnxruntime int8", int8)):
        session = open_session(data, args.threads)
        runs[name] = lambda session=session: run_session(session, x)["features"]

    reference = runs["torch fp32"]()
    timed = seconds(runs, args.repeats)
    rows = []
    for name, run in runs.items():
        per_clip = timed[name] / args.batch
        out = run()
        rows.append(
            {
                "backend": name,
                "s_per_clip": round(per_clip, 4),
                "cls_cosine": round(cosine(out[:, 0], reference[:, 0]), 6),
                "patch_cosine": round(cosine(out[:, 1:], reference[:, 1:]), 6),
                "max_diff": float(f"{(out - reference).abs().max().item():.3g}"),
            }
        )
        base = rows[0]["s_per_clip"]
        rows[-1]["speedup"] = round(base / per_clip, 2)
        r = rows[-1]
        print(f"{name:18s} {per_clip:.3f} s/clip  {r['speedup']:.2f}x torch fp32  "
              f"CLS cosine {r['cls_cosine']:.5f}  patch cosine {r['patch_cosine']:.5f}  "
              f"max diff {r['max_diff']:.2g}")  # fmt: skip
    print(json.dumps({"capability": capability, "native_bf16": native_bf16(), "threads": args.threads,
                      "batch": args.batch, "frames": args.frames, "results": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
