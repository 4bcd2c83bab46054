"""Keeping decoder libraries' chatter out of the report on stderr.

libmpg123 (inside libsndfile) prints lines such as `Note: Illegal Audio-MPEG-Header 0x00000000 at
offset 2.` straight to file descriptor 2 for every damaged mp3, and FFmpeg prints `[mp3 @ 0x...]`
lines; Python cannot catch them. `filter_native_stderr()` gives Python's own `sys.stderr` a private
copy of the terminal's descriptor and points descriptor 2 at a pipe read by a thread, which drops
those lines and forwards everything else (a C library's fatal message, for one) unchanged. The
reason a file could not be decoded still reaches the user, as that file's `skipped:` line.
"""

from __future__ import annotations

import io
import os
import re
import sys
import threading

CHATTER = re.compile(
    rb"^(Note: |Warning: |\[src/libmpg123/|\[[\w.-]+ @ 0x[0-9a-fA-F]+\] )"  # mpg123, FFmpeg's log lines
)
_installed = False


def _forward(read_fd: int, write_fd: int) -> None:
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        pending = b""
        while chunk := pipe.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not CHATTER.match(line):
                    os.write(write_fd, line + b"\n")
        if pending and not CHATTER.match(pending):
            os.write(write_fd, pending)


def filter_native_stderr() -> bool:
    """Install the filter once per process (see the module docstring); False where it cannot be."""
    global _installed
    if _installed:
        return True
    try:
        stderr_fd = sys.stderr.fileno()
        sys.stderr.flush()
        terminal = os.dup(stderr_fd)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, stderr_fd)
        os.close(write_fd)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False
    sys.stderr = open(  # noqa: SIM115 - lives as long as the process
        terminal, "w", buffering=1, encoding=sys.stderr.encoding or "utf-8", errors="backslashreplace"
    )
    threading.Thread(target=_forward, args=(read_fd, terminal), daemon=True, name="stderr-filter").start()
    _installed = True
    return True
