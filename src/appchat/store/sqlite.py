"""SQLite storage: WAL, one writer thread with group commit, a few reader threads.

The event loop never touches the database: a write is a function run on the writer
thread, and all the writes waiting share one transaction and one commit (one fsync); the
event loop is woken once per batch to settle them. A write refused by a rule raises before
it changes anything, so it leaves the batch intact; any other failure rolls the batch back
and runs its writes again one transaction each, so only the faulty one fails.

The writer remembers what only grows (who takes part in a conversation, who is staff
there) to skip statements; it forgets everything when another connection (another
process on the same file) has written, which ``PRAGMA data_version`` tells.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any, TypeVar

from .. import defaults
from ..errors import AppError, ConfigError, Forbidden, Internal, NotFound, Unavailable
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
    WebhookBacklog,
    WebhookEvent,
    WebhookFailure,
)
from ..ratelog import RateLimitedLog
from .migrate import apply_sqlite_migrations
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
    message_rows,
    new_message,
    page_of,
    read_rows,
    unread_page_of,
    webhook_event_of,
)
from .writelock import WriterLock

log = logging.getLogger(__name__)
_failure_log = RateLimitedLog(log)  # a failing disk fails every batch: log a few

T = TypeVar("T")
Job = tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any], asyncio.AbstractEventLoop]

MAX_BATCH = 1024
READERS = 2
MAX_CACHED_CONVERSATIONS = 50_000


class SqliteStore:
    def __init__(
        self,
        path: str,
        *,
        synchronous: str = defaults.SQLITE_SYNCHRONOUS,
        busy_timeout: float = defaults.SQLITE_BUSY_TIMEOUT,
        readers: int = READERS,
        migrate: bool = True,
        shared: bool = False,
    ) -> None:
        """``shared``: other processes write this file too (``serve --workers``)."""
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ConfigError("sqlite synchronous must be FULL, NORMAL or EXTRA")
        self.path = path
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous
        self._readers_count = readers
        self._migrate = migrate
        self._shared = shared and path != ":memory:"
        self._turn: WriterLock | None = None
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._members = _Members()  # the writer thread's memory of participants
        self._open_error: BaseException | None = None
        self._outbox: _Outbox | None = None  # webhooks configured: events are recorded

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        if self._migrate:
            await asyncio.to_thread(apply_sqlite_migrations, self.path)
        if self._shared:
            try:
                self._turn = WriterLock(self.path)
            except OSError as exc:
                raise ConfigError(f"cannot open {self.path}-writer.lock: {exc}") from exc
        ready = threading.Event()
        self._writer = threading.Thread(
            target=self._write_loop, args=(ready,), name="appchat-sqlite-writer", daemon=True
        )
        self._writer.start()
        await asyncio.to_thread(ready.wait)
        if self._open_error is not None:
            error, self._open_error = self._open_error, None
            self._writer = None
            raise Unavailable(f"cannot open {self.path}: {error}") from error
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
        # Switching a file to WAL takes it exclusively; workers opening one file at once
        # can find it busy, which the busy timeout does not always cover: try again.
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    conn.close()
                    raise
                time.sleep(0.05)
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    # --- running work off the event loop ------------------------------------------------------

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` on the writer thread, inside a shared transaction.

        ``fn`` may raise an ``AppError`` only before it has written anything: the batch
        it shares is committed anyway. Any other exception undoes the batch and isolates it.
        """
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
        try:
            conn = self._connect()
        except Exception as exc:  # open() reports it; without this it would wait forever
            self._open_error = exc
            ready.set()
            return
        turn = self._turn
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
                with turn or nullcontext():
                    outcomes = self._commit_batch(conn, batch)
                _settle_batch(batch, outcomes, self._outbox_written())
                if stop:
                    return
        finally:
            conn.close()
            if turn is not None:
                turn.close()
                self._turn = None

    def _outbox_written(self) -> Callable[[], None] | None:
        """The webhooks' wake-up when the batch just done wrote outbox rows."""
        outbox = self._outbox
        if outbox is None or not outbox.written:
            return None
        outbox.written = False
        return outbox.wake

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[Job]) -> list[tuple[bool, Any]]:
        in_job = False
        try:
            (version,) = conn.execute("PRAGMA data_version").fetchone()
            self._members.check(version)
            conn.execute("BEGIN IMMEDIATE")
            outcomes: list[tuple[bool, Any]] = []
            sends: list[_SendMessage] = []
            for fn, args, _fut, _loop in batch:
                in_job = True
                if isinstance(fn, _SendMessage):
                    sends.append(fn)
                    continue
                if sends:
                    outcomes += _send_many(conn, sends, self._members)
                    sends = []
                try:
                    outcomes.append((True, fn(conn, *args)))
                except AppError as exc:  # a rule said no before anything was written
                    outcomes.append((False, exc))
                in_job = False
            if sends:
                outcomes += _send_many(conn, sends, self._members)
            in_job = False
            conn.execute("COMMIT")
            return outcomes
        except Exception as exc:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._members.forget()
            if len(batch) == 1 or not in_job:
                if isinstance(exc, sqlite3.Error):
                    _failure_log.warning("write batch failed", "sqlite write batch failed: %s", exc)
                else:
                    log.exception("sqlite write failed")
                return [(False, _translate(exc))] * len(batch)
        # One write failed: run each in a transaction of its own, so only that one fails.
        return [self._commit_batch(conn, [job])[0] for job in batch]

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
        members, outbox = self._members, self._outbox

        def run(conn: sqlite3.Connection) -> Conversation:
            created = conn.execute(
                "INSERT INTO conversations (application_id, create_at, update_at) VALUES (?, ?, ?) "
                "ON CONFLICT (application_id) DO NOTHING",
                (application_id, now, now),
            ).rowcount
            row = conn.execute(
                f"SELECT {CONVERSATION_COLUMNS} FROM conversations c WHERE c.application_id = ?",
                (application_id,),
            ).fetchone()
            conversation = conversation_of(row)
            members.join(conn, conversation.id, user_id, staff, now)
            if created and outbox is not None:
                outbox.add(conn, conversation_rows(outbox.urls, conversation))
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
            numbered=False,
        )

        def run(conn: sqlite3.Connection) -> ConversationPage:
            return conversation_page_of(conn.execute(sql, params).fetchall(), limit)

        return await self._read(run)

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
                numbered=False,
            )

        def run(conn: sqlite3.Connection) -> UnreadPage:
            rows = conn.execute(*query(UNREAD_PAGE_COLUMNS, after, limit)).fetchall()
            total = None
            if after is not None or len(rows) > limit:
                total = conn.execute(*query(UNREAD_TOTAL, None, None)).fetchone()[0]
            return unread_page_of(rows, limit, total)

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
        guard_staff: bool = False,
    ) -> SendOutcome:
        send = _SendMessage(
            self._members,
            self._outbox,
            conversation,
            sender_id,
            staff,
            content,
            content_type,
            client_msg_id,
            now,
            guard_staff,
        )
        return await self._write(send)

    async def read_messages(
        self, conversation: Conversation, *, reader_id: int, staff: bool, message_id: int, now: int
    ) -> ReadOutcome:
        members, outbox = self._members, self._outbox

        def run(conn: sqlite3.Connection) -> ReadOutcome:
            found = conn.execute(
                "SELECT 1 FROM messages WHERE id = ? AND conversation_id = ?",
                (message_id, conversation.id),
            ).fetchone()
            if not found:
                raise NotFound(f"message {message_id} is not in this conversation")
            members.join(conn, conversation.id, reader_id, staff, now)
            (position,) = conn.execute(
                "SELECT read_position FROM participants WHERE conversation_id = ? AND user_id = ?",
                (conversation.id, reader_id),
            ).fetchone()
            if message_id <= position:
                return ReadOutcome(False, [])  # nothing moved: nothing is pushed
            read, own = conn.execute(
                "SELECT count(*), coalesce(sum(sender_id = ?), 0) FROM messages "
                "WHERE conversation_id = ? AND id > ? AND id <= ?",
                (reader_id, conversation.id, position, message_id),
            ).fetchone()
            conn.execute(
                "UPDATE participants SET read_position = ?, read_count = read_count + ?, "
                "own_unread = own_unread - ? WHERE conversation_id = ? AND user_id = ?",
                (message_id, read, own, conversation.id, reader_id),
            )
            # Messages up to the old position were marked when it was reached.
            conn.execute(
                "UPDATE messages SET status = 1, update_at = ? WHERE conversation_id = ? "
                "AND id > ? AND id <= ? AND sender_id != ? AND status = 0",
                (now, conversation.id, position, message_id, reader_id),
            )
            if outbox is not None:
                rows = read_rows(
                    outbox.urls, conversation.application_id, reader_id, message_id, now
                )
                outbox.add(conn, rows)
            return ReadOutcome(True, members.of(conn, conversation.id))

        return await self._write(run)

    async def unread_counts(
        self, user_id: int, *, application_id: int | None = None
    ) -> list[UnreadCount]:
        def run(conn: sqlite3.Connection) -> list[UnreadCount]:
            sql = (
                "SELECT c.application_id, c.message_count - p.read_count - p.own_unread "
                "FROM participants p JOIN conversations c ON c.id = p.conversation_id "
                "WHERE p.user_id = ?"
            )
            params: tuple[int, ...] = (user_id,)
            if application_id is not None:
                sql += " AND c.application_id = ?"
                params += (application_id,)
            sql += " ORDER BY c.update_at DESC, c.id DESC"
            return [UnreadCount(a, n) for a, n in conn.execute(sql, params)]

        return await self._read(run)

    async def participant_ids(self, conversation_id: int) -> list[int]:
        def run(conn: sqlite3.Connection) -> list[int]:
            rows = conn.execute(
                "SELECT user_id FROM participants WHERE conversation_id = ?", (conversation_id,)
            )
            return [r[0] for r in rows]

        return await self._read(run)

    # --- the webhook outbox -------------------------------------------------------------------

    def record_webhooks(self, urls: Sequence[str], wake: Callable[[], None]) -> None:
        self._outbox = _Outbox(tuple(urls), wake) if urls else None

    async def claim_webhooks(
        self, url: str, *, now: int, lease_until: int, limit: int
    ) -> list[WebhookEvent]:
        # Through the writer: claims of other workers on this file take turns with it.
        def run(conn: sqlite3.Connection) -> list[WebhookEvent]:
            rows = conn.execute(
                "UPDATE webhook_outbox SET next_attempt = ? WHERE id IN (SELECT id FROM "
                "webhook_outbox WHERE url = ? AND next_attempt <= ? ORDER BY next_attempt, id "
                f"LIMIT ?) RETURNING {OUTBOX_COLUMNS}",
                (lease_until, url, now, limit),
            ).fetchall()
            return sorted((webhook_event_of(r, lease_until) for r in rows), key=_by_row)

        return await self._write(run)

    async def settle_webhooks(
        self, delivered: Sequence[int], failed: Sequence[WebhookFailure]
    ) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM webhook_outbox WHERE id = ?", [(r,) for r in delivered])
            conn.executemany(
                "UPDATE webhook_outbox SET attempts = ?, next_attempt = ?, last_error = ? "
                "WHERE id = ? AND next_attempt = ?",
                [(f.attempts, f.next_attempt, f.error, f.row, f.lease) for f in failed],
            )

        await self._write(run)

    async def webhook_backlog(self, url: str) -> WebhookBacklog:
        def run(conn: sqlite3.Connection) -> WebhookBacklog:
            row = conn.execute(BACKLOG, (url,)).fetchone()
            return WebhookBacklog(*row)

        return await self._read(run)


