"""`sslam convert`: metadata kept by every layout, outputs never replaced unasked, disk errors in one line."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINTS as FIXTURES
from conftest import DATA
from safetensors import SafetensorError
from typer.testing import CliRunner

from sslam_core.models import checkpoint
from sslam_core.models.checkpoint import Checkpoint
from sslam_core.models.factory import load_model
from sslam_core.models.layouts import fairseq
from sslam_core.models.layouts.native import save_checkpoint
from sslam_core.models.loading import read_checkpoint
from sslam_core.models.transformer import Encoder, ModelConfig
from sslam_core.runs.outputs import os_error_behind

FINETUNED = FIXTURES / "tiny_finetuned.pt"
TINY = ModelConfig(embed_dim=64, depth=2, num_heads=2, max_length=16)
OUTPUTS = {"sslam": "x.safetensors", "fairseq": "x.pt", "hf": "hf"}


def sslam(*args: str):
    from sslam_cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A two-step `sslam finetune` run on FSDD digits with a 2.08 s input (208 frames), custom norm."""
    root = tmp_path_factory.mktemp("ft")
    torch.manual_seed(0)
    encoder = root / "encoder.safetensors"
    save_checkpoint(encoder, TINY, Encoder(TINY).state_dict(), normalization=(-5.0, 4.0))
    result = sslam(
        "finetune", "--data", DATA / "fsdd_mini", "--checkpoint", encoder, "-o", root / "run",
        "--steps", "2", "--batch-size", "4", "--target-length", "208", "--workers", "0", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return root / "run"


def metadata(ckpt: Checkpoint) -> tuple:
    keep = {
        k: v for k, v in ckpt.extra.items() if not k.startswith(("fairseq_", "hf_")) and k != "num_updates"
    }
    return ckpt.labels, ckpt.normalization, keep, ckpt.config


def test_every_layout_keeps_the_run_metadata_through_every_round_trip(tmp_path, run_folder):
    original = read_checkpoint(run_folder)
    assert original.extra["target_length"] == 208 and original.extra["multilabel"] is False
    assert [name for _, name in original.labels] == ["0", "1", "2"] and original.normalization == (-5.0, 4.0)
    want = metadata(original)
    chains = [
        ("sslam", "hf", "fairseq", "sslam"),
        ("fairseq", "sslam", "hf", "fairseq"),
        ("hf", "fairseq", "hf", "sslam"),
    ]
    for n, chain in enumerate(chains):
        source = run_folder
        for step, layout in enumerate(chain):
            out = tmp_path / f"{n}{step}-{OUTPUTS[layout]}"
            result = sslam("convert", source, out)
            assert result.exit_code == 0, result.output
            back = read_checkpoint(out)
            assert back.layout == layout and metadata(back) == want, (chain, step)
            assert all(torch.equal(back.state[k], original.state[k]) for k in original.state)
            model = load_model(out)
            assert model.target_length == 208 and model.multilabel is False
            assert model.labels == original.labels and model.normalization == (-5.0, 4.0)
            source = out


def test_a_converted_hf_folder_tags_with_the_run_labels(tmp_path, run_folder):
    assert sslam("convert", run_folder, tmp_path / "hf").exit_code == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "auto_map" not in config and config["sslam"]["extra"]["target_length"] == 208
    tagged = sslam(
        "tag", "-c", tmp_path / "hf", "--format", "json", "-k", "3", DATA / "fsdd_mini" / "1_george_0.wav"
    )
    assert tagged.exit_code == 0, tagged.output
    labels = json.loads(tagged.stdout.splitlines()[0])["labels"]
    assert {x["label"] for x in labels} == {"0", "1", "2"}
    assert sum(x["score"] for x in labels) == pytest.approx(1.0, abs=1e-4)  # still a multi-class head


def test_fairseq_export_records_the_input_length_for_fairseq_too(tmp_path, run_folder):
    assert sslam("convert", run_folder, tmp_path / "ft.pt").exit_code == 0
    container = fairseq.torch_load(tmp_path / "ft.pt")
    assert container["cfg"]["task"]["target_length"] == 208
    assert container["task_state"]["labels"] == {"0": "0", "1": "1", "2": "2"}


@pytest.mark.parametrize("layout", ["sslam", "fairseq", "hf"])
def test_existing_outputs_are_refused_unless_overwrite(tmp_path, layout):
    out = tmp_path / OUTPUTS[layout]
    old = out / "notes.txt" if layout == "hf" else out
    old.parent.mkdir(exist_ok=True)
    old.write_text("keep me")
    line = error_line(sslam("convert", FINETUNED, out))
    assert line.startswith(f"error: {out} exists") and "--overwrite" in line
    assert old.read_text() == "keep me" and sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        [old.name] + ([out.name] if layout == "hf" else [])
    )
    assert sslam("convert", FINETUNED, out, "--overwrite").exit_code == 0
    assert read_checkpoint(out).layout == layout
    assert not list(tmp_path.rglob("*.tmp"))
    if layout == "hf":
        assert old.read_text() == "keep me"  # other files in the folder are left alone


