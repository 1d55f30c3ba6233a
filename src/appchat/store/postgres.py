"""PostgreSQL storage on an asyncpg pool.

Gap-free history: a new message first locks its conversation's row (the ``UPDATE`` of
``update_at``), and only then draws its id from the sequence. Two nodes writing to one
conversation therefore take turns, and a message id is drawn only after every smaller id
of that conversation committed: a reader resuming with ``after_id`` never skips one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from ..errors import AppError, Forbidden, Internal, NotFound, Unavailable
from ..models import (
    ActivityKey,
    Conversation,
    ConversationPage,
    Message,
    MessagePage,
    ReadOutcome,
    SendOutcome,
    UnreadCount,
    UnreadPage,
)
from ..ratelog import RateLimitedLog
from .migrate import apply_postgres_migrations
from .rows import (
    CONVERSATION_COLUMNS,
    NEWEST,
    SELECT_ALL_CONVERSATIONS,
    SELECT_MESSAGES,
    UNREAD_PAGE_COLUMNS,
    UNREAD_TOTAL,
    activity_query,
    conversation_of,
    conversation_page_of,
    message_of,
    page_of,
    unread_page_of,
)

log = logging.getLogger(__name__)
_outage_log = RateLimitedLog(log)  # an outage fails every request: log a few

T = TypeVar("T")

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
        async def run(conn: asyncpg.Connection) -> Conversation:
            await conn.execute(
                "INSERT INTO conversations (application_id, create_at, update_at) "
                "VALUES ($1, $2, $2) ON CONFLICT (application_id) DO NOTHING",
                application_id,
                now,
            )
            row = await conn.fetchrow(
                f"SELECT {CONVERSATION_COLUMNS} FROM conversations c WHERE c.application_id = $1",
                application_id,
            )
            conversation = conversation_of(row)
            await _join(conn, conversation.id, user_id, staff, now)
            return conversation

        return await self._run(run, tx=True)

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
        async def run(conn: asyncpg.Connection) -> SendOutcome:
            # The row lock that orders this conversation's ids: taken before nextval.
            await conn.execute(
                "UPDATE conversations SET update_at = GREATEST(update_at, $2), "
                "message_count = message_count + 1 WHERE id = $1",
                conversation.id,
                now,
            )
            if guard_staff and await conn.fetchval(
                "SELECT is_staff FROM participants WHERE conversation_id = $1 AND user_id = $2",
                conversation.id,
                sender_id,
            ):
                raise Forbidden("you may not act as this participant")
            if client_msg_id is not None:
                row = await conn.fetchrow(
                    SELECT_MESSAGES + "WHERE m.conversation_id = $1 "
                    "AND m.sender_id = $2 AND m.client_msg_id = $3",
                    conversation.id,
                    sender_id,
                    client_msg_id,
                )
                if row:
                    # A retry: raise to undo the update_at bump, answer with the first one.
                    raise _Duplicate(message_of(row))
            # One round trip: store the message, make the sender a participant, and list
            # the participants (the sender among them: the CTE's insert is not visible).
            message_id, participants = await conn.fetchrow(
                "WITH m AS (INSERT INTO messages (conversation_id, sender_id, content, "
                "content_type, status, client_msg_id, create_at, update_at) "
                "VALUES ($1, $2, $3, $4, 0, $5, $6, $6) RETURNING id), "
                "j AS (INSERT INTO participants (conversation_id, user_id, is_staff, "
                "read_position, joined_at, own_unread) VALUES ($1, $2, $7, 0, $6, 1) "
                "ON CONFLICT (conversation_id, user_id) DO UPDATE SET "
                "is_staff = participants.is_staff OR EXCLUDED.is_staff, "
                "own_unread = participants.own_unread + 1) "
                "SELECT (SELECT id FROM m), ARRAY(SELECT user_id FROM participants "
                "WHERE conversation_id = $1 UNION SELECT $2::bigint)",
                conversation.id,
                sender_id,
                content,
                content_type,
                client_msg_id,
                now,
                staff,
            )
            message = Message(
                id=message_id,
                application_id=conversation.application_id,
                sender_id=sender_id,
                content=content,
                content_type=content_type,
                status=0,
                create_at=now,
                update_at=now,
                client_msg_id=client_msg_id,
            )
            return SendOutcome(message, True, list(participants))

        try:
            return await self._run(run, tx=True)
        except _Duplicate as dup:
            return SendOutcome(dup.found, False, [])  # nothing is pushed again

    async def read_messages(
        self, conversation: Conversation, *, reader_id: int, staff: bool, message_id: int, now: int
    ) -> ReadOutcome:
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
            return ReadOutcome(True, await _participants(conn, conversation.id))

        return await self._run(run, tx=True)

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


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset when a connection returns to the pool: appchat changes no session
    state (every transaction is closed by its context manager), so this saves asyncpg's
    reset query, a round trip per use."""


class _Duplicate(AppError):
    """Internal signal: a ``client_msg_id`` retry (never reaches a client)."""

    def __init__(self, message: Message) -> None:
        super().__init__("duplicate")
        self.found = message


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
