"""What the two SQL stores share, written once: the statements and the rules.

Every statement is written once, with SQLite's ``?`` placeholders; PostgreSQL's ``$1``,
``$2`` … are derived from it (:func:`postgres_sql`, as Synapse's ``convert_param_style``
does). What only PostgreSQL has (row locks) is a comment SQLite ignores and PostgreSQL
turns into the clause (``/*FOR UPDATE*/``).

Every operation that is not about how an engine batches its writes is a *plan*: a
generator that yields the statements it needs (:class:`Step`) and is sent their results.
The same plan runs on the SQLite writer or reader threads (sqlite3, blocking) and on an
asyncpg connection (awaiting): each store has a small driver, and :class:`SqlStore`
implements the :class:`~appchat.store.Store` methods on top of two of them, ``_read_plan``
and ``_write_plan``. What truly differs stays in the engine modules: SendMessage (SQLite's
writer numbers a batch's messages itself; PostgreSQL sends a batch through
``appchat_send_batch_v4`` in one round trip), connections and transactions.
"""

from __future__ import annotations

import asyncio
import heapq
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..protocol.errors import BadRequest, NotFound
from ..protocol.models import (
    EVERY_CONVERSATION,
    MESSAGE_DELETED,
    MESSAGE_UPDATED,
    OPEN,
    SNOOZED,
    ActivityKey,
    Conversation,
    ConversationChange,
    ConversationPage,
    DeskFilter,
    Message,
    MessageChange,
    MessagePage,
    Participant,
    ReadOutcome,
    SendOutcome,
    UnreadPage,
    WebhookBacklog,
    WebhookEvent,
    WebhookFailure,
)
from . import lifecycle, search
from .lifecycle import ErasedConversation, ErasedParticipant, Expired, ExportedParticipant
from .plan import (
    FOR_UPDATE,
    GET_CONVERSATION,
    RECORD_EVENT,
    SKIP_LOCKED,
    Plan,
    Step,
    T,
    changed,
    join,
    participants,
)
from .rows import (
    CONVERSATION_COLUMNS,
    LAST_MESSAGE_JOIN,
    LAST_PUBLIC_MESSAGE_JOIN,
    MESSAGE_REV,
    NEWEST,
    OUTBOX_COLUMNS,
    SELECT_MESSAGES,
    UNREAD_PAGE_COLUMNS,
    UNREAD_TOTAL,
    WITH_LAST_MESSAGE,
    OutboxRow,
    Send,
    activity_query,
    conversation_of,
    conversation_page_of,
    conversation_rows,
    conversation_updated_rows,
    message_of,
    message_rows,
    page_of,
    read_rows,
    unread_page_of,
    webhook_event_of,
)

if TYPE_CHECKING:
    from .notices import NoticeRound

# --- the statements -------------------------------------------------------------------------------

