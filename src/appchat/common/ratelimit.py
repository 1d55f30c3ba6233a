"""A token bucket: ``rate`` events a second on average, bursts up to ``burst``."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    __slots__ = ("_clock", "_stamp", "_tokens", "burst", "rate")

    def __init__(
        self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._stamp = clock()

    def allow(self) -> bool:
        """Take one token if there is one."""
        if self.rate <= 0:
            return True  # limiting switched off
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class Throttle:
    """At most one event per key every ``interval``; remembers at most ``max_keys`` keys.

    The clock may be any number that grows (seconds, microseconds); a clock that went
    backwards lets the event through rather than silencing a key until it catches up.
    """

    def __init__(self, interval: float, *, max_keys: int = 100_000) -> None:
        self.interval = interval
        self._max_keys = max_keys
        self._last: dict[object, float] = {}

    def allow(self, key: object, now: float) -> bool:
        last = self._last.get(key)
        if last is not None and last <= now < last + self.interval:
            return False
        if last is None and len(self._last) >= self._max_keys:
            self._prune(now)
        self._last[key] = now
        return True

    def _prune(self, now: float) -> None:
        self._last = {k: t for k, t in self._last.items() if t <= now < t + self.interval}
        if len(self._last) >= self._max_keys:  # all recent: forget the oldest half
            keep = sorted(self._last.items(), key=lambda kv: kv[1])[len(self._last) // 2 :]
            self._last = dict(keep)

    def __len__(self) -> int:
        return len(self._last)
