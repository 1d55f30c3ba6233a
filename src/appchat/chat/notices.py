"""Away notices: the ``participant.unread`` webhook for a participant who has had no
connection on any node for ``--notify-after`` and has unread messages.

Runs only with webhooks configured. Every node does two things, both through the
database (``store/notices.py`` has the tables and the rules):

* it keeps ``seen`` fresh for the users connected to it: all of them every
  ``seen_interval`` (a quarter of ``--notify-after``, at most a minute), and a user at once
  when their first connection on this node opens or their last one closes. A node that
  dies stops writing: its users are away ``--notify-after`` after its last write, unless
  they connected elsewhere meanwhile.
* it looks for participants away with unread messages every ``scan_interval`` (a tenth
  of ``--notify-after``, at most 10 s) and records their notices; the store records each
  once, whichever node looks first. A look covers what can have changed since this
  node's previous one (with a margin for clocks and commits); the first look after a
  start, and one every ``FULL_EVERY``, covers everything.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import suppress
from typing import Protocol

from ..common.ratelog import RateLimitedLog
from ..protocol.errors import AppError
from ..protocol.models import now_us
from ..store import Store
from ..store.notices import UnreadNotice

log = logging.getLogger(__name__)
_failures = RateLimitedLog(log)

BATCH = 200  # participants one look records at most; a full batch looks again at once
MAX_ROUNDS = 50  # looks in a row before a pause (a flood of notices waits its turn)
MARGIN = 60_000_000  # microseconds a look reaches back before the previous one began
FULL_EVERY = 600_000_000  # microseconds between two looks at everything
FAULT_PAUSE = 1.0  # seconds to wait after the database failed


class Connected(Protocol):
    """This node's connections (``appchat.fanout.hub.Hub``)."""

    def connected_user_ids(self) -> list[int]: ...


def seen_interval(notify_after: float) -> float:
    """Seconds between two writes of every connected user's ``seen``."""
    return min(notify_after / 4, 60.0)


def scan_interval(notify_after: float) -> float:
    """Seconds between two looks for participants due a notice."""
    return min(notify_after / 10, 10.0)


class AwayNotices:
    """Keeps this node's users' ``seen`` fresh and records the notices due."""

    def __init__(
        self,
        store: Store,
        hub: Connected,
        *,
        notify_after: float,
        clock_us: Callable[[], int] = now_us,
    ) -> None:
        self._store = store
        self._hub = hub
        self._notify_after = int(notify_after * 1_000_000)
        self._seen_every = seen_interval(notify_after)
        self._scan_every = scan_interval(notify_after)
        self._now = clock_us
        self._edges: set[int] = set()  # users to write at once (came or went)
        self._edge = asyncio.Event()
        self._last_look: int | None = None  # when this node's previous look began
        self._last_full: int | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def user_edge(self, user_id: int) -> None:
        """``user_id``'s first connection on this node opened, or their last one closed:
        written soon (``Hub.on_user_edge``)."""
        self._edges.add(user_id)
        self._edge.set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._seen_loop()), loop.create_task(self._scan_loop())]

    async def stop(self) -> None:
        """Stop both tasks; write the users that came or went meanwhile (on a graceful stop,
        the users whose connections it closed: away from now)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        with suppress(AppError):
            await self.write_edges()

    async def write_seen(self) -> int:
        """Write ``seen`` of every user connected here (and of those who just went); how
        many."""
        return await self._write(set(self._hub.connected_user_ids()))

    async def write_edges(self) -> int:
        """Write ``seen`` of the users who came or went since the last write; how many."""
        return await self._write(set())

    async def _write(self, users: set[int]) -> int:
        edges, self._edges = self._edges, set()
        users |= edges
        if users:
            try:
                await self._store.mark_seen(sorted(users), now=self._now())
            except AppError:
                self._edges |= edges  # the next write takes them
                raise
        return len(users)

    async def look(self) -> list[UnreadNotice]:
        """Record the notices due now; the ones this node recorded."""
        now = self._now()
        full = (
            self._last_look is None
            or self._last_full is None
            or now - self._last_full >= FULL_EVERY
        )
        since = None if full or self._last_look is None else self._last_look - MARGIN
        away_before = now - self._notify_after
        recorded: list[UnreadNotice] = []
        for _ in range(MAX_ROUNDS):
            found, notices = await self._store.notice_unread(
                now=now, away_before=away_before, since=since, limit=BATCH
            )
            recorded += notices
            if found < BATCH:
                break
        else:  # more were due than a look takes: the next one starts where this one did
            return recorded
        self._last_look = now
        if full:
            self._last_full = now
        return recorded

    async def _seen_loop(self) -> None:
        deadline = 0.0  # loop time of the next write of everyone
        loop = asyncio.get_running_loop()
        while True:
            try:
                if loop.time() >= deadline:
                    deadline = loop.time() + self._seen_every
                    await self.write_seen()
                else:
                    await self.write_edges()
            except AppError as exc:  # the database is down: try again after a pause
                _failures.warning(exc.code, "away notices: seen not written: %s", exc.message)
                await asyncio.sleep(FAULT_PAUSE)
            self._edge.clear()
            if self._edges:
                continue
            with suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await self._edge.wait()

    async def _scan_loop(self) -> None:
        while True:
            try:
                for notice in await self.look():
                    log.debug(
                        "participant.unread: user %d, application %d, %d unread",
                        notice.user_id,
                        notice.application_id,
                        notice.unread,
                    )
            except AppError as exc:
                _failures.warning(exc.code, "away notices: not looked for: %s", exc.message)
            await asyncio.sleep(self._scan_every)