def test_outputs_have_the_ordinary_file_mode(tmp_path):
    mode = 0o666 & ~umask()
    for layout, name in OUTPUTS.items():
        assert sslam("convert", FINETUNED, tmp_path / name).exit_code == 0
        files = list((tmp_path / name).iterdir()) if layout == "hf" else [tmp_path / name]
        assert {f.stat().st_mode & 0o777 for f in files} == {mode}, layout
    ckpt = read_checkpoint(FINETUNED)
    save_checkpoint(tmp_path / "run" / "model.safetensors", ckpt.config, ckpt.state)
    assert (tmp_path / "run" / "model.safetensors").stat().st_mode & 0o777 == mode


@pytest.fixture
def full_disk(tmpfs):
    """A 64 KiB tmpfs (root only): too small for any checkpoint."""
    with tmpfs("64k", "full") as mount:
        yield mount


@pytest.mark.parametrize("layout", ["sslam", "fairseq", "hf"])
def test_a_full_disk_is_one_line_and_leaves_nothing(full_disk, layout):
    out = full_disk / OUTPUTS[layout]
    where = out / "model.safetensors" if layout == "hf" else out
    line = error_line(sslam("convert", FINETUNED, out))
    assert line == f"error: {where}: cannot write (no space left on device)"
    assert not [p for p in full_disk.rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    "code, cause",
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EACCES, "permission denied"),
        (errno.EROFS, "read-only file system"),
    ],
)
@pytest.mark.parametrize("layout", ["sslam", "fairseq", "hf"])
def test_injected_os_errors_are_one_line(tmp_path, monkeypatch, layout, code, cause):
    def broken(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint, "save_file", broken)
    monkeypatch.setattr(torch, "save", broken)
    out = tmp_path / "[out]" / OUTPUTS[layout]
    where = out / "model.safetensors" if layout == "hf" else out
    assert error_line(sslam("convert", FINETUNED, out)) == f"error: {where}: cannot write ({cause})"
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_serializer_errors_are_read_as_os_errors():
    """safetensors names the errno in its message; torch.save chains the OSError behind a RuntimeError."""
    rust = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert os_error_behind(rust).errno == errno.ENOSPC
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    wrapped.__context__ = OSError(errno.EROFS, "Read-only file system")
    assert os_error_behind(wrapped).errno == errno.EROFS
    assert os_error_behind(RuntimeError("shape mismatch")) is None


def test_messages_keep_brackets_and_bad_suffixes_are_refused(tmp_path):
    missing = tmp_path / "[run 1]" / "model[2].pt"
    assert "[run 1]/model[2].pt: no such file" in error_line(sslam("convert", missing, tmp_path / "x.pt"))
    line = error_line(sslam("convert", FINETUNED, tmp_path / "x.bin"))
    assert line == f"error: {tmp_path / 'x.bin'}: cannot tell the layout from the suffix '.bin'; pass --to"
    line = error_line(sslam("convert", FINETUNED, tmp_path / "x.pt", "--to", "onnx"))
    assert "unknown layout 'onnx'" in line
    assert not list(tmp_path.iterdir())


def test_the_convert_module_does_not_import_torch():
    code = "import sys, sslam_cli.convert; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
