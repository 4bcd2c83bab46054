"""One interface over labelled audio sets (labels.csv, AudioSet, fairseq, ESC-50, DCASE, tar shards);
audio listing."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from sslam_core.data.label_formats import (
    AUDIO_EXTENSIONS,
    DatasetError,
    Parsed,
    Record,
    read_audioset,
    read_esc50,
    read_labels_csv,
    read_lines,
    read_manifest,
    read_strong,
)
from sslam_core.data.shards import is_shard_spec, read_shard_labels
from sslam_core.errors import OptionError

__all__ = [
    "AUDIO_EXTENSIONS",
    "DatasetError",
    "Example",
    "LabelledSet",
    "list_audio",
    "read_labelled",
    "split_examples",
]


@dataclass
class Example:
    """One audio clip with its class indices; offset/duration in seconds when only part of a file is
    meant. `path` names it; `member` is what to decode when that is not a file of its own (a
    `shards.TarMember`, or a `shards.Unreadable` that reports why it cannot be read)."""

    path: str
    labels: list[int]
    offset: float | None = None
    duration: float | None = None
    fold: int | None = None
    key: str = ""
    member: object = None

    def __post_init__(self) -> None:
        if not self.key:
            self.key = os.path.splitext(os.path.basename(self.path))[0]

    @property
    def source(self):
        """What the inference pipeline decodes: the tar member, else the path."""
        return self.member if self.member is not None else self.path


@dataclass
class LabelledSet:
    """Clips found on disk, the class list (id, name), and what was listed but missing."""

    examples: list[Example]
    classes: list[tuple[str, str]]
    multilabel: bool
    missing: list[str] = field(default_factory=list)
    naming: str | None = None
    root: str = ""

    def __len__(self) -> int:
        return len(self.examples)

    def name(self, example: Example) -> str:
        """How `example` is named in outputs and messages: its path relative to the set's audio root
        (as the files of a single folder or manifest are named, see `inputs.collect_inputs`); a tar
        member, or a file outside the root, by its path."""
        if self.root and example.member is None and os.path.isdir(self.root):
            relative = os.path.relpath(example.path, self.root)
            if not relative.startswith(os.pardir + os.sep):
                return relative
        return example.path

    @property
    def class_names(self) -> list[str]:
        """Display names in class-index order."""
        return [name for _, name in self.classes]

    def targets(self) -> np.ndarray:
        """Multi-hot float32 (N, C) label matrix, in example order."""
        out = np.zeros((len(self.examples), len(self.classes)), dtype=np.float32)
        for row, example in enumerate(self.examples):
            out[row, example.labels] = 1.0
        return out


def _numeric_first(name: str) -> tuple:
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def _normalise_classes(classes: Sequence) -> list[tuple[str, str]]:
    if isinstance(classes, LabelledSet):
        return list(classes.classes)
    return [(c, c) if isinstance(c, str) else (str(c[0]), str(c[1])) for c in classes]


def _first_line(path: str) -> str:
    return next((line for line in read_lines(path) if line.strip()), "")


def _detect(spec: str) -> tuple[str, str]:
    """Return (format, file) for a dataset folder, label file or tar shard spec."""
    if is_shard_spec(spec):
        return "shards", spec
    if os.path.isdir(spec):
        for name, fmt in (("labels.csv", "labels_csv"), (os.path.join("meta", "esc50.csv"), "esc50")):
            if os.path.isfile(os.path.join(spec, name)):
                return fmt, os.path.join(spec, name)
        raise DatasetError(f"{spec}: folder holds neither labels.csv nor meta/esc50.csv")
    if not os.path.isfile(spec):
        raise DatasetError(f"{spec}: no such file or folder")
    suffix = os.path.splitext(spec)[1].lower()
    if suffix in AUDIO_EXTENSIONS:
        raise DatasetError(
            f"{spec}: an audio file, not a labelled set (give a labels CSV, a folder with labels.csv, "
            "ESC-50, AudioSet CSV, fairseq manifest, strong-label TSV or tar shards)"
        )
    if suffix == ".lbl":
        return "manifest", os.path.splitext(spec)[0] + ".tsv"
    first = _first_line(spec)
    if suffix in (".tsv", ".txt"):
        return ("strong" if "\t" in first else "manifest"), spec
    if suffix == ".csv":
        header = [cell.strip().lower() for cell in next(csv.reader([first]), [])]
        if first.lstrip().startswith("#") or header[:1] == ["ytid"]:
            return "audioset", spec
        if {"filename", "fold", "target", "category"} <= set(header):
            return "esc50", spec
        if len(header) >= 4 and all(_numeric_first(cell)[0] == 0 for cell in header[1:3]):
            return "audioset", spec
        return "labels_csv", spec
    raise DatasetError(f"{spec}: unknown label format (expected .csv, .tsv, .txt, .lbl or a dataset folder)")


READERS = {
    "labels_csv": read_labels_csv,
    "esc50": read_esc50,
    "strong": read_strong,
    "manifest": read_manifest,
    "audioset": read_audioset,
    "shards": read_shard_labels,
}


def _wanted_folds(folds: int | Iterable[int] | None) -> set[int] | None:
    if folds is None:
        return None
    return {int(folds)} if isinstance(folds, (int, str)) else {int(f) for f in folds}


def _build(
    parsed: Parsed, spec: str, classes, folds, multilabel: bool | None, index_classes=None
) -> LabelledSet:
    """Map label names to indices, drop clips without audio, decide multi-label, apply folds."""
    records = parsed.records
    wanted = _wanted_folds(folds)
    if wanted is not None:
        if any(r.fold is None for r in records):
            raise DatasetError(f"{spec}: folds were requested but this format has no folds")
        records = [r for r in records if r.fold in wanted]
    indexed = index_classes is not None and any(isinstance(x, int) for r in records for x in r.labels)
    if classes is not None:
        class_list = _normalise_classes(classes)
    elif parsed.classes is not None:
        class_list = parsed.classes
    elif indexed:  # class indices (and names or ids) of the given list; the classes used are kept
        class_list = _normalise_classes(index_classes)
    else:
        class_list = _found_classes(records, spec)
    lookup: dict[str | int, int] = {name: i for i, (_, name) in enumerate(class_list)}
    lookup.update({cid: i for i, (cid, _) in enumerate(class_list)})
    if class_list and all(cid.isdigit() for cid, _ in class_list):  # classes named by the indices found
        lookup.update({int(cid): i for i, (cid, _) in enumerate(class_list)})
    else:  # integer labels (tar shards' key.cls) index the class list
        lookup.update({i: i for i in range(len(class_list))})
    if multilabel is None:
        multilabel = parsed.multilabel if parsed.multilabel is not None else False
        multilabel = multilabel or any(len(r.labels) != 1 for r in records)
    examples, missing = [], []
    for r in records:
        unknown = [label for label in r.labels if label not in lookup]
        if unknown:
            raise DatasetError(
                f"{r.where}: unknown label {unknown[0]!r} (not among the {len(class_list)} classes)"
            )
        if not multilabel and len(r.labels) != 1:
            raise DatasetError(f"{r.where}: {r.listed} has {len(r.labels)} labels in a multi-class set")
        if r.path is None:
            missing.append(r.listed)
            continue
        indices = sorted({lookup[label] for label in r.labels})
        examples.append(Example(r.path, indices, r.offset, r.duration, r.fold, r.key, r.source))
    # unreadable samples of tar shards: kept, so that they are reported where undecodable files are
    examples += [Example(u.name, [], member=u) for u in parsed.extra.get("problems", ())]
    if records and not examples:
        raise DatasetError(
            f"{spec}: none of the {len(records)} listed clips has audio under {parsed.root}"
            f" (e.g. {missing[0]}); pass --audio-dir"
        )
    data = LabelledSet(examples, class_list, multilabel, missing, parsed.naming, parsed.root)
    return present_classes(data) if indexed and classes is None and parsed.classes is None else data


def present_classes(data: LabelledSet) -> LabelledSet:
    """`data` with only the classes some clip is labelled with, in their order (labels re-indexed)."""
    used = sorted({i for example in data.examples for i in example.labels})
    new = {old: k for k, old in enumerate(used)}
    examples = [replace(e, labels=[new[i] for i in e.labels]) for e in data.examples]
    return replace(data, examples=examples, classes=[data.classes[i] for i in used])


def _found_classes(records: Sequence[Record], spec: str) -> list[tuple[str, str]]:
    """The class list of a set that defines none: its label names (numbers first, in order), or for
    integer class indices (tar shards' key.cls) the classes 0..max named by their index."""
    names = {label for r in records for label in r.labels if isinstance(label, str)}
    indices = {label for r in records for label in r.labels if isinstance(label, int)}
    if indices and names:
        raise DatasetError(
            f"{spec}: labels mix class indices ({min(indices)}, ...) and names ({sorted(names)[0]!r}, ...);"
            " give a class list (--classes CSV) to map the indices"
        )
    if indices:
        if min(indices) < 0:
            raise DatasetError(f"{spec}: negative class index {min(indices)}")
        return [(str(i), str(i)) for i in sorted(indices)]  # the classes used, as a labels.csv lists them
    return [(name, name) for name in sorted(names, key=_numeric_first)]


def read_labelled(
    spec: str | Path,
    audio_dir: str | Path | None = None,
    classes: Sequence[tuple[str, str]] | Sequence[str] | LabelledSet | None = None,
    folds: int | Iterable[int] | None = None,
    multilabel: bool | None = None,
    index_classes: Sequence[tuple[str, str]] | Sequence[str] | None = None,
    kind: str | None = None,
) -> LabelledSet:
    """Read any supported labelled set, detecting the format from the path.

    Formats: a folder with labels.csv (or that csv), ESC-50 (folder with meta/esc50.csv), AudioSet segment
    csv + audio_dir, fairseq .tsv/.lbl manifests, DCASE strong-label .tsv/.txt, tar shards in the
    WebDataset layout (a .tar, a brace pattern or a .txt shard list; labels from key.cls / key.json,
    see `shards.sample_labels`; an integer label is a class index into `classes`). `classes` imposes a class
    list (e.g. the training set's); `folds` keeps only those folds (ESC-50); `multilabel` overrides the guess
    (any clip with other than one label makes a set multi-label). `index_classes` (a model's class
    list) is what integer labels index, and what names or ids in the same labels match, when the set
    has them; the set then keeps the classes it uses. Without a list, integer labels name their own
    classes ("74"), as names do. `kind` (a key of `READERS`, e.g. "strong") reads the file as that
    format instead of detecting it.
    """
    spec = os.fspath(spec)
    audio = os.fspath(audio_dir) if audio_dir is not None else None
    if audio is not None and not os.path.isdir(audio):
        raise DatasetError(f"{audio}: audio folder does not exist")
    if kind is not None and kind not in READERS:
        raise DatasetError(f"unknown label format {kind!r}; choose {', '.join(READERS)}")
    fmt, path = (kind, spec) if kind is not None else _detect(spec)
    parsed = READERS[fmt](path, audio)
    return _build(parsed, path, classes, folds, multilabel, index_classes)


def read_file_list(
    path: str, audio_dir: str | None = None, missing_ok: bool = False
) -> tuple[str, list[str]]:
    """(base folder, audio paths) of a fairseq .tsv manifest (its first line is the root, which
    `audio_dir` overrides) or a plain one-path-per-line list (relative to the list's folder). Paths
    keep the form they were given in. A listed file that does not exist is an error unless
    `missing_ok` (then decoding reports it, file by file)."""
    lines = read_lines(path)
    manifest = path.lower().endswith(".tsv")
    if manifest:
        if not lines or "\t" in lines[0]:
            raise DatasetError(
                f"{path}:1: a fairseq manifest starts with the audio root folder on its own line"
            )
        base, start = audio_dir or lines[0].strip(), 1
    else:
        base, start = audio_dir or os.path.dirname(path), 0
    out = []
    for number, line in enumerate(lines[start:], start + 1):
        entry = line.split("\t")[0].strip() if manifest else line.strip()
        if not entry or entry.startswith("#"):
            continue
        full = os.path.normpath(os.path.join(base, entry))  # `..` resolved: names read plainly
        if not missing_ok and not os.path.isfile(full):
            hint = " (pass --audio-dir to override the manifest root)" if manifest and not audio_dir else ""
            raise DatasetError(f"{path}:{number}: audio file not found: {full}{hint}")
        out.append(full)
    return base, out


def list_audio(
    paths: str | Path | Sequence[str | Path],
    extensions: Sequence[str] = AUDIO_EXTENSIONS,
    recursive: bool = True,
    audio_dir: str | Path | None = None,
) -> list[str]:
    """Audio files from folders, single files, text lists (one path a line) or fairseq .tsv manifests."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    audio = os.fspath(audio_dir) if audio_dir is not None else None
    out: list[str] = []
    for item in map(os.fspath, items):
        if os.path.isdir(item):
            if recursive:
                found = [os.path.join(d, f) for d, _, files in os.walk(item) for f in files]
            else:
                found = [os.path.join(item, f) for f in os.listdir(item)]
            found = sorted(f for f in found if f.lower().endswith(extensions) and os.path.isfile(f))
            if not found:
                raise DatasetError(f"{item}: no audio files ({', '.join(extensions)}) in this folder")
            out += found
        elif not os.path.isfile(item):
            raise DatasetError(f"{item}: no such file or folder")
        elif item.lower().endswith(extensions):
            out.append(item)
        else:
            out += read_file_list(item, audio)[1]
    return out


def split_examples(
    examples: Sequence[Example], valid_fraction: float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Deterministic random train/valid split; both parts keep the original order."""
    if not 0.0 < valid_fraction < 1.0:
        raise OptionError(f"valid_fraction must be between 0 and 1, got {valid_fraction}")
    n = len(examples)
    n_valid = min(max(int(round(n * valid_fraction)), 1), n - 1) if n > 1 else 0
    chosen = set(np.random.default_rng(seed).permutation(n)[:n_valid].tolist())
    train = [e for i, e in enumerate(examples) if i not in chosen]
    valid = [e for i, e in enumerate(examples) if i in chosen]
    return train, valid
