"""This node's connections per participant, their bounded send buffers, and fan-out.

A push for a participant goes straight to that participant's connections on this node,
and through the broker (a channel per participant) to the other nodes, which hand it to
their connections. A node ignores its own publications when they come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Iterable
from dataclasses import dataclass
from typing import Any

from . import defaults
from .broker import Broker
from .errors import AppError, Unavailable
from .events import RESYNC, push
from .models import Principal, Role

log = logging.getLogger(__name__)


Send = Callable[[bytes], Coroutine[Any, Any, None]]
"""Writes one text frame; returns at once unless the socket's buffer is full."""


class Connection:
    """One WebSocket as the hub sees it: who it is, and the frames not yet written.

    A frame is written straight to the socket when nothing waits before it; otherwise it
    waits in a queue drained by a task that exists only while there is a backlog. What
    waits is bounded in frames and in bytes. A push that does not fit marks the client as
    too slow (it is then disconnected); a reply always fits, because the reader takes no
    new request while there is no room (``room()``).
    """

    __slots__ = (
        "_closed",
        "_drainer",
        "_max_bytes",
        "_max_queue",
        "_on_broken",
        "_on_overflow",
        "_principal",
        "_queue",
        "_room",
        "_send",
        "id",
        "overflowed",
        "queued_bytes",
    )

    def __init__(
        self,
        conn_id: str,
        principal: Principal,
        send: Send,
        *,
        max_queue: int,
        max_bytes: int,
        on_overflow: Callable[[Connection], None],
        on_broken: Callable[[Connection], None] | None = None,
    ) -> None:
        self.id = conn_id
        self._principal = principal
        self._send = send
        self._queue: list[bytes] = []  # short, and an empty list is small (idle connections)
        self.queued_bytes = 0
        self._max_queue = max_queue
        self._max_bytes = max_bytes
        self._room: asyncio.Event | None = None  # made when a reader has to wait for room
        self._drainer: asyncio.Task[None] | None = None
        self._on_overflow = on_overflow
        self._on_broken = on_broken
        self.overflowed = False
        self._closed = False  # the socket failed: nothing more is written

    @property
    def principal(self) -> Principal:
        return self._principal

    @principal.setter
    def principal(self, value: Principal) -> None:
        self._principal = value

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def full(self) -> bool:
        """No room for a reply: the reader must wait (``room()``) before reading more."""
        return not self._closed and (
            self.queued_bytes > self._max_bytes or len(self._queue) >= self._max_queue
        )

    @property
    def backlog(self) -> int:
        """Frames waiting to be written (the one being written included)."""
        return len(self._queue) + (self._drainer is not None)

    def push(self, frame: bytes) -> None:
        """Send a push; a client too slow to take its pushes is disconnected."""
        if self.overflowed or self._closed:
            return
        if (self._queue or self._drainer is not None) and (
            len(self._queue) >= self._max_queue or self.queued_bytes + len(frame) > self._max_bytes
        ):
            self.overflowed = True
            self._on_overflow(self)
            return
        self._write(frame)

    def reply(self, frame: bytes) -> None:
        """Send the reply to a request (the reader waited for room before reading it)."""
        if not self._closed:
            self._write(frame)

    def _write(self, frame: bytes) -> None:
        if self._queue or self._drainer is not None:
            self._enqueue(frame)
            return
        coro = self._send(frame)
        try:
            waiting = coro.send(None)
        except StopIteration:
            return  # written: the common case
        except (ConnectionError, RuntimeError):
            self._broken()
            return
        # The socket's buffer is full: the rest of this write runs in a task, and what
        # comes after waits behind it in the queue.
        self.queued_bytes += len(frame)
        self._drainer = asyncio.get_running_loop().create_task(
            self._drain(_resume(coro, waiting), len(frame))
        )
        self._full()

    def _enqueue(self, frame: bytes) -> None:
        self._queue.append(frame)
        self.queued_bytes += len(frame)
        self._full()

    def _full(self) -> None:
        if self.queued_bytes > self._max_bytes or len(self._queue) >= self._max_queue:
            if self._room is None:
                self._room = asyncio.Event()
            self._room.clear()

    async def _drain(self, first: Coroutine[Any, Any, None], size: int) -> None:
        try:
            try:
                await first
            finally:
                self.queued_bytes -= size
            while self._queue:
                frame = self._queue.pop(0)
                try:
                    await self._send(frame)
                finally:
                    self.queued_bytes -= len(frame)
                    self._has_room()
        except (ConnectionError, RuntimeError):
            self._broken()
        finally:
            self._drainer = None
            self._has_room()

    def _has_room(self) -> None:
        if (
            self._room is not None
            and self.queued_bytes <= self._max_bytes
            and len(self._queue) < self._max_queue
        ):
            self._room.set()

    def _broken(self) -> None:
        """The socket refused a write: drop what waits and let the reader go."""
        self._closed = True
        self._queue.clear()
        self.queued_bytes = 0
        if self._room is not None:
            self._room.set()
        if self._on_broken is not None:
            self._on_broken(self)

    async def room(self) -> None:
        """Wait until the buffer has room (or the socket failed)."""
        while not self._closed and (
            self.queued_bytes > self._max_bytes or len(self._queue) >= self._max_queue
        ):
            if self._room is None:
                self._room = asyncio.Event()
            self._room.clear()
            await self._room.wait()

    async def flush(self, within: float) -> None:
        """Wait (at most ``within`` seconds) until everything queued reached the socket."""
        drainer = self._drainer
        if drainer is not None:
            await asyncio.wait([drainer], timeout=within)

    def abandon(self) -> None:
        """Stop writing: cancel the backlog's task (the connection is going away)."""
        self._closed = True
        self._queue.clear()
        if self._drainer is not None:
            self._drainer.cancel()
        if self._room is not None:
            self._room.set()


