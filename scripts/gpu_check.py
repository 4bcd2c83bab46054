"""The GPU path in one call: correctness against the CPU, throughput and memory, torchrun over NCCL.

    python scripts/gpu_check.py                          # one GPU, ViT-B, the release batch shapes
    python scripts/gpu_check.py --device cpu --tiny      # dry run of every section on the CPU

Sections, each timed and independent (a failing one is recorded and the next runs):
  env           GPU, driver, torch, CPU cores
  model         seeded ViT-B encoder and tagger: CUDA fp32 vs CPU fp32 on real clips and noise (TF32
                off, <= 1e-3), bf16 vs fp32 (CLS cosine >= 0.999), the GPU fbank vs the CPU fbank,
                and what PyTorch's default TF32 convolutions would have cost
  cli           `tag`, `extract -g all` and `tag --events` on GPU vs CPU over real files and a
                generated 40 s scene, as subprocesses of the working tree
  speed         encoder alone, bf16, batch 64 and 128 (+ fp32); the batched GPU front end
  files         end to end from 2,000 generated 10 s wav files (16 kHz mono) and 1,000 at 44.1 kHz
                stereo: the input pipeline alone, `embed` with worker processes (clips/s, GPU
                utilisation, peak memory), and `sslam extract` to HDF5
  pretrain      EAT stage 1 (12 x 16 clones) and SSLAM stage 2 (12 x 2 x 8) steps of 1,024 frames
                through the real trainer on one repeated batch: clips/s, peak memory, loss finite and
                falling; the time of forward+backward, AdamW (foreach / fused) and the EMA update
  finetune      20 steps of `sslam finetune` (ViT-B, batch 48, bf16)
  torchrun      `torchrun --nproc_per_node 1` (NCCL, DDP) for `pretrain`, and `extract` against
                one process
  extras        torch.compile of the encoder, a profile of one stage-1 step (if time is left)

Prints one JSON object (also written to OUT/gpu_check.json after each section, so a run cut short
keeps what it measured); OUT is --out, else $OUT, else ./gpu_check_out. Needs only torch, numpy,
soundfile, h5py and the project's dependencies importable; the project runs from this working tree.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from sslam_core.audio.decode import load_audio  # noqa: E402
from sslam_core.audio.frontend import prepare_input  # noqa: E402
from sslam_core.data.labels import audioset_labels  # noqa: E402
from sslam_core.inference.embeddings import embed  # noqa: E402
from sslam_core.inference.options import PipelineOptions  # noqa: E402
from sslam_core.inference.pipeline import run_windows  # noqa: E402
from sslam_core.models.layouts.native import save_checkpoint  # noqa: E402
from sslam_core.models.precision import strict_fp32  # noqa: E402
from sslam_core.models.transformer import Classifier, Encoder, count_flops, preset  # noqa: E402
from sslam_core.training.objective import PretrainingModel  # noqa: E402
from sslam_core.training.optim import build_optimizer, param_groups  # noqa: E402
from sslam_core.training.pretraining import PretrainTask, objective_config, resolve_settings, train_config  # noqa: E402
from sslam_core.training.trainer import train  # noqa: E402

DATA = ROOT / "tests" / "data"
REAL_CLIPS = ["real_32k.wav", "robin.ogg", "typing_stereo_48k.flac", "acoustic_scene_2s.mp3"]

# Sizes of a full run on one GPU and of the CPU dry run.
FULL = dict(
    model="base", files=2000, files_44k=1000, workers=16, batch=64, target_length=1024, pre_batch=12,
    warm_steps=3, timed_steps=20, ft_steps=20, ft_batch=48, ft_files=480, tr_steps=10, tr_files=64,
    repeats=20,
)  # fmt: skip
TINY = dict(
    model="tiny", files=24, files_44k=8, workers=2, batch=4, target_length=256, pre_batch=2,
    warm_steps=1, timed_steps=3, ft_steps=2, ft_batch=4, ft_files=16, tr_steps=2, tr_files=6,
    repeats=2,
)  # fmt: skip
TARGETS = {
    "model_fp32_max_abs_diff": 1e-3,
    "bf16_cls_cosine": 0.999,
    "model_bf16_clips_per_s": 2000,
    "files_clips_per_s": 1500,
    "eat_clips_per_s": 150,
    "sslam_peak_memory_gb": 24,
}


# ----------------------------------------------------------------------------------------------- helpers


class Check:
    """Collects every section's results into one dict and writes it after each section."""

    def __init__(self, out: Path, budget: float):
        self.out, self.budget, self.start = out, budget, time.perf_counter()
        self.result: dict = {"sections": {}, "failures": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()

    def run(self, name: str, fn, *args, need: float = 0.0):
        """Run one section; record its dict, its seconds, or the exception that ended it."""
        if self.left() < need:
            self.result["sections"][name] = {"skipped": f"{self.left():.0f} s left, needs ~{need:.0f}"}
            log(f"== {name}: skipped ({self.left():.0f} s left)")
            self.save()
            return None
        log(f"== {name} (at {self.elapsed():.0f} s)")
        t = time.perf_counter()
        try:
            value = fn(*args)
            entry = value if isinstance(value, dict) else {}
        except Exception as e:  # recorded, and the next section still runs
            value, entry = None, {"error": f"{type(e).__name__}: {e}"}
            self.result["failures"].append(f"{name}: {type(e).__name__}: {e}")
            traceback.print_exc()
        entry["seconds"] = round(time.perf_counter() - t, 1)
        self.result["sections"][name] = entry
        log(f"   {name}: {json.dumps(rounded(entry))[:1500]}")
        self.save()
        return value

    def save(self) -> None:
        self.result["elapsed_s"] = round(self.elapsed(), 1)
        text = json.dumps(rounded(self.result), indent=1)
        (self.out / "gpu_check.json").write_text(text + "\n")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def rounded(x):
    if isinstance(x, float):
        return x if not math.isfinite(x) else float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rounded(v) for v in x]
    return x


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, items: int, repeats: int, device: torch.device, warmup: int = 2) -> float:
    """Items per second of `fn()` over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return items * repeats / (time.perf_counter() - start)


def seconds_of(fn, repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Mean seconds of one `fn()` call."""
    return 1.0 / rate(fn, 1, repeats, device, warmup)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def max_diff(a, b) -> float:
    a, b = (torch.as_tensor(np.asarray(v, dtype=np.float64)) for v in (a, b))
    return float((a - b).abs().max()) if a.numel() else 0.0


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