VIEW_CONVERSATION = (
    f"SELECT {WITH_LAST_MESSAGE} FROM conversations c {LAST_MESSAGE_JOIN}WHERE c.application_id = ?"
)
VIEW_PUBLIC_CONVERSATION = (
    f"SELECT {WITH_LAST_MESSAGE} FROM conversations c {LAST_PUBLIC_MESSAGE_JOIN}"
    "WHERE c.application_id = ?"
)
GET_MESSAGE = SELECT_MESSAGES + "WHERE m.id = ?"
EDIT_MESSAGE = "UPDATE messages SET content = ?, edited_at = ?, update_at = ?, rev = ? WHERE id = ?"
DELETE_MESSAGE = (
    "UPDATE messages SET content = '', deleted = TRUE, update_at = ?, rev = ? WHERE id = ?"
)
NEXT_REV = "UPDATE conversations SET rev = rev + 1 WHERE id = ?"
LOCK_CONVERSATION = (
    f"SELECT {CONVERSATION_COLUMNS} FROM conversations c WHERE c.id = ? {FOR_UPDATE}"
)
CHANGE_CONVERSATION = (
    "UPDATE conversations SET status = ?, snooze_until = ?, assignee_id = ?, rev = rev + 1 "
    "WHERE id = ?"
)
# Snoozed conversations due: PostgreSQL's nodes each take different ones.
SNOOZES_DUE = (
    "SELECT c.id FROM conversations c WHERE c.status = 'snoozed' AND c.snooze_until <= ? "
    f"ORDER BY c.snooze_until LIMIT ? {SKIP_LOCKED}"
)
NEW_CONVERSATION = (
    "INSERT INTO conversations (application_id, create_at, update_at) VALUES (?, ?, ?) "
    "ON CONFLICT (application_id) DO NOTHING"
)
IS_STAFF = "SELECT is_staff FROM participants WHERE conversation_id = ? AND user_id = ?"
PARTICIPANTS_STAFF = "SELECT user_id, is_staff FROM participants WHERE conversation_id = ?"
PARTICIPANT_LIST = (
    "SELECT user_id, is_staff, name FROM participants WHERE conversation_id = ? ORDER BY user_id"
)
ADD_OWN_UNREAD = (
    "UPDATE participants SET own_unread = own_unread + ? WHERE conversation_id = ? AND user_id = ?"
)
SET_NAME = (
    "UPDATE participants SET name = ? WHERE conversation_id = ? AND user_id = ? "
    "AND (name IS NULL OR name <> ?)"
)
MESSAGE_IN_CONVERSATION = "SELECT private FROM messages WHERE id = ? AND conversation_id = ?"
READ_POSITION = (
    "SELECT read_position FROM participants WHERE conversation_id = ? AND user_id = ? " + FOR_UPDATE
)
# What a reader reads: a customer, no private note.
NEWLY_READ = (
    "SELECT count(*), count(*) FILTER (WHERE sender_id = ?) FROM messages "
    "WHERE conversation_id = ? AND id > ? AND id <= ? AND (? OR NOT private)"
)
MOVE_READ_POSITION = (
    "UPDATE participants SET read_position = ?, read_count = read_count + ?, "
    "own_unread = own_unread - ? WHERE conversation_id = ? AND user_id = ?"
)
MARK_READ = (
    "UPDATE messages SET status = 1, update_at = ? WHERE conversation_id = ? "
    "AND id > ? AND id <= ? AND sender_id <> ? AND status = 0 AND (? OR NOT private)"
)
# The lease is the claimed rows' next_attempt: until it passes they are not due again.
# PostgreSQL: a node claiming at the same moment skips these rows and takes others.
CLAIM_EVENTS = (
    "UPDATE webhook_outbox SET next_attempt = ? WHERE id IN (SELECT id FROM webhook_outbox "
    f"WHERE url = ? AND next_attempt <= ? ORDER BY next_attempt, id LIMIT ? {SKIP_LOCKED}) "
    f"RETURNING {OUTBOX_COLUMNS}"
)
DELIVERED = "DELETE FROM webhook_outbox WHERE id = ?"
RESCHEDULE = (
    "UPDATE webhook_outbox SET attempts = ?, next_attempt = ?, last_error = ? "
    "WHERE id = ? AND next_attempt = ?"
)
BACKLOG = (
    "SELECT count(next_attempt), count(*) - count(next_attempt), min(next_attempt) "
    "FROM webhook_outbox WHERE url = ?"
)


# --- plans ----------------------------------------------------------------------------------------


def ping() -> Plan[None]:
    yield Step("value", "SELECT 1", ())


def get_conversation(application_id: int) -> Plan[Conversation | None]:
    row = yield Step("row", GET_CONVERSATION, (application_id,))
    return conversation_of(row) if row else None


def view_conversation(application_id: int, public: bool = False) -> Plan[Conversation | None]:
    """The conversation with its last message (``public``: the last a customer sees)."""
    sql = VIEW_PUBLIC_CONVERSATION if public else VIEW_CONVERSATION
    row = yield Step("row", sql, (application_id,))
    return conversation_of(row) if row else None


def is_staff_participant(conversation_id: int, user_id: int) -> Plan[bool]:
    return bool((yield Step("value", IS_STAFF, (conversation_id, user_id))))


