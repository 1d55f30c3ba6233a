"""Connections that have not finished their HTTP request: a deadline and a cap.

aiohttp waits for a request's headers as long as the socket stays open, so sockets that
send nothing, or half a header, pile up until the process runs out of file descriptors.
:class:`HandshakeGuard` stands between the listening socket and aiohttp's protocol:

* every accepted connection has ``timeout`` seconds until a request reaches the app
  (its headers are complete); then the guard steps aside (``transport.set_protocol``)
  and aiohttp owns the connection as if the guard had never been there;
* at most ``max_pending`` connections wait at once; one more closes the oldest waiting
  one, so a flood of idle sockets cannot keep a real client (whose request follows its
  connect within a round trip) from getting in;
* each connection it closes is logged at INFO, rate-limited per remote address.

A malformed request (a header over aiohttp's limits, say) is logged as one line without
the request's text: :class:`QuietHttpErrors`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..common.ratelog import RateLimitedLog

log = logging.getLogger(__name__)


def peer_host(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple | list) and peer:
        return str(peer[0])
    return str(peer) if peer else "unknown"


class _Waiting(asyncio.Protocol):
    """One connection until its first request reaches the app; forwards to aiohttp's."""

    def __init__(self, guard: HandshakeGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.remote = "unknown"
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are no subclass
        self.remote = peer_host(transport)
        if self.guard.closed:  # accepted just before the listener closed: not served
            self.inner.connection_made(transport)
            self.transport.abort()
            return
        self.guard._admit(self)
        self._deadline = asyncio.get_running_loop().call_later(
            self.guard.timeout, self.guard._expire, self
        )
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard._forget(self)
        self.inner.connection_lost(exc)

    def cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


class HandshakeGuard:
    """Wraps aiohttp's protocol factory (``AppRunner.server``) for ``loop.create_server``."""

    def __init__(
        self,
        *,
        timeout: float,
        max_pending: int,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        self._factory: Callable[[], asyncio.Protocol] | None = None
        self.timeout = timeout
        self.max_pending = max_pending
        self._waiting: dict[_Waiting, None] = {}  # oldest first
        self._by_transport: dict[asyncio.BaseTransport, _Waiting] = {}
        self._on_drop = on_drop
        self._log = RateLimitedLog(log, period=10.0, burst=3)
        self.closed = False

    def serve(self, factory: Callable[[], asyncio.Protocol]) -> None:
        """Guard the connections of ``factory`` (aiohttp's ``AppRunner.server``)."""
        self._factory = factory

    def __call__(self) -> asyncio.Protocol:
        assert self._factory is not None, "serve() first"
        return _Waiting(self, self._factory())

    def close(self) -> None:
        """Shutdown, once the listener is closed: end every connection that has not sent a
        request yet, and each one the listener still hands over (a socket it accepted just
        before closing arrives a few loop turns later, or after its TLS handshake)."""
        self.closed = True
        for waiting in list(self._waiting):
            self._end(waiting)

    @property
    def pending(self) -> int:
        """Connections whose first request has not reached the app yet."""
        return len(self._waiting)

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        """An aiohttp middleware: a request reached the app, so its connection is through."""

        def through(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> Awaitable[web.StreamResponse]:
            # Not a coroutine of its own: it hands back the handler's, so a WebSocket that
            # lives for hours carries no extra frame for it.
            if request.transport is not None:
                self.passed(request.transport)
            return handler(request)

        return web.middleware(through)

    def passed(self, transport: asyncio.BaseTransport) -> None:
        waiting = self._by_transport.get(transport)
        if waiting is None:
            return
        self._forget(waiting)
        if waiting.transport is not None and not waiting.transport.is_closing():
            waiting.transport.set_protocol(waiting.inner)  # the guard leaves the data path

    def _admit(self, waiting: _Waiting) -> None:
        while len(self._waiting) >= self.max_pending:
            oldest = next(iter(self._waiting))
            self._drop(oldest, f"more than {self.max_pending} connections without a request")
        self._waiting[waiting] = None
        assert waiting.transport is not None
        self._by_transport[waiting.transport] = waiting

    def _expire(self, waiting: _Waiting) -> None:
        if waiting in self._waiting:
            self._drop(waiting, f"no complete request within {self.timeout:g} s")

    def _drop(self, waiting: _Waiting, reason: str) -> None:
        self._end(waiting)
        self._log.info(
            ("dropped", waiting.remote),
            "closed a connection from %s before its handshake: %s",
            waiting.remote,
            reason,
            extra={"remote": waiting.remote},
        )
        if self._on_drop is not None:
            self._on_drop(reason)

    def _end(self, waiting: _Waiting) -> None:
        self._forget(waiting)
        if waiting.transport is not None:
            waiting.transport.abort()

    def _forget(self, waiting: _Waiting) -> None:
        waiting.cancel_deadline()
        self._waiting.pop(waiting, None)
        if waiting.transport is not None:
            self._by_transport.pop(waiting.transport, None)


class QuietHttpErrors(logging.Filter):
    """Turns aiohttp's log of a malformed request into one line without the request text.

    aiohttp logs ``Error handling request`` with the parser's exception, whose message
    quotes the start of the offending line: for an oversize ``Sec-WebSocket-Protocol``
    header, the start of the token. Other errors keep their traceback.
    """

    def __init__(self) -> None:
        super().__init__()
        self._limited = RateLimitedLog(logging.getLogger("appchat.http"), period=10.0, burst=3)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "unknown"
        self._limited.log(
            min(record.levelno, logging.INFO),  # a client's mistake, not the server's error
            ("malformed", remote),
            "refused a malformed HTTP request from %s: %s %s",
            remote,
            exc.code,
            type(exc).__name__,
            extra={"remote": remote},
        )
        return False


def quiet_server_logger(name: str = "appchat.http.server") -> logging.Logger:
    """The logger to hand aiohttp's request handler (``AppRunner(logger=...)``)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, QuietHttpErrors) for f in logger.filters):
        logger.addFilter(QuietHttpErrors())
    return logger


def handler_args(timeout: float) -> dict[str, Any]:
    """aiohttp request-handler settings that go with the guard: a connection waiting for
    its next request (keep-alive) gets the same deadline as a new one."""
    return {"keepalive_timeout": timeout, "logger": quiet_server_logger()}