async def _resume(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    """Finish a coroutine that was started by hand and is suspended on ``waiting``."""
    while True:
        try:
            await _Yield(waiting)
        except BaseException as exc:  # cancelled, or the awaited future failed
            try:
                waiting = coro.throw(exc)
            except StopIteration:
                return
            continue
        try:
            waiting = coro.send(None)
        except StopIteration:
            return


class _Yield:
    """Await what a hand-driven coroutine yielded, as a Task would have."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, None, None]:
        yield self.value


RESYNC_RETRY = 0.1  # seconds before retrying Event.Resync to a broker that did not answer


# A control message on a participant's channel (not a push):
# ``!disconnect\t<node>\t<code>\n<reason>`` closes every connection of the participant id;
# ``!disconnect\t<node>\t<code>\t<role>\t<application or empty>\n<reason>`` only those of
# one identity using it (a node of the previous release drops this form, closing nothing).
# Node ids are hex, so no push envelope starts with ``!``.
_DISCONNECT = b"!disconnect\t"


@dataclass(frozen=True, slots=True)
class Whom:
    """Which of the identities using a participant id to disconnect: staff, or customers
    (of one application, or of any); ``None`` fields match everyone."""

    role: Role | None = None
    application_id: int | None = None

    def matches(self, principal: Principal) -> bool:
        if self.role is not None and principal.role is not self.role:
            return False
        return self.application_id is None or principal.application_id == self.application_id

    @property
    def everyone(self) -> bool:
        return self.role is None and self.application_id is None


EVERYONE = Whom()

Closer = Callable[[Connection, int, str], bool]
"""Closes one connection with a close code and reason; whether it was open to close."""


def _envelope(node: str, origin: str | None, application_id: int, frame: bytes) -> bytes:
    return f"{node}\t{origin or ''}\t{application_id}\n".encode() + frame


def _open_envelope(data: bytes) -> tuple[str, str, int, bytes]:
    head, _, frame = data.partition(b"\n")
    node, origin, app = head.decode().split("\t")
    return node, origin, int(app), frame


class Hub:
    def __init__(
        self,
        broker: Broker,
        *,
        prefix: str = defaults.CHANNEL_PREFIX,
        publish_timeout: float = 2.0,
        max_pending_publishes: int = 100_000,
    ) -> None:
        self._broker = broker
        self._prefix = prefix
        self.node_id = secrets.token_hex(4)
        self._own_head = f"{self.node_id}\t".encode()  # how this node's envelopes start
        self._ids = itertools.count(1)
        self._by_user: dict[int, set[Connection]] = {}
        self._lock = asyncio.Lock()
        self._publish_timeout = publish_timeout
        self._outbox: deque[tuple[str, bytes]] = deque()
        self._max_outbox = max_pending_publishes
        self._publisher: asyncio.Task[None] | None = None
        self._missed: set[int] = set()  # users whose pushes could not be published
        self._wake: asyncio.Event | None = None  # a push came while the publisher waits
        self._started = False
        self.closer: Closer | None = None  # set by the WebSocket endpoint

    async def start(self) -> None:
        await self._broker.start(self._on_broker_message, self.resync)
        self._started = True

    async def stop(self) -> None:
        publisher = self._publisher  # set to None by the task itself when it ends
        if publisher is not None:
            await asyncio.wait([publisher], timeout=self._publish_timeout)
            publisher.cancel()  # (it may be retrying Event.Resync to a broker still down)
            await asyncio.wait([publisher])  # ended: a push after stop() starts a new one

    def _channel(self, user_id: int) -> str:
        return f"{self._prefix}:user:{user_id}"

    def new_connection_id(self) -> str:
        return f"{self.node_id}-{next(self._ids)}"

    @property
    def connections(self) -> list[Connection]:
        return [c for conns in self._by_user.values() for c in conns]

    async def register(self, conn: Connection) -> None:
        """Route the participant's pushes to ``conn``; raises if the broker refuses."""
        user_id = conn.principal.sid
        async with self._lock:
            if user_id not in self._by_user:
                try:  # a broker that hangs refuses the connection (503), in bounded time
                    async with asyncio.timeout(self._publish_timeout):
                        await self._broker.subscribe(self._channel(user_id))
                except TimeoutError:
                    raise Unavailable("the broker did not answer in time") from None
                self._by_user[user_id] = set()
            self._by_user[user_id].add(conn)

    async def unregister(self, conn: Connection) -> None:
        user_id = conn.principal.sid
        async with self._lock:
            conns = self._by_user.get(user_id)
            if conns is None or conn not in conns:
                return
            conns.discard(conn)
            if not conns:
                del self._by_user[user_id]
                await self._broker.unsubscribe(self._channel(user_id))

    def deliver(
        self, user_ids: Iterable[int], application_id: int, frame: bytes, origin: str | None
    ) -> None:
        """Send ``frame`` to every connection of each user, on any node, but ``origin``.

        This node's connections get it at once; other nodes through the broker, by a task
        beside the request path: the caller (an ack waiting on it) never waits for the
        broker. A push the broker could not take is followed by ``Event.Resync`` to its
        users once the broker answers again.
        """
        envelope: bytes | None = None
        for user_id in user_ids:
            local = self._by_user.get(user_id)
            if local:
                for conn in local:
                    if conn.id != origin and conn.principal.may_read_application(application_id):
                        conn.push(frame)
            if not self._broker.shared:
                continue
            if envelope is None:
                envelope = _envelope(self.node_id, origin, application_id, frame)
            self._publish(self._channel(user_id), user_id, envelope)

    def _publish(self, channel: str, user_id: int, data: bytes) -> None:
        if len(self._outbox) >= self._max_outbox:
            self._missed.add(user_id)
            return
        self._outbox.append((channel, data))
        if self._wake is not None:
            self._wake.set()
        if self._publisher is None:
            self._publisher = asyncio.get_running_loop().create_task(self._publish_loop())

    async def _publish_loop(self) -> None:
        """Publish what waits. Once pushes were lost, first tell their users to refetch
        (``Event.Resync``), retrying with backoff until the broker answers again; pushes
        that wait meanwhile are not sent late, their users refetch too."""
        backoff = RESYNC_RETRY
        try:
            while self._outbox or self._missed:
                if self._missed:
                    if await self._resync_missed():
                        backoff = RESYNC_RETRY
                    else:
                        self._miss(self._outbox)
                        self._outbox.clear()
                        await self._pause(backoff)  # or until the next push
                        backoff = min(backoff * 2, self._publish_timeout)
                        continue
                if self._outbox:
                    batch = list(self._outbox)
                    self._outbox.clear()
                    try:
                        async with asyncio.timeout(self._publish_timeout):
                            await self._broker.publish_many(batch)
                    except (AppError, TimeoutError) as exc:
                        # Committed messages are not lost: clients catch up with after_id.
                        log.warning("%d pushes not published: %s", len(batch), _reason(exc))
                        self._miss(batch)
        finally:
            self._publisher = None

    async def _pause(self, delay: float) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wake.wait()

    def _miss(self, batch: Iterable[tuple[str, bytes]]) -> None:
        for channel, _data in batch:
            self._missed.add(int(channel.rsplit(":", 1)[1]))

    async def _resync_missed(self) -> bool:
        """Publish ``Event.Resync`` to the users whose pushes were lost; whether it went."""
        users, self._missed = self._missed, set()
        frame = _envelope(self.node_id, None, 0, push(RESYNC, None))
        batch = [(self._channel(u), frame) for u in users]
        try:
            async with asyncio.timeout(self._publish_timeout):
                await self._broker.publish_many(batch)
        except (AppError, TimeoutError):
            self._missed |= users
            return False
        log.info("broker answers again: %d participants told to refetch", len(users))
        return True

    def _on_broker_message(self, channel: str, data: bytes) -> None:
        if data.startswith(self._own_head):
            return  # this node's own publication: delivered locally when published
        if data.startswith(_DISCONNECT):
            self._on_disconnect(channel, data)
            return
        try:
            user_id = int(channel.rsplit(":", 1)[1])
            _node, origin, application_id, frame = _open_envelope(data)
        except (ValueError, IndexError, UnicodeDecodeError):
            log.warning("dropping a malformed broker message on %s", channel)
            return
        for conn in list(self._by_user.get(user_id, ())):
            if conn.id != origin and (
                application_id == 0 or conn.principal.may_read_application(application_id)
            ):
                conn.push(frame)

    async def disconnect(self, user_id: int, code: int, reason: str, whom: Whom = EVERYONE) -> int:
        """Close the connections of ``user_id`` that ``whom`` names on every node: this
        node's at once, the others' through the broker (raises ``Unavailable`` if it
        refuses). Returns how many this node closed."""
        closed = self._close_local(user_id, code, reason, whom)
        if self._broker.shared:
            head = f"{self.node_id}\t{code}"
            if not whom.everyone:
                role = "" if whom.role is None else whom.role.value
                app = "" if whom.application_id is None else str(whom.application_id)
                head += f"\t{role}\t{app}"
            data = _DISCONNECT + f"{head}\n".encode() + reason.encode()
            try:
                async with asyncio.timeout(self._publish_timeout):
                    await self._broker.publish_many([(self._channel(user_id), data)])
            except TimeoutError:
                raise Unavailable("the broker did not answer in time") from None
        return closed

    def _close_local(self, user_id: int, code: int, reason: str, whom: Whom) -> int:
        closer = self.closer
        if closer is None:
            return 0
        return sum(
            closer(conn, code, reason)
            for conn in list(self._by_user.get(user_id, ()))
            if whom.matches(conn.principal)
        )

    def _on_disconnect(self, channel: str, data: bytes) -> None:
        try:
            user_id = int(channel.rsplit(":", 1)[1])
            head, _, reason = data[len(_DISCONNECT) :].partition(b"\n")
            node, code, *named = head.decode().split("\t")
            whom = EVERYONE
            if named:
                role, app = named
                whom = Whom(Role(role) if role else None, int(app) if app else None)
            if node != self.node_id:
                self._close_local(user_id, int(code), reason.decode(), whom)
        except (ValueError, IndexError, UnicodeDecodeError):
            log.warning("dropping a malformed broker message on %s", channel)

    async def resync(self) -> None:
        """Tell every local connection it may have missed pushes and should refetch."""
        frame = push(RESYNC, None)
        for conn in self.connections:
            conn.push(frame)


def _reason(exc: BaseException) -> str:
    return exc.message if isinstance(exc, AppError) else "the broker did not answer in time"
