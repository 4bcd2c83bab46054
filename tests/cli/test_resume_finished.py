"""`--resume` on an output that is already finished leaves it alone: a note when it was written with
these settings and inputs, a refusal naming --overwrite when it was not (it used to be replaced
silently, even with another checkpoint, granularity or format)."""

from __future__ import annotations

import os

import pytest
from conftest import DATA, TINY_FINETUNED, TINY_PRETRAIN, sslam
from tqdm import tqdm

FILES = [DATA / "real_32k.wav", DATA / "robin.ogg"]


def xattrs_supported(folder) -> bool:
    probe = folder / "probe"
    probe.write_text("x")
    try:
        os.setxattr(probe, "user.sslam.probe", b"1")
        return True
    except (AttributeError, OSError):
        return False
    finally:
        probe.unlink()


def test_extract_resume_of_a_finished_file_notes_or_refuses_and_never_replaces(tmp_path):
    out = tmp_path / "x.h5"
    sslam("extract", *FILES, "-c", TINY_PRETRAIN, "-o", out)
    before = out.read_bytes()
    same = sslam("extract", *FILES, "-c", TINY_PRETRAIN, "-o", out, "--resume")
    assert "already complete" in same.stderr and "nothing to resume" in same.stderr
    other = [DATA / "typing_stereo_48k.flac"]
    for args in (
        ["-c", TINY_FINETUNED],  # another checkpoint
        ["-c", TINY_PRETRAIN, "-g", "all"],  # another granularity
        ["-c", TINY_PRETRAIN, *other],  # a third file
    ):
        refused = sslam("extract", *FILES, *args, "-o", out, "--resume", code=2)
        assert "already complete" in refused.stderr and "--overwrite" in refused.stderr
        assert out.read_bytes() == before
    assert not (tmp_path / "x.h5.parts").exists()
    assert not list(getattr(tqdm, "_instances", []))  # a refusal closes the progress bar it opened


def test_tag_resume_of_a_finished_file_notes_or_refuses_and_never_replaces(tmp_path):
    out = tmp_path / "tags.csv"
    sslam("tag", *FILES, "-c", TINY_FINETUNED, "-o", out, "-f", "csv")
    before = out.read_bytes()
    refused = sslam("tag", *FILES, "-c", TINY_FINETUNED, "-o", out, "-f", "json", "--resume", code=2)
    assert "--overwrite" in refused.stderr and out.read_bytes() == before
    refused = sslam("tag", FILES[0], "-c", TINY_FINETUNED, "-o", out, "-f", "csv", "--resume", code=2)
    assert "--overwrite" in refused.stderr and out.read_bytes() == before
    if not xattrs_supported(tmp_path):
        pytest.skip("this file system keeps no extended attributes: the settings cannot be told")
    same = sslam("tag", *FILES, "-c", TINY_FINETUNED, "-o", out, "-f", "csv", "--resume")
    assert "already complete" in same.stderr and out.read_bytes() == before


def test_a_journal_of_other_settings_names_overwrite(tmp_path):
    out = tmp_path / "tags.json"
    parts = tmp_path / "tags.json.parts"
    parts.mkdir()
    (parts / "settings.json").write_text('{"other": "settings"}')
    refused = sslam("tag", *FILES, "-c", TINY_FINETUNED, "-o", out, "-f", "json", "--resume", code=2)
    assert "pass --overwrite to start over" in refused.stderr
    assert "without --resume" not in refused.stderr
