"""`sslam tag` / `sslam extract` on awkward inputs, as a new user meets them: bad and tiny files, odd
names, missing optional decoders, bad arguments, existing outputs, full disks and real signals."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
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
from conftest import DATA, ROOT, fill
from conftest import sslam_process as sslam

PRETRAIN = str(FIX / "tiny_pretrain.pt")
FINETUNED = str(FIX / "tiny_finetuned.pt")
CLIP = DATA / "real_32k.wav"  # 10 s
ROBIN = DATA / "robin.ogg"  # 2.7 s


def one_line_errors(stderr: str) -> None:
    assert "Traceback" not in stderr and "Error:" not in stderr.replace("error:", ""), stderr


@pytest.fixture()
def mixed(tmp_path) -> Path:
    """A folder a user might have: two good files, a 10 ms clip, a text file named .mp3, a name with
    brackets, and an .m4a that is not audio."""
    d = tmp_path / "mixed"
    d.mkdir()
    shutil.copy(CLIP, d / "a.wav")
    shutil.copy(ROBIN, d / "song [live].ogg")
    sf.write(d / "tiny.wav", np.zeros(160, dtype=np.float32), 16000)
    (d / "notes.mp3").write_text("not audio at all\n" * 20)
    (d / "voice.m4a").write_bytes(b"\0" * 64)
    return d


@pytest.mark.slow
def test_tiny_clip_and_bad_files_are_one_line_each(mixed, tmp_path):
    out = tmp_path / "tags.csv"
    proc = sslam("tag", str(mixed), "-c", FINETUNED, "-f", "csv", "-o", str(out), check=1)
    one_line_errors(proc.stderr)
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 3, proc.stderr
    assert "skipped: tiny.wav: too short (160 samples at 16 kHz, the minimum is 400 = 25 ms)" in skipped
    assert any(line.startswith("skipped: notes.mp3: cannot decode audio") for line in skipped)
    assert "Note:" not in proc.stderr  # libmpg123's chatter is filtered
    rows = list(csv.DictReader(out.open()))
    assert {r["path"] for r in rows} == {"a.wav", "song [live].ogg"}
    assert "tagged 2 file(s), skipped 3" in proc.stderr

    h5 = tmp_path / "feats.h5"
    proc = sslam("extract", str(mixed), "-o", str(h5), "-c", PRETRAIN, check=1)
    one_line_errors(proc.stderr)
    with h5py.File(h5) as f:
        assert [p.decode() for p in f["paths"][:]] == ["a.wav", "song [live].ogg"]
        assert sorted(p.decode() for p in f["errors/paths"][:]) == ["notes.mp3", "tiny.wav", "voice.m4a"]


@pytest.mark.slow
def test_without_pyav_a_bad_file_never_aborts(mixed, tmp_path):
    """PyAV made unimportable (a package that raises on import first on the path), not uninstalled."""
    blocker = tmp_path / "blocker" / "av"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('PyAV blocked for this test')\n")
    env = {"PYTHONPATH": str(blocker.parent)}
    h5 = tmp_path / "feats.h5"
    proc = sslam("extract", str(mixed), "-o", str(h5), "-c", PRETRAIN, check=1, env=env)
    one_line_errors(proc.stderr)
    assert "skipped: voice.m4a: install sslam[av] to read .m4a files (pip install 'sslam[av]')" in proc.stderr
    assert "skipped: notes.mp3: cannot decode audio" in proc.stderr
    assert "ModuleNotFoundError" not in proc.stderr and "Note:" not in proc.stderr
    with h5py.File(h5) as f:
        assert f["paths"].shape == (2,)


@pytest.mark.slow
def test_bad_arguments_fail_before_any_work(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = sslam("tag", str(empty), "-c", FINETUNED, check=2)
    one_line_errors(proc.stderr)
    assert proc.stderr.splitlines() == [
        f"error: {empty}: no audio files (.wav, .flac, .mp3, .ogg, .oga, .opus, "
        ".m4a, .aac, .mp4, .webm, .aif, .aiff) in this folder"
    ]  # one line
    for norm in ("foo", "1,0", "nan,2", "1,2,3"):
        proc = sslam(
            "extract", str(CLIP), "-o", str(tmp_path / "x.h5"), "-c", PRETRAIN, "--norm", norm, check=2
        )
        one_line_errors(proc.stderr)
        assert "--norm" in proc.stderr
        proc = sslam("tag", str(CLIP), "-c", FINETUNED, "--norm", norm, check=2)
        assert "--norm" in proc.stderr
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.h5.parts").exists()
    for flags in (["--hop", "0"], ["--hop", "-1"], ["--window", "200"]):
        proc = sslam("tag", str(CLIP), "-c", FINETUNED, *flags, check=2)
        one_line_errors(proc.stderr)
    proc = sslam("tag", str(CLIP), "-c", FINETUNED, "--window", "20.48", check=0)
    assert "longer than the 10.24 s this model was trained on" in proc.stderr


@pytest.mark.slow
def test_lists_with_missing_files_and_output_folders_are_created(tmp_path):
    work = tmp_path / "work"
    (work / "clips").mkdir(parents=True)
    shutil.copy(CLIP, work / "clips" / "a.wav")
    (work / "clips" / "files.txt").write_text("a.wav\nmissing.wav\n")
    proc = sslam(
        "tag", "clips/files.txt", "-c", FINETUNED, "-f", "json", "-o", "new/dir/t.jsonl", cwd=work, check=1
    )
    one_line_errors(proc.stderr)
    assert "skipped: clips/missing.wav: file not found" in proc.stderr
    lines = (work / "new" / "dir" / "t.jsonl").read_text().splitlines()
    assert [json.loads(line)["path"] for line in lines] == ["clips/a.wav"]  # as given, not absolute
    assert oct((work / "new" / "dir" / "t.jsonl").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    proc = sslam("extract", "clips/files.txt", "-o", "deep/er/f.h5", "-c", PRETRAIN, cwd=work, check=1)
    assert (work / "deep" / "er" / "f.h5").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_same_name_in_two_folders_stays_apart(tmp_path):
    for sub, src in (("a", CLIP), ("b", ROBIN)):
        (tmp_path / sub).mkdir()
        shutil.copy(
            src, tmp_path / sub / "piano.wav" if src.suffix == ".wav" else tmp_path / sub / "piano.ogg"
        )
    shutil.copy(CLIP, tmp_path / "b" / "piano.wav")
    proc = sslam("tag", "a", "b", "-c", FINETUNED, "-f", "csv", cwd=tmp_path)
    paths = {r["path"] for r in csv.DictReader(io.StringIO(proc.stdout))}
    assert paths == {"a/piano.wav", "b/piano.wav", "b/piano.ogg"}
    sslam("extract", "a", "b", "-o", "x.h5", "-c", PRETRAIN, cwd=tmp_path)
    with h5py.File(tmp_path / "x.h5") as f:
        assert [p.decode() for p in f["paths"][:]] == ["a/piano.wav", "b/piano.ogg", "b/piano.wav"]


@pytest.mark.slow
def test_hop_longer_than_window_never_starts_past_the_end(tmp_path):
    wave, sr = sf.read(CLIP, dtype="float32")
    eleven = tmp_path / "eleven.wav"
    sf.write(eleven, np.concatenate([wave, wave[:sr]]), sr)
    proc = sslam("tag", str(eleven), "-c", FINETUNED, "--hop", "30", "--timeline", "-f", "json")
    obj = json.loads(proc.stdout)
    assert [(s["start"], s["end"]) for s in obj["segments"]] == [(0.0, 10.24)]
    plain = json.loads(sslam("tag", str(eleven), "-c", FINETUNED, "-f", "json", "--window", "10.24").stdout)
    assert obj["labels"][0]["label"] == plain["labels"][0]["label"]
    sslam("extract", str(eleven), "-o", str(tmp_path / "x.h5"), "-c", PRETRAIN, "--hop", "30", "-g", "all")
    with h5py.File(tmp_path / "x.h5") as f:
        assert f["frame/times"][:].max() < f["duration"][0]


@pytest.mark.slow
def test_messages_keep_square_brackets(tmp_path):
    bad = tmp_path / "song [live].wav"
    sf.write(bad, np.zeros(100, dtype=np.float32), 16000)
    good = tmp_path / "take [2].wav"
    shutil.copy(CLIP, good)
    proc = sslam("tag", str(bad), str(good), "-c", FINETUNED, check=1)
    assert f"skipped: {bad}: too short" in proc.stderr
    assert f"{good} (10.00 s)" in proc.stdout


@pytest.mark.slow
def test_piped_tables_do_not_wrap(tmp_path):
    deep = tmp_path / ("a_rather_long_folder_name_" * 4) / "clip with spaces [and brackets].wav"
    deep.parent.mkdir()
    shutil.copy(CLIP, deep)
    proc = sslam("tag", str(deep), "-c", FINETUNED, "--timeline", "--hop", "5", env={"COLUMNS": "80"})
    lines = proc.stdout.splitlines()
    assert any(str(deep) in line for line in lines)  # the path is on one line
    assert all(line == line.rstrip() for line in lines)


@pytest.mark.slow
def test_existing_outputs_are_not_replaced(tmp_path):
    out = tmp_path / "tags.json"
    out.write_text("precious\n")
    h5 = tmp_path / "feats.h5"
    h5.write_text("precious\n")
    proc = sslam("tag", str(CLIP), "-c", FINETUNED, "-f", "json", "-o", str(out), check=2)
    assert "exists; pass --overwrite" in proc.stderr
    proc = sslam("extract", str(CLIP), "-c", PRETRAIN, "-o", str(h5), check=2)
    assert "exists; pass --overwrite" in proc.stderr
    plot = tmp_path / "p.png"
    plot.write_text("precious\n")
    sslam("tag", str(CLIP), "-c", FINETUNED, "--plot", str(plot), check=2)
    assert out.read_text() == h5.read_text() == plot.read_text() == "precious\n"
    sslam("tag", str(CLIP), "-c", FINETUNED, "-f", "json", "-o", str(out), "--overwrite")
    assert json.loads(out.read_text())["path"] == str(CLIP)


def _folder_of_copies(path: Path, n: int) -> Path:
    path.mkdir()
    for i in range(n):
        os.link(CLIP, path / f"clip{i:03d}.wav")
    return path


def _wait_for(predicate, proc, seconds: float = 120) -> None:
    end = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_tag_interrupted_by_a_signal_resumes_to_the_same_output(tmp_path, sig):
    clips = _folder_of_copies(tmp_path / "clips", 40)
    out = tmp_path / "tags.csv"
    cmd = [sys.executable, "-m", "sslam_cli", "tag", str(clips), "-c", FINETUNED, "-f", "csv", "--timeline"]
    proc = subprocess.Popen(
        [*cmd, "-o", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    index = tmp_path / "tags.csv.parts" / "index-0001-0000.jsonl"  # run 1, rank 0
    _wait_for(lambda: index.exists() and index.read_text().count("\n") >= 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    one_line_errors(err)
    done = index.read_text().count("\n")
    assert f"after {done} file(s); rerun with --resume to finish" in err
    assert not out.exists() and 2 <= done < 40
    resumed = subprocess.run([*cmd, "-o", str(out), "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {done} file(s) already done" in resumed.stderr
    whole = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.read_text() == whole.stdout
    assert not index.parent.exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_extract_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path):
    clips = _folder_of_copies(tmp_path / "clips", 40)
    out = tmp_path / "feats.h5"
    cmd = [
        sys.executable,
        "-m",
        "sslam_cli",
        "extract",
        str(clips),
        "-c",
        PRETRAIN,
        "-g",
        "all",
        "--flush-every",
        "1",
    ]
    proc = subprocess.Popen(
        [*cmd, "-o", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    parts = tmp_path / "feats.h5.parts"
    _wait_for(lambda: len(list(parts.glob("part-*.npz"))) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    one_line_errors(err)
    assert "interrupted (SIGTERM) after" in err and "rerun with --resume to finish" in err
    assert not out.exists()
    again = subprocess.run([*cmd, "-o", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 2 and "holds an interrupted run" in again.stderr
    resumed = subprocess.run([*cmd, "-o", str(out), "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    subprocess.run([*cmd, "-o", str(tmp_path / "whole.h5")], cwd=ROOT, check=True, capture_output=True)
    _same_h5(out, tmp_path / "whole.h5")


def _same_h5(a: Path, b: Path) -> None:
    with h5py.File(a) as x, h5py.File(b) as y:
        names: list[str] = []
        x.visit(names.append)
        assert sorted(names) == sorted(_names(y))
        for name in names:
            if isinstance(x[name], h5py.Dataset):
                np.testing.assert_array_equal(x[name][()], y[name][()])
        assert dict(x.attrs) == dict(y.attrs)


def _names(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visit(names.append)
    return names


@pytest.mark.slow
def test_full_disk_keeps_the_journal_and_resume_finishes(tmp_path, tmpfs):
    clips = _folder_of_copies(tmp_path / "clips", 6)
    args = ["extract", str(clips), "-c", PRETRAIN, "-g", "all", "--flush-every", "1"]
    with tmpfs("1m") as disk:
        out = disk / "feats.h5"
        proc = sslam(*args, "-o", str(out), check=2)
        one_line_errors(proc.stderr)
        assert "no space left on device" in proc.stderr and "rerun with --resume" in proc.stderr
        kept = sorted(p.name for p in (disk / "feats.h5.parts").glob("part-*.npz"))
        assert kept and not out.exists()
        assert not [p for p in (disk / "feats.h5.parts").iterdir() if ".tmp" in p.name]
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        proc = sslam(*args, "-o", str(out), "--resume")
        assert f"({len(kept)} from the interrupted run)" in proc.stderr
        sslam(*args, "-o", str(tmp_path / "whole.h5"))
        _same_h5(out, tmp_path / "whole.h5")


@pytest.mark.slow
def test_full_disk_while_tagging_keeps_the_finished_files(tmp_path, tmpfs):
    clips = _folder_of_copies(tmp_path / "clips", 6)
    cmd = ["tag", str(clips), "-c", FINETUNED, "-f", "csv", "--timeline"]
    with tmpfs("256k") as disk:
        filler = fill(disk)
        os.truncate(filler, filler.stat().st_size - 8192)  # two pages left: the journal starts, then fails
        proc = sslam(*cmd, "-o", str(disk / "tags.csv"), check=2)
        one_line_errors(proc.stderr)
        assert "no space left on device" in proc.stderr
        filler.unlink()
        sslam(*cmd, "-o", str(disk / "tags.csv"), "--resume")
        assert (disk / "tags.csv").read_text() == sslam(*cmd).stdout


@pytest.mark.slow
@pytest.mark.parametrize("where", ["journal", "merge"])
def test_injected_enospc_then_resume(tmp_path, monkeypatch, where):
    """ENOSPC injected into the journal's second part, or into the final HDF5 merge."""
    import errno

    from typer.testing import CliRunner

    import sslam_core.runs.feature_store as store
    from sslam_cli.main import app

    clips = _folder_of_copies(tmp_path / "clips", 4)
    args = [
        "extract",
        str(clips),
        "-c",
        PRETRAIN,
        "-g",
        "frame",
        "--flush-every",
        "1",
        "-o",
        str(tmp_path / "x.h5"),
    ]
    real_savez, real_file, calls = store.np.savez, store.h5py.File, []

    def savez(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_savez(*a, **k)

    def h5file(name, mode="r", *a, **k):
        if mode == "w":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_file(name, mode, *a, **k)

    monkeypatch.setattr(store.np, "savez", savez) if where == "journal" else monkeypatch.setattr(
        store.h5py, "File", h5file
    )
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "no space left on device" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.h5").exists()
    assert len(list((tmp_path / "x.h5.parts").glob("part-*.npz"))) == (1 if where == "journal" else 4)
    monkeypatch.undo()
    sslam(*args, "--resume")
    args[-1] = str(tmp_path / "whole.h5")
    sslam(*args)
    _same_h5(tmp_path / "x.h5", tmp_path / "whole.h5")


@pytest.mark.slow
def test_unwritable_output_folder_is_one_line(tmpfs):
    with tmpfs("1m", "ro") as ro:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        proc = sslam("tag", str(CLIP), "-c", FINETUNED, "-o", str(ro / "t.csv"), "-f", "csv", check=2)
        one_line_errors(proc.stderr)
        assert str(ro / "t.csv") in proc.stderr
        proc = sslam("extract", str(CLIP), "-c", PRETRAIN, "-o", str(ro / "sub" / "x.h5"), check=2)
        one_line_errors(proc.stderr)
        assert "read-only file system" in proc.stderr


@pytest.mark.slow
def test_label_files_with_and_without_a_header(tmp_path):
    from sslam_core.data.labels import read_label_csv

    one_column = tmp_path / "names.csv"
    one_column.write_text("name\ndog\ncat, domestic\n")
    assert read_label_csv(one_column) == [("dog", "dog"), ("cat, domestic", "cat, domestic")]
    plain = tmp_path / "names.txt"
    plain.write_text("dog\ncat, domestic\n")
    assert read_label_csv(plain) == [("dog", "dog"), ("cat, domestic", "cat, domestic")]
    two = tmp_path / "two.csv"
    two.write_text("mid,display_name\n/m/b,B\n/m/a,A\n")
    assert read_label_csv(two) == [("/m/b", "B"), ("/m/a", "A")]
    names = tmp_path / "527.csv"
    names.write_text("label\n" + "".join(f"class {i}\n" for i in range(527)))
    proc = sslam("tag", str(CLIP), "-c", FINETUNED, "--labels", str(names), "-f", "json", "-k", "1")
    assert json.loads(proc.stdout)["labels"][0]["label"].startswith("class ")


@pytest.mark.slow
def test_file_names_that_are_not_utf8(tmp_path):
    """A name with a byte that is not UTF-8 is escaped in every output, and the file is still read."""
    folder = tmp_path / "odd"
    folder.mkdir()
    shutil.copy(ROBIN, os.path.join(os.fsencode(folder), b"bad\xffname.ogg"))
    proc = sslam(
        "tag", str(folder), "-c", FINETUNED, "-f", "csv", "-k", "1", env={"PYTHONIOENCODING": "utf-8"}
    )
    assert proc.stdout.splitlines()[1].startswith("bad\\xffname.ogg,clip,")
    sslam("extract", str(folder), "-c", PRETRAIN, "-o", str(tmp_path / "x.h5"))
    with h5py.File(tmp_path / "x.h5") as f:
        assert [p.decode() for p in f["paths"][:]] == ["bad\\xffname.ogg"]


@pytest.mark.slow
@pytest.mark.parametrize("debug", ["0", "1"])
def test_an_unexpected_exception_is_one_line_unless_asked(debug):
    """The entry point's safety net, with a fault injected where a bug could be (input collection)."""
    code = (
        "import sys, sslam_core.data.inputs as i\n"
        "def boom(*a, **k): raise RuntimeError('injected fault\\nsecond line')\n"
        "i.collect_inputs = boom\n"
        "from sslam_cli.main import main\n"
        f"sys.argv = ['sslam', 'tag', {str(CLIP)!r}, '-c', {FINETUNED!r}]\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "SSLAM_TRACEBACK": debug})  # fmt: skip
    if debug == "1":
        assert proc.returncode == 1 and "Traceback" in proc.stderr
    else:
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [
            "error: unexpected RuntimeError: injected fault (please report it; SSLAM_TRACEBACK=1 shows where)"
        ]