class GpuUtilisation:
    """Samples the GPU's utilisation (NVML) every 50 ms while in a `with` block; mean and samples."""

    def __init__(self, device: torch.device):
        self.samples: list[int] = []
        self.handle = None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml = pynvml
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            except Exception:  # no NVML: no utilisation figure
                self.handle = None
        self._stop = threading.Event()

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    def __enter__(self):
        if self.handle is not None:
            self.thread = threading.Thread(target=self._loop, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self._stop.set()
            self.thread.join()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def cli(
    args: list[str],
    timeout: float = 600,
    env: dict | None = None,
    torchrun: bool = False,
    profile: Path | None = None,
) -> tuple:
    """Run `sslam ARGS` (or under `torchrun --nproc_per_node 1`, or under cProfile into `profile`) from
    the working tree; (rc, stdout, stderr, seconds)."""
    head = [sys.executable, "-m", "sslam_cli"]
    if profile is not None:
        head = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "sslam_cli"]
    if torchrun:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        head += ["-m", "sslam_cli"]
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    full_env.update(env or {})
    t = time.perf_counter()
    p = subprocess.run(head + args, capture_output=True, text=True, timeout=timeout, env=full_env)
    seconds = time.perf_counter() - t
    tail = p.stderr.strip().splitlines()[-3:]
    log(f"   sslam {' '.join(args[:2])} ... -> {p.returncode} in {seconds:.1f} s; {' | '.join(tail)[-400:]}")
    if p.returncode not in (0, 1):
        raise RuntimeError(f"sslam {' '.join(args)} exited {p.returncode}: {p.stderr[-2000:]}")
    return p.returncode, p.stdout, p.stderr, seconds


def profile_summary(path: Path, rows: int = 25) -> list[str]:
    """The main process's top functions by cumulative and by own time, logged and returned."""
    import io
    import pstats

    lines = []
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(str(path), stream=buf).sort_stats(key).print_stats(rows)
        text = buf.getvalue()
        body = text[text.find("ncalls") :] if "ncalls" in text else text
        log(f"   profile by {key} ({path.name}):\n{body}")
        lines += [f"{key}: {line.strip()}" for line in body.splitlines()[1 : rows + 1] if line.strip()]
    return lines


