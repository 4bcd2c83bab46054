"""What do audio mixtures do? SSLAM stage-2 ablations at small scale, probed over several seeds.

    python scripts/ablation_check.py /work/shared/data [--work DIR] [--seeds 3] [--steps 4800]

One EAT stage-1 run on the unlabelled FSDD training recordings with the learning check's recipe and
stage-1 length (scripts/learning_check.py: two thirds of --steps), then, from it, stage-2 variants with
the same updates, lr (a tenth), warm-up and EMA anneal (SSLAM's fractions of the stage-2 length, for all):

    eat         EAT continued (the stage-1 objective)
    no_mix      --stage sslam --mix none (the "same training without mixtures" control)
    no_srl      --stage sslam --srl-weight 0 (mixtures, no Source Retention term)
    sslam       --stage sslam (the release objective)
    sslam_avg   --stage sslam --utterance-target average

each for --seeds seeds of stage 2 (data order, masks, windows; a given seed draws the same masks and
windows in every sslam variant). Every encoder, and the stage-1 run itself, is linear-probed on the CLS
and on the mean patch token (learning_check.probe): FSDD accuracy, polydigits mAP and its mAP by
polyphony (1 / 2-3 / 4-5 digits). Prints mean +- std over seeds per cell as two tables (CLS, mean
patch), then one JSON object, also written to WORK/ablation.json. Finished runs and probes in --work
are reused, so a rerun with more --seeds only adds the new ones.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import learning_check  # noqa: E402
from fsdd import write_fsdd_split  # noqa: E402

VARIANTS: dict[str, dict[str, str | float]] = {
    "eat": {"stage": "eat"},
    "no_mix": {"stage": "sslam", "mix": "none"},
    "no_srl": {"stage": "sslam", "srl_weight": 0.0},
    "sslam": {"stage": "sslam"},
    "sslam_avg": {"stage": "sslam", "utterance_target": "average"},
}
SSLAM_WARMUP, SSLAM_EMA_ANNEAL = 25_000 / 200_000, 100_000 / 200_000  # release fractions of stage 2
BINS = ("1", "2-3", "4-5")
METRICS = ("fsdd_acc", "poly_mAP", *(f"poly_{b}" for b in BINS))


def finished(run: Path, steps: int, wanted: dict) -> bool:
    """Whether `run` holds a finished run of `steps` updates given these settings."""
    config = run / "config.json"
    if not ((run / "model.safetensors").exists() and config.exists()):
        return False
    done = json.loads(config.read_text())
    given = done.get("pretrain", {}).get("given", {})
    return done.get("steps") == steps and all(same(given.get(k), v) for k, v in wanted.items())


def same(saved, value) -> bool:
    """A saved setting equals the wanted one (numbers compared as numbers)."""
    if isinstance(value, (int, float)) and isinstance(saved, (int, float)):
        return abs(saved - value) <= 1e-12 * max(abs(value), 1.0)
    return str(saved) == str(value)


def stage2(run: Path, audio: Path, stage1: Path, variant: dict, steps: int, seed: int, lr: float) -> None:
    """One stage-2 variant from the stage-1 run, with its recipe (`--config` of that run) and our schedule."""
    wanted = {**variant, "seed": seed, "lr": lr, "init": str(stage1)}
    wanted |= {
        "warmup": round(steps * SSLAM_WARMUP),
        "ema_anneal_end_step": max(1, round(steps * SSLAM_EMA_ANNEAL)),
    }
    if finished(run, steps, wanted):
        return
    cmd = [str(audio), "-o", str(run), "--config", str(stage1 / "config.json"), "--steps", str(steps)]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in wanted.items()]
    cmd += ["--save-every", str(max(steps, 1)), "--log-every", "25", "-q", "--overwrite"]
    learning_check.sslam("pretrain", *cmd)


def last_terms(run: Path) -> dict:
    """The last logged loss terms of a run (patch, cls, srl per masked patch)."""
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    last = json.loads(lines[-1]) if lines else {}
    return {k: round(last[k], 4) for k in ("loss", "patch", "cls", "srl") if k in last}


def probes(run: Path, splits: dict, poly: Path, work: Path, args) -> dict:
    """CLS and mean-patch probes of one encoder (reused from work/probes when its weights are the same)."""
    cache = work / "probes" / f"{run.name}.json"
    stamp = (run / "model.safetensors").stat().st_mtime_ns
    if cache.exists() and json.loads(cache.read_text()).get("stamp") == stamp:
        return json.loads(cache.read_text())["scores"]
    scores = {}
    for pool in ("cls", "mean"):
        fsdd = learning_check.probe(
            run, "fsdd", splits["train"], splits["test"], args.target_length, work, args.seed, pool
        )
        learning_check.probe(
            run, "poly", poly / "train", poly / "test", args.poly_length, work, args.seed, pool
        )
        probe_dir = work / f"probe_{run.name}_poly_{pool}"  # learning_check.probe's folder
        text = learning_check.sslam("eval", "--checkpoint", str(probe_dir), "--data", str(poly / "test"),
                                    "--format", "json", "--by-polyphony", "--target-length",
                                    str(args.poly_length), "--device", "cpu")  # fmt: skip
        poly_scores = json.loads(text)
        scores[f"fsdd_acc_{pool}"] = round(100 * fsdd["accuracy"], 2)
        scores[f"poly_mAP_{pool}"] = round(100 * poly_scores["mAP"], 2)
        for b in BINS:
            scores[f"poly_{b}_{pool}"] = round(100 * poly_scores["polyphony"][b]["mAP"], 2)
    cache.parent.mkdir(exist_ok=True)
    cache.write_text(json.dumps({"stamp": stamp, "scores": scores}))
    return scores


def spread(values: list[float]) -> dict:
    """Mean, sample std (0 for one seed) and count."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), 2), "std": round(std, 2), "n": len(values)}


