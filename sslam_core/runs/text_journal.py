"""Crash-safe, resumable text output (the reports of `sslam tag -o`), from one process or many
`torchrun` ranks: written file by file as results finish, the finished file appearing only at the
end through a rename.

While the run goes on, `OUT.parts/` holds `settings.json` and, for every process of every run that
worked on it, a stream: `output-RUN-RANK` (the text of its files, appended) and
`index-RUN-RANK.jsonl` (one line per finished input: its name, error and where its text ends). Each
file's text and index line go straight to the operating system, so a process killed at any moment
(SIGKILL included) loses at most the file in flight; `resume=True` skips the names in the indexes
(a line cut short ends its index) and appends new streams. `finish` writes the header and every
input's text in input order, whichever stream holds it, so the result equals an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from sslam_core.runs import distributed
from sslam_core.runs.outputs import OutputError, atomic_write, output_error, record_settings, settings_digest

SETTINGS = "settings.json"
_INDEX = re.compile(r"index-(\d+)-(\d+)\.jsonl")


class TextJournal:
    """Append-only journal of one text output; `add` per finished input, `finish` to publish.

    Under torchrun every rank opens it with the same arguments (rank 0 checks or starts it, the
    others then join); each appends its own stream, and rank 0 alone calls `finish`."""

    def __init__(self, out: str | os.PathLike, settings: dict, resume: bool = False, header: str = ""):
        self.out = Path(out)
        self.parts = self.out.with_name(self.out.name + ".parts")
        self.header = header
        self.done: dict[str, str | None] = {}  # name -> error (None when it succeeded)
        self._spans: dict[str, tuple[str, int, int]] = {}  # name -> (stream, start, end)
        self.digest = settings_digest(settings)
        wanted = json.dumps(settings, sort_keys=True, default=str)
        self.run = distributed.on_main(lambda: self._open(wanted, resume))
        self._read_indexes()
        self._stream = f"{self.run:04d}-{distributed.get_rank():04d}"
        try:
            self._text = os.open(
                self.parts / f"output-{self._stream}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644
            )
            self._index = os.open(
                self.parts / f"index-{self._stream}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644
            )
        except OSError as e:
            raise output_error(self.parts, e) from e
        self._end = 0

    def _open(self, wanted: str, resume: bool) -> int:
        """Check the journal of an interrupted run (resume) or start a new one; this run's number."""
        try:
            if resume and (self.parts / SETTINGS).is_file():
                if (self.parts / SETTINGS).read_text(encoding="utf-8") != wanted or (
                    self.parts / "output"
                ).exists():
                    raise OutputError(
                        0,
                        f"{self.out}: cannot resume, the unfinished run used other settings or an older "
                        f"version (see {self.parts / SETTINGS}); pass --overwrite to start over",
                    )
                return 1 + max((int(m.group(1)) for m in self._indexes()), default=0)
            shutil.rmtree(self.parts, ignore_errors=True)
            self.parts.mkdir(parents=True)
            (self.parts / SETTINGS).write_text(wanted, encoding="utf-8")
        except OSError as e:
            raise output_error(self.parts, e) from e
        return 1

    def _indexes(self) -> list[re.Match]:
        found = (_INDEX.fullmatch(p.name) for p in self.parts.glob("index-*.jsonl"))
        return sorted((m for m in found if m), key=lambda m: m.string)

    def _read_indexes(self) -> None:
        """Names finished by earlier runs and where their text lies; a line cut short by an
        interruption ends its index (what follows it in that stream is ignored)."""
        for match in self._indexes():
            stream, start = f"{match.group(1)}-{match.group(2)}", 0
            for line in (self.parts / match.string).read_bytes().split(b"\n"):
                try:
                    entry = json.loads(line)
                    name, end, error = entry["name"], int(entry["end"]), entry.get("error")
                except (ValueError, KeyError, TypeError):
                    break
                self.done[name], self._spans[name], start = error, (stream, start, end), end

    @staticmethod
    def _write(fd: int, data: bytes) -> None:
        while data:
            data = data[os.write(fd, data) :]

    def add(self, name: str, text: str, error: str | None = None) -> None:
        """Record one finished input: its text (may be empty, e.g. a skipped file) and the index line."""
        data = text.encode("utf-8")
        try:
            self._write(self._text, data)
            start, self._end = self._end, self._end + len(data)
            self._write(
                self._index, (json.dumps({"name": name, "end": self._end, "error": error}) + "\n").encode()
            )
        except OSError as e:
            raise output_error(self.parts, e) from e
        self.done[name], self._spans[name] = error, (self._stream, start, self._end)

    def lines(self) -> int:
        """Lines of text written so far, by every stream (Raven selection numbers run on over them)."""
        ends: dict[str, int] = {}  # a stream's text runs from 0 to its last indexed end, input by input
        for stream, _, end in self._spans.values():
            ends[stream] = max(end, ends.get(stream, 0))
        count = 0
        for stream, end in ends.items():
            with open(self.parts / f"output-{stream}", "rb") as f:
                count += f.read(end).count(b"\n")
        return count

    def close(self) -> None:
        """Close this process's stream, leaving the journal to be resumed (or merged)."""
        for fd in (self._text, self._index):
            try:
                os.close(fd)
            except OSError:
                pass

    def reload(self) -> None:
        """Read every stream's index again (rank 0, once the other ranks have finished theirs)."""
        self._read_indexes()

    def finish(self, order: Sequence[str]) -> Path:
        """Publish the header and the text of every input of `order` that has some, in that order,
        as `out` (atomically), and remove the journal."""
        self.close()
        handles: dict[str, object] = {}

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(self.header.encode("utf-8"))
                for name in order:
                    span = self._spans.get(name)
                    if span is None or span[1] == span[2]:
                        continue
                    stream, start, end = span
                    if stream not in handles:
                        handles[stream] = open(self.parts / f"output-{stream}", "rb")
                    src = handles[stream]
                    src.seek(start)
                    f.write(src.read(end - start))
            record_settings(tmp, self.digest)  # so that --resume can tell this output is complete

        try:
            atomic_write(self.out, write)
        finally:
            for h in handles.values():
                h.close()
        shutil.rmtree(self.parts, ignore_errors=True)
        return self.out
