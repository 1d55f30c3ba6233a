"""PostgreSQL storage on an asyncpg pool.

Gap-free history: a new message first locks its conversation's row, and only then
draws its id from the sequence (``appchat_send_batch``, migration 0003, does this for a
whole batch of messages in one round trip, locking rows in id order). Two nodes writing to one
conversation therefore take turns, and a message id is drawn only after every smaller id
of that conversation committed: a reader resuming with ``after_id`` never skips one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg

from ..errors import AppError, Forbidden, Internal, NotFound, Unavailable
from ..models import (
    ActivityKey,
    Conversation,
    ConversationPage,
    MessagePage,
    ReadOutcome,
    SendOutcome,
    UnreadCount,
    UnreadPage,
    WebhookBacklog,
    WebhookEvent,
    WebhookFailure,
)
from ..ratelog import RateLimitedLog
from .migrate import apply_postgres_migrations
from .rows import (
    CONVERSATION_COLUMNS,
    NEWEST,
    OUTBOX_COLUMNS,
    SELECT_ALL_CONVERSATIONS,
    SELECT_MESSAGES,
    UNREAD_PAGE_COLUMNS,
    UNREAD_TOTAL,
    activity_query,
    conversation_of,
    conversation_page_of,
    conversation_rows,
    message_of,
    new_message,
    page_of,
    read_rows,
    unread_page_of,
    webhook_event_of,
)

log = logging.getLogger(__name__)
_outage_log = RateLimitedLog(log)  # an outage fails every request: log a few

T = TypeVar("T")

MAX_SEND_BATCH = 500  # messages in one call of appchat_send_batch

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
        return Internal()
    if isinstance(exc, OSError | asyncpg.InterfaceError | TimeoutError):
        return Unavailable("the database is unreachable, try again")
    return Internal()


class PostgresStore:
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
        self._hooks: tuple[str, ...] = ()  # webhook URLs: events are recorded for them
        self._wake: Callable[[], None] | None = None

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

    async def ping(self) -> None:
        async def run(conn: asyncpg.Connection) -> None:
            await conn.fetchval("SELECT 1")

        await self._run(run, tx=False)

    async def get_conversation(self, application_id: int) -> Conversation | None:
        async def run(conn: asyncpg.Connection) -> Conversation | None:
            row = await conn.fetchrow(
                f"SELECT {CONVERSATION_COLUMNS} FROM conversations c WHERE c.application_id = $1",
                application_id,
            )
            return conversation_of(row) if row else None

        return await self._run(run, tx=False)

    async def is_staff_participant(self, conversation_id: int, user_id: int) -> bool:
        async def run(conn: asyncpg.Connection) -> bool:
            staff = await conn.fetchval(
                "SELECT is_staff FROM participants WHERE conversation_id = $1 AND user_id = $2",
                conversation_id,
                user_id,
            )
            return bool(staff)

        return await self._run(run, tx=False)

    async def add_conversation(
        self, application_id: int, user_id: int, *, staff: bool, now: int
    ) -> Conversation:
        hooks = self._hooks
        created = False

        async def run(conn: asyncpg.Connection) -> Conversation:
            nonlocal created
            status = await conn.execute(
                "INSERT INTO conversations (application_id, create_at, update_at) "
                "VALUES ($1, $2, $2) ON CONFLICT (application_id) DO NOTHING",
                application_id,
                now,
            )
            created = status == "INSERT 0 1"
            row = await conn.fetchrow(
                f"SELECT {CONVERSATION_COLUMNS} FROM conversations c WHERE c.application_id = $1",
                application_id,
            )
            conversation = conversation_of(row)
            await _join(conn, conversation.id, user_id, staff, now)
            if created and hooks:
                await _record(conn, conversation_rows(hooks, conversation))
            return conversation

        conversation = await self._run(run, tx=True)
        if created:
            self._woken(hooks)
        return conversation

    async def list_conversations(
        self, user_id: int, *, application_id: int | None = None
    ) -> list[Conversation]:
        async def run(conn: asyncpg.Connection) -> list[Conversation]:
            rows = await conn.fetch(
                f"SELECT {CONVERSATION_COLUMNS} FROM participants p JOIN conversations c "
                "ON c.id = p.conversation_id WHERE p.user_id = $1 "
                "AND ($2::bigint IS NULL OR c.application_id = $2) "
                "ORDER BY c.update_at DESC, c.id DESC",
                user_id,
                application_id,
            )
            return [conversation_of(r) for r in rows]

        return await self._run(run, tx=False)

    async def list_all_conversations(self, *, limit: int) -> list[Conversation]:
        async def run(conn: asyncpg.Connection) -> list[Conversation]:
            rows = await conn.fetch(SELECT_ALL_CONVERSATIONS + "$1", limit)
            return [conversation_of(r) for r in rows]

        return await self._run(run, tx=False)

    async def conversation_page(
        self,
        user_id: int | None,
        *,
        application_id: int | None = None,
        limit: int,
        after: ActivityKey | None = None,
    ) -> ConversationPage:
        sql, params = activity_query(
            CONVERSATION_COLUMNS,
            user_id=user_id,
            application_id=application_id,
            after=after,
            limit=limit,
            numbered=True,
        )

        async def run(conn: asyncpg.Connection) -> ConversationPage:
            return conversation_page_of(await conn.fetch(sql, *params), limit)

        return await self._run(run, tx=False)

    async def unread_page(
        self,
        user_id: int,
        *,
        application_id: int | None = None,
        limit: int,
        after: ActivityKey | None = None,
    ) -> UnreadPage:
        def query(columns: str, key: ActivityKey | None, n: int | None) -> tuple[str, list[Any]]:
            return activity_query(
                columns,
                user_id=user_id,
                application_id=application_id,
                after=key,
                limit=n,
                numbered=True,
            )

        async def run(conn: asyncpg.Connection) -> UnreadPage:
            sql, params = query(UNREAD_PAGE_COLUMNS, after, limit)
            rows = await conn.fetch(sql, *params)
            total = None
            if after is not None or len(rows) > limit:
                sql, params = query(UNREAD_TOTAL, None, None)
                total = int(await conn.fetchval(sql, *params))
            return unread_page_of(rows, limit, total)

        return await self._run(run, tx=False)

    async def list_messages(
        self,
        conversation: Conversation,
        *,
        before_id: int | None = None,
        after_id: int | None = None,
        limit: int,
    ) -> MessagePage:
        async def run(conn: asyncpg.Connection) -> MessagePage:
            base = SELECT_MESSAGES + "WHERE m.conversation_id = $1"
            if after_id is not None:
                rows = await conn.fetch(
                    base + " AND m.id > $2 ORDER BY m.id ASC LIMIT $3",
                    conversation.id,
                    after_id,
                    limit + 1,
                )
            else:
                cursor = before_id if before_id is not None else NEWEST
                rows = await conn.fetch(
                    base + " AND m.id < $2 ORDER BY m.id DESC LIMIT $3",
                    conversation.id,
                    cursor,
                    limit + 1,
                )
            return page_of(rows, limit, newest_first=after_id is None)

        return await self._run(run, tx=False)

    async def add_message(
        self,
        conversation: Conversation,
        *,
        sender_id: int,
        staff: bool,
        content: str,
        content_type: int,
        client_msg_id: str | None,
        now: int,
        guard_staff: bool = False,
    ) -> SendOutcome:
        """Sent in a batch with whatever else is waiting: one round trip per batch."""
        if self._pool is None:
            raise Unavailable("storage is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[SendOutcome] = loop.create_future()
        self._sends.append(
            _Send(
                conversation,
                sender_id,
                staff,
                content,
                content_type,
                client_msg_id,
                now,
                guard_staff,
                fut,
            )
        )
        if self._sender is None:
            self._sender = loop.create_task(self._send_loop())
        return await fut

    async def _send_loop(self) -> None:
        """Batches go out one at a time; what arrives meanwhile forms the next batch."""
        try:
            while self._sends:
                batch = self._sends[:MAX_SEND_BATCH]
                del self._sends[: len(batch)]
                try:
                    outcomes = await self._send_batch(batch)
                except AppError as exc:
                    if len(batch) == 1 or not isinstance(exc, Internal):
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

    async def _send_batch(self, batch: list[_Send]) -> list[SendOutcome | AppError]:
        hooks = self._hooks

        async def run(conn: asyncpg.Connection) -> list[SendOutcome | AppError]:
            rows = await conn.fetch(
                "SELECT message_id, created, refused, participants FROM appchat_send_batch("
                "$1, $2, $3, $4, $5, $6, $7, $8, $9)",
                [j.conversation.id for j in batch],
                [j.sender_id for j in batch],
                [j.staff for j in batch],
                [j.content for j in batch],
                [j.content_type for j in batch],
                [j.client_msg_id for j in batch],
                [j.now for j in batch],
                [j.guard_staff for j in batch],
                hooks or None,
            )
            retried = [r["message_id"] for r in rows if not r["created"] and not r["refused"]]
            firsts = {}
            if retried:
                found = await conn.fetch(SELECT_MESSAGES + "WHERE m.id = ANY($1)", retried)
                firsts = {r[0]: message_of(r) for r in found}
            outcomes: list[SendOutcome | AppError] = []
            for job, row in zip(batch, rows, strict=True):
                if row["refused"]:
                    outcomes.append(Forbidden("you may not act as this participant"))
                elif not row["created"]:  # a retry: answered with the first, not pushed again
                    outcomes.append(SendOutcome(firsts[row["message_id"]], False, []))
                else:
                    message = new_message(
                        row["message_id"],
                        job.conversation,
                        sender_id=job.sender_id,
                        content=job.content,
                        content_type=job.content_type,
                        client_msg_id=job.client_msg_id,
                        now=job.now,
                    )
                    outcomes.append(SendOutcome(message, True, list(row["participants"])))
            return outcomes

        outcomes = await self._run(run, tx=False)
        if any(isinstance(o, SendOutcome) and o.created for o in outcomes):
            self._woken(hooks)
        return outcomes

    async def read_messages(
        self, conversation: Conversation, *, reader_id: int, staff: bool, message_id: int, now: int
    ) -> ReadOutcome:
        hooks = self._hooks

        async def run(conn: asyncpg.Connection) -> ReadOutcome:
            found = await conn.fetchval(
                "SELECT 1 FROM messages WHERE id = $1 AND conversation_id = $2",
                message_id,
                conversation.id,
            )
            if not found:
                raise NotFound(f"message {message_id} is not in this conversation")
            await _join(conn, conversation.id, reader_id, staff, now)
            position = await conn.fetchval(
                "SELECT read_position FROM participants "
                "WHERE conversation_id = $1 AND user_id = $2 FOR UPDATE",
                conversation.id,
                reader_id,
            )
            if message_id <= position:
                return ReadOutcome(False, [])  # nothing moved: nothing is pushed
            # Ids below message_id are all committed (see the module's docstring): the
            # counts are final.
            await conn.execute(
                "UPDATE participants p SET read_position = $3, read_count = read_count + r.n, "
                "own_unread = own_unread - r.own FROM (SELECT count(*) AS n, "
                "count(*) FILTER (WHERE sender_id = $2) AS own FROM messages "
                "WHERE conversation_id = $1 AND id > $4 AND id <= $3) r "
                "WHERE p.conversation_id = $1 AND p.user_id = $2",
                conversation.id,
                reader_id,
                message_id,
                position,
            )
            # Messages up to the old position were marked when it was reached.
            await conn.execute(
                "UPDATE messages SET status = 1, update_at = $5 WHERE conversation_id = $1 "
                "AND id > $2 AND id <= $3 AND sender_id <> $4 AND status = 0",
                conversation.id,
                position,
                message_id,
                reader_id,
                now,
            )
            if hooks:
                app = conversation.application_id
                await _record(conn, read_rows(hooks, app, reader_id, message_id, now))
            return ReadOutcome(True, await _participants(conn, conversation.id))

        outcome = await self._run(run, tx=True)
        if outcome.moved:
            self._woken(hooks)
        return outcome

    async def unread_counts(
        self, user_id: int, *, application_id: int | None = None
    ) -> list[UnreadCount]:
        async def run(conn: asyncpg.Connection) -> list[UnreadCount]:
            rows = await conn.fetch(
                "SELECT c.application_id, c.message_count - p.read_count - p.own_unread "
                "FROM participants p "
                "JOIN conversations c ON c.id = p.conversation_id WHERE p.user_id = $1 "
                "AND ($2::bigint IS NULL OR c.application_id = $2) "
                "ORDER BY c.update_at DESC, c.id DESC",
                user_id,
                application_id,
            )
            return [UnreadCount(r[0], r[1]) for r in rows]

        return await self._run(run, tx=False)

    async def participant_ids(self, conversation_id: int) -> list[int]:
        async def run(conn: asyncpg.Connection) -> list[int]:
            return await _participants(conn, conversation_id)

        return await self._run(run, tx=False)

    # --- the webhook outbox -------------------------------------------------------------------

    def record_webhooks(self, urls: Sequence[str], wake: Callable[[], None]) -> None:
        self._hooks = tuple(urls)
        self._wake = wake

    def _woken(self, hooks: tuple[str, ...]) -> None:
        """After a commit that wrote outbox rows (for ``hooks``, the URLs it was made with)."""
        if hooks and self._wake is not None:
            self._wake()

    async def claim_webhooks(
        self, url: str, *, now: int, lease_until: int, limit: int
    ) -> list[WebhookEvent]:
        # SKIP LOCKED: a node claiming at the same moment passes over these rows and takes
        # others; once committed, their next_attempt (the lease) keeps them from being due.
        async def run(conn: asyncpg.Connection) -> list[WebhookEvent]:
            rows = await conn.fetch(
                "UPDATE webhook_outbox SET next_attempt = $1 WHERE id IN (SELECT id FROM "
                "webhook_outbox WHERE url = $2 AND next_attempt <= $3 ORDER BY next_attempt, id "
                f"LIMIT $4 FOR UPDATE SKIP LOCKED) RETURNING {OUTBOX_COLUMNS}",
                lease_until,
                url,
                now,
                limit,
            )
            events = [webhook_event_of(tuple(r), lease_until) for r in rows]
            return sorted(events, key=lambda e: e.row)

        return await self._run(run, tx=False)

    async def settle_webhooks(
        self, delivered: Sequence[int], failed: Sequence[WebhookFailure]
    ) -> None:
        async def run(conn: asyncpg.Connection) -> None:
            if delivered:
                await conn.execute(
                    "DELETE FROM webhook_outbox WHERE id = ANY($1::bigint[])", list(delivered)
                )
            if failed:
                await conn.executemany(
                    "UPDATE webhook_outbox SET attempts = $1, next_attempt = $2, last_error = $3 "
                    "WHERE id = $4 AND next_attempt = $5",
                    [(f.attempts, f.next_attempt, f.error, f.row, f.lease) for f in failed],
                )

        await self._run(run, tx=True)

    async def webhook_backlog(self, url: str) -> WebhookBacklog:
        async def run(conn: asyncpg.Connection) -> WebhookBacklog:
            row = await conn.fetchrow(
                "SELECT count(next_attempt), count(*) - count(next_attempt), min(next_attempt) "
                "FROM webhook_outbox WHERE url = $1",
                url,
            )
            return WebhookBacklog(row[0], row[1], row[2])

        return await self._run(run, tx=False)


async def _record(
    conn: asyncpg.Connection, rows: list[tuple[str, str, str, int, str, int]]
) -> None:
    await conn.executemany(
        "INSERT INTO webhook_outbox (event_id, url, type, occurred_at, data, next_attempt) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        rows,
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset when a connection returns to the pool: appchat changes no session
    state (every transaction is closed by its context manager), so this saves asyncpg's
    reset query, a round trip per use."""


