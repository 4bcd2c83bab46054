"""`sslam export` and the ONNX Runtime backend: parity with torch, metadata round trip, the pipeline
end to end (tag, extract, eval), int8, and the one-line message without the `[onnx]` extra."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from conftest import CHECKPOINTS as FIX
from conftest import ROOT, sslam

from sslam_cli.options import load_model_or_fail  # noqa: E402
from sslam_core.models.checkpoint import CheckpointError
from sslam_core.models.factory import load_model
from sslam_core.models.layouts.native import save_checkpoint
from sslam_core.models.loading import read_checkpoint
from sslam_core.models.onnx_export import export_checkpoint  # noqa: E402
from sslam_core.models.onnx_runtime import OnnxEncoder, read_metadata  # noqa: E402
from sslam_core.models.transformer import Classifier, ModelConfig, build_model  # noqa: E402

FINETUNED, PRETRAIN = FIX / "tiny_finetuned.pt", FIX / "tiny_pretrain.pt"
CLIP = ROOT / "tests" / "data" / "real_32k.wav"
DIGITS = ROOT / "tests" / "data" / "polydigits" / "audio"
TOLERANCE = 1e-4


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """fp32 exports of both fixtures (last block) and of the pre-trained one's block 1 in int8."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, source, options in (
        ("finetuned", FINETUNED, {}),
        ("pretrain", PRETRAIN, {}),
        ("int8", PRETRAIN, {"layer": 1, "int8": True}),
    ):
        result = export_checkpoint(read_checkpoint(source), **options)
        out[name] = result.write(root / f"{name}.onnx")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 1024), (3, 256), (2, 96)])
def test_parity_with_torch(exported, shape):
    batch, frames = shape
    x = torch.randn(batch, 1, frames, 128, generator=torch.Generator().manual_seed(frames))
    tagger, tagger_onnx = load_model(FINETUNED), load_model(exported["finetuned"])
    encoder, encoder_onnx = load_model(PRETRAIN), load_model(exported["pretrain"])
    assert isinstance(tagger_onnx, Classifier) and isinstance(encoder_onnx, OnnxEncoder)
    with torch.inference_mode():
        pairs = [
            (tagger_onnx(x), tagger(x)),
            (tagger_onnx.features(x), tagger.features(x)),
            (tagger_onnx.features(x, -1), tagger.features(x, 2)),
            (encoder_onnx(x), encoder(x)),
        ]
    for got, want in pairs:
        assert got.shape == want.shape and got.dtype == torch.float32
        assert (got - want).abs().max().item() <= TOLERANCE


def test_metadata_round_trip(exported):
    for name, source in (("finetuned", FINETUNED), ("pretrain", PRETRAIN)):
        onnx_model, torch_model = load_model(exported[name]), load_model(source)
        for attr in ("cfg", "labels", "normalization", "multilabel"):
            assert getattr(onnx_model, attr) == getattr(torch_model, attr), attr
        assert onnx_model.target_length == 1024 and onnx_model.layer == 2
        info = onnx_model.checkpoint_info
        assert (
            info["layout"] == "onnx" and info["exported_from_sha256"] == torch_model.checkpoint_info["sha256"]
        )
        meta = json.loads(read_metadata(exported[name])["sslam"])
        assert meta["kind"] == ("classifier" if name == "finetuned" else "encoder")
        assert (meta["layer"], meta["target_length"], meta["precision"]) == (2, 1024, "fp32")
        assert (
            meta["source_sha256"] == info["exported_from_sha256"]
            and meta["config"] == torch_model.cfg.to_dict()
        )


