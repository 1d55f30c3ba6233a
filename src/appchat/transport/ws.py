"""The WebSocket endpoint: handshake (refused with 400/401 before the upgrade), then the
socket taken from aiohttp (``wsconn.WebSocket``) and served in a task of its own: the
read loop and its request task; one sweep for all connections checks token expiry and
beats the heartbeat. Writing is the fan-out's
:class:`~appchat.fanout.connection.Connection`: straight to the socket, or through a
backlog drained by a task that exists only while there is one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

from ..auth.tokens import NO_IDS, IdRanges, TokenVerifier, bind, parse_id
from ..chat.service import ChatService
from ..common.metrics import Metrics
from ..common.ratelimit import TokenBucket
from ..fanout.connection import Connection
from ..fanout.hub import Hub
from ..protocol import defaults
from ..protocol.closecodes import CloseCode
from ..protocol.errors import AppError, BadRequest, Unauthorized
from ..protocol.events import error_reply, rate_limited_reply
from ..protocol.models import Principal
from .connlog import ConnectionLog
from .memory import MemoryRelease
from .quota import ConnectionQuota, quota_key
from .rest import origin_allowed
from .wsconn import WebSocket, handshake, write_frame, write_frames

log = logging.getLogger(__name__)

SUBPROTOCOL = "access_token"
EXPIRY_SWEEP = 1.0  # seconds between sweeps: expired tokens, heartbeats (at most half of one)
CLOSE_TIMEOUT = 2.0  # seconds a client gets to take its last frames and the close frame
ROOM_CHECK = 1.0  # how often a reader waiting for send room checks its transport is open


@dataclass(frozen=True, slots=True)
class WsOptions:
    max_frame: int = defaults.MAX_FRAME
    send_queue: int = defaults.SEND_QUEUE
    send_buffer: int = defaults.SEND_BUFFER  # bytes waiting to be written, per connection
    heartbeat: float | None = defaults.HEARTBEAT
    trust_query_sid: bool = False
    rate: float = defaults.RATE  # events a second per connection; 0 switches limiting off
    burst: float = defaults.BURST
    max_connections: int = defaults.MAX_CONNECTIONS
    max_connections_per_user: int = defaults.MAX_CONNECTIONS_PER_USER
    allowed_origins: frozenset[str] = frozenset()  # empty: any
    reserved_sids: IdRanges = NO_IDS  # --api-sender-ids: no customer connects as one


class HandshakeError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def parse_sid(raw: str | None) -> int:
    if raw is None or raw == "":
        raise HandshakeError(400, "missing sid query parameter")
    sid = parse_id(raw)
    if sid is None:
        raise HandshakeError(400, "sid must be a positive 64-bit integer")
    return sid


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


SHUTTING_DOWN = "the server is shutting down"


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
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._service = service
        self._hub = hub
        self._verifier = verifier
        self._options = options
        self._clock = clock
        self._monotonic = monotonic
        self._live: dict[Connection, _Session] = {}
        self._handlers: dict[asyncio.Task[None], asyncio.Transport] = {}  # open sockets
        self._background: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False  # shutdown began: no new WebSocket is taken
        self._quota = ConnectionQuota(options.max_connections_per_user)
        self._connlog = ConnectionLog()
        self._memory = MemoryRelease()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        remote = request.remote or "unknown"
        sid: int | None = None
        if self._closing:  # e.g. an upgrade on a kept-alive connection while draining
            return self._refuse(503, SHUTTING_DOWN, remote, sid)
        try:
            self._check_origin(request.headers.get("Origin"))
            sid = parse_sid(request.query.get("sid"))
            token = token_from_protocols(request.headers.getall("Sec-WebSocket-Protocol", []))
            principal = bind(
                self._verifier.verify(token),
                sid,
                trust_query_sid=self._options.trust_query_sid,
                reserved=self._options.reserved_sids,
            )
            quota = self._check_capacity(principal)
        except HandshakeError as exc:
            return self._refuse(exc.status, exc.reason, remote, sid)
        except Unauthorized as exc:
            return self._refuse(401, exc.message, remote, sid)

        shake = handshake(request, SUBPROTOCOL)
        transport = request.transport
        if shake is None or transport is None:
            self._quota.give_back(quota)
            return self._refuse(400, "expected a WebSocket upgrade", remote, sid)
        ws = WebSocket(asyncio.get_running_loop())
        link = _Link(self, ws, transport)
        conn = Connection(
            self._hub.new_connection_id(),
            principal,
            link.send,
            send_many=link.send_many,
            max_queue=self._options.send_queue,
            max_bytes=self._options.send_buffer,
            on_overflow=link.overflow,
            on_broken=link.broken,
            on_close=link.disconnect,
        )
        try:
            await self._hub.register(conn)
        except AppError as exc:
            self._quota.give_back(quota)
            return self._refuse(503, exc.message, remote, sid)
        self._metrics.connections.inc()
        answer = web.StreamResponse(status=101, headers=shake.headers)
        answer.force_close()
        try:
            await answer.prepare(request)
            await answer.write_eof()  # nothing more: aiohttp's handler writes nothing after
            ws.take(request, shake, self._options.max_frame)
        except BaseException as exc:  # the client left during the handshake (or the node stops)
            self._quota.give_back(quota)
            conn.abandon()
            await self._hub.unregister(conn)
            self._metrics.connections.dec()
            if isinstance(exc, ConnectionError):
                return answer  # nothing to log: the client went away
            raise
        session = _Session(
            ws,
            conn,
            transport,
            service=self._service,
            bucket=TokenBucket(self._options.rate, self._options.burst, clock=self._monotonic),
            close_soon=link.close_soon,
        )
        opened = self._connlog.opened(conn.id, sid=sid, role=principal.role, remote=remote)
        # The handler returns the answer and aiohttp forgets the connection; the socket
        # lives on in a task of its own.
        task = asyncio.get_running_loop().create_task(
            self._live_session(session, quota, sid, remote, opened)
        )
        self._handlers[task] = transport
        task.add_done_callback(self._session_ended)
        return answer

    def _session_ended(self, task: asyncio.Task[None]) -> None:
        self._handlers.pop(task, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("a WebSocket session failed", exc_info=exc)

    async def _live_session(
        self, session: _Session, quota: str, sid: int, remote: str, opened: float
    ) -> None:
        ws, conn, transport = session.ws, session.conn, session.transport
        try:
            if self._closing:  # shutdown began since the check above: straight to 1001
                session.draining = True
            else:
                self._watch()
                session.reader = asyncio.current_task()
                self._live[conn] = session
                ws.offer_to(session.offer)
                await session.read_loop()
        except asyncio.CancelledError:
            if not session.draining:
                raise
        finally:
            self._quota.give_back(quota)  # first: nothing below may keep it if cancelled
            self._live.pop(conn, None)
            ws.offer_to(None)
            # No longer reading: from here this task finishes the connection (its last
            # replies, its close), and a request ending now must not cancel it.
            session.reader = None
            try:
                await session.finish()
                await self._hub.unregister(conn)
                await conn.flush(CLOSE_TIMEOUT)
                heavy = conn.closed or conn.overflowed or conn.queued_bytes > 0
                conn.abandon()
                if session.draining:
                    await self._close(ws, transport, CloseCode.GOING_AWAY, "server shutdown")
                if transport.is_closing():
                    # A graceful close still waiting to write (to a client that reads
                    # nothing) would keep the socket open for good: drop what it holds.
                    transport.abort()
                if heavy:  # it ended holding buffers (or with a failed write): free the heap
                    self._memory.soon()
            finally:  # also when shutdown cut it after the grace (cancelled in the above)
                conn.abandon()  # (again: the cut may have come before the one above)
                self._metrics.connections.dec()
                self._connlog.closed(
                    conn.id, sid=sid, remote=remote, code=ws.close_code, since=opened
                )

    def _check_origin(self, origin: str | None) -> None:
        if not origin_allowed(self._options.allowed_origins, origin):
            raise HandshakeError(403, f"origin {origin[:200] if origin else ''} is not allowed")

    def _check_capacity(self, principal: Principal) -> str:
        """Room on this node and in the allowance of the token's identity (see quota.py);
        returns the allowance taken, to give back when the connection ends."""
        if len(self._handlers) >= self._options.max_connections:
            raise HandshakeError(503, "the server is at its connection limit, try again later")
        key = quota_key(principal)
        if not self._quota.take(key):
            raise HandshakeError(429, "too many connections for this participant")
        return key

    def _refuse(self, status: int, reason: str, remote: str, sid: int | None) -> web.Response:
        self._metrics.handshakes_refused.labels(str(status)).inc()
        self._connlog.refused(status, reason, remote=remote, sid=sid)
        return web.Response(status=status, text=reason + "\n")

    def _drop_slow(self, ws: WebSocket, transport: asyncio.Transport) -> None:
        self._close_soon(ws, transport, CloseCode.SLOW_CONSUMER, "slow consumer", "slow consumer")

    def _close_soon(
        self,
        ws: WebSocket,
        transport: asyncio.Transport,
        code: int,
        reason: str,
        counted_as: str,
    ) -> asyncio.Task[None]:
        """Close in a task of its own, counted in appchat_disconnects_total under
        ``counted_as``; the caller goes on, or awaits the task."""
        self._metrics.disconnects.labels(counted_as).inc()
        task = asyncio.get_running_loop().create_task(self._close(ws, transport, code, reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _disconnect(
        self, ws: WebSocket, transport: asyncio.Transport, code: int, reason: str
    ) -> bool:
        """Close a connection for the server API (``Hub.disconnect``); whether it was open
        (one still in its handshake is not yet: it is not counted, and goes on)."""
        if not ws.prepared or ws.closed:
            return False
        self._close_soon(ws, transport, code, reason, "disconnected")
        return True

    @staticmethod
    async def _close(ws: WebSocket, transport: asyncio.Transport, code: int, reason: str) -> None:
        """Close with ``code``; if the close frame cannot get through in time (a client
        that reads nothing), cut the TCP connection instead."""
        with contextlib.suppress(TimeoutError, ConnectionError, RuntimeError):
            await asyncio.wait_for(ws.close(code=code, message=reason.encode()), CLOSE_TIMEOUT)
            return
        # ws.close() gave up with a graceful transport close, which waits for buffers this
        # client never empties.
        transport.abort()

    def _watch(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Once a second (twice a heartbeat, when that is shorter): close the connections
        whose token expired, and beat each one's heartbeat. One task for all of them
        costs less memory than timers of their own, and a RefreshToken needs no
        rescheduling: the sweep reads each connection's current ``exp``."""
        heartbeat = self._options.heartbeat
        period = min(EXPIRY_SWEEP, heartbeat / 2) if heartbeat else EXPIRY_SWEEP
        last = self._monotonic()
        while True:
            await asyncio.sleep(period)
            now, mono = self._clock(), self._monotonic()
            elapsed, last = mono - last, mono
            for conn, session in list(self._live.items()):
                if conn.principal.exp <= now:
                    session.expire()
                elif heartbeat:
                    session.ws.beat(elapsed, heartbeat)

    async def close_all(self, grace: float = 10.0) -> None:
        """Shutdown: take no new requests, let the ones in flight finish and their replies
        go out, then close every connection with 1001."""
        self._closing = True
        for session in list(self._live.values()):
            session.draining = True
            if not session.busy and session.reader is not None:
                session.reader.cancel()  # waiting for a frame: nothing in flight
        handlers = [h for h in self._handlers if h is not asyncio.current_task()]
        if handlers:
            await asyncio.wait(handlers, timeout=grace)
        # Those still open after the grace (aiohttp no longer knows these sockets, so
        # its own shutdown does not end them): cut them.
        left = [(t, tr) for t, tr in self._handlers.items() if t is not asyncio.current_task()]
        for task, transport in left:
            transport.abort()
            task.cancel()
        if left:
            await asyncio.wait([task for task, _ in left], timeout=CLOSE_TIMEOUT)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


