"""The data's lifecycle, as plans (see sqlstore.py): what an export reads, erasure of a
conversation or of a participant's messages, and retention's batches.

Erasure leaves nothing of what it erases in the webhook outbox (rows found by the
``application_id`` and ``sender_id`` the outbox reads from each event's data, migrations
sqlite 0009, postgresql 0011); the files of uploads are the caller's to delete once the
transaction committed (a crash between the two leaves files that no message uses, which
the orphan sweep removes).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from itertools import takewhile
from typing import Any

from ..protocol.models import CONVERSATION_DELETED, Conversation, Participant
from .plan import (
    GET_CONVERSATION,
    PARTICIPANTS,
    RECORD_EVENT,
    Plan,
    Step,
    changed,
    exclusive,
    marks,
)
from .rows import conversation_of, outbox_data, outbox_rows

PARTICIPANT_ROWS = (
    "SELECT user_id, is_staff, name, read_position, joined_at FROM participants "
    "WHERE conversation_id = ? ORDER BY user_id"
)
RETENTION_LOCK = 0x61707063686174 + 1  # one node at a time purges (PostgreSQL)
IMAGE = 2  # content_type
LOCK_REV = "SELECT rev FROM conversations WHERE id = ? /*FOR UPDATE*/"


@dataclass(frozen=True, slots=True)
class ExportedParticipant:
    participant: Participant
    read_position: int
    joined_at: int


def export_participants(conversation_id: int) -> Plan[list[ExportedParticipant]]:
    rows = yield Step("rows", PARTICIPANT_ROWS, (conversation_id,))
    return [ExportedParticipant(Participant(r[0], bool(r[1]), r[2]), r[3], r[4]) for r in rows]


# --- erasing a conversation ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ErasedConversation:
    conversation: Conversation
    participants: list[int]  # who had live connections to tell
    uploads: list[str]  # the image messages' contents: their files go after the commit


def erase_messages(conversation_id: int, limit: int) -> Plan[tuple[int, list[str]]]:
    """Delete up to ``limit`` of the conversation's messages (a big conversation goes in
    several transactions, so no request waits behind one long one); how many, and the
    contents of the image messages among them."""
    rows = yield Step(
        "rows",
        "SELECT id, content_type, content FROM messages WHERE conversation_id = ? "
        "ORDER BY id LIMIT ?",
        (conversation_id, limit),
    )
    if not rows:
        return 0, []
    ids = [r[0] for r in rows]
    yield Step("count", f"DELETE FROM messages WHERE id IN ({marks(ids)})", ids)
    return len(ids), [r[2] for r in rows if r[1] == IMAGE]


def erase_conversation(
    application_id: int, now: int, hooks: tuple[str, ...]
) -> Plan[ErasedConversation | None]:
    """The last step of an erasure (after ``erase_messages`` took the bulk): the messages
    left (those that came meanwhile), its participants, what the outbox still holds of
    it, and the conversation; then the ``conversation.deleted`` event."""
    row = yield Step("row", GET_CONVERSATION, (application_id,))
    if row is None:
        return None
    conversation = conversation_of(row)
    cid = conversation.id
    rows = yield Step(
        "rows", "SELECT content_type, content FROM messages WHERE conversation_id = ?", (cid,)
    )
    yield Step("count", "DELETE FROM messages WHERE conversation_id = ?", (cid,))
    participants = list((yield Step("column", PARTICIPANTS, (cid,))))
    yield Step("count", "DELETE FROM participants WHERE conversation_id = ?", (cid,))
    yield Step("count", "DELETE FROM unread_notices WHERE conversation_id = ?", (cid,))
    yield Step("count", "DELETE FROM webhook_outbox WHERE application_id = ?", (application_id,))
    yield Step("count", "DELETE FROM conversations WHERE id = ?", (cid,))
    yield changed(cid)
    if hooks:
        data = outbox_data(conversation)
        yield Step("many", RECORD_EVENT, outbox_rows(hooks, CONVERSATION_DELETED, now, data))
    uploads = [content for content_type, content in rows if content_type == IMAGE]
    return ErasedConversation(conversation, participants, uploads)


# --- erasing a participant -------------------------------------------------------------------


@dataclass(slots=True)
class ErasedParticipant:
    messages: int = 0  # made stubs
    conversations: list[Conversation] = field(default_factory=list)  # (for their caches)
    uploads: list[str] = field(default_factory=list)


def erase_participant(user_id: int, now: int, limit: int) -> Plan[ErasedParticipant]:
    """Make up to ``limit`` of the messages ``user_id`` sent deleted stubs (each the next
    revision of its conversation), then, once none is left, forget their participation
    (read positions, names) and what the outbox holds of their messages. Other
    participants' unread counts do not change: a stub still counts, as any deletion."""
    erased = ErasedParticipant()
    rows = yield Step(  # (found through their conversations: a sender takes part)
        "rows",
        "SELECT m.id, m.conversation_id, m.content_type, m.content FROM messages m "
        "WHERE m.conversation_id IN (SELECT conversation_id FROM participants WHERE user_id = ?) "
        "AND m.sender_id = ? AND NOT m.deleted ORDER BY m.conversation_id, m.id LIMIT ?",
        (user_id, user_id, limit),
    )
    per_conversation = Counter(r[1] for r in rows)
    for cid, count in sorted(per_conversation.items()):
        base = yield Step(
            "value", "SELECT rev FROM conversations WHERE id = ? /*FOR UPDATE*/", (cid,)
        )
        revs = iter(range(int(base) + 1, int(base) + count + 1))
        stubs = [(now, next(revs), r[0]) for r in rows if r[1] == cid]
        yield Step(
            "many",
            "UPDATE messages SET content = '', deleted = TRUE, update_at = ?, rev = ? WHERE id = ?",
            stubs,
        )
        yield Step("count", "UPDATE conversations SET rev = rev + ? WHERE id = ?", (count, cid))
        yield changed(cid)
    erased.messages = len(rows)
    erased.uploads = [r[3] for r in rows if r[2] == IMAGE]
    if len(rows) < limit:  # every message done: the rest goes in this transaction
        cids = yield Step(
            "column", "SELECT conversation_id FROM participants WHERE user_id = ?", (user_id,)
        )
        for cid in cids:
            yield changed(cid)
        yield Step("count", "DELETE FROM participants WHERE user_id = ?", (user_id,))
        yield Step("count", "DELETE FROM unread_notices WHERE user_id = ?", (user_id,))
        yield Step("count", "DELETE FROM seen WHERE user_id = ?", (user_id,))
        yield Step("count", "DELETE FROM webhook_outbox WHERE sender_id = ?", (user_id,))
    return erased