def last_json(stdout: str) -> dict:
    """The command's JSON summary: its last stdout line that is a JSON object (NCCL logs there too)."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON summary in the output: {stdout[-500:]!r}")


def _write_clip(job: tuple) -> str:
    """One seeded 10 s clip (a tone of its own pitch over noise): job = (path, index, rate, channels)."""
    path, i, sr, channels = job
    rng = np.random.default_rng(i)
    t = np.arange(10 * sr) / sr
    x = 0.3 * np.sin(2 * np.pi * (200 + 7 * (i % 500)) * t) + 0.05 * rng.standard_normal(len(t))
    if channels > 1:
        x = np.stack([x, np.roll(x, 17)], axis=1)
    sf.write(path, x.astype(np.float32), sr, subtype="PCM_16")
    return path


def write_clips(folder: Path, n: int, sr: int, channels: int = 1, workers: int = 8) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"{i:05d}.wav"), i, sr, channels) for i in range(n)]
    with mp.get_context("fork").Pool(workers) as pool:
        return pool.map(_write_clip, jobs, chunksize=16)


def scene(path: Path, seconds: float = 40.0, sr: int = 22050) -> str:
    """A stereo scene of quiet noise with loud tone bursts and clicks, so that events start and end."""
    rng = np.random.default_rng(7)
    n = int(seconds * sr)
    x = 0.01 * rng.standard_normal(n)
    t = np.arange(n) / sr
    for start, length, freq in ((3, 4, 880), (12, 2, 300), (20, 6, 1500), (31, 3, 600)):
        on = (t >= start) & (t < start + length)
        x[on] += 0.5 * np.sin(2 * np.pi * freq * t[on])
    for click in np.arange(26.0, 29.0, 0.25):
        i = int(click * sr)
        x[i : i + 200] += rng.standard_normal(200)
    sf.write(path, np.stack([x, 0.8 * x], axis=1).astype(np.float32), sr, subtype="PCM_16")
    return str(path)


# ----------------------------------------------------------------------------------------------- sections


def env_section(device: torch.device) -> dict:
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_cores": os.cpu_count(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1))
        out["multiprocessors"] = props.multi_processor_count
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            out["driver"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return out


def seeded_tagger(size: str, seed: int = 0) -> Classifier:
    """A seeded random tagger with 527 classes whose scores spread over (0, 1) (head std 0.05)."""
    torch.manual_seed(seed)
    model = Classifier(preset(size, num_classes=527))
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(seed + 1))
        model.head.bias.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed + 2))
    return model.eval()


def model_section(device: torch.device, s: dict) -> dict:
    """The encoder and tagger on the device against the CPU, and bf16 against fp32."""
    waves = [load_audio(DATA / name) for name in REAL_CLIPS]
    g = torch.Generator().manual_seed(3)
    waves += [0.1 * torch.randn(160000, generator=g), 0.3 * torch.randn(80000, generator=g)]
    tl = s["target_length"]
    tagger = seeded_tagger(s["model"])
    with torch.inference_mode():
        x_cpu = prepare_input(waves, target_length=tl)
        feats_cpu = tagger.encoder(x_cpu)
        logits_cpu = tagger.classify(feats_cpu)
    tagger.to(device)
    out: dict = {"clips": len(waves), "real_clips": REAL_CLIPS}
    with torch.inference_mode():
        with strict_fp32(device):
            x_dev = prepare_input([w.to(device) for w in waves], target_length=tl)
            feats = tagger.encoder(x_cpu.to(device))
            logits = tagger.classify(feats)
            logits_e2e = tagger(x_dev)
        out["fbank_max_abs_diff"] = max_diff(x_dev.cpu(), x_cpu)
        out["fbank_max_rel_diff"] = float(((x_dev.cpu() - x_cpu).abs() / (x_cpu.abs() + 1)).max())
        out["encoder_fp32_max_abs_diff"] = max_diff(feats.cpu(), feats_cpu)
        out["encoder_fp32_max_abs_value"] = float(feats_cpu.abs().max())
        out["logits_fp32_max_abs_diff"] = max_diff(logits.cpu(), logits_cpu)
        out["scores_fp32_max_abs_diff"] = max_diff(logits.sigmoid().cpu(), logits_cpu.sigmoid())
        out["scores_wave_to_score_max_abs_diff"] = max_diff(logits_e2e.sigmoid().cpu(), logits_cpu.sigmoid())
        if device.type == "cuda":  # PyTorch's defaults: cuDNN convolutions in TF32
            feats_default = tagger.encoder(x_cpu.to(device))
            out["encoder_default_tf32_max_abs_diff"] = max_diff(feats_default.cpu(), feats_cpu)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = tagger.encoder(x_cpu.to(device)).float()
            low_logits = tagger.classify(low).float()
        with strict_fp32(device):
            ref = tagger.encoder(x_cpu.to(device))
        cls_cos = cosines(low[:, 0], ref[:, 0])
        mean_cos = cosines(low[:, 1:].mean(1), ref[:, 1:].mean(1))
        out["bf16_cls_cosine_min"] = float(cls_cos.min())
        out["bf16_mean_patch_cosine_min"] = float(mean_cos.min())
        out["bf16_scores_max_abs_diff"] = max_diff(low_logits.sigmoid().cpu(), logits_cpu.sigmoid())
        top_ref = logits_cpu.topk(5).indices
        top_low = low_logits.cpu().topk(5).indices
        overlap = [len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(top_ref, top_low, strict=True)]
        out["bf16_top5_overlap_mean"] = float(np.mean(overlap))
        out["bf16_top1_agreement"] = float((top_ref[:, 0] == top_low[:, 0]).float().mean())
    out["pass"] = bool(
        out["encoder_fp32_max_abs_diff"] <= TARGETS["model_fp32_max_abs_diff"]
        and out["logits_fp32_max_abs_diff"] <= TARGETS["model_fp32_max_abs_diff"]
        and out["bf16_cls_cosine_min"] >= TARGETS["bf16_cls_cosine"]
    )
    return out


def write_checkpoints(work: Path, s: dict) -> tuple[str, str]:
    """The seeded tagger and its encoder in our checkpoint format."""
    tagger = seeded_tagger(s["model"])
    tagger_path, encoder_path = work / "tagger.safetensors", work / "encoder.safetensors"
    save_checkpoint(tagger_path, tagger.cfg, tagger.state_dict(), labels=audioset_labels())
    save_checkpoint(encoder_path, preset(s["model"]), tagger.encoder.state_dict())
    return str(tagger_path), str(encoder_path)


def _tag_scores(stdout_file: Path) -> dict[str, dict[str, float]]:
    rows = [json.loads(line) for line in stdout_file.read_text().splitlines() if line.strip()]
    return {r["path"]: {d["mid"]: d["score"] for d in r["labels"]} for r in rows}


def _events(path: Path) -> dict[str, list[tuple]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["path"]: [(e["mid"], e["onset"], e["offset"]) for e in r.get("events", [])] for r in rows}


def _compare_events(a: dict, b: dict) -> dict:
    same = total = 0
    worst = 0.0
    for path in a:
        ea, eb = a[path], b.get(path, [])
        total += max(len(ea), len(eb))
        same += len(set(ea) & set(eb))
        by_label: dict = {}
        for mid, on, off in eb:
            by_label.setdefault(mid, []).append((on, off))
        for mid, on, off in ea:
            near = [max(abs(on - o), abs(off - f)) for o, f in by_label.get(mid, [])]
            worst = max(worst, min(near) if near else math.inf)
    return {"events": total, "identical": same, "worst_boundary_shift_s": worst}


def _h5_diff(a: Path, b: Path) -> dict:
    diffs, mismatched = {}, []
    with h5py.File(a) as fa, h5py.File(b) as fb:
        names: list[str] = []
        fa.visit(lambda n: names.append(n) if isinstance(fa[n], h5py.Dataset) else None)
        for n in names:
            x, y = fa[n][()], fb[n][()] if n in fb else None
            if y is None or np.shape(x) != np.shape(y):
                mismatched.append(n)
            elif np.issubdtype(np.asarray(x).dtype, np.floating):
                diffs[n] = max_diff(x, y)
            elif not np.array_equal(x, y):
                mismatched.append(n)
    return {"max_abs_diff": max(diffs.values(), default=0.0), "per_dataset": diffs, "mismatched": mismatched}


def cli_section(device: torch.device, s: dict, work: Path) -> dict:
    """`tag`, `extract` and `tag --events` on the device against the CPU, through the CLI."""
    tagger, encoder = write_checkpoints(work, s)
    files = [str(DATA / n) for n in REAL_CLIPS] + [scene(work / "scene_40s.wav")]
    dev = str(device)
    out: dict = {"files": len(files)}
    runs = {}
    for name, d, precision in (("cpu", "cpu", "fp32"), ("dev", dev, "fp32"), ("dev_bf16", dev, "bf16")):
        o = work / f"tag_{name}.jsonl"
        cli(["tag", *files, "-c", tagger, "-k", "527", "-f", "json", "-o", str(o), "--overwrite",
             "--device", d, "--precision", precision, "-b", "8"])  # fmt: skip
        runs[name] = _tag_scores(o)
    cpu, gpu, low = runs["cpu"], runs["dev"], runs["dev_bf16"]
    out["tag_scores_max_abs_diff"] = max(max(abs(cpu[p][m] - gpu[p][m]) for m in cpu[p]) for p in cpu)
    out["tag_same_files"] = sorted(cpu) == sorted(gpu)
    tops = [(sorted(cpu[p], key=cpu[p].get)[-5:], sorted(low[p], key=low[p].get)[-5:]) for p in cpu]
    out["tag_bf16_top1_agreement"] = float(np.mean([a[-1] == b[-1] for a, b in tops]))
    out["tag_bf16_top5_overlap"] = float(np.mean([len(set(a) & set(b)) / 5 for a, b in tops]))
    out["tag_bf16_scores_max_abs_diff"] = max(max(abs(cpu[p][m] - low[p][m]) for m in cpu[p]) for p in cpu)

    for name, d in (("cpu", "cpu"), ("dev", dev)):
        cli(["extract", *files, "-c", encoder, "-g", "all", "-o", str(work / f"x_{name}.h5"), "--overwrite",
             "--device", d, "--precision", "fp32", "-b", "8"])  # fmt: skip
    out["extract"] = _h5_diff(work / "x_cpu.h5", work / "x_dev.h5")

    ev = {}
    for name, d in (("cpu", "cpu"), ("dev", dev)):
        o = work / f"events_{name}.jsonl"
        cli(["tag", *files, "-c", tagger, "--events", "-f", "json", "-o", str(o), "--overwrite",
             "--device", d, "--precision", "fp32", "-b", "8", "--event-threshold", "0.8"])  # fmt: skip
        ev[name] = _events(o)
    out["events"] = _compare_events(ev["cpu"], ev["dev"])
    out["pass"] = bool(
        out["tag_same_files"]
        and out["tag_scores_max_abs_diff"] <= 1e-3
        and out["extract"]["max_abs_diff"] <= 1e-3
        and not out["extract"]["mismatched"]
        and out["events"]["identical"] == out["events"]["events"]
    )
    return out


def speed_section(device: torch.device, s: dict) -> dict:
    """Encoder alone on ready inputs, and the front end alone, on the device."""
    torch.manual_seed(0)
    cfg = preset(s["model"])
    model = Encoder(cfg).eval().to(device)
    tl, reps = s["target_length"], s["repeats"]
    out: dict = {"model": s["model"], "frames": tl, "gflop_per_clip": count_flops(cfg, tl) / 1e9}
    for batch in (s["batch"], 2 * s["batch"]):
        x = torch.randn(batch, 1, tl, 128, device=device)
        reset_peak(device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            r = rate(lambda x=x: model(x), batch, reps, device)
        out[f"bf16_b{batch}_clips_per_s"] = r
        out[f"bf16_b{batch}_tflops"] = r * count_flops(cfg, tl) / 1e12
        out[f"bf16_b{batch}_peak_gb"] = peak_gb(device)
    x = torch.randn(s["batch"], 1, tl, 128, device=device)
    with torch.inference_mode(), strict_fp32(device):
        out[f"fp32_b{s['batch']}_clips_per_s"] = rate(lambda: model(x), s["batch"], max(3, reps // 4), device)
    with torch.inference_mode():  # PyTorch defaults (TF32 convolutions only)
        out[f"fp32_default_b{s['batch']}_clips_per_s"] = rate(
            lambda: model(x), s["batch"], max(3, reps // 4), device
        )
    waves = [0.1 * torch.randn(160000, device=device) for _ in range(s["batch"])]
    with torch.inference_mode():
        out["frontend_clips_per_s"] = rate(
            lambda: prepare_input(waves, target_length=tl), s["batch"], reps, device
        )
    out["target_bf16_clips_per_s"] = TARGETS["model_bf16_clips_per_s"]
    out["meets_target"] = max(out[f"bf16_b{b}_clips_per_s"] for b in (s["batch"], 2 * s["batch"])) >= 2000
    return out


def _input_only(paths: list[str], device, s: dict, workers: int) -> float:
    """Clips/s of decoding, windows, transfer and the GPU front end with a head that does nothing."""
    trivial = Encoder(preset("tiny", depth=1)).to(device)  # never called: the head ignores it

    def head(x):
        return {"z": x[:, 0, 0, :1]}

    start = time.perf_counter()
    options = PipelineOptions(
        target_length=s["target_length"], batch_size=s["batch"], workers=workers, device=device
    )
    n = sum(1 for _ in run_windows(trivial, paths, head, options))
    sync(device)
    return n / (time.perf_counter() - start)


def files_section(device: torch.device, s: dict, work: Path, encoder_path: str | None) -> dict:
    torch.manual_seed(0)
    model = Encoder(preset(s["model"])).eval().to(device)
    out: dict = {"workers": s["workers"], "batch": s["batch"]}
    t = time.perf_counter()
    paths = write_clips(work / "clips16k", s["files"], 16000, 1, workers=max(2, s["workers"]))
    paths44 = write_clips(work / "clips44k", s["files_44k"], 44100, 2, workers=max(2, s["workers"]))
    out["write_seconds"] = time.perf_counter() - t
    opts = dict(batch_size=s["batch"], workers=s["workers"], device=device, precision="bf16",
                target_length=s["target_length"])  # fmt: skip
    list(embed(model, paths[: 2 * s["batch"]], **opts))  # warm-up: kernels, allocator
    for label, ps in (("16k_mono", paths), ("44k_stereo", paths44)):
        out[f"{label}_files"] = len(ps)
        out[f"{label}_input_only_clips_per_s"] = _input_only(ps, device, s, s["workers"])
        reset_peak(device)
        with GpuUtilisation(device) as util:
            start = time.perf_counter()
            recs = list(embed(model, ps, **opts))
            sync(device)
            seconds = time.perf_counter() - start
        out[f"{label}_clips_per_s"] = len(recs) / seconds
        out[f"{label}_skipped"] = sum(r.error is not None for r in recs)
        out[f"{label}_gpu_utilisation_mean"] = util.mean
        out[f"{label}_peak_gb"] = peak_gb(device)
    # the workers sweep on the 16 kHz set (decoding is the usual limit)
    for workers in sorted({max(1, s["workers"] // 2), s["workers"] * 3 // 2}):
        start = time.perf_counter()
        n = sum(1 for _ in embed(model, paths, **{**opts, "workers": workers}))
        sync(device)
        out[f"16k_mono_workers{workers}_clips_per_s"] = n / (time.perf_counter() - start)
    if encoder_path:
        h5 = work / "corpus.h5"
        _, _, err, seconds = cli(["extract", str(work / "clips16k"), "-c", encoder_path, "-o", str(h5),
                                  "--overwrite", "--device", str(device), "--precision", "bf16",
                                  "-b", str(s["batch"]), "-w", str(s["workers"])])  # fmt: skip
        with h5py.File(h5) as f:
            rows = len(f["paths"])
        out["cli_extract_files"] = rows
        out["cli_extract_seconds"] = seconds
        out["cli_extract_clips_per_s"] = rows / seconds
    out["target_clips_per_s"] = TARGETS["files_clips_per_s"]
    out["meets_target"] = out["16k_mono_clips_per_s"] >= TARGETS["files_clips_per_s"]
    return out


class RepeatedBatch:
    """A task's `batches`: one fixed random log-mel batch on the device, forever."""

    def __init__(self, batch_size: int, frames: int, device: torch.device):
        g = torch.Generator().manual_seed(0)
        self.batch = torch.randn(batch_size, 1, frames, 128, generator=g).to(device)

    def __call__(self, epoch_seed: int, rank: int, world_size: int, start_position: int):
        while True:
            yield {"source": self.batch}


