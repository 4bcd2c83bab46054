import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import DATA

from sslam_core.data.datasets import Example, LabelledSet, list_audio, read_labelled, split_examples
from sslam_core.data.label_formats import AUDIO_EXTENSIONS, DatasetError

POLY = DATA / "polydigits"
SPASS = DATA / "spass_square"
SEGMENTS = DATA / "audioset_segments.csv"
DIGITS = [str(d) for d in range(10)]


def _wav(path: Path, seconds: float = 0.05) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(int(16000 * seconds), dtype=np.float32), 16000)


def _labels(labelled: LabelledSet) -> dict[str, list[int]]:
    return {e.key: e.labels for e in labelled.examples}


def test_labels_csv_folder_and_file():
    labelled = read_labelled(POLY)
    assert labelled.classes == [(c, c) for c in ["1", "3", "4", "7", "8", "9"]]
    assert _labels(labelled) == {"train_00000": [0, 5], "train_00002": [1, 2, 3, 4], "train_00015": [1]}
    assert labelled.missing == ["audio/train_00001.wav"]
    assert labelled.multilabel and labelled.naming is None
    assert labelled.examples[0].path == str(POLY / "audio" / "train_00000.wav")
    same = read_labelled(POLY / "labels.csv", classes=DIGITS)
    assert same.classes[:3] == [("0", "0"), ("1", "1"), ("2", "2")]
    assert _labels(same) == {"train_00000": [1, 9], "train_00002": [3, 4, 7, 8], "train_00015": [3]}
    np.testing.assert_array_equal(same.targets()[2], np.eye(10, dtype=np.float32)[3])
    assert same.class_names == DIGITS and len(same) == 3


def test_imposed_classes_reject_unknown_labels_with_location():
    with pytest.raises(DatasetError, match=r"labels\.csv:3: unknown label '7'"):
        read_labelled(POLY, classes=[("1", "one"), ("9", "nine"), ("3", "three")])


def test_forced_multiclass_rejects_polyphonic_clip():
    with pytest.raises(DatasetError, match=r"labels\.csv:2: audio/train_00000\.wav has 2 labels"):
        read_labelled(POLY, multilabel=False)


def test_strong_labels_reduce_to_clip_labels():
    strong = read_labelled(POLY / "strong.tsv", classes=DIGITS)
    weak = read_labelled(POLY, classes=DIGITS)
    assert [(e.path, e.labels) for e in strong.examples] == [(e.path, e.labels) for e in weak.examples]
    assert strong.missing == ["train_00001.wav"] and strong.multilabel


def test_strong_labels_look_in_audio_dir_first(tmp_path):
    shutil.copy(POLY / "audio" / "train_00015.wav", tmp_path / "train_00015.wav")
    labelled = read_labelled(POLY / "strong.tsv", audio_dir=tmp_path)
    assert labelled.examples[-1].path == str(tmp_path / "train_00015.wav")
    assert labelled.examples[0].path == str(POLY / "audio" / "train_00000.wav")


def test_csv_label_order_is_numeric_then_text_and_single_labels_are_multiclass(tmp_path):
    (tmp_path / "labels.csv").write_text("filename,labels\na.wav,10\nb.wav,9\nc.wav,dog\nd.wav,cat\n")
    for name in "abcd":
        _wav(tmp_path / f"{name}.wav")
    labelled = read_labelled(tmp_path)
    assert labelled.class_names == ["9", "10", "cat", "dog"]
    assert [e.labels for e in labelled.examples] == [[1], [0], [3], [2]]
    assert not labelled.multilabel
    assert read_labelled(tmp_path, multilabel=True).multilabel


def test_malformed_labels_csv_row(tmp_path):
    (tmp_path / "labels.csv").write_text("filename,labels\na.wav,1\nb.wav\n")
    with pytest.raises(DatasetError, match=r"labels\.csv:3: expected 'filename,labels'"):
        read_labelled(tmp_path)


SPASS_LABELS = {
    "square00001": [0, 4, 5, 6, 7, 13, 16, 17, 19, 21, 22, 23, 26],
    "square00002": [0, 1, 4, 5, 16, 19, 20, 22, 23, 26],
    "square00003": [0, 1, 4, 5, 6, 7, 10, 16, 22, 23, 26],
    "square00004": [4, 5, 9, 10, 17, 23, 26],
}


