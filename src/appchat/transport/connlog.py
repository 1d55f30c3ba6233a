"""One INFO line per connection opened, closed, or handshake refused.

Lines carry the connection id, the participant and the remote address (also as
``extra`` fields for structured formatters), never a token or message content. Each
remote address gets a budget of lines (``burst`` per ``period`` seconds), so a client
reconnecting in a loop cannot flood the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..common.ratelog import RateLimitedLog
from ..protocol.closecodes import CloseCode, describe

log = logging.getLogger("appchat.connections")


class ConnectionLog:
    def __init__(
        self,
        *,
        period: float = 10.0,
        burst: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lines = RateLimitedLog(log, period=period, burst=burst, clock=clock)
        self._clock = clock

    def refused(
        self, status: int, reason: str, *, remote: str, sid: int | None, what: str = "handshake"
    ) -> None:
        """``what`` was refused: a handshake, or a token check (``POST /auth/check``)."""
        self._lines.info(
            remote,
            "%s refused from %s (sid %s): %s %s",
            what,
            remote,
            sid if sid is not None else "-",
            status,
            reason,
            extra={"sid": sid, "remote": remote, "status": status},
        )

    def opened(self, conn_id: str, *, sid: int, role: str, remote: str) -> float:
        """Log the open; returns the time to hand to :meth:`closed`."""
        self._lines.info(
            remote,
            "connection %s opened: sid %s (%s) from %s",
            conn_id,
            sid,
            role,
            remote,
            extra={"conn_id": conn_id, "sid": sid, "remote": remote},
        )
        return self._clock()

    def closed(
        self, conn_id: str, *, sid: int, remote: str, code: int | None, since: float
    ) -> None:
        code = code if code is not None else int(CloseCode.CONNECTION_LOST)
        seconds = self._clock() - since
        self._lines.info(
            remote,
            "connection %s closed: sid %s from %s, code %s (%s) after %.1f s",
            conn_id,
            sid,
            remote,
            code,
            describe(code),
            seconds,
            extra={
                "conn_id": conn_id,
                "sid": sid,
                "remote": remote,
                "code": code,
                "duration": round(seconds, 3),
            },
        )
