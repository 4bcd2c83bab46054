"""Fidelity of the lower inference precisions to fp32 on real audio: torch bf16 autocast (only where the
CPU has native bf16, unless --bf16), torch dynamic int8 (`quantize_dynamic` on the Linear layers) and
ONNX Runtime int8 (what `--precision int8` runs: the checkpoint's cached int8 graph, per-token scales).

    .venv/bin/python scripts/precision_fidelity.py /work/shared/data            # fine-tunes its models
    .venv/bin/python scripts/precision_fidelity.py DATA --checkpoint CKPT --labelled SET [--checkpoint ...]

For each fine-tuned model (by default two tiny models fine-tuned here from a seeded random init with
scripts/finetune_check.py's `run`: FSDD, multi-class, and polydigits, multi-label; reused from --work
when present) it reports, per precision against fp32:
- the accuracy (multi-class) or mAP (multi-label) on the labelled test set, and its change;
- top-1 / top-5 agreement of the test set's class scores (top-5: the mean overlap of the two top-5
  sets), and the largest score difference;
- the cosine of clip embeddings (mean CLS over windows) and of patch embeddings on the real clips of
  DATA/clips and on FSDD recordings.
A seeded random ViT-B (T = 1024) adds clip / patch cosines on the real clips (--no-vitb: skip it).
Prints the CPU capability, the threads and the load average, a table, and the results as JSON (also
written to WORK/fidelity.json). Time on 2 cores at a load average of 10 (other work running): the
FSDD fine-tune (300 updates) 6.5 min, each model's four precisions over its test set and 47 files 4-8
min, the ViT-B rows ~10 min. The models fine-tuned here from a random init are weak (FSDD: 26 %
accuracy); a real model passed with --checkpoint says more.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from benchmarks.common import load_average, print_machine
from benchmarks.cpu_backends import torch_int8
from torch import nn

from sslam_core.data.datasets import LabelledSet, read_labelled
from sslam_core.evaluation.classification import predict, summarize
from sslam_core.inference.embeddings import embed
from sslam_core.models.factory import load_model
from sslam_core.models.layouts.native import save_checkpoint
from sslam_core.models.transformer import Encoder, preset

from . import finetune_check
from .fsdd import fsdd_sets, polydigit_sets, write_fsdd_split

AUDIO = (".wav", ".flac", ".ogg", ".mp3")
RUN = {"device": torch.device("cpu"), "batch_size": 4, "workers": 1}


def variants(path: Path, bf16: bool) -> dict[str, tuple[nn.Module, str]]:
    """name -> (model, precision passed to the pipeline) for the checkpoint at `path`, fp32 first."""
    model = load_model(path)
    out = {"fp32": (model, "fp32")}
    if bf16:
        out["torch bf16"] = (model, "bf16")
    out["torch int8"] = (torch_int8(model), "fp32")
    started = time.perf_counter()
    out["onnxruntime int8"] = (load_model(path, precision="int8"), "int8")
    print(f"  int8 model of {path.name} ready in {time.perf_counter() - started:.0f} s", flush=True)
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (N, D) arrays."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)


def embeddings(model: nn.Module, precision: str, files: list[str], frames: int) -> tuple[list, list]:
    """(clip vectors, patch matrices) of every file."""
    records = list(embed(model, files, granularity="patch", target_length=frames, precision=precision, **RUN))
    bad = [r.error for r in records if r.error]
    if bad:
        raise SystemExit(f"cannot embed: {bad[0]}")
    return [r.clip for r in records], [r.patch for r in records]


def embedding_fidelity(ref: tuple[list, list], got: tuple[list, list]) -> dict[str, float]:
    """Mean and minimum cosine of the clip vectors (over files) and patch vectors (over all tokens)."""
    clip = cosines(np.stack(ref[0]), np.stack(got[0]))
    patch = cosines(np.concatenate(ref[1]), np.concatenate(got[1]))
    return {"clip_cos": float(clip.mean()), "clip_cos_min": float(clip.min()),
            "patch_cos": float(patch.mean()), "patch_cos_min": float(patch.min())}  # fmt: skip


def agreement(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Top-1 agreement, mean top-5 overlap and the largest score difference of two (N, C) score arrays."""
    k = min(5, ref.shape[1])
    top = [np.argsort(-s, axis=1, kind="stable")[:, :k] for s in (ref, got)]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(*top, strict=True)]
    top1 = float((top[0][:, 0] == top[1][:, 0]).mean())
    return {
        "top1_agree": top1,
        "top5_overlap": float(np.mean(overlap)),
        "max_score_diff": float(np.abs(ref - got).max()),
    }


def classifier_rows(name: str, path: Path, test: LabelledSet, frames: int, files: list[str], bf16: bool):
    """One row per precision for a fine-tuned model: test metric and agreement, embedding cosines."""
    rows, ref_scores, ref_emb = [], None, None
    for variant, (model, precision) in variants(path, bf16).items():
        pred = predict(model, test, target_length=frames, precision=precision, **RUN)
        summary = summarize(pred)
        metric = "mAP" if test.multilabel else "accuracy"
        emb = embeddings(model, precision, files, frames)
        row = {
            "model": name,
            "precision": variant,
            metric: summary[metric],
            "n_clips": summary["n_clips"],
        }
        if ref_scores is None:
            ref_scores, ref_emb, ref_metric = pred.scores, emb, summary[metric]
        row[f"{metric}_change"] = summary[metric] - ref_metric
        row.update(agreement(ref_scores, pred.scores))
        row.update(embedding_fidelity(ref_emb, emb))
        rows.append(row)
        print(f"  {json.dumps(row)}", flush=True)
    return rows


