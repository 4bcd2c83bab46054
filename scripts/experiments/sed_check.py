"""Sound event detection check: digit events from a fine-tuned tiny encoder on polydigits, scored
against polydigits/test/strong.tsv next to a random-init model and a trivial baseline.

    python scripts/sed_check.py /work/shared/data [--work runs/sed_check] [--pretrain-steps N]
        [--steps N] [--pretrained RUN_DIR]

1. Pre-trains the tiny encoder with scripts/finetune_check.py's `pretrain` (learning_check's EAT
   recipe, `--pretrain-steps` updates), reused when the work folder has it.
2. Fine-tunes it, and a random init of the same size, on polydigits/train clip labels only
   (finetune_check's `run`: mean pooling, the 2.08 s window, SpecAugment and roll); reused when done.
3. Detects digit events on polydigits/test with `sslam eval --strong` (the predictions
   `sslam tag --events` writes, at its defaults): `--frame-scores token` (the head on each 160 ms
   step's tokens, one 2.08 s window) and `--frame-scores window` (windows of `--window` s every
   0.16 s, each step the mean over its windows).
4. Trivial baseline: every class the fine-tuned pre-trained model tags (clip score >= 0.5) is one
   event over the whole clip; also with the true clip labels (what clip tagging could reach at best).

Prints a markdown table (event-F1, segment-F1, PSDS) and one JSON object, also written to
WORK/results.json. The defaults are finetune_check's budget (4800 pre-training, 1000 fine-tuning
updates), the least that left the label prior there: 23 minutes on 2 cores, measured for the
README's table with other work beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from sslam_core.data.datasets import read_labelled
from sslam_core.evaluation.strong import StrongOptions, read_strong_events, score, step_table

from . import finetune_check
from .cli import sslam
from .fsdd import polydigit_sets, write_fsdd_split

FRAMES = 208  # polydigits clips are 2 s: one window holds a whole clip
INITS = ("pretrained", "random")


def fine_tuned(root: Path, work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """{init: fine-tuned run folder}: pre-training and fine-tuning, each reused when finished."""
    train, test = polydigit_sets(root)
    pretrained = args.pretrained
    if pretrained is None:
        recipe = finetune_check.recipe_args(root)
        audio = write_fsdd_split(root, work)["audio"]
        pretrained = finetune_check.pretrain(audio, work, args.pretrain_steps or recipe.steps, recipe)
    runs = {}
    for init in INITS:
        name = f"polydigits-{init}"
        runs[init] = work / name
        if not (runs[init] / "model.safetensors").exists():
            checkpoint = pretrained / "model.safetensors" if init == "pretrained" else None
            finetune_check.run(name, train, test, checkpoint, False, FRAMES, args.steps, work, "mean",
                               args.batch_size, True)  # fmt: skip
    return runs


def strong_eval(run: Path, strong: Path, segment: float, *extra: str) -> dict:
    """`sslam eval --strong` of one fine-tuned run, as its JSON object."""
    cmd = ["eval", "-c", str(run), "--strong", str(strong), "--format", "json", "--device", "cpu"]
    cmd += ["--segment-length", str(segment)]
    return json.loads(sslam(*cmd, *extra))


def trivial(run: Path, strong: Path, segment: float, oracle: bool) -> dict:
    """Every tagged class (clip score >= 0.5 from `sslam tag`, or the true labels when `oracle`) is one
    event over the whole clip, scored like the rest (PSDS on the clip scores held over the clip)."""
    truth = read_strong_events(str(strong))
    data = read_labelled(strong)
    args = ["-c", str(run), "-f", "json", "--top-k", "10", "--window", "2.08", "--device", "cpu"]
    lines = sslam("tag", *(e.path for e in data.examples), *args).splitlines()
    names = [name for _, name in data.classes]
    reference, durations, detected, tables = {}, {}, {}, {}
    for example, line in zip(data.examples, lines, strict=True):
        obj = json.loads(line)
        given = {t["label"]: t["score"] for t in obj["labels"]}
        if oracle:
            given = {data.classes[i][1]: 1.0 for i in example.labels}
        clip = np.array([[given.get(name, 0.0) for name in names]])
        k, duration = example.key, obj["duration"]
        reference[k], durations[k] = truth.events[k], duration
        detected[k] = [(0.0, duration, name) for name, s in zip(names, clip[0], strict=True) if s >= 0.5]
        tables[k] = step_table(np.array([0.0]), clip, duration, names)
    return score(reference, durations, detected, tables, names, StrongOptions(segment_length=segment))


def main(argv: list[str] | None = None) -> None:
    """Fine-tune (or reuse) both inits, score their events and the trivial baselines; table and JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data_root", type=Path)
    parser.add_argument("--work", type=Path, default=Path("runs/sed_check"))
    parser.add_argument(
        "--pretrain-steps", type=int, default=None, help="EAT pre-training updates [learning_check's 4800]"
    )
    parser.add_argument("--pretrained", type=Path, help="use this `sslam pretrain` run instead")
    parser.add_argument("--steps", type=int, default=1000, help="fine-tuning updates per init")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--window", type=float, default=0.64, help="window (s) of --frame-scores window")
    parser.add_argument(
        "--segment", type=float, default=0.25,
        help="segment length (s) of the segment-based F1 [0.25: 1 s segments are half of a 2 s clip]",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    strong = args.data_root / "polydigits" / "test" / "strong.tsv"
    runs = fine_tuned(args.data_root, args.work, args)
    trained_s = round(time.perf_counter() - started)
    rows = {}
    for init, run in runs.items():
        rows[f"{init}, token"] = strong_eval(run, strong, args.segment, "--frame-scores", "token")
        rows[f"{init}, window {args.window} s"] = strong_eval(
            run,
            strong,
            args.segment,
            "--frame-scores",
            "window",
            "--window",
            str(args.window),
            "--hop",
            "0.16",
        )
    for oracle, name in ((False, "tagged classes"), (True, "true clip labels")):
        rows[f"trivial: {name} over the whole clip"] = trivial(
            runs["pretrained"], strong, args.segment, oracle
        )
    print(f"\n| model, frame scores | event-F1 (macro) | segment-F1 ({args.segment} s, micro) | PSDS1 |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        ev, seg, psds = r["event_based"]["f1_macro"], r["segment_based"]["f1_micro"], r["psds"]["value"]
        print(f"| {name} | {ev:.3f} | {seg:.3f} | {psds:.3f} |")
    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": {name: {k: v for k, v in r.items() if k != "classes"} for name, r in rows.items()},
        "seconds": {"training": trained_s, "total": round(time.perf_counter() - started)},
    }
    (args.work / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
