"""Stage-2 ablation switches against the official pre-training step (fixtures/pretraining): each changes
only the loss terms it should, by the numbers the official step gives; the defaults stay the release."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from test_objective import STEP, build, close, num
from test_pretrain import CLIPS, SMALL, report, sslam

from sslam_core.training.mixing import partial_mix, random_partners, roll_partners, window_frames
from sslam_core.training.objective import ObjectiveConfig, PretrainingModel
from sslam_core.training.pretraining import (
    PretrainConfigError,
    PretrainTask,
    objective_config,
    resolve_settings,
)

CLEAN = slice(0, 8)  # loss rows of the clean half: 4 clips x 2 clones (the mixed half follows)
MIXED = slice(8, 16)


@pytest.fixture(scope="module")
def official():
    """The official step's inputs, masks, windows, arrays and expected values."""
    with np.load(STEP / "step_fixture.npz") as f:
        arrays = {k: f[k] for k in f.files}
    expected = json.loads((STEP / "step_expected.json").read_text())
    source = torch.from_numpy(arrays["source"])
    masks = torch.from_numpy(arrays["mask"]).bool()
    return source, masks, arrays["idx"].tolist(), arrays, expected


def variant(official, stage: str = "sslam", windows: list[int] | None = None, **changes) -> dict:
    """Loss terms of the official step with some objective settings changed."""
    source, masks, release_windows, _, expected = official
    model = build(stage, expected)
    model.cfg = ObjectiveConfig(**{**model.cfg.__dict__, "utterance_target": None, **changes})
    with torch.no_grad():
        return model.train()(source, masks=masks, windows=windows or release_windows)


def test_release_defaults_are_unchanged():
    for stage, target in (("eat", "average"), ("sslam", "last")):
        cfg = objective_config(resolve_settings({"stage": stage}))
        assert (cfg.mix, cfg.mix_partner, cfg.utterance_target, cfg.srl_weight) == (
            "partial",
            "roll",
            target,
            2.0,
        )
    assert torch.equal(roll_partners(4), torch.tensor([3, 0, 1, 2]))  # clip i with clip i-1


def test_mix_none_is_the_clean_half_of_the_official_step(official):
    """No mixed half and no SRL term: the clean rows' frame terms as in the official step; the utterance
    term per row halves with the sample size (half the masked patches), and the loss is their ratio."""
    arrays, expected = official[3], official[4]["sslam_stage2"]
    out = variant(official, mix="none")
    assert "srl_loss" not in out and out["patch_loss_rows"].shape == (8,)
    assert int(out["sample_size"]) == expected["sample_size"] // 2 == 3280
    close(out["patch_loss_rows"], arrays["sslam_eat_patch_loss_rows"][CLEAN], rtol=1e-5)
    close(out["cls_loss_rows"], arrays["sslam_eat_cls_loss_rows"][CLEAN] / 2, rtol=1e-5)
    clean = (
        arrays["sslam_eat_patch_loss_rows"][CLEAN].sum() + arrays["sslam_eat_cls_loss_rows"][CLEAN].sum() / 2
    )
    assert num(out["loss"]) == pytest.approx(clean / 3280, rel=1e-5)
    # = stage 1's computation with stage 2's (last-block) utterance target, term for term
    eat_last = variant(official, stage="eat", utterance_target="last")
    for key in ("patch_loss", "cls_loss", "loss"):
        assert num(out[key]) == pytest.approx(num(eat_last[key]), rel=1e-6)
    assert num(out["loss"]) != pytest.approx(official[4]["eat_stage1"]["loss"], rel=1e-3)


def test_average_utterance_target_is_the_top_k_mean(official):
    """--utterance-target average: the CLS target is the mean patch of the top-K average (the official
    stage-1 target on the clean clips); only the utterance term changes."""
    source, masks, windows, arrays, expected = official
    model = build("sslam", expected)
    model.cfg = ObjectiveConfig(**{**model.cfg.__dict__, "utterance_target": "average"})
    mixed = partial_mix(source, windows, model.cfg.window)
    targets = model.targets(source, mixed, windows)
    close(targets.cls, targets.patch.mean(dim=1).numpy(), rtol=0, atol=0)
    close(targets.cls[:4], arrays["eat_y_cls_target"], atol=1e-4, rtol=0)
    assert not np.allclose(targets.cls[:4].numpy(), arrays["sslam_y_cls_target"][:4], atol=1e-2)

    out = variant(official, utterance_target="average")
    close(out["patch_loss_rows"], arrays["sslam_eat_patch_loss_rows"], rtol=1e-5)
    close(out["srl_loss_rows"], arrays["sslam_mix_patch_loss_rows"], rtol=1e-5)
    student = torch.from_numpy(arrays["sslam_student_cls"])
    rows = torch.arange(16) // 2
    cls_rows = 6560 * (student - targets.cls[rows]).pow(2).sum(-1) / math.sqrt(64)
    close(out["cls_loss_rows"], cls_rows.numpy(), rtol=1e-4)
    s = expected["sslam_stage2"]
    total = s["eat_patch_loss"] + s["mix_patch_loss"] + float(cls_rows.sum())
    assert num(out["loss"]) == pytest.approx(total / 6560, rel=1e-5)


