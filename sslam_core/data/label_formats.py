"""Readers for the label file formats audio datasets ship with, each reduced to clip-level records."""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field

from sslam_core.data.labels import audioset_labels
from sslam_core.errors import SslamError

# Found by folder search (in this order of preference when one clip exists in several formats): the
# formats the docs list (docs/guides/inputs.md); the rarer ones audio.decode reads are taken when
# named explicitly.
AUDIO_EXTENSIONS = (
    ".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".mp4", ".webm", ".aif", ".aiff",
)  # fmt: skip


class DatasetError(SslamError, ValueError):
    """A dataset or label file that cannot be read; the message names the file and the reason."""


@dataclass
class Record:
    """One listed clip before its labels are mapped to class indices."""

    listed: str
    path: str | None
    labels: list[str]
    where: str
    key: str
    offset: float | None = None
    duration: float | None = None
    fold: int | None = None
    source: object = None  # what to decode when not the path itself: a tar member (sslam_core.data.shards)


@dataclass
class Parsed:
    """What a format reader found: records, the class list it defines (if any) and how audio was named."""

    records: list[Record]
    root: str
    classes: list[tuple[str, str]] | None = None
    multilabel: bool | None = None
    naming: str | None = None
    extra: dict = field(default_factory=dict)


def stem(path: str) -> str:
    """File name without folder and extension."""
    return os.path.splitext(os.path.basename(path))[0]


def read_lines(path: str) -> list[str]:
    """Text lines of a file (BOM and line ends removed), with a DatasetError if it cannot be read."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from e


def _existing(path: str) -> str | None:
    return path if os.path.isfile(path) else None


def _split_labels(text: str, sep: str) -> list[str]:
    return [label.strip() for label in text.split(sep) if label.strip()]


def read_descriptors(path: str) -> list[tuple[str, str]]:
    """Class list from `index,id,name` (fairseq label_descriptors.csv) or `index,mid,display_name` csv."""
    rows = [row for row in csv.reader(read_lines(path)) if row and any(cell.strip() for cell in row)]
    if rows and not rows[0][0].strip().lstrip("-").isdigit():
        rows = rows[1:]
    indexed = []
    for number, row in enumerate(rows, 1):
        if len(row) < 2 or not row[0].strip().isdigit():
            raise DatasetError(f"{path}:{number}: expected 'index,id,name', got {','.join(row)!r}")
        name = row[2].strip() if len(row) > 2 else row[1].strip()
        indexed.append((int(row[0]), row[1].strip(), name))
    indexed.sort()
    if [i for i, _, _ in indexed] != list(range(len(indexed))):
        raise DatasetError(f"{path}: class indices are not 0..{len(indexed) - 1}")
    return [(cid, name) for _, cid, name in indexed]


def read_labels_csv(path: str, audio_dir: str | None) -> Parsed:
    """`filename,labels` csv; filenames relative to the csv folder (or audio_dir), labels ';'-separated."""
    base = audio_dir or os.path.dirname(os.path.abspath(path))
    rows = list(csv.reader(read_lines(path)))
    records = []
    for number, row in enumerate(rows, 1):
        if not row or not "".join(row).strip():
            continue
        if number == 1 and row[0].strip().lower() in ("filename", "file", "path", "file_name"):
            continue
        if len(row) < 2:
            raise DatasetError(f"{path}:{number}: expected 'filename,labels', got {','.join(row)!r}")
        listed = row[0].strip()
        full = os.path.join(base, listed)
        labels = _split_labels(",".join(row[1:]), ";")
        records.append(Record(listed, _existing(full), labels, f"{path}:{number}", stem(listed)))
    return Parsed(records, base)


def read_esc50(meta: str, audio_dir: str | None) -> Parsed:
    """ESC-50 `meta/esc50.csv`: multi-class, folds kept, classes ordered by target index."""
    base = audio_dir or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(meta))), "audio")
    rows = list(csv.DictReader(read_lines(meta)))
    needed = {"filename", "fold", "target", "category"}
    if rows and not needed <= set(rows[0]):
        raise DatasetError(f"{meta}: header must hold {sorted(needed)}, got {sorted(rows[0])}")
    names: dict[int, str] = {}
    records = []
    for number, row in enumerate(rows, 2):
        try:
            target, fold = int(row["target"]), int(row["fold"])
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{meta}:{number}: target and fold must be integers") from e
        category = row["category"].strip()
        if names.setdefault(target, category) != category:
            raise DatasetError(f"{meta}:{number}: target {target} is both {names[target]!r} and {category!r}")
        listed = row["filename"].strip()
        full = os.path.join(base, listed)
        records.append(
            Record(listed, _existing(full), [category], f"{meta}:{number}", stem(listed), fold=fold)
        )
    classes = [(names[t], names[t]) for t in sorted(names)]
    return Parsed(records, base, classes=classes, multilabel=False)


def read_strong(path: str, audio_dir: str | None) -> Parsed:
    """DCASE `filename<TAB>onset<TAB>offset<TAB>event_label` (or `filename<TAB>labels`), as clip labels."""
    folder = os.path.dirname(os.path.abspath(path))
    bases = ([audio_dir] if audio_dir else []) + [os.path.join(folder, "audio"), folder]
    clips: dict[str, Record] = {}
    for number, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        cells = [cell.strip() for cell in line.split("\t")]
        if number == 1 and cells[0].lower() in ("filename", "file", "path"):
            continue
        if len(cells) == 2:
            labels = _split_labels(cells[1], ",")
        elif len(cells) >= 4:
            labels = [cells[3]] if cells[3] else []
            if cells[1] or cells[2]:
                try:
                    float(cells[1]), float(cells[2])
                except ValueError as e:
                    raise DatasetError(f"{path}:{number}: onset and offset must be numbers") from e
        elif len(cells) == 1:
            labels = []
        else:
            raise DatasetError(f"{path}:{number}: expected 'filename<TAB>onset<TAB>offset<TAB>event_label'")
        listed = cells[0]
        if listed not in clips:
            found = next((p for b in bases if (p := _existing(os.path.join(b, listed)))), None)
            clips[listed] = Record(listed, found, [], f"{path}:{number}", stem(listed))
        record = clips[listed]
        record.labels += [label for label in labels if label not in record.labels]
    return Parsed(list(clips.values()), bases[0])


def read_manifest(tsv: str, audio_dir: str | None) -> Parsed:
    """fairseq `.tsv` (root line, then relative paths) with its `.lbl` and `label_descriptors.csv`."""
    lines = read_lines(tsv)
    if not lines or "\t" in lines[0]:
        raise DatasetError(f"{tsv}:1: a fairseq manifest starts with the audio root folder on its own line")
    root = audio_dir or lines[0].strip()
    lbl = os.path.splitext(tsv)[0] + ".lbl"
    if not os.path.isfile(lbl):
        raise DatasetError(f"{tsv}: no label file {os.path.basename(lbl)} beside it")
    labels: dict[str, list[str]] = {}
    for line in read_lines(lbl):
        if not line.strip():
            continue
        clip_id, _, text = line.partition("\t")
        labels[clip_id.strip()] = _split_labels(text, ",")
    records = []
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        listed = line.split("\t")[0].strip()
        without_ext = os.path.splitext(listed)[0]
        ids = (without_ext, listed, stem(listed), os.path.basename(listed))
        match = next((i for i in ids if i in labels), None)
        if match is None:
            raise DatasetError(f"{lbl}: no labels for {listed!r} (listed at {tsv}:{number})")
        full = os.path.join(root, listed)
        records.append(Record(listed, _existing(full), labels[match], f"{lbl} ({match})", stem(listed)))
    descriptors = os.path.join(os.path.dirname(os.path.abspath(tsv)), "label_descriptors.csv")
    classes = read_descriptors(descriptors) if os.path.isfile(descriptors) else None
    return Parsed(records, root, classes=classes)


def _y_prefixed(name_of):
    """The same naming with YouTube-dl's 'Y' in front of the id."""
    return lambda y, s, e: "Y" + name_of(y, s, e)


