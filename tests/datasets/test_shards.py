"""Tar shards in the WebDataset layout as inputs: specs, indexing, decoding by offset, the commands on
shards (extract equal to loose files, tag on a shard list, eval with key.cls labels, finetune and
pretrain runs) and hostile shards reported one line each."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import CHECKPOINTS as FIX
from conftest import DATA, sslam

from sslam_core.audio.decode import audio_info, load_audio, stream_audio
from sslam_core.audio.files import AudioError
from sslam_core.audio.tar import TarMember, Unreadable, index_shard, split_key
from sslam_core.data.datasets import read_labelled
from sslam_core.data.inputs import collect_inputs
from sslam_core.data.shards import expand_braces, is_shard_spec, sample_labels, shard_paths
from sslam_core.data.training_clips import WaveformDataset, open_audio_dataset

FSDD = DATA / "fsdd_mini"  # Free Spoken Digit Dataset clips, CC BY-SA 4.0 (tests/data/LICENSES.md)
PRETRAIN = str(FIX / "tiny_pretrain.pt")
CLIPS = {"a": ["0_george_0", "1_george_0", "2_george_0"], "b": ["0_jackson_0", "1_jackson_0", "2_jackson_0"]}


def skipped_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("skipped:")]


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def digit_members(keys: list[str], folder: str = "") -> list[tuple[str, bytes]]:
    """key.wav + key.cls (the digit as a class index) + key.json (metadata, no labels) for fsdd clips."""
    out = []
    for key in keys:
        out.append((f"{folder}{key}.wav", (FSDD / f"{key}.wav").read_bytes()))
        out.append((f"{folder}{key}.cls", key[0].encode()))
        out.append((f"{folder}{key}.json", json.dumps({"speaker": key.split("_")[1]}).encode()))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """shards/digits-000.tar and -001.tar (three fsdd clips each), the same clips loose in loose/, a
    shard list shards.txt, and the stereo 48 kHz FLAC in a shard of its own."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "shards").mkdir()
    (root / "loose").mkdir()
    for i, keys in enumerate(CLIPS.values()):
        make_tar(root / "shards" / f"digits-{i:03d}.tar", digit_members(keys))
        for key in keys:
            shutil.copy(FSDD / f"{key}.wav", root / "loose" / f"{key}.wav")
    flac = (DATA / "typing_stereo_48k.flac").read_bytes()
    make_tar(root / "shards" / "typing.tar", [("rec/typing.flac", flac), ("rec/typing.txt", b"keys")])
    (root / "shards.txt").write_text("# two shards\nshards/digits-000.tar\n\nshards/digits-001.tar\n")
    return root


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, corpus) -> Path:
    """One good shard and one of each kind of bad one."""
    root = tmp_path_factory.mktemp("hostile")
    good = (corpus / "shards" / "digits-000.tar").read_bytes()
    shutil.copy(corpus / "shards" / "digits-000.tar", root / "good.tar")
    (root / "notatar.tar").write_bytes(b"this is a text file, not a tar archive\n" * 40)
    (root / "empty.tar").write_bytes(b"")
    make_tar(root / "nomembers.tar", [])
    (root / "compressed.tar.gz").write_bytes(gzip.compress(good))
    with tarfile.open(root / "good.tar") as tar:
        second_wav = [m for m in tar.getmembers() if m.name.endswith(".wav")][1]
    (root / "truncated.tar").write_bytes(good[: second_wav.offset_data + 100])
    damaged = bytearray(good)
    damaged[second_wav.offset : second_wav.offset + 512] = b"Z" * 512
    (root / "damaged.tar").write_bytes(bytes(damaged))
    fsdd = (FSDD / "0_george_1.wav").read_bytes()
    make_tar(
        root / "odd.tar",
        [("../../etc/passwd.wav", fsdd), ("notes.txt", b"not audio"), ("fake.wav", b"not a wav")],
    )
    huge = bytearray(make_tar(root / "tmp.tar", [("big.wav", fsdd)]).read_bytes())
    header = tarfile.TarInfo("big.wav")
    header.size = 10**11  # 100 GB claimed by a 20 kB file
    huge[:512] = header.tobuf(format=tarfile.GNU_FORMAT)
    (root / "tmp.tar").unlink()
    (root / "absurd.tar").write_bytes(bytes(huge))
    return root


# ---------------------------------------------------------------------------------------------------------
# Specs and indexing


