"""The CPU backends of a seeded ViT-B encoder in one process, and `sslam tag` fp32 vs int8 end to end.

Backends: torch fp32 (the baseline), torch bf16 autocast as `--precision bf16` runs it (the output block
and head in fp32) and with every block in bf16 (only where the CPU has native bf16), torch dynamic int8
(`quantize_dynamic` on the Linear layers; deprecated in torch, kept for comparison), ONNX Runtime fp32,
ONNX Runtime's own dynamic int8 (per-channel weights, one activation scale per batch: what
`--precision int8` ran before) on the whole batch, and the int8 graph `--precision int8` runs now
(`sslam_core.models.int8`: per-token activation scales, the output block in fp32), one window per pass
as the pipeline runs it. Prints seconds per clip, the ratio to torch fp32, the cosine of the CLS and
patch outputs to torch fp32 on real clips, and the CPU capability it ran on; the last line is JSON.

`--end-to-end` also times `sslam tag` itself, each run its own process, on the same files (--clips 10 s
clips cut from real recordings, the test data by default) with a seeded ViT-B tagger (527 classes):
fp32 against `--precision int8` (its int8 model quantised and cached by a first, untimed run), taking
turns; it prints the median wall times, their ratio and the top-1 / top-5 agreement of the two.

    python scripts/bench.py cpu-backends                 # batch 4, T = 1024, 2 threads
    python scripts/bench.py cpu-backends --repeats 9 --threads 4
    python scripts/bench.py cpu-backends --end-to-end --skip-backends --clips 16
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from sslam_core.audio.decode import load_audio
from sslam_core.audio.frontend import prepare_input
from sslam_core.inference.pipeline import autocast
from sslam_core.models.checkpoint import Checkpoint
from sslam_core.models.layouts.native import save_checkpoint
from sslam_core.models.onnx_export import export_checkpoint, quantize_int8
from sslam_core.models.onnx_runtime import open_session, run_session
from sslam_core.models.transformer import Encoder, build_model, preset

from .common import TEST_DATA, load_average, print_machine, timed
from .extract import make_clips

CLIPS = ("real_32k.wav", "acoustic_scene_2s.mp3", "robin.ogg", "typing_stereo_48k.flac")


def torch_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` with torch dynamic int8 Linear layers (`quantize_dynamic`, deprecated in torch
    but still the simplest torch int8)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, torch.qint8)


def ort_dynamic_int8(proto: object) -> bytes:
    """ONNX Runtime's dynamic quantisation of an fp32 graph (int8 MatMul weights, one scale per output
    channel; activations scaled per batch): the int8 scheme before `sslam_core.models.int8`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="sslam-bench-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(proto, str(src))
        quantize_dynamic(
            src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], per_channel=True
        )
        return dst.read_bytes()


def clips(batch: int, frames: int) -> Tensor:
    """`batch` real clips (the test data, repeated as needed) as normalised model input."""
    waves = [load_audio(str(TEST_DATA / CLIPS[i % len(CLIPS)])) for i in range(batch)]
    return prepare_input(waves, target_length=frames)


def cosine(a: Tensor, b: Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1).mean().item()


def tag_agreement(a: list[dict], b: list[dict]) -> dict[str, float]:
    """Top-1 agreement and mean top-5 overlap of two `sslam tag -f json` outputs (one dict per file)."""
    tops = [[[c["label"] for c in rec["labels"][:5]] for rec in out] for out in (a, b)]
    pairs = list(zip(*tops, strict=True))
    return {
        "top1_agree": sum(x[0] == y[0] for x, y in pairs) / len(pairs),
        "top5_overlap": sum(len(set(x) & set(y)) / 5 for x, y in pairs) / len(pairs),
    }