BACKLOG = (
    "SELECT count(next_attempt), count(*) - count(next_attempt), min(next_attempt) "
    "FROM webhook_outbox WHERE url = ?"
)


def _by_row(event: WebhookEvent) -> int:
    return event.row


class _Outbox:
    """Webhooks are configured: the writer records each change's events (one row per URL)."""

    __slots__ = ("urls", "wake", "written")

    def __init__(self, urls: tuple[str, ...], wake: Callable[[], None]) -> None:
        self.urls = urls
        self.wake = wake
        self.written = False  # since the last commit (read and reset by the writer)

    def add(
        self, conn: sqlite3.Connection, rows: list[tuple[str, str, str, int, str, int]]
    ) -> None:
        conn.executemany(
            "INSERT INTO webhook_outbox (event_id, url, type, occurred_at, data, next_attempt) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        self.written = True


class _SendMessage:
    """A SendMessage for the writer: alone (``__call__``) or with others (``_send_many``)."""

    __slots__ = (
        "client_msg_id",
        "content",
        "content_type",
        "conversation",
        "guard_staff",
        "members",
        "now",
        "outbox",
        "sender_id",
        "staff",
    )

    def __init__(
        self,
        members: _Members,
        outbox: _Outbox | None,
        conversation: Conversation,
        sender_id: int,
        staff: bool,
        content: str,
        content_type: int,
        client_msg_id: str | None,
        now: int,
        guard_staff: bool,
    ) -> None:
        self.members = members
        self.outbox = outbox
        self.conversation = conversation
        self.sender_id = sender_id
        self.staff = staff
        self.content = content
        self.content_type = content_type
        self.client_msg_id = client_msg_id
        self.now = now
        self.guard_staff = guard_staff

    def refused(self, conn: sqlite3.Connection) -> bool:
        """A customer acting as a staff participant (decided before anything is written)."""
        return self.guard_staff and self.members.is_staff(
            conn, self.conversation.id, self.sender_id
        )

    def message(self, message_id: int) -> Message:
        return new_message(
            message_id,
            self.conversation,
            sender_id=self.sender_id,
            content=self.content,
            content_type=self.content_type,
            client_msg_id=self.client_msg_id,
            now=self.now,
        )

    def __call__(self, conn: sqlite3.Connection) -> SendOutcome:
        members, conversation = self.members, self.conversation
        if self.refused(conn):
            raise Forbidden("you may not act as this participant")
        members.next_id = None  # this insert draws an id of its own
        row = conn.execute(
            "INSERT INTO messages (conversation_id, sender_id, content, content_type, status, "
            "client_msg_id, create_at, update_at) VALUES (?, ?, ?, ?, 0, ?, ?, ?) "
            "ON CONFLICT DO NOTHING RETURNING id",
            (
                conversation.id,
                self.sender_id,
                self.content,
                self.content_type,
                self.client_msg_id,
                self.now,
                self.now,
            ),
        ).fetchone()
        if row is None:  # a retry with the same client_msg_id: answer with the first
            found = conn.execute(
                SELECT_MESSAGES + "WHERE m.conversation_id = ? AND m.sender_id = ? "
                "AND m.client_msg_id = ?",
                (conversation.id, self.sender_id, self.client_msg_id),
            ).fetchone()
            return SendOutcome(message_of(found), False, [])  # nothing is pushed again
        members.join(conn, conversation.id, self.sender_id, self.staff, self.now, sent=True)
        conn.execute(
            "UPDATE conversations SET update_at = max(update_at, ?), "
            "message_count = message_count + 1 WHERE id = ?",
            (self.now, conversation.id),
        )
        message = self.message(row[0])
        if self.outbox is not None:
            self.outbox.add(conn, message_rows(self.outbox.urls, message))
        return SendOutcome(message, True, members.of(conn, conversation.id))


def _send_many(
    conn: sqlite3.Connection, sends: list[_SendMessage], members: _Members
) -> list[tuple[bool, Any]]:
    """Several SendMessages with one statement per table (``executemany``).

    The writer is the only one writing (other processes take turns and make the writer
    forget), so it numbers the messages itself. A retry (a ``client_msg_id`` seen before)
    or any surprise undoes this and sends them one by one.
    """
    refused = [send.refused(conn) for send in sends]
    if members.next_id is None:
        (members.next_id,) = conn.execute(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0),"
            " coalesce((SELECT max(id) FROM messages), 0)) + 1"
        ).fetchone()
    first = next_id = members.next_id
    rows = []
    for send, no in zip(sends, refused, strict=True):
        if not no:
            rows.append(
                (
                    next_id,
                    send.conversation.id,
                    send.sender_id,
                    send.content,
                    send.content_type,
                    send.client_msg_id,
                    send.now,
                    send.now,
                )
            )
            next_id += 1
    conn.execute("SAVEPOINT sends")
    try:
        conn.executemany(
            "INSERT INTO messages (id, conversation_id, sender_id, content, content_type, "
            "status, client_msg_id, create_at, update_at) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)",
            rows,
        )
    except sqlite3.IntegrityError:  # a retry among them: the careful way
        conn.execute("ROLLBACK TO sends")
        conn.execute("RELEASE sends")
        members.next_id = None
        outcomes: list[tuple[bool, Any]] = []
        for send in sends:
            try:
                outcomes.append((True, send(conn)))
            except AppError as exc:
                outcomes.append((False, exc))
        return outcomes
    conn.execute("RELEASE sends")
    members.next_id = next_id
    conversations: dict[int, list[int]] = {}  # id -> [newest time, messages]
    senders: dict[tuple[int, int], int] = {}
    for send, no in zip(sends, refused, strict=True):
        if no:
            continue
        seen = conversations.setdefault(send.conversation.id, [send.now, 0])
        seen[0] = max(seen[0], send.now)
        seen[1] += 1
        key = (send.conversation.id, send.sender_id)
        if key in senders or not members.needs_join(key[0], key[1], send.staff):
            senders[key] = senders.get(key, 0) + 1
        else:  # a newcomer (or newly staff): joins on its own, its first message counted
            members.join(conn, key[0], key[1], send.staff, send.now, sent=True)
            senders[key] = 0
    conn.executemany(
        "UPDATE participants SET own_unread = own_unread + ? "
        "WHERE conversation_id = ? AND user_id = ?",
        [(n, c, u) for (c, u), n in senders.items() if n],
    )
    conn.executemany(
        "UPDATE conversations SET update_at = max(update_at, ?), "
        "message_count = message_count + ? WHERE id = ?",
        [(newest, n, c) for c, (newest, n) in conversations.items()],
    )
    out: list[tuple[bool, Any]] = []
    outbox = sends[0].outbox
    hooks: list[tuple[str, str, str, int, str, int]] = []
    message_id = first
    for send, no in zip(sends, refused, strict=True):
        if no:
            out.append((False, Forbidden("you may not act as this participant")))
            continue
        participants = members.of(conn, send.conversation.id)
        message = send.message(message_id)
        if outbox is not None:
            hooks += message_rows(outbox.urls, message)
        out.append((True, SendOutcome(message, True, participants)))
        message_id += 1
    if outbox is not None and hooks:
        outbox.add(conn, hooks)
    return out