def test_brace_patterns_expand_like_bash():
    assert expand_braces("s/as-{000..003}.tar") == [f"s/as-{i:03d}.tar" for i in range(4)]
    assert expand_braces("{8..10}.tar") == ["8.tar", "9.tar", "10.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("x-{a,{b,c}}.tar") == ["x-a.tar", "x-b.tar", "x-c.tar"]
    assert expand_braces("{2..0}.tar") == ["2.tar", "1.tar", "0.tar"]
    assert expand_braces("lit{a}.tar") == ["lit{a}.tar"]


def test_shard_specs_and_lists(corpus, tmp_path):
    lst = corpus / "shards.txt"
    assert is_shard_spec(str(lst)) and is_shard_spec("x-{0..9}.tar") and is_shard_spec("x.tar.gz")
    assert shard_paths(str(lst)) == [str(corpus / "shards" / f"digits-{i:03d}.tar") for i in range(2)]
    audio_list = tmp_path / "files.txt"
    audio_list.write_text("a.wav\nb.tar\n")
    assert not is_shard_spec(str(audio_list))  # not all entries are shards: an audio file list


def test_index_groups_members_by_key_and_reads_by_offset(corpus):
    assert split_key("a/b/x.seg1.flac") == ("a/b/x", "seg1.flac") and split_key("x.cls") == ("x", "cls")
    shard = str(corpus / "shards" / "digits-000.tar")
    index = index_shard(shard)
    assert [s.key for s in index.samples] == CLIPS["a"]
    member = index.samples[1].source
    assert isinstance(member, TarMember) and member.name == f"{shard}/1_george_0.wav"
    raw = (FSDD / "1_george_0.wav").read_bytes()
    assert member.size == len(raw) and member.open().read() == raw
    assert sample_labels(index.fields["1_george_0"]) == [1]
    again = pickle.loads(pickle.dumps(member))  # decoding may run in worker processes
    # a member decodes like a path (it is an AudioFile), block by block too
    assert torch.equal(
        torch.cat(list(stream_audio(again, block_seconds=1.0))), load_audio(FSDD / "1_george_0.wav")
    )
    assert audio_info(member)[3] == pytest.approx(load_audio(FSDD / "1_george_0.wav", 8000).numel() / 8000)
    typing = index_shard(str(corpus / "shards" / "typing.tar"))
    assert [s.source.name for s in typing.samples] == [str(corpus / "shards" / "typing.tar/rec/typing.flac")]


def test_names_read_back_through_the_shard(corpus):
    name = str(corpus / "shards" / "digits-001.tar" / "2_jackson_0.wav")
    assert torch.equal(load_audio(name), load_audio(FSDD / "2_jackson_0.wav"))
    dataset = WaveformDataset([name, str(FSDD / "0_george_0.wav")], target_length=64)
    assert isinstance(dataset.paths[0], TarMember) and dataset.path(0) == name  # indexed once, here
    with pytest.raises(AudioError, match="no audio member 'gone.wav'"):
        load_audio(str(corpus / "shards" / "digits-001.tar" / "gone.wav"))
    with pytest.raises(AudioError, match="a tar shard, not one audio file"):
        load_audio(str(corpus / "shards" / "digits-001.tar"))


def test_pyav_decodes_members_like_files(tmp_path):
    pytest.importorskip("av")
    from sslam_core.audio.decode import _av_blocks

    mp3 = DATA / "acoustic_scene_2s.mp3"
    shard = make_tar(tmp_path / "s.tar", [("scene.mp3", mp3.read_bytes())])
    member = index_shard(str(shard)).samples[0].source
    (rate, a), (same, b) = _av_blocks(member), _av_blocks(mp3)
    assert rate == same and torch.equal(torch.cat(list(a)), torch.cat(list(b)))


# ---------------------------------------------------------------------------------------------------------
# Commands


def test_extract_on_shards_equals_the_loose_files(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(corpus)
    common = ["-c", PRETRAIN, "--device", "cpu", "--target-length", "256"]
    sslam("extract", "loose", "-o", tmp_path / "loose.h5", *common)
    sslam("extract", "shards/digits-{000..001}.tar", "-o", tmp_path / "shards.h5", *common)
    with h5py.File(tmp_path / "loose.h5") as a, h5py.File(tmp_path / "shards.h5") as b:
        names = [p.decode() for p in b["paths"][:]]
        order = [p.decode() for p in a["paths"][:]]
        keys = [n.rsplit("/", 1)[1] for n in names]
        assert names[:2] == ["shards/digits-000.tar/0_george_0.wav", "shards/digits-000.tar/1_george_0.wav"]
        rows = [order.index(k) for k in keys]
        assert np.array_equal(a["clip"][:][rows], b["clip"][:])  # bit for bit
        assert np.array_equal(a["duration"][:][rows], b["duration"][:])


def test_tag_on_a_shard_list(corpus, monkeypatch):
    monkeypatch.chdir(corpus)
    out = sslam("tag", "shards.txt", "-c", FIX / "tiny_finetuned.pt", "--format", "json", "--window", "2.56")
    paths = [json.loads(line)["path"] for line in out.stdout.splitlines()]
    assert paths == [f"shards/digits-000.tar/{k}.wav" for k in CLIPS["a"]] + [
        f"shards/digits-001.tar/{k}.wav" for k in CLIPS["b"]
    ]


def test_shard_list_entries_are_named_without_dotdot(corpus, tmp_path, monkeypatch):
    (corpus / "lists").mkdir(exist_ok=True)
    (corpus / "lists" / "up.txt").write_text("../shards/digits-001.tar\n")
    monkeypatch.chdir(corpus)
    out = sslam(
        "tag", "lists/up.txt", "-c", FIX / "tiny_finetuned.pt", "--format", "json", "--window", "2.56"
    )
    paths = [json.loads(line)["path"] for line in out.stdout.splitlines()]
    assert paths == [f"shards/digits-001.tar/{k}.wav" for k in CLIPS["b"]]  # was lists/../shards/...


@pytest.fixture(scope="module")
def digit_classifier(tmp_path_factory) -> Path:
    from sslam_core.models.layouts.native import save_checkpoint
    from sslam_core.models.transformer import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(embed_dim=32, depth=1, num_heads=2, max_length=64, num_classes=3))
    path = tmp_path_factory.mktemp("ckpt") / "digits.safetensors"
    labels = [("0", "zero"), ("1", "one"), ("2", "two")]
    save_checkpoint(path, model.cfg, model.state_dict(), labels=labels, extra={"multilabel": False})
    return path


def test_labels_from_cls_and_json(corpus, tmp_path):
    data = read_labelled(str(corpus / "shards.txt"))
    assert data.classes == [("0", "0"), ("1", "1"), ("2", "2")] and not data.multilabel
    assert [e.labels for e in data.examples] == [[0], [1], [2]] * 2
    assert isinstance(data.examples[0].source, TarMember) and data.examples[0].key == "0_george_0"
    named = read_labelled(str(corpus / "shards" / "digits-000.tar"), classes=["zero", "one", "two"])
    assert [e.labels for e in named.examples] == [[0], [1], [2]]  # "0" in key.cls is class index 0
    only_json = make_tar(
        tmp_path / "j.tar",
        [("k.wav", (FSDD / "0_george_0.wav").read_bytes()), ("k.json", b'{"label": "dog"}')],
    )
    assert read_labelled(str(only_json)).classes == [("dog", "dog")]


def test_eval_with_cls_labels(corpus, digit_classifier, monkeypatch):
    monkeypatch.chdir(corpus)
    args = [
        "eval",
        "-c",
        digit_classifier,
        "--data",
        "shards.txt",
        "--target-length",
        "96",
        "--device",
        "cpu",
    ]
    report = json.loads(sslam(*args, "--format", "json").stdout)
    assert report["n_clips"] == 6 and report["n_classes"] == 3 and report["n_skipped"] == 0


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> str:
    from sslam_core.models.layouts.native import save_checkpoint
    from sslam_core.models.transformer import Encoder, ModelConfig

    cfg = ModelConfig(embed_dim=64, depth=2, num_heads=2, max_length=16)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "encoder.safetensors"
    save_checkpoint(path, cfg, Encoder(cfg).state_dict(), normalization=(-5.0, 4.0))
    return str(path)


@pytest.mark.slow
def test_finetune_and_pretrain_on_shards(corpus, encoder, tmp_path):
    shards = corpus / "shards"
    ft = ["finetune", "--data", shards / "digits-000.tar", "--valid", shards / "digits-001.tar"]
    ft += ["-c", encoder, "-o", tmp_path / "ft", "--steps", "2", "-b", "2"]
    r = sslam(*ft, "--target-length", "64", "--workers", "0", "--device", "cpu", "-q")
    report = json.loads(r.stdout.splitlines()[-1])
    assert (report["steps"], report["clips"], report["valid_clips"], report["classes"]) == (2, 3, 3, 3)
    pt = ["pretrain", shards / "digits-{000..001}.tar", shards / "typing.tar", "-o", tmp_path / "pt"]
    pt += ["--steps", "2", "--model", "tiny", "--batch-size", "2", "--target-length", "256"]
    r = sslam(*pt, "--clone-batch", "2", "--workers", "1", "--device", "cpu", "-q")
    report = json.loads(r.stdout.splitlines()[-1])
    assert (report["steps"], report["clips"], report["unreadable_skipped"]) == (2, 7, 0)


# ---------------------------------------------------------------------------------------------------------
# Hostile shards


EXPECTED_PROBLEMS = {
    "notatar.tar": "not a tar archive",
    "empty.tar": "shard is empty (0 bytes)",
    "nomembers.tar": "shard holds no members",
    "compressed.tar.gz": "compressed shard (gzip): members cannot be read by offset; decompress it",
    "truncated.tar/1_george_0.wav": "the shard holds 100 of them (truncated shard?)",
    "damaged.tar": "damaged tar header at byte",
    "odd.tar/notes.txt": "not audio (sample 'notes' has no audio member)",
    "odd.tar/fake.wav": "cannot decode audio",
    "absurd.tar/big.wav": "member claims 100000000000 bytes",
    "missing.tar": "shard not found",
}


def test_hostile_shards_are_one_line_each_and_the_good_members_run(hostile, tmp_path, monkeypatch):
    monkeypatch.chdir(hostile)
    shards = ["good.tar", "missing.tar", *sorted(p.name for p in hostile.iterdir() if p.name != "good.tar")]
    r = sslam("extract", *shards, "-o", tmp_path / "f.h5", "-c", PRETRAIN, "--device", "cpu", code=1)
    lines = skipped_lines(r)
    assert len(lines) == len(EXPECTED_PROBLEMS), lines
    for name, reason in EXPECTED_PROBLEMS.items():
        assert sum(f"skipped: {name}: " in line and reason in line for line in lines) == 1, (name, lines)
    with h5py.File(tmp_path / "f.h5") as f:
        written = [p.decode() for p in f["paths"][:]]
    good = [f"good.tar/{k}.wav" for k in CLIPS["a"]]
    kept = ["truncated.tar/0_george_0.wav", "damaged.tar/0_george_0.wav", "odd.tar/../../etc/passwd.wav"]
    assert written == good + sorted(kept, key=lambda n: shards.index(n.split("/")[0]))
    assert not (hostile.parent / "etc").exists()


def test_hostile_shards_in_labelled_sets_and_training_data(hostile):
    inputs = collect_inputs([str(hostile / "absurd.tar"), str(hostile / "good.tar")])
    assert isinstance(inputs.paths[0], Unreadable) and len(inputs) == 4
    data = read_labelled(str(hostile / "truncated.tar"))
    assert [type(e.source) for e in data.examples] == [TarMember, Unreadable]
    dataset = open_audio_dataset([str(hostile / "damaged.tar")], target_length=64)
    assert isinstance(dataset, WaveformDataset) and len(dataset) == 2
    item = dataset[1]  # the damage: replaced by the next readable clip, and said why
    assert item["index"] == 0 and item["skipped"][0][0] == str(hostile / "damaged.tar")
    from sslam_core.data.label_formats import DatasetError

    with pytest.raises(DatasetError, match="notatar.tar: not a tar archive"):
        open_audio_dataset([str(hostile / "notatar.tar"), str(hostile / "empty.tar")])
    assert len(open_audio_dataset([str(hostile / "notatar.tar"), str(hostile / "good.tar")])) == 4


def test_integer_labels_index_the_model_classes_and_agree_with_a_labels_csv(tmp_path):
    """Under a model, key.cls indices name its classes (74 = AudioSet's "Dog"'s index there) and
    key.json names / ids match them, even side by side; without a model the classes are the ones used,
    as a labels.csv of the same clips gives them (a shard used to give 0..max, classes without clips
    included, and eval refused indices it could not find among the model's names)."""
    from conftest import TINY_FINETUNED

    from sslam_core.data.labels import audioset_labels

    keys = ["0_george_0", "1_george_0", "2_george_0", "0_jackson_0", "1_jackson_0"]
    wav = {k: (FSDD / f"{k}.wav").read_bytes() for k in keys}
    indices = {"0_george_0": 74, "1_george_0": 0, "2_george_0": 74, "0_jackson_0": 0, "1_jackson_0": 3}
    make_tar(
        tmp_path / "a.tar",
        [m for k in keys[:3] for m in ((f"{k}.wav", wav[k]), (f"{k}.cls", b"%d" % indices[k]))],
    )
    names = audioset_labels()
    make_tar(
        tmp_path / "b.tar",
        [
            m
            for k in keys[3:]
            for m in (
                (f"{k}.wav", wav[k]),
                (f"{k}.json", json.dumps({"label": names[indices[k]][1]}).encode()),
            )
        ],
    )
    (tmp_path / "ab.txt").write_text("a.tar\nb.tar\n")
    under_model = read_labelled(str(tmp_path / "ab.txt"), index_classes=names)
    assert under_model.classes == [names[0], names[3], names[74]]
    assert [e.labels for e in under_model.examples] == [[2], [0], [2], [0], [1]]
    alone = read_labelled(str(tmp_path / "a.tar"))  # no model: the indices used, named by themselves
    assert alone.classes == [("0", "0"), ("74", "74")] and [e.labels for e in alone.examples] == [
        [1],
        [0],
        [1],
    ]
    (tmp_path / "labels.csv").write_text(
        "filename,labels\n" + "".join(f"{FSDD / k}.wav,{indices[k]}\n" for k in keys[:3])
    )
    assert len(read_labelled(str(tmp_path)).classes) == len(alone.classes)
    report = json.loads(
        sslam(
            "eval",
            "-c",
            TINY_FINETUNED,
            "--data",
            tmp_path / "ab.txt",
            "--target-length",
            "96",
            "--device",
            "cpu",
            "--format",
            "json",
        ).stdout  # fmt: skip
    )
    assert report["n_clips"] == 5 and report["n_classes"] == 3


def test_a_class_list_for_a_model_without_names_and_for_finetuning(corpus, tmp_path):
    from sslam_core.models.layouts.native import save_checkpoint
    from sslam_core.models.transformer import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(embed_dim=32, depth=1, num_heads=2, max_length=64, num_classes=3))
    nameless = tmp_path / "nameless.safetensors"
    save_checkpoint(nameless, model.cfg, model.state_dict(), extra={"multilabel": False})
    classes = tmp_path / "classes.txt"
    classes.write_text("zero\none\ntwo\n")
    common = ["--data", corpus / "shards.txt", "--target-length", "96", "--device", "cpu", "--format", "json"]
    refused = sslam("eval", "-c", nameless, *common, code=2)
    assert "no class names" in refused.stderr
    report = json.loads(sslam("eval", "-c", nameless, *common, "--classes", classes).stdout)
    assert report["n_clips"] == 6 and report["n_classes"] == 3
    short = tmp_path / "two.txt"
    short.write_text("zero\none\n")
    assert "--classes" in sslam("eval", "-c", nameless, *common, "--classes", short, code=2).stderr
    run = tmp_path / "run"
    sslam("finetune", "--data", corpus / "shards.txt", "--classes", classes, "--model", "tiny",
          "--steps", "1", "-b", "2", "--target-length", "96", "--device", "cpu", "-o", run, "-q")  # fmt: skip
    from sslam_core.models.factory import load_model

    assert load_model(run).labels == [("zero", "zero"), ("one", "one"), ("two", "two")]


