"""Tar shards in the WebDataset layout as inputs: indexed from their headers, members decoded by offset.

Layout: a plain (uncompressed) `.tar` whose members are grouped into samples by key, the member path
up to the first dot of its last component (`a/x.flac`, `a/x.json` and `a/x.cls` are the sample
`a/x`). A member with an audio extension (`sslam_core.audio.decode`'s) is a clip, named `SHARD/MEMBER` with
the shard as given (`shards/as-000.tar/a/x.flac`); `key.json` and `key.cls` give its labels (see
`read_shard_labels`); other members (`key.txt`, ...) are ignored, and a sample without audio is
reported. Shard specs: a `.tar` path, a brace pattern (`as-{000000..000999}.tar`, zero-padded when an
end is, `{a,b}` lists; quote it so that the shell leaves it to us) or a `.txt` list of shards (one
a line, relative to the list's folder, `#` comments; a `.txt` is a shard list when all its entries
end in `.tar`, else it stays an audio file list).

Why the standard `tarfile` rather than `webdataset`: no new dependency, and we need random access.
`webdataset` streams a shard from its first byte to its last; training crops clips by index in any
order (`shard_indices`), DataLoader workers and torchrun ranks each read their own clips, and a
resumed `extract` skips what is done. `tarfile` reads only the 512-byte headers of a plain tar and
seeks over the data, so indexing a shard costs a few reads per member; a `TarMember` then holds the
shard path, the data offset and the size, pickles into worker processes, and decodes its bytes in
place through a bounded file object (libsndfile and PyAV both read file objects), never unpacking.
Compressed shards (`.tar.gz`, `.tgz`, `.tar.bz2`, `.tar.xz`, `.tar.zst`, or a `.tar` that is one)
cannot be read by offset: they are refused with one line saying to decompress them.

Bad shards never stop a run: a missing shard, a file that is not a tar, a compressed or empty one, a
damaged header (the members before it still run), a member whose size runs past the end of the shard
(truncated), a link or a sample without audio each become an `Unreadable` source that names the shard
or member and the reason, and raises AudioError when decoded, so that every command reports it as one
skipped line where it reports undecodable files. Member names are made printable (they are never used
as paths on disk, so `../` in them is harmless).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import BinaryIO

import torch

from sslam_core.audio.decode import AV_EXTENSIONS, SOUNDFILE_EXTENSIONS, AudioError, audio_info, stream_audio
from sslam_core.data.label_formats import DatasetError, Parsed, Record, printable, read_lines

SAMPLE_RATE = 16000
TAR_SUFFIX = ".tar"
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.zstd")
COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
AUDIO_SUFFIXES = SOUNDFILE_EXTENSIONS | AV_EXTENSIONS
LABEL_FIELDS = ("json", "cls")
MAX_LABEL_BYTES = 1 << 20  # a key.json / key.cls larger than this is not a label file
MAX_SHARDS = 1_000_000  # a brace pattern expanding to more is a typo


# ---------------------------------------------------------------------------------------------------------
# Sources


class _MemberFile(io.RawIOBase):
    """Read-only, seekable view of bytes [offset, offset + size) of a file."""

    def __init__(self, path: str, offset: int, size: int):
        super().__init__()
        self._file = open(path, "rb", buffering=0)
        self._start, self._size, self._pos = offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + pos < 0:
            raise OSError("negative seek position")
        self._pos = base + pos
        return self._pos

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self._size - self._pos))
        if count == 0:
            return 0
        self._file.seek(self._start + self._pos)
        got = self._file.readinto(memoryview(buffer)[:count]) or 0
        self._pos += got
        return got

    def close(self) -> None:
        self._file.close()
        super().close()


@dataclass(frozen=True)
class TarMember:
    """One audio member of a shard: an `inference.AudioSource` (and an `audio.AudioFile`) that reads
    its bytes by offset. `shard` is the path as given, `member` the path inside the shard, `offset`
    and `size` where its data lies (bytes); `name` is `SHARD/MEMBER`, printable."""

    shard: str
    member: str
    offset: int
    size: int

    @property
    def name(self) -> str:
        return printable(f"{self.shard}/{self.member}")

    def open(self) -> BinaryIO:
        """A seekable binary file object over the member's bytes (nothing is unpacked)."""
        try:
            return io.BufferedReader(_MemberFile(self.shard, self.offset, self.size), 1 << 16)
        except OSError as err:
            raise AudioError(self.name, f"cannot read the shard ({err.strerror or err})") from err

    def blocks(self, block_seconds: float) -> Iterator[torch.Tensor]:
        """1-D float32 mono blocks at 16 kHz, decoded as a file of the member's extension would be."""
        return stream_audio(self, SAMPLE_RATE, block_seconds)

    def seconds(self) -> float | None:
        """Duration from the member's audio header (None when it cannot be read: decoding says why)."""
        try:
            return audio_info(self)[3]
        except Exception:  # decoding reports the member; here it only means "not known"
            return None


