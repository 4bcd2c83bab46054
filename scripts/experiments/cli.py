"""The project's commands as the checks run them: `sslam ...` in a child process, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys


def sslam(*args: str) -> str:
    """Run one `sslam` command; stdout on success, the tail of stderr in the error otherwise."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "sslam_cli", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"sslam {' '.join(args[:1])} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout
