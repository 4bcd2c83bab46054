"""`sslam tag` / `sslam extract` end to end against the official outputs, long files, bad files, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf
from conftest import CHECKPOINTS as FIX
from conftest import ROOT
from conftest import sslam_process as sslam

PRETRAIN = str(FIX / "tiny_pretrain.pt")
FINETUNED = str(FIX / "tiny_finetuned.pt")
CLIP = ROOT / "tests" / "data" / "real_32k.wav"  # = fixture input real_32k (row 1 of expected.npz)
ROBIN = ROOT / "tests" / "data" / "robin.ogg"
EXPECTED = np.load(FIX / "expected.npz")


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory) -> Path:
    """25 s at 44.1 kHz stereo: the fixture clip, its reverse, and a quieter copy."""
    wave, sr = sf.read(CLIP, dtype="float32")
    x = np.concatenate([wave, wave[::-1], 0.5 * wave])[: 25 * sr]
    t = np.arange(int(len(x) * 44100 / sr)) * sr / 44100
    y = np.interp(t, np.arange(len(x)), x).astype(np.float32)
    path = tmp_path_factory.mktemp("long") / "long.wav"
    sf.write(path, np.stack([y, 0.8 * y], axis=1), 44100)
    return path


@pytest.mark.slow
def test_tag_json_matches_official_probabilities():
    out = sslam("tag", str(CLIP), "-c", FINETUNED, "--format", "json", "--top-k", "5").stdout
    obj = json.loads(out)
    probs = EXPECTED["ft_probs_1024"][1]
    order = np.argsort(-probs)[:5]
    assert obj["path"] == str(CLIP) and abs(obj["duration"] - 10.0) < 1e-6
    assert [lab["score"] for lab in obj["labels"]] == pytest.approx(probs[order].tolist(), abs=1e-4)
    names = [
        line.split(",", 2)
        for line in (ROOT / "sslam_core/data_files/class_labels_indices.csv").read_text().splitlines()[1:]
    ]
    assert [lab["mid"] for lab in obj["labels"]] == [names[i][1] for i in order]


@pytest.mark.slow
def test_tag_timeline_clip_score_is_max_over_windows(long_wav, tmp_path):
    csv_out = tmp_path / "tags.csv"
    sslam(
        "tag",
        str(long_wav),
        "-c",
        FINETUNED,
        "--timeline",
        "--format",
        "json",
        "-o",
        str(tmp_path / "t.json"),
    )
    obj = json.loads((tmp_path / "t.json").read_text())
    segs = obj["segments"]
    assert len(segs) == 3  # 2498 frames: windows at 0, 1024 and 2048 frames
    assert [s["start"] for s in segs] == [0.0, 10.24, 20.48] and segs[-1]["end"] == pytest.approx(
        25.0, abs=1e-3
    )
    for lab in obj["labels"]:
        assert lab["score"] == pytest.approx(max(s["scores"][lab["label"]] for s in segs), abs=1e-6)
    sslam(
        "tag",
        str(long_wav),
        "-c",
        FINETUNED,
        "--timeline",
        "--format",
        "csv",
        "-o",
        str(csv_out),
        "--hop",
        "5.12",
    )
    rows = csv_out.read_text().splitlines()
    assert rows[0] == "path,scope,start,end,rank,label,mid,score"
    starts = sorted({float(r.split(",")[2]) for r in rows[1:] if ",segment," in r})
    assert starts == pytest.approx([0.0, 5.12, 10.24, 15.36])


@pytest.mark.slow
def test_extract_h5_matches_official_outputs(tmp_path):
    out = tmp_path / "f.h5"
    sslam("extract", str(CLIP), "-o", str(out), "-c", PRETRAIN, "--granularity", "all")
    ref = EXPECTED["pre_all_1024"][1]
    with h5py.File(out) as h5:
        assert h5["paths"].asstr()[:].tolist() == [str(CLIP)]
        np.testing.assert_allclose(h5["clip"][0], ref[0], atol=1e-4)
        np.testing.assert_allclose(h5["patch/data"][:], ref[1:], atol=1e-4)
        assert h5["patch/offsets"][:].tolist() == [0, 512]
        frames = h5["frame/data"][:]
        assert h5["frame/offsets"][:].tolist() == [0, 63]  # 998 frames -> 63 steps of 160 ms
        np.testing.assert_allclose(frames, ref[1:].reshape(64, 8, -1).mean(1)[:63], atol=1e-4)
        np.testing.assert_allclose(h5["frame/times"][:], np.arange(63) * 0.16, atol=1e-9)
        assert h5.attrs["target_length"] == 1024 and h5.attrs["granularity"] == "all"
        assert len(h5.attrs["checkpoint_sha256"]) == 64 and h5["errors/paths"].shape == (0,)


@pytest.mark.slow
def test_extract_layer_and_teacher(tmp_path):
    out = tmp_path / "l1.h5"
    sslam("extract", str(CLIP), "-o", str(out), "-c", PRETRAIN, "--layer", "1")
    with h5py.File(out) as h5:
        np.testing.assert_allclose(h5["clip"][0], EXPECTED["layers_1024"][1, 0, 0], atol=1e-4)
    sslam("extract", str(CLIP), "-o", str(out), "-c", PRETRAIN, "--teacher", "--overwrite")
    with h5py.File(out) as h5:
        np.testing.assert_allclose(h5["clip"][0], EXPECTED["ema_all_1024"][1, 0], atol=1e-4)
    bad = sslam("extract", str(CLIP), "-o", str(out), "-c", PRETRAIN, "--layer", "3", "--overwrite", check=2)
    assert "layer 3" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_extract_long_file_windows(long_wav, tmp_path):
    out = tmp_path / "long.h5"
    sslam("extract", str(long_wav), "-o", str(out), "-c", PRETRAIN, "-g", "all")
    with h5py.File(out) as h5:
        assert h5["duration"][0] == pytest.approx(25.0, abs=1e-3)
        assert h5["patch/offsets"][-1] == 3 * 512
        times = h5["frame/times"][:]
        assert len(times) == 157 and np.all(np.diff(times) == pytest.approx(0.16))
        first_window_cls = h5["clip"][0]
    assert np.isfinite(first_window_cls).all()


def _bad_folder(root: Path) -> list[str]:
    wave, sr = sf.read(CLIP, dtype="float32")
    (root / "sub").mkdir(parents=True)
    sf.write(root / "a.wav", wave[: sr * 3], sr)
    sf.write(root / "sub" / "b.flac", wave[: sr * 2], sr)
    (root / "empty.wav").write_bytes(b"")
    (root / "garbage.wav").write_bytes(os.urandom(3000))
    sf.write(root / "zero.wav", np.zeros((0,), np.float32), 16000)
    nan = wave[:16000].copy()
    nan[100] = np.nan
    sf.write(root / "nan.wav", nan, 16000, subtype="FLOAT")
    with open(root / "a.wav", "rb") as f:
        (root / "truncated.wav").write_bytes(f.read(30))
    return ["a.wav", "sub/b.flac"]


@pytest.mark.slow
def test_bad_files_are_reported_and_skipped(tmp_path):
    good = _bad_folder(tmp_path / "in")
    out = tmp_path / "out.h5"
    proc = sslam("extract", str(tmp_path / "in"), "-o", str(out), "-c", PRETRAIN, check=1)
    assert "Traceback" not in proc.stderr
    for name in ("empty.wav", "garbage.wav", "zero.wav", "nan.wav", "truncated.wav"):
        assert sum(name in line for line in proc.stderr.splitlines() if "skipped:" in line) == 1
    with h5py.File(out) as h5:
        assert sorted(h5["paths"].asstr()[:].tolist()) == sorted(good)
        assert len(h5["errors/paths"]) == 5 and all(h5["errors/reasons"].asstr()[:])
    tagged = sslam("tag", str(tmp_path / "in"), "-c", FINETUNED, "-f", "json", check=1)
    assert sorted(json.loads(line)["path"] for line in tagged.stdout.splitlines()) == sorted(good)


@pytest.mark.slow
def test_missing_checkpoint_is_one_line(tmp_path):
    proc = sslam("tag", str(CLIP), "-c", str(tmp_path / "nope.pt"), check=2)
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    wave, sr = sf.read(CLIP, dtype="float32")
    src = tmp_path / "in"
    src.mkdir()
    for i in range(24):
        sf.write(src / f"c{i:02d}.wav", np.roll(wave, 1000 * i)[: sr * 4], sr)
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    sslam("extract", str(src), "-o", str(full), "-c", PRETRAIN, "-g", "all", "-b", "2")
    cmd = [
        sys.executable,
        "-m",
        "sslam_cli",
        "extract",
        str(src),
        "-o",
        str(part),
        "-c",
        PRETRAIN,
        "-g",
        "all",
        "-b",
        "2",
        "--flush-every",
        "2",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = Path(str(part) + ".parts")
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("part-*.npz"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not part.exists()  # nothing half-written
    resumed = sslam("extract", str(src), "-o", str(part), "-c", PRETRAIN, "-g", "all", "-b", "2", "--resume")
    assert "from the interrupted run" in resumed.stderr
    with h5py.File(full) as a, h5py.File(part) as b:
        for key in ("paths", "duration", "clip", "patch/data", "patch/offsets", "frame/data", "frame/times"):
            np.testing.assert_array_equal(a[key][:], b[key][:])
    assert not parts.exists()


@pytest.mark.slow
def test_hear_api_and_python_api():
    import torch

    import sslam_core
    from sslam_core import hear

    wave, sr = sf.read(CLIP, dtype="float32")
    x16 = sslam_core.resample(torch.from_numpy(wave), sr, 16000)
    model = hear.load_model(PRETRAIN)
    scene = hear.get_scene_embeddings(x16[None].repeat(2, 1), model)
    np.testing.assert_allclose(scene[0].numpy(), EXPECTED["pre_all_1024"][1, 0], atol=1e-4)
    emb, ts = hear.get_timestamp_embeddings(x16[None], model)  # every 40 ms, within HEAR's 50 ms
    assert emb.shape == (1, 249, 64) and ts[0, :3].tolist() == pytest.approx([80.0, 120.0, 160.0])
    assert ts[0, -1].item() == pytest.approx(10000.0)  # no step centred past the 10 s of audio (10040)
    coarse, ts160 = hear.get_timestamp_embeddings(x16[None], hear.load_model(PRETRAIN, frame_hop=0.16))
    assert coarse.shape == (1, 63, 64) and ts160[0, :2].tolist() == pytest.approx([80.0, 240.0])
    np.testing.assert_array_equal(emb[0, ::4].numpy(), coarse[0].numpy())  # the unshifted pass
    fb = sslam_core.fbank(x16[None])
    assert fb.shape == (1, 998, 128)
    feats = sslam_core.load_model(PRETRAIN)(torch.from_numpy(EXPECTED["x1024"]))
    np.testing.assert_allclose(feats.detach().numpy(), EXPECTED["pre_all_1024"], atol=1e-4)


def test_streamed_long_files_equal_decoded_ones(long_wav, monkeypatch):
    from sslam_core.inference import windows
    from sslam_core.inference.embeddings import embed
    from sslam_core.models.factory import load_model

    model = load_model(PRETRAIN)
    eager = next(embed(model, [str(long_wav)], granularity="all", batch_size=2))
    monkeypatch.setattr(windows, "STREAM_SECONDS", 1.0)
    lazy = next(embed(model, [str(long_wav), str(CLIP)], granularity="all", batch_size=2, workers=1))
    assert lazy.duration == eager.duration
    for name in ("clip", "patch", "frame", "frame_times"):
        np.testing.assert_array_equal(getattr(lazy, name), getattr(eager, name))


@pytest.mark.slow
def test_frame_hop_passes_equal_runs_on_the_shifted_audio(tmp_path):
    """`--frame-hop 0.04`: four passes; pass k's vectors are a plain run's on the audio from 40k ms on."""
    from sslam_core.audio.decode import load_audio

    robin16 = tmp_path / "robin16.wav"  # at 16 kHz, so that cutting the file equals skipping samples
    wave, sr = load_audio(ROBIN).numpy(), 16000
    sf.write(robin16, wave, sr, subtype="FLOAT")
    out = tmp_path / "fine.h5"
    sslam("extract", str(robin16), "-o", str(out), "-c", PRETRAIN, "-g", "frame", "--frame-hop", "0.04")
    with h5py.File(out) as f:
        times, frames = f["frame/times"][:], f["frame/data"][:]
        assert f.attrs["frame_hop"] == 0.04
    np.testing.assert_allclose(np.diff(times), 0.04, atol=1e-9)
    assert times[0] == 0 and times[-1] < 2.6987
    for k in (0, 2):
        cut = tmp_path / f"cut{k}.wav"
        sf.write(cut, wave[round(0.04 * k * sr) :], sr, subtype="FLOAT")
        plain = tmp_path / f"plain{k}.h5"
        sslam("extract", str(robin16 if k == 0 else cut), "-o", str(plain), "-c", PRETRAIN, "-g", "frame")
        with h5py.File(plain) as f:
            expect = f["frame/data"][:]
        np.testing.assert_allclose(frames[k::4][: len(expect)], expect, atol=1e-5)
    bad = sslam("extract", str(ROBIN), "-o", str(tmp_path / "x.h5"), "-c", PRETRAIN, "-g", "frame",
                "--frame-hop", "0.05", check=2)  # fmt: skip
    assert "0.16, 0.08, 0.04, 0.02, 0.01" in bad.stderr


def test_the_output_extension_names_the_format(tmp_path):
    """`-o tags.csv` writes CSV and `-o tags.json` JSON lines (a new user got a box-drawn table in a .csv
    file); --format wins; an unknown extension is a table; with --events `.tsv` is the DCASE format."""
    args = ("tag", CLIP, "-c", FINETUNED, "-k", "2", "--device", "cpu")
    sslam(*args, "-o", tmp_path / "tags.csv")
    rows = (tmp_path / "tags.csv").read_text().splitlines()
    assert rows[0] == "path,scope,start,end,rank,label,mid,score" and len(rows) == 3
    sslam(*args, "-o", tmp_path / "tags.JSON")
    assert len(json.loads((tmp_path / "tags.JSON").read_text())["labels"]) == 2
    sslam(*args, "-o", tmp_path / "forced.csv", "-f", "json")
    assert json.loads((tmp_path / "forced.csv").read_text())["path"] == str(CLIP)
    sslam(*args, "-o", tmp_path / "tags.txt")
    assert "┃" in (tmp_path / "tags.txt").read_text()
    sslam(*args, "--events", "--event-threshold", "0", "-o", tmp_path / "events.tsv")
    lines = (tmp_path / "events.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:2] == ["filename", "onset"] and len(lines) > 1
