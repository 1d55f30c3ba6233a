"""The desk's clockwork: snoozed conversations open again when their time comes.

Every node runs the wake-up; the store hands each conversation due to exactly one of them
(a row lock skipped by the others on PostgreSQL, the one writer on SQLite), and the time
lives in the database, so a snooze set on a node that dies still wakes on another.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..common.ratelog import RateLimitedLog
from ..protocol.errors import AppError
from ..protocol.models import ConversationChange, now_us
from ..store import Store

log = logging.getLogger(__name__)
_failures = RateLimitedLog(log)

WAKE_BATCH = 100  # conversations opened in one write


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
