"""What do audio mixtures do? SSLAM stage-2 ablations at small scale, probed over several seeds.

    python scripts/ablation_check.py /work/shared/data [--work DIR] [--seeds 3] [--steps 4800]
        [--variants eat,no_mix,...] [--stage2-data fsdd|fsdd+poly] [--probe features|commands]

One EAT stage-1 run on the unlabelled FSDD training recordings with the learning check's recipe and
stage-1 length (scripts/learning_check.py: two thirds of --steps), then, from it, stage-2 variants with
the same updates, lr (a tenth), warm-up and EMA anneal (SSLAM's fractions of the stage-2 length, for all):

    eat         EAT continued (the stage-1 objective)
    no_mix      --stage sslam --mix none (the "same training without mixtures" control)
    no_srl      --stage sslam --srl-weight 0 (mixtures, no Source Retention term)
    sslam       --stage sslam (the release objective)
    sslam_avg   --stage sslam --utterance-target average

each for --seeds seeds of stage 2 (data order, masks, windows; a given seed draws the same masks and
windows in every sslam variant), run seed-major so that a cut-short run leaves balanced cells. Every
encoder, and the stage-1 run itself, is probed on the last-block CLS and mean patch token with converged
scikit-learn logistic regressions on standardised frozen features (--probe features; --probe commands
uses `sslam finetune --linear` + `sslam eval` as learning_check does, ~15 min per encoder on a loaded
machine): FSDD accuracy; polydigits mAP of one-vs-rest probes that predict each constituent digit of a
mixture, overall and by polyphony (1 / 2-3 / 4-5 digits), and the share of each mixture's k digits among
its k best-scored ("digits in top k"). Per run it also records the loss-term trajectory (patch, cls, srl
per masked patch: first -> last quarter of the logs) and teacher target statistics on 64 FSDD clips with
the release's partial mix (cosine of a mixture's patch targets to its own clip's clean targets and to the
partner's, outside the clean windows, against the cosine of the two clean clips; the spread of the clean
utterance targets across clips). Prints mean +- std over seeds per cell (CLS, mean patch) and the "why"
table, then one JSON object, also written to WORK/ablation.json after every run. Finished runs and probes
in --work are reused, so a rerun with more --seeds only adds the new ones; --only-finished trains nothing
and reports what is there. --stage2-data fsdd+poly pre-trains stage 2 on the FSDD training recordings
plus the polydigits training mixtures at --poly-length frames (clean windows scaled to that length), in
runs named NAME_poly_sK.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from . import learning_check
from .cli import sslam
from .fsdd import write_fsdd_split

VARIANTS: dict[str, dict[str, str | float]] = {
    "eat": {"stage": "eat"},
    "no_mix": {"stage": "sslam", "mix": "none"},
    "no_srl": {"stage": "sslam", "srl_weight": 0.0},
    "sslam": {"stage": "sslam"},
    "sslam_avg": {"stage": "sslam", "utterance_target": "average"},
}
SSLAM_WARMUP, SSLAM_EMA_ANNEAL = 25_000 / 200_000, 100_000 / 200_000  # release fractions of stage 2
BINS = ("1", "2-3", "4-5")
METRICS = ("fsdd_acc", "poly_mAP", *(f"poly_{b}" for b in BINS), "poly_recall")


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
    cmd += ["--save-every", str(max(steps, 1)), "--log-every", str(max(1, min(25, steps // 12)))]
    cmd += ["-q", "--overwrite"]  # at least 12 logged points for the loss trajectory
    sslam("pretrain", *cmd)


def last_terms(run: Path) -> dict:
    """The last logged loss terms of a run (patch, cls, srl per masked patch)."""
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    last = json.loads(lines[-1]) if lines else {}
    return {k: round(last[k], 4) for k in ("loss", "patch", "cls", "srl") if k in last}


def probes(run: Path, splits: dict, poly: Path, work: Path, args) -> dict:
    """CLS and mean-patch probes of one encoder (reused from work/probes when its weights are the same)."""
    cache = work / "probes" / f"commands_{run.name}.json"
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
        text = sslam("eval", "--checkpoint", str(probe_dir), "--data", str(poly / "test"),
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


def load_inputs(root: Path, frames: int, poly_frames: int, every: int = 1) -> dict:
    """Fbank inputs and labels of FSDD (official split) and polydigits train / test (every `every`-th
    clip of each), decoded once."""
    import csv

    import numpy as np
    import torch

    from sslam_core.audio.decode import load_audio
    from sslam_core.audio.frontend import prepare_input

    def fbanks(paths: list[Path], length: int) -> torch.Tensor:
        waves = [load_audio(path) for path in paths]
        chunks = [prepare_input(waves[i : i + 256], target_length=length) for i in range(0, len(waves), 256)]
        return torch.cat(chunks)

    rows = list(csv.DictReader(open(root / "fsdd" / "metadata.csv")))[::every]
    data = {
        "fsdd_x": fbanks([root / "fsdd" / "recordings" / r["filename"] for r in rows], frames),
        "fsdd_y": np.array([int(r["digit"]) for r in rows]),
        "fsdd_train": np.array([r["split"] == "train" for r in rows]),
    }
    for split in ("train", "test"):
        folder = root / "polydigits" / split
        listed = list(csv.DictReader(open(folder / "labels.csv")))[::every]
        targets = np.zeros((len(listed), 10), dtype=np.float32)
        for i, r in enumerate(listed):
            targets[i, [int(d) for d in r["labels"].split(";")]] = 1
        data[f"poly_{split}_x"] = fbanks([folder / r["filename"] for r in listed], poly_frames)
        data[f"poly_{split}_y"] = targets
    return data


def pooled(encoder, x) -> dict:
    """Last-block CLS and mean patch token of a frozen encoder, (N, D) numpy arrays per pool."""
    import numpy as np
    import torch

    cls, mean = [], []
    with torch.no_grad():
        for i in range(0, len(x), 128):
            out = encoder(x[i : i + 128])
            cls.append(out[:, 0].double().numpy())
            mean.append(out[:, 1:].mean(dim=1).double().numpy())
    return {"cls": np.concatenate(cls), "mean": np.concatenate(mean)}


def constituent_recall(scores, targets) -> float:
    """Mean over clips of the share of a clip's k digits among its k highest-scored digits."""
    import numpy as np

    k = targets.sum(axis=1).astype(int)
    top = np.argsort(-scores, axis=1)
    hits = [targets[i, top[i, : k[i]]].sum() / k[i] for i in range(len(k)) if k[i] > 0]
    return float(np.mean(hits))