def _stage_task(stage: str, device: torch.device, s: dict, steps: int):
    settings = resolve_settings({
        "stage": stage, "steps": steps, "batch_size": s["pre_batch"], "target_length": s["target_length"],
        "precision": "auto", "clone_batch": {"eat": 16, "sslam": 8}[stage], "device": str(device),
    })  # fmt: skip
    torch.manual_seed(0)
    model = PretrainingModel(preset(s["model"]), objective_config(settings))
    return settings, PretrainTask(
        model, RepeatedBatch(settings.batch_size, settings.target_length, device), settings
    )


def _train(task, settings, device, steps: int, folder: Path, log_every: int) -> dict:
    """`steps` updates through the real trainer: the wall time of the call (the final model export
    and state.pt included), the trainer's own clips/s of its log windows (the steps alone; the first
    window, with the first step's allocations, left out when there are others) and the losses."""
    config = train_config(settings, device)
    config.steps, config.warmup, config.log_every, config.save_every = steps, 0, log_every, 10**9
    config.out_dir, config.progress = str(folder), False
    reset_peak(device)
    start = time.perf_counter()
    train(task, config)
    sync(device)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    rates = [r["clips_per_s"] for r in rows if "clips_per_s" in r]
    return {
        "seconds": seconds,
        "losses": [r["loss"] for r in rows if r.get("loss") is not None],
        "step_clips_per_s": float(np.mean(rates[1:] if len(rates) > 1 else rates)) if rates else None,
    }


