"""Freed heap memory back to the OS. The server keeps big buffers on glibc's heap (fast sends, see
`colaflow.wire.channel.tune_allocator`), so after a large transient allocation — a data map parsed
at submit, an ended job's data — the process would stay at its peak, once per thread arena.
`trim()` (glibc's malloc_trim) returns the free pages; elsewhere it does nothing."""
from __future__ import annotations

import ctypes
import sys

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL("libc.so.6")
    except OSError:
        pass


def trim() -> bool:
    """Return free heap pages to the OS (every arena); False where there is no malloc_trim."""
    return bool(_libc is not None and hasattr(_libc, "malloc_trim") and _libc.malloc_trim(0))