def feature_probes(run: Path, data: dict) -> dict:
    """Converged logistic-regression probes on standardised frozen features (scikit-learn): FSDD
    accuracy; polydigits mAP of one-vs-rest probes predicting each constituent digit of a mixture,
    overall and by polyphony (1 / 2-3 / 4-5), and the share of each mixture's digits ranked in its top k."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    from sslam_core.evaluation.metrics import average_precision, polyphony_report
    from sslam_core.models.factory import load_model

    encoder = load_model(run)
    fsdd, train = pooled(encoder, data["fsdd_x"]), data["fsdd_train"]
    poly_train, poly_test = pooled(encoder, data["poly_train_x"]), pooled(encoder, data["poly_test_x"])
    y, ytr, yte = data["fsdd_y"], data["poly_train_y"], data["poly_test_y"]
    scores = {}
    for pool in ("cls", "mean"):
        f = fsdd[pool]
        scaler = StandardScaler().fit(f[train])
        clf = LogisticRegression(max_iter=3000).fit(scaler.transform(f[train]), y[train])
        scores[f"fsdd_acc_{pool}"] = round(100 * clf.score(scaler.transform(f[~train]), y[~train]), 2)
        scaler = StandardScaler().fit(poly_train[pool])
        ovr = OneVsRestClassifier(LogisticRegression(max_iter=3000))
        ovr.fit(scaler.transform(poly_train[pool]), ytr)
        test = ovr.predict_proba(scaler.transform(poly_test[pool]))
        scores[f"poly_mAP_{pool}"] = round(100 * float(average_precision(test, yte).mean()), 2)
        by_polyphony = polyphony_report(test, yte)
        for b in BINS:
            scores[f"poly_{b}_{pool}"] = round(100 * by_polyphony[b]["mAP"], 2)
        scores[f"poly_recall_{pool}"] = round(100 * constituent_recall(test, yte), 2)
    return scores


def target_statistics(run: Path, data: dict, clips: int = 64) -> dict:
    """What the teacher's regression targets look like on FSDD training clips with and without the
    release's partial mix (clip i with clip i-1 outside 2 clean windows, fixed draw): the cosine of a
    mixture's patch targets to its own clip's clean targets and to the partner's, outside the windows,
    and the spread of the clean utterance targets (mean over patches) across clips relative to their size."""
    import torch
    import torch.nn.functional as F

    from sslam_core.models.factory import load_model
    from sslam_core.training.mixing import choose_windows, partial_mix, window_frames
    from sslam_core.training.objective import regression_targets
    from sslam_core.training.pretraining import scaled_window

    teacher = load_model(run, teacher=True)
    x = data["fsdd_x"][data["fsdd_train"]][:: max(1, int(data["fsdd_train"].sum()) // clips)][:clips]
    frames = x.shape[2]
    window = scaled_window(frames)
    starts = choose_windows(frames, window, 2, torch.Generator().manual_seed(0))
    mixed = partial_mix(x, starts, window)

    def targets(inputs):
        with torch.no_grad():
            ffn = teacher.contextualize(teacher.patchify(inputs), collect="ffn")[1]
        return regression_targets([f[:, 1:] for f in ffn], len(ffn))

    clean, mix = targets(x), targets(mixed)
    freq = clean.shape[1] // (frames // 16)
    outside = ~window_frames(frames, starts, window)[::16].repeat_interleave(freq)
    own = F.cosine_similarity(mix, clean, dim=-1)[:, outside].mean()
    partner = F.cosine_similarity(mix, torch.roll(clean, 1, dims=0), dim=-1)[:, outside].mean()
    unmixed = F.cosine_similarity(clean, torch.roll(clean, 1, dims=0), dim=-1)[:, outside].mean()
    utterance = clean.mean(dim=1)
    return {
        "cos_mix_own": round(float(own), 3),
        "cos_mix_partner": round(float(partner), 3),
        "cos_clean_partner": round(float(unmixed), 3),  # two different clips, no mixing: the baseline
        "utt_target_std_over_clips": round(float(utterance.std(dim=0).mean()), 4),
        "utt_target_norm": round(float(utterance.norm(dim=-1).mean() / utterance.shape[-1] ** 0.5), 4),
    }


def trajectory(run: Path) -> dict:
    """Loss terms (per masked patch) averaged over the first and the last quarter of the logged steps."""
    path = run / "metrics.jsonl"
    logs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if not logs:
        return {}
    quarter = max(1, len(logs) // 4)
    out = {}
    for key in ("patch", "cls", "srl"):
        if key in logs[0]:
            first = statistics.fmean(entry[key] for entry in logs[:quarter])
            last = statistics.fmean(entry[key] for entry in logs[-quarter:])
            out[key] = [round(first, 3), round(last, 3)]
    return out


def spread(values: list[float]) -> dict:
    """Mean, sample std (0 for one seed) and count."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), 2), "std": round(std, 2), "n": len(values)}