def vitb_rows(work: Path, files: list[str], bf16: bool, seed: int) -> list[dict]:
    """Clip / patch cosines of a seeded random ViT-B (T = 1024) on `files`."""
    path = work / f"vitb_seed{seed}.safetensors"
    if not path.is_file():
        torch.manual_seed(seed)
        model = Encoder(preset("base")).eval()
        save_checkpoint(path, model.cfg, model.state_dict(), extra={"target_length": 1024})
    rows, ref = [], None
    for variant, (model, precision) in variants(path, bf16).items():
        emb = embeddings(model, precision, files, 1024)
        ref = ref or emb
        row = {"model": "seeded ViT-B", "precision": variant}
        row.update(embedding_fidelity(ref, emb))
        rows.append(row)
        print(f"  {json.dumps(row)}", flush=True)
    return rows


def finetuned(root: Path, work: Path, args: argparse.Namespace) -> list[tuple[str, Path, LabelledSet, int]]:
    """(name, checkpoint, test set, window frames): each --checkpoint with its --labelled set (default
    FSDD's test split), else the FSDD and polydigits models fine-tuned by finetune_check's `run`
    (reused when WORK already has them)."""
    if args.checkpoint:
        sets = args.labelled or []
        if len(sets) > len(args.checkpoint):
            raise SystemExit("more --labelled sets than --checkpoint models")
        default = write_fsdd_split(root, work)["test"]
        out = []
        for i, ckpt in enumerate(args.checkpoint):
            model = load_model(ckpt)
            test = read_labelled(sets[i] if i < len(sets) else default, multilabel=model.multilabel)
            out.append((Path(ckpt).name, Path(ckpt), test, model.target_length or 1024))
        return out
    fsdd_train, fsdd_test = fsdd_sets(write_fsdd_split(root, work))
    poly_train, poly_test = polydigit_sets(root)
    frames = finetune_check.recipe_args(root).target_length
    out = []
    for name, train, test, length, steps, augment in (
        ("fsdd", fsdd_train, fsdd_test, frames, args.fsdd_steps, False),
        ("polydigits", poly_train, poly_test, 208, args.poly_steps, True),
    ):
        run_name = f"{name}-finetune-seeded"
        if not (work / run_name / "model.safetensors").is_file():
            finetune_check.run(run_name, train, test, None, False, length, steps, work, "mean", 16, augment)
        out.append((name, work / run_name, test, length))
    return out


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (missing figures as blanks)."""
    cols = "model precision accuracy mAP accuracy_change mAP_change top1_agree top5_overlap max_score_diff"
    cols = [*cols.split(), "clip_cos", "clip_cos_min", "patch_cos", "patch_cos_min"]
    cols = [c for c in cols if any(c in r for r in rows)]

    def fmt(column: str, v) -> str:
        if not isinstance(v, float):
            return "" if v is None else str(v)
        return (
            f"{v:+.4f}"
            if column.endswith("_change")
            else f"{v:.2g}"
            if column == "max_score_diff"
            else f"{v:.4f}"
        )

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(c, r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Fine-tune (or take) the models, compare every precision with fp32; table and JSON."""
    np.seterr(all="ignore")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data_root", type=Path, help="holds clips/, fsdd/ and polydigits/")
    parser.add_argument("--work", type=Path, default=Path("runs/precision_fidelity"))
    parser.add_argument(
        "--checkpoint",
        action="append",
        help="a fine-tuned model instead of the two fine-tuned here (repeatable)",
    )
    parser.add_argument(
        "--labelled",
        action="append",
        help="the labelled test set of the matching --checkpoint [FSDD's test split]",
    )
    parser.add_argument("--fsdd-steps", type=int, default=300)
    parser.add_argument(
        "--poly-steps", type=int, default=200, help="polydigits updates (208 frames: ~3x an FSDD update)"
    )
    parser.add_argument("--fsdd-clips", type=int, default=32, help="FSDD recordings added to the real clips")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="measure bf16 without native bf16 (slow)")
    parser.add_argument("--no-vitb", action="store_true", help="skip the seeded ViT-B")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SSLAM_CACHE", str(args.work / "cache"))  # the int8 models, kept with the run
    torch.set_num_threads(args.threads)
    machine = print_machine()
    bf16 = machine["native_bf16"] or args.bf16
    load = machine["load_average_1min"]
    clips = sorted(str(p) for p in (args.data_root / "clips").iterdir() if p.suffix.lower() in AUDIO)
    recordings = sorted((args.data_root / "fsdd" / "recordings").glob("*.wav"))
    step = max(1, len(recordings) // max(1, args.fsdd_clips))
    files = clips + [str(p) for p in recordings[::step][: args.fsdd_clips]]
    rows = []
    for name, path, test, frames in finetuned(args.data_root, args.work, args):
        print(f"{name}: {path}, {len(test)} test clips, window {frames} frames", flush=True)
        rows += classifier_rows(name, path, test, frames, files, bf16)
    if not args.no_vitb:
        print(f"seeded ViT-B: {len(clips)} real clips, T = 1024", flush=True)
        rows += vitb_rows(args.work, clips, bf16, args.seed)
    end_load = load_average()
    print("\n" + table(rows))
    result = {"capability": machine["capability"], "flags_source": machine["capability_source"],
              "native_bf16": machine["native_bf16"], "threads": args.threads,
              "load_average": [load, end_load], "torch": torch.__version__, "machine": machine,
              "files": len(files), "rows": rows}  # fmt: skip
    (args.work / "fidelity.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
