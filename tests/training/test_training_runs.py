"""Run folders of the shared trainer: refusing to erase a run, no half-made folders, write errors as one
line with the last good state kept, signals saving at a step boundary, schedule changes on resume."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA, ROOT
from test_trainer import ToyTask, config  # not tests.test_trainer: dcase_util installs a "tests" package
from typer.testing import CliRunner

from sslam_core.runs import outputs
from sslam_core.runs.outputs import OutputError
from sslam_core.training import trainer
from sslam_core.training.trainer import RunFolderError, check_run_folder, train

TINY = ["--model", "tiny", "--batch-size", "2", "--target-length", "256", "--clone-batch", "2"]
TINY += ["--workers", "0", "--device", "cpu", "--log-every", "1"]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class FailingTask(ToyTask):
    """Fails in its loss at `fail_at` (a data error found late, before the first save)."""

    def __init__(self, fail_at=1, **kw):
        super().__init__(**kw)
        self.fail_at, self.calls = fail_at, 0

    def loss(self, batch, generator):
        self.calls += 1
        if self.calls == self.fail_at:
            raise ValueError("bad batch")
        return super().loss(batch, generator)


class SignalTask(ToyTask):
    """Sends itself `signum` after update `at`, as a scheduler would."""

    def __init__(self, signum=None, at=3, **kw):
        super().__init__(**kw)
        self.signum, self.at = signum, at

    def after_step(self, step):
        if step == self.at and self.signum is not None:
            os.kill(os.getpid(), self.signum)
        return super().after_step(step)


# ---------------------------------------------------------------------------------------------------------
# Run folders


def test_run_folder_checks_refuse_a_run_unless_resume_or_overwrite(tmp_path):
    check_run_folder(tmp_path / "new")  # missing: fine
    (tmp_path / "empty").mkdir()
    check_run_folder(tmp_path / "empty")  # empty: fine
    run = tmp_path / "run"
    train(ToyTask(), config(run, keep_last=1))
    with pytest.raises(RunFolderError, match="holds a run .*--resume.*--overwrite"):
        check_run_folder(run)
    check_run_folder(run, resume=True)
    check_run_folder(run, overwrite=True)
    with pytest.raises(RunFolderError, match="not both"):
        check_run_folder(run, resume=True, overwrite=True)
    (run / "notes.txt").write_text("mine")
    train(ToyTask(), config(run, steps=2, save_every=2), overwrite=True)
    assert not (run / "checkpoints").exists()  # the old run's numbered exports are gone
    assert [json.loads(s)["step"] for s in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (run / "notes.txt").read_text() == "mine"  # not a run file: kept


def test_failure_before_the_first_save_leaves_no_run_folder(tmp_path):
    out = tmp_path / "a" / "run"
    with pytest.raises(ValueError, match="bad batch"):
        train(FailingTask(fail_at=2), config(out))
    assert not out.exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="bad batch"):
        train(FailingTask(fail_at=1), config(tmp_path / "b"))
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["notes.txt"]
    with pytest.raises(ValueError, match="bad batch"):  # after a save, the run stays resumable
        train(FailingTask(fail_at=5), config(tmp_path / "c"))
    assert torch.load(tmp_path / "c" / "state.pt", weights_only=True)["step"] == 3


# ---------------------------------------------------------------------------------------------------------
# Write errors


def test_no_space_for_state_keeps_the_previous_one_and_resume_continues(tmp_path, monkeypatch):
    whole = ToyTask()
    train(whole, config(tmp_path / "whole"))
    out = tmp_path / "run"
    writes = []
    real = outputs._RecordingFile.write

    def write(self, data):
        writes.append(self)
        if len({id(w) for w in writes}) == 2:  # the second state.pt: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(outputs._RecordingFile, "write", write)
    with pytest.raises(OutputError) as err:
        train(ToyTask(), config(out))
    assert str(err.value) == f"{out / 'state.pt'}: cannot write (no space left on device)"
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 3  # the step-3 state is intact
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []
    monkeypatch.undo()  # space freed
    resumed = ToyTask()
    train(resumed, config(out), resume=True)
    assert same_weights(whole.model, resumed.model)


@pytest.mark.parametrize(
    "code, reason", [(errno.ENOSPC, "no space left on device"), (errno.EROFS, "read-only file system")]
)
def test_metrics_write_error_is_one_line(tmp_path, monkeypatch, code, reason):
    out = tmp_path / "run"
    opened = []

    def bad_open(path, mode="r", *a, **k):
        opened.append(path)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(trainer, "open", bad_open, raising=False)  # MetricsLog.write appends with open()
    with pytest.raises(OutputError) as err:
        train(ToyTask(), config(out))
    assert str(err.value) == f"{out / 'metrics.jsonl'}: cannot write ({reason})"
    assert "\n" not in str(err.value) and opened


def test_permission_denied_on_config_is_one_line(tmp_path, monkeypatch):
    def deny(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "write_text", deny)
    with pytest.raises(OutputError, match=r"config\.json: cannot write \(permission denied\)$"):
        train(ToyTask(), config(tmp_path / "run"))


@pytest.mark.slow
def test_full_disk_in_the_cli_is_one_line_exit_2(tmpfs):
    with tmpfs("96k") as disk:
        proc = subprocess.run(
            [sys.executable, "-m", "sslam_cli", "pretrain", str(DATA / "real_32k.wav"),
             str(DATA / "robin.ogg"), "-o", str(disk / "run"), "--steps", "2", *TINY, "-q"],
            capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[0].startswith(f"error: {disk / 'run'}") and "no space left on device" in lines[0]
        assert not (disk / "run").exists() or not list((disk / "run").iterdir())  # nothing half-made


# ---------------------------------------------------------------------------------------------------------
# Signals and schedule changes


@pytest.mark.distributed
@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143), ("SIGUSR1", 143)])
def test_signal_saves_at_the_step_boundary_and_resume_is_exact(tmp_path, name, code):
    whole = ToyTask()
    train(whole, config(tmp_path / "whole", save_every=100))
    out = tmp_path / "run"
    summary = train(SignalTask(getattr(signal, name), at=5), config(out, save_every=100))
    assert (summary["interrupted"], summary["exit_code"], summary["steps"]) == (name, code, 5)
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 5
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed = ToyTask()
    assert "interrupted" not in train(resumed, config(out, save_every=100), resume=True)
    assert same_weights(whole.model, resumed.model)


def test_resume_with_other_steps_says_the_schedule_changes(tmp_path, capsys):
    train(ToyTask(), config(tmp_path, steps=8), stop_at=4)
    capsys.readouterr()
    train(ToyTask(), config(tmp_path, steps=8), resume=True, stop_at=5)
    assert "schedule" not in capsys.readouterr().err
    train(ToyTask(), config(tmp_path, steps=12, warmup=3), resume=True)
    err = capsys.readouterr().err
    assert "note: resuming at step 5 with a changed schedule (steps 8 -> 12, warmup 2 -> 3)" in err


# ---------------------------------------------------------------------------------------------------------
# The commands


def cli(*args):
    from sslam_cli.main import app

    return CliRunner().invoke(app, list(args))


def test_pretrain_refuses_an_existing_run_and_overwrite_replaces_it(tmp_path):
    run = tmp_path / "eat"
    clip = str(DATA / "real_32k.wav")
    first = cli("pretrain", clip, "-o", str(run), "--steps", "0", *TINY, "-q")
    assert first.exit_code == 0, first.output
    (run / "checkpoints").mkdir()
    again = cli("pretrain", clip, "-o", str(run), "--steps", "0", *TINY, "-q")
    assert again.exit_code == 2 and again.stderr.count("\n") == 1
    assert again.stderr.startswith(f"error: {run} holds a run") and "--overwrite" in again.stderr
    replaced = cli("pretrain", clip, "-o", str(run), "--steps", "0", *TINY, "-q", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert not (run / "checkpoints").exists()
    both = cli("pretrain", "-o", str(run), "--resume", "--overwrite")
    assert both.exit_code == 2 and "not both" in both.stderr


@pytest.mark.slow
def test_pretrain_summary_json_on_stdout_human_on_stderr_and_config_of_a_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    clip = str(DATA / "real_32k.wav")
    r = cli("pretrain", clip, str(DATA / "robin.ogg"), "-o", str(a), "--steps", "2", "--lr", "3e-4", *TINY)
    assert r.exit_code == 0, r.output
    assert len(r.stdout.splitlines()) == 1 and json.loads(r.stdout)["steps"] == 2
    assert "done: step 2" in r.stderr
    r = cli("pretrain", "-o", str(b), "--config", str(a / "config.json"), "--steps", "0", "-q")
    assert r.exit_code == 0, r.output
    assert r.stderr == "" and json.loads(r.stdout.splitlines()[-1])["steps"] == 0
    sa, sb = (json.loads((x / "config.json").read_text())["pretrain"]["settings"] for x in (a, b))
    assert sb["data"] == sa["data"] == [clip, str(DATA / "robin.ogg")] and sb["lr"] == 3e-4
    assert sb["warmup"] == 0 and sb["ema_anneal_end_step"] == 1  # derived again for --steps 0
    assert {k: v for k, v in sb.items() if k not in ("out_dir", "steps")} == {
        k: v for k, v in sa.items() if k not in ("out_dir", "steps")
    }


@pytest.mark.slow
def test_pretrain_resume_rederives_the_schedule_and_says_so(tmp_path):
    run = tmp_path / "eat"
    clips = [str(DATA / "real_32k.wav"), str(DATA / "robin.ogg")]
    assert (
        cli("pretrain", *clips, "-o", str(run), "--steps", "4000", "--stop-at", "1", *TINY, "-q").exit_code
        == 0
    )
    r = cli("pretrain", "-o", str(run), "--resume", "--steps", "8000", "--stop-at", "2", "-q")
    assert r.exit_code == 0, r.output
    assert "changed schedule (steps 4000 -> 8000, warmup 530 -> 1060, ema_anneal_end_step 1000 -> 2000)" in (
        r.stderr
    )
    settings = json.loads((run / "config.json").read_text())["pretrain"]["settings"]
    assert (settings["steps"], settings["warmup"], settings["ema_anneal_end_step"]) == (8000, 1060, 2000)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from sslam_core.models.layouts.native import save_checkpoint
    from sslam_core.models.transformer import Encoder, ModelConfig

    cfg = ModelConfig(embed_dim=64, depth=2, num_heads=2, max_length=16)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "encoder.safetensors"
    save_checkpoint(path, cfg, Encoder(cfg).state_dict(), normalization=(-5.0, 4.0))
    return str(path)


FT = ["--target-length", "64", "--workers", "0", "--device", "cpu"]


def test_linear_probe_on_a_small_set_fits_the_batch(tmp_path, encoder):
    out = tmp_path / "probe"
    r = cli(
        "finetune",
        "--data",
        str(DATA / "fsdd_mini"),
        "-c",
        encoder,
        "-o",
        str(out),
        "--linear",
        "--steps",
        "3",
        *FT,
    )  # fmt: skip  (the default batch of 48 is more than the 12 clips)
    assert r.exit_code == 0, r.output
    assert "note: --batch-size 48 is more than 12 clips allow; using 12" in r.stderr
    report = json.loads(r.stdout.splitlines()[-1])
    assert (report["task"], report["steps"], report["clips"], report["classes"]) == ("linear", 3, 12, 3)
    assert json.loads((out / "config.json").read_text())["batch_size"] == 12


def test_one_class_multiclass_set_is_refused_before_any_work(tmp_path, encoder):
    data = tmp_path / "one"
    data.mkdir()
    (data / "labels.csv").write_text(
        "filename,labels\n" + "".join(f"{DATA / 'fsdd_mini' / f'1_george_{i}.wav'},1\n" for i in range(2))
    )
    out = tmp_path / "run"
    r = cli("finetune", "--data", str(data), "-c", encoder, "-o", str(out), "--steps", "2", "-b", "2", *FT)
    assert r.exit_code == 2 and "all of one class (1)" in r.stderr and r.stderr.count("\n") == 1
    assert not out.exists()


def test_finetune_saves_its_data_and_split_and_resume_uses_them(tmp_path, encoder):
    out = tmp_path / "ft"
    args = ["--data", str(DATA / "fsdd_mini"), "-c", encoder, "-o", str(out), "--valid-fraction", "0.25"]
    args += ["--batch-size", "4", *FT]
    r = cli("finetune", *args, "--steps", "2", "-q")
    assert r.exit_code == 0, r.output
    assert r.stderr == "" and json.loads(r.stdout.splitlines()[-1])["valid_clips"] == 3
    saved = json.loads((out / "config.json").read_text())["data"]
    assert saved["data"] == str(DATA / "fsdd_mini") and saved["valid_fraction"] == 0.25
    assert saved["split"] == "split.json"
    split = json.loads((out / "split.json").read_text())
    assert (len(split["train"]), len(split["valid"]), split["seed"]) == (9, 3, 0)
    split["train"].append(split["valid"].pop())  # the resumed run must follow the saved split
    (out / "split.json").write_text(json.dumps(split))
    r = cli("finetune", *args, "--steps", "3", "--resume", "-q")
    assert r.exit_code == 0, r.output
    assert "changed schedule (steps 2 -> 3" in r.stderr
    report = json.loads(r.stdout.splitlines()[-1])
    assert (report["steps"], report["clips"], report["valid_clips"]) == (3, 10, 2)


def test_a_failed_resume_of_an_export_only_run_keeps_its_files(tmp_path):
    train(ToyTask(), config(tmp_path, steps=0))  # a --steps 0 export: model and config, no state.pt
    exported = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="bad batch"):
        train(FailingTask(fail_at=1), config(tmp_path), resume=True)
    assert (tmp_path / "model.safetensors").read_bytes() == exported
    assert not (tmp_path / "metrics.jsonl").exists() or (tmp_path / "metrics.jsonl").read_text() == ""