def add_conversation(
    application_id: int, user_id: int, staff: bool, now: int, hooks: tuple[str, ...]
) -> Plan[tuple[Conversation, bool]]:
    """The conversation, and whether it is new (then recorded for ``hooks``)."""
    created = yield Step("count", NEW_CONVERSATION, (application_id, now, now))
    conversation = conversation_of((yield Step("row", VIEW_CONVERSATION, (application_id,))))
    yield join(conversation.id, user_id, staff, now)
    if created and hooks:
        yield Step("many", RECORD_EVENT, conversation_rows(hooks, conversation))
    return conversation, bool(created)


def conversation_page(
    user_id: int | None,
    application_id: int | None,
    limit: int,
    after: ActivityKey | None,
    desk: DeskFilter,
    public: bool,
) -> Plan[ConversationPage]:
    sql, params = activity_query(
        WITH_LAST_MESSAGE,
        user_id=user_id,
        application_id=application_id,
        after=after,
        limit=limit,
        desk=desk,
        joins=LAST_PUBLIC_MESSAGE_JOIN if public else LAST_MESSAGE_JOIN,
    )
    return conversation_page_of((yield Step("rows", sql, params)), limit)


KEEP: Any = object()  # change_conversation: this field stays as it is


def change_conversation(
    conversation_id: int,
    now: int,
    hooks: tuple[str, ...],
    status: str = KEEP,
    snooze_until: int | None = KEEP,
    assignee: int | None = KEEP,
    unassigned_only: bool = False,
) -> Plan[ConversationChange]:
    """Set the conversation's status (with its snooze time) or assignee; a change takes
    the next revision and is recorded as ``conversation.updated``. The assignee joins as
    staff. ``after`` comes with its last message; nothing changed: ``before is after``.
    ``unassigned_only``: change nothing if it has an assignee already."""
    before = conversation_of((yield Step("row", LOCK_CONVERSATION, (conversation_id,))))
    if unassigned_only and before.assignee_id is not None:
        assignee = KEEP
    new_status = before.status if status is KEEP else status
    new_snooze = before.snooze_until if snooze_until is KEEP else snooze_until
    if new_status != SNOOZED:
        new_snooze = None
    new_assignee = before.assignee_id if assignee is KEEP else assignee
    if assignee is not KEEP and assignee is not None:
        yield join(conversation_id, assignee, True, now)
    if (new_status, new_snooze, new_assignee) == (
        before.status,
        before.snooze_until,
        before.assignee_id,
    ):
        after = yield from view_conversation(before.application_id)
        assert after is not None  # locked: it cannot have gone
        return ConversationChange(after, after)
    yield Step(
        "count", CHANGE_CONVERSATION, (new_status, new_snooze, new_assignee, conversation_id)
    )
    yield changed(conversation_id)
    after = yield from view_conversation(before.application_id)
    assert after is not None
    if hooks:
        yield Step("many", RECORD_EVENT, conversation_updated_rows(hooks, after, now))
    return ConversationChange(after, before)


def open_counts(assignees: tuple[int, ...]) -> Plan[dict[int, int]]:
    """Conversations open or pending per assignee (those with none left out)."""
    marks = ", ".join("?" * len(assignees))
    rows = yield Step(
        "rows",
        "SELECT assignee_id, count(*) FROM conversations WHERE status IN ('open', 'pending') "
        f"AND assignee_id IN ({marks}) GROUP BY assignee_id",
        assignees,
    )
    return {int(r[0]): int(r[1]) for r in rows}


def wake_snoozed(now: int, limit: int, hooks: tuple[str, ...]) -> Plan[list[ConversationChange]]:
    """Open the snoozed conversations whose time has come (at most ``limit``)."""
    due = yield Step("column", SNOOZES_DUE, (now, limit))
    woken = []
    for conversation_id in due:
        woken.append((yield from change_conversation(conversation_id, now, hooks, status=OPEN)))
    return woken


def unread_page(
    user_id: int, application_id: int | None, limit: int, after: ActivityKey | None
) -> Plan[UnreadPage]:
    def query(columns: str, key: ActivityKey | None, n: int | None) -> tuple[str, list[Any]]:
        return activity_query(
            columns, user_id=user_id, application_id=application_id, after=key, limit=n
        )

    rows = yield Step("rows", *query(UNREAD_PAGE_COLUMNS, after, limit))
    total = None
    if after is not None or len(rows) > limit:
        total = int((yield Step("value", *query(UNREAD_TOTAL, None, None))))
    return unread_page_of(rows, limit, total)


