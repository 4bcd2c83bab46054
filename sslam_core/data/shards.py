"""Tar shards in the WebDataset layout as inputs: indexed from their headers, members decoded by offset.

Layout: a plain (uncompressed) `.tar` whose members are grouped into samples by key, the member path
up to the first dot of its last component (`a/x.flac`, `a/x.json` and `a/x.cls` are the sample
`a/x`). A member with an audio extension (`audio.files`') is a clip, named `SHARD/MEMBER` with
the shard as given (`shards/as-000.tar/a/x.flac`); `key.json` and `key.cls` give its labels (see
`read_shard_labels`); other members (`key.txt`, ...) are ignored, and a sample without audio is
reported. Shard specs: a `.tar` path, a brace pattern (`as-{000000..000999}.tar`, zero-padded when an
end is, `{a,b}` lists; quote it so that the shell leaves it to us) or a `.txt` list of shards (one
a line, relative to the list's folder, `#` comments; a `.txt` is a shard list when all its entries
end in `.tar`, else it stays an audio file list).

Reading the shards themselves (headers, members by offset, refusals of compressed or damaged
shards) is `sslam_core.audio.tar`'s; this module turns shard specs into sources and reads the labels.
"""

from __future__ import annotations

import json
import os
import re

from sslam_core.audio.tar import (
    COMPRESSED_SUFFIXES,
    TAR_SUFFIX,
    ShardIndex,
    ShardSource,
    TarMember,
    Unreadable,
    cached_index,
)
from sslam_core.data.label_formats import DatasetError, Parsed, Record, read_lines

MAX_LABEL_BYTES = 1 << 20  # a key.json / key.cls larger than this is not a label file
MAX_SHARDS = 1_000_000  # a brace pattern expanding to more is a typo

# ---------------------------------------------------------------------------------------------------------
# Shard specs


def _closing_brace(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return -1


def _top_level_split(body: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(body):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    return parts + [body[start:]]


def _range(body: str) -> list[str] | None:
    match = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if not match:
        return None
    first, last = match.groups()
    a, b = int(first), int(last)
    if abs(b - a) >= MAX_SHARDS:
        raise DatasetError(f"{{{body}}}: expands to more than {MAX_SHARDS} names")
    padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (first, last))
    width = max(len(first), len(last)) if padded else 0
    step = 1 if b >= a else -1
    return [f"{i:0{width}d}" for i in range(a, b + step, step)]


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: `x-{000..002}.tar` -> x-000.tar, x-001.tar, x-002.tar (padded to
    the wider end when an end has a leading zero), `{a,b}` lists, several and nested groups. A group
    that is neither (`{a}`) stays as written."""
    start = pattern.find("{")
    end = _closing_brace(pattern, start) if start >= 0 else -1
    if end < 0:
        return [pattern]
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    options = _range(body)
    if options is None:
        parts = _top_level_split(body)
        if len(parts) < 2:
            return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
        options = [x for part in parts for x in expand_braces(part)]
    rests = expand_braces(tail)
    if len(options) * len(rests) > MAX_SHARDS:
        raise DatasetError(f"{pattern}: expands to more than {MAX_SHARDS} names")
    return [head + option + rest for option in options for rest in rests]


def _is_tar_name(path: str) -> bool:
    return path.lower().endswith((TAR_SUFFIX, *COMPRESSED_SUFFIXES))


def _list_entries(path: str) -> list[str]:
    return [line.strip() for line in read_lines(path) if line.strip() and not line.lstrip().startswith("#")]


def is_shard_list(path: str) -> bool:
    """A `.txt` file whose entries all name tar shards (paths or brace patterns ending in .tar)."""
    if not path.lower().endswith(".txt") or not os.path.isfile(path):
        return False
    try:
        entries = _list_entries(path)
    except DatasetError:
        return False
    return bool(entries) and all(_is_tar_name(entry) for entry in entries)


def is_shard_spec(item: str) -> bool:
    """A `.tar` path (also a compressed one, to refuse it clearly), a brace pattern of them, or a
    shard list (see `is_shard_list`)."""
    return _is_tar_name(item) or is_shard_list(item)


def shard_paths(spec: str) -> list[str]:
    """The shards a spec names, in order: a path (kept as given), a brace pattern's expansion (an
    existing file of that literal name wins), or the entries of a shard list, each relative to the
    list's folder and expanded in turn."""
    if is_shard_list(spec):
        base = os.path.dirname(spec)
        # entries relative to the list's folder, `..` resolved so that names read plainly
        entries = [os.path.normpath(os.path.join(base, entry)) for entry in _list_entries(spec)]
        return [p for entry in entries for p in shard_paths(entry)]
    if "{" in spec and not os.path.exists(spec):
        return expand_braces(spec)
    return [spec]


