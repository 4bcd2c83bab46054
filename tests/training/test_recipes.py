"""The official fine-tuning protocols as recipes: resolved values against the official files, the
augmentation semantics they need, the per-step linear evaluation, and a short run of every recipe."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import DATA, FIXTURES, TINY_PRETRAIN, sslam, tiny_config

from sslam_core.audio.constants import NORMALIZATION
from sslam_core.data.augment import (
    add_noise,
    read_weights,
    roll_waves,
    sample_weights,
    spec_augment,
    weighted_draw,
)
from sslam_core.data.datasets import read_labelled
from sslam_core.training.finetuning import FinetuneConfig, finetune, recipe
from sslam_core.training.linear_probe import AugmentedLinearProbeTask
from sslam_core.training.recipes import RECIPES

OFFICIAL = json.loads((FIXTURES / "recipes" / "official_recipes.json").read_text())
TINY = tiny_config()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dry_run(*args) -> dict:
    return json.loads(sslam("finetune", *args, "--dry-run").stdout)


def official(name: str) -> dict:
    """The official values of a recipe (SSLAM's own AS-2M run where it differs from EAT's script)."""
    values = {k: v["value"] for k, v in OFFICIAL[name].items()}
    return {**values, **values.get("sslam_override", {})}


# ---------------------------------------------------------------------------------------------------------
# Recipes resolve to the official values


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_resolves_to_the_official_values(name):
    got, want = dry_run("--recipe", name), official(name)
    assert got["recipe"] == name
    same = ["batch_size", "lr", "steps", "warmup", "target_length", "specaugment_ratio", "noise", "roll",
            "weighted_sampling", "seed", "drop_path", "weight_decay", "min_lr", "linear", "pool",
            "multilabel", "precision", "label_smoothing"]  # fmt: skip
    for key in same:
        assert got[key] == pytest.approx(want[key]), key
    assert got["layer_decay"] == pytest.approx(want["layer_decay"])
    assert tuple(want["betas"]) == recipe(got["linear"], 10, True, "unused").betas  # Adam (0.9, 0.95)
    assert got["mixup"] == (want["mixup"] > 0)
    if want["mixup"] > 0:
        assert (got["mixup_alpha"], got["mixup_prob"]) == (want["mixup"], want["mixup_prob"])
    assert NORMALIZATION[got["norm"]] == (want["norm_mean"], want["norm_std"])
    if want["weighted_sampling"]:
        assert got["clips_per_epoch"] == want["clips_per_epoch"] == 200_000
    else:
        assert got["clips_per_epoch"] is None  # every clip once per epoch
    assert got["save_every"] == "epoch" and want["valid_every"] == 1  # validated after every epoch
    assert got["probe"] == ("augmented" if name == "spass-linear" else "cached")
    assert got["cross_validate"] == (name == "esc50")
    # Speech Commands: BCE on the mixed one-hot targets (the script's smoothing is then unused)
    assert got["loss"] == ("bce" if name == "spcv2" else None)


def test_flags_win_over_a_recipe_and_a_shorter_run_keeps_its_warmup_share(tmp_path):
    got = dry_run("--recipe", "as20k", "--steps", "50", "--lr", "1e-4", "--no-roll")
    assert (got["steps"], got["warmup"], got["lr"], got["roll"], got["batch_size"]) == (
        50,
        5,
        1e-4,
        False,
        48,
    )
    assert dry_run("--recipe", "spass-linear", "--steps", "30")["warmup"] == 0  # no warm-up stays none
    assert dry_run("--recipe", "as20k", "--epochs", "2")["steps"] is None  # decided by the data
    one_fold = dry_run("--recipe", "esc50", "--valid-folds", "2", "--folds", "1,3,4,5")
    assert one_fold["cross_validate"] is False and one_fold["valid_folds"] == "2"
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"recipe": "spcv2", "batch-size": 8}))
    from_file = dry_run("--config", config, "--target-length", "96")
    assert (from_file["recipe"], from_file["batch_size"], from_file["target_length"], from_file["lr"]) == (
        "spcv2", 8, 96, 2e-4)  # fmt: skip
    r = sslam("finetune", "--recipe", "as3m", "--dry-run", code=2)
    assert "unknown recipe 'as3m'; choose as2m, as20k, esc50, spcv2, spass-linear, spass-finetune" in r.stderr
    r = sslam("finetune", "--recipe", "esc50", "--valid", "x.csv", "--dry-run", code=2)
    assert "--cross-validate validates on each fold in turn" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]  # a dry run writes nothing


# ---------------------------------------------------------------------------------------------------------
# Augmentation semantics


@pytest.mark.parametrize(("ratio", "frames"), [(0.2, 1024), (0.4, 512), (0.2, 128)])
def test_specaugment_masks_are_at_most_the_ratio_of_bins_and_frames(ratio, frames):
    x = torch.randn(400, 1, frames, 128) + 10.0
    out = spec_augment(x, gen(1), ratio)
    zero = out[:, 0] == 0
    cols = zero.all(dim=1).sum(dim=1).double()  # masked mel bins per clip
    rows = zero.all(dim=2).sum(dim=1).double()  # masked frames per clip
    assert cols.max() <= math.floor(128 * ratio) and rows.max() <= math.floor(frames * ratio)
    # width = floor(u * ratio * size), u uniform: mean ratio * size / 2 - 1/2
    assert cols.mean() == pytest.approx(128 * ratio / 2 - 0.5, abs=0.08 * 128 * ratio)
    assert rows.mean() == pytest.approx(frames * ratio / 2 - 0.5, abs=0.08 * frames * ratio)
    kept = ~zero
    assert torch.equal(out[:, 0][kept], x[:, 0][kept])


def test_speech_commands_noise_is_uniform_below_a_tenth_then_shifted_ten_frames():
    T, F = 128, 128
    ramp = torch.arange(T, dtype=torch.float32)[None, None, :, None].expand(200, 1, T, F) * 10.0
    out = add_noise(ramp, gen(2))
    shifts, levels = [], []
    for clip in range(200):
        found = [
            s for s in range(-10, 11) if (out[clip] - torch.roll(ramp[clip], s, dims=1)).abs().max() < 0.1
        ]
        assert len(found) == 1
        shifts.append(found[0])
        noise = out[clip] - torch.roll(ramp[clip], found[0], dims=1)
        assert noise.min() >= 0 and noise.max() < 0.1
        levels.append(float(noise.max()))
    assert min(shifts) == -10 and max(shifts) == 9  # randint(-10, 10): -10 to 9
    assert min(levels) < 0.02 and max(levels) > 0.08  # the level itself is uniform in [0, 0.1)


def test_waveform_roll_is_circular_with_a_gain_around_one():
    waves = [torch.randn(1600) for _ in range(300)]
    out = roll_waves(waves, gen(3))
    gains = []
    for wave, rolled in zip(waves, out, strict=True):
        shift = int(
            torch.argmax(torch.stack([(torch.roll(wave, s) * rolled).sum() for s in range(0, 1600, 1)]))
        )
        gain = float(rolled.norm() / wave.norm())
        assert torch.allclose(rolled, torch.roll(wave, shift) * gain, atol=1e-5)
        gains.append(gain)
    gains = np.array(gains)
    assert 0.5 <= gains.min() and gains.max() <= 1.5
    assert gains.mean() == pytest.approx(1.0, abs=0.02) and gains.std() == pytest.approx(0.109, abs=0.02)


def test_weight_formula_and_distinct_draws_per_epoch():
    targets = np.array([[1, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]])
    label = 1000 / (np.array([3, 1, 1]) + 0.01)
    np.testing.assert_allclose(
        sample_weights(targets), [label[0], label[0], label[0] + label[1], label[2], 0.0]
    )
    w = sample_weights(targets)
    drawn = weighted_draw(w, 4, seed=5, replace=False)
    assert sorted(drawn.tolist()) == [0, 1, 2, 3]  # distinct, never the clip without labels
    assert np.array_equal(drawn, weighted_draw(w, 4, seed=5, replace=False))
    with pytest.raises(ValueError, match="cannot draw 5 distinct clips: 4 have a sampling weight above 0"):
        weighted_draw(w, 5, seed=5, replace=False)
    # draws without replacement favour the heavy clips: clip 2 (two rare labels) is in nearly every pair
    counts = np.bincount(
        np.concatenate([weighted_draw(w, 2, s, replace=False) for s in range(2000)]), minlength=5
    )
    assert counts[2] > counts[3] > counts[0] and counts[4] == 0


def test_weights_command_and_finetune_read_the_same_file(tmp_path):
    out = tmp_path / "w.csv"
    r = sslam("weights", DATA / "polydigits", "-o", out)
    assert "wrote 3 weight(s)" in r.stderr
    rows = list(csv.reader(out.open()))
    data = read_labelled(DATA / "polydigits", multilabel=True)
    assert rows[0] == ["path", "weight"] and [row[0] for row in rows[1:]] == [e.path for e in data.examples]
    np.testing.assert_allclose([float(row[1]) for row in rows[1:]], sample_weights(data.targets()), rtol=1e-8)
    np.testing.assert_allclose(
        read_weights(str(out), [e.path for e in data.examples]), sample_weights(data.targets())
    )
    sslam("weights", DATA / "polydigits", "-o", out, code=2)  # no silent replacement
    sslam("weights", DATA / "polydigits", "-o", out, "--plain", "--overwrite")
    assert len(out.read_text().split()) == 3
    with pytest.raises(ValueError, match="3 weights for 2 clips"):
        read_weights(str(out), ["a", "b"])


# ---------------------------------------------------------------------------------------------------------
# The official linear evaluation: frozen encoder on every augmented batch


def test_augmented_linear_probe_trains_the_head_on_changing_inputs_of_a_frozen_encoder(tmp_path, pretrained):
    data = read_labelled(DATA / "fsdd_mini")
    config = FinetuneConfig(target_length=64, batch_size=4, workers=0, linear=True, probe="augmented",
                            mixup=True, specaugment_ratio=0.4)  # fmt: skip
    task = AugmentedLinearProbeTask(data, data, pretrained, config, seed=0)
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    seen = []
    task.model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    batch = next(task.batches(0, 0, 1, 0))
    task.model.train()
    task.logits_and_targets(batch, gen(1))
    task.logits_and_targets(batch, gen(2))
    assert not torch.equal(seen[0], seen[1])  # the same clips, augmented anew at each step
    assert not torch.equal(seen[0], batch["source"])
    summary = finetune(task, recipe(True, 6, False, tmp_path, progress=False, save_every=6, lr=1e-2))
    after = task.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert (
        summary["steps"] == 6
        and json.loads((tmp_path / "config.json").read_text())["task"] == "linear-augmented"
    )


# ---------------------------------------------------------------------------------------------------------
# Every recipe trains and evaluates end to end at small size


def esc50_like(root):
    """fsdd_mini as an ESC-50 folder: meta/esc50.csv with three folds."""
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for i, f in enumerate(sorted((DATA / "fsdd_mini").glob("*.wav"))):
        shutil.copy(f, root / "audio" / f.name)
        rows.append(f"{f.name},{i % 3 + 1},{f.name[0]},digit{f.name[0]},False,{f.stem},A")
    (root / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    return root


SMALL = ["--steps", "3", "--batch-size", "4", "--target-length", "64", "--device", "cpu", "--workers", "0"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in RECIPES if n != "esc50"])
def test_each_recipe_runs_end_to_end_with_fewer_steps(tmp_path, name):
    data = DATA / ("fsdd_mini" if name == "spcv2" else "polydigits")
    out = tmp_path / "run"
    r = sslam("finetune", "--recipe", name, "--data", data, "--valid", data, "-c", TINY_PRETRAIN, "-o", out,
              *SMALL, "-q")  # fmt: skip
    report = json.loads(r.stdout)
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["recipe"] == name and config["settings"]["steps"] == 3
    assert (
        config["settings"]["lr"] == RECIPES[name]["lr"]
        and config["settings"]["norm"] == RECIPES[name]["norm"]
    )
    assert report["task"] == {"spass-linear": "linear-augmented"}.get(name, "finetune")
    assert report["best"]["metric"] == ("accuracy" if name == "spcv2" else "mAP")
    assert (out / "model-best.safetensors").exists()
    sslam("tag", data / ("0_george_0.wav" if name == "spcv2" else "audio"), "-c", out, "--device", "cpu")


@pytest.mark.slow
def test_esc50_recipe_runs_every_fold_and_reports_mean_and_spread(tmp_path):
    data, out = esc50_like(tmp_path / "esc"), tmp_path / "run"
    r = sslam("finetune", "--recipe", "esc50", "--data", data, "-c", TINY_PRETRAIN, "-o", out, *SMALL)
    report = json.loads(r.stdout)
    assert [f["fold"] for f in report["folds"]] == [1, 2, 3] and report["metric"] == "accuracy"
    values = [f["best"] for f in report["folds"]]
    assert report["mean"] == pytest.approx(np.mean(values)) and report["std"] == pytest.approx(
        np.std(values, ddof=1)
    )
    assert json.loads((out / "cross_validation.json").read_text())["mean"] == report["mean"]
    for fold in (1, 2, 3):
        settings = json.loads((out / f"fold{fold}" / "config.json").read_text())["settings"]
        assert settings["valid_folds"] == [fold] and fold not in settings["folds"]
    assert "fold 1 " in r.stderr and "mean" in r.stderr
    again = sslam(
        "finetune", "--recipe", "esc50", "--data", data, "-c", TINY_PRETRAIN, "-o", out, *SMALL, code=2
    )
    assert "--overwrite" in again.stderr  # a finished cross-validation is not replaced silently
    resumed = sslam("finetune", "--recipe", "esc50", "--data", data, "-c", TINY_PRETRAIN, "-o", out, *SMALL,
                    "--resume")  # fmt: skip
    assert json.loads(resumed.stdout)["mean"] == report["mean"]
    r = sslam("finetune", "--recipe", "esc50", "--data", DATA / "fsdd_mini", "-c", TINY_PRETRAIN, "-o",
              tmp_path / "nofolds", *SMALL, code=2)  # fmt: skip
    assert "cross-validation needs a set whose clips all have a fold" in r.stderr
