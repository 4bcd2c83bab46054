"""The pre-training objective against one step of the official EAT / SSLAM code (fixtures/pretraining)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import FIXTURES

from sslam_core.models.loading import read_checkpoint
from sslam_core.models.transformer import ModelConfig
from sslam_core.training.mixing import choose_windows, mix_batch, partial_mix, window_candidates
from sslam_core.training.objective import ObjectiveConfig, PretrainingModel, ema_decay_at

STEP = FIXTURES / "pretraining"
TINY = FIXTURES / "checkpoints" / "tiny_pretrain.pt"


def load_tiny_pretrain() -> tuple[ModelConfig, dict, dict, dict]:
    """Config, student, teacher and decoder weights of the tiny official checkpoint, in our names."""
    ckpt = read_checkpoint(TINY)
    return ckpt.config, ckpt.state, ckpt.teacher, ckpt.decoder


@pytest.fixture(scope="module")
def step() -> tuple[dict, dict]:
    with np.load(STEP / "step_fixture.npz") as f:
        arrays = {k: f[k] for k in f.files}
    return arrays, json.loads((STEP / "step_expected.json").read_text())


def build(stage: str, expected: dict) -> PretrainingModel:
    cfg, student, teacher, decoder = load_tiny_pretrain()
    c = expected["config"]
    objective = ObjectiveConfig(
        stage=stage,
        clone_batch=c["clone_batch"],
        mask_noise_std=c["mask_noise_std"],
        average_top_k=c["average_top_k_layers"],
        window=c["no_mix_region_size"],
    )
    return PretrainingModel.from_weights(cfg, student, teacher, decoder, objective)


@pytest.fixture(scope="module")
def sslam(step):
    arrays, expected = step
    model = build("sslam", expected).train()
    source = torch.from_numpy(arrays["source"])
    masks = torch.from_numpy(arrays["mask"]).bool()
    windows = arrays["idx"].tolist()
    mixed = partial_mix(source, windows, model.cfg.window)
    return model, model.targets(source, mixed, windows), model(source, masks=masks, windows=windows), mixed


@pytest.fixture(scope="module")
def eat(step):
    arrays, expected = step
    model = build("eat", expected).train()
    source = torch.from_numpy(arrays["source"])
    masks = torch.from_numpy(arrays["mask"]).bool()
    return model, model.targets(source), model(source, masks=masks)


def num(t: torch.Tensor) -> float:
    return float(t.detach())


def close(actual: torch.Tensor, expected: np.ndarray, **tol) -> None:
    np.testing.assert_allclose(actual.detach().numpy(), expected, **tol)


def test_teacher_holds_the_ema_weights_and_student_the_fp16_ones(eat):
    model = eat[0]
    cfg, student, teacher, _ = load_tiny_pretrain()
    assert torch.equal(model.teacher.blocks[0].mlp.fc1.weight, teacher["blocks.0.mlp.fc1.weight"].float())
    assert torch.equal(model.student.blocks[0].mlp.fc1.weight, student["blocks.0.mlp.fc1.weight"].float())
    assert not model.teacher.training and model.student.training


def test_from_checkpoint_loads_student_teacher_and_decoder(eat):
    model = PretrainingModel.from_checkpoint(TINY, ObjectiveConfig(stage="sslam"))
    assert model.cfg.clone_batch == 8
    for ours, ref in [
        (model.student, eat[0].student),
        (model.teacher, eat[0].teacher),
        (model.decoder, eat[0].decoder),
    ]:
        assert all(
            torch.equal(a, b)
            for a, b in zip(ours.state_dict().values(), ref.state_dict().values(), strict=True)
        )


def test_sslam_mixed_batch_is_exact(step, sslam):
    close(sslam[3], step[0]["sslam_mixed"], rtol=0, atol=0)


def test_sslam_targets(step, sslam):
    arrays, targets = step[0], sslam[1]
    close(targets.patch, arrays["sslam_y_patch_target"], atol=1e-4, rtol=0)
    close(targets.cls, arrays["sslam_y_cls_target"], atol=1e-4, rtol=0)
    close(targets.partner_dropped, arrays["sslam_y_partner_dropped"], atol=1e-4, rtol=0)
    close(targets.srl, arrays["sslam_y_srl"], atol=1e-4, rtol=0)


def test_sslam_losses(step, sslam):
    arrays, expected = step[0], step[1]["sslam_stage2"]
    out = sslam[2]
    close(out["student_cls"], arrays["sslam_student_cls"], atol=1e-4, rtol=0)
    close(out["patch_loss_rows"], arrays["sslam_eat_patch_loss_rows"], rtol=1e-5)
    close(out["srl_loss_rows"], arrays["sslam_mix_patch_loss_rows"], rtol=1e-5)
    close(out["cls_loss_rows"], arrays["sslam_eat_cls_loss_rows"], rtol=1e-5)
    assert int(out["sample_size"]) == expected["sample_size"]
    assert num(out["patch_loss"]) == pytest.approx(expected["eat_patch_loss"], rel=1e-5)
    assert num(out["srl_loss"]) == pytest.approx(expected["mix_patch_loss"], rel=1e-5)
    assert num(out["cls_loss"]) == pytest.approx(expected["eat_cls_loss"], rel=1e-5)
    assert num(out["loss"]) == pytest.approx(expected["loss"], rel=1e-5)


def test_eat_targets_and_losses(step, eat):
    arrays, expected = step[0], step[1]["eat_stage1"]
    _, targets, out = eat
    close(targets.patch, arrays["sslam_y_patch_target"][:4], atol=1e-4, rtol=0)
    close(targets.cls, arrays["eat_y_cls_target"], atol=1e-4, rtol=0)
    close(out["student_cls"], arrays["eat_student_cls"], atol=1e-4, rtol=0)
    close(out["patch_loss_rows"], arrays["eat_patch_loss_rows"], rtol=1e-5)
    close(out["cls_loss_rows"], arrays["eat_cls_loss_rows"], rtol=1e-5)
    assert "srl_loss" not in out
    assert int(out["sample_size"]) == expected["sample_size"]
    assert num(out["patch_loss"]) == pytest.approx(expected["patch_loss_IMAGE_regression"], rel=1e-5)
    assert num(out["cls_loss"]) == pytest.approx(expected["cls_loss"], rel=1e-5)
    assert num(out["loss"]) == pytest.approx(expected["loss"], rel=1e-5)


def test_official_window_candidates(step):
    checks = step[1]["checks"]["idx_calls(value, first_candidate, last_candidate, n_candidates)"]
    first = window_candidates(1024, 0, 1, 240, first=True)
    second = window_candidates(1024, 112 + 240, 0, 240, first=False)
    for (value, lo, hi, n), options in zip(checks, [first, second], strict=True):
        assert value in options and (options[0], options[-1], len(options)) == (lo, hi, n)


@pytest.mark.parametrize("frames", [496, 512, 1024, 2048])
def test_windows_fit_any_length(frames):
    g = torch.Generator().manual_seed(frames)
    for _ in range(50):
        starts = choose_windows(frames, 240, 2, g)
        assert all(s % 16 == 0 for s in starts)
        assert starts[1] >= starts[0] + 240 and starts[1] + 240 < frames - 1


def test_windows_reject_short_clips():
    with pytest.raises(ValueError, match="do not fit"):
        choose_windows(480, 240, 2)
    with pytest.raises(ValueError, match="multiples of 16"):
        choose_windows(1024, 250, 2)


def test_mix_batch_keeps_windows_clean():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 512, 128, generator=g)
    mixed, starts = mix_batch(x, window=64, count=3, generator=g)
    partner = torch.roll(x, 1, 0)
    inside = torch.zeros(512, dtype=torch.bool)
    for s in starts:
        inside[s : s + 64] = True
    assert torch.equal(mixed[:, :, inside], x[:, :, inside])
    assert torch.equal(mixed[:, :, ~inside], torch.maximum(x, partner)[:, :, ~inside])


def test_ema_schedule():
    cfg = ObjectiveConfig()
    assert ema_decay_at(0, cfg) == pytest.approx(0.9998)
    assert ema_decay_at(50_000, cfg) == pytest.approx((0.9998 + 0.99999) / 2)
    assert ema_decay_at(100_000, cfg) == ema_decay_at(10**7, cfg) == 0.99999


def small_model(stage: str, **kw) -> PretrainingModel:
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=32, depth=3, num_heads=2, max_length=64)
    return PretrainingModel(cfg, ObjectiveConfig(stage=stage, clone_batch=3, window=64, **kw))


def test_ema_step_moves_teacher_towards_student():
    model = small_model("eat")
    with torch.no_grad():
        model.student.blocks[0].mlp.fc1.weight.add_(1.0)
    before = model.teacher.blocks[0].mlp.fc1.weight.clone()
    target = model.student.blocks[0].mlp.fc1.weight
    decay = model.ema_step(0)
    expected = decay * before + (1 - decay) * target
    assert torch.allclose(model.teacher.blocks[0].mlp.fc1.weight, expected)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["eat", "sslam"])
def test_gradients_reach_student_and_decoder_only(stage):
    model = small_model(stage).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 320, 128, generator=g)
    out = model(x, generator=g)
    rows = 2 * 3 * (2 if stage == "sslam" else 1)
    n = 320 // 16 * 8
    assert int(out["sample_size"]) == rows * (n - int(n * (1 - 0.8)))
    assert math.isfinite(num(out["loss"]))
    out["loss"].backward()
    assert model.student.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0
    assert model.student.patch_embed.weight.grad.abs().sum() > 0
    assert model.decoder.blocks[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())


def test_state_dict_names_match_the_release_decoder():
    keys = set(small_model("eat").decoder.state_dict())
    assert {"blocks.0.0.weight", "blocks.5.0.bias", "proj.weight", "proj.bias"} <= keys
    assert len(keys) == 14
