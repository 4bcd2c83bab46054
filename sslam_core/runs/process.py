"""Process-wide settings that need no torch (importing this module stays cheap)."""

from __future__ import annotations

import ctypes


def limit_heap_fragmentation(threshold: int = 1 << 20) -> bool:
    """On glibc, serve allocations of at least `threshold` bytes with mmap, so that the activations a
    batch frees go back to the system. Without it, long runs grow by hundreds of MB of fragmented heap
    (glibc raises its mmap threshold after each large free). Returns whether the setting took."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


__all__ = ["limit_heap_fragmentation"]
