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
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from ..common.ratelog import RateLimitedLog
from ..protocol import defaults
from ..protocol.errors import (
    AppError,
    ConfigError,
    Forbidden,
    Internal,
    NotFound,
    Unavailable,
)
from ..protocol.models import (
    OPEN,
    REOPENED_BY_CUSTOMER,
    Conversation,
    Message,
    SendOutcome,
)
from .migrate import apply_sqlite_migrations
from .plan import JOIN, RECORD_EVENT, Plan, expand
from .rows import (
    CONVERSATION_COLUMNS,
    SELECT_MESSAGES,
    Send,
    conversation_of,
    conversation_updated_rows,
    message_of,
    message_rows,
    new_message,
)
from .sqlstore import ADD_OWN_UNREAD, PARTICIPANTS_STAFF, SqlStore
from .writelock import WriterLock

log = logging.getLogger(__name__)
_failure_log = RateLimitedLog(log)  # a failing disk fails every batch: log a few

T = TypeVar("T")
Job = tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any], asyncio.AbstractEventLoop]

MAX_BATCH = 1024
READERS = 2
MAX_CACHED_CONVERSATIONS = 50_000
# The search index follows the messages (migration 0010): the writer looks at most this
# often how far behind it is, and indexes once this many wait or the oldest waits
# longer than INDEX_LAG seconds; at most INDEX_MOST in one transaction (a catch-up is
# spread over several, between the sends' batches).
INDEX_LOOK = 0.05
INDEX_RUN = 128
INDEX_LAG = 1.0
INDEX_MOST = 512
# WAL checkpoints (committed pages copied from the WAL into the database file, which is
# then synced) run in a thread of their own instead of inside the commit that crossed
# SQLite's 1,000 pages: that commit took 5-9 ms more and held up every send in its batch
# (the p99 of docs/benchmarks.md). About every CHECKPOINT_PAGES new WAL pages: the wait
# between two adapts to how many the last one found, within CHECKPOINT_WAIT. 8,000
# rather than SQLite's 1,000: the same index pages are rewritten by many commits, so a
# checkpoint copies each once for many commits (a fifth of the checkpoint time at 2,000
# msg/s, bench/hops.py), and a commit less often shares the disk with one; the WAL file
# grows to about 32 MiB. The writer still checkpoints itself past CHECKPOINT_SAFETY pages.
CHECKPOINT_PAGES = 8000
CHECKPOINT_WAIT = (0.05, 2.0)
CHECKPOINT_SAFETY = 20_000