def list_messages(
    conversation: Conversation,
    before_id: int | None,
    after_id: int | None,
    limit: int,
    public: bool = False,
) -> Plan[MessagePage]:
    base = SELECT_MESSAGES + "WHERE m.conversation_id = ?"
    if public:
        base += " AND NOT m.private"
    if after_id is not None:
        sql = base + " AND m.id > ? ORDER BY m.id ASC LIMIT ?"
        cursor = after_id
    else:
        sql = base + " AND m.id < ? ORDER BY m.id DESC LIMIT ?"
        cursor = before_id if before_id is not None else NEWEST
    rows = yield Step("rows", sql, (conversation.id, cursor, limit + 1))
    return page_of(list(rows), limit, newest_first=after_id is None)


def read_messages(
    conversation: Conversation,
    reader_id: int,
    staff: bool,
    message_id: int,
    now: int,
    hooks: tuple[str, ...],
) -> Plan[ReadOutcome]:
    """Move the reader's position forward to ``message_id`` (see the Store interface).

    ``NotFound`` is raised before anything is written. The counts are final: PostgreSQL
    commits a conversation's ids in order (see store/postgres.py), SQLite has one writer.
    """
    cid = conversation.id
    private = yield Step("value", MESSAGE_IN_CONVERSATION, (message_id, cid))
    if private is None or (private and not staff):  # a customer never sees a note
        raise NotFound(f"message {message_id} is not in this conversation")
    yield join(cid, reader_id, staff, now)
    position = yield Step("value", READ_POSITION, (cid, reader_id))
    if message_id <= position:
        return ReadOutcome(False, [])  # nothing moved: nothing is pushed
    read, own = yield Step("row", NEWLY_READ, (reader_id, cid, position, message_id, staff))
    yield Step("count", MOVE_READ_POSITION, (message_id, read, own, cid, reader_id))
    # Messages up to the old position were marked when it was reached.
    yield Step("count", MARK_READ, (now, cid, position, message_id, reader_id, staff))
    if hooks:
        app = conversation.application_id
        yield Step("many", RECORD_EVENT, read_rows(hooks, app, reader_id, message_id, now))
    # Read up to a note: only staff hear of it (its id would tell a customer one exists).
    told = (yield from staff_ids(cid)) if private else (yield participants(cid))
    return ReadOutcome(True, told)


def staff_ids(conversation_id: int) -> Plan[list[int]]:
    rows = yield Step("rows", PARTICIPANTS_STAFF, (conversation_id,))
    return [r[0] for r in rows if r[1]]


def get_message(message_id: int) -> Plan[Message | None]:
    row = yield Step("row", GET_MESSAGE, (message_id,))
    return None if row is None else message_of(row)


def changed_messages(
    conversation: Conversation, since: int, limit: int, public: bool, changed_only: bool
) -> Plan[MessagePage]:
    """Messages of the conversation created or changed after revision ``since``, by rev.

    ``changed_only``: the engine indexes the revisions of changed messages only (SQLite,
    where an index entry more per message stored cost the writer a page per conversation
    of every commit): the rest are found by id (:func:`changed_since`)."""
    if changed_only:
        return (yield from changed_since(conversation.id, since, limit, public))
    sql = SELECT_MESSAGES + "WHERE m.conversation_id = ? AND m.rev > ?"
    if public:
        sql += " AND NOT m.private"
    rows = yield Step("rows", sql + " ORDER BY m.rev LIMIT ?", (conversation.id, since, limit + 1))
    return page_of(list(rows), limit, newest_first=False)


