"""What an audio input is: a path, a member of another file (`AudioFile`), or a source that decodes
itself (`AudioSource`); the extensions each decoder reads; `AudioError`, the one way a file fails."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import BinaryIO, Protocol, runtime_checkable

from torch import Tensor

from sslam_core.errors import SslamError

# Containers libsndfile reads natively; anything else with a known extension goes to PyAV.
SOUNDFILE_EXTENSIONS = {
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd",
    ".caf", ".w64", ".rf64", ".voc", ".sd2", ".htk", ".sph", ".nist", ".ircam", ".sf", ".mat",
}  # fmt: skip

AV_EXTENSIONS = {
    ".m4a", ".aac", ".mp4", ".m4b", ".mov", ".webm", ".mkv", ".mka", ".opus", ".wma", ".wmv",
    ".3gp", ".amr", ".ac3", ".avi", ".mpeg", ".mpg", ".ts",
}  # fmt: skip

# libsndfile support for these depends on its build; fall back to PyAV when it refuses them.
AV_FALLBACK_EXTENSIONS = {".mp3", ".ogg", ".oga"}


class AudioError(SslamError):
    """An audio file that cannot be decoded into finite samples; the message names the file and why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


@runtime_checkable
class AudioFile(Protocol):
    """Encoded audio held inside another file (a member of a tar shard), decoded without unpacking it:
    `name` for messages and the choice of decoder by extension, `size` in bytes, and `open()`, a
    seekable binary file object over exactly its bytes (libsndfile and PyAV both read those)."""

    name: str
    size: int

    def open(self) -> BinaryIO:
        """A new seekable binary file object positioned at its first byte."""
        ...


AudioInput = str | os.PathLike | AudioFile


@runtime_checkable
class AudioSource(Protocol):
    """Audio that is neither a file path nor a waveform (a member of a tar shard): it names itself and
    decodes itself. Instances must pickle, so that decoding can run in worker processes."""

    name: str

    def blocks(self, block_seconds: float) -> Iterable[Tensor]:
        """1-D float32 mono blocks at 16 kHz; raises AudioError when it cannot be decoded."""
        ...

    def seconds(self) -> float | None:
        """Its duration when known cheaply (None otherwise): long ones are streamed, not decoded ahead."""
        ...


def printable(name: str) -> str:
    """`name` as valid UTF-8 text: bytes of a file name that are not UTF-8 (held by Python as lone
    surrogates) become `\\xNN` escapes, so that the name can be printed, written to JSON / CSV and
    stored in HDF5; the file itself is still read by its real path."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
