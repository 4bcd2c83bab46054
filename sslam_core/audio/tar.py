"""Audio inside plain tar files (WebDataset shards), read by offset: a shard is indexed from its
512-byte headers, and each audio member is an `AudioFile` whose bytes are read in place, never unpacked.

Why the standard `tarfile` rather than `webdataset`: no new dependency, and random access. `tarfile`
reads only the headers of a plain tar and seeks over the data, so indexing a shard costs a few reads
per member; a `TarMember` holds the shard path, the data offset and the size, pickles into worker
processes, and is decoded through a bounded file object (libsndfile and PyAV both read those).
Compressed shards cannot be read by offset: they are refused with one line saying to decompress them.

Bad shards never stop a run: a missing shard, a file that is not a tar, a compressed or empty one, a
damaged header (the members before it still run), a member whose size runs past the end of the shard
(truncated), a link or a sample without audio each become an `Unreadable` source naming the shard or
member and the reason, which raises AudioError when decoded. Member names are made printable (they
are never used as paths on disk). Shard specs, lists and labels: `sslam_core.data.shards`.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import BinaryIO

import torch

from sslam_core.audio.files import AV_EXTENSIONS, SOUNDFILE_EXTENSIONS, AudioError, printable

TAR_SUFFIX = ".tar"

COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.zstd")

COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}

AUDIO_SUFFIXES = SOUNDFILE_EXTENSIONS | AV_EXTENSIONS

LABEL_FIELDS = ("json", "cls")


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
    """One audio member of a shard: an `AudioFile` whose bytes are read by offset (decode it like a
    path, with `decode.stream_audio` or `load_audio`). `shard` is the path as given, `member` the path
    inside the shard, `offset` and `size` where its data lies (bytes); `name` is `SHARD/MEMBER`."""

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
