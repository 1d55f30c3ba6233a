"""Plain values shared by every layer: conversations, messages, principals."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import lru_cache
from typing import Literal, NamedTuple

MAX_ID = 2**63 - 1

TEXT = 1  # content_type; 2 is an image


def now_us() -> int:
    """Wall-clock time in microseconds since the epoch (UTC)."""
    return time.time_ns() // 1000


def format_ts(us: int) -> str:
    """RFC 3339 in UTC with microseconds, e.g. ``2020-03-06T03:29:29.321142Z``."""
    secs, frac = divmod(us, 1_000_000)
    return f"{_second(secs)}.{frac:06d}Z"


@lru_cache(maxsize=4096)
def _second(secs: int) -> str:
    # Formatting the date and time is most of the cost, and messages come many a second.
    return datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")


class Role(StrEnum):
    STAFF = "staff"
    CUSTOMER = "customer"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a connection is: the acting participant id and what the token allows."""

    sid: int
    role: Role
    application_id: int | None  # the one application of a customer
    bound: bool  # the token itself names the participant id
    exp: float
    subject: str  # "admin:N" or "request:N": the identity a refreshed token must keep
    name: str | None = None  # the token's display name, kept per participant

    @property
    def is_staff(self) -> bool:
        return self.role is Role.STAFF

    def may_read_application(self, application_id: int) -> bool:
        return self.is_staff or self.application_id == application_id


OPEN, PENDING, RESOLVED, SNOOZED = "open", "pending", "resolved", "snoozed"
STATUSES = (OPEN, PENDING, RESOLVED, SNOOZED)  # a conversation's desk status
REOPENED_BY_CUSTOMER = (RESOLVED, SNOOZED)  # a customer's message makes these open again
AVAILABILITIES = ("online", "busy", "offline")  # a staff member's presence


@dataclass(frozen=True, slots=True)
class Conversation:
    id: int
    application_id: int
    create_at: int  # microseconds since the epoch, UTC
    update_at: int
    status: str = OPEN
    assignee_id: int | None = None
    snooze_until: int | None = None  # microseconds since the epoch, UTC
    rev: int = 0  # grows with every change: a message, a status, an assignee
    last_message: Message | None = None  # the newest message, where the reader asked for it

    @property
    def session_channel(self) -> str:
        return str(self.application_id)


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    application_id: int
    sender_id: int
    content: str
    content_type: int
    status: int
    create_at: int
    update_at: int
    client_msg_id: str | None = None
    sender_name: str | None = None  # the sender's display name, the latest one seen
    private: bool = False  # a staff-only note
    rev: int = 0  # the conversation's revision its creation, or its latest change, took
    edited_at: int | None = None
    deleted: bool = False  # a stub: its content is gone

    @property
    def session_channel(self) -> str:
        return str(self.application_id)


@dataclass(frozen=True, slots=True)
class Participant:
    user_id: int
    staff: bool
    name: str | None


@dataclass(frozen=True, slots=True)
class UnreadCount:
    application_id: int
    unread: int


@dataclass(frozen=True, slots=True)
class MessagePage:
    messages: list[Message]
    has_more: bool


@dataclass(frozen=True, slots=True)
class SendOutcome:
    message: Message
    created: bool  # False when client_msg_id matched an earlier message
    participants: list[int]  # who gets the push (empty for a retry: nothing is pushed)
    # The conversation as the send's batch left it (``last_message`` not filled in; the
    # message's own ``rev`` is the conversation's revision right after it); ``None`` for
    # a retry. ``reopened``: the message was a customer's and made it open again.
    conversation: Conversation | None = None
    reopened: bool = False


@dataclass(frozen=True, slots=True)
class MessageChange:
    """A message after an edit or a deletion: who gets its push (only staff for a private
    note), and its conversation after it (``None``: nothing changed)."""

    message: Message
    participants: list[int]
    conversation: Conversation | None


@dataclass(frozen=True, slots=True)
class ConversationChange:
    """A conversation after a change of its status or assignee (Assign/SetStatus, a
    snooze falling due); ``before`` as it was, to tell who saw it leave their filter."""

    conversation: Conversation
    before: Conversation


@dataclass(frozen=True, slots=True)
class ReadOutcome:
    moved: bool  # the reader's position advanced
    participants: list[int]


class DeskFilter(NamedTuple):
    """GetConversationList's desk filters: statuses (empty: any) and the assignee
    (``"any"``, ``None`` for unassigned, or an id)."""

    statuses: tuple[str, ...] = ()
    assignee: int | Literal["any"] | None = "any"


EVERY_CONVERSATION = DeskFilter()


ActivityKey = tuple[int, int]
"""Where a list by activity stands: (``update_at``, ``id``) of the last conversation seen."""


@dataclass(frozen=True, slots=True)
class ConversationPage:
    conversations: list[Conversation]
    has_more: bool


@dataclass(frozen=True, slots=True)
class UnreadPage:
    counts: list[UnreadCount]
    total: int  # over every conversation of the user, not only this page
    has_more: bool
    last: ActivityKey | None  # the key of the page's last conversation


# Webhook events (docs/api.md, "Webhooks"): the stores record them, webhooks/dispatcher.py
# delivers them.
MESSAGE_CREATED = "message.created"
MESSAGE_READ = "message.read"
MESSAGE_UPDATED = "message.updated"
MESSAGE_DELETED = "message.deleted"
CONVERSATION_CREATED = "conversation.created"
CONVERSATION_UPDATED = "conversation.updated"
CONVERSATION_DELETED = "conversation.deleted"


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """One outbox row claimed for delivery to ``url``."""

    row: int  # the outbox row
    event_id: str  # the same for every URL and every attempt
    url: str
    type: str
    occurred_at: int  # microseconds since the epoch, UTC
    data: str  # the changed object, JSON (store/rows.py: outbox_*)
    attempts: int  # failed attempts so far
    lease: int  # the claim: the row's next_attempt while this delivery is under way


@dataclass(frozen=True, slots=True)
class WebhookFailure:
    """A delivery that failed: when to try again (``None``: given up)."""

    row: int
    lease: int  # only the claim that still holds the row may reschedule it
    attempts: int
    next_attempt: int | None
    error: str


@dataclass(frozen=True, slots=True)
class WebhookBacklog:
    """The outbox rows of one URL: waiting, given up, and when the next one is due."""

    pending: int
    dead: int
    next_due: int | None
