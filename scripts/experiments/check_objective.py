"""Recompute one official pre-training step (EAT stage 1 and SSLAM stage 2) with the library's objective.

Usage: python scripts/check_objective.py FIXTURE_DIR   (e.g. tests/fixtures/pretraining)

Reads FIXTURE_DIR/step_fixture.npz (inputs, masks, window starts) and step_expected.json (config and
the official numbers; `config.weights` is relative to FIXTURE_DIR's parent), and prints one JSON
object with our loss terms under the official names, next to which the expected values can be read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from sslam_core.training.objective import ObjectiveConfig, PretrainingModel


class FixtureError(ValueError):
    """The fixture folder is missing a file or holds inconsistent arrays."""


def load_fixture(folder: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The step arrays and the expected-values JSON of a fixture folder."""
    arrays_path, expected_path = folder / "step_fixture.npz", folder / "step_expected.json"
    for path in (arrays_path, expected_path):
        if not path.is_file():
            raise FixtureError(f"{path}: not found")
    with np.load(arrays_path) as f:
        arrays = {k: f[k] for k in f.files}
    return arrays, json.loads(expected_path.read_text())


def run_stage(stage: str, arrays: dict[str, np.ndarray], config: dict, weights: Path) -> dict[str, float]:
    """Loss terms of one step of `stage` on the fixture inputs, with the stored masks and windows."""
    source = torch.from_numpy(arrays["source"]).float()
    masks = torch.from_numpy(arrays["mask"]).bool()
    if masks.shape[0] % source.shape[0]:
        raise FixtureError(
            f"mask rows ({masks.shape[0]}) are not a multiple of the batch ({source.shape[0]})"
        )
    objective = ObjectiveConfig(
        stage=stage,
        clone_batch=masks.shape[0] // source.shape[0],
        mask_noise_std=float(config.get("mask_noise_std", 0.01)),
        average_top_k=int(config.get("average_top_k_layers", 12)),
        cls_loss=float(config.get("cls_loss", 1.0)),
        window=int(config.get("no_mix_region_size", 240)),
        num_windows=len(arrays["idx"]),
    )
    model = PretrainingModel.from_checkpoint(weights, objective).train()
    with torch.no_grad():
        out = model(source, masks=masks, windows=[int(i) for i in arrays["idx"]])
    terms = {"sample_size": int(out["sample_size"])}
    if stage == "sslam":
        terms |= {
            "eat_patch_loss": float(out["patch_loss"]),
            "mix_patch_loss": float(out["srl_loss"]),
            "eat_cls_loss": float(out["cls_loss"]),
        }
    else:
        terms |= {"patch_loss_IMAGE_regression": float(out["patch_loss"]), "cls_loss": float(out["cls_loss"])}
    terms["loss"] = float(out["loss"])
    return terms


def main(argv: list[str] | None = None) -> int:
    """Both stages on the fixture; prints the JSON object, returns the exit status (2: bad usage)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    folder = Path(argv[0])
    arrays, expected = load_fixture(folder)
    config = expected["config"]
    weights = folder.parent / config["weights"]
    result = {
        "sslam_stage2": run_stage("sslam", arrays, config, weights),
        "eat_stage1": run_stage("eat", arrays, config, weights),
    }
    print(json.dumps(result, indent=1))
    return 0
