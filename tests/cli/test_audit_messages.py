"""The second newcomer audit's smaller defects, through the public commands on real files: usage
errors in one line, options that do nothing said so, honest messages (threshold CSV lines, --labels,
empty folders, a sound file given as a data set), rounded windows noted, names without `..`, HDF5
reasons without the path twice, eval naming files as every command does, HEAR timestamps inside the
audio."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import DATA, TINY_FINETUNED, TINY_PRETRAIN, sslam

CLIP = DATA / "real_32k.wav"


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_bad_option_value_or_missing_argument_is_one_line():
    bad = sslam("tag", CLIP, "-c", TINY_FINETUNED, "--window", "abc", code=2)
    (line,) = lines(bad.stderr)  # the wording of the reason is click's
    assert line.startswith("error: Invalid value for '--window': ") and line.endswith(
        "(see sslam tag --help)"
    )
    missing = sslam("extract", "-c", TINY_PRETRAIN, code=2)
    assert lines(missing.stderr) == ["error: Missing argument 'PATHS'. (see sslam extract --help)"]
    unknown = sslam("eval", "--colar", "1", code=2)
    assert len(lines(unknown.stderr)) == 1 and "No such option: --colar" in unknown.stderr
    assert "Usage:" not in bad.stderr + missing.stderr + unknown.stderr


def test_help_lists_whole_summaries_and_says_what_tag_takes():
    top = sslam("--help", env={"COLUMNS": "120"}).stdout
    commands = top[top.index("Commands:") :]
    assert "..." not in commands and "Fine-tune or linear-probe a classifier on a labelled set." in top
    tag_help = " ".join(sslam("tag", "--help", env={"COLUMNS": "200"}).stdout.split())
    assert "tar shards" in tag_help and "PATHS..." in tag_help and "{paths}" not in tag_help
    assert "[default: the window; with --events a quarter of it]" in tag_help


def test_options_that_do_nothing_are_noted():
    tagged = sslam("tag", CLIP, "-c", TINY_FINETUNED, "-k", "1", "--frame-scores", "token", "--median", "0.2")
    assert "note: --median, --frame-scores apply only with --events; ignored" in lines(tagged.stderr)
    plain = sslam("tag", CLIP, "-c", TINY_FINETUNED, "-k", "1")
    assert "ignored" not in plain.stderr


def test_eval_notes_strong_options_without_strong_and_names_files_as_given(tmp_path, monkeypatch):
    """eval named files by absolute path in --predictions-out and skipped: lines; a labelled folder's
    clips are named relative to it, as `tag FOLDER` names them."""
    from sslam_core.models.layouts.native import save_checkpoint
    from sslam_core.models.transformer import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(embed_dim=32, depth=1, num_heads=2, max_length=64, num_classes=10))
    save_checkpoint(tmp_path / "d.safetensors", model.cfg, model.state_dict(),
                    labels=[(str(i), str(i)) for i in range(10)], extra={"multilabel": False})  # fmt: skip
    shutil.copytree(DATA / "fsdd_mini", tmp_path / "set")
    (tmp_path / "set" / "0_george_0.wav").write_bytes(b"RIFF\x00\x00\x00\x00not audio")
    monkeypatch.chdir(tmp_path)
    args = ["eval", "-c", "d.safetensors", "--data", "set", "--target-length", "64", "-f", "json"]
    result = sslam(*args, "--collar", "0.5", "--predictions-out", "p.npz", code=1)
    assert "note: --collar applies only with --strong; ignored" in result.stderr
    assert "skipped: 0_george_0.wav: cannot decode audio" in result.stderr
    saved = np.load("p.npz")
    assert "0_george_1.wav" in saved["paths"].tolist() and not any("/" in p for p in saved["paths"])
    assert saved["skipped"][0].startswith("0_george_0.wav: ")


def test_a_sound_file_as_data_set_says_so():
    result = sslam("eval", "-c", TINY_FINETUNED, "--data", CLIP, code=2)
    assert lines(result.stderr) == [
        f"error: {CLIP}: an audio file, not a labelled set (give a labels CSV, a folder with labels.csv, "
        "ESC-50, AudioSet CSV, fairseq manifest, strong-label TSV or tar shards)"
    ]


def test_bogus_cpu_capability_is_refused():
    result = sslam("tag", CLIP, "-c", TINY_FINETUNED, "--precision", "auto", code=2,
                   env={"SSLAM_CPU_CAPABILITY": "bogus"})  # fmt: skip
    assert lines(result.stderr) == [
        "error: SSLAM_CPU_CAPABILITY='bogus': bogus is not a CPU feature sslam knows; give flags as "
        "/proc/cpuinfo names them (amx_bf16, avx2, avx512_bf16, avx512f, ...) or none"
    ]
    chosen = sslam("tag", CLIP, "-c", TINY_FINETUNED, "--precision", "auto", "-k", "1",
                   env={"SSLAM_CPU_CAPABILITY": "avx2 fma"})  # fmt: skip
    assert "--precision auto runs int8" in chosen.stderr  # the flags are read; int8 keeps its results


def test_threshold_csv_lines_and_a_missing_file(tmp_path):
    table = tmp_path / "thresholds.csv"
    table.write_text("label,threshold\nSpeech,0.3\n\nMusic,abc\n")
    bad = sslam("tag", CLIP, "-c", TINY_FINETUNED, "--events", "--event-threshold", table, code=2)
    assert lines(bad.stderr) == [
        f"error: --event-threshold {table}: {table}: line 4 'Music,abc': expected LABEL,THRESHOLD for a "
        "class of the model"
    ]
    missing = sslam(
        "tag", CLIP, "-c", TINY_FINETUNED, "--events", "--event-threshold", "nonexist.csv", code=2
    )
    assert lines(missing.stderr) == [
        "error: --event-threshold nonexist.csv: neither a number nor a CSV file of LABEL,THRESHOLD"
    ]


def test_labels_of_the_wrong_length_and_an_empty_folder(tmp_path):
    names = tmp_path / "labels.csv"
    names.write_text("dog\ncat\n")
    wrong = sslam("tag", CLIP, "-c", TINY_FINETUNED, "--labels", names, code=2)
    assert lines(wrong.stderr) == [f"error: --labels {names}: 2 class names, but the model has 527"]
    (tmp_path / "empty").mkdir()
    empty = sslam("extract", tmp_path / "empty", "-c", TINY_PRETRAIN, "-o", tmp_path / "e.h5", code=2)
    assert len(lines(empty.stderr)) == 1 and lines(empty.stderr)[0].startswith(
        f"error: {tmp_path / 'empty'}: no audio files"
    )


def test_rounded_windows_are_noted():
    result = sslam("tag", CLIP, "-c", TINY_FINETUNED, "-k", "1", "--window", "5", "--hop", "1")
    assert "note: --window 5 s runs as 4.96 s (whole 160 ms patches)" in lines(result.stderr)
    assert "note: --hop 1 s runs as 0.96 s (whole 160 ms patches)" in lines(result.stderr)
    exact = sslam("tag", CLIP, "-c", TINY_FINETUNED, "-k", "1", "--window", "4.96", "--hop", "0.96")
    assert "whole 160 ms patches" not in exact.stderr


def test_list_entries_are_named_without_dotdot_and_reasons_without_the_path(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "lists").mkdir()
    shutil.copy(CLIP, tmp_path / "sub" / "a.wav")
    (tmp_path / "sub" / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00not audio")
    (tmp_path / "lists" / "l.txt").write_text("../sub/a.wav\n../sub/bad.wav\n")
    monkeypatch.chdir(tmp_path)
    sslam("extract", "lists/l.txt", "-c", TINY_PRETRAIN, "-o", "e.h5", code=1)
    with h5py.File("e.h5") as f:
        assert f["paths"].asstr()[:].tolist() == ["sub/a.wav"]
        assert f["errors/paths"].asstr()[:].tolist() == ["sub/bad.wav"]
        assert f["errors/reasons"].asstr()[:].tolist() == ["cannot decode audio (Format not recognised.)"]
    tagged = json.loads(sslam("tag", "lists/l.txt", "-c", TINY_FINETUNED, "-f", "json", code=1).stdout)
    assert tagged["path"] == "sub/a.wav"


@pytest.mark.parametrize("seconds", [2.0, 1.23])
def test_hear_timestamps_stay_inside_the_audio(seconds):
    from sslam_core import hear

    wave, _ = sf.read(DATA / "fsdd_mini" / "0_george_0.wav", dtype="float32")
    audio = torch.from_numpy(np.resize(wave, int(seconds * 16000)))[None].repeat(2, 1)
    model = hear.load_model(TINY_PRETRAIN)
    emb, times = hear.get_timestamp_embeddings(audio, model)
    assert times.shape == emb.shape[:2] and times.max().item() <= seconds * 1000
    assert times[0, -1].item() > seconds * 1000 - 40  # the steps still reach the end