def test_srl_weight_zero_drops_only_the_source_retention_term(official):
    arrays, expected = official[3], official[4]["sslam_stage2"]
    out = variant(official, srl_weight=0.0)
    assert num(out["srl_loss"]) == 0.0
    close(out["patch_loss_rows"], arrays["sslam_eat_patch_loss_rows"], rtol=1e-5)
    close(out["cls_loss_rows"], arrays["sslam_eat_cls_loss_rows"], rtol=1e-5)
    without = expected["loss"] - expected["mix_patch_loss"] / expected["sample_size"]
    assert num(out["loss"]) == pytest.approx(without, rel=1e-5)


def test_random_partner_changes_the_mixed_half_only(official):
    """A derangement instead of i-1: mixtures and SRL targets use clip partners[i]; the clean rows are the
    official ones, the mixed rows are not."""
    source, masks, windows, arrays, expected = official
    partners = torch.tensor([2, 3, 1, 0])
    model = build("sslam", expected)
    model.cfg = ObjectiveConfig(**{**model.cfg.__dict__, "mix_partner": "random"})
    mixed = partial_mix(source, windows, 240, partners)
    inside = window_frames(1024, windows, 240)[None, None, :, None]
    assert torch.equal(mixed, torch.where(inside, source, torch.maximum(source, source[partners])))
    targets = model.targets(source, mixed, windows, partners)
    own = arrays["sslam_y_patch_target"][:4]
    retained = own.copy()
    outside = ~window_frames(1024, windows, 240).view(-1, 16).all(dim=1)
    tokens = (outside.nonzero().flatten()[:, None] * 8 + torch.arange(8)).flatten().numpy()
    retained[:, tokens] = arrays["sslam_y_partner_dropped"][partners.numpy()]
    close(targets.srl, (own + retained) / 2, atol=1e-4, rtol=0)

    with torch.no_grad():
        out = model.train()(source, masks=masks, windows=windows, partners=partners)
    close(out["patch_loss_rows"][CLEAN], arrays["sslam_eat_patch_loss_rows"][CLEAN], rtol=1e-5)
    close(out["cls_loss_rows"][CLEAN], arrays["sslam_eat_cls_loss_rows"][CLEAN], rtol=1e-5)
    assert not np.allclose(out["patch_loss_rows"][MIXED].numpy(), arrays["sslam_eat_patch_loss_rows"][MIXED])
    assert not np.allclose(out["srl_loss_rows"].numpy(), arrays["sslam_mix_patch_loss_rows"])
    release = partial_mix(source, windows, 240, roll_partners(4))
    close(release, arrays["sslam_mixed"], rtol=0, atol=0)