# ---------------------------------------------------------------------------------------------------------
# Indexing


def read_shards(spec: str) -> list[ShardIndex]:
    """The index of every shard a spec names, in order."""
    return [cached_index(path) for path in shard_paths(spec)]


def shard_sources(spec: str) -> list[ShardSource]:
    """Every clip of the shards a spec names, in shard then member order; a shard's problems follow
    its clips (samples without audio, then a damaged header or an unreadable shard)."""
    return [source for index in read_shards(spec) for source in index.sources()]


# ---------------------------------------------------------------------------------------------------------
# Labels


def _read_small(member: TarMember) -> str:
    if member.size > MAX_LABEL_BYTES:
        raise ValueError(f"{member.size} bytes, more than a label file holds")
    with member.open() as f:
        return f.read().decode("utf-8-sig")


def _tokens(text: str) -> list[str]:
    return [t.strip() for t in re.split(r"[,\n]", text) if t.strip()]


def _label(value: object) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"a label must be a class index or a name, got {value!r}")
    return value.strip() if isinstance(value, str) else value


def sample_labels(fields: dict[str, TarMember]) -> list[int | str]:
    """The labels of one sample: the union of `key.cls` (class indices or names/ids, comma- or
    line-separated; an integer is an index) and `key.json`'s "labels" (a list or one value) or
    "label" (ints are indices, strings names or ids). ValueError naming the member when unreadable."""
    labels: list[int | str] = []
    if "cls" in fields:
        try:
            text = _read_small(fields["cls"])
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{fields['cls'].name}: {err}") from None
        for token in _tokens(text):
            labels.append(int(token) if re.fullmatch(r"-?\d+", token) else token)
    if "json" in fields:
        try:
            obj = json.loads(_read_small(fields["json"]))
            if not isinstance(obj, dict):
                raise ValueError("expected a JSON object")
            value = obj.get("labels", obj.get("label", []))
            labels += [_label(v) for v in (value if isinstance(value, list) else [value])]
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{fields['json'].name}: {err}") from None
    return list(dict.fromkeys(label for label in labels if label != ""))


def read_shard_labels(spec: str, audio_dir: str | None = None) -> Parsed:
    """Records of every audio sample of the shards `spec` names, labelled from key.cls / key.json
    (`sample_labels`); `extra["problems"]` holds the Unreadable samples (bad labels included), which
    `datasets.read_labelled` keeps as examples that are reported when decoded. `audio_dir` is unused:
    shards hold their audio."""
    records, problems = [], []
    for index in read_shards(spec):
        for sample in index.samples:
            source = sample.source
            if isinstance(source, TarMember):
                try:
                    labels = sample_labels(index.fields.get(sample.key, {}))
                except ValueError as err:
                    source = Unreadable(source.name, f"bad labels ({err})")
                else:
                    name = source.name
                    records.append(Record(name, name, labels, name, sample.key, source=source))
                    continue
            problems.append(source)
    if not records and not problems:
        raise DatasetError(f"{spec}: no shards")
    return Parsed(records, spec, extra={"problems": problems})


__all__ = [
    "expand_braces",
    "is_shard_list",
    "is_shard_spec",
    "read_shard_labels",
    "read_shards",
    "sample_labels",
    "shard_paths",
    "shard_sources",
]
