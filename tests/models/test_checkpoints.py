"""Checkpoint layouts, conversions, the safe unpickler and the hub cache, against official fixtures.
Hostile pickles: tests/test_safe_pickle.py; `sslam convert`: tests/test_convert.py."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHECKPOINTS as FIXTURES

from sslam_cli.convert import convert, infer_layout
from sslam_core.data.labels import LabelError, audioset_labels, read_label_csv
from sslam_core.models import safe_pickle
from sslam_core.models.checkpoint import Checkpoint, CheckpointError
from sslam_core.models.factory import load_model, model_from_checkpoint
from sslam_core.models.layouts.fairseq import fairseq_container
from sslam_core.models.layouts.huggingface import hf_tensors
from sslam_core.models.layouts.native import save_checkpoint
from sslam_core.models.loading import read_checkpoint, write_checkpoint
from sslam_core.models.transformer import Encoder, build_model, preset

PRETRAIN, FINETUNED = FIXTURES / "tiny_pretrain.pt", FIXTURES / "tiny_finetuned.pt"
HF, HF_PRETRAIN = FIXTURES / "tiny_hf", FIXTURES / "tiny_hf_pretrain"
ATOL = 1e-4


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    with np.load(FIXTURES / "expected.npz") as data:
        return {k: torch.from_numpy(data[k]) for k in data.files}


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and (a - b).abs().max().item() <= ATOL


def assert_same(a: dict | None, b: dict | None) -> None:
    assert (a is None) == (b is None)
    if a is not None:
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def check_pretrain(source, expected, teacher: bool = False) -> None:
    model = load_model(source, teacher=teacher)
    assert isinstance(model, Encoder)
    assert_close(model(expected["x1024"]), expected["ema_all_1024" if teacher else "pre_all_1024"])
    if not teacher:
        assert_close(model(expected["x512"]), expected["pre_all_512"])


@torch.no_grad()
def check_finetuned(source, expected) -> None:
    model = load_model(source)
    assert_close(model(expected["x1024"]), expected["ft_logits_1024"])
    assert_close(model(expected["x512"]), expected["ft_logits_512"])
    assert_close(model.features(expected["x1024"]), expected["ft_all_1024"])
    assert model.labels == audioset_labels()


def test_fairseq_pretrain(expected):
    ckpt = read_checkpoint(PRETRAIN)
    cfg = ckpt.config
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.max_length, cfg.num_classes) == (64, 2, 4, 768, 0)
    assert ckpt.layout == "fairseq" and ckpt.labels is None and ckpt.normalization == (-4.268, 4.569)
    assert all(t.dtype == torch.float32 for t in ckpt.state.values())
    assert sorted(ckpt.decoder) == sorted(
        [f"blocks.{i}.0.{p}" for i in range(6) for p in ("weight", "bias")] + ["proj.weight", "proj.bias"]
    )
    assert ckpt.decoder["blocks.0.0.weight"].shape == (64, 4, 3, 3)
    assert ckpt.teacher is not None and ckpt.teacher.keys() == ckpt.state.keys()
    assert ckpt.extra["num_updates"] == 1000 and len(ckpt.sha256) == 64
    check_pretrain(PRETRAIN, expected)
    check_pretrain(PRETRAIN, expected, teacher=True)


def test_fairseq_finetuned(expected):
    ckpt = read_checkpoint(FINETUNED)
    assert ckpt.config.num_classes == 527 and ckpt.teacher is None and ckpt.decoder is None
    assert ckpt.labels[0] == ("/m/09x0r", "Speech") and len(ckpt.labels) == 527
    check_finetuned(FINETUNED, expected)
    model = load_model(FINETUNED)
    assert model.checkpoint_info == {
        "source": str(FINETUNED.resolve()),
        "sha256": ckpt.sha256,
        "layout": "fairseq",
    }
    with pytest.raises(CheckpointError, match="no EMA teacher"):
        read_checkpoint(FINETUNED, teacher=True)


def test_hf_folders(expected):
    check_pretrain(HF_PRETRAIN, expected)
    check_finetuned(HF, expected)
    assert read_checkpoint(HF).layout == "hf"


@pytest.mark.slow
def test_round_trip_through_every_layout(tmp_path, expected):
    for src in (PRETRAIN, FINETUNED):
        original = read_checkpoint(src)
        write_checkpoint(original, tmp_path / "a.safetensors", "sslam")
        ours = read_checkpoint(tmp_path / "a.safetensors")
        assert ours.layout == "sslam" and ours.config == original.config
        assert (ours.labels, ours.normalization) == (original.labels, original.normalization)
        for part in ("state", "teacher", "decoder"):
            assert_same(getattr(ours, part), getattr(original, part))
        write_checkpoint(ours, tmp_path / "hf", "hf")
        hf = read_checkpoint(tmp_path / "hf")
        assert_same(hf.state, original.state)
        write_checkpoint(hf, tmp_path / "b.pt", "fairseq")
        back = read_checkpoint(tmp_path / "b.pt")
        assert_same(back.state, original.state)
        assert back.config == original.config and back.labels == original.labels
        write_checkpoint(ours, tmp_path / "c.pt", "fairseq")
        full = read_checkpoint(tmp_path / "c.pt")
        assert_same(full.teacher, original.teacher)
        assert_same(full.decoder, original.decoder)
        if src == PRETRAIN:
            check_pretrain(tmp_path / "c.pt", expected, teacher=True)
            check_pretrain(tmp_path / "hf", expected)
    check_finetuned(tmp_path / "b.pt", expected)
    check_finetuned(tmp_path / "hf", expected)


def test_sslam_format_in_a_run_folder(tmp_path, expected):
    ckpt = read_checkpoint(PRETRAIN)
    save_checkpoint(
        tmp_path / "model.safetensors",
        ckpt.config,
        ckpt.state,
        teacher=ckpt.teacher,
        normalization=(-6.627, 5.359),
        extra={"step": 7},
    )
    (tmp_path / "config.json").write_text("{}")  # other files in a run folder do not matter
    ours = read_checkpoint(tmp_path)
    assert ours.layout == "sslam" and ours.extra == {"step": 7} and ours.normalization == (-6.627, 5.359)
    check_pretrain(tmp_path, expected)
    check_pretrain(tmp_path, expected, teacher=True)
    assert not list(tmp_path.glob("*.tmp"))


def test_legacy_torch_format(tmp_path, expected):
    container = fairseq_container(read_checkpoint(FINETUNED))
    torch.save(container, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    check_finetuned(tmp_path / "legacy.pt", expected)


def read_key_list(name: str) -> dict[str, tuple[int, ...]]:
    rows = (line.split("\t") for line in (FIXTURES / name).read_text().splitlines() if line.strip())
    return {k: tuple(int(d) for d in shape.strip("()").split(",") if d.strip()) for k, shape, *_ in rows}


def flat_shapes(tensors: dict, prefix: str = "") -> dict[str, tuple[int, ...]]:
    out = {}
    for k, v in tensors.items():
        if isinstance(v, dict):
            out.update(flat_shapes(v, f"{k}/"))
        else:
            out[prefix + k] = tuple(v.shape)
    return out


def vit_b(num_classes: int) -> Checkpoint:
    cfg = preset("base", num_classes=num_classes)
    with torch.device("meta"):
        state = build_model(cfg).state_dict()
    decoder = {
        f"blocks.{i}.0.{p}": torch.empty((768, 48, 3, 3) if p == "weight" else (768,), device="meta")
        for i in range(6)
        for p in ("weight", "bias")
    }
    decoder.update(
        {"proj.weight": torch.empty(768, 768, device="meta"), "proj.bias": torch.empty(768, device="meta")}
    )
    if num_classes:
        return Checkpoint(cfg, state, labels=audioset_labels())
    return Checkpoint(cfg, state, teacher=dict(state), decoder=decoder)


def test_vit_b_export_matches_official_key_lists():
    assert flat_shapes(fairseq_container(vit_b(0))["model"]) == read_key_list("keys_pretrain_vitb.txt")
    finetuned = vit_b(527)
    container = fairseq_container(finetuned)
    assert flat_shapes(container["model"]) == read_key_list("keys_finetuned_vitb.txt")
    assert flat_shapes(hf_tensors(finetuned)) == read_key_list("keys_hf_vitb.txt")
    assert container["task_state"]["labels"]["/m/09x0r"] == "0"
    assert container["cfg"]["model"]["pretrained_model_args"]["model"]["embed_dim"] == 768


def test_placeholders_and_omegaconf_become_plain():
    fake = types.ModuleType("omegaconf.dictconfig")

    class DictConfig:
        def __init__(self, content):
            self._content, self._metadata = content, None

    class Meter:
        def __init__(self):
            self.avg = 3.5

    DictConfig.__module__, Meter.__module__ = "omegaconf.dictconfig", "fairseq.logging.meters"
    DictConfig.__qualname__, Meter.__qualname__ = "DictConfig", "Meter"
    fake.DictConfig = DictConfig
    meters = types.ModuleType("fairseq.logging.meters")
    meters.Meter = Meter
    parents = {name: types.ModuleType(name) for name in ("omegaconf", "fairseq", "fairseq.logging")}
    sys.modules.update({**parents, "omegaconf.dictconfig": fake, "fairseq.logging.meters": meters})
    try:
        data = pickle.dumps({"cfg": DictConfig({"model": DictConfig({"depth": 12})}), "m": Meter()})
    finally:
        for name in [*parents, "omegaconf.dictconfig", "fairseq.logging.meters"]:
            del sys.modules[name]
    obj = safe_pickle.loads(data)
    assert safe_pickle.to_plain(obj["cfg"]) == {"model": {"depth": 12}}
    assert isinstance(obj["m"], safe_pickle.Placeholder) and obj["m"].state == {"avg": 3.5}


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not_a_checkpoint"])
def test_damaged_pt_files(tmp_path, damage):
    path = tmp_path / "bad.pt"
    data = FINETUNED.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 40)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_damaged_safetensors_and_folders(tmp_path):
    ours = tmp_path / "ours.safetensors"
    write_checkpoint(read_checkpoint(PRETRAIN), ours, "sslam")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ours.read_bytes()[:5000])
    shutil.copytree(HF, tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    for bad in (
        truncated,
        HF / "model.safetensors",
        tmp_path / "hf",
        tmp_path / "empty",
        tmp_path / "missing.pt",
    ):
        with pytest.raises(CheckpointError, match=str(bad.name)):
            read_checkpoint(bad)


def test_wrong_shapes_are_reported(tmp_path):
    ckpt = read_checkpoint(PRETRAIN)
    ckpt.state["blocks.1.attn.proj.weight"] = torch.zeros(64, 32)
    save_checkpoint(tmp_path / "x.safetensors", ckpt.config, ckpt.state)
    with pytest.raises(CheckpointError, match="blocks.1.attn.proj.weight has shape"):
        read_checkpoint(tmp_path / "x.safetensors")
    del ckpt.state["blocks.1.attn.proj.weight"]
    with pytest.raises(CheckpointError, match="missing"):
        model_from_checkpoint(ckpt)


def make_hub_cache(root: Path, repo: str, files: Path) -> None:
    """The layout huggingface_hub writes: blobs, snapshots/<revision>/ links, refs/main."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    (folder / "blobs").mkdir()
    snap = folder / "snapshots" / revision
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        blob = folder / "blobs" / f"blob-{name}"
        shutil.copy(files / name, blob)
        (snap / name).symlink_to(os.path.relpath(blob, snap))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network used")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    make_hub_cache(tmp_path / "hub", "someone/tiny-eat", HF)
    return tmp_path / "hub"


