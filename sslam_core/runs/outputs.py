"""Writing outputs safely: never replace an existing file unasked, always through a rename, and turn
operating-system failures (full disk, no permission, read-only file system) into one clear line.

Every command writes its results through these helpers, so the rules are the same everywhere:
- `claim_output(path, overwrite)` before any work: refuses an existing output unless `overwrite`,
  creates missing parent folders and checks that the folder is writable;
- `atomic_write(path, write)`: `write(tmp)` fills a temporary file in the same folder (its name ends
  in `path`'s suffix, for writers that pick the format by it), which is
  flushed, given the ordinary file mode (0666 less the umask, like `open`) and renamed over `path`;
  on any failure the temporary file is removed and the old `path`, if any, is untouched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sslam_core.errors import SslamError


class OutputError(SslamError, OSError):
    """An output that cannot be written, or that exists and may not be replaced; the message is one
    line naming the path and the cause."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()


def os_reason(e: OSError) -> str:
    """The cause of an OSError in a few words: 'no space left on device', 'permission denied', ..."""
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.strerror:
        return e.strerror[0].lower() + e.strerror[1:]
    return str(e) or type(e).__name__


def output_error(path: str | os.PathLike, e: OSError, doing: str = "cannot write") -> OutputError:
    """An OutputError('{path}: cannot write ({cause})') for an OSError met while writing `path`."""
    if isinstance(e, OutputError):
        return e
    err = OutputError(e.errno, f"{path}: {doing} ({os_reason(e)})")
    err.filename = str(path)
    return err


_OS_ERROR = re.compile(r"os error (\d+)")  # how safetensors names the OS error behind its own exception


def os_error_behind(e: BaseException) -> OSError | None:
    """The OSError behind an exception: itself, one it was raised from (torch.save, h5py), or the errno
    a serializer names in its message (safetensors' `... (os error 28)`); None when there is none."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    found = _OS_ERROR.search(str(e))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    return None


def claim_output(path: str | os.PathLike, overwrite: bool = False, flag: str = "--overwrite") -> Path:
    """Check, before any work, that `path` may be written: it must not exist unless `overwrite`, it must
    not be a folder, and its folder (created if missing) must be writable."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(errno.EISDIR, f"{path}: is a folder, not a file")
    if path.exists() and not overwrite:
        raise OutputError(errno.EEXIST, f"{path} exists; pass {flag} to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(path.parent, e, "cannot create the folder") from e
    if not os.access(path.parent, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(path.parent).f_flag & os.ST_RDONLY)
        cause = "read-only file system" if read_only else "permission denied"
        raise OutputError(errno.EROFS if read_only else errno.EACCES, f"{path}: cannot write ({cause})")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], mode: int | None = None) -> Path:
    """Write `path` through a temporary file in its folder and a rename (see the module docstring).
    OS-level failures, also those a serializer reports as its own exception type (`os_error_behind`),
    become an OutputError naming `path`; other exceptions propagate after the clean-up."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise output_error(path, e) from e
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE if mode is None else mode)
        os.replace(tmp, path)
    except Exception as e:
        if isinstance(e, OutputError) and str(path) in str(e):
            raise
        cause = os_error_behind(e)
        if cause is None:
            raise
        raise OutputError(cause.errno, f"{path}: cannot write ({os_reason(cause)})") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of a UTF-8 text file (newlines written as they are)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """`atomic_write` of a binary file."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


class _RecordingFile:
    """A file wrapper that keeps the OSError of a failed write: torch.save reports it as a RuntimeError
    without the cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def torch_save(obj: Any, path: str) -> None:
    """`torch.save` to `path` such that a write error surfaces as its OSError (for `atomic_write`)."""
    import torch  # here, so that importing this module stays cheap

    with open(path, "wb") as f:
        writer = _RecordingFile(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


# --- Finished outputs -----------------------------------------------------------------------------------
# A journaled output (`OUT.parts/` while the run goes on) is finished once the journal is gone. Its
# settings travel with it as a fingerprint, so that `--resume` can tell "already complete" from "made
# with other settings": HDF5 outputs keep it as an attribute; text outputs as the extended attribute
# below where the file system has them (Linux), else it cannot be told and `--resume` refuses.

SETTINGS_XATTR = "user.sslam.settings"


def settings_digest(settings: dict, names: Sequence[str] | None = None) -> str:
    """The fingerprint of a run's settings (and of its inputs' names, when not in the settings)."""
    blob = {"settings": settings} if names is None else {"settings": settings, "inputs": list(names)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def journal_of(path: str | os.PathLike) -> Path:
    """The journal folder of a resumable output: `OUT.parts`."""
    path = Path(path)
    return path.with_name(path.name + ".parts")


def is_finished(path: str | os.PathLike) -> bool:
    """An output that exists and has no journal of an unfinished run beside it."""
    return Path(path).exists() and not journal_of(path).exists()


def record_settings(path: str | os.PathLike, digest: str) -> None:
    """Keep `digest` with the file (an extended attribute; silently nothing where there are none)."""
    try:
        os.setxattr(path, SETTINGS_XATTR, digest.encode("ascii"))
    except (AttributeError, OSError):
        pass


def recorded_settings(path: str | os.PathLike) -> str | None:
    """The digest `record_settings` kept with the file, if any."""
    try:
        return os.getxattr(path, SETTINGS_XATTR).decode("ascii")
    except (AttributeError, OSError, UnicodeDecodeError):
        return None


class FinishedOutputError(SslamError):
    """`--resume` on a finished output made with other settings or inputs: it is left as it is."""


def finished_refusal(path: str | os.PathLike) -> FinishedOutputError:
    """The error for `--resume` on a finished output made with other settings or inputs (or whose
    settings cannot be told)."""
    return FinishedOutputError(
        f"{path}: already complete, written with other settings or inputs (or they cannot be told); "
        "--resume only finishes an interrupted run: pass --overwrite to replace it"
    )