def _breakdown(task: PretrainTask, device: torch.device, reps: int) -> dict:
    """Seconds of one forward+backward, AdamW step (foreach, fused), EMA update and grad clipping."""
    model = task.model
    batch = next(task.batches(0, 0, 1, 0))
    gen = torch.Generator().manual_seed(0)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def fwd_bwd():
        with amp:
            loss = task.loss(batch, gen)["loss"]
        loss.backward()

    out = {"forward_backward_s": seconds_of(fwd_bwd, reps, device)}
    params = [p for p in model.parameters() if p.requires_grad]
    out["clip_grad_norm_s"] = seconds_of(lambda: torch.nn.utils.clip_grad_norm_(params, 3.0), reps, device)
    opt = build_optimizer(model, 1e-6, 0.05)
    out["adamw_step_s"] = seconds_of(opt.step, reps, device)
    if device.type == "cuda":
        groups = param_groups(model, 0.05, None)
        fused = torch.optim.AdamW(groups, lr=1e-6, betas=(0.9, 0.95), fused=True)
        out["adamw_fused_step_s"] = seconds_of(fused.step, reps, device)
        del fused
    del opt
    out["ema_update_s"] = seconds_of(lambda: model.ema_step(0), reps, device)
    teacher = [t for _, t in model.teacher.named_parameters()]
    student = dict(model.student.named_parameters())
    student = [student[n].detach() for n, _ in model.teacher.named_parameters()]

    @torch.no_grad()
    def ema_foreach():
        torch._foreach_lerp_(teacher, student, 1 - 0.9998)

    out["ema_update_foreach_s"] = seconds_of(ema_foreach, reps, device)
    model.zero_grad(set_to_none=True)
    return out