def end_to_end(clips: int, audio: Path, repeats: int, threads: int, seed: int) -> dict:
    """Wall time of `sslam tag` (a fresh process each: start-up, model load, decoding, fbank, model) on
    `clips` files, fp32 against --precision int8, the two taking turns `repeats` times."""
    with tempfile.TemporaryDirectory(prefix="sslam-e2e-") as tmp:
        folder = Path(tmp)
        torch.manual_seed(seed)
        cfg = preset("base", num_classes=527)
        labels = [(f"/m/{i}", f"class {i}") for i in range(cfg.num_classes)]
        ckpt = folder / "vitb_tagger.safetensors"
        model = build_model(cfg).eval()
        save_checkpoint(ckpt, cfg, model.state_dict(), labels=labels, extra={"target_length": 1024})
        del model
        files = make_clips(folder, clips, audio)
        env = {**os.environ, "SSLAM_CACHE": str(folder / "cache"), "OMP_NUM_THREADS": str(threads)}
        cmd = [
            sys.executable,
            "-m",
            "sslam_cli",
            "tag",
            *files,
            "-c",
            str(ckpt),
            "--device",
            "cpu",
            "-f",
            "json",
        ]

        def tag(precision: str) -> list[dict]:
            proc = subprocess.run([*cmd, "--precision", precision], capture_output=True, text=True, env=env)
            if proc.returncode:
                raise SystemExit(f"sslam tag --precision {precision} failed: {proc.stderr.strip()[-500:]}")
            return [json.loads(line) for line in proc.stdout.splitlines() if line]

        first = timed({"int8": lambda: tag("int8")}, repeats=1, warmup=0)["int8"].median
        print(f"end to end: first --precision int8 run (export + quantise + cache) {first:.1f} s", flush=True)
        times = timed({p: lambda p=p: tag(p) for p in ("fp32", "int8")}, repeats=repeats, warmup=0)
    median = {p: t.median for p, t in times.items()}
    result = {
        "clips": clips,
        "repeats": repeats,
        "first_int8_s": round(first, 1),
        "fp32_s": round(median["fp32"], 2),
        "int8_s": round(median["int8"], 2),
        "ratio": round(median["fp32"] / median["int8"], 2),
        **tag_agreement(times["fp32"].result, times["int8"].result),
    }
    print(f"end to end: sslam tag on {clips} x 10 s clips, median of {repeats}: fp32 {median['fp32']:.1f} s, "
          f"int8 {median['int8']:.1f} s, {result['ratio']:.2f}x; top-1 agreement {result['top1_agree']:.3f}, "
          f"top-5 overlap {result['top5_overlap']:.3f}", flush=True)  # fmt: skip
    return result


def backends(args: argparse.Namespace, bf16: bool) -> list[dict]:
    """The in-process rows: each backend's s/clip, ratio to torch fp32 and cosines (bf16 if `bf16`)."""
    torch.manual_seed(args.seed)
    cfg = preset("base")
    model = Encoder(cfg).eval()
    x = clips(args.batch, args.frames)

    def torch_run(net: nn.Module, precision: str = "fp32") -> Callable[[], Tensor]:
        def run() -> Tensor:  # as the pipeline runs it: bf16 keeps the output block in fp32
            with torch.inference_mode(), autocast(torch.device("cpu"), precision):
                return net(x).float()

        return run

    def every_block_bf16() -> Tensor:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
            return model(x).float()

    ckpt = Checkpoint(cfg, model.state_dict(), source="seeded ViT-B", extra={"target_length": args.frames})
    start = time.perf_counter()
    exported = export_checkpoint(ckpt)
    print(
        f"exported fp32 in {time.perf_counter() - start:.1f} s, max diff {exported.max_diff['features']:.1e}"
    )
    import onnx

    before = ort_dynamic_int8(onnx.load_model_from_string(exported.data))
    int8 = quantize_int8(onnx.load_model_from_string(exported.data)).SerializeToString()
    runs: dict[str, Callable[[], Tensor]] = {"torch fp32": torch_run(model)}
    if bf16:
        runs["torch bf16"] = torch_run(model, "bf16")
        runs["torch bf16, every block"] = every_block_bf16
    runs["torch int8"] = torch_run(torch_int8(model))
    for name, data in (("onnxruntime fp32", exported.data), ("onnxruntime dynamic int8 (before)", before)):
        session = open_session(data, args.threads)
        runs[name] = lambda session=session: run_session(session, x)["features"]
    session = open_session(int8, args.threads)  # one window per pass, as --precision int8 runs it
    runs["onnxruntime int8"] = lambda: torch.cat([run_session(session, w[None])["features"] for w in x])

    times = timed(runs, repeats=args.repeats, warmup=1)
    reference = times["torch fp32"].result
    rows = []
    for name, timing in times.items():
        per_clip = timing.median / args.batch
        out = timing.result
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
        print(f"{name:34s} {per_clip:.3f} s/clip  {r['speedup']:.2f}x torch fp32  "
              f"CLS cosine {r['cls_cosine']:.5f}  patch cosine {r['patch_cosine']:.5f}  "
              f"max diff {r['max_diff']:.2g}")  # fmt: skip
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--end-to-end", action="store_true", help="also time `sslam tag` fp32 vs int8")
    parser.add_argument("--skip-backends", action="store_true", help="only the end-to-end part")
    parser.add_argument("--clips", type=int, default=16, help="end to end: 10 s clips")
    parser.add_argument("--audio", type=Path, default=TEST_DATA, help="end to end: cut the clips from these")
    parser.add_argument("--e2e-repeats", type=int, default=3, help="end to end: runs of each precision")


def run(args: argparse.Namespace) -> None:
    """The backend rows and/or the end-to-end comparison; the last line is JSON."""
    torch.set_num_threads(args.threads)
    machine = print_machine()
    summary = {"machine": machine, "capability": machine["capability"], "native_bf16": machine["native_bf16"],
               "threads": args.threads}  # fmt: skip
    if not args.skip_backends:
        summary.update(batch=args.batch, frames=args.frames, results=backends(args, machine["native_bf16"]))
    if args.end_to_end:
        summary["end_to_end"] = end_to_end(args.clips, args.audio, args.e2e_repeats, args.threads, args.seed)
    summary["load_average_end"] = load_average()
    print(json.dumps(summary))
