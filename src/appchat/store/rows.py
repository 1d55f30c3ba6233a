"""What the SQL backends share: the selected columns, row mapping and page assembly."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..models import Conversation, Message, MessagePage

CONVERSATION_COLUMNS = "c.id, c.application_id, c.create_at, c.update_at"
MESSAGE_COLUMNS = (
    "m.id, c.application_id, m.sender_id, m.content, m.content_type, m.status, "
    "m.create_at, m.update_at, m.client_msg_id"
)
SELECT_MESSAGES = (
    f"SELECT {MESSAGE_COLUMNS} FROM messages m JOIN conversations c ON c.id = m.conversation_id "
)
SELECT_ALL_CONVERSATIONS = (
    f"SELECT {CONVERSATION_COLUMNS} FROM conversations c ORDER BY c.update_at DESC, c.id DESC "
    "LIMIT "
)
NEWEST = 2**63 - 1  # the ``before_id`` cursor of the default page


def conversation_of(row: Sequence[Any]) -> Conversation:
    return Conversation(id=row[0], application_id=row[1], create_at=row[2], update_at=row[3])


def message_of(row: Sequence[Any]) -> Message:
    return Message(*row)


def page_of(rows: list[Any], limit: int, *, newest_first: bool) -> MessagePage:
    """``rows`` were fetched with ``LIMIT limit + 1``: the extra one says there is more."""
    has_more = len(rows) > limit
    rows = rows[:limit]
    if newest_first:
        rows.reverse()
    return MessagePage(messages=[message_of(r) for r in rows], has_more=has_more)
