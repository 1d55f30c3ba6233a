"""The desk's clockwork: snoozed conversations open again when their time comes, and
conversations nobody has go to an agent (``--auto-assign``).

Every node runs the wake-up; the store hands each conversation due to exactly one of them
(a row lock skipped by the others on PostgreSQL, the one writer on SQLite), and the time
lives in the database, so a snooze set on a node that dies still wakes on another.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from ..common.ratelog import RateLimitedLog
from ..protocol.errors import AppError
from ..protocol.models import Conversation, ConversationChange, now_us
from ..store import Store

log = logging.getLogger(__name__)
_failures = RateLimitedLog(log)

WAKE_BATCH = 100  # conversations opened in one write
ONLINE = "online"


class SnoozeWaker:
    """Looks every ``interval`` seconds for snoozed conversations due, opens them and
    hands each change to ``on_change`` (the inbox's push)."""

    def __init__(
        self,
        store: Store,
        on_change: Callable[[ConversationChange], object],
        *,
        interval: float = 1.0,
        clock_us: Callable[[], int] = now_us,
    ) -> None:
        self._store = store
        self._on_change = on_change
        self._interval = interval
        self._now = clock_us
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    async def wake_due(self) -> int:
        """Open what is due now; how many this node opened. (One write that finds nothing
        costs SQLite no fsync and PostgreSQL one indexed probe.)"""
        woken = 0
        while True:
            changes = await self._store.wake_snoozed(now=self._now(), limit=WAKE_BATCH)
            for change in changes:
                self._on_change(change)
            woken += len(changes)
            if len(changes) < WAKE_BATCH:
                return woken

    async def _run(self) -> None:
        while True:
            try:
                await self.wake_due()
            except AppError as exc:  # the database is down: the next round tries again
                _failures.warning(exc.code, "snoozed conversations not woken: %s", exc.message)
            await asyncio.sleep(self._interval)


class Staff(Protocol):
    """Who is there (``appchat.fanout.presence``): the staff members known now."""

    def staff(self) -> list[tuple[int, str, str | None]]: ...


class AutoAssigner:
    """``--auto-assign round-robin``: a new or reopened conversation nobody has goes to the
    online staff member with the fewest open (or pending) conversations, fewer than
    ``max_open`` (0: no limit); among equals, the next after the one chosen last. Nobody
    online, or everyone full: it stays unassigned (the inbox's "Unassigned" tab)."""

    def __init__(self, store: Store, presence: Staff, *, max_open: int = 0) -> None:
        self._store = store
        self._presence = presence
        self._max_open = max_open
        self._last = 0  # the id chosen last: ties go round from it

    async def choose(self) -> int | None:
        online = [
            uid for uid, availability, _name in self._presence.staff() if availability == ONLINE
        ]
        if not online:
            return None
        counts = await self._store.open_counts(online)
        load = {uid: counts.get(uid, 0) for uid in online}
        if self._max_open:
            load = {uid: n for uid, n in load.items() if n < self._max_open}
        if not load:
            return None
        fewest = min(load.values())
        tied = sorted(uid for uid, n in load.items() if n == fewest)
        chosen = next((uid for uid in tied if uid > self._last), tied[0])
        self._last = chosen
        return chosen

    async def assign(self, conversation: Conversation, *, now: int) -> ConversationChange | None:
        """Assign ``conversation`` if nobody has it (decided in the write: two nodes
        racing assign it once); the change, if one was made."""
        chosen = await self.choose()
        if chosen is None:
            return None
        change = await self._store.assign(conversation, chosen, now=now, unassigned_only=True)
        return None if change.before is change.conversation else change