def test_random_partners_are_seeded_derangements():
    seen = set()
    for seed in range(40):
        perm = random_partners(3, torch.Generator().manual_seed(seed))
        assert sorted(perm.tolist()) == [0, 1, 2] and not (perm == torch.arange(3)).any()
        seen.add(tuple(perm.tolist()))
    assert seen == {(1, 2, 0), (2, 0, 1)}
    a, b = (random_partners(12, torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="at least 2"):
        random_partners(1)


def test_one_window_changes_the_mixed_half_only(official):
    """--num-windows 1: the clean rows are the official ones; the mixture is clean only in [112, 352)."""
    arrays = official[3]
    out = variant(official, windows=[112], num_windows=1)
    close(out["patch_loss_rows"][CLEAN], arrays["sslam_eat_patch_loss_rows"][CLEAN], rtol=1e-5)
    close(out["cls_loss_rows"][CLEAN], arrays["sslam_eat_cls_loss_rows"][CLEAN], rtol=1e-5)
    assert not np.allclose(out["srl_loss_rows"].numpy(), arrays["sslam_mix_patch_loss_rows"])


def test_mix_none_draws_the_same_masks_and_windows_as_mixing():
    """A run with --mix none consumes the trainer's generator as the release does, so that at the same
    seed both see the same masks and windows; --mix-partner random draws its partners from it."""
    torch.manual_seed(0)
    from sslam_core.models.transformer import ModelConfig

    small = ModelConfig(embed_dim=32, depth=2, num_heads=2, max_length=64)
    x = torch.randn(3, 1, 128, 128)
    states = {}
    for mix, partner in (("partial", "roll"), ("none", "roll"), ("partial", "random")):
        cfg = ObjectiveConfig(stage="sslam", clone_batch=2, window=32, mix=mix, mix_partner=partner)
        g = torch.Generator().manual_seed(5)
        terms = PretrainTask(PretrainingModel(small, cfg), batches=None).loss({"source": x}, g)
        assert ("srl" in terms) == (mix == "partial") and math.isfinite(float(terms["loss"].detach()))
        states[mix, partner] = g.get_state()
    assert torch.equal(states["partial", "roll"], states["none", "roll"])
    assert not torch.equal(states["partial", "roll"], states["partial", "random"])


def test_settings_check_the_choices():
    s = resolve_settings(
        {"stage": "sslam", "mix": "none", "mix_partner": "random", "utterance_target": "average"}
    )
    cfg = objective_config(s)
    assert (cfg.mix, cfg.mix_partner, cfg.utterance_target) == ("none", "random", "average")
    assert resolve_settings({"stage": "sslam", "mix": "none", "batch_size": 1}).batch_size == 1
    for key, flag in (
        ("mix", "--mix"),
        ("mix_partner", "--mix-partner"),
        ("utterance_target", "--utterance-target"),
    ):
        with pytest.raises(PretrainConfigError, match=f"{flag} 'max': choose from"):
            resolve_settings({"stage": "sslam", key: "max"})


@pytest.mark.slow
def test_ablation_flags_round_trip_through_config_and_resume(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    flags = ["--mix", "none", "--utterance-target", "average", "--mix-partner", "random"]
    common = ["--stage", "sslam", "--model", "tiny", "--steps", "2", *SMALL]
    sslam("pretrain", *CLIPS, "-o", str(run), *common, *flags, "--stop-at", "1")
    assert report(sslam("pretrain", "-o", str(run), "--resume", "-q"))["steps"] == 2
    saved = json.loads((run / "config.json").read_text())["pretrain"]
    for entry in (saved["given"], saved["settings"], saved["objective"]):
        assert (entry["mix"], entry["utterance_target"], entry["mix_partner"]) == (
            "none",
            "average",
            "random",
        )
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and all("srl" not in x for x in lines)
    assert lines[-1]["loss"] == pytest.approx(lines[-1]["patch"] + lines[-1]["cls"], rel=1e-5)
    sslam("pretrain", "-o", str(other), "--config", str(run / "config.json"), "--steps", "0", "-q")
    objective = json.loads((other / "config.json").read_text())["pretrain"]["objective"]
    assert (objective["mix"], objective["utterance_target"], objective["mix_partner"]) == (
        "none",
        "average",
        "random",
    )
    bad = sslam("pretrain", *CLIPS, "-o", str(tmp_path / "bad"), *common, "--mix", "max", check=2)
    assert "--mix 'max': choose from partial, none" in bad.stderr and "Traceback" not in bad.stderr


def test_ablation_check_reuses_only_a_run_of_the_same_settings(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import ablation_check

    run = tmp_path / "sslam_s1"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"")
    given = {"stage": "sslam", "seed": 1, "lr": 1e-3 * 0.1, "srl_weight": 0.0, "init": "/w/eat_3200"}
    (run / "config.json").write_text(json.dumps({"steps": 800, "pretrain": {"given": given}}))
    wanted = {"stage": "sslam", "seed": 1, "lr": 1e-4, "srl_weight": 0.0, "init": "/w/eat_3200"}
    assert ablation_check.finished(run, 800, wanted)
    assert not ablation_check.finished(run, 1600, wanted)
    assert not ablation_check.finished(run, 800, {**wanted, "mix": "none"})
    assert not ablation_check.finished(run, 800, {**wanted, "seed": 2})
    cells = {"sslam": {f"{m}_cls": ablation_check.spread([40.0, 42.0, 44.0]) for m in ablation_check.METRICS}}
    assert cells["sslam"]["poly_mAP_cls"] == {"mean": 42.0, "std": 2.0, "n": 3}
    assert "| sslam (n=3) | 42.0 ± 2.0 |" in ablation_check.table(cells, "cls")


def test_ablation_check_measures_constituents_and_loss_trajectories(tmp_path):
    """The constituent probe's top-k share, the loss-term trajectory and the 'why' table, on known input."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import ablation_check

    targets = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1]], dtype=np.float32)
    scores = np.array([[0.9, 0.1, 0.0, 0.0], [0.8, 0.1, 0.7, 0.0], [0.1, 0.9, 0.8, 0.0]])
    # clip 0: its digit first (1/1); clip 1: one of two in its top 2; clip 2: two of three in its top 3
    assert ablation_check.constituent_recall(scores, targets) == pytest.approx((1 + 1 / 2 + 2 / 3) / 3)

    run = tmp_path / "sslam_s1"
    run.mkdir()
    logs = [{"step": 25 * (i + 1), "patch": 8.0 - i, "cls": 100.0, "srl": 2.0 * i} for i in range(8)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(entry) for entry in logs) + "\n")
    assert ablation_check.trajectory(run) == {"patch": [7.5, 1.5], "cls": [100.0, 100.0], "srl": [1.0, 13.0]}
    per_run = {run.name: {"trajectory": ablation_check.trajectory(run), "targets": {"cos_mix_own": 0.8}}}
    why = ablation_check.why_table(per_run, {"sslam": [run]})
    assert "| sslam | 7.50 -> 1.50 | 100.00 -> 100.00 | 1.00 -> 13.00 | 0.800 | - | - | - |" in why
    cells = {"eat": {f"{m}_cls": ablation_check.spread([50.0]) for m in ablation_check.METRICS[:-1]}}
    assert ablation_check.table(cells, "cls").endswith("| 50.0 ± 0.0 | - |")  # not measured: a dash
