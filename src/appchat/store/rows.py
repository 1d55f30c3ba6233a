"""What the SQL backends share: the selected columns, row mapping and page assembly."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson

from ..protocol.models import (
    CONVERSATION_CREATED,
    CONVERSATION_UPDATED,
    EVERY_CONVERSATION,
    MESSAGE_CREATED,
    MESSAGE_READ,
    ActivityKey,
    Conversation,
    ConversationPage,
    DeskFilter,
    Message,
    MessagePage,
    UnreadCount,
    UnreadPage,
    WebhookEvent,
)

CONVERSATION_COLUMNS = (
    "c.id, c.application_id, c.create_at, c.update_at, c.status, c.assignee_id, "
    "c.snooze_until, c.rev"
)
MESSAGE_COLUMNS = (
    "m.id, c.application_id, m.sender_id, m.content, m.content_type, m.status, "
    "m.create_at, m.update_at, m.client_msg_id, sp.name, m.private, m.rev, m.edited_at, "
    "m.deleted"
)
MESSAGE_REV = MESSAGE_COLUMNS.split(", ").index("m.rev")  # its position in a message row
SENDER_NAME = (
    "LEFT JOIN participants sp ON sp.conversation_id = m.conversation_id "
    "AND sp.user_id = m.sender_id "
)
SELECT_MESSAGES = (
    f"SELECT {MESSAGE_COLUMNS} FROM messages m JOIN conversations c ON c.id = m.conversation_id "
    + SENDER_NAME
)
# A conversation with its newest message (``m``, NULLs when it has none): one index probe
# per conversation.
WITH_LAST_MESSAGE = f"{CONVERSATION_COLUMNS}, {MESSAGE_COLUMNS}"
LAST_MESSAGE_JOIN = (
    "LEFT JOIN messages m ON m.id = (SELECT max(lm.id) FROM messages lm "
    "WHERE lm.conversation_id = c.id) " + SENDER_NAME
)
# What a customer sees: private notes left out.
LAST_PUBLIC_MESSAGE_JOIN = (
    "LEFT JOIN messages m ON m.id = (SELECT max(lm.id) FROM messages lm "
    "WHERE lm.conversation_id = c.id AND NOT lm.private) " + SENDER_NAME
)
CONVERSATION_WIDTH = 8  # the columns of CONVERSATION_COLUMNS
NEWEST = 2**63 - 1  # the ``before_id`` cursor of the default page


def conversation_of(row: Sequence[Any]) -> Conversation:
    """A row of ``CONVERSATION_COLUMNS``, or of ``WITH_LAST_MESSAGE`` (then with its
    ``last_message``)."""
    last = None
    if len(row) > CONVERSATION_WIDTH and row[CONVERSATION_WIDTH] is not None:
        last = message_of(row[CONVERSATION_WIDTH:])
    return Conversation(
        id=row[0],
        application_id=row[1],
        create_at=row[2],
        update_at=row[3],
        status=row[4],
        assignee_id=row[5],
        snooze_until=row[6],
        rev=row[7],
        last_message=last,
    )


def message_of(row: Sequence[Any]) -> Message:
    """A row of ``MESSAGE_COLUMNS`` (SQLite's flags are integers: made booleans)."""
    return Message(
        id=row[0],
        application_id=row[1],
        sender_id=row[2],
        content=row[3],
        content_type=row[4],
        status=row[5],
        create_at=row[6],
        update_at=row[7],
        client_msg_id=row[8],
        sender_name=row[9],
        private=bool(row[10]),
        rev=row[11],
        edited_at=row[12],
        deleted=bool(row[13]),
    )


def page_of(rows: list[Any], limit: int, *, newest_first: bool) -> MessagePage:
    """``rows`` were fetched with ``LIMIT limit + 1``: the extra one says there is more."""
    has_more = len(rows) > limit
    rows = rows[:limit]
    if newest_first:
        rows.reverse()
    return MessagePage(messages=[message_of(r) for r in rows], has_more=has_more)


# Kept counters: O(1) each. Private notes count for staff participants only.
UNREAD = (
    "CASE WHEN p.is_staff THEN c.message_count ELSE c.message_count - c.private_count END "
    "- p.read_count - p.own_unread"
)
UNREAD_PAGE_COLUMNS = f"c.application_id, {UNREAD}, c.update_at, c.id"
UNREAD_TOTAL = f"COALESCE(SUM({UNREAD}), 0)"


def activity_query(
    columns: str,
    *,
    user_id: int | None,
    application_id: int | None,
    after: ActivityKey | None,
    limit: int | None,
    desk: DeskFilter = EVERY_CONVERSATION,
    joins: str = "",
) -> tuple[str, list[Any]]:
    """SQL and its parameters selecting ``columns`` of the conversations ``user_id`` takes
    part in (``None``: every one; ``p`` is then not joined), newest activity first, after
    the key ``after``, within ``desk``; ``limit``: ``None`` for an aggregate; ``joins``
    (``LAST_MESSAGE_JOIN``) joined after ``c``."""
    params: list[Any] = []

    def param(value: int | str) -> str:
        params.append(value)
        return "?"

    if user_id is None:
        sql = f"SELECT {columns} FROM conversations c {joins}WHERE TRUE"
    else:
        sql = (
            f"SELECT {columns} FROM participants p JOIN conversations c "
            f"ON c.id = p.conversation_id {joins}WHERE p.user_id = {param(user_id)}"
        )
    if application_id is not None:
        sql += f" AND c.application_id = {param(application_id)}"
    if desk.statuses:
        sql += f" AND c.status IN ({', '.join(param(s) for s in desk.statuses)})"
    if desk.assignee is None:
        sql += " AND c.assignee_id IS NULL"
    elif desk.assignee != "any":
        sql += f" AND c.assignee_id = {param(desk.assignee)}"
    if after is not None:
        update_at, conversation_id = after
        sql += (
            f" AND (c.update_at < {param(update_at)}"
            f" OR (c.update_at = {param(update_at)} AND c.id < {param(conversation_id)}))"
        )
    if limit is not None:
        sql += f" ORDER BY c.update_at DESC, c.id DESC LIMIT {param(limit + 1)}"
    return sql, params


def conversation_page_of(rows: Sequence[Sequence[Any]], limit: int) -> ConversationPage:
    """``rows`` were fetched with ``LIMIT limit + 1``: the extra one says there is more."""
    return ConversationPage([conversation_of(r) for r in rows[:limit]], len(rows) > limit)


def unread_page_of(rows: Sequence[Sequence[Any]], limit: int, total: int | None) -> UnreadPage:
    """``rows`` of ``UNREAD_PAGE_COLUMNS`` fetched with ``LIMIT limit + 1``; ``total``
    ``None`` when the page holds everything (it is then the page's sum)."""
    page = rows[:limit]
    counts = [UnreadCount(r[0], r[1]) for r in page]
    return UnreadPage(
        counts=counts,
        total=sum(c.unread for c in counts) if total is None else total,
        has_more=len(rows) > limit,
        last=(page[-1][2], page[-1][3]) if page else None,
    )


class Send(NamedTuple):
    """A SendMessage for a store's own send path (see ``Store.add_message``)."""

    conversation: Conversation
    sender_id: int
    staff: bool
    content: str
    content_type: int
    client_msg_id: str | None
    now: int
    guard_staff: bool
    private: bool = False


def new_message(message_id: int, send: Send, rev: int) -> Message:
    """The message a send just stored: unread (status 0), created and updated ``now``."""
    return Message(
        id=message_id,
        application_id=send.conversation.application_id,
        sender_id=send.sender_id,
        content=send.content,
        content_type=send.content_type,
        status=0,
        create_at=send.now,
        update_at=send.now,
        client_msg_id=send.client_msg_id,
        private=send.private,
        rev=rev,
    )


# --- the webhook outbox ---------------------------------------------------------------------------

OUTBOX_COLUMNS = "id, event_id, url, type, occurred_at, data, attempts"
# (event_id, url, type, occurred_at, data, next_attempt): one event for one URL, due now
OutboxRow = tuple[str, str, str, int, str, int]


def outbox_data(obj: Message | Conversation) -> str:
    """A stored message or conversation as outbox data: its fields by name (orjson writes a
    dataclass as its fields; ``appchat_send_batch_v3`` writes a message's and a
    conversation's the same way); a conversation without its ``last_message``."""
    if isinstance(obj, Conversation):
        fields = {k: getattr(obj, k) for k in CONVERSATION_FIELDS}
        return orjson.dumps(fields).decode()
    return orjson.dumps(obj).decode()


CONVERSATION_FIELDS = (
    "id",
    "application_id",
    "create_at",
    "update_at",
    "status",
    "assignee_id",
    "snooze_until",
    "rev",
)


def outbox_read(application_id: int, reader_id: int, message_id: int) -> str:
    return orjson.dumps(
        {"application_id": application_id, "reader_id": reader_id, "message_id": message_id}
    ).decode()


def outbox_rows(urls: Sequence[str], kind: str, occurred_at: int, data: str) -> list[OutboxRow]:
    """One event's rows: (event_id, url, type, occurred_at, data, next_attempt), due now."""
    event_id = str(uuid.uuid4())
    return [(event_id, url, kind, occurred_at, data, occurred_at) for url in urls]


def message_rows(urls: Sequence[str], m: Message, kind: str = MESSAGE_CREATED) -> list[OutboxRow]:
    """``message.created`` at its creation; ``message.updated`` or ``message.deleted`` at
    its change."""
    at = m.create_at if kind == MESSAGE_CREATED else m.update_at
    return outbox_rows(urls, kind, at, outbox_data(m))


def read_rows(
    urls: Sequence[str], application_id: int, reader_id: int, message_id: int, now: int
) -> list[OutboxRow]:
    return outbox_rows(urls, MESSAGE_READ, now, outbox_read(application_id, reader_id, message_id))


def conversation_rows(urls: Sequence[str], c: Conversation) -> list[OutboxRow]:
    return outbox_rows(urls, CONVERSATION_CREATED, c.create_at, outbox_data(c))


def conversation_updated_rows(urls: Sequence[str], c: Conversation, now: int) -> list[OutboxRow]:
    return outbox_rows(urls, CONVERSATION_UPDATED, now, outbox_data(c))


def webhook_event_of(row: Sequence[Any], lease: int) -> WebhookEvent:
    row_id, event_id, url, kind, occurred_at, data, attempts = row
    return WebhookEvent(row_id, event_id, url, kind, occurred_at, data, attempts, lease)