class _Members:
    """The writer thread's memory of conversations' participants and their staff flags.

    Both only grow: a participant never leaves and staff never becomes a customer, so what
    is remembered stays true until another connection writes (``check``) or a batch is
    rolled back (``forget``).
    """

    def __init__(self) -> None:
        self._version: int | None = None
        self._by_conversation: dict[int, dict[int, bool]] = {}  # user -> is_staff
        self.next_id: int | None = None  # the id the next message gets, when known

    def check(self, data_version: int) -> None:
        if data_version != self._version:
            self.forget()
            self._version = data_version

    def forget(self) -> None:
        self._by_conversation.clear()
        self.next_id = None

    def needs_join(self, conversation_id: int, user_id: int, staff: bool) -> bool:
        """Whether ``user_id`` is not yet known as a participant (or not yet as staff)."""
        known = self._by_conversation.get(conversation_id)
        current = None if known is None else known.get(user_id)
        return current is None or (staff and not current)

    def _load(self, conn: sqlite3.Connection, conversation_id: int) -> dict[int, bool]:
        known = self._by_conversation.get(conversation_id)
        if known is None:
            if len(self._by_conversation) >= MAX_CACHED_CONVERSATIONS:
                self._by_conversation.clear()
            rows = conn.execute(
                "SELECT user_id, is_staff FROM participants WHERE conversation_id = ?",
                (conversation_id,),
            )
            known = self._by_conversation[conversation_id] = {u: bool(s) for u, s in rows}
        return known

    def is_staff(self, conn: sqlite3.Connection, conversation_id: int, user_id: int) -> bool:
        return self._load(conn, conversation_id).get(user_id, False)

    def of(self, conn: sqlite3.Connection, conversation_id: int) -> list[int]:
        return list(self._load(conn, conversation_id))

    def join(
        self,
        conn: sqlite3.Connection,
        conversation_id: int,
        user_id: int,
        staff: bool,
        now: int,
        *,
        sent: bool = False,
    ) -> None:
        """Make ``user_id`` a participant (staff if ``staff``); ``sent``: they just sent a
        message, which is unread-by-others and their own past their read position."""
        known = self._load(conn, conversation_id)
        if not self.needs_join(conversation_id, user_id, staff):
            if sent:
                conn.execute(
                    "UPDATE participants SET own_unread = own_unread + 1 "
                    "WHERE conversation_id = ? AND user_id = ?",
                    (conversation_id, user_id),
                )
            return
        conn.execute(
            "INSERT INTO participants (conversation_id, user_id, is_staff, read_position, "
            "joined_at, own_unread) VALUES (?, ?, ?, 0, ?, ?) "
            "ON CONFLICT (conversation_id, user_id) DO UPDATE SET "
            "is_staff = max(is_staff, excluded.is_staff), "
            "own_unread = own_unread + excluded.own_unread",
            (conversation_id, user_id, int(staff), now, int(sent)),
        )
        known[user_id] = known.get(user_id, False) or staff


def _translate(exc: BaseException) -> AppError:
    if isinstance(exc, AppError):
        return exc
    if isinstance(exc, sqlite3.OperationalError):
        return Unavailable("storage is busy or unreachable, try again")
    return Internal()


def _settle_batch(
    batch: list[Job], outcomes: list[tuple[bool, Any]], wake: Callable[[], None] | None
) -> None:
    """Wake each event loop once for the whole batch (in practice there is one loop);
    ``wake``: the webhooks' wake-up, called on the first loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
    for (_fn, _args, fut, loop), (ok, value) in zip(batch, outcomes, strict=True):
        by_loop.setdefault(loop, []).append((fut, ok, value))
    for loop, settled in by_loop.items():
        with suppress(RuntimeError):  # that loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_settle_all, settled, wake)
        wake = None


def _settle_all(
    settled: list[tuple[asyncio.Future[Any], bool, Any]], wake: Callable[[], None] | None
) -> None:
    if wake is not None:
        wake()
    for fut, ok, value in settled:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