class SqliteStore(SqlStore):
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
        self._checkpoints: _Checkpointer | None = None

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
        if self.path != ":memory:":
            self._checkpoints = _Checkpointer(self._connect)

    async def index_for_search(self) -> None:
        """Index every message the search index does not hold yet, now (it otherwise
        follows within about a second; searches find those messages meanwhile too)."""
        await self._write(_index_all)

    async def close(self) -> None:
        if self._writer is not None:
            if self._writer.is_alive():  # (a writer that died would never answer)
                with suppress(AppError):  # a restart then starts with nothing to index
                    await self.index_for_search()
            self._jobs.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        if self._checkpoints is not None:
            checkpoints, self._checkpoints = self._checkpoints, None
            await asyncio.to_thread(checkpoints.stop)
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
            except sqlite3.OperationalError as exc:
                # Only a lock is worth waiting for; anything else (no descriptor left) is not.
                if time.monotonic() > deadline or "locked" not in str(exc):
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
        return await self._submit(fn, *args)

    def _submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue ``fn`` for the writer now (jobs run in the order queued); its future."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if self._writer is None:
            fut.set_exception(Unavailable("storage is closed"))
            return fut
        self._jobs.put((fn, args, fut, loop))
        return fut

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        if self._readers is None:
            raise Unavailable("storage is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._run_read, fn, args)

    def _run_read(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            conn = getattr(self._local, "conn", None)
            if conn is None:
                # Opening can fail too (no file descriptor left: "unable to open database
                # file"): unavailable, as a failed read is; the next read tries again.
                conn = self._local.conn = self._connect()
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
        conn.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_SAFETY}")
        turn = self._turn
        ready.set()
        search = _SearchIndex()
        try:
            while True:
                try:
                    first = self._jobs.get(timeout=search.wait())
                except queue.Empty:  # idle, with messages still to index
                    with turn or nullcontext():
                        search.catch_up(conn, idle=True)
                    continue
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
                if (checkpoints := self._checkpoints) is not None:
                    checkpoints.wrote()
                if stop:
                    return
                if search.due():
                    with turn or nullcontext():
                        search.catch_up(conn, idle=False)
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
            conn.execute("BEGIN IMMEDIATE")
            # Read with the write lock held: a process writing without taking turns (no
            # WriterLock) cannot commit between the look and this batch.
            (version,) = conn.execute("PRAGMA data_version").fetchone()
            self._members.check(version)
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

    async def _read_plan(self, make: Callable[..., Plan[T]], *args: Any) -> T:
        return await self._read(lambda conn: _drive(conn, make(*args), None))

    async def _read_snapshot(self, make: Callable[..., Plan[T]], *args: Any) -> T:
        return await self._read(lambda conn: _snapshot(conn, make(*args)))

    async def _write_plan(self, make: Callable[..., Plan[T]], *args: Any) -> T:
        members = self._members
        return await self._write(lambda conn: _drive(conn, make(*args), members))

    def record_webhooks(self, urls: Sequence[str], wake: Callable[[], None]) -> None:
        super().record_webhooks(urls, wake)
        self._outbox = _Outbox(tuple(urls), wake) if urls else None

    def _send(self, send: Send) -> asyncio.Future[SendOutcome]:
        return self._submit(_SendMessage(self._members, self._outbox, send))


class _Checkpointer:
    """A thread that checkpoints the WAL a while after writes (see CHECKPOINT_PAGES), on a
    connection of its own. PASSIVE: it never waits for the writer or for readers, and
    copies what it can; a commit meanwhile goes on appending to the WAL."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._wrote = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="appchat-sqlite-checkpoints", daemon=True
        )
        self._thread.start()

    def wrote(self) -> None:
        """The writer committed: a checkpoint is due."""
        self._wrote.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wrote.set()
        self._thread.join()

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        wait, shortest, longest = 0.2, *CHECKPOINT_WAIT
        frames = 0  # the WAL's length at the last checkpoint
        try:
            while not self._stopping.is_set():
                self._wrote.wait()
                if self._stopping.wait(wait):  # let the commits gather
                    return
                self._wrote.clear()
                try:
                    if conn is None:
                        conn = self._connect()
                    _busy, log, _done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:  # tried again after the next writes
                    _failure_log.warning("checkpoint", "sqlite checkpoint failed: %s", exc)
                    continue
                new = log - frames if log >= frames else log  # (the WAL started over)
                frames = log
                wait = min(longest, max(shortest, wait * CHECKPOINT_PAGES / max(new, 1)))
        finally:
            if conn is not None:
                conn.close()


class _SearchIndex:
    """The writer's side of the search index that follows the messages (migration 0010):
    when to look how far behind it is, and indexing the next run of messages."""

    __slots__ = ("_behind", "_looked", "_oldest", "_retry_at")

    def __init__(self) -> None:
        self._looked = 0.0  # when it last looked (monotonic)
        self._behind = True  # messages may wait (unknown at start: look at once)
        self._oldest = 0.0  # since when messages wait
        self._retry_at = 0.0  # after a failure: not before then (no busy loop)

    def wait(self) -> float | None:
        """How long the writer may wait for work before indexing what waits (None: for
        good, nothing waits)."""
        if not self._behind:
            return None
        return max(0.0, max(self._oldest + INDEX_LAG, self._retry_at) - time.monotonic())

    def due(self) -> bool:
        """Time to look (after a batch that may have stored messages)."""
        now = time.monotonic()
        if not self._behind:
            self._behind, self._oldest = True, now
        return now - self._looked >= INDEX_LOOK and now >= self._retry_at

    def catch_up(self, conn: sqlite3.Connection, *, idle: bool) -> None:
        """Index the next run of messages above the mark if enough wait (``idle``: any)."""
        now = self._looked = time.monotonic()
        try:
            row = conn.execute(INDEX_BEHIND).fetchone()
            upto, top = (row[0], row[1] or 0) if row is not None else (0, 0)
            waiting = top - upto
            if waiting <= 0:
                self._behind = False
                return
            if not idle and waiting < INDEX_RUN and now - self._oldest < INDEX_LAG:
                return
            last = min(top, upto + INDEX_MOST)
            conn.execute("BEGIN IMMEDIATE")
            try:
                (upto,) = conn.execute("SELECT indexed_upto FROM search_progress").fetchone()
                _index_run(conn, upto, last)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            if last >= top:
                self._behind = False
            else:
                self._oldest = now - INDEX_LAG  # more wait: again at the next look
        except sqlite3.Error as exc:  # tried again after INDEX_LAG; searches still find all
            self._retry_at = time.monotonic() + INDEX_LAG
            _failure_log.warning("search index", "sqlite search indexing failed: %s", exc)


def _index_all(conn: sqlite3.Connection) -> None:
    """Index every message above the mark (a writer job: in its batch's transaction)."""
    upto, top = conn.execute(INDEX_BEHIND).fetchone()
    _index_run(conn, upto, top or 0)


def _index_run(conn: sqlite3.Connection, upto: int, last: int) -> None:
    """Index the messages after ``upto`` up to ``last`` and move the mark there (inside
    the caller's transaction)."""
    if last > upto:
        conn.execute(INDEX_NEXT, (upto, last))
        conn.execute("UPDATE search_progress SET indexed_upto = ?", (last,))


INDEX_BEHIND = "SELECT indexed_upto, (SELECT max(id) FROM messages) FROM search_progress"
INDEX_NEXT = (
    "INSERT INTO messages_search (rowid, content) SELECT id, content FROM messages "
    "WHERE id > ? AND id <= ? AND content_type = 1"
)


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
        conn.executemany(RECORD_EVENT, rows)
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
        "private",
        "send",
        "sender_id",
        "staff",
    )

    def __init__(self, members: _Members, outbox: _Outbox | None, send: Send) -> None:
        self.members = members
        self.outbox = outbox
        self.send = send
        (
            self.conversation,
            self.sender_id,
            self.staff,
            self.content,
            self.content_type,
            self.client_msg_id,
            self.now,
            self.guard_staff,
            self.private,
        ) = send

    def refused(self, conn: sqlite3.Connection) -> bool:
        """A customer acting as a staff participant (decided before anything is written)."""
        return self.guard_staff and self.members.is_staff(
            conn, self.conversation.id, self.sender_id
        )

    def message(self, message_id: int, rev: int) -> Message:
        return new_message(message_id, self.send, rev)

    def told(self, conn: sqlite3.Connection) -> list[int]:
        """Who gets the push: every participant, only the staff ones for a private note."""
        if self.private:
            return self.members.staff_of(conn, self.conversation.id)
        return self.members.of(conn, self.conversation.id)

    def __call__(self, conn: sqlite3.Connection) -> SendOutcome:
        members, conversation = self.members, self.conversation
        if self.refused(conn):
            raise Forbidden("you may not act as this participant")
        members.next_id = None  # this insert draws an id of its own
        before = members.conversation(conn, conversation.id)
        row = conn.execute(
            "INSERT INTO messages (conversation_id, sender_id, content, content_type, status, "
            "client_msg_id, create_at, update_at, private, rev) "
            "VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
            (
                conversation.id,
                self.sender_id,
                self.content,
                self.content_type,
                self.client_msg_id,
                self.now,
                self.now,
                self.private,
                before.rev + 1,
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
        conn.execute(BUMP_CONVERSATION, (self.now, 1, 1, int(self.private), conversation.id))
        after, reopened = _after_sends(conn, members, self.outbox, before, [self])
        message = self.message(row[0], after.rev)
        if self.outbox is not None:
            self.outbox.add(conn, message_rows(self.outbox.urls, message))
        return SendOutcome(message, True, self.told(conn), after, reopened)


def _after_sends(
    conn: sqlite3.Connection,
    members: _Members,
    outbox: _Outbox | None,
    before: Conversation,
    sends: list[_SendMessage],
) -> tuple[Conversation, bool]:
    """The conversation after ``sends`` were stored in it (its counters already bumped):
    remembered, and open again if one of them was a customer's and it was resolved or
    snoozed; whether it was reopened."""
    newest = max(send.now for send in sends)
    after = Conversation(  # (built directly: dataclasses.replace costs twice as much)
        before.id,
        before.application_id,
        before.create_at,
        max(before.update_at, newest),
        before.status,
        before.assignee_id,
        before.snooze_until,
        before.rev + len(sends),
    )
    reopened = after.status in REOPENED_BY_CUSTOMER and not all(send.staff for send in sends)
    if reopened:
        conn.execute(REOPEN, (before.id,))
        after = replace(after, status=OPEN, snooze_until=None)
        if outbox is not None:
            outbox.add(conn, conversation_updated_rows(outbox.urls, after, newest))
    members.remember(after)
    return after, reopened


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
    # Each message the next revision of its conversation, in the batch's order.
    befores: dict[int, Conversation] = {}
    taken: dict[int, int] = {}  # conversation -> the last revision given out so far
    rows = []
    for send, no in zip(sends, refused, strict=True):
        if no:
            continue
        cid = send.conversation.id
        if cid not in befores:
            befores[cid] = members.conversation(conn, cid)
            taken[cid] = befores[cid].rev
        taken[cid] += 1
        rows.append(
            (
                next_id,
                cid,
                send.sender_id,
                send.content,
                send.content_type,
                send.client_msg_id,
                send.now,
                send.now,
                send.private,
                taken[cid],
            )
        )
        next_id += 1
    conn.execute("SAVEPOINT sends")
    try:
        conn.executemany(
            "INSERT INTO messages (id, conversation_id, sender_id, content, content_type, "
            "status, client_msg_id, create_at, update_at, private, rev) "
            "VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?)",
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
    conversations: dict[int, list[int]] = {}  # id -> [newest time, messages, private ones]
    senders: dict[tuple[int, int], int] = {}
    for send, no in zip(sends, refused, strict=True):
        if no:
            continue
        seen = conversations.setdefault(send.conversation.id, [send.now, 0, 0])
        seen[0] = max(seen[0], send.now)
        seen[1] += 1
        seen[2] += send.private
        key = (send.conversation.id, send.sender_id)
        if key in senders or not members.needs_join(key[0], key[1], send.staff):
            senders[key] = senders.get(key, 0) + 1
        else:  # a newcomer (or newly staff): joins on its own, its first message counted
            members.join(conn, key[0], key[1], send.staff, send.now, sent=True)
            senders[key] = 0
    conn.executemany(ADD_OWN_UNREAD, [(n, c, u) for (c, u), n in senders.items() if n])
    conn.executemany(
        BUMP_CONVERSATION,
        [(newest, n, n, private, c) for c, (newest, n, private) in conversations.items()],
    )
    outbox = sends[0].outbox
    by_conversation: dict[int, list[_SendMessage]] = {c: [] for c in befores}
    for send, no in zip(sends, refused, strict=True):
        if not no:
            by_conversation[send.conversation.id].append(send)
    afters = {
        c: _after_sends(conn, members, outbox, befores[c], stored)
        for c, stored in by_conversation.items()
    }
    out: list[tuple[bool, Any]] = []
    hooks: list[tuple[str, str, str, int, str, int]] = []
    message_id = first
    revs = {c: before.rev for c, before in befores.items()}  # each message its own revision
    for send, no in zip(sends, refused, strict=True):
        if no:
            out.append((False, Forbidden("you may not act as this participant")))
            continue
        cid = send.conversation.id
        revs[cid] += 1
        message = send.message(message_id, revs[cid])
        if outbox is not None:
            hooks += message_rows(outbox.urls, message)
        after, reopened = afters[cid]  # (each message's own revision is its rev)
        out.append((True, SendOutcome(message, True, send.told(conn), after, reopened)))
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
        # Conversations' rows as the writer left them; a change of status or assignee
        # (a plan's ``changed`` step) drops one, to be read again.
        self._conversations: dict[int, Conversation] = {}
        self.next_id: int | None = None  # the id the next message gets, when known

    def check(self, data_version: int) -> None:
        if data_version != self._version:
            self.forget()
            self._version = data_version

    def forget(self) -> None:
        self._by_conversation.clear()
        self._conversations.clear()
        self.next_id = None

    def conversation(self, conn: sqlite3.Connection, conversation_id: int) -> Conversation:
        known = self._conversations.get(conversation_id)
        if known is None:
            row = conn.execute(GET_CONVERSATION_BY_ID, (conversation_id,)).fetchone()
            if row is None:  # erased meanwhile
                raise NotFound("no such conversation")
            known = conversation_of(row)
            self.remember(known)
        return known

    def remember(self, conversation: Conversation) -> None:
        if len(self._conversations) >= MAX_CACHED_CONVERSATIONS:
            self._conversations.clear()
        self._conversations[conversation.id] = conversation

    def changed(self, conversation_id: int) -> None:
        """Its row or its participants were written (or deleted): read them again."""
        self._conversations.pop(conversation_id, None)
        self._by_conversation.pop(conversation_id, None)

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
            rows = conn.execute(PARTICIPANTS_STAFF, (conversation_id,))
            known = self._by_conversation[conversation_id] = {u: bool(s) for u, s in rows}
        return known

    def is_staff(self, conn: sqlite3.Connection, conversation_id: int, user_id: int) -> bool:
        return self._load(conn, conversation_id).get(user_id, False)

    def of(self, conn: sqlite3.Connection, conversation_id: int) -> list[int]:
        return list(self._load(conn, conversation_id))

    def staff_of(self, conn: sqlite3.Connection, conversation_id: int) -> list[int]:
        return [u for u, staff in self._load(conn, conversation_id).items() if staff]

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
                conn.execute(ADD_OWN_UNREAD, (1, conversation_id, user_id))
            return
        conn.execute(JOIN, (conversation_id, user_id, staff, now, int(sent)))
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


# The send path's own statements (PostgreSQL's are inside appchat_send_batch_v3).
BUMP_CONVERSATION = (
    "UPDATE conversations SET update_at = max(update_at, ?), "
    "message_count = message_count + ?, rev = rev + ?, private_count = private_count + ? "
    "WHERE id = ?"
)
REOPEN = "UPDATE conversations SET status = 'open', snooze_until = NULL WHERE id = ?"
GET_CONVERSATION_BY_ID = f"SELECT {CONVERSATION_COLUMNS} FROM conversations c WHERE c.id = ?"


def _snapshot(conn: sqlite3.Connection, plan: Plan[T]) -> T:
    """A read plan in one transaction, so that its statements see one state of the
    database (``changed_since`` reads the changes in two). Only for the plans that need
    it: two statements more, each a turn at the GIL. The reader's connection is never
    left inside the transaction (its next read could not begin one)."""
    conn.execute("BEGIN")
    try:
        result = _drive(conn, plan, None)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    return result


def _drive(conn: sqlite3.Connection, plan: Plan[T], members: _Members | None) -> T:
    """Run a plan (see sqlstore.py) on ``conn``; the writer's ``members`` answer ``join``
    and ``members`` steps from memory."""
    result: Any = None
    try:
        while True:
            step = plan.send(result)
            if members is not None and step.kind == "join":
                members.join(conn, *step.params)
                result = None
                continue
            if members is not None and step.kind == "members":
                result = members.of(conn, step.params[0])
                continue
            if step.kind == "changed":
                if members is not None:
                    members.changed(step.params[0])
                result = None
                continue
            if step.kind == "exclusive":  # the writer is alone (other processes take turns)
                result = True
                continue
            kind, sql, params = expand(step)
            if kind == "many":
                conn.executemany(sql, params)
                result = None
                continue
            cursor = conn.execute(sql, params)
            if kind == "rows":
                result = cursor.fetchall()
            elif kind == "row":
                result = cursor.fetchone()
            elif kind == "value":
                row = cursor.fetchone()
                result = None if row is None else row[0]
            elif kind == "column":
                result = [r[0] for r in cursor]
            else:
                result = cursor.rowcount
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]  # a generator's return value
