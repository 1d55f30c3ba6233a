"""This node's connections per participant, and fan-out.

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
from collections.abc import Callable, Iterable

from ..broker import Broker
from ..protocol import defaults
from ..protocol.errors import AppError, Unavailable
from ..protocol.events import RECEIVE_PRESENCE, RESYNC, push, receive_presence
from .connection import Connection
from .envelope import (
    DISCONNECT,
    EVERYONE,
    Whom,
    disconnect_message,
    envelope,
    open_disconnect,
    open_envelope,
)
from .inbox import Inbox
from .presence import Presence

log = logging.getLogger(__name__)


RESYNC_RETRY = 0.1  # seconds before retrying Event.Resync to a broker that did not answer


def _ignore(kind: str, messages: int) -> None:
    return None


class Hub:
    def __init__(
        self,
        broker: Broker,
        *,
        prefix: str = defaults.CHANNEL_PREFIX,
        publish_timeout: float = 2.0,
        max_pending_publishes: int = 100_000,
        presence_grace: float = defaults.PRESENCE_GRACE,
        on_publish_failure: Callable[[str, int], None] | None = None,
    ) -> None:
        """``on_publish_failure(kind, n)``: ``n`` messages of ``kind`` (push, inbox,
        presence) the broker did not take (the node counts them in its metrics)."""
        self._broker = broker
        self._publish_failed = on_publish_failure or _ignore
        self._prefix = prefix
        self.node_id = secrets.token_hex(4)
        self._own_head = f"{self.node_id}\t".encode()  # how this node's envelopes start
        self._ids = itertools.count(1)
        # A user's connections on this node: a few at most, so a list (a third of an empty
        # set's size, for every idle connection of a different user).
        self._by_user: dict[int, list[Connection]] = {}
        self._lock = asyncio.Lock()
        self._publish_timeout = publish_timeout
        self._outbox: deque[tuple[str, bytes]] = deque()
        self._max_outbox = max_pending_publishes
        self._publisher: asyncio.Task[None] | None = None
        self._missed: set[int] = set()  # users whose pushes could not be published
        self._wake: asyncio.Event | None = None  # a push came while the publisher waits
        self._started = False
        # Called with a user id when their first connection on this node opened or their
        # last one closed (the away notices keep when each user was last there).
        self.on_user_edge: Callable[[int], None] | None = None
        self.inbox = Inbox(
            broker,
            self.node_id,
            prefix=prefix,
            publish_timeout=publish_timeout,
            on_publish_failure=self._publish_failed,
        )
        self.presence = Presence(
            broker,
            self.node_id,
            prefix=prefix,
            grace=presence_grace,
            on_publish_failure=self._publish_failed,
        )
        self.presence.on_change = self._presence_changed
        # Channels that are not a participant's: their messages go to their own handler.
        self._routes: dict[str, Callable[[bytes], None]] = {
            self.inbox.channel: self.inbox.handle,
            self.presence.channel: self.presence.handle,
        }

    def _presence_changed(self, user_id: int, availability: str) -> None:
        # Every node notices a change by itself: each tells its own inbox subscribers.
        self.inbox.push_all(push(RECEIVE_PRESENCE, receive_presence(user_id, availability)))

    def route(self, channel: str, handler: Callable[[bytes], None]) -> None:
        """Hand the messages of ``channel`` (subscribed by its owner) to ``handler``."""
        self._routes[channel] = handler

    async def start(self) -> None:
        await self._broker.start(self._on_broker_message, self.resync)
        await self.presence.start()
        self._started = True

    async def stop(self) -> None:
        await self.presence.stop()
        await self.inbox.stop()
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

    def connected_user_ids(self) -> list[int]:
        """The users with a connection on this node."""
        return list(self._by_user)

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
                self._by_user[user_id] = []
                if self.on_user_edge is not None:
                    self.on_user_edge(user_id)
            self._by_user[user_id].append(conn)
        principal = conn.principal
        self.presence.connected(user_id, staff=principal.is_staff, name=principal.name)

    async def unregister(self, conn: Connection) -> None:
        user_id = conn.principal.sid
        await self.inbox.unsubscribe(conn)
        async with self._lock:
            conns = self._by_user.get(user_id)
            if conns is None or conn not in conns:
                return
            conns.remove(conn)
            self.presence.disconnected(user_id, staff=conn.principal.is_staff)
            if not conns:
                del self._by_user[user_id]
                if self.on_user_edge is not None:
                    self.on_user_edge(user_id)
                await self._broker.unsubscribe(self._channel(user_id))

    def deliver(
        self,
        user_ids: Iterable[int],
        application_id: int,
        frame: bytes,
        origin: str | None,
        staff_only: bool = False,
    ) -> None:
        """Send ``frame`` to every connection of each user, on any node, but ``origin``;
        ``staff_only``: only to their staff connections (a private note).

        This node's connections get it at once; other nodes through the broker, by a task
        beside the request path: the caller (an ack waiting on it) never waits for the
        broker. A push the broker could not take is followed by ``Event.Resync`` to its
        users once the broker answers again.
        """
        enveloped: bytes | None = None
        for user_id in user_ids:
            local = self._by_user.get(user_id)
            if local:
                for conn in local:
                    if conn.id != origin and _may_see(conn, application_id, staff_only):
                        conn.push(frame)
            if not self._broker.shared:
                continue
            if enveloped is None:
                # Staff only: the application's id negated, which no customer's token
                # names (a node of the previous release also shows it to staff only).
                shown = -application_id if staff_only else application_id
                enveloped = envelope(self.node_id, origin, shown, frame)
            self._publish(self._channel(user_id), user_id, enveloped)

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
                        self._publish_failed("push", len(batch))
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
        frame = envelope(self.node_id, None, 0, push(RESYNC, None))
        batch = [(self._channel(u), frame) for u in users]
        try:
            async with asyncio.timeout(self._publish_timeout):
                await self._broker.publish_many(batch)
        except (AppError, TimeoutError):
            self._missed |= users
            self._publish_failed("push", len(batch))
            return False
        log.info("broker answers again: %d participants told to refetch", len(users))
        return True

    def _on_broker_message(self, channel: str, data: bytes) -> None:
        route = self._routes.get(channel)
        if route is not None:
            route(data)
            return
        if data.startswith(self._own_head):
            return  # this node's own publication: delivered locally when published
        if data.startswith(DISCONNECT):
            self._on_disconnect(channel, data)
            return
        try:
            user_id = int(channel.rsplit(":", 1)[1])
            _node, origin, application_id, frame = open_envelope(data)
        except (ValueError, IndexError, UnicodeDecodeError):
            log.warning("dropping a malformed broker message on %s", channel)
            return
        for conn in list(self._by_user.get(user_id, ())):
            if conn.id != origin and (
                application_id == 0 or _may_see(conn, abs(application_id), application_id < 0)
            ):
                conn.push(frame)

    async def disconnect(self, user_id: int, code: int, reason: str, whom: Whom = EVERYONE) -> int:
        """Close the connections of ``user_id`` that ``whom`` names on every node: this
        node's at once, the others' through the broker (raises ``Unavailable`` if it
        refuses). Returns how many this node closed."""
        closed = self._close_local(user_id, code, reason, whom)
        if self._broker.shared:
            data = disconnect_message(self.node_id, code, reason, whom)
            try:
                async with asyncio.timeout(self._publish_timeout):
                    await self._broker.publish_many([(self._channel(user_id), data)])
            except TimeoutError:
                raise Unavailable("the broker did not answer in time") from None
        return closed

    def _close_local(self, user_id: int, code: int, reason: str, whom: Whom) -> int:
        return sum(
            conn.close(code, reason)
            for conn in list(self._by_user.get(user_id, ()))
            if whom.matches(conn.principal)
        )

    def _on_disconnect(self, channel: str, data: bytes) -> None:
        try:
            user_id = int(channel.rsplit(":", 1)[1])
            node, code, reason, whom = open_disconnect(data)
            if node != self.node_id:
                self._close_local(user_id, code, reason, whom)
        except (ValueError, IndexError, UnicodeDecodeError):
            log.warning("dropping a malformed broker message on %s", channel)

    async def resync(self) -> None:
        """Tell every local connection it may have missed pushes and should refetch."""
        await self.presence.resync()
        frame = push(RESYNC, None)
        for conn in self.connections:
            conn.push(frame)


def _may_see(conn: Connection, application_id: int, staff_only: bool) -> bool:
    principal = conn.principal
    if staff_only:
        return principal.is_staff
    return principal.may_read_application(application_id)


def _reason(exc: BaseException) -> str:
    return exc.message if isinstance(exc, AppError) else "the broker did not answer in time"
