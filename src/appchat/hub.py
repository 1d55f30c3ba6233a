"""This node's connections per participant, their bounded send queues, and fan-out.

A push goes through the broker on a channel per participant, so it reaches that
participant's connections on every node; each node then hands it to the connections
that may read the conversation, except the one that caused it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterable

from .broker import Broker
from .errors import AppError
from .events import RESYNC, push
from .models import Principal

log = logging.getLogger(__name__)

CLOSE_SLOW_CONSUMER = 4008


class Connection:
    """One WebSocket as the hub sees it: who it is, and the frames waiting to be written.

    What waits is bounded in frames and in bytes. A push that does not fit marks the
    client as too slow (it is then disconnected); a reply always fits, because the
    reader takes no new request while there is no room (``room()``).
    """

    def __init__(
        self,
        conn_id: str,
        principal: Principal,
        *,
        max_queue: int,
        max_bytes: int,
        on_overflow: Callable[[Connection], None],
    ) -> None:
        self.id = conn_id
        self._principal = principal
        self.renewed = asyncio.Event()  # set when RefreshToken replaced the principal
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue()  # bounded by the accounting
        self.queued_bytes = 0
        self._max_queue = max_queue
        self._max_bytes = max_bytes
        self._room = asyncio.Event()
        self._room.set()
        self._on_overflow = on_overflow
        self.overflowed = False
        self.busy = False  # serving a request right now
        self.draining = False  # the node is shutting down: finish, then close

    @property
    def principal(self) -> Principal:
        return self._principal

    @principal.setter
    def principal(self, value: Principal) -> None:
        self._principal = value
        self.renewed.set()

    def push(self, frame: bytes) -> None:
        """Queue a push; a client too slow to take its pushes is disconnected."""
        if self.overflowed:
            return
        full = self.outbox.qsize() >= self._max_queue
        if full or self.queued_bytes + len(frame) > self._max_bytes:
            self.overflowed = True
            self._on_overflow(self)
            return
        self._enqueue(frame)

    def reply(self, frame: bytes) -> None:
        """Queue the reply to a request (the reader waited for room before reading it)."""
        self._enqueue(frame)

    def _enqueue(self, frame: bytes) -> None:
        self.outbox.put_nowait(frame)
        self.queued_bytes += len(frame)
        if self.queued_bytes > self._max_bytes or self.outbox.qsize() >= self._max_queue:
            self._room.clear()

    def written(self, frame: bytes) -> None:
        """The writer handed ``frame`` to the socket."""
        self.queued_bytes -= len(frame)
        if self.queued_bytes <= self._max_bytes and self.outbox.qsize() < self._max_queue:
            self._room.set()
        self.outbox.task_done()

    async def room(self) -> None:
        await self._room.wait()


def _envelope(origin: str | None, application_id: int, frame: bytes) -> bytes:
    return f"{origin or ''}\t{application_id}\n".encode() + frame


def _open_envelope(data: bytes) -> tuple[str, int, bytes]:
    head, _, frame = data.partition(b"\n")
    origin, _, app = head.decode().partition("\t")
    return origin, int(app), frame


class Hub:
    def __init__(self, broker: Broker, *, prefix: str = "appchat") -> None:
        self._broker = broker
        self._prefix = prefix
        self.node_id = secrets.token_hex(4)
        self._ids = itertools.count(1)
        self._by_user: defaultdict[int, set[Connection]] = defaultdict(set)
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._broker.start(self._on_broker_message, self.resync)

    def _channel(self, user_id: int) -> str:
        return f"{self._prefix}:user:{user_id}"

    def new_connection_id(self) -> str:
        return f"{self.node_id}-{next(self._ids)}"

    @property
    def connections(self) -> list[Connection]:
        return [c for conns in self._by_user.values() for c in conns]

    def connection_count(self, user_id: int) -> int:
        """This node's connections of one participant."""
        return len(self._by_user.get(user_id, ()))

    async def register(self, conn: Connection) -> None:
        """Route the participant's pushes to ``conn``; raises if the broker refuses."""
        user_id = conn.principal.sid
        async with self._lock:
            if user_id not in self._by_user:
                await self._broker.subscribe(self._channel(user_id))
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

    async def deliver(
        self, user_ids: Iterable[int], application_id: int, frame: bytes, origin: str | None
    ) -> None:
        """Send ``frame`` to every connection of each user, on any node, but ``origin``."""
        data = _envelope(origin, application_id, frame)
        for user_id in set(user_ids):
            try:
                await self._broker.publish(self._channel(user_id), data)
            except AppError as exc:
                # The message is committed; clients catch up with after_id (see Resync).
                log.warning("push to user %s not published: %s", user_id, exc.message)

    def _on_broker_message(self, channel: str, data: bytes) -> None:
        try:
            user_id = int(channel.rsplit(":", 1)[1])
            origin, application_id, frame = _open_envelope(data)
        except (ValueError, IndexError, UnicodeDecodeError):
            log.warning("dropping a malformed broker message on %s", channel)
            return
        for conn in list(self._by_user.get(user_id, ())):
            if conn.id != origin and conn.principal.may_read_application(application_id):
                conn.push(frame)

    async def resync(self) -> None:
        """Tell every local connection it may have missed pushes and should refetch."""
        frame = push(RESYNC, None)
        for conn in self.connections:
            conn.push(frame)