@dataclass(frozen=True)
class Unreadable:
    """A shard or member that cannot be read (see the module docstring): an `AudioSource` whose
    decoding raises AudioError(name, reason), so that it is reported where bad files are."""

    name: str
    reason: str
    size: int = 0

    def blocks(self, block_seconds: float) -> Iterator[torch.Tensor]:
        raise AudioError(self.name, self.reason)

    def seconds(self) -> float | None:
        return None


ShardSource = TarMember | Unreadable


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
        return [p for entry in _list_entries(spec) for p in shard_paths(os.path.join(base, entry))]
    if "{" in spec and not os.path.exists(spec):
        return expand_braces(spec)
    return [spec]


# ---------------------------------------------------------------------------------------------------------
# Indexing


@dataclass
class Sample:
    """One clip of a shard: its key and its audio member (or why it cannot be read)."""

    key: str
    source: ShardSource


@dataclass
class ShardIndex:
    """What a shard's headers say: its samples in member order, and the label members by key."""

    shard: str
    samples: list[Sample] = field(default_factory=list)
    fields: dict[str, dict[str, TarMember]] = field(default_factory=dict)  # key -> {"json": ..., "cls": ...}
    _by_name: dict[str, ShardSource] = field(default_factory=dict, repr=False)

    def sources(self) -> list[ShardSource]:
        return [s.source for s in self.samples]

    def find(self, name: str) -> ShardSource | None:
        """The sample source named `name` (`SHARD/MEMBER`, or the shard for its own problems)."""
        if len(self._by_name) != len(self.samples):
            self._by_name = {s.source.name: s.source for s in self.samples}
        return self._by_name.get(printable(name))


def split_key(member: str) -> tuple[str, str]:
    """WebDataset's (key, suffix): `a/b/x.seg1.flac` -> (`a/b/x`, `seg1.flac`)."""
    folder, _, base = member.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), suffix.lower()


def _refusal(path: str) -> str | None:
    """Why `path` cannot be indexed before opening it as a tar (None: go ahead)."""
    if not os.path.exists(path):
        return "shard not found"
    if not os.path.isfile(path):
        return "not a regular file"
    if os.path.getsize(path) == 0:
        return "shard is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(6)
    kind = next((k for magic, k in COMPRESSED_MAGIC.items() if head.startswith(magic)), None)
    if kind or path.lower().endswith(COMPRESSED_SUFFIXES):
        return (
            f"compressed shard ({kind or 'by its name'}): members cannot be read by offset; decompress it "
            "to a plain .tar (e.g. gunzip)"
        )
    return None


def _damage(f: BinaryIO, offset: int) -> bool:
    """Whether the bytes where tarfile stopped are neither the end-of-archive zeros nor the file's end."""
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    return bool(block) and block.count(0) != len(block)