class _Link:
    """What a connection and its session need of their WebSocket: writing a text frame,
    closing it. One small object whose bound methods are the callbacks (a closure or a
    ``partial`` per callback cost about a kilobyte per idle connection)."""

    __slots__ = ("endpoint", "transport", "ws")

    def __init__(self, endpoint: WebSocketEndpoint, ws: WebSocket, transport: asyncio.Transport):
        self.endpoint, self.ws, self.transport = endpoint, ws, transport

    def send(self, frame: bytes) -> Coroutine[Any, Any, None] | None:
        """Straight to the socket, without a coroutine, when nothing is unusual
        (``_plain``); otherwise, and whenever flow control may have to wait, through the
        socket's ``send_frame`` (which raises before the handshake is done). Once a close
        began (ours or the client's) nothing more may be sent (RFC 6455 5.5.1): the frame
        is dropped, and the close goes on (a failed write would cut the connection)."""
        if self.ws.closed:
            return None
        if not self._plain():
            return self.ws.send_frame(frame, WSMsgType.TEXT)
        write_frame(self.transport, WSMsgType.TEXT, frame)
        return None

    def send_many(self, frames: list[bytes]) -> bool:
        """``frames`` in one write when ``send`` would write straight to the socket
        (dropped, as ``send`` drops them, once a close began); False: nothing written."""
        if self.ws.closed:
            return True
        if not self._plain():
            return False
        write_frames(self.transport, WSMsgType.TEXT, frames)
        return True

    def _plain(self) -> bool:
        """Nothing unusual: the socket's buffer empty, no compression negotiated, the
        WebSocket open and the transport not closing."""
        ws, transport = self.ws, self.transport
        return not (
            ws.compress
            or not ws.prepared
            or transport.is_closing()
            or transport.get_write_buffer_size()
        )

    def overflow(self, conn: Connection) -> None:
        self.endpoint._drop_slow(self.ws, self.transport)

    def broken(self, conn: Connection) -> None:
        self.transport.abort()

    def disconnect(self, code: int, reason: str) -> bool:
        return self.endpoint._disconnect(self.ws, self.transport, code, reason)

    def close_soon(self, code: int, reason: str, counted_as: str) -> asyncio.Task[None]:
        return self.endpoint._close_soon(self.ws, self.transport, code, reason, counted_as)