# A message that was never edited nor deleted keeps the revision its creation took, and
# those grow with the ids in a conversation: SQLite's writer numbers a conversation's
# messages and gives them revisions in one order, with the write lock held. So the
# unchanged messages after revision R are those after one id, found by bisection; the
# changed ones are indexed by revision (messages_changed, a partial index). The plan
# reads in one snapshot (``_read_snapshot``), so no change falls between its reads.
UNCHANGED = "m.edited_at IS NULL AND NOT m.deleted"
CHANGED = "(m.edited_at IS NOT NULL OR m.deleted)"  # messages_changed's WHERE, word for word
NEWEST_UNCHANGED = (
    f"SELECT m.id, m.rev FROM messages m WHERE m.conversation_id = ? AND {UNCHANGED}"
    " ORDER BY m.id DESC LIMIT 1"
)
FIRST_UNCHANGED_BETWEEN = (
    "SELECT m.id, m.rev FROM messages m WHERE m.conversation_id = ? AND m.id >= ? "
    f"AND m.id < ? AND {UNCHANGED} ORDER BY m.id LIMIT 1"
)
OLDEST_ID = "SELECT min(id) FROM messages WHERE conversation_id = ?"
# By ``public`` (no private note): unchanged messages after an id, changed ones after a rev.
UNCHANGED_AFTER = {
    public: SELECT_MESSAGES + f"WHERE m.conversation_id = ? AND m.id > ? AND {UNCHANGED}"
    f"{' AND NOT m.private' if public else ''} ORDER BY m.id LIMIT ?"
    for public in (False, True)
}
CHANGED_AFTER = {
    public: SELECT_MESSAGES + f"WHERE m.conversation_id = ? AND m.rev > ? AND {CHANGED}"
    f"{' AND NOT m.private' if public else ''} ORDER BY m.rev LIMIT ?"
    for public in (False, True)
}


def changed_since(conversation_id: int, since: int, limit: int, public: bool) -> Plan[MessagePage]:
    """:func:`changed_messages` without an index of every message's revision: the newest
    unchanged message at or below ``since`` (bisection over ids, each probe one index
    seek), the unchanged messages after it by id, the changed ones above ``since`` by
    revision, merged. A probe passes over the changed messages it meets, so a long run of
    edited or deleted messages is read about once per call."""
    boundary = 0  # the newest unchanged message with rev <= since (0: none)
    newest = yield Step("row", NEWEST_UNCHANGED, (conversation_id,))
    if newest is not None and newest[1] <= since:
        boundary = newest[0]
    elif newest is not None:
        lo = (yield Step("value", OLDEST_ID, (conversation_id,))) or 0
        hi = newest[0]  # every unchanged message from hi on is above since
        while lo < hi:
            middle = (lo + hi) // 2
            probe = yield Step("row", FIRST_UNCHANGED_BETWEEN, (conversation_id, middle, hi))
            if probe is None or probe[1] > since:
                hi = middle
            else:  # the first unchanged at or after the middle is at or below since
                boundary, lo = probe[0], probe[0] + 1
    created = yield Step("rows", UNCHANGED_AFTER[public], (conversation_id, boundary, limit + 1))
    changed = yield Step("rows", CHANGED_AFTER[public], (conversation_id, since, limit + 1))
    rows = list(heapq.merge(created, changed, key=lambda row: row[MESSAGE_REV]))
    return page_of(rows[: limit + 1], limit, newest_first=False)


def change_message(
    conversation: Conversation,
    message_id: int,
    now: int,
    hooks: tuple[str, ...],
    content: str | None,
) -> Plan[MessageChange]:
    """Edit the message (``content``) or delete it (``None``: it becomes a stub): the
    conversation's next revision, recorded as ``message.updated`` or ``message.deleted``.
    Deleting a stub again changes nothing (``conversation`` ``None``)."""
    cid = conversation.id
    locked = conversation_of((yield Step("row", LOCK_CONVERSATION, (cid,))))
    message = yield from get_message(message_id)
    if message is None or message.application_id != conversation.application_id:
        raise NotFound("no such message")
    if message.deleted:
        if content is not None:
            raise BadRequest("a deleted message cannot be edited")
        return MessageChange(message, [], None)
    rev = locked.rev + 1
    if content is None:
        yield Step("count", DELETE_MESSAGE, (now, rev, message_id))
        kind = MESSAGE_DELETED
    else:
        yield Step("count", EDIT_MESSAGE, (content, now, now, rev, message_id))
        kind = MESSAGE_UPDATED
    yield Step("count", NEXT_REV, (cid,))
    yield changed(cid)
    message = yield from get_message(message_id)
    assert message is not None  # locked with its conversation
    if hooks:
        yield Step("many", RECORD_EVENT, message_rows(hooks, message, kind))
    after = yield from view_conversation(conversation.application_id)
    told = (yield from staff_ids(cid)) if message.private else (yield participants(cid))
    return MessageChange(message, told, after)


