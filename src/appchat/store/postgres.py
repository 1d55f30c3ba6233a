"""PostgreSQL storage on an asyncpg pool.

History no reader skips: a new message first locks its conversation's row, and only then
draws its id from the sequence (``appchat_send_batch_v4``, migration 0008, does this for a
whole batch of messages in one round trip, locking rows in id order). Two nodes writing to one
conversation therefore take turns, and a message id is drawn only after every smaller id
of that conversation committed: a reader resuming with ``after_id`` never skips one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg

from ..common.ratelog import RateLimitedLog
from ..protocol.errors import AppError, Forbidden, Internal, NotFound, Unavailable
from ..protocol.models import (
    Conversation,
    Message,
    SendOutcome,
)
from .migrate import apply_postgres_migrations
from .plan import Plan, expand, postgres_sql
from .rows import (
    SELECT_MESSAGES,
    Send,
    message_of,
    new_message,
)
from .sqlstore import SqlStore

log = logging.getLogger(__name__)
_outage_log = RateLimitedLog(log)  # an outage fails every request: log a few

T = TypeVar("T")

MAX_SEND_BATCH = 500  # messages in one call of appchat_send_batch_v4

# Connection trouble, a transaction rolled back by a deadlock or serialization failure,
# a server out of resources or shutting down: try again later.
_UNAVAILABLE_CLASSES = ("08", "40", "53", "57")


def translate(exc: BaseException) -> AppError:
    if isinstance(exc, AppError):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        if state[:2] in _UNAVAILABLE_CLASSES:
            return Unavailable("the database is unavailable, try again")
        if state == "23503":  # a foreign key: its conversation was erased meanwhile
            return NotFound("no such conversation")
        return Internal()
    if isinstance(exc, OSError | asyncpg.InterfaceError | TimeoutError):
        return Unavailable("the database is unreachable, try again")
    return Internal()


class PostgresStore(SqlStore):
    _search_dialect = "postgresql"
    _changed_only_index = False  # messages_changes holds every message's revision

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 5.0,
        command_timeout: float = 10.0,
        migrate: bool = True,
    ) -> None:
        self.dsn = dsn
        self._migrate = migrate
        self._min = min_size
        self._max = max_size
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        self._sends: list[_Send] = []
        self._sender: asyncio.Task[None] | None = None

    async def open(self) -> None:
        if self._migrate:
            try:
                await asyncio.to_thread(apply_postgres_migrations, self.dsn)
            except Exception as exc:
                raise Unavailable(f"cannot migrate the database: {exc}") from exc
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self._min,
                max_size=self._max,
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                reset=_keep_session,
            )
        except Exception as exc:
            raise translate(exc) from exc

    async def close(self) -> None:
        if self._sender is not None:
            await asyncio.wait([self._sender], timeout=self._command_timeout)
        for job in self._sends:
            _settle(job.future, Unavailable("storage is closed"))
        self._sends.clear()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def _run(self, fn: Callable[[asyncpg.Connection], Awaitable[T]], *, tx: bool) -> T:
        if self._pool is None:
            raise Unavailable("storage is closed")
        try:
            async with self._pool.acquire(timeout=self._connect_timeout) as conn:
                if not tx:
                    return await fn(conn)
                async with conn.transaction():
                    return await fn(conn)
        except AppError:
            raise
        except Exception as exc:
            error = translate(exc)
            if isinstance(error, Internal):
                log.exception("database error")
            else:
                _outage_log.warning("database unavailable", "database unavailable: %s", exc)
            raise error from exc

    async def _read_plan(self, make: Callable[..., Plan[T]], *args: Any) -> T:
        return await self._run(lambda conn: _drive(conn, make(*args)), tx=False)

    async def _write_plan(self, make: Callable[..., Plan[T]], *args: Any) -> T:
        return await self._run(lambda conn: _drive(conn, make(*args)), tx=True)

    def _send(self, send: Send) -> asyncio.Future[SendOutcome]:
        """Sent in a batch with whatever else is waiting: one round trip per batch."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[SendOutcome] = loop.create_future()
        if self._pool is None:
            fut.set_exception(Unavailable("storage is closed"))
            return fut
        self._sends.append(_Send(send, fut))
        if self._sender is None:
            self._sender = loop.create_task(self._send_loop())
        return fut

    async def _send_loop(self) -> None:
        """Batches go out one at a time; what arrives meanwhile forms the next batch."""
        try:
            while self._sends:
                batch = self._sends[:MAX_SEND_BATCH]
                del self._sends[: len(batch)]
                try:
                    outcomes = await self._send_batch(batch)
                except AppError as exc:
                    if len(batch) == 1 or not isinstance(exc, Internal | NotFound):
                        for job in batch:
                            _settle(job.future, exc)
                        continue
                    # One message broke the batch: each alone, so only that one fails.
                    outcomes = []
                    for job in batch:
                        try:
                            outcomes += await self._send_batch([job])
                        except AppError as alone:
                            outcomes.append(alone)
                for job, outcome in zip(batch, outcomes, strict=True):
                    _settle(job.future, outcome)
        finally:
            self._sender = None

    async def _send_batch(self, waiting: list[_Send]) -> list[SendOutcome | AppError]:
        hooks = self._hooks
        batch = [w.send for w in waiting]

        async def run(conn: asyncpg.Connection) -> list[SendOutcome | AppError]:
            rows = await conn.fetch(
                "SELECT * FROM appchat_send_batch_v4($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                [j.conversation.id for j in batch],
                [j.sender_id for j in batch],
                [j.staff for j in batch],
                [j.content for j in batch],
                [j.content_type for j in batch],
                [j.client_msg_id for j in batch],
                [j.now for j in batch],
                [j.guard_staff for j in batch],
                [j.private for j in batch],
                hooks or None,
            )
            retried = [r["message_id"] for r in rows if not r["created"] and not r["refused"]]
            firsts = {}
            if retried:
                found = await conn.fetch(SELECT_MESSAGES + "WHERE m.id = ANY($1)", retried)
                firsts = {r[0]: message_of(r) for r in found}
            return _outcomes(batch, rows, firsts)

        outcomes = await self._run(run, tx=False)
        if any(isinstance(o, SendOutcome) and o.created for o in outcomes):
            self._woken(hooks)
        return outcomes