def index_shard(path: str) -> ShardIndex:
    """Index one shard from its headers only (tarfile seeks over the data of a plain tar); every
    problem becomes an `Unreadable` sample in its place (see the module docstring)."""
    index = ShardIndex(path)

    def problem(name: str, reason: str, key: str = "") -> None:
        index.samples.append(Sample(key, Unreadable(printable(name), reason)))

    try:
        refused = _refusal(path)
    except OSError as err:
        refused = f"cannot read the shard ({err.strerror or err})"
    if refused:
        problem(path, refused)
        return index
    size = os.path.getsize(path)
    members, broken = [], None
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            while True:
                try:
                    info = tar.next()
                except (tarfile.ReadError, EOFError) as err:
                    broken = (
                        f"damaged tar data after byte {tar.offset} ({err}); the members after it are not read"
                    )
                    break
                if info is None:
                    break
                members.append(info)
            if broken is None and _damage(f, tar.offset):
                broken = f"damaged tar header at byte {tar.offset}; the members after it are not read"
    except tarfile.ReadError as err:
        problem(path, f"not a tar archive ({err})")
        return index
    except OSError as err:
        problem(path, f"cannot read the shard ({err.strerror or err})")
        return index
    cut = False
    audio_keys: set[str] = set()
    others: dict[str, str] = {}  # key -> first member, for samples without audio
    for info in members:
        name = info.name
        base = name.rpartition("/")[2]
        if info.isdir() or not base or base.startswith("."):
            continue
        key, suffix = split_key(name)
        is_audio = os.path.splitext(base)[1].lower() in AUDIO_SUFFIXES
        if not info.isreg() or info.issparse():
            if is_audio:
                kind = "a link" if info.issym() or info.islnk() else "not a regular file"
                problem(f"{path}/{name}", f"{kind} in the shard, not audio data", key)
            continue
        if info.offset_data + info.size > size:
            cut = True
            if is_audio or suffix in LABEL_FIELDS:
                held = max(0, size - info.offset_data)
                problem(
                    f"{path}/{name}",
                    f"member claims {info.size} bytes but the shard holds {held} of them (truncated shard?)",
                    key,
                )
            continue
        member = TarMember(path, name, info.offset_data, info.size)
        if is_audio:
            index.samples.append(Sample(key, member))
            audio_keys.add(key)
        elif suffix in LABEL_FIELDS:
            index.fields.setdefault(key, {})[suffix] = member
            others.setdefault(key, name)
        else:
            others.setdefault(key, name)
    for key, name in others.items():
        if key not in audio_keys:
            problem(f"{path}/{name}", f"not audio (sample {printable(key)!r} has no audio member)", key)
    if broken and not cut:
        problem(path, broken)
    if not index.samples:  # a tar of folders only, say
        problem(path, "shard holds no members" if not members else "shard holds no audio members")
    return index


@lru_cache(maxsize=64)
def _cached_index(path: str, absolute: str, size: int, mtime_ns: int) -> ShardIndex:
    return index_shard(path)


def cached_index(path: str) -> ShardIndex:
    """`index_shard`, cached per process while the shard's size and modification time stay the same."""
    try:
        st = os.stat(path)
    except OSError:
        return index_shard(path)
    return _cached_index(path, os.path.abspath(path), st.st_size, st.st_mtime_ns)


def read_shards(spec: str) -> list[ShardIndex]:
    """The index of every shard a spec names, in order."""
    return [cached_index(path) for path in shard_paths(spec)]


def shard_sources(spec: str) -> list[ShardSource]:
    """Every clip of the shards a spec names, in shard then member order; a shard's problems follow
    its clips (samples without audio, then a damaged header or an unreadable shard)."""
    return [source for index in read_shards(spec) for source in index.sources()]


def member_by_name(name: str) -> TarMember | None:
    """The member a name `SHARD.tar/MEMBER` stands for (None when no prefix of it is a tar file);
    AudioError when the shard or the member is unreadable or the member is not in the shard, and
    for a shard itself (it holds many clips, not one)."""
    lower = name.lower()
    for match in re.finditer(re.escape(TAR_SUFFIX) + r"(/|$)", lower):
        shard, member = name[: match.start() + len(TAR_SUFFIX)], name[match.end() :]
        if not os.path.isfile(shard):
            continue
        source = cached_index(shard).find(name)
        if isinstance(source, TarMember):
            return source
        if isinstance(source, Unreadable):
            raise AudioError(name, source.reason)
        if not member:
            raise AudioError(name, "a tar shard, not one audio file")
        raise AudioError(name, f"no audio member {printable(member)!r} in {printable(shard)}")
    return None


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
    "ShardIndex",
    "ShardSource",
    "Sample",
    "TarMember",
    "Unreadable",
    "cached_index",
    "expand_braces",
    "index_shard",
    "is_shard_list",
    "is_shard_spec",
    "member_by_name",
    "read_shard_labels",
    "read_shards",
    "sample_labels",
    "shard_paths",
    "shard_sources",
    "split_key",
]
