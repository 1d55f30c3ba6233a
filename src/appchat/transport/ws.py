"""The WebSocket endpoint: handshake (refused with 400/401 before the upgrade), read loop,
one writer task per connection, and the token-expiry timer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import WSCloseCode, WSMsgType, web

from ..auth import TokenVerifier, bind
from ..errors import BadRequest, Unauthorized
from ..events import error_reply, rate_limited_reply
from ..hub import CLOSE_SLOW_CONSUMER, Connection, Hub
from ..models import MAX_ID
from ..observability import Metrics
from ..ratelimit import TokenBucket
from ..service import ChatService

log = logging.getLogger(__name__)

SUBPROTOCOL = "access_token"
CLOSE_TOKEN_EXPIRED = 4001
SLOW_CLOSE_TIMEOUT = 2.0  # seconds a slow consumer gets to take its close frame


@dataclass(frozen=True, slots=True)
class WsOptions:
    max_frame: int = 64 * 1024
    send_queue: int = 1024
    heartbeat: float | None = 30.0
    trust_query_sid: bool = False
    rate: float = 50.0  # events a second per connection; 0 switches limiting off
    burst: float = 100.0
    max_connections: int = 10000
    max_connections_per_user: int = 32
    allowed_origins: frozenset[str] = frozenset()  # empty: any


class HandshakeError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def parse_sid(raw: str | None) -> int:
    if raw is None or raw == "":
        raise HandshakeError(400, "missing sid query parameter")
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or not 1 <= int(raw) <= MAX_ID:
        raise HandshakeError(400, "sid must be a positive 64-bit integer")
    return int(raw)


def token_from_protocols(values: list[str]) -> str:
    """The JWT is the value after ``access_token`` in ``Sec-WebSocket-Protocol``."""
    items = [item.strip() for value in values for item in value.split(",")]
    try:
        token = items[items.index(SUBPROTOCOL) + 1]
    except (ValueError, IndexError):
        raise HandshakeError(
            401, "missing token: send ['access_token', '<jwt>'] as subprotocols"
        ) from None
    if not token:
        raise HandshakeError(401, "missing token")
    return token


class WebSocketEndpoint:
    def __init__(
        self,
        service: ChatService,
        hub: Hub,
        verifier: TokenVerifier,
        options: WsOptions,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._service = service
        self._hub = hub
        self._verifier = verifier
        self._options = options
        self._clock = clock
        self.sockets: set[web.WebSocketResponse] = set()
        self._background: set[asyncio.Task[None]] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            self._check_origin(request.headers.get("Origin"))
            sid = parse_sid(request.query.get("sid"))
            token = token_from_protocols(request.headers.getall("Sec-WebSocket-Protocol", []))
            principal = bind(
                self._verifier.verify(token), sid, trust_query_sid=self._options.trust_query_sid
            )
            self._check_capacity(sid)
        except HandshakeError as exc:
            return self._refuse(exc.status, exc.reason)
        except Unauthorized as exc:
            return self._refuse(401, exc.message)

        ws = web.WebSocketResponse(
            protocols=(SUBPROTOCOL,),
            max_msg_size=self._options.max_frame,
            heartbeat=self._options.heartbeat,
        )
        if not ws.can_prepare(request).ok:
            return self._refuse(400, "expected a WebSocket upgrade")
        await ws.prepare(request)

        conn = Connection(
            self._hub.new_connection_id(),
            principal,
            max_queue=self._options.send_queue,
            on_overflow=lambda c: self._drop_slow(ws, request),
        )
        self.sockets.add(ws)
        self._metrics.connections.inc()
        await self._hub.register(conn)
        writer = asyncio.create_task(self._write_loop(ws, conn))
        expiry = asyncio.create_task(self._expire(ws, conn))
        try:
            await self._read_loop(ws, conn)
        finally:
            expiry.cancel()
            await self._hub.unregister(conn)
            await self._drain(writer, conn)
            self.sockets.discard(ws)
            self._metrics.connections.dec()
        return ws

    def _check_origin(self, origin: str | None) -> None:
        # Browsers always send Origin; other clients may not, and are not what this guards.
        allowed = self._options.allowed_origins
        if allowed and origin is not None and origin not in allowed:
            raise HandshakeError(403, f"origin {origin[:200]} is not allowed")

    def _check_capacity(self, sid: int) -> None:
        if len(self.sockets) >= self._options.max_connections:
            raise HandshakeError(503, "the server is at its connection limit, try again later")
        if self._hub.connection_count(sid) >= self._options.max_connections_per_user:
            raise HandshakeError(429, "too many connections for this participant")

    def _refuse(self, status: int, reason: str) -> web.Response:
        self._metrics.handshakes_refused.labels(str(status)).inc()
        return web.Response(status=status, text=reason + "\n")

    async def _read_loop(self, ws: web.WebSocketResponse, conn: Connection) -> None:
        bucket = TokenBucket(self._options.rate, self._options.burst)
        async for msg in ws:
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY) and not bucket.allow():
                conn.send(rate_limited_reply(msg.data if msg.type is WSMsgType.TEXT else None))
            elif msg.type is WSMsgType.TEXT:
                conn.send(await self._service.handle(conn, msg.data))
            elif msg.type is WSMsgType.BINARY:
                conn.send(error_reply(None, BadRequest("binary frames are not supported")))
            elif msg.type is WSMsgType.ERROR:
                log.debug("websocket error on %s: %s", conn.id, ws.exception())
                break

    async def _write_loop(self, ws: web.WebSocketResponse, conn: Connection) -> None:
        while True:
            frame = await conn.outbox.get()
            try:
                await ws.send_frame(frame, WSMsgType.TEXT)
            except (ConnectionError, RuntimeError):
                return
            finally:
                conn.outbox.task_done()

    async def _drain(self, writer: asyncio.Task[None], conn: Connection) -> None:
        """Let the writer flush what is queued if the socket still takes it, then stop it."""
        if not writer.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.outbox.join(), timeout=1.0)
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer

    async def _expire(self, ws: web.WebSocketResponse, conn: Connection) -> None:
        while True:
            delay = conn.principal.exp - self._clock()
            if delay <= 0:
                self._metrics.disconnects.labels("token expired").inc()
                await ws.close(code=CLOSE_TOKEN_EXPIRED, message=b"token expired")
                return
            conn.renewed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.renewed.wait(), min(delay, 3600.0))

    def _drop_slow(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        """Close a client that stopped reading: 4008 if the frame still gets through,
        else cut the TCP connection (its buffers are full, so a close frame may never)."""
        self._metrics.disconnects.labels("slow consumer").inc()
        transport = request.transport

        async def close() -> None:
            with contextlib.suppress(TimeoutError, ConnectionError, RuntimeError):
                await asyncio.wait_for(
                    ws.close(code=CLOSE_SLOW_CONSUMER, message=b"slow consumer"),
                    SLOW_CLOSE_TIMEOUT,
                )
            if transport is not None:
                # close() waits for the buffer to flush, which this client never allows
                transport.abort()

        task = asyncio.get_running_loop().create_task(close())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close_all(
        self, code: int = WSCloseCode.GOING_AWAY, reason: str = "server shutdown"
    ) -> None:
        await asyncio.gather(
            *(ws.close(code=code, message=reason.encode()) for ws in list(self.sockets)),
            return_exceptions=True,
        )