def test_hub_id_from_cache_offline(offline_hub, expected):
    ckpt = read_checkpoint("someone/tiny-eat")
    assert ckpt.layout == "hf" and str(offline_hub) in ckpt.source
    check_finetuned("someone/tiny-eat", expected)


def test_missing_hub_id_offline(offline_hub):
    with pytest.raises(CheckpointError, match="local checkpoint path"):
        read_checkpoint("someone/not-cached")


def test_convert_command(tmp_path, expected, capsys):
    convert(str(PRETRAIN), str(tmp_path / "teacher.safetensors"), teacher=True)
    with torch.no_grad():
        out = load_model(tmp_path / "teacher.safetensors")(expected["x1024"])
    assert_close(out, expected["ema_all_1024"])
    convert(str(FINETUNED), str(tmp_path / "hf_out"))
    assert read_checkpoint(tmp_path / "hf_out").layout == "hf"
    from typer.testing import CliRunner

    from sslam_cli.main import app  # errors become one line and status 2 in the `sslam` group

    result = CliRunner().invoke(app, ["convert", str(tmp_path / "nope.pt"), str(tmp_path / "x.pt")])
    assert result.exit_code == 2
    assert "nope.pt" in result.stderr
    assert (
        infer_layout("x.pt") == "fairseq"
        and infer_layout("x.safetensors") == "sslam"
        and infer_layout("x") == "hf"
    )