NAMINGS = {
    "{YTID}_{start:.3f}_{end:.3f}": lambda y, s, e: f"{y}_{s:.3f}_{e:.3f}",
    "{YTID}_{start}_{end}": lambda y, s, e: f"{y}_{int(s)}_{int(e)}",
    "{YTID}_{start_ms}_{end_ms}": lambda y, s, e: f"{y}_{round(s * 1000)}_{round(e * 1000)}",
    "{YTID}_{start:.3f}": lambda y, s, e: f"{y}_{s:.3f}",
    "{YTID}_{start:.1f}": lambda y, s, e: f"{y}_{s:.1f}",
    "{YTID}_{start}": lambda y, s, e: f"{y}_{int(s)}",
    "{YTID}_{start_ms}": lambda y, s, e: f"{y}_{round(s * 1000)}",
    "{YTID}": lambda y, s, e: y,
}
NAMINGS.update({"Y" + name: _y_prefixed(name_of) for name, name_of in NAMINGS.items()})


def index_audio(folder: str) -> dict[str, str]:
    """Map file stem -> path for every audio file under folder (recursive; earlier extensions win)."""
    found: dict[str, str] = {}
    rank = {ext: i for i, ext in enumerate(AUDIO_EXTENSIONS)}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            key, ext = os.path.splitext(name)
            ext = ext.lower()
            if ext not in rank:
                continue
            if key not in found or rank[ext] < rank[os.path.splitext(found[key])[1].lower()]:
                found[key] = os.path.join(dirpath, name)
    return found


def read_audioset(path: str, audio_dir: str | None) -> Parsed:
    """AudioSet segment csv (`YTID, start, end, "mid1,mid2"`), matched to audio under audio_dir by name."""
    base = audio_dir or os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(base):
        raise DatasetError(f"{path}: audio folder {base} does not exist")
    segments = []
    for number, row in enumerate(csv.reader(read_lines(path), skipinitialspace=True), 1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#") or row[0] == "YTID":
            continue
        if len(row) < 4:
            raise DatasetError(f"{path}:{number}: expected 'YTID, start_seconds, end_seconds, labels'")
        try:
            start, end = float(row[1]), float(row[2])
        except ValueError as e:
            raise DatasetError(f"{path}:{number}: start and end seconds must be numbers") from e
        segments.append((row[0].strip(), start, end, _split_labels(",".join(row[3:]), ","), number))
    audio = index_audio(base)
    hits = Counter(name for y, s, e, *_ in segments for name, f in NAMINGS.items() if f(y, s, e) in audio)
    order = [name for name, _ in hits.most_common()]
    used: Counter = Counter()
    records = []
    for ytid, start, end, labels, number in segments:
        found = None
        for name in order:
            candidate = NAMINGS[name](ytid, start, end)
            if candidate in audio:
                found = audio[candidate]
                used[name] += 1
                break
        where = f"{path}:{number}"
        records.append(Record(ytid, found, labels, where, ytid, duration=end - start))
    naming = ", ".join(name for name, _ in used.most_common()) or None
    return Parsed(records, base, classes=audioset_labels(), naming=naming)
