"""Fine-tuning: augmentation properties, weighted sampling, the task through the trainer, CLI round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DATA, tiny_config
from typer.testing import CliRunner

from sslam_core.data.augment import (
    WeightedEpochs,
    mixup,
    sample_weights,
    spec_augment,
    time_roll,
    weighted_draw,
)
from sslam_core.data.datasets import read_labelled
from sslam_core.data.training_clips import WaveformDataset
from sslam_core.models.factory import load_model
from sslam_core.models.layouts.native import save_checkpoint
from sslam_core.models.loading import read_checkpoint
from sslam_core.training.finetuning import (
    FinetuneConfig,
    FinetuneTask,
    build_classifier,
    classification_loss,
    finetune,
    recipe,
)
from sslam_core.training.linear_probe import LinearProbeTask
from sslam_core.training.optim import build_optimizer

TINY = tiny_config()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def digits():
    """12 FSDD recordings, 3 digits (multi-class)."""
    return read_labelled(DATA / "fsdd_mini")


@pytest.fixture(scope="module")
def poly():
    """3 polydigits mixtures (multi-label; the 4th listed clip has no audio)."""
    return read_labelled(DATA / "polydigits")


def quick(**kw):
    base = dict(target_length=64, batch_size=4, workers=0, eval_batch_size=8)
    return FinetuneConfig(**{**base, **kw})


def run(task, out, steps, stop_at=None, **kw):
    kw = {"progress": False, "log_every": 1, "save_every": steps, **kw}
    return finetune(task, recipe(task.config.linear, steps, task.multilabel, out, **kw), stop_at=stop_at)


# ---------------------------------------------------------------------------------------------------------
# Augmentation


def test_mixup_mixes_sources_and_targets_with_one_weight():
    x, y = torch.randn(6, 1, 32, 128), torch.eye(6)
    mixed, target, lam = mixup(x, y, gen(3), alpha=0.8, prob=1.0)
    assert 0.0 < lam < 1.0
    assert torch.allclose(target.sum(dim=1), torch.ones(6))
    for i in range(6):
        others = [j for j in range(6) if j != i and target[i, j] > 0]
        partner = others[0] if others else i
        assert torch.allclose(mixed[i], lam * x[i] + (1 - lam) * x[partner], atol=1e-6)
    again = mixup(x, y, gen(3), alpha=0.8, prob=1.0)
    assert torch.equal(again[0], mixed) and again[2] == lam
    same, same_y, one = mixup(x, y, gen(3), prob=0.0)
    assert same is x and same_y is y and one == 1.0


def test_spec_augment_zeroes_one_band_each_way_within_20_percent():
    x = torch.randn(8, 1, 100, 128) + 10.0
    out = spec_augment(x, gen(1))
    for clip in range(8):
        zero = out[clip, 0] == 0
        kept = ~zero
        assert torch.equal(out[clip, 0][kept], x[clip, 0][kept])
        cols = torch.nonzero(zero.all(dim=0)).flatten().tolist()
        rows = torch.nonzero(zero.all(dim=1)).flatten().tolist()
        assert len(cols) <= int(0.2 * 128) and len(rows) <= int(0.2 * 100)
        for band in (cols, rows):
            assert band == list(range(band[0], band[0] + len(band))) if band else True
        expected = torch.zeros_like(zero)
        expected[:, cols] = True
        expected[rows, :] = True
        assert torch.equal(zero, expected)


def test_time_roll_is_a_circular_shift_per_clip():
    x = torch.randn(5, 1, 48, 128)
    out = time_roll(x, gen(2))
    shifts = []
    for clip in range(5):
        match = [s for s in range(48) if torch.equal(out[clip], torch.roll(x[clip], s, dims=1))]
        assert len(match) == 1
        shifts.append(match[0])
    assert len(set(shifts)) > 1


def test_weighted_sampling_balances_rare_labels():
    targets = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [1, 1], [0, 0]], dtype=np.float32)
    weights = sample_weights(targets)
    a, b = 1000 / (4 + 0.01), 1000 / (2 + 0.01)  # the AudioSet weight files' formula: 1000 / (count + 0.01)
    np.testing.assert_allclose(weights, [a, a, a, b, a + b, 0.0])
    drawn = weighted_draw(weights, 40000, seed=7)
    freq = np.bincount(drawn, minlength=6) / len(drawn)
    np.testing.assert_allclose(freq, weights / weights.sum(), atol=0.01)
    assert np.array_equal(drawn, weighted_draw(weights, 40000, seed=7))
    # label counts go from 4:2 (uniform draws) to (1/4 + 1/4 + 1/4 + 3/4) : (1/2 + 3/4) = 1.2
    per_class = targets[drawn].sum(axis=0)
    assert per_class[0] / per_class[1] == pytest.approx(1.2, rel=0.03)
    with pytest.raises(ValueError, match="weights"):
        weighted_draw(np.zeros(3), 5, 0)


def test_weighted_epochs_draws_per_epoch_seed(poly):
    paths = [e.path for e in poly.examples]
    base = WaveformDataset(paths, 64, True, list(poly.targets()))
    view = WeightedEpochs(base, [0.0, 1.0, 0.0])
    assert len(view) == 3 and view[(2, 11)]["index"] == 1
    assert view.draws(5).tolist() == [1, 1, 1]


def test_losses_bce_and_smoothed_ce():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    target = torch.tensor([[1.0, 0.0, 0.0]])
    bce = classification_loss(logits, target, True, 0.1)
    assert bce.item() == pytest.approx(torch.nn.functional.binary_cross_entropy_with_logits(logits, target))
    ce = classification_loss(logits, target, False, 0.1)
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0]), label_smoothing=0.1)
    assert ce.item() == pytest.approx(expected.item(), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Model init and optimiser


def test_layer_decay_learning_rates(digits, pretrained):
    task = FinetuneTask(digits, None, pretrained, quick())
    config = recipe(False, 10, False, "unused", lr=1e-3)
    assert (config.layer_decay, config.min_lr, config.warmup, config.betas) == (0.65, 1e-6, 1, (0.9, 0.95))
    assert task.model.cfg.drop_path == 0.1 and task.norm == (-5.0, 4.0)
    opt = build_optimizer(task.model, config.lr, config.weight_decay, config.layer_decay, config.betas)
    lrs = {name: g["lr"] for g in opt.param_groups for name in g["param_names"]}
    assert lrs["head.weight"] == pytest.approx(1e-3) and lrs["fc_norm.bias"] == pytest.approx(1e-3)
    assert lrs["encoder.blocks.1.mlp.fc1.weight"] == pytest.approx(1e-3 * 0.65)
    assert lrs["encoder.blocks.0.attn.qkv.weight"] == pytest.approx(1e-3 * 0.65**2)
    assert lrs["encoder.patch_embed.weight"] == pytest.approx(1e-3 * 0.65**3)


def test_classifier_init_from_pretrained_and_finetuned(tmp_path, digits, pretrained):
    ckpt = read_checkpoint(pretrained)
    model, how = build_classifier(ckpt, digits.classes)
    assert how.startswith("pre-trained") and model.head.out_features == 3
    assert torch.equal(model.encoder.blocks[1].mlp.fc2.weight, ckpt.state["blocks.1.mlp.fc2.weight"])
    save_checkpoint(tmp_path / "ft.safetensors", model.cfg, model.state_dict(), labels=digits.classes)
    same, how = build_classifier(read_checkpoint(tmp_path / "ft.safetensors"), digits.classes, seed=5)
    assert how.endswith("continued") and torch.equal(same.head.weight, model.head.weight)
    other, how = build_classifier(read_checkpoint(tmp_path / "ft.safetensors"), [("a", "a"), ("b", "b")])
    assert how.endswith("new head") and other.head.out_features == 2
    assert torch.equal(other.encoder.patch_embed.weight, model.encoder.patch_embed.weight)


# ---------------------------------------------------------------------------------------------------------
# Training through the shared trainer


@pytest.mark.slow
def test_multiclass_loss_decreases_on_tiny_overfit_set(tmp_path, digits, pretrained):
    config = quick(
        batch_size=12, drop_path=0.0, specaugment=False, roll=False, label_smoothing=0.0, mixup=False
    )
    task = FinetuneTask(digits, digits, pretrained, config)
    summary = run(task, tmp_path / "run", 14, lr=6e-3, layer_decay=1.0, warmup=0)
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert losses[0] > 1.0 and losses[-1] < 0.6 * losses[0]
    assert summary["best"]["metric"] == "accuracy" and summary["best"]["value"] > 0.6
    assert (tmp_path / "run" / "model-best.safetensors").exists()


def test_multilabel_finetune_resumes_exactly_and_exports(tmp_path, poly, pretrained):
    def task():
        return FinetuneTask(poly, poly, pretrained, quick(batch_size=2), seed=3)

    assert task().augment.mixup and task().weighted
    whole = task()
    run(whole, tmp_path / "whole", 4, save_every=2, lr=1e-3, seed=3)
    split = task()
    run(split, tmp_path / "split", 4, save_every=2, lr=1e-3, seed=3, stop_at=2)
    resumed = task()
    config = recipe(False, 4, True, tmp_path / "split", save_every=2, lr=1e-3, seed=3, progress=False)
    finetune(resumed, config, resume=True)
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value.cpu(), resumed.model.state_dict()[name].cpu()), name
    ckpt = read_checkpoint(tmp_path / "split")
    assert ckpt.labels == poly.classes and ckpt.extra["multilabel"] is True
    assert ckpt.extra["target_length"] == 64 and ckpt.normalization == (-5.0, 4.0)
    model = load_model(tmp_path / "split")
    assert model.multilabel is True and model.cfg.num_classes == len(poly.classes)


def test_linear_probe_trains_only_the_head(tmp_path, digits, pretrained):
    task = LinearProbeTask(digits, digits, pretrained, quick(linear=True, batch_size=6))
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert trainable == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    summary = run(task, tmp_path / "probe", 6)
    after = task.model.state_dict()
    for name, value in before.items():
        if name.startswith("encoder."):
            assert torch.equal(value, after[name]), name
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert summary["steps"] == 6 and read_checkpoint(tmp_path / "probe").extra["linear"] is True


@pytest.mark.slow
def test_linear_probe_state_holds_the_head_only_and_resumes_exactly(tmp_path, digits, pretrained):
    def task():
        return LinearProbeTask(digits, digits, pretrained, quick(linear=True, batch_size=6))

    whole = task()
    run(whole, tmp_path / "whole", 6, save_every=3)
    split = task()
    run(split, tmp_path / "split", 6, save_every=3, stop_at=3)
    saved = torch.load(tmp_path / "split" / "state.pt", weights_only=True)["model"]
    assert saved and not any(k.startswith("encoder.") for k in saved)
    resumed = task()
    finetune(resumed, recipe(True, 6, False, tmp_path / "split", save_every=3, progress=False), resume=True)
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_probe_standardises_features_and_folds_that_into_the_exported_head(tmp_path, digits, pretrained):
    task = LinearProbeTask(digits, digits, pretrained, quick(linear=True, batch_size=6))
    run(task, tmp_path / "probe", 6, lr=1e-2)
    feats, _ = task.cached_features("train")
    mean, std = task.probe_statistics()
    z = torch.nn.functional.layer_norm(feats, feats.shape[-1:], eps=task.model.fc_norm.eps)
    assert torch.allclose(((z - mean) / std).mean(0), torch.zeros(z.shape[1]), atol=1e-4)
    assert torch.allclose(((z - mean) / std).std(0), torch.ones(z.shape[1]), atol=1e-4)
    exported = load_model(tmp_path / "probe")  # a plain fc_norm + Linear
    with torch.no_grad():
        assert torch.allclose(exported.classify(feats), task.probe_logits(feats), atol=1e-4)


def test_fold_standardization_is_exact():
    from sslam_core.training.linear_probe import fold_standardization

    g = gen(1)
    w, b = torch.randn(5, 8, generator=g), torch.randn(5, generator=g)
    mean, std = torch.randn(8, generator=g), torch.rand(8, generator=g) + 0.01
    z = torch.randn(3, 8, generator=g)
    fw, fb = fold_standardization(w, b, mean, std)
    assert torch.allclose(z @ fw.T + fb, ((z - mean) / std) @ w.T + b, atol=1e-4)


def test_cli_result_tags_with_its_own_labels(tmp_path, pretrained):
    from sslam_cli.main import app

    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["finetune", "--data", str(DATA / "fsdd_mini"), "--checkpoint", str(pretrained), "-o", str(out)]
    args += ["--steps", "2", "--batch-size", "4", "--target-length", "64", "--workers", "0"]
    args += ["--valid-fraction", "0.25", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["multilabel"] is False and config["valid_clips"] == 3 and config["layer_decay"] == 0.65
    tagged = runner.invoke(
        app, ["tag", "--checkpoint", str(out), "--format", "json", "--window", "0.64", "-k", "3",
              str(DATA / "fsdd_mini" / "1_george_0.wav")],
    )  # fmt: skip
    assert tagged.exit_code == 0, tagged.output
    labels = json.loads(tagged.stdout.splitlines()[0])["labels"]
    assert {x["label"] for x in labels} == {"0", "1", "2"}
    assert sum(x["score"] for x in labels) == pytest.approx(1.0, abs=1e-4)  # softmax: multi-class head
    bad = runner.invoke(app, ["finetune", "--data", str(DATA / "nowhere"), "--model", "tiny", "-o", str(out)])
    assert bad.exit_code == 2 and "holds a run" in bad.output  # refused before reading anything
    bad = runner.invoke(
        app, ["finetune", "--data", str(DATA / "nowhere"), "--model", "tiny", "-o", str(tmp_path / "new")]
    )
    assert bad.exit_code == 2 and "nowhere" in bad.output and not (tmp_path / "new").exists()


def test_config_file_sets_the_flags_and_a_run_config_repeats_the_run(tmp_path, pretrained):
    """`--config FILE`: flag names as keys (`-` or `_`), explicit flags win; a run's config.json gives the
    settings that run was given, so the repeat trains the same weights; unknown keys are one error line."""
    from sslam_cli.main import app

    runner = CliRunner()
    data = ["--data", str(DATA / "fsdd_mini")]
    settings = tmp_path / "ft.json"
    settings.write_text(json.dumps({
        "checkpoint": str(pretrained), "steps": 5, "batch-size": 4, "target_length": 64, "workers": 0,
        "device": "cpu", "valid-fraction": 0.25, "seed": 1, "lr": 1e-3, "no_such": None,
    }))  # fmt: skip
    r = runner.invoke(app, ["finetune", *data, "-o", str(tmp_path / "x"), "--config", str(settings)])
    assert r.exit_code == 2 and r.stderr == f"error: {settings}: unknown settings no_such\n"
    assert not (tmp_path / "x").exists()
    settings.write_text(settings.read_text().replace(', "no_such": null', ""))
    a = tmp_path / "a"
    r = runner.invoke(app, ["finetune", *data, "-o", str(a), "--config", str(settings), "--steps", "2", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.splitlines()[-1])["steps"] == 2  # the flag wins over the file's 5
    config = json.loads((a / "config.json").read_text())
    assert (config["batch_size"], config["lr"], config["seed"], config["valid_clips"]) == (4, 1e-3, 1, 3)
    assert config["settings"]["steps"] == 2 and config["settings"]["checkpoint"] == str(pretrained)

    b = tmp_path / "b"
    r = runner.invoke(app, ["finetune", *data, "-o", str(b), "--config", str(a / "config.json"), "-q"])
    assert r.exit_code == 0, r.output
    again = json.loads((b / "config.json").read_text())
    assert {k: v for k, v in again["settings"].items() if k != "output"} == {
        k: v for k, v in config["settings"].items() if k != "output"
    }
    first, second = read_checkpoint(a), read_checkpoint(b)
    assert all(torch.equal(first.state[k], second.state[k]) for k in first.state)

    settings.write_text(json.dumps({"steps": "2"}))
    r = runner.invoke(app, ["finetune", *data, "-o", str(tmp_path / "x"), "--config", str(settings)])
    assert r.exit_code == 2 and r.stderr == f"error: {settings}: steps must be int | None, got '2'\n"


def test_cli_defaults_are_the_library_settings_defaults():
    import inspect

    from sslam_cli.finetune import finetune as command
    from sslam_core.training.finetune_run import SETTING_NAMES, FinetuneSettings

    params, defaults = inspect.signature(command).parameters, FinetuneSettings()
    for name in SETTING_NAMES:  # every setting is a flag of the same name, with the same default
        if params[name].default is not inspect.Parameter.empty:
            assert params[name].default == getattr(defaults, name), name


def test_each_task_takes_its_own_kind_of_config(digits, pretrained):
    from sslam_core.training.finetune_run import classifier_task
    from sslam_core.training.finetuning import FinetuneError

    with pytest.raises(FinetuneError, match="a linear probe is a LinearProbeTask"):
        FinetuneTask(digits, None, pretrained, quick(linear=True))
    with pytest.raises(FinetuneError, match="full fine-tuning a FinetuneTask"):
        LinearProbeTask(digits, None, pretrained, quick())
    assert isinstance(classifier_task(digits, None, pretrained, quick(linear=True)), LinearProbeTask)
    assert type(classifier_task(digits, None, pretrained, quick())) is FinetuneTask


def test_default_steps_give_small_linear_probes_enough_updates():
    from sslam_core.training.finetuning import LINEAR_MIN_STEPS, default_steps

    assert default_steps(False, 2700, 48) == 30 * (2700 // 48)
    assert default_steps(True, 2700, 48) == LINEAR_MIN_STEPS  # 50 epochs would be 2800 updates
    assert default_steps(True, 2700, 48, epochs=5) == 5 * (2700 // 48)  # an explicit --epochs wins
    assert default_steps(True, 2_000_000, 48) == 50 * (2_000_000 // 48)


@pytest.mark.slow
def test_full_finetune_resumes_exactly_mid_epoch(tmp_path, digits, pretrained):
    """Drop-path draws from the global RNG: the data loader must not draw from it at a resumed epoch."""

    def task():
        return FinetuneTask(digits, None, pretrained, quick(batch_size=4), seed=2)  # 3 batches an epoch

    whole = task()
    run(whole, tmp_path / "whole", 7, save_every=7, seed=2)
    run(task(), tmp_path / "split", 7, save_every=7, seed=2, stop_at=4)
    resumed = task()
    finetune(resumed, recipe(False, 7, False, tmp_path / "split", save_every=7, seed=2, progress=False), True)
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
