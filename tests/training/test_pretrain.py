"""`sslam pretrain` end to end: settings, init from the official checkpoint, exports, torchrun DDP, resume."""

from __future__ import annotations

import json
import subprocess

import h5py
import numpy as np
import pytest
import torch
from conftest import CHECKPOINTS as FIX
from conftest import DATA, sslam_process
from safetensors.torch import load_file

from sslam_core.models.loading import read_checkpoint
from sslam_core.training.pretraining import (
    PretrainConfigError,
    read_config_file,
    resolve_settings,
    weights_checksum,
)

OFFICIAL = str(FIX / "tiny_pretrain.pt")  # fairseq layout, student + EMA teacher + decoder (dim 64, 2 blocks)
CLIPS = [
    str(DATA / "polydigits" / "audio"),
    str(DATA / "real_32k.wav"),
    str(DATA / "robin.ogg"),
    str(DATA / "typing_stereo_48k.flac"),
    str(DATA / "acoustic_scene_2s.mp3"),
]
SMALL = ["--batch-size", "2", "--target-length", "256", "--clone-batch", "2", "--workers", "0"]


def sslam(*args: str, check: int | None = 0, torchrun: int = 0):
    """`sslam ARGS` as a process (under torchrun with `torchrun` ranks), one intra-op thread each."""
    return sslam_process(*args, check=check, torchrun=torchrun, env={"OMP_NUM_THREADS": "1"}, timeout=300)


SMALL += ["--device", "cpu", "--log-every", "1", "-q"]


def report(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_stage_defaults_scale_with_steps_and_overrides_win(tmp_path):
    eat = resolve_settings({"stage": "eat"})
    assert (eat.steps, eat.lr, eat.warmup, eat.clone_batch, eat.ema_anneal_end_step) == (
        400_000, 5e-4, 53_000, 16, 100_000,
    )  # fmt: skip
    assert (eat.window, eat.num_windows, eat.ema_decay, eat.ema_end_decay) == (240, 2, 0.9998, 0.99999)
    sslam2 = resolve_settings({"stage": "sslam"})
    assert (sslam2.steps, sslam2.lr, sslam2.warmup, sslam2.clone_batch) == (200_000, 5e-5, 25_000, 8)
    short = resolve_settings({"stage": "sslam", "steps": 2000, "target_length": 256})
    assert (short.warmup, short.ema_anneal_end_step, short.window) == (250, 1000, 64)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"stage": "sslam", "clone-batch": 4, "lr": 1e-4, "steps": 100}))
    s = resolve_settings({"stage": "eat"}, read_config_file(path), {"lr": 3e-4, "warmup": None})
    assert (s.stage, s.clone_batch, s.lr, s.steps, s.warmup) == ("sslam", 4, 3e-4, 100, 12)
    path.write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(PretrainConfigError, match="cfg.json: unknown settings learning_rate"):
        read_config_file(path)
    with pytest.raises(PretrainConfigError, match="multiple of 16"):
        resolve_settings({"target_length": 250})


def test_objective_hyper_parameters_are_settings_with_release_defaults():
    from sslam_core.training.pretraining import objective_config

    release = objective_config(resolve_settings({"stage": "sslam"}))
    assert (release.mask_prob, release.mask_length, release.average_top_k) == (0.8, 5, 12)
    assert (release.cls_loss, release.srl_weight) == (1.0, 2.0)
    s = {"mask_prob": 0.6, "mask_length": 3, "average_top_k": 4, "cls_weight": 0.5, "srl_weight": 1.0}
    changed = objective_config(resolve_settings({"stage": "sslam"}, s))
    assert (changed.mask_prob, changed.mask_length, changed.average_top_k) == (0.6, 3, 4)
    assert (changed.cls_loss, changed.srl_weight) == (0.5, 1.0)
    with pytest.raises(PretrainConfigError, match="--mask-prob must be in"):
        resolve_settings({"mask_prob": 1.0})


@pytest.mark.slow
def test_init_from_official_checkpoint_loads_teacher_and_exports(tmp_path):
    """--steps 0 writes the initial model: the official student, EMA teacher and decoder, bit for bit;
    the run folder then works in `sslam extract` (official outputs) and `sslam convert` (fairseq layout)."""
    run = tmp_path / "run"
    sslam("pretrain", str(DATA / "real_32k.wav"), "-o", str(run), "--stage", "sslam", "--init", OFFICIAL,
          "--steps", "0", "--batch-size", "2", "-q")  # fmt: skip
    official, ours = read_checkpoint(OFFICIAL), read_checkpoint(run)
    for mine, theirs in ((ours.state, official.state), (ours.teacher, official.teacher)):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert all(torch.equal(ours.decoder[k], official.decoder[k]) for k in official.decoder)
    saved = json.loads((run / "config.json").read_text())["pretrain"]
    assert saved["settings"]["lr"] == 5e-5 and saved["objective"]["clone_batch"] == 8

    expected = np.load(FIX / "expected.npz")
    out = tmp_path / "f.h5"
    sslam("extract", str(DATA / "real_32k.wav"), "-o", str(out), "-c", str(run), "--teacher")
    with h5py.File(out) as h5:
        np.testing.assert_allclose(h5["clip"][0], expected["ema_all_1024"][1, 0], atol=1e-4)
    sslam("convert", str(run), str(tmp_path / "export.pt"))
    back = read_checkpoint(tmp_path / "export.pt")
    assert back.layout == "fairseq" and back.teacher is not None
    assert all(torch.equal(back.state[k], ours.state[k]) for k in ours.state)