def test_fairseq_manifest_with_audio_dir_override(tmp_path):
    for name in SPASS_LABELS:
        _wav(tmp_path / "Square_audio_files" / f"{name}.wav")
    labelled = read_labelled(SPASS / "train.tsv", audio_dir=tmp_path)
    assert len(labelled.classes) == 27 and labelled.classes[0] == ("dog", "dog")
    assert labelled.classes[26] == ("car_moving", "car_moving")
    assert _labels(labelled) == SPASS_LABELS
    assert labelled.missing == ["Square_audio_files/square00005.wav"]
    assert labelled.root == str(tmp_path) and labelled.multilabel
    assert _labels(read_labelled(SPASS / "train.lbl", audio_dir=tmp_path)) == SPASS_LABELS


def test_fairseq_manifest_missing_root_says_pass_audio_dir():
    with pytest.raises(DatasetError, match=r"train\.tsv: none of the 5 listed clips .* pass --audio-dir"):
        read_labelled(SPASS / "train.tsv")


def test_fairseq_lbl_ids_may_be_basenames(tmp_path):
    _wav(tmp_path / "audio" / "x1.flac")
    _wav(tmp_path / "audio" / "x2.flac")
    (tmp_path / "set.tsv").write_text(f"{tmp_path}\naudio/x1.flac\t16000\naudio/x2.flac\t800\n")
    (tmp_path / "set.lbl").write_text("x2\tb\nx1\ta,b\n")
    labelled = read_labelled(tmp_path / "set.tsv")
    assert labelled.classes == [("a", "a"), ("b", "b")]
    assert _labels(labelled) == {"x1": [0, 1], "x2": [1]}
    (tmp_path / "set.lbl").write_text("x2\tb\n")
    with pytest.raises(
        DatasetError, match=r"set\.lbl: no labels for 'audio/x1\.flac' \(listed at .*set\.tsv:2\)"
    ):
        read_labelled(tmp_path / "set.tsv")


AUDIOSET_NAMES = {
    "{YTID}": ["--PJHxphWEs", "--ZhevVpy1s", "--aE2O5G5WE", "--aO5cdqSAg"],
    "Y{YTID}": ["Y--PJHxphWEs", "Y--ZhevVpy1s", "Y--aE2O5G5WE", "Y--aO5cdqSAg"],
    "{YTID}_{start}": ["--PJHxphWEs_30", "--ZhevVpy1s_50", "--aE2O5G5WE_0", "--aO5cdqSAg_30"],
    "{YTID}_{start:.1f}": ["--PJHxphWEs_30.0", "--ZhevVpy1s_50.0", "--aE2O5G5WE_0.0", "--aO5cdqSAg_30.0"],
    "{YTID}_{start:.3f}_{end:.3f}": [
        "--PJHxphWEs_30.000_40.000",
        "--ZhevVpy1s_50.000_60.000",
        "--aE2O5G5WE_0.000_10.000",
        "--aO5cdqSAg_30.000_40.000",
    ],
    "{YTID}_{start}_{end}": [
        "--PJHxphWEs_30_40",
        "--ZhevVpy1s_50_60",
        "--aE2O5G5WE_0_10",
        "--aO5cdqSAg_30_40",
    ],
    "{YTID}_{start_ms}": ["--PJHxphWEs_30000", "--ZhevVpy1s_50000", "--aE2O5G5WE_0", "--aO5cdqSAg_30000"],
}


@pytest.mark.parametrize("naming", list(AUDIOSET_NAMES))
def test_audioset_segments_match_each_naming(tmp_path, naming):
    for i, name in enumerate(AUDIOSET_NAMES[naming]):
        (tmp_path / "sub" if i % 2 else tmp_path).mkdir(exist_ok=True)
        (tmp_path / ("sub" if i % 2 else ".") / f"{name}{AUDIO_EXTENSIONS[i]}").write_bytes(b"")
    (tmp_path / "--aaILOrkII.txt").write_bytes(b"")
    labelled = read_labelled(SEGMENTS, audio_dir=tmp_path)
    assert labelled.naming == naming
    assert labelled.missing == ["--aaILOrkII"]
    assert len(labelled.classes) == 527 and labelled.classes[0] == ("/m/09x0r", "Speech")
    assert _labels(labelled) == {
        "--PJHxphWEs": [0, 451],
        "--ZhevVpy1s": [375],
        "--aE2O5G5WE": [0, 95, 137],
        "--aO5cdqSAg": [32, 34],
    }
    assert labelled.examples[1].path.endswith(f"sub/{AUDIOSET_NAMES[naming][1]}.flac")
    assert labelled.examples[0].duration == 10.0 and labelled.multilabel


def test_audioset_malformed_row(tmp_path):
    bad = tmp_path / "segments.csv"
    bad.write_text(
        '# YTID, start_seconds, end_seconds, positive_labels\nabc, 1.5, 11.5, "/m/09x0r"\nxyz, a, b, c\n'
    )
    with pytest.raises(DatasetError, match=r"segments\.csv:3: start and end seconds must be numbers"):
        read_labelled(bad, audio_dir=tmp_path)


