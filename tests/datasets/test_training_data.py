"""Training clips from files and packed shards: crops, sharding, device batches, packing, bad files."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch
from conftest import DATA

from sslam_core.audio.decode import load_audio
from sslam_core.audio.frontend import prepare_input
from sslam_core.data.packing import pack_audio
from sslam_core.data.training_clips import (
    AudioBatches,
    PackedDataset,
    UnreadableAudioWarning,
    WaveformDataset,
    crop_samples,
    open_audio_dataset,
    shard_indices,
)

DIGITS = sorted(str(p) for p in (DATA / "polydigits" / "audio").glob("*.wav"))  # 2 s each at 8 kHz
LONG = str(DATA / "real_32k.wav")  # 10 s at 32 kHz
T = 64  # frames per training crop: 400 + 63 * 160 = 10,480 samples


@pytest.fixture
def broken(tmp_path) -> str:
    path = tmp_path / "broken.wav"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    return str(path)


def test_crop_length_and_sharding():
    assert crop_samples(1024) == 164_080 and crop_samples(T) == 10_480
    shards = [shard_indices(11, epoch_seed=5, rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    assert len(set(sum(shards, []))) == 9 and set(sum(shards, [])) <= set(range(11))
    assert shards[0] == shard_indices(11, 5, 0, 3) and shards[0] != shard_indices(11, 6, 0, 3)[:3]
    assert shard_indices(4, 0, 0, 1, shuffle=False) == [0, 1, 2, 3]


def test_random_crop_is_a_seeded_slice_of_the_clip():
    ds = WaveformDataset([LONG] + DIGITS, target_length=T)
    full = load_audio(LONG)
    a, b, other = ds[(0, 3)]["wave"], ds[(0, 3)]["wave"], ds[(0, 4)]["wave"]
    assert a.shape == (crop_samples(T),) and torch.equal(a, b) and not torch.equal(a, other)
    start = int(torch.nonzero((full.unfold(0, 8, 1) == a[:8]).all(1))[0])
    assert torch.equal(full[start : start + crop_samples(T)], a)
    whole = WaveformDataset(DIGITS, target_length=1024)[1]  # 32,000 samples < one 1024-frame crop
    assert torch.equal(whole["wave"], load_audio(DIGITS[1])) and whole["index"] == 1


def test_unreadable_file_is_replaced_warned_and_counted(broken):
    ds = WaveformDataset([DIGITS[0], broken, DIGITS[1], DIGITS[2]], target_length=T)
    item = ds[(1, 0)]
    assert item["index"] == 2 and item["skipped"][0][0] == broken
    batches = AudioBatches(ds, batch_size=2, shuffle=False)
    with pytest.warns(UnreadableAudioWarning, match="broken.wav"):
        out = list(batches(epoch_seed=0, rank=0, world_size=1, start_position=0))
    assert len(out) == 2 and [b["source"].shape for b in out] == [(2, 1, T, 128)] * 2
    assert out[0]["index"].tolist() == [0, 2] and len(batches.skipped) == 1


def test_device_batches_match_prepare_input_and_resume_midway():
    ds = WaveformDataset(DIGITS + [LONG], target_length=T)
    batches = AudioBatches(ds, batch_size=2)
    first = list(batches(epoch_seed=9, rank=0, world_size=1, start_position=0))
    assert len(first) == 2
    waves = [ds[(i, 9)]["wave"] for i in first[1]["index"].tolist()]
    torch.testing.assert_close(first[1]["source"], prepare_input(waves, target_length=T), rtol=0, atol=0)
    later = list(batches(epoch_seed=9, rank=0, world_size=1, start_position=1))
    assert len(later) == 1 and torch.equal(later[0]["source"], first[1]["source"])
    workers = list(AudioBatches(ds, batch_size=2, num_workers=2)(9, 0, 1, 0))
    assert all(torch.equal(a["source"], b["source"]) for a, b in zip(first, workers, strict=True))


def test_pack_round_trip_resume_and_skip(tmp_path, broken):
    inputs = [DIGITS[0], broken, DIGITS[1], DIGITS[2], LONG]
    report = pack_audio(inputs, tmp_path / "packed", shard_size=2, progress=False)
    assert (report.clips, report.shards_written, report.shards_reused) == (4, 3, 0)
    assert report.skipped == [(broken, report.skipped[0][1])] and report.skipped[0][1]
    index = json.loads((tmp_path / "packed" / "index.json").read_text())
    assert [s["file"] for s in index["shards"]] == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    assert [s["clips"] for s in index["shards"]] == [1, 2, 1] and index["skipped"][0]["path"] == broken
    with h5py.File(tmp_path / "packed" / "shard-00001.h5", "r") as f:
        assert f["audio"].dtype == np.int16 and f.attrs["sample_rate"] == 16000
        assert f["offsets"][:].tolist() == [0, 32000, 64000]
        assert [p.decode() for p in f["paths"][:]] == DIGITS[1:]

    packed = PackedDataset(tmp_path / "packed", target_length=1024, random_crop=False)
    assert len(packed) == 4
    for i, path in enumerate([DIGITS[0], DIGITS[1], DIGITS[2], LONG]):
        assert packed.path(i) == path
        expected = load_audio(path)[: crop_samples(1024)]
        got = packed[i]["wave"]
        assert got.shape == expected.shape and (got - expected).abs().max() <= 1 / 32768

    before = os.path.getmtime(tmp_path / "packed" / "shard-00000.h5")
    again = pack_audio(inputs, tmp_path / "packed", shard_size=2, progress=False)
    assert (again.clips, again.shards_written, again.shards_reused, len(again.skipped)) == (4, 0, 3, 1)
    assert os.path.getmtime(tmp_path / "packed" / "shard-00000.h5") == before


def test_packed_dataset_is_a_drop_in_for_files(tmp_path):
    pack_audio([LONG, *DIGITS], tmp_path / "packed", shard_size=3, progress=False)
    packed = open_audio_dataset(str(tmp_path / "packed"), target_length=T)
    files = open_audio_dataset([LONG, *DIGITS], target_length=T)
    assert isinstance(packed, PackedDataset) and isinstance(files, WaveformDataset)
    for i in range(4):
        a, b = packed[(i, 21)]["wave"], files[(i, 21)]["wave"]
        assert a.shape == b.shape == (crop_samples(T),) and (a - b).abs().max() <= 1 / 32768
    with pytest.raises(ValueError, match="mix of packed"):
        open_audio_dataset([str(tmp_path / "packed"), LONG])


def test_pack_command(tmp_path, broken):
    from typer.testing import CliRunner

    from sslam_cli.main import app

    args = ["pack", *DIGITS, broken, "-o", str(tmp_path / "p"), "--shard-size", "2", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "packed 3 clips" in result.output and "1 unreadable" in result.output
    assert len(PackedDataset(tmp_path / "p")) == 3
    missing = CliRunner().invoke(app, ["pack", str(tmp_path / "nope"), "-o", str(tmp_path / "q")])
    assert missing.exit_code == 2 and "no such file" in missing.output