def pretrain_section(device: torch.device, s: dict, work: Path) -> dict:
    out: dict = {}
    for stage in ("eat", "sslam"):
        steps = s["warm_steps"] + s["timed_steps"]
        settings, task = _stage_task(stage, device, s, steps)
        _train(task, settings, device, s["warm_steps"], work / f"{stage}_warm", log_every=s["warm_steps"])
        run = _train(
            task, settings, device, s["timed_steps"], work / f"{stage}_timed", max(1, s["timed_steps"] // 4)
        )
        seconds, losses = run["seconds"], run["losses"]
        rows = settings.batch_size * settings.clone_batch * (2 if stage == "sslam" else 1)
        k = max(1, len(losses) // 4)
        r = {
            "batch_size": settings.batch_size,
            "clone_batch": settings.clone_batch,
            "student_rows": rows,
            "target_length": settings.target_length,
            "precision": train_config(settings, device).precision,
            "steps_timed": s["timed_steps"],
            "clips_per_s": run["step_clips_per_s"],
            "clips_per_s_with_final_save": settings.batch_size * s["timed_steps"] / seconds,
            "peak_memory_gb": peak_gb(device),
            "loss_first": losses[:3],
            "loss_last": losses[-3:],
            "loss_finite": all(math.isfinite(v) for v in losses),
            "loss_falls": float(np.mean(losses[-k:])) < float(np.mean(losses[:k])),
        }
        r.update(_breakdown(task, device, max(2, s["repeats"] // 4)))
        out[stage] = r
        del task
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda":  # the decoder's grouped convolutions with cuDNN's autotuner
        torch.backends.cudnn.benchmark = True
        try:
            steps = s["warm_steps"] + s["timed_steps"]
            settings, task = _stage_task("eat", device, s, steps)
            _train(task, settings, device, s["warm_steps"], work / "bench_warm", s["warm_steps"])
            run = _train(
                task, settings, device, s["timed_steps"], work / "bench", max(1, s["timed_steps"] // 4)
            )
            out["eat"]["clips_per_s_cudnn_benchmark"] = run["step_clips_per_s"]
            out["eat"]["peak_memory_gb_cudnn_benchmark"] = peak_gb(device)
        finally:
            torch.backends.cudnn.benchmark = False
    out["eat"]["target_clips_per_s"] = TARGETS["eat_clips_per_s"]
    out["sslam"]["target_peak_memory_gb"] = TARGETS["sslam_peak_memory_gb"]
    out["pass"] = all(out[st]["loss_finite"] and out[st]["loss_falls"] for st in ("eat", "sslam"))
    return out


def _labelled(folder: Path, n: int, sr: int = 16000) -> Path:
    """n clips of 10 tone classes with labels.csv (filename,labels)."""
    paths = write_clips(folder, n, sr, 1, workers=8)
    lines = ["filename,labels"] + [f"{Path(p).name},tone{i % 10}" for i, p in enumerate(paths)]
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


def finetune_section(device: torch.device, s: dict, work: Path) -> dict:
    data = _labelled(work / "labelled", s["ft_files"])
    run = work / "ft_run"
    prof = work / "finetune.prof" if s.get("profile") else None
    args = ["finetune", "--data", str(data), "--model", s["model"], "-o", str(run), "--overwrite",
            "--steps", str(s["ft_steps"]), "-b", str(s["ft_batch"]),
            "--target-length", str(s["target_length"]),
            "--device", str(device), "--precision", "bf16", "-w", "8", "-q",
            "--save-every", str(s["ft_steps"])]  # fmt: skip
    rc, stdout, _, seconds = cli(args, profile=prof)
    summary = last_json(stdout)
    clips_per_s = summary["clips"] / summary["seconds"] if summary.get("seconds") else None
    out = {"rc": rc, "wall_seconds": seconds, "train_clips_per_s": clips_per_s, "summary": summary}
    if prof is not None:
        out["profile"] = profile_summary(prof, 20)
    return out


def files_profile_section(device: torch.device, s: dict, work: Path, encoder_path: str) -> dict:
    """Where the time of extraction from files goes: the main process of `sslam extract` and of `embed`
    under cProfile (worker processes decode; the main process collects, batches and launches)."""
    import cProfile

    folder = work / "clips16k"
    paths = sorted(str(p) for p in folder.glob("*.wav")) or write_clips(folder, s["files"], 16000, 1, 16)
    out: dict = {"files": len(paths)}
    prof = work / "extract.prof"
    args = ["extract", str(folder), "-c", encoder_path, "-o", str(work / "p.h5"), "--overwrite",
            "--device", str(device), "--precision", "bf16",
            "-b", str(s["batch"]), "-w", str(s["workers"])]  # fmt: skip
    _, _, _, seconds = cli(args, profile=prof)
    out["cli_extract_seconds"] = seconds
    out["cli_extract_profile"] = profile_summary(prof)
    torch.manual_seed(0)
    model = Encoder(preset(s["model"])).eval().to(device)
    opts = dict(batch_size=s["batch"], workers=s["workers"], device=device, precision="bf16",
                target_length=s["target_length"])  # fmt: skip
    list(embed(model, paths[: 2 * s["batch"]], **opts))
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    n = sum(1 for _ in embed(model, paths, **opts))
    sync(device)
    profiler.disable()
    out["embed_clips_per_s_profiled"] = n / (time.perf_counter() - start)
    profiler.dump_stats(str(work / "embed.prof"))
    out["embed_profile"] = profile_summary(work / "embed.prof")
    return out


def torchrun_section(device: torch.device, s: dict, work: Path, encoder_path: str) -> dict:
    out: dict = {}
    data = work / "labelled" if (work / "labelled").exists() else _labelled(work / "labelled", s["ft_files"])
    nccl = {"NCCL_DEBUG": "INFO"}
    args = ["pretrain", str(data), "--model", s["model"], "--steps", str(s["tr_steps"]),
            "-b", str(s["pre_batch"]), "--target-length", str(s["target_length"]),
            "-o", str(work / "tr_pretrain"), "--overwrite", "--device", str(device),
            "-w", "4", "-q"]  # fmt: skip
    rc, stdout, err, seconds = cli(args, env=nccl, torchrun=True)
    summary = last_json(stdout)
    config = json.loads((work / "tr_pretrain" / "config.json").read_text())
    out["pretrain"] = {
        "rc": rc,
        "seconds": seconds,
        "world_size": config.get("world_size"),
        "nccl_initialised": "NCCL INFO" in stdout + err,
        "loss": summary.get("loss"),
        "clips_per_s": summary.get("clips_per_s"),
    }
    files = [str(p) for p in sorted((work / "labelled").glob("*.wav"))[: s["tr_files"]]]
    lst = work / "tr_files.txt"
    lst.write_text("\n".join(files) + "\n")
    common = ["-c", encoder_path, "-g", "all", "--overwrite", "--device", str(device), "--precision", "fp32"]
    cli(["extract", str(lst), "-o", str(work / "tr_one.h5"), *common])
    cli(["extract", str(lst), "-o", str(work / "tr_run.h5"), *common], torchrun=True)
    out["extract"] = _h5_diff(work / "tr_one.h5", work / "tr_run.h5")
    out["pass"] = bool(
        out["pretrain"]["world_size"] == 1
        and (device.type != "cuda" or out["pretrain"]["nccl_initialised"])
        and out["extract"]["max_abs_diff"] == 0.0
        and not out["extract"]["mismatched"]
    )
    return out


def extras_section(device: torch.device, s: dict, out_dir: Path) -> dict:
    """torch.compile of the encoder, and the top kernels of one stage-1 training step."""
    out: dict = {}
    torch.manual_seed(0)
    model = Encoder(preset(s["model"])).eval().to(device)
    x = torch.randn(s["batch"], 1, s["target_length"], 128, device=device)
    t = time.perf_counter()
    compiled = torch.compile(model)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
        compiled(x)
        sync(device)
        out["compile_seconds"] = time.perf_counter() - t
        out["compiled_bf16_clips_per_s"] = rate(lambda: compiled(x), s["batch"], s["repeats"], device)
        out["eager_bf16_clips_per_s"] = rate(lambda: model(x), s["batch"], s["repeats"], device)
    compiled = model = None  # free the memory before the profile
    settings, task = _stage_task("eat", device, s, 1)
    task.model.to(device).train()
    batch = next(task.batches(0, 0, 1, 0))
    gen = torch.Generator().manual_seed(0)
    opt = build_optimizer(task.model, 1e-6, 0.05)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def step():
        with amp:
            loss = task.loss(batch, gen)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.model.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        task.model.ema_step(0)

    step()
    sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40)
    (out_dir / "profile_eat_step.txt").write_text(table + "\n")
    top = []
    for e in sorted(prof.key_averages(), key=lambda e: getattr(e, "device_time_total", 0) or 0, reverse=True)[
        :12
    ]:
        top.append({"name": e.key[:80], "device_ms": (getattr(e, "device_time_total", 0) or 0) / 1e3,
                    "calls": e.count})  # fmt: skip
    out["eat_step_top_ops"] = top
    return out


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes: the CPU dry run")
    p.add_argument("--out", default=None, help="folder for gpu_check.json and the profile [$OUT]")
    p.add_argument("--budget", type=float, default=450, help="seconds; later sections skip past it [450]")
    p.add_argument("--sections", default="env,model,cli,speed,files,pretrain,finetune,torchrun,extras")
    p.add_argument("--profile", action="store_true", help="cProfile the finetune run; adds files_profile")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    s = {**(TINY if args.tiny else FULL), "profile": args.profile}
    out_dir = Path(args.out or os.environ.get("OUT") or "gpu_check_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    check = Check(out_dir, args.budget)
    check.result["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    check.result["sizes"] = s
    want = set(args.sections.split(","))
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        ckpts = None
        if "env" in want:
            check.result["env"] = check.run("env", env_section, device)
        if "model" in want:
            check.run("model", model_section, device, s)
        if "cli" in want:
            check.run("cli", cli_section, device, s, work, need=30)
        if (work / "encoder.safetensors").exists():
            ckpts = str(work / "encoder.safetensors")
        else:
            ckpts = write_checkpoints(work, s)[1]
        if "speed" in want:
            check.run("speed", speed_section, device, s, need=20)
        if "pretrain" in want:
            check.run("pretrain", pretrain_section, device, s, work, need=40)
        if "files" in want:
            check.run("files", files_section, device, s, work, ckpts, need=60)
        if args.profile or "files_profile" in want:
            check.run("files_profile", files_profile_section, device, s, work, ckpts, need=40)
        if "finetune" in want:
            check.run("finetune", finetune_section, device, s, work, need=30)
        if "torchrun" in want:
            check.run("torchrun", torchrun_section, device, s, work, ckpts, need=40)
        if "extras" in want:
            check.run("extras", extras_section, device, s, out_dir, need=60)
    sec = check.result["sections"]
    check.result["passed"] = {k: v.get("pass") for k, v in sec.items() if "pass" in v}
    check.save()
    print(json.dumps(rounded(check.result)))


if __name__ == "__main__":
    main()