def test_label_files(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("dog bark\nMale speech, man speaking\n\n")
    assert read_label_csv(names) == [("dog bark", "dog bark"), ("Male speech, man speaking",) * 2]
    table = tmp_path / "table.csv"
    table.write_text('index,mid,display_name\n1,/m/b,"B, b"\n0,/m/a,A\n')
    assert read_label_csv(table) == [("/m/a", "A"), ("/m/b", "B, b")]
    bad = tmp_path / "bad.csv"
    bad.write_text("index,mid,display_name\nx,/m/a,A\n")
    with pytest.raises(LabelError, match="bad.csv"):
        read_label_csv(bad)
    with pytest.raises(LabelError, match="missing.csv"):
        read_label_csv(tmp_path / "missing.csv")


def test_mean_pooling_classifier_survives_fairseq_and_sslam_layouts(tmp_path, expected):
    """A head on the mean patch token (fairseq prediction_mode MEAN_POOLING) keeps its pooling."""
    ckpt = read_checkpoint(FIXTURES / "tiny_finetuned.pt")
    ckpt.config = dataclasses.replace(ckpt.config, pool="mean")
    model = build_model(ckpt.config)
    model.load_state_dict(ckpt.state)
    feats = expected["ft_all_1024"]
    with torch.no_grad():
        want = model.head(model.fc_norm(feats[:, 1:].mean(dim=1)))
    for layout, name in (("fairseq", "mean.pt"), ("sslam", "mean.safetensors")):
        path = write_checkpoint(ckpt, tmp_path / name, layout)
        back = load_model(path)
        assert back.cfg.pool == "mean"
        with torch.no_grad():
            assert_close(back.classify(feats), want)
            assert_close(back(expected["x1024"]), want)
    with pytest.raises(CheckpointError, match="mean-pooling"):
        write_checkpoint(ckpt, tmp_path / "hf", "hf")