@pytest.mark.slow
def test_eat_from_scratch_trains_skips_bad_files_and_continues_as_sslam(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio")
    eat = tmp_path / "eat"
    proc = sslam("pretrain", *CLIPS, str(bad), "-o", str(eat), "--stage", "eat", "--model", "tiny",
                 "--steps", "3", "--save-every", "3", *SMALL, check=1)  # fmt: skip
    r = report(proc)  # the clips read; the unreadable one is one skipped: line, and the status is 1
    assert r["steps"] == 3 and r["clips"] == 7 and r["unreadable_skipped"] == 1 and r["ranks_in_sync"]
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 1 and "broken.wav" in skipped[0] and "Warning" not in proc.stderr
    lines = [json.loads(s) for s in (eat / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert {"loss", "patch", "cls", "lr", "ema_decay", "clips_per_s", "grad_norm"} <= set(lines[-1])
    assert lines[-1]["loss"] == pytest.approx(lines[-1]["patch"] + lines[-1]["cls"], rel=1e-5)
    ckpt = read_checkpoint(eat)
    assert ckpt.config.embed_dim == 192 and ckpt.extra["pretraining"] == {"stage": "eat", "step": 3}

    stage2 = tmp_path / "sslam"
    proc = sslam("pretrain", *CLIPS, "-o", str(stage2), "--stage", "sslam", "--init", str(eat),
                 "--steps", "2", *SMALL)  # fmt: skip
    lines = [json.loads(s) for s in (stage2 / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["loss"] == pytest.approx(lines[0]["patch"] + lines[0]["cls"] + lines[0]["srl"], rel=1e-5)
    assert lines[0]["lr"] == pytest.approx(5e-5)  # fresh schedule: warm-up rounds to 0 of 2 steps
    assert read_checkpoint(stage2).config.embed_dim == 192

    bad_window = sslam("pretrain", *CLIPS, "-o", str(tmp_path / "x"), "--stage", "sslam", "--model", "tiny",
                       "--window", "240", "--steps", "1", *SMALL, check=2)  # fmt: skip
    assert "do not fit" in bad_window.stderr and "Traceback" not in bad_window.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_with_one_process_trains_through_ddp_like_n(tmp_path):
    """`torchrun --nproc_per_node 1` joins a process group (gloo here, NCCL on a GPU) and trains
    through DDP as N processes would, so a one-GPU trial exercises the N-GPU path; the weights equal
    a plain run's. Before, one process under torchrun skipped the group and DDP altogether."""
    common = ["--stage", "sslam", "--init", OFFICIAL, "--steps", "2", *SMALL]
    plain = report(sslam("pretrain", *CLIPS, "-o", str(tmp_path / "plain"), *common))
    launched = report(sslam("pretrain", *CLIPS, "-o", str(tmp_path / "one"), *common, torchrun=1))
    assert launched["rank_checksums"] == plain["rank_checksums"]
    groups = [json.loads((tmp_path / n / "config.json").read_text()) for n in ("plain", "one")]
    assert [(g["world_size"], g["process_group"]) for g in groups] == [(1, None), (1, "gloo")]


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_cpu_ranks_stay_in_sync_and_resume_exactly(tmp_path):
    common = ["--stage", "sslam", "--init", OFFICIAL, "--steps", "4", "--save-every", "2", *SMALL]
    whole = report(sslam("pretrain", *CLIPS, "-o", str(tmp_path / "whole"), *common, torchrun=2))
    first = report(sslam("pretrain", *CLIPS, "-o", str(tmp_path / "split"), *common, "--stop-at", "2",
                         torchrun=2))  # fmt: skip
    resumed = report(sslam("pretrain", "-o", str(tmp_path / "split"), "--resume", *common, torchrun=2))
    for r in (whole, first, resumed):
        assert r["ranks_in_sync"] and len(r["rank_checksums"]) == 2
    assert (first["steps"], resumed["steps"], resumed["steps_this_run"]) == (2, 4, 2)
    assert resumed["rank_checksums"] == whole["rank_checksums"] != first["rank_checksums"]
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert saved["world_size"] == 2 and saved["pretrain"]["clips"] == 7
    from sslam_core.training.objective import PretrainingModel

    model = PretrainingModel.from_checkpoint(tmp_path / "whole", None)
    assert weights_checksum(model) == whole["rank_checksums"][0]
