"""The generic training loop: schedule, parameter groups, accumulation, exact resume, metrics, exports."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import DATA
from safetensors.torch import load_file, save_file
from torch import nn

from sslam_core.models.transformer import Classifier, Encoder, ModelConfig
from sslam_core.training.optim import build_optimizer, cosine_schedule, layer_id, param_groups, set_lr
from sslam_core.training.task import TrainingTask
from sslam_core.training.trainer import TrainConfig, train


class ToyTask(TrainingTask):
    """Regression on fixed random data; uses dropout (global RNG) and input noise (the loss generator)."""

    def __init__(self, batch_size=4, clips=24, dropout=0.1, noise=0.01, hidden=16, crash_at=None):
        torch.manual_seed(0)
        if hidden:
            layers = [nn.Linear(6, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)]
            self.model = nn.Sequential(*layers)
        else:
            self.model = nn.Linear(6, 1)
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(clips, 6, generator=g)
        self.y = self.x @ torch.linspace(-1, 1, 6)[:, None] + 0.5
        self.batch_size, self.noise, self.crash_at = batch_size, noise, crash_at
        self.ema_calls = 0

    def batches(self, epoch_seed, rank, world_size, start_position):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(epoch_seed))
        mine = order[rank::world_size]
        for i in range(start_position, len(mine) // self.batch_size):
            idx = mine[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]

    def loss(self, batch, generator):
        x, y = batch
        if self.noise:
            x = x + self.noise * torch.randn(x.shape, generator=generator)
        mse = ((self.model(x) - y) ** 2).mean()
        return {"loss": mse, "mse": mse.detach(), "sample_size": x.shape[0]}

    def after_step(self, step):
        if step == self.crash_at:
            raise KeyboardInterrupt("simulated crash")
        return {"ema_decay": 0.999}

    def export(self, path):
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(path))


def config(tmp_path, **kw):
    base = dict(steps=8, batch_size=4, lr=1e-2, warmup=2, save_every=3, log_every=1, out_dir=str(tmp_path))
    return TrainConfig(**{**base, "progress": False, **kw})


def test_cosine_schedule_values():
    lrs = [cosine_schedule(s, warmup=4, total=12, peak_lr=1.0, min_lr=0.1) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0
    assert lrs[8] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[12] == pytest.approx(0.1) and lrs[13] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))


def test_param_groups_weight_decay_rules():
    enc = Encoder(ModelConfig(embed_dim=32, depth=2, num_heads=2, max_length=8))
    groups = param_groups(enc, weight_decay=0.05)
    decay = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert decay["cls_token"] == 0.0 and "pos_embed" not in decay  # pos_embed is a fixed buffer
    assert decay["patch_embed.bias"] == 0.0 and decay["pre_norm.weight"] == 0.0
    assert decay["blocks.1.norm2.weight"] == 0.0 and decay["blocks.0.attn.qkv.bias"] == 0.0
    assert decay["patch_embed.weight"] == 0.05 and decay["blocks.0.mlp.fc1.weight"] == 0.05
    assert len(decay) == sum(1 for _ in enc.parameters())


def test_layer_decay_scales_and_set_lr():
    clf = Classifier(ModelConfig(embed_dim=32, depth=2, num_heads=2, max_length=8, num_classes=3))
    names = ("encoder.cls_token", "encoder.blocks.1.norm1.bias", "head.weight")
    assert [layer_id(n, 2) for n in names] == [0, 2, 3]
    opt = build_optimizer(clf, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in opt.param_groups for n in g["param_names"]}
    assert scale["head.weight"] == 1.0 and scale["fc_norm.bias"] == 1.0
    assert scale["encoder.blocks.1.attn.proj.weight"] == 0.5
    assert scale["encoder.blocks.0.attn.proj.weight"] == 0.25
    assert scale["encoder.patch_embed.weight"] == scale["encoder.pre_norm.weight"] == 0.125
    set_lr(opt, 2e-3)
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    assert lrs["encoder.cls_token"] == pytest.approx(2.5e-4) and lrs["head.bias"] == pytest.approx(2e-3)


def test_gradient_accumulation_matches_big_batch(tmp_path):
    kw = dict(steps=3, warmup=0, clip_grad=0.0, weight_decay=0.0)
    small = ToyTask(batch_size=2, hidden=0, noise=0.0)
    big = ToyTask(batch_size=4, hidden=0, noise=0.0)
    train(small, config(tmp_path / "a", batch_size=2, grad_accum=2, **kw))
    train(big, config(tmp_path / "b", batch_size=4, **kw))
    for a, b in zip(small.model.parameters(), big.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(small.model.weight, ToyTask(hidden=0).model.weight)  # it did train


def test_resume_is_bit_identical(tmp_path):
    whole = ToyTask()
    train(whole, config(tmp_path / "whole", grad_accum=2))
    split = ToyTask()
    train(split, config(tmp_path / "split", grad_accum=2), stop_at=4)  # mid-epoch
    resumed = ToyTask()  # a fresh process: same init, then everything else from state.pt
    summary = train(resumed, config(tmp_path / "split", grad_accum=2), resume=True)
    assert summary["steps"] == 8 and summary["steps_this_run"] == 4
    expected, got = whole.model.state_dict(), resumed.model.state_dict()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    exported = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert torch.equal(exported["3.weight"], whole.model[3].weight)


def test_state_loads_weights_only_and_metrics_not_duplicated(tmp_path):
    cfg = config(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(ToyTask(crash_at=5), cfg)  # last checkpoint at step 3, metrics written through step 4
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["step"] == 3 and state["position"] == 3 and len(state["rng"]) == 1
    train(ToyTask(), cfg, resume=True)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 9))
    assert {"loss", "mse", "lr", "grad_norm", "ema_decay", "clips_per_s"} <= set(lines[-1])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["steps"] == 8 and saved["world_size"] == 1


def test_zero_steps_exports_initial_model(tmp_path):
    task = ToyTask()
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    summary = train(task, config(tmp_path, steps=0))
    exported = load_file(str(tmp_path / "model.safetensors"))
    assert summary["steps"] == 0 and all(torch.equal(exported[k], v) for k, v in before.items())
    assert not (tmp_path / "state.pt").exists()


def test_evaluate_keeps_best_and_numbered_checkpoints(tmp_path):
    task = ToyTask()
    scores = iter([0.2, 0.9, 0.5])  # saves at steps 3, 6, 8
    task.evaluate = lambda: {"metric": next(scores)}
    summary = train(task, config(tmp_path, keep_last=2))
    assert summary["best"] == {"step": 6, "metric": "metric", "value": 0.9}
    assert (tmp_path / "model-best.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "model-00000006.safetensors",
        "model-00000008.safetensors",
    ]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(s) for s in lines if "eval/metric" in s]
    assert [r["step"] for r in evals] == [3, 6, 8]


def test_bad_precision_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="precision"):
        train(ToyTask(), config(tmp_path, precision="fp8"))


def test_a_task_is_a_training_task(tmp_path):
    class Loose:  # the loop calls the optional members too: a task derives from TrainingTask
        model = nn.Linear(2, 1)

    with pytest.raises(TypeError, match="TrainingTask"):
        train(Loose(), config(tmp_path))
    assert not any(tmp_path.iterdir())


class TinyPretrainTask(TrainingTask):
    """The real objective and data path at toy size: EAT stage 1 on two-second real clips."""

    def __init__(self, frames=256):

        from sslam_core.data.training_clips import AudioBatches, WaveformDataset
        from sslam_core.training.objective import ObjectiveConfig, PretrainingModel

        torch.manual_seed(0)
        self.cfg = ModelConfig(embed_dim=32, depth=2, num_heads=2, max_length=64)
        objective = ObjectiveConfig(clone_batch=2, average_top_k=2, decoder_layers=2)
        self.model = PretrainingModel(self.cfg, objective)
        data = DATA
        clips = sorted(str(p) for p in (data / "polydigits" / "audio").glob("*.wav")) + [
            str(data / "real_32k.wav")
        ]
        self.loader = AudioBatches(WaveformDataset(clips, target_length=frames), batch_size=2)

    def batches(self, epoch_seed, rank, world_size, start_position):
        return self.loader(epoch_seed, rank, world_size, start_position)

    def loss(self, batch, generator):
        out = self.model(batch["source"], generator)
        return {k: v for k, v in out.items() if k in ("loss", "patch_loss", "cls_loss", "sample_size")}

    def after_step(self, step):
        return {"ema_decay": self.model.ema_step(step)}

    def export(self, path):
        from sslam_core.models.layouts.native import save_checkpoint

        m = self.model
        save_checkpoint(
            path, self.cfg, m.student.state_dict(), m.teacher.state_dict(), m.decoder.state_dict()
        )


@pytest.mark.slow
def test_pretraining_objective_trains_and_resumes_exactly(tmp_path):
    from sslam_core.models.loading import read_checkpoint

    kw = dict(steps=4, batch_size=2, lr=1e-3, warmup=1, save_every=2, log_every=1)
    whole = TinyPretrainTask()
    summary = train(whole, config(tmp_path / "whole", **kw))
    assert math.isfinite(summary["last"]["loss"]) and summary["last"]["ema_decay"] == pytest.approx(
        0.9998, abs=1e-6
    )
    train(TinyPretrainTask(), config(tmp_path / "split", **kw), stop_at=1)
    resumed = TinyPretrainTask()
    train(resumed, config(tmp_path / "split", **kw), resume=True)
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    ckpt = read_checkpoint(tmp_path / "split" / "model.safetensors")
    assert ckpt.teacher is not None and ckpt.decoder is not None
    assert torch.equal(ckpt.teacher["blocks.1.mlp.fc2.weight"], whole.model.teacher.blocks[1].mlp.fc2.weight)