def participant_ids(conversation_id: int) -> Plan[list[int]]:
    return list((yield participants(conversation_id)))


def participant_list(conversation_id: int) -> Plan[list[Participant]]:
    rows = yield Step("rows", PARTICIPANT_LIST, (conversation_id,))
    return [Participant(r[0], bool(r[1]), r[2]) for r in rows]


def set_participant_name(conversation_id: int, user_id: int, name: str) -> Plan[None]:
    yield Step("count", SET_NAME, (name, conversation_id, user_id, name))


def claim_webhooks(url: str, now: int, lease_until: int, limit: int) -> Plan[list[WebhookEvent]]:
    rows = yield Step("rows", CLAIM_EVENTS, (lease_until, url, now, limit))
    return sorted((webhook_event_of(tuple(r), lease_until) for r in rows), key=_by_row)


def _by_row(event: WebhookEvent) -> int:
    return event.row


def settle_webhooks(delivered: Sequence[int], failed: Sequence[WebhookFailure]) -> Plan[None]:
    if delivered:
        yield Step("many", DELIVERED, [(r,) for r in delivered])
    if failed:
        rows = [(f.attempts, f.next_attempt, f.error, f.row, f.lease) for f in failed]
        yield Step("many", RESCHEDULE, rows)


def webhook_backlog(url: str) -> Plan[WebhookBacklog]:
    row = yield Step("row", BACKLOG, (url,))
    return WebhookBacklog(row[0], row[1], row[2])


def record(rows: list[OutboxRow]) -> Step:
    return Step("many", RECORD_EVENT, rows)


# --- the Store interface on plans -----------------------------------------------------------------


ERASE_BATCH = 1000  # messages erased in one transaction