@dataclass(frozen=True, slots=True)
class _Send:
    """One SendMessage waiting for its batch."""

    conversation: Conversation
    sender_id: int
    staff: bool
    content: str
    content_type: int
    client_msg_id: str | None
    now: int
    guard_staff: bool
    future: asyncio.Future[SendOutcome]


def _settle(fut: asyncio.Future[SendOutcome], outcome: SendOutcome | AppError) -> None:
    if fut.done():
        return
    if isinstance(outcome, AppError):
        fut.set_exception(outcome)
    else:
        fut.set_result(outcome)


async def _join(
    conn: asyncpg.Connection, conversation_id: int, user_id: int, staff: bool, now: int
) -> None:
    await conn.execute(
        "INSERT INTO participants (conversation_id, user_id, is_staff, read_position, joined_at) "
        "VALUES ($1, $2, $3, 0, $4) ON CONFLICT (conversation_id, user_id) "
        "DO UPDATE SET is_staff = TRUE WHERE EXCLUDED.is_staff AND NOT participants.is_staff",
        conversation_id,
        user_id,
        staff,
        now,
    )


async def _participants(conn: asyncpg.Connection, conversation_id: int) -> list[int]:
    rows = await conn.fetch(
        "SELECT user_id FROM participants WHERE conversation_id = $1", conversation_id
    )
    return [r[0] for r in rows]
