"""SQLite storage: WAL, one writer thread with group commit, a few reader threads.

The event loop never touches the database: a write is a function run inside one
transaction on the writer thread, and several waiting writes share one commit (one fsync),
each in its own savepoint so one failing write does not undo the others.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

from ..errors import AppError, ConfigError, Internal, NotFound, Unavailable
from ..models import (
    Conversation,
    Message,
    MessagePage,
    ReadOutcome,
    SendOutcome,
    UnreadCount,
)
from .migrate import apply_sqlite_migrations
from .rows import (
    CONVERSATION_COLUMNS,
    NEWEST,
    SELECT_ALL_CONVERSATIONS,
    SELECT_MESSAGES,
    conversation_of,
    message_of,
    page_of,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Job = tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any], asyncio.AbstractEventLoop]

MAX_BATCH = 256
READERS = 2


class SqliteStore:
    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "FULL",
        busy_timeout: float = 30.0,
        readers: int = READERS,
    ) -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ConfigError("sqlite synchronous must be FULL, NORMAL or EXTRA")
        self.path = path
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous
        self._readers_count = readers
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(apply_sqlite_migrations, self.path)
        ready = threading.Event()
        self._writer = threading.Thread(
            target=self._write_loop, args=(ready,), name="appchat-sqlite-writer", daemon=True
        )
        self._writer.start()
        await asyncio.to_thread(ready.wait)
        self._readers = ThreadPoolExecutor(
            self._readers_count, thread_name_prefix="appchat-sqlite-reader"
        )

    async def close(self) -> None:
        if self._writer is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        if self._readers is not None:
            readers, self._readers = self._readers, None
            await asyncio.to_thread(readers.shutdown, True)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=self._busy_timeout)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    # --- running work off the event loop ------------------------------------------------------

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        if self._writer is None:
            raise Unavailable("storage is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((fn, args, fut, loop))
        return await fut

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        if self._readers is None:
            raise Unavailable("storage is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._run_read, fn, args)

    def _run_read(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        try:
            return fn(conn, *args)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    def _write_loop(self, ready: threading.Event) -> None:
        conn = self._connect()
        ready.set()
        try:
            while True:
                first = self._jobs.get()
                if first is None:
                    return
                batch = [first]
                stop = False
                while len(batch) < MAX_BATCH:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        stop = True
                        break
                    batch.append(job)
                self._commit_batch(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[Job]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, args, _fut, _loop in batch:
                conn.execute("SAVEPOINT job")
                try:
                    outcomes.append((True, fn(conn, *args)))
                    conn.execute("RELEASE job")
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((False, exc))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.warning("sqlite write batch failed: %s", exc)
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            outcomes = [(False, _translate(exc)) for _ in batch]
        for (_fn, _args, fut, loop), (ok, value) in zip(batch, outcomes, strict=True):
            if isinstance(value, sqlite3.Error):
                value = _translate(value)
            loop.call_soon_threadsafe(_settle, fut, ok, value)

    # --- the Store interface ------------------------------------------------------------------

    async def ping(self) -> None:
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    async def get_conversation(self, application_id: int) -> Conversation | None:
        def run(conn: sqlite3.Connection) -> Conversation | None:
            row = conn.execute(
                f"SELECT {CONVERSATION_COLUMNS} FROM conversations c WHERE c.application_id = ?",
                (application_id,),
            ).fetchone()
            return conversation_of(row) if row else None

        return await self._read(run)

    async def is_staff_participant(self, conversation_id: int, user_id: int) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT is_staff FROM participants WHERE conversation_id = ? AND user_id = ?",
                (conversation_id, user_id),
            ).fetchone()
            return bool(row and row[0])

        return await self._read(run)

    async def add_conversation(
        self, application_id: int, user_id: int, *, staff: bool, now: int
    ) -> Conversation:
        def run(conn: sqlite3.Connection) -> Conversation:
            conn.execute(
                "INSERT INTO conversations (application_id, create_at, update_at) VALUES (?, ?, ?) "
                "ON CONFLICT (application_id) DO NOTHING",
                (application_id, now, now),
            )
            row = conn.execute(
                f"SELECT {CONVERSATION_COLUMNS} FROM conversations c WHERE c.application_id = ?",
                (application_id,),
            ).fetchone()
            conversation = conversation_of(row)
            _join(conn, conversation.id, user_id, staff, now)
            return conversation

        return await self._write(run)

    async def list_conversations(
        self, user_id: int, *, application_id: int | None = None
    ) -> list[Conversation]:
        def run(conn: sqlite3.Connection) -> list[Conversation]:
            sql = (
                f"SELECT {CONVERSATION_COLUMNS} FROM participants p JOIN conversations c "
                "ON c.id = p.conversation_id WHERE p.user_id = ?"
            )
            params: tuple[int, ...] = (user_id,)
            if application_id is not None:
                sql += " AND c.application_id = ?"
                params += (application_id,)
            sql += " ORDER BY c.update_at DESC, c.id DESC"
            return [conversation_of(r) for r in conn.execute(sql, params)]

        return await self._read(run)

    async def list_all_conversations(self, *, limit: int) -> list[Conversation]:
        def run(conn: sqlite3.Connection) -> list[Conversation]:
            rows = conn.execute(SELECT_ALL_CONVERSATIONS + "?", (limit,))
            return [conversation_of(r) for r in rows]

        return await self._read(run)

    async def list_messages(
        self,
        conversation: Conversation,
        *,
        before_id: int | None = None,
        after_id: int | None = None,
        limit: int,
    ) -> MessagePage:
        def run(conn: sqlite3.Connection) -> MessagePage:
            base = SELECT_MESSAGES + "WHERE m.conversation_id = ?"
            if after_id is not None:
                rows = conn.execute(
                    base + " AND m.id > ? ORDER BY m.id ASC LIMIT ?",
                    (conversation.id, after_id, limit + 1),
                ).fetchall()
            else:
                cursor = before_id if before_id is not None else NEWEST
                rows = conn.execute(
                    base + " AND m.id < ? ORDER BY m.id DESC LIMIT ?",
                    (conversation.id, cursor, limit + 1),
                ).fetchall()
            return page_of(rows, limit, newest_first=after_id is None)

        return await self._read(run)

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
    ) -> SendOutcome:
        def run(conn: sqlite3.Connection) -> SendOutcome:
            select = SELECT_MESSAGES
            if client_msg_id is not None:
                row = conn.execute(
                    select + "WHERE m.conversation_id = ? AND m.sender_id = ? "
                    "AND m.client_msg_id = ?",
                    (conversation.id, sender_id, client_msg_id),
                ).fetchone()
                if row:
                    return SendOutcome(message_of(row), False, [])  # nothing is pushed again
            (message_id,) = conn.execute(
                "INSERT INTO messages (conversation_id, sender_id, content, content_type, status, "
                "client_msg_id, create_at, update_at) VALUES (?, ?, ?, ?, 0, ?, ?, ?) RETURNING id",
                (conversation.id, sender_id, content, content_type, client_msg_id, now, now),
            ).fetchone()
            _join(conn, conversation.id, sender_id, staff, now)
            conn.execute(
                "UPDATE conversations SET update_at = ? WHERE id = ?", (now, conversation.id)
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
            return SendOutcome(message, True, _participants(conn, conversation.id))

        return await self._write(run)

    async def read_messages(
        self, conversation: Conversation, *, reader_id: int, staff: bool, message_id: int, now: int
    ) -> ReadOutcome:
        def run(conn: sqlite3.Connection) -> ReadOutcome:
            found = conn.execute(
                "SELECT 1 FROM messages WHERE id = ? AND conversation_id = ?",
                (message_id, conversation.id),
            ).fetchone()
            if not found:
                raise NotFound(f"message {message_id} is not in this conversation")
            _join(conn, conversation.id, reader_id, staff, now)
            (position,) = conn.execute(
                "SELECT read_position FROM participants WHERE conversation_id = ? AND user_id = ?",
                (conversation.id, reader_id),
            ).fetchone()
            if message_id <= position:
                return ReadOutcome(False, [])  # nothing moved: nothing is pushed
            conn.execute(
                "UPDATE participants SET read_position = ? "
                "WHERE conversation_id = ? AND user_id = ?",
                (message_id, conversation.id, reader_id),
            )
            # Messages up to the old position were marked when it was reached.
            conn.execute(
                "UPDATE messages SET status = 1, update_at = ? WHERE conversation_id = ? "
                "AND id > ? AND id <= ? AND sender_id != ? AND status = 0",
                (now, conversation.id, position, message_id, reader_id),
            )
            return ReadOutcome(True, _participants(conn, conversation.id))

        return await self._write(run)

    async def unread_counts(
        self, user_id: int, *, application_id: int | None = None
    ) -> list[UnreadCount]:
        def run(conn: sqlite3.Connection) -> list[UnreadCount]:
            sql = (
                "SELECT c.application_id, (SELECT count(*) FROM messages m "
                "WHERE m.conversation_id = p.conversation_id AND m.id > p.read_position "
                "AND m.sender_id != p.user_id) FROM participants p "
                "JOIN conversations c ON c.id = p.conversation_id WHERE p.user_id = ?"
            )
            params: tuple[int, ...] = (user_id,)
            if application_id is not None:
                sql += " AND c.application_id = ?"
                params += (application_id,)
            sql += " ORDER BY c.update_at DESC, c.id DESC"
            return [UnreadCount(a, n) for a, n in conn.execute(sql, params)]

        return await self._read(run)

    async def participant_ids(self, conversation_id: int) -> list[int]:
        return await self._read(_participants, conversation_id)


def _join(
    conn: sqlite3.Connection, conversation_id: int, user_id: int, staff: bool, now: int
) -> None:
    conn.execute(
        "INSERT INTO participants (conversation_id, user_id, is_staff, read_position, joined_at) "
        "VALUES (?, ?, ?, 0, ?) ON CONFLICT (conversation_id, user_id) "
        "DO UPDATE SET is_staff = 1 WHERE excluded.is_staff AND NOT participants.is_staff",
        (conversation_id, user_id, int(staff), now),
    )


def _participants(conn: sqlite3.Connection, conversation_id: int) -> list[int]:
    rows = conn.execute(
        "SELECT user_id FROM participants WHERE conversation_id = ?", (conversation_id,)
    )
    return [r[0] for r in rows]


def _translate(exc: sqlite3.Error) -> AppError:
    if isinstance(exc, sqlite3.OperationalError):
        return Unavailable("storage is busy or unreachable, try again")
    return Internal()


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)