ESC_ROWS = [
    ("1-100-A-2.wav", 1, 2, "chirping"),
    ("1-101-A-0.wav", 1, 0, "dog"),
    ("2-102-A-1.wav", 2, 1, "rain"),
    ("2-103-A-0.wav", 2, 0, "dog"),
    ("3-104-A-1.wav", 3, 1, "rain"),
    ("3-105-A-2.wav", 3, 2, "chirping"),
]


def _esc50(root: Path) -> Path:
    (root / "meta").mkdir(parents=True)
    lines = ["filename,fold,target,category,esc10,src_file,take"]
    lines += [f"{f},{fold},{t},{c},False,{i},A" for i, (f, fold, t, c) in enumerate(ESC_ROWS)]
    (root / "meta" / "esc50.csv").write_text("\n".join(lines) + "\n")
    for name, *_ in ESC_ROWS[:-1]:
        _wav(root / "audio" / name)
    return root


def test_esc50_folds_and_classes(tmp_path):
    root = _esc50(tmp_path / "ESC-50")
    train = read_labelled(root, folds=[1, 2])
    assert train.class_names == ["dog", "rain", "chirping"] and not train.multilabel
    assert [(e.key, e.labels, e.fold) for e in train.examples] == [
        ("1-100-A-2", [2], 1),
        ("1-101-A-0", [0], 1),
        ("2-102-A-1", [1], 2),
        ("2-103-A-0", [0], 2),
    ]
    test = read_labelled(root / "meta" / "esc50.csv", folds=3)
    assert [e.key for e in test.examples] == ["3-104-A-1"] and test.missing == ["3-105-A-2.wav"]
    assert test.classes == train.classes


def test_folds_need_a_format_with_folds():
    with pytest.raises(DatasetError, match="no folds"):
        read_labelled(POLY, folds=1)


def test_unrecognised_inputs(tmp_path):
    with pytest.raises(DatasetError, match="neither labels.csv nor meta/esc50.csv"):
        read_labelled(tmp_path)
    with pytest.raises(DatasetError, match="no such file"):
        read_labelled(tmp_path / "nope.csv")
    with pytest.raises(DatasetError, match="audio folder does not exist"):
        read_labelled(POLY, audio_dir=tmp_path / "nope")


def test_list_audio_folders_files_and_lists(tmp_path):
    wavs = [str(POLY / "audio" / f"train_{i}.wav") for i in ("00000", "00002", "00015")]
    assert list_audio(POLY) == wavs
    with pytest.raises(DatasetError, match="no audio files"):
        list_audio(POLY, recursive=False)
    assert list_audio([wavs[1], POLY / "audio"], extensions=["WAV"]) == [wavs[1], *wavs]
    listing = tmp_path / "files.txt"
    _wav(tmp_path / "x" / "a.ogg")
    listing.write_text("# clips\nx/a.ogg\n\n" + wavs[0] + "\n")
    assert list_audio(listing) == [str(tmp_path / "x" / "a.ogg"), wavs[0]]
    listing.write_text("x/a.ogg\nx/b.ogg\n")
    with pytest.raises(DatasetError, match=r"files\.txt:2: audio file not found"):
        list_audio(listing)


def test_list_audio_manifest_root_override(tmp_path):
    names = [f"square0000{i}" for i in range(1, 6)]
    for name in names:
        _wav(tmp_path / "Square_audio_files" / f"{name}.wav")
    expected = [str(tmp_path / "Square_audio_files" / f"{n}.wav") for n in names]
    assert list_audio(SPASS / "train.tsv", audio_dir=tmp_path) == expected
    with pytest.raises(DatasetError, match=r"train\.tsv:2: audio file not found: /mnt/.* \(pass --audio-dir"):
        list_audio(SPASS / "train.tsv")


def test_split_examples_is_deterministic_and_disjoint():
    examples = [Example(f"/a/{i}.wav", [i % 3]) for i in range(20)]
    train, valid = split_examples(examples, 0.25, seed=3)
    assert len(train) == 15 and len(valid) == 5
    assert sorted(e.key for e in train + valid) == sorted(e.key for e in examples)
    assert [e.key for e in valid] == sorted((e.key for e in valid), key=int)
    again = split_examples(examples, 0.25, seed=3)
    assert again == (train, valid)
    assert split_examples(examples, 0.25, seed=4)[1] != valid
    with pytest.raises(ValueError, match="valid_fraction"):
        split_examples(examples, 1.0)