@pytest.mark.slow
def test_export_command_checks_and_refuses(tmp_path):
    out = tmp_path / "sub" / "enc.onnx"
    result = sslam("export", PRETRAIN, out, "--layer", "-2", "--target-length", "512")
    assert "encoder, block 1 of 2" in result.stdout
    diff = float(result.stdout.split("features ")[-1].split()[0])
    assert diff <= TOLERANCE
    model = load_model(out)
    assert (model.layer, model.target_length) == (1, 512)
    assert "exists; pass --overwrite" in error_line(sslam("export", PRETRAIN, out, code=2))
    sslam("export", PRETRAIN, out, "--overwrite")
    assert "expected an .onnx file" in error_line(sslam("export", PRETRAIN, tmp_path / "x.pt", code=2))
    assert "out of range" in error_line(
        sslam("export", PRETRAIN, tmp_path / "y.onnx", "--layer", "5", code=2)
    )
    assert not (tmp_path / "y.onnx").exists()
    for command in (
        ("export", out, tmp_path / "z.onnx"),
        ("convert", out, tmp_path / "z.pt"),
        ("finetune", "--data", DIGITS.parent, "--checkpoint", out, "-o", tmp_path / "ft", "--steps", "1"),
        ("pretrain", DIGITS, "-o", tmp_path / "pt", "--init", out, "--steps", "1"),
    ):
        assert "an ONNX export holds no torch weights" in error_line(sslam(*command, code=2)), command


@pytest.mark.slow
def test_int8_export_is_close_and_runs(exported, tmp_path):
    result = sslam("export", PRETRAIN, tmp_path / "q.onnx", "--int8")
    cosine = float(result.stdout.split("cls ")[-1].split(",")[0])
    assert cosine >= 0.99
    model = load_model(exported["int8"])
    assert model.precision == "int8" and model.layer == 1
    x = torch.randn(2, 1, 256, 128, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got, want = model(x, 1), load_model(PRETRAIN)(x, 1)
    assert torch.nn.functional.cosine_similarity(got[:, 0], want[:, 0]).min().item() >= 0.99


def test_tag_and_extract_end_to_end(exported, tmp_path):
    tags = [
        json.loads(sslam("tag", CLIP, "-c", ckpt, "-f", "json", "--device", "cpu").stdout)
        for ckpt in (exported["finetuned"], FINETUNED)
    ]
    assert [x["label"] for x in tags[0]["labels"]] == [x["label"] for x in tags[1]["labels"]]
    for a, b in zip(tags[0]["labels"], tags[1]["labels"], strict=True):
        assert abs(a["score"] - b["score"]) <= TOLERANCE
    files = []
    for i, ckpt in enumerate((exported["pretrain"], PRETRAIN, exported["finetuned"], FINETUNED)):
        files.append(tmp_path / f"{i}.h5")
        sslam("extract", CLIP, "-c", ckpt, "-o", files[-1], "-g", "all", "--device", "cpu")
    for onnx_file, torch_file in ((files[0], files[1]), (files[2], files[3])):
        with h5py.File(onnx_file) as a, h5py.File(torch_file) as b:
            for key in ("clip", "patch/data", "frame/data"):
                assert np.abs(a[key][:] - b[key][:]).max() <= TOLERANCE, key
    refused = sslam(
        "extract", CLIP, "-c", exported["pretrain"], "-o", tmp_path / "l1.h5", "--layer", "1", code=2
    )
    assert "gives block 2 of 2 only" in error_line(refused)


@pytest.mark.slow
def test_eval_end_to_end(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(embed_dim=32, depth=1, num_heads=2, max_length=64, num_classes=4))
    labels = [("1", "one"), ("3", "three"), ("0", "zero"), ("9", "nine")]
    source = tmp_path / "digits.safetensors"
    save_checkpoint(source, model.cfg, model.state_dict(), labels=labels, extra={"multilabel": False})
    sslam("export", source, tmp_path / "digits.onnx", "--target-length", "96")
    data = tmp_path / "set"
    data.mkdir()
    rows = [("train_00000.wav", "nine"), ("train_00002.wav", "three"), ("train_00015.wav", "one")]
    for name, _ in rows:
        shutil.copy(DIGITS / name, data / name)
    (data / "labels.csv").write_text("filename,labels\n" + "".join(f"{n},{lab}\n" for n, lab in rows))
    scores = []
    for ckpt in (tmp_path / "digits.onnx", source):
        preds = tmp_path / f"{ckpt.suffix[1:]}.npz"
        args = ("eval", "-c", ckpt, "--data", data, "--device", "cpu", "--format", "json")
        summary = json.loads(sslam(*args, "--predictions-out", preds).stdout)
        scores.append((summary["accuracy"], np.load(preds)["scores"]))
    assert scores[0][0] == scores[1][0]
    assert np.abs(scores[0][1] - scores[1][1]).max() <= TOLERANCE


@pytest.mark.slow
def test_without_the_extra_one_line(exported, tmp_path):
    """onnxruntime made unimportable by a package first on PYTHONPATH: every command says one line."""
    blocker = tmp_path / "blocker" / "onnxruntime"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked for the test')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker.parent)}
    for args in (
        ["export", str(PRETRAIN), str(tmp_path / "x.onnx")],
        ["tag", str(CLIP), "-c", str(exported["finetuned"]), "--device", "cpu"],
        [
            "extract",
            str(CLIP),
            "-c",
            str(exported["pretrain"]),
            "-o",
            str(tmp_path / "x.h5"),
            "--device",
            "cpu",
        ],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "sslam_cli", *args], capture_output=True, text=True, env=env
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert "install sslam[onnx]" in lines[0] and "onnxruntime" in lines[0]
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "x.h5").exists()


