"""The live team inbox: staff connections subscribed to conversation changes, on every node.

A change (a new conversation, a message, a status or an assignee) is serialised once and
published once on the desk channel, whoever and however many subscribe; every node that
has subscribers listens to that channel (and only those do) and hands the frame to its own
subscribers whose filter the conversation is in, or has just left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..broker import Broker
from ..common.ratelog import RateLimitedLog
from ..protocol import defaults
from ..protocol.errors import AppError, Unavailable
from ..protocol.models import Principal

log = logging.getLogger(__name__)
_drops = RateLimitedLog(log)

ALL, MINE, UNASSIGNED = "all", "mine", "unassigned"


class Subscriber(Protocol):
    """A connection as the inbox sees it (the hub's ``Connection`` is one)."""

    @property
    def principal(self) -> Principal: ...

    def push(self, frame: bytes) -> None: ...

    def push_soon(self, frame: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class Change:
    """Whose inbox filters a pushed conversation concerns: its assignee now and before
    the change (the same for a message); ``None``: nobody."""

    assignee: int | None
    before: int | None

    def concerns(self, user_id: int, inbox_filter: str) -> bool:
        if inbox_filter == MINE:
            return user_id in (self.assignee, self.before)
        if inbox_filter == UNASSIGNED:
            return self.assignee is None or self.before is None
        return True


def _head(node: str, change: Change) -> bytes:
    def id_or_empty(value: int | None) -> str:
        return "" if value is None else str(value)

    return f"{node}\t{id_or_empty(change.assignee)}\t{id_or_empty(change.before)}\n".encode()


def _open(data: bytes) -> tuple[str, Change, bytes]:
    head, _, frame = data.partition(b"\n")
    node, assignee, before = head.decode().split("\t")
    return node, Change(int(assignee) if assignee else None, int(before) if before else None), frame


class Inbox:
    """Inbox subscriptions of this node's connections, and the desk channel."""

    def __init__(
        self,
        broker: Broker,
        node_id: str,
        *,
        prefix: str = defaults.CHANNEL_PREFIX,
        publish_timeout: float = 2.0,
        on_publish_failure: Callable[[str, int], None] | None = None,
    ) -> None:
        self._broker = broker
        self._publish_failed = on_publish_failure
        self._node = node_id
        self.channel = f"{prefix}:desk"
        self._own_head = f"{node_id}\t".encode()
        self._subscribers: dict[Subscriber, str] = {}  # connection -> its filter
        self._listening = False
        self._lock = asyncio.Lock()
        self._publish_timeout = publish_timeout
        self._outbox: list[tuple[str, bytes]] = []
        self._publisher: asyncio.Task[None] | None = None

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def subscribe(self, conn: Subscriber, inbox_filter: str) -> None:
        """From now on ``conn`` gets the changes in ``inbox_filter`` (replacing its filter);
        raises ``Unavailable`` if the broker does not take the subscription in time."""
        async with self._lock:
            if not self._listening and self._broker.shared:
                try:
                    async with asyncio.timeout(self._publish_timeout):
                        await self._broker.subscribe(self.channel)
                except TimeoutError:
                    raise Unavailable("the broker did not answer in time") from None
            self._listening = True
            self._subscribers[conn] = inbox_filter

    async def unsubscribe(self, conn: Subscriber) -> None:
        if conn not in self._subscribers:
            return
        async with self._lock:
            if self._subscribers.pop(conn, None) is None or self._subscribers:
                return
            self._listening = False
            if self._broker.shared:
                try:
                    async with asyncio.timeout(self._publish_timeout):
                        await self._broker.unsubscribe(self.channel)
                except (AppError, TimeoutError):  # the broker forgets it when it comes back
                    log.warning("the desk channel could not be left: the broker did not answer")

    @property
    def wanted(self) -> bool:
        """Whether a change may concern anyone: subscribers here, or other nodes."""
        return bool(self._subscribers) or self._broker.shared

    def publish(self, frame: bytes, assignee: int | None, before: int | None) -> None:
        """Hand the pushed ``frame``, about a conversation assigned to ``assignee`` (and to
        ``before`` until this change), to this node's subscribers it concerns, and once
        to the other nodes; never waits."""
        change = Change(assignee, before)
        self._deliver(frame, change)
        if not self._broker.shared:
            return
        self._outbox.append((self.channel, _head(self._node, change) + frame))
        if self._publisher is None:
            self._publisher = asyncio.get_running_loop().create_task(self._publish_loop())

    async def _publish_loop(self) -> None:
        try:
            while self._outbox:
                batch, self._outbox = self._outbox, []
                try:
                    async with asyncio.timeout(self._publish_timeout):
                        await self._broker.publish_many(batch)
                except (AppError, TimeoutError):
                    # The other nodes' subscribers refetch their list after Event.Resync.
                    _drops.warning("inbox", "%d inbox changes not published", len(batch))
                    if self._publish_failed is not None:
                        self._publish_failed("inbox", len(batch))
        finally:
            self._publisher = None

    def handle(self, data: bytes) -> None:
        """A message of the desk channel (from any node, this one's own included)."""
        if data.startswith(self._own_head):
            return  # delivered here when published
        try:
            _node, change, frame = _open(data)
        except (ValueError, UnicodeDecodeError):
            _drops.warning("malformed", "dropping a malformed message of the desk channel")
            return
        self._deliver(frame, change)

    def _deliver(self, frame: bytes, change: Change) -> None:
        for conn, inbox_filter in self._subscribers.items():
            if change.concerns(conn.principal.sid, inbox_filter):
                conn.push_soon(frame)

    def push_all(self, frame: bytes) -> None:
        """Hand ``frame`` to every subscriber of this node (presence changes, which every
        node notices by itself)."""
        for conn in self._subscribers:
            conn.push(frame)

    async def stop(self) -> None:
        publisher = self._publisher
        if publisher is not None:
            await asyncio.wait([publisher], timeout=self._publish_timeout)