def table(cells: dict, pool: str) -> str:
    """One Markdown table of mean +- std per variant for the probes on `pool` ('-' where not measured)."""
    names = ("FSDD acc", "polydigits mAP", *(f"mAP {b}" for b in BINS), "digits in top k")
    lines = [f"| variant ({pool}) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for variant, cell in cells.items():
        row = [
            f"{cell[key]['mean']:.1f} ± {cell[key]['std']:.1f}" if key in cell else "-"
            for key in (f"{m}_{pool}" for m in METRICS)
        ]
        lines.append(f"| {variant} (n={cell[f'fsdd_acc_{pool}']['n']}) | " + " | ".join(row) + " |")
    return "\n".join(lines)


def why_table(per_run: dict, groups: dict) -> str:
    """Loss terms (first -> last quarter of the logs, mean over seeds) and teacher target statistics."""
    head = "| variant | patch | cls | srl | cos(mix, own clean) | cos(mix, partner) | cos(clean, partner) "
    head += "| utt. target std |"
    lines = [head, "|---" * 8 + "|"]
    for name, runs in groups.items():
        rows = [per_run[run.name] for run in runs]

        def avg(get, rows=rows):
            values = [v for v in (get(r) for r in rows) if v is not None]
            return statistics.fmean(values) if values else None

        cells = []
        for term in ("patch", "cls", "srl"):
            first = avg(lambda r, t=term: r["trajectory"].get(t, [None])[0])
            last = avg(lambda r, t=term: r["trajectory"].get(t, [None, None])[1])
            cells.append("-" if first is None else f"{first:.2f} -> {last:.2f}")
        for key in ("cos_mix_own", "cos_mix_partner", "cos_clean_partner", "utt_target_std_over_clips"):
            value = avg(lambda r, k=key: r["targets"].get(k))
            cells.append("-" if value is None else f"{value:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cached_inputs(work: Path, args) -> dict:
    """load_inputs, kept in WORK/inputs.pt (for these frame counts) for reruns."""
    import torch

    path = work / f"inputs_{args.target_length}_{args.poly_length}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    data = load_inputs(args.data_root, args.target_length, args.poly_length)
    torch.save(data, path)
    return data


def poly_audio(root: Path, work: Path, fsdd_audio: Path) -> Path:
    """Stage-2 data 'fsdd+poly': the FSDD training recordings plus the polydigits training mixtures."""
    path = work / "fsdd_poly_train_audio.txt"
    mixtures = sorted(str(f) for f in (root / "polydigits" / "train" / "audio").glob("*.wav"))
    path.write_text(fsdd_audio.read_text().rstrip("\n") + "\n" + "\n".join(mixtures) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    """Stage 1, then the stage-2 variants seed by seed, each probed and measured; tables and JSON."""
    p = learning_check.parser()
    p.description = __doc__.splitlines()[0]
    p.add_argument("--seeds", type=int, default=3, help="stage-2 seeds per variant (1, 2, ...) [3]")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated [{','.join(VARIANTS)}]")
    p.add_argument(
        "--probe", choices=("features", "commands"), default="features",
        help="features: converged scikit-learn probes on features computed here (fast; default); "
        "commands: `sslam finetune --linear` + `sslam eval` per encoder and pool",
    )  # fmt: skip
    p.add_argument(
        "--stage2-data", choices=("fsdd", "fsdd+poly"), default="fsdd",
        help="stage-2 pre-training audio: the FSDD training recordings, or those plus the polydigits "
        "training mixtures at --poly-length frames (clean windows scaled to it); runs named NAME_poly_sK",
    )  # fmt: skip
    p.add_argument(
        "--only-finished", action="store_true",
        help="train nothing more: probe and report the stage-2 runs already in --work",
    )  # fmt: skip
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")

    args.data_root = args.data_root.resolve()
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
    data = cached_inputs(work, args) if args.probe == "features" else None
    audio, extra, suffix = splits["audio"], {}, ""
    if args.stage2_data == "fsdd+poly":
        audio, suffix = poly_audio(args.data_root, work, splits["audio"]), "_poly"
        extra = {"target_length": args.poly_length}

    per_run: dict[str, dict] = {}

    def measure(run: Path) -> None:
        """Probe one encoder (cached in WORK/probes), its loss trajectory and teacher target statistics."""
        cache = work / "probes" / f"{run.name}.json"
        stamp = [(run / "model.safetensors").stat().st_mtime_ns, args.probe]
        if cache.exists() and json.loads(cache.read_text()).get("stamp") == stamp:
            result = json.loads(cache.read_text())["result"]
            if data is not None and "cos_clean_partner" not in result["targets"]:  # cached before it existed
                result["targets"] = target_statistics(run, data)
                cache.write_text(json.dumps({"stamp": stamp, "result": result}))
            per_run[run.name] = result
            return
        if data is None:
            scores = probes(run, splits, poly, work, args)
        else:
            scores = feature_probes(run, data)
        result = {**scores, "last_terms": last_terms(run), "trajectory": trajectory(run)}
        result["targets"] = target_statistics(run, data) if data is not None else {}
        cache.parent.mkdir(exist_ok=True)
        cache.write_text(json.dumps({"stamp": stamp, "result": result}))
        per_run[run.name] = result

    def report(runs: dict[str, list[Path]]) -> dict:
        """Cells (mean +- std over seeds) of the runs measured so far, written to WORK/ablation.json."""
        groups = {name: group for name, group in runs.items() if group}
        cells = {}
        for name, group in groups.items():
            scores = [per_run[run.name] for run in group]
            keys = [k for k in scores[0] if k.endswith(("_cls", "_mean"))]
            cells[name] = {key: spread([s[key] for s in scores]) for key in keys}
        timing["total_s"] = round(time.perf_counter() - start, 1)
        out = {
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "stage1_steps": steps1,
            "stage2_steps": steps2,
            "cells": cells,
            "runs": per_run,
            "seconds": timing,
            "work": str(work),
            "tables": {
                "cls": table(cells, "cls"),
                "mean": table(cells, "mean"),
                "why": why_table(per_run, groups),
            },  # fmt: skip
        }
        (work / "ablation.json").write_text(json.dumps(out, indent=2))
        return out

    measure(stage1)
    runs: dict[str, list[Path]] = {"stage1_only": [stage1]}
    lr = args.lr * args.stage2_lr_scale
    names = args.variants.split(",")
    runs |= {name + suffix: [] for name in names}
    for seed in range(1, args.seeds + 1):  # seed-major: a run cut short still leaves balanced cells
        for name in names:
            run = work / f"{name}{suffix}_s{seed}"
            if not args.only_finished:
                stage2(run, audio, stage1, {**VARIANTS[name], **extra}, steps2, seed, lr)
            if (run / "model.safetensors").exists():
                measure(run)
                runs[name + suffix].append(run)
                report(runs)  # partial results survive an interrupted run
    timing["stage2_s"] = round(time.perf_counter() - start - timing["stage1_s"], 1)
    out = report(runs)
    print("\n\n".join(out["tables"].values()) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "tables"}, indent=2))