class SqlStore(ABC):
    """The :class:`~appchat.store.Store` methods both SQL stores share, run as plans."""

    _hooks: tuple[str, ...] = ()  # webhook URLs: events are recorded for them
    _wake: Callable[[], None] | None = None

    @abstractmethod
    async def _read_plan(self, make: Callable[..., Plan[T]], *args: Any) -> T:
        """Run the plan ``make(*args)`` outside a transaction."""

    async def _read_snapshot(self, make: Callable[..., Plan[T]], *args: Any) -> T:
        """Run the read plan ``make(*args)`` so that all its statements see one state of
        the database. Here as ``_read_plan``: PostgreSQL runs the plans this serves in one
        statement (``changed_messages``); SQLite overrides it."""
        return await self._read_plan(make, *args)

    @abstractmethod
    async def _write_plan(self, make: Callable[..., Plan[T]], *args: Any) -> T:
        """Run the plan ``make(*args)`` in a transaction; return once it committed. ``make``
        may be called again (a retry): a plan is made fresh for each run."""

    @abstractmethod
    def _send(self, send: Send) -> asyncio.Future[SendOutcome]:
        """Hand a message over to be stored (each engine batches these its own way): at
        once, in call order; the future settles once it committed or failed."""

    def add_message(
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
        private: bool = False,
    ) -> asyncio.Future[SendOutcome]:
        return self._send(
            Send(
                conversation,
                sender_id,
                staff,
                content,
                content_type,
                client_msg_id,
                now,
                guard_staff,
                private,
            )
        )

    def record_webhooks(self, urls: Sequence[str], wake: Callable[[], None]) -> None:
        self._hooks = tuple(urls)
        self._wake = wake if urls else None

    def _woken(self, hooks: tuple[str, ...]) -> None:
        """After a commit that recorded events for ``hooks`` (the URLs it was made with)."""
        if hooks and self._wake is not None:
            self._wake()

    async def ping(self) -> None:
        await self._read_plan(ping)

    async def get_conversation(self, application_id: int) -> Conversation | None:
        return await self._read_plan(get_conversation, application_id)

    async def is_staff_participant(self, conversation_id: int, user_id: int) -> bool:
        return await self._read_plan(is_staff_participant, conversation_id, user_id)

    async def add_conversation(
        self, application_id: int, user_id: int, *, staff: bool, now: int
    ) -> Conversation:
        hooks = self._hooks
        conversation, created = await self._write_plan(
            add_conversation, application_id, user_id, staff, now, hooks
        )
        if created:
            self._woken(hooks)
        return conversation

    async def conversation_page(
        self,
        user_id: int | None,
        *,
        application_id: int | None = None,
        limit: int,
        after: ActivityKey | None = None,
        desk: DeskFilter = EVERY_CONVERSATION,
        public: bool = False,
    ) -> ConversationPage:
        return await self._read_plan(
            conversation_page, user_id, application_id, limit, after, desk, public
        )

    async def view_conversation(
        self, application_id: int, *, public: bool = False
    ) -> Conversation | None:
        return await self._read_plan(view_conversation, application_id, public)

    async def get_message(self, message_id: int) -> Message | None:
        return await self._read_plan(get_message, message_id)

    async def changed_messages(
        self, conversation: Conversation, *, since: int, limit: int, public: bool = False
    ) -> MessagePage:
        return await self._read_snapshot(
            changed_messages, conversation, since, limit, public, self._changed_only_index
        )

    async def edit_message(
        self, conversation: Conversation, message_id: int, content: str, *, now: int
    ) -> MessageChange:
        return await self._change_message(conversation, message_id, now, content)

    async def delete_message(
        self, conversation: Conversation, message_id: int, *, now: int
    ) -> MessageChange:
        return await self._change_message(conversation, message_id, now, None)

    async def _change_message(
        self, conversation: Conversation, message_id: int, now: int, content: str | None
    ) -> MessageChange:
        hooks = self._hooks
        change = await self._write_plan(
            change_message, conversation, message_id, now, hooks, content
        )
        if change.conversation is not None:
            self._woken(hooks)
        return change

    async def set_status(
        self, conversation: Conversation, status: str, snooze_until: int | None, *, now: int
    ) -> ConversationChange:
        return await self._change(conversation.id, now, status=status, snooze_until=snooze_until)

    async def assign(
        self,
        conversation: Conversation,
        assignee_id: int | None,
        *,
        now: int,
        unassigned_only: bool = False,
    ) -> ConversationChange:
        return await self._change(
            conversation.id, now, assignee=assignee_id, unassigned_only=unassigned_only
        )

    async def open_counts(self, assignees: Sequence[int]) -> dict[int, int]:
        if not assignees:
            return {}
        return await self._read_plan(open_counts, tuple(assignees))

    async def _change(self, conversation_id: int, now: int, **fields: Any) -> ConversationChange:
        hooks = self._hooks
        change = await self._write_plan(
            lambda: change_conversation(conversation_id, now, hooks, **fields)
        )
        if change.before is not change.conversation:
            self._woken(hooks)
        return change

    async def wake_snoozed(self, *, now: int, limit: int) -> list[ConversationChange]:
        hooks = self._hooks
        woken = await self._write_plan(wake_snoozed, now, limit, hooks)
        if woken:
            self._woken(hooks)
        return woken

    async def unread_page(
        self,
        user_id: int,
        *,
        application_id: int | None = None,
        limit: int,
        after: ActivityKey | None = None,
    ) -> UnreadPage:
        return await self._read_plan(unread_page, user_id, application_id, limit, after)

    async def list_messages(
        self,
        conversation: Conversation,
        *,
        before_id: int | None = None,
        after_id: int | None = None,
        limit: int,
        public: bool = False,
    ) -> MessagePage:
        return await self._read_plan(
            list_messages, conversation, before_id, after_id, limit, public
        )

    async def read_messages(
        self, conversation: Conversation, *, reader_id: int, staff: bool, message_id: int, now: int
    ) -> ReadOutcome:
        hooks = self._hooks
        outcome = await self._write_plan(
            read_messages, conversation, reader_id, staff, message_id, now, hooks
        )
        if outcome.moved:
            self._woken(hooks)
        return outcome

    async def participant_ids(self, conversation_id: int) -> list[int]:
        return await self._read_plan(participant_ids, conversation_id)

    async def participant_list(self, conversation_id: int) -> list[Participant]:
        return await self._read_plan(participant_list, conversation_id)

    async def set_participant_name(self, conversation_id: int, user_id: int, name: str) -> None:
        await self._write_plan(set_participant_name, conversation_id, user_id, name)

    async def claim_webhooks(
        self, url: str, *, now: int, lease_until: int, limit: int
    ) -> list[WebhookEvent]:
        # A write: on SQLite the claims of other workers on the file take turns with it.
        return await self._write_plan(claim_webhooks, url, now, lease_until, limit)

    async def settle_webhooks(
        self, delivered: Sequence[int], failed: Sequence[WebhookFailure]
    ) -> None:
        await self._write_plan(settle_webhooks, delivered, failed)

    async def webhook_backlog(self, url: str) -> WebhookBacklog:
        return await self._read_plan(webhook_backlog, url)

    # --- the data's lifecycle (lifecycle.py) ---------------------------------------------

    async def export_participants(self, conversation_id: int) -> list[ExportedParticipant]:
        return await self._read_plan(lifecycle.export_participants, conversation_id)

    async def erase_conversation(
        self, application_id: int, *, now: int
    ) -> ErasedConversation | None:
        conversation = await self.get_conversation(application_id)
        if conversation is None:
            return None
        uploads: list[str] = []
        while True:  # the bulk in batches: no request waits behind one long transaction
            count, images = await self._write_plan(
                lifecycle.erase_messages, conversation.id, ERASE_BATCH
            )
            uploads += images
            if count < ERASE_BATCH:
                break
        hooks = self._hooks
        erased = await self._write_plan(lifecycle.erase_conversation, application_id, now, hooks)
        if erased is None:
            return None
        self._woken(hooks)
        return replace(erased, uploads=uploads + erased.uploads)

    async def erase_participant(self, user_id: int, *, now: int) -> ErasedParticipant:
        total = ErasedParticipant()
        while True:
            erased = await self._write_plan(lifecycle.erase_participant, user_id, now, ERASE_BATCH)
            total.messages += erased.messages
            total.uploads += erased.uploads
            if erased.messages < ERASE_BATCH:
                return total

    async def expire(self, *, before: int, limit: int) -> Expired | None:
        return await self._write_plan(lifecycle.expire, before, limit)

    async def upload_used(self, application_id: int, content: str) -> bool:
        return await self._read_plan(lifecycle.upload_used, application_id, content)

    # --- away notices (store/notices.py: it uses this module's plans, so it is imported late)

    async def mark_seen(self, user_ids: Sequence[int], *, now: int) -> None:
        from .notices import SEEN_BATCH, mark_seen

        if not self._hooks:
            return
        ids = sorted(set(user_ids))
        for start in range(0, len(ids), SEEN_BATCH):
            await self._write_plan(mark_seen, ids[start : start + SEEN_BATCH], now)

    async def notice_unread(
        self, *, now: int, away_before: int, since: int | None, limit: int
    ) -> NoticeRound:
        from .notices import NoticeRound, away_unread, record_notices

        hooks = self._hooks
        if not hooks:
            return NoticeRound(0, [])
        # Found outside a transaction (SQLite's writer is not held by the look); recorded
        # in one, where each is checked again.
        found = await self._read_plan(away_unread, now, away_before, since, limit)
        if not found:
            return NoticeRound(0, [])
        recorded = await self._write_plan(record_notices, found, away_before, now, hooks)
        if recorded:
            self._woken(hooks)
        return NoticeRound(len(found), recorded)

    # --- full-text search (search.py) ------------------------------------------------------

    _search_dialect: search.Dialect = "sqlite"
    # Only changed messages' revisions are indexed (see changed_since): SQLite's 0011.
    _changed_only_index = True

    async def search_messages(
        self,
        words: Sequence[str],
        *,
        conversation_id: int | None = None,
        public: bool = False,
        before_id: int | None = None,
        limit: int,
    ) -> MessagePage:
        return await self._read_plan(
            search.search_messages,
            self._search_dialect,
            tuple(words),
            conversation_id,
            public,
            before_id,
            limit,
        )