@pytest.mark.slow
def test_finetune_reports_unreadable_training_and_validation_clips(corpus, tmp_path):
    """A junk file among the training clips and a truncated member and a sample without audio in the
    validation shard: one `skipped:` line each (no Python warning), the counts of the clips used, and
    exit status 1, as every other command (they were a raw warning, or nothing, and status 0)."""
    train = tmp_path / "train"
    train.mkdir()
    keys = [k for ks in CLIPS.values() for k in ks]
    for key in keys:
        (train / f"{key}.wav").write_bytes((FSDD / f"{key}.wav").read_bytes())
    (train / "junk.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio")
    rows = [f"{key}.wav,{key[0]}" for key in keys] + ["junk.wav,1"]
    (train / "labels.csv").write_text("filename,labels\n" + "\n".join(rows) + "\n")
    good = [m for m in digit_members(CLIPS["a"][:2])]
    cut = (FSDD / "2_george_0.wav").read_bytes()
    valid = make_tar(
        tmp_path / "valid.tar",
        [*good, ("lonely.cls", b"1"), ("2_george_0.cls", b"2"), ("2_george_0.wav", cut)],
    )
    with open(valid, "r+b") as f:  # the last member claims more bytes than the shard holds
        f.truncate(valid.stat().st_size - 1024 - len(cut) // 2)
    run = sslam("finetune", "--data", train, "--valid", valid, "--model", "tiny", "--steps", "4", "-b", "2",
                "--target-length", "96", "--device", "cpu", "-o", tmp_path / "run", code=1)  # fmt: skip
    lines = skipped_lines(run)
    assert "Warning" not in run.stderr, run.stderr
    assert sum("junk.wav" in line for line in lines) <= 1  # met if drawn in the 4 steps
    assert sum("lonely.cls: not audio" in line for line in lines) == 1
    assert sum("2_george_0.wav: member claims" in line for line in lines) == 1
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["valid_clips"] == 2 and report["skipped"] == len(lines)
    assert report["clips"] == len(keys) + 1 - sum("junk.wav" in line for line in lines)