@pytest.mark.slow
def test_int8_precision_is_cached_by_sha256(monkeypatch, tmp_path):
    from sslam_core.models import onnx_export

    monkeypatch.setenv("SSLAM_CACHE", str(tmp_path / "cache"))
    model = load_model(FINETUNED, precision="int8")
    assert isinstance(model, Classifier) and model.precision == "int8"
    cached = onnx_export.int8_path(read_checkpoint(FINETUNED))
    assert cached.is_file() and cached.parent == tmp_path / "cache" / "int8"
    assert model.checkpoint_info["source"] == str(cached)
    assert model.checkpoint_info["exported_from_sha256"] in cached.name

    def no_export(*args, **kwargs):
        raise AssertionError("the cached int8 model should be reused")

    monkeypatch.setattr(onnx_export, "export_checkpoint", no_export)
    from sslam_core.models.layouts import fairseq

    with monkeypatch.context() as m:  # a cached int8 model is found by hash: the weights stay unread
        m.setattr(fairseq, "torch_load", no_export)
        assert load_model(FINETUNED, precision="int8").checkpoint_info["source"] == str(cached)
    again = load_model(FINETUNED, precision="int8")
    assert load_model_or_fail(str(FINETUNED), torch.device("cpu"), precision="int8").precision == "int8"
    x = torch.randn(2, 1, 256, 128, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        got, want = again(x), load_model(FINETUNED)(x)
    assert torch.nn.functional.cosine_similarity(got, want).min().item() >= 0.99
    fp32_export = tmp_path / "fp32.onnx"
    export_checkpoint(read_checkpoint(FINETUNED)).write(fp32_export)
    with pytest.raises(CheckpointError, match="export it with --int8"):
        load_model(fp32_export, precision="int8")


@pytest.mark.slow
def test_hear_api_and_threads(exported):
    from sslam_core import hear

    audio = torch.randn(2, 16000 * 3, generator=torch.Generator().manual_seed(3)) * 0.1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        onnx_model = hear.load_model(str(exported["pretrain"]))
    finally:
        torch.set_num_threads(threads)
    assert onnx_model.session.get_session_options().intra_op_num_threads == 1
    torch_model = hear.load_model(str(PRETRAIN))
    scene = [hear.get_scene_embeddings(audio, m) for m in (onnx_model, torch_model)]
    stamps = [hear.get_timestamp_embeddings(audio, m) for m in (onnx_model, torch_model)]
    assert (scene[0] - scene[1]).abs().max().item() <= TOLERANCE
    assert (stamps[0][0] - stamps[1][0]).abs().max().item() <= TOLERANCE
    assert torch.equal(stamps[0][1], stamps[1][1])


@pytest.mark.slow
def test_full_disk_is_one_line(tmpfs):
    with tmpfs("256k", "full") as disk:
        result = sslam("export", PRETRAIN, disk / "enc.onnx", code=2)
        assert "no space left on device" in error_line(result) and "enc.onnx" in error_line(result)
        assert not list(disk.iterdir())


@pytest.mark.slow
def test_precision_int8_in_the_commands_is_cached_and_close(tmp_path):
    """`--precision int8` for a torch checkpoint: quantised once into SSLAM_CACHE, then reused."""
    clip = ROOT / "tests" / "data" / "real_32k.wav"
    env = {**os.environ, "SSLAM_CACHE": str(tmp_path / "cache")}
    fine = str(ROOT / "tests" / "fixtures" / "checkpoints" / "tiny_finetuned.pt")

    def tag(*extra: str) -> list[dict]:
        cmd = [
            sys.executable,
            "-m",
            "sslam_cli",
            "tag",
            str(clip),
            "-c",
            fine,
            "-f",
            "json",
            "-k",
            "3",
            *extra,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["labels"]

    int8 = tag("--precision", "int8")
    cached = list((tmp_path / "cache").rglob("*.onnx"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    assert tag("--precision", "int8") == int8 and cached[0].stat().st_mtime_ns == stamp
    fp32 = tag()
    assert [c["label"] for c in int8][:1] == [c["label"] for c in fp32][:1]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(int8, fp32, strict=True)) < 0.01
    cmd = [sys.executable, "-m", "sslam_cli", "tag", str(clip), "-c", fine, "--precision", "int4"]
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "choose fp32, bf16, fp16, int8" in bad.stderr


@pytest.mark.slow
def test_large_logits_are_checked_relative_to_their_size():
    """A head whose logits reach ~1e3 (a linear probe's can) exports: fp32 steps by 1e-4 there."""
    from sslam_core.models.checkpoint import Checkpoint
    from sslam_core.models.onnx_export import tolerance

    torch.manual_seed(0)
    model = build_model(ModelConfig(embed_dim=32, depth=1, num_heads=2, max_length=64, num_classes=4))
    with torch.no_grad():
        model.head.weight.copy_(300.0 * torch.randn_like(model.head.weight))
    result = export_checkpoint(Checkpoint(model.cfg, model.state_dict(), extra={"target_length": 96}))
    with torch.inference_mode():
        logits = model(torch.randn(2, 1, 96, 128, generator=torch.Generator().manual_seed(0)))
    assert logits.abs().max().item() > 100
    assert result.max_diff["logits"] <= tolerance(logits)
    assert tolerance(torch.tensor([0.5])) == 1e-4


def test_int8_scores_do_not_depend_on_the_batch(monkeypatch, tmp_path):
    """Dynamic int8 quantisation scales each batch's activations: the same file scored 0.9499 alone and
    0.9488 beside another, so torchrun and --resume runs differed from one process. An int8 model now
    runs one window per pass: a file's scores are the same bits alone, in any batch and any order."""
    from sslam_core.inference.tagging import tag

    monkeypatch.setenv("SSLAM_CACHE", str(tmp_path / "cache"))
    model = load_model(FINETUNED, precision="int8")
    other = ROOT / "tests" / "data" / "robin.ogg"
    alone = next(tag(model, [str(CLIP)], target_length=256))
    for batch in ([other, CLIP], [CLIP, other, CLIP]):
        results = list(tag(model, [str(p) for p in batch], target_length=256, batch_size=8))
        for res, path in zip(results, batch, strict=True):
            if path == CLIP:
                np.testing.assert_array_equal(res.scores, alone.scores)


def test_precision_of_an_export_and_messages_of_the_cached_int8_model(exported, monkeypatch, tmp_path):
    """--precision does not change an .onnx export: a note says what it runs (it was ignored); the
    messages of a torch checkpoint's cached int8 model name it (they said "this ONNX export")."""
    monkeypatch.setenv("SSLAM_CACHE", str(tmp_path / "cache"))
    fp32 = sslam("tag", CLIP, "-c", exported["finetuned"], "-f", "json", "--precision", "bf16")
    assert (
        f"note: {exported['finetuned']} is an fp32 ONNX export and runs fp32; --precision bf16 applies "
        "to torch checkpoints"
    ) in fp32.stderr
    assert "ONNX export" not in sslam("tag", CLIP, "-c", exported["finetuned"], "-f", "json").stderr
    int8 = sslam("extract", CLIP, "-c", exported["int8"], "-o", tmp_path / "a.h5", "--layer", "1")
    assert f"note: {exported['int8']} is an int8 ONNX export and runs int8" in int8.stderr
    layer = sslam("extract", CLIP, "-c", PRETRAIN, "-o", tmp_path / "b.h5", "--precision", "int8",
                  "--layer", "1", code=2)  # fmt: skip
    assert error_line(layer) == (
        f"error: layer 1: the int8 model cached for {PRETRAIN} gives block 2 of 2 only (run another "
        "--precision, or `sslam export --int8 --layer 1` and run that file)"
    )
    token = sslam("tag", CLIP, "-c", FINETUNED, "--precision", "int8", "--events", "--frame-scores",
                  "token", code=2)  # fmt: skip
    assert error_line(token) == (
        "error: --frame-scores token: token frame scores need the PyTorch model (the int8 model cached "
        f"for {FINETUNED} gives clip logits only; run another --precision)"
    )


def test_an_unwritable_int8_cache_quantises_for_the_run_with_a_warning(tmp_path):
    """A cache that cannot be written (here under a regular file: a real ENOTDIR, as a read-only or
    full disk would give) costs the caching, not the run: a warning says why, the tags are int8's."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    args = ("tag", CLIP, "-c", FINETUNED, "-f", "json", "-k", "3", "--device", "cpu")
    cached = sslam(*args, "--precision", "int8", env={"SSLAM_CACHE": str(tmp_path / "cache")})
    for precision in ("int8", "auto"):
        run = sslam(*args, "--precision", precision, env={"SSLAM_CACHE": str(blocker / "cache")})
        warning = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
        assert len(warning) == 1 and "quantised for this run only" in warning[0], run.stderr
        assert "not a directory" in warning[0] and "SSLAM_CACHE" in warning[0]
        assert json.loads(run.stdout) == json.loads(cached.stdout)
    assert "--precision auto runs int8" in run.stderr


def test_a_first_int8_use_shows_a_progress_bar_on_a_terminal(tmp_path):
    """`--precision int8` makes the int8 model on first use with a progress bar over its steps on a
    terminal (a real pseudo-terminal, 100 columns); the second run finds it cached and shows none."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    def run() -> str:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
        chunks: list[bytes] = []

        def read() -> None:
            while True:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: the terminal's other end is closed
                    return
                if not data:
                    return
                chunks.append(data)

        reader = threading.Thread(target=read)
        reader.start()
        args = ["tag", CLIP, "-c", FINETUNED, "--precision", "int8", "-f", "json", "--device", "cpu"]
        env = {**os.environ, "SSLAM_CACHE": str(tmp_path / "cache"), "COLUMNS": "100"}
        done = subprocess.run([sys.executable, "-m", "sslam_cli", *map(str, args)], stdout=subprocess.PIPE,
                              stderr=slave, env=env, cwd=ROOT, timeout=600)  # fmt: skip
        os.close(slave)
        reader.join(timeout=30)
        os.close(master)
        assert done.returncode == 0 and json.loads(done.stdout)["labels"]
        return b"".join(chunks).decode(errors="replace")

    first = run()
    assert "int8 model: 100%" in first and "4/4" in first and "quantising to int8" in first, first
    assert "int8 model" not in run()
