"""Where does an encoder's digit information sit? Converged logistic-regression probes, layer by layer.

    python scripts/probe_diagnostics.py DATA_ROOT RUN_OR_CKPT... [--target-length 128] [--random tiny]

For each encoder (and a seeded random init of `--random` size): FSDD test accuracy (official split) of
a scikit-learn logistic regression on standardised frozen features, per block, for the CLS row and
for the mean patch token, and for the EAT utterance-loss target (the mean over patches of the
teacher's regression targets) computed by the project's objective code. It separates "the probe
did not converge" from "the features do not hold the information", which `sslam finetune --linear`
alone cannot. Needs scikit-learn (a test dependency).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from sslam_core.audio.decode import load_audio
from sslam_core.audio.frontend import prepare_input
from sslam_core.models.factory import load_model
from sslam_core.models.transformer import Encoder, preset
from sslam_core.training.objective import regression_targets


def fsdd_inputs(root: Path, frames: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    rows = list(csv.DictReader(open(root / "fsdd" / "metadata.csv")))
    waves = [load_audio(root / "fsdd" / "recordings" / r["filename"]) for r in rows]
    x = torch.cat(
        [prepare_input(waves[i : i + 256], target_length=frames) for i in range(0, len(waves), 256)]
    )
    return x, np.array([int(r["digit"]) for r in rows]), np.array([r["split"] == "train" for r in rows])


def accuracy(features: torch.Tensor, y: np.ndarray, train: np.ndarray) -> float:
    f = features.double().numpy()
    scaler = StandardScaler().fit(f[train])
    clf = LogisticRegression(max_iter=3000).fit(scaler.transform(f[train]), y[train])
    return round(100 * clf.score(scaler.transform(f[~train]), y[~train]), 1)


@torch.no_grad()
def diagnose(encoder: Encoder, x: torch.Tensor, y: np.ndarray, train: np.ndarray) -> dict:
    hidden, ffn = [], []
    for i in range(0, len(x), 256):
        tokens = encoder.patchify(x[i : i + 256])
        hidden.append(encoder.contextualize(tokens, collect="hidden")[1])
        ffn.append([f[:, 1:] for f in encoder.contextualize(tokens, collect="ffn")[1]])
    layers = [torch.cat(h) for h in zip(*hidden, strict=True)]
    target = regression_targets([torch.cat(f) for f in zip(*ffn, strict=True)], len(layers)).mean(dim=1)
    return {
        "cls_per_block": [accuracy(h[:, 0], y, train) for h in layers],
        "mean_patch_per_block": [accuracy(h[:, 1:].mean(dim=1), y, train) for h in layers],
        "eat_cls_target": accuracy(target, y, train),
    }


def main(argv: list[str] | None = None) -> None:
    """Probe every encoder's blocks and the random baseline; one JSON object."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_root", type=Path)
    p.add_argument("encoders", nargs="*", help="run folders or checkpoints")
    p.add_argument("--target-length", type=int, default=128)
    p.add_argument("--random", default="tiny", help="preset of the random-init baseline ('' for none)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    x, y, train = fsdd_inputs(args.data_root, args.target_length)
    models = {}
    if args.random:
        torch.manual_seed(args.seed)
        models[f"random {args.random}"] = Encoder(preset(args.random)).eval()
    for path in args.encoders:
        models[path] = load_model(path)
        models[f"{path} (teacher)"] = load_model(path, teacher=True)
    print(json.dumps({name: diagnose(m, x, y, train) for name, m in models.items()}, indent=2))