# --- retention ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Expired:
    messages: int
    conversations: list[int]  # emptied and deleted (their ids)
    uploads: list[str]  # contents of the deleted image messages
    application_ids: list[int]  # of the deleted conversations


def expire(before: int, limit: int) -> Plan[Expired | None]:
    """Delete up to ``limit`` of the oldest messages (by id) created before ``before``, keeping
    every counter exact (the conversations' counts, each participant's read count and own
    unread messages), then the conversations left empty. ``None``: another node is at it
    (PostgreSQL), try later."""
    if not (yield exclusive(RETENTION_LOCK)):
        return None
    # Ids grow with the time messages are stored (up to the clocks' skew between nodes),
    # so the expired ones are the oldest ids: read from the front, no index of their own,
    # and a round with nothing to do reads at most ``limit`` rows.
    oldest = yield Step(
        "rows",
        "SELECT id, conversation_id, sender_id, private, content_type, content, create_at "
        "FROM messages ORDER BY id LIMIT ?",
        (limit,),
    )
    rows = list(takewhile(lambda r: r[6] < before, oldest))
    if not rows:
        return Expired(0, [], [], [])
    doomed: dict[int, list[Any]] = {}
    for r in rows:
        doomed.setdefault(r[1], []).append(r)
    emptied: list[int] = []
    applications: list[int] = []
    for cid, gone in sorted(doomed.items()):
        yield Step("value", LOCK_REV, (cid,))
        people = yield Step(
            "rows",
            "SELECT user_id, is_staff, read_position FROM participants WHERE conversation_id = ?",
            (cid,),
        )
        updates = []
        for user_id, staff, position in people:
            read = sum(1 for m in gone if m[0] <= position and (staff or not m[3]))
            own = sum(1 for m in gone if m[0] > position and m[2] == user_id)
            if read or own:
                updates.append((read, own, cid, user_id))
        if updates:
            yield Step(
                "many",
                "UPDATE participants SET read_count = read_count - ?, own_unread = own_unread - ? "
                "WHERE conversation_id = ? AND user_id = ?",
                updates,
            )
        ids = [m[0] for m in gone]
        yield Step("count", f"DELETE FROM messages WHERE id IN ({marks(ids)})", ids)
        private = sum(1 for m in gone if m[3])
        yield Step(
            "count",
            "UPDATE conversations SET message_count = message_count - ?, "
            "private_count = private_count - ? WHERE id = ?",
            (len(gone), private, cid),
        )
        yield changed(cid)
        left = yield Step("value", "SELECT message_count FROM conversations WHERE id = ?", (cid,))
        if not left:
            app = yield Step(
                "value", "SELECT application_id FROM conversations WHERE id = ?", (cid,)
            )
            yield Step("count", "DELETE FROM participants WHERE conversation_id = ?", (cid,))
            yield Step("count", "DELETE FROM unread_notices WHERE conversation_id = ?", (cid,))
            yield Step("count", "DELETE FROM conversations WHERE id = ?", (cid,))
            emptied.append(cid)
            applications.append(int(app))
    uploads = [r[5] for r in rows if r[4] == IMAGE]
    return Expired(len(rows), emptied, uploads, applications)


def upload_used(application_id: int, content: str) -> Plan[bool]:
    """Whether a message of the application's conversation shows this upload."""
    found = yield Step(
        "value",
        "SELECT 1 FROM messages m JOIN conversations c ON c.id = m.conversation_id "
        f"WHERE c.application_id = ? AND m.content_type = {IMAGE} AND m.content = ? LIMIT 1",
        (application_id, content),
    )
    return bool(found)