Closing = Callable[[int, str, str], asyncio.Task[None]]
"""Closes the session's WebSocket with (code, reason), counted as (a disconnect reason of
the metrics); the task may be awaited."""


class _Session:
    """One open WebSocket: its reader, the task serving its requests in order, its expiry.

    The reader keeps reading while a request is served, so pings are answered and the
    frame budget is enforced at all times; requests wait in a small queue (at most
    ``PIPELINE``) and are served in the order they came, one after another, except that
    SendMessages waiting one behind the other are stored together (``handle_sends``).
    """

    PIPELINE = 32

    __slots__ = (
        "_bucket",
        "_close_soon",
        "_expired",
        "_inbox",
        "_inbox_room",
        "_read_done",
        "_server",
        "_service",
        "busy",
        "conn",
        "draining",
        "reader",
        "transport",
        "ws",
    )

    def __init__(
        self,
        ws: WebSocket,
        conn: Connection,
        transport: asyncio.Transport,
        *,
        service: ChatService,
        bucket: TokenBucket,
        close_soon: Closing,
    ) -> None:
        self.ws = ws
        self.conn = conn
        self.transport = transport
        self._service = service
        self._bucket = bucket  # frames a second, control frames included
        self._close_soon = close_soon
        self.reader: asyncio.Task[Any] | None = None  # the task running read_loop, while it runs
        self._inbox: list[str] = []
        self._inbox_room: asyncio.Event | None = None
        self._server: asyncio.Task[None] | None = None
        self._expired = False
        self._read_done: asyncio.Event | None = None  # made when a reply waits for room
        self.busy = False  # a request is being served or waits to be
        self.draining = False  # the node is shutting down: finish, then close

    async def read_loop(self) -> None:
        ws, conn = self.ws, self.conn
        while not self.draining and not conn.closed:
            if conn.full:  # a client that does not read its replies is not read either
                await self._wait_room()
                continue
            if len(self._inbox) >= self.PIPELINE:
                await self._wait_inbox_room()
                continue
            msg = await ws.receive()
            kind = msg.type
            if kind is WSMsgType.TEXT:
                self._take(msg.data)
            elif kind is WSMsgType.PING or kind is WSMsgType.PONG:
                if not self._bucket.allow():
                    flood = CloseCode.POLICY_VIOLATION
                    await self._close_soon(flood, "too many frames", "frame flood")
                    return
                if kind is WSMsgType.PING:
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await ws.pong(msg.data)
            elif kind is WSMsgType.BINARY:
                if not self._bucket.allow():
                    conn.reply(rate_limited_reply(None))
                    continue
                conn.reply(error_reply(None, BadRequest("binary frames are not supported")))
            elif kind is WSMsgType.ERROR:
                log.debug("websocket error on %s: %s", conn.id, ws.exception())
                return
            elif kind in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return

    def offer(self, text: str) -> bool:
        """A text frame as it is read, while ``read_loop`` waits for one with nothing read
        before it: taken here as the loop would take it, without waking the loop (False:
        the loop takes it). One place short of the pipeline's end, as the loop may take
        the frame declined here."""
        conn = self.conn
        if (
            self.draining
            or self.ws.closed
            or conn.closed
            or conn.full
            or len(self._inbox) >= self.PIPELINE - 1
        ):
            return False
        self._take(text)
        return True

    def _take(self, text: str) -> None:
        """A request read: into the queue served in order (its server task started when
        there is none), or answered ``rate_limited``."""
        if not self._bucket.allow():
            self.conn.reply(rate_limited_reply(text))
            return
        self._inbox.append(text)
        self.busy = True
        if self._server is None:
            self._server = asyncio.get_running_loop().create_task(self._serve())

    async def _wait_room(self) -> None:
        """Wait for room in the send buffer; if meanwhile the transport was closed (the
        heartbeat found no pong, a close timed out), cut it: a graceful close would wait
        for a client that reads nothing, and this connection would never end."""
        conn, transport = self.conn, self.transport
        while conn.full and not self.draining:  # shutting down: stop waiting (within 1 s)
            try:
                async with asyncio.timeout(ROOM_CHECK):
                    await conn.room()
            except TimeoutError:
                if transport.is_closing():
                    transport.abort()  # the pending write fails: the connection is broken

    async def _wait_inbox_room(self) -> None:
        if self._inbox_room is None:
            self._inbox_room = asyncio.Event()
        self._inbox_room.clear()
        server = self._server
        if server is None:
            return
        waiter = asyncio.ensure_future(self._inbox_room.wait())
        try:
            await asyncio.wait([waiter, server], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()

    async def _serve(self) -> None:
        service, conn, inbox = self._service, self.conn, self._inbox
        try:
            while inbox:
                if conn.full and not await self._room_for_reply():
                    # The client reads nothing and is gone: what it asked is not served.
                    inbox.clear()
                    break
                served = 0
                try:
                    if len(inbox) > 1:  # a backlog: SendMessages at its head are pipelined
                        served = await service.handle_sends(conn, inbox[:], conn.reply)
                    if not served:
                        served = 1
                        conn.reply(await service.handle(conn, inbox[0]))
                finally:
                    del inbox[: served or 1]
                    if self._inbox_room is not None:
                        self._inbox_room.set()
        finally:
            self._server = None
            self.busy = False
            if self.draining and self.reader is not None:
                self.reader.cancel()  # the reader waits for a frame it will not serve

    async def _room_for_reply(self) -> bool:
        """Replies count against the send budget too: wait for room before serving the
        next request, unless the reader has ended meanwhile. Whether there is room."""
        if self._read_done is None:
            self._read_done = asyncio.Event()
        elif self._read_done.is_set():
            return not self.conn.full
        room = asyncio.ensure_future(self._wait_room())
        ended = asyncio.ensure_future(self._read_done.wait())
        try:
            await asyncio.wait([room, ended], return_when=asyncio.FIRST_COMPLETED)
        finally:
            room.cancel()
            ended.cancel()
        return not self.conn.full

    async def finish(self) -> None:
        """Let the request in flight (and those queued behind it) finish; those that wait
        for room the client never makes are dropped."""
        if self._read_done is None:
            self._read_done = asyncio.Event()
        self._read_done.set()
        server = self._server
        if server is not None:
            await asyncio.wait([server])

    def expire(self) -> None:
        """The token's ``exp`` passed (and no RefreshToken moved it): close with 4001."""
        if self._expired:
            return
        self._expired = True
        self._close_soon(CloseCode.TOKEN_EXPIRED, "token expired", "token expired")
