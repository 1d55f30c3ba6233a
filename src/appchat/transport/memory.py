"""Give memory back to the system after a connection that held a lot of it ended.

A client that pipelines requests with big replies and never reads makes the node hold
megabytes for it (its send buffer, its pipelined requests, the socket's own buffers).
Python frees them when the connection ends, but the C allocator (glibc) keeps freed heap
in the process: without a trim, round after round of such clients leaves the resident
size high, and growing with fragmentation. After such a connection ends the node asks
the allocator to return free pages (``malloc_trim``), at most once per ``delay``.
Elsewhere than on glibc this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


class MemoryRelease:
    """Coalesces requests to trim the heap: one trim ``delay`` seconds after the first."""

    def __init__(self, delay: float = 1.0, trim: Callable[[int], int] | None = None) -> None:
        self._delay = delay
        self._trim = trim if trim is not None else _load_trim()
        self._pending: asyncio.TimerHandle | None = None
        self.trims = 0

    def soon(self) -> None:
        if self._trim is None or self._pending is not None:
            return
        self._pending = asyncio.get_running_loop().call_later(self._delay, self._release)

    def _release(self) -> None:
        self._pending = None
        if self._trim is not None:
            self._trim(0)
            self.trims += 1

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
