"""Does pre-training learn? Pre-train a small model on unlabelled FSDD speech, then linear-probe frozen CLS.

    python scripts/learning_check.py /work/shared/data [--work DIR] [--steps 4800] [--model tiny]

Three encoders, each through the project's own commands (`sslam pretrain`, `sslam finetune --linear`,
`sslam eval`): random init (`--steps 0`), EAT stage 1 for `--steps`, and stage 1 for two thirds of
the steps followed by SSLAM stage 2 for the last third at a tenth of the lr (same total updates; the
release's proportions: 400k EAT + 200k SSLAM updates, lr 5e-4 then 5e-5). Probes (on the CLS
token, the criterion, and on the mean patch token, for comparison): FSDD digit accuracy on the official
test split (index 0-4) after training on the train split (index 5-49), and mAP on polydigits/test
after training on polydigits/train. Prints one JSON object; pre-training must beat random init by at
least 15 accuracy points on digits (`passes`, per encoder). Pre-training runs already finished in
--work are reused, so a second invocation only re-probes. About 27 minutes of pre-training (10 for
stage 1, 17 for stage 1 + 2) and 9 of probing on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from .cli import sslam
from .fsdd import write_fsdd_split

MARGIN = 15.0


def pretrain(run: Path, data: Path, stage: str, steps: int, args, init: Path | None = None) -> None:
    """One `sslam pretrain` run; a finished run of the same stage and steps in --work is reused."""
    config = run / "config.json"
    if (run / "model.safetensors").exists() and config.exists():
        done = json.loads(config.read_text())
        if done["steps"] == steps and done["pretrain"]["settings"]["stage"] == stage:
            return
    cmd = [str(data), "-o", str(run), "--stage", stage, "--steps", str(steps), "--seed", str(args.seed)]
    cmd += ["--batch-size", str(args.batch_size), "--target-length", str(args.target_length)]
    cmd += ["--clone-batch", str(args.clone_batch), "--ema-decay", str(args.ema_decay)]
    cmd += ["--ema-end-decay", str(args.ema_end_decay), "--mask-prob", str(args.mask_prob)]
    cmd += ["--device", "cpu", "--workers", "1", "-q", "--overwrite"]  # a stale run of other steps is redone
    cmd += ["--log-every", "25", "--save-every", str(max(steps, 1))]
    cmd += ["--init", str(init)] if init else ["--model", args.model]
    if stage == "eat":
        cmd += ["--lr", str(args.lr)]
    else:
        cmd += ["--lr", str(args.lr * args.stage2_lr_scale)]
    sslam("pretrain", *cmd)


def probe(
    run: Path, data: str, train: Path, test: Path, frames: int, work: Path, seed: int, pool: str
) -> dict:
    """Linear probe on frozen features (CLS, or the mean patch token); test metrics from `sslam eval`."""
    out = work / f"probe_{run.name}_{data}_{pool}"
    sslam("finetune", "--data", str(train), "--checkpoint", str(run), "-o", str(out), "--linear",
          "--target-length", str(frames), "--device", "cpu", "--seed", str(seed),
          "--precision", "fp32", "--pool", pool, "--overwrite")  # fmt: skip
    text = sslam("eval", "--checkpoint", str(out), "--data", str(test), "--format", "json",
                 "--target-length", str(frames), "--device", "cpu")  # fmt: skip
    return json.loads(text)


def margins(results: dict, key: str) -> dict:
    """Points above random init of each pre-trained encoder on one probe metric."""
    base = results["random"][key]
    return {name: round(results[name][key] - base, 2) for name in ("eat", "eat+sslam")}


def parser() -> argparse.ArgumentParser:
    """The options, whose defaults are the pre-training recipe (scripts/finetune_check.py reuses it)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_root", type=Path)
    p.add_argument("--work", type=Path, default=None, help="keep runs here (default: a temporary folder)")
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=4800, help="total pre-training updates per encoder")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--clone-batch", type=int, default=4)
    p.add_argument(
        "--target-length", type=int, default=64,
        help="pre-training / FSDD probe frames [64: 0.64 s holds 90 %% of the digits whole]",
    )  # fmt: skip
    p.add_argument(
        "--mask-prob", type=float, default=0.3,
        help="masked fraction [0.3: 0.8 of a 32-patch digit leaves the CLS too little to go on]",
    )  # fmt: skip
    p.add_argument("--poly-length", type=int, default=208, help="polydigits probe frames (2 s clips)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--stage2-lr-scale", type=float, default=0.1, help="stage 2 lr = lr x this")
    p.add_argument("--stage2-fraction", type=float, default=1 / 3, help="share of --steps given to stage 2")
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--ema-end-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> None:
    """Pre-train the three encoders (reusing finished runs), probe each and print the report."""
    args = parser().parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="sslam-learning-"))
    work.mkdir(parents=True, exist_ok=True)
    splits = write_fsdd_split(args.data_root, work)
    poly = args.data_root / "polydigits"
    start = time.perf_counter()
    runs = {"random": work / "random", "eat": work / "eat", "eat+sslam": work / "eat_sslam"}
    timing = {}
    t = time.perf_counter()
    pretrain(runs["random"], splits["audio"], "eat", 0, args)
    second = round(args.steps * args.stage2_fraction)
    first = args.steps - second
    pretrain(runs["eat"], splits["audio"], "eat", args.steps, args)
    timing["eat_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    stage1 = work / f"eat_{first}"
    pretrain(stage1, splits["audio"], "eat", first, args)
    pretrain(runs["eat+sslam"], splits["audio"], "sslam", second, args, init=stage1)
    timing["eat+sslam_s"] = round(time.perf_counter() - t, 1)

    results = {}
    for name, run in runs.items():
        results[name] = {}
        for pool, suffix in (("cls", ""), ("mean", "_meanpool")):
            digits = probe(
                run, "fsdd", splits["train"], splits["test"], args.target_length, work, args.seed, pool
            )
            poly_scores = probe(
                run, "poly", poly / "train", poly / "test", args.poly_length, work, args.seed, pool
            )
            results[name]["fsdd_accuracy" + suffix] = round(100 * digits["accuracy"], 2)
            results[name]["polydigits_mAP" + suffix] = round(100 * poly_scores["mAP"], 2)
    margin = margins(results, "fsdd_accuracy")
    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": results,
        "margin_points": margin,
        "meanpool_margin_points": margins(results, "fsdd_accuracy_meanpool"),
        "passes": {name: points >= MARGIN for name, points in margin.items()},
        "stage2_improves_polyphonic_probe": results["eat+sslam"]["polydigits_mAP"]
        > results["eat"]["polydigits_mAP"],
        "seconds": {**timing, "total": round(time.perf_counter() - start, 1)},
        "work": str(work),
    }
    print(json.dumps(report, indent=2))