def _outcomes(
    batch: list[Send], rows: list[asyncpg.Record], firsts: dict[int, Message]
) -> list[SendOutcome | AppError]:
    """What each send of a batch gets: its message (with its own revision) and its
    conversation as the batch left it."""
    outcomes: list[SendOutcome | AppError] = []
    for job, row in zip(batch, rows, strict=True):
        if row["refused"]:
            outcomes.append(Forbidden("you may not act as this participant"))
        elif not row["created"]:  # a retry: answered with the first, not pushed again
            outcomes.append(SendOutcome(firsts[row["message_id"]], False, []))
        else:
            conversation = Conversation(
                id=job.conversation.id,
                application_id=job.conversation.application_id,
                create_at=row["create_at"],
                update_at=row["update_at"],
                status=row["status"],
                assignee_id=row["assignee_id"],
                snooze_until=row["snooze_until"],
                rev=row["rev"],
            )
            message = new_message(row["message_id"], job, row["message_rev"])
            outcomes.append(
                SendOutcome(message, True, list(row["participants"]), conversation, row["reopened"])
            )
    return outcomes


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset when a connection returns to the pool: appchat changes no session
    state (every transaction is closed by its context manager), so this saves asyncpg's
    reset query, a round trip per use."""


@dataclass(frozen=True, slots=True)
class _Send:
    """One SendMessage waiting for its batch."""

    send: Send
    future: asyncio.Future[SendOutcome]


def _settle(fut: asyncio.Future[SendOutcome], outcome: SendOutcome | AppError) -> None:
    if fut.done():
        return
    if isinstance(outcome, AppError):
        fut.set_exception(outcome)
    else:
        fut.set_result(outcome)


async def _drive(conn: asyncpg.Connection, plan: Plan[T]) -> T:
    """Run a plan (see sqlstore.py) on ``conn``."""
    result: Any = None
    try:
        while True:
            step = plan.send(result)
            if step.kind == "changed":  # nothing of a conversation is remembered here
                result = None
                continue
            if step.kind == "exclusive":
                result = await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", *step.params)
                continue
            kind, sql, params = expand(step)
            sql = postgres_sql(sql)
            if kind == "rows":
                result = await conn.fetch(sql, *params)
            elif kind == "row":
                result = await conn.fetchrow(sql, *params)
            elif kind == "value":
                result = await conn.fetchval(sql, *params)
            elif kind == "column":
                result = [r[0] for r in await conn.fetch(sql, *params)]
            elif kind == "count":  # the status: "INSERT 0 1", "UPDATE 3"
                result = int((await conn.execute(sql, *params)).rsplit(" ", 1)[1])
            else:
                result = await conn.executemany(sql, params)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]  # a generator's return value
