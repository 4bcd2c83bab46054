"""Class names for classifier heads: the AudioSet ontology shipped with the package, or a user CSV."""

from __future__ import annotations

import csv
from functools import lru_cache
from importlib import resources
from pathlib import Path

from sslam_core.errors import SslamError

AUDIOSET_CLASSES = 527


class LabelError(SslamError, ValueError):
    """A label file that cannot be read as class names."""


NAME_COLUMNS = ("display_name", "name", "label")  # header names of the class-name column, by preference


def _parse(text: str, source: str) -> list[tuple[str, str]]:
    """Class names in head order, as (mid, name): a CSV whose header names a `display_name` (or `name`
    / `label`) column, with optional `mid` and `index` columns (AudioSet's class_labels_indices.csv),
    or else one name per line (a line is a whole name, commas included; a first line that is just
    `display_name`, `name` or `label` is a header)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise LabelError(f"{source}: no class names found")
    rows = [[cell.strip() for cell in row] for row in csv.reader(lines)]
    header = [cell.lower() for cell in rows[0]]
    names = [c for c in NAME_COLUMNS if c in header]
    if not names:
        return [(line.strip(), line.strip()) for line in lines]
    if len(header) == 1:  # a one-column file with a header line: each further line is a whole name
        return [(line.strip(), line.strip()) for line in lines[1:]]
    name = header.index(names[0])
    mid = header.index("mid") if "mid" in header else name
    body = rows[1:]
    if not body:
        raise LabelError(f"{source}: a header but no class names")
    try:
        if "index" in header:
            body = sorted(body, key=lambda r: int(r[header.index("index")]))
        return [(r[mid], r[name]) for r in body]
    except (ValueError, IndexError):
        raise LabelError(f"{source}: rows must match the header {','.join(rows[0])!r}") from None


@lru_cache(maxsize=1)
def _audioset() -> tuple[tuple[str, str], ...]:
    text = resources.files("sslam_core").joinpath("data_files/class_labels_indices.csv").read_text("utf-8")
    return tuple(_parse(text, "class_labels_indices.csv"))


def audioset_labels() -> list[tuple[str, str]]:
    """The 527 AudioSet classes as (mid, display name), in the order of the released heads."""
    return list(_audioset())


def labels_from_mids(mid_to_index: dict) -> list[tuple[str, str]]:
    """Order AudioSet-style mids by their class index (fairseq `task_state['labels']`) and name them."""
    names = dict(_audioset())
    order = sorted(mid_to_index.items(), key=lambda kv: int(kv[1]))
    return [(mid, names.get(mid, mid)) for mid, _ in order]


def read_label_csv(path: str | Path) -> list[tuple[str, str]]:
    """Class names for a custom head: `index,mid,display_name` rows, or one name per line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise LabelError(f"{path}: cannot read label file ({e})") from None
    return _parse(text, str(path))


__all__ = ["AUDIOSET_CLASSES", "LabelError", "audioset_labels", "labels_from_mids", "read_label_csv"]
