"""Rate-limited log lines: a flood of the same event (a database outage, one address
reconnecting in a loop) writes a few lines and then a count, not one line per event."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class _Window:
    start: float
    lines: int = 0
    suppressed: int = 0


class RateLimitedLog:
    """At most ``burst`` lines per key in each ``period`` seconds.

    Lines over the budget are counted, not written; the next line written for that key
    says how many were left out. Keys are whatever groups "the same" event: a message
    template, a remote address. The number of keys kept is bounded.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        period: float = 10.0,
        burst: int = 5,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self._period = period
        self._burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._windows: dict[object, _Window] = {}

    def log(
        self,
        level: int,
        key: object,
        msg: str,
        *args: object,
        extra: Mapping[str, Any] | None = None,
    ) -> bool:
        """Log ``msg % args`` unless ``key`` spent its budget; True if the line was written."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        window = self._windows.get(key)
        if window is None or now - window.start >= self._period:
            left_out = window.suppressed if window is not None else 0
            window = _Window(now, suppressed=left_out)
            self._remember(key, window)
        if window.lines >= self._burst:
            window.suppressed += 1
            return False
        window.lines += 1
        if window.suppressed:
            msg += f" ({window.suppressed} similar line(s) left out)"
            window.suppressed = 0
        self.logger.log(level, msg, *args, extra=extra)
        return True

    def warning(self, key: object, msg: str, *args: object, **kw: Any) -> bool:
        return self.log(logging.WARNING, key, msg, *args, **kw)

    def info(self, key: object, msg: str, *args: object, **kw: Any) -> bool:
        return self.log(logging.INFO, key, msg, *args, **kw)

    def _remember(self, key: object, window: _Window) -> None:
        if key not in self._windows and len(self._windows) >= self._max_keys:
            # Forget the quiet keys first; under a flood of distinct keys, forget all.
            now = window.start
            for old in [k for k, w in self._windows.items() if now - w.start >= self._period]:
                del self._windows[old]
            if len(self._windows) >= self._max_keys:
                self._windows.clear()
        self._windows[key] = window
