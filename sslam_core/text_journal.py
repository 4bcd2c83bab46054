"""Crash-safe, resumable text output (the reports of `sslam tag -o`): written file by file as results
finish, the finished file appearing only at the end through a rename.

While the run goes on, `OUT.parts/` holds `settings.json`, `output` (the text so far) and
`index.jsonl` (one line per finished input: its name and the size of `output` after it). Each file's
text and index line go straight to the operating system, so a process killed at any moment (SIGKILL
included) loses at most the file in flight; `resume=True` cuts `output` back to the last indexed
size, skips the names in the index and appends the rest, so the result equals an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from sslam_core.outputs import FILE_MODE, OutputError, output_error

SETTINGS = "settings.json"


class TextJournal:
    """Append-only journal of one text output; `add` per finished input, `finish` to publish."""

    def __init__(self, out: str | os.PathLike, settings: dict, resume: bool = False, header: str = ""):
        self.out = Path(out)
        self.parts = self.out.with_name(self.out.name + ".parts")
        self.done: dict[str, str | None] = {}  # name -> error (None when it succeeded)
        wanted = json.dumps(settings, sort_keys=True, default=str)
        try:
            if resume and (self.parts / SETTINGS).is_file():
                if (self.parts / SETTINGS).read_text(encoding="utf-8") != wanted:
                    raise OutputError(
                        0,
                        f"{self.out}: cannot resume, the unfinished run used other settings "
                        f"(see {self.parts / SETTINGS}); run without --resume to start over",
                    )
                size = self._read_index(len(header.encode("utf-8")))
                self._text = os.open(self.parts / "output", os.O_WRONLY | os.O_CREAT, 0o644)
                os.ftruncate(self._text, size)
                os.lseek(self._text, size, os.SEEK_SET)
            else:
                shutil.rmtree(self.parts, ignore_errors=True)
                self.parts.mkdir(parents=True)
                (self.parts / SETTINGS).write_text(wanted, encoding="utf-8")
                self._text = os.open(self.parts / "output", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self._write(self._text, header)
            self._index = os.open(self.parts / "index.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise output_error(self.parts, e) from e

    def _read_index(self, size: int) -> int:
        """Names finished by the interrupted run and the size of the output they account for (from
        `size`, the header's); a line cut short by the interruption (and all after it) is dropped."""
        valid = 0
        index = self.parts / "index.jsonl"
        raw = index.read_bytes() if index.exists() else b""
        for line in raw.split(b"\n"):
            try:
                entry = json.loads(line)
                name, end, error = entry["name"], int(entry["end"]), entry.get("error")
            except (ValueError, KeyError, TypeError):
                break
            self.done[name], size = error, end
            valid += len(line) + 1
        with open(index, "ab") as f:
            f.truncate(valid)
        return size

    @staticmethod
    def _write(fd: int, text: str) -> None:
        data = text.encode("utf-8")
        while data:
            data = data[os.write(fd, data) :]

    def add(self, name: str, text: str, error: str | None = None) -> None:
        """Record one finished input: its text (may be empty, e.g. a skipped file) and the index line."""
        try:
            self._write(self._text, text)
            end = os.lseek(self._text, 0, os.SEEK_CUR)
            self._write(self._index, json.dumps({"name": name, "end": end, "error": error}) + "\n")
        except OSError as e:
            raise output_error(self.parts, e) from e
        self.done[name] = error

    def close(self) -> None:
        """Close the journal's files, leaving it to be resumed."""
        for fd in (self._text, self._index):
            try:
                os.close(fd)
            except OSError:
                pass

    def finish(self) -> Path:
        """Publish the text as `out` (fsync, ordinary mode, rename) and remove the journal."""
        try:
            os.fsync(self._text)
            self.close()
            os.chmod(self.parts / "output", FILE_MODE)
            os.replace(self.parts / "output", self.out)
        except OSError as e:
            raise output_error(self.out, e) from e
        shutil.rmtree(self.parts, ignore_errors=True)
        return self.out