def table(cells: dict, pool: str) -> str:
    """One Markdown table of mean +- std per variant for the probes on `pool`."""
    names = ("FSDD acc", "polydigits mAP", *(f"mAP {b}" for b in BINS))
    lines = [f"| variant ({pool}) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for variant, cell in cells.items():
        row = [f"{cell[f'{m}_{pool}']['mean']:.1f} ± {cell[f'{m}_{pool}']['std']:.1f}" for m in METRICS]
        lines.append(f"| {variant} (n={cell[f'fsdd_acc_{pool}']['n']}) | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    p = learning_check.parser()
    p.description = __doc__.splitlines()[0]
    p.add_argument("--seeds", type=int, default=3, help="stage-2 seeds per variant (1, 2, ...) [3]")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated [{','.join(VARIANTS)}]")
    args = p.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")

    args.data_root = args.data_root.resolve()  # the FSDD lists hold paths relative to it
    work = args.work or Path(tempfile.mkdtemp(prefix="sslam-ablation-"))
    work.mkdir(parents=True, exist_ok=True)
    splits = write_fsdd_split(args.data_root, work)
    poly = args.data_root / "polydigits"
    start = time.perf_counter()
    steps2 = round(args.steps * args.stage2_fraction)
    steps1 = args.steps - steps2
    stage1 = work / f"eat_{steps1}"
    learning_check.pretrain(stage1, splits["audio"], "eat", steps1, args)
    timing = {"stage1_s": round(time.perf_counter() - start, 1)}

    runs: dict[str, list[Path]] = {"stage1_only": [stage1]}
    lr = args.lr * args.stage2_lr_scale
    for name in args.variants.split(","):
        runs[name] = []
        for seed in range(1, args.seeds + 1):
            run = work / f"{name}_s{seed}"
            stage2(run, splits["audio"], stage1, VARIANTS[name], steps2, seed, lr)
            runs[name].append(run)
    timing["stage2_s"] = round(time.perf_counter() - start - timing["stage1_s"], 1)

    per_run, cells = {}, {}
    for name, group in runs.items():
        scores = [probes(run, splits, poly, work, args) for run in group]
        per_run |= {
            run.name: {**s, "last_terms": last_terms(run)} for run, s in zip(group, scores, strict=True)
        }
        cells[name] = {key: spread([s[key] for s in scores]) for key in scores[0]}
    timing["total_s"] = round(time.perf_counter() - start, 1)

    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "stage1_steps": steps1,
        "stage2_steps": steps2,
        "cells": cells,
        "runs": per_run,
        "seconds": timing,
        "work": str(work),
    }
    (work / "ablation.json").write_text(json.dumps(report, indent=2))
    print(table(cells, "cls") + "\n\n" + table(cells, "mean") + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
