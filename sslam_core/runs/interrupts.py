"""Stopping long work cleanly on a signal: SIGINT (Ctrl-C), SIGTERM (what SLURM and other schedulers send
before a kill) and, for training, SIGUSR1 (SLURM's warning ahead of the time limit).

Inside `StopRequest()`, the first such signal only sets a flag; the work checks `requested` at its
safe points (after a file, at a step boundary), saves what it has and stops. A second signal of the
same kind ends the process at once with the conventional status (128 + signal number).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

DEFAULT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """A context that turns `signals` into a flag; `signum` is the first one received, if any."""

    def __init__(self, signals: tuple[int, ...] = DEFAULT_SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """128 + the signal number (130 for SIGINT, 143 for SIGTERM); 0 when none came."""
        return 128 + self.signum if self.signum is not None else 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise SystemExit(128 + signum)
        self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader workers leave the first SIGINT / SIGTERM / SIGUSR1 to the main process, which saves
    and stops at a step boundary (Ctrl-C and schedulers signal the whole process group); a second one
    of a kind has its default effect, so the loader's own terminate() at shut-down still works."""
    import signal

    def once(signum, frame) -> None:
        signal.signal(signum, signal.SIG_DFL)

    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), once)
