"""Storage: one interface, implementations chosen by URL (``sqlite:///…`` by default)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..protocol import defaults
from ..protocol.errors import ConfigError
from ..protocol.models import (
    EVERY_CONVERSATION,
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
from .lifecycle import ErasedConversation, ErasedParticipant, Expired, ExportedParticipant

if TYPE_CHECKING:
    from .notices import NoticeRound


class Store(Protocol):
    """Durable conversations, messages and read positions.

    Every write returns only after its transaction committed. Faults of the database are
    raised as :class:`appchat.protocol.errors.Unavailable`.
    """

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise ``Unavailable`` when the database cannot serve."""

    async def get_conversation(self, application_id: int) -> Conversation | None: ...

    async def is_staff_participant(self, conversation_id: int, user_id: int) -> bool: ...

    async def add_conversation(
        self, application_id: int, user_id: int, *, staff: bool, now: int
    ) -> Conversation:
        """Create the conversation of an application once; add ``user_id`` as a participant."""

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
        """Conversations ``user_id`` takes part in (``None``: every conversation), newest
        activity first (``update_at``, then ``id``, descending): at most ``limit`` of those
        after the key ``after`` (the (``update_at``, ``id``) of the last one seen), within
        the ``desk`` filter; each with its ``last_message`` (``public``: the last one a
        customer may see, no private note)."""

    async def view_conversation(
        self, application_id: int, *, public: bool = False
    ) -> Conversation | None:
        """The conversation with its ``last_message`` (``public``: as a customer sees it)."""

    async def set_status(
        self, conversation: Conversation, status: str, snooze_until: int | None, *, now: int
    ) -> ConversationChange:
        """Set the desk status (``snooze_until`` kept only with ``snoozed``). A change takes
        the conversation's next ``rev`` and is recorded as ``conversation.updated``; when
        nothing changes, ``before`` is ``conversation``."""

    async def assign(
        self,
        conversation: Conversation,
        assignee_id: int | None,
        *,
        now: int,
        unassigned_only: bool = False,
    ) -> ConversationChange:
        """Set the assignee (who joins as a staff participant); as ``set_status``.
        ``unassigned_only``: only if nobody is assigned (decided in the write)."""

    async def open_counts(self, assignees: Sequence[int]) -> dict[int, int]:
        """How many conversations each of ``assignees`` has open or pending (none: left
        out)."""

    async def wake_snoozed(self, *, now: int, limit: int) -> list[ConversationChange]:
        """Open the snoozed conversations due at ``now`` (at most ``limit``); a conversation
        is woken once, whichever node asks."""

    async def unread_page(
        self,
        user_id: int,
        *,
        application_id: int | None = None,
        limit: int,
        after: ActivityKey | None = None,
    ) -> UnreadPage:
        """Unread counts of the conversations ``user_id`` takes part in, a page at a time,
        in ``conversation_page``'s order; ``total`` sums every conversation of the user."""

    async def list_messages(
        self,
        conversation: Conversation,
        *,
        before_id: int | None = None,
        after_id: int | None = None,
        limit: int,
        public: bool = False,
    ) -> MessagePage:
        """A page of messages, oldest first (``public``: no private note)."""

    async def get_message(self, message_id: int) -> Message | None: ...

    async def changed_messages(
        self, conversation: Conversation, *, since: int, limit: int, public: bool = False
    ) -> MessagePage:
        """The messages created or changed after revision ``since``, by ``rev``."""

    async def edit_message(
        self, conversation: Conversation, message_id: int, content: str, *, now: int
    ) -> MessageChange:
        """Replace the message's content: the conversation's next ``rev``, recorded as
        ``message.updated``; ``BadRequest`` for a deleted one, ``NotFound`` for one not in
        the conversation."""

    async def delete_message(
        self, conversation: Conversation, message_id: int, *, now: int
    ) -> MessageChange:
        """Make the message a stub (empty content, ``deleted``): the next ``rev``, recorded
        as ``message.deleted``; a stub again changes nothing (``conversation`` ``None``)."""

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
    ) -> Awaitable[SendOutcome]:
        """Hand a message to storage at once and return what completes when it committed
        (or failed): messages handed over one after another are stored in that order, and
        may share a transaction (a connection's pipelined sends do).

        Store a message (once per ``client_msg_id``) and make the sender a participant;
        the message takes the conversation's next ``rev``, and a customer's (not ``staff``)
        makes a resolved or snoozed conversation open again (``SendOutcome.reopened``,
        recorded as ``conversation.updated``). ``private``: a staff-only note, pushed to the
        staff participants only (``SendOutcome.participants``).

        ``guard_staff``: refuse with ``Forbidden``, in the same transaction, when the
        sender is a staff participant of the conversation (a customer acting as staff).
        """

    async def read_messages(
        self, conversation: Conversation, *, reader_id: int, staff: bool, message_id: int, now: int
    ) -> ReadOutcome:
        """Move the reader's position to ``message_id``; ``NotFound`` if not in the conversation."""

    async def participant_ids(self, conversation_id: int) -> list[int]:
        """Every participant of the conversation, in no particular order."""

    async def participant_list(self, conversation_id: int) -> list[Participant]:
        """Every participant of the conversation with its staff flag and name, by id."""

    async def set_participant_name(self, conversation_id: int, user_id: int, name: str) -> None:
        """Keep ``name`` as the participant's display name (``sender_name`` of their
        messages); nothing when ``user_id`` takes no part in the conversation."""

    # --- the webhook outbox (appchat/webhooks/dispatcher.py) -------------------------------------

    def record_webhooks(self, urls: Sequence[str], wake: Callable[[], None]) -> None:
        """From now on, write the events of every change into the outbox, one row per URL,
        in the change's own transaction, and call ``wake`` on the event loop after a commit
        that wrote some. Without this call nothing is recorded (and nothing is paid)."""

    async def claim_webhooks(
        self, url: str, *, now: int, lease_until: int, limit: int
    ) -> list[WebhookEvent]:
        """Take at most ``limit`` rows of ``url`` due at ``now``, oldest first, and hold
        them until ``lease_until`` (their ``next_attempt``): a claim made at the same time,
        on this node or another, gets other rows."""

    async def settle_webhooks(
        self, delivered: Sequence[int], failed: Sequence[WebhookFailure]
    ) -> None:
        """Delete the delivered rows; reschedule the failed ones whose claim still holds."""

    async def webhook_backlog(self, url: str) -> WebhookBacklog: ...

    # --- the data's lifecycle (store/lifecycle.py) -----------------------------------------

    async def export_participants(self, conversation_id: int) -> list[ExportedParticipant]:
        """The participants with their read positions, for an export."""

    async def erase_conversation(
        self, application_id: int, *, now: int
    ) -> ErasedConversation | None:
        """Erase the conversation and everything of it (messages in batches first, then
        the rest in one transaction with the ``conversation.deleted`` event, and what the
        outbox held of it); ``None`` if there is none. Its uploads' files are the
        caller's to delete."""

    async def erase_participant(self, user_id: int, *, now: int) -> ErasedParticipant:
        """Make every message ``user_id`` sent a deleted stub (in batches), then forget
        their participation and what the outbox held of their messages."""

    async def expire(self, *, before: int, limit: int) -> Expired | None:
        """Delete up to ``limit`` of the oldest messages created before ``before`` (counters
        kept exact), and conversations left empty; ``None``: another node is at it."""

    async def upload_used(self, application_id: int, content: str) -> bool:
        """Whether a message of the application's conversation shows this upload."""

    # --- away notices (appchat/chat/notices.py; the tables: store/notices.py) --------------------

    async def mark_seen(self, user_ids: Sequence[int], *, now: int) -> None:
        """Keep ``now`` as the last time each of ``user_ids`` had a connection (a later time
        already kept stays). Nothing while webhooks are not recorded."""

    async def notice_unread(
        self, *, now: int, away_before: int, since: int | None, limit: int
    ) -> NoticeRound:
        """Record a ``participant.unread`` event for each participant (at most ``limit``)
        seen last before ``away_before``, with unread messages and no notice at their read
        position yet; each once, whichever node asks. ``since`` (``None``: all of them)
        looks only at those who became away, or whose conversation had activity, at or after
        it. Nothing while webhooks are not recorded."""

    # --- full-text search (appchat/store/search.py) ----------------------------------------------

    async def search_messages(
        self,
        words: Sequence[str],
        *,
        conversation_id: int | None = None,
        public: bool = False,
        before_id: int | None = None,
        limit: int,
    ) -> MessagePage:
        """Text messages holding every one of ``words`` (as the index splits and folds
        them), newest first, with ids below ``before_id``; only those of
        ``conversation_id`` if given; ``public``: no private notes. Deleted stubs are
        never found; a message is found from the moment its write committed."""


def open_store(
    url: str,
    *,
    synchronous: str = defaults.SQLITE_SYNCHRONOUS,
    busy_timeout: float = defaults.SQLITE_BUSY_TIMEOUT,
    migrate: bool = True,
    shared: bool = False,
) -> Store:
    """Pick the storage implementation for ``url``.

    ``migrate``: apply pending migrations on open; ``shared``: other processes of this
    deployment write the same database (``serve --workers``).
    """
    if url.startswith("sqlite://"):
        from .sqlite import SqliteStore

        return SqliteStore(
            sqlite_path(url),
            synchronous=synchronous,
            busy_timeout=busy_timeout,
            migrate=migrate,
            shared=shared,
        )
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(url, migrate=migrate)
    raise ConfigError(
        f"unsupported database URL {redact_url(url)!r} (expected sqlite:///PATH or postgresql://…)"
    )


def apply_migrations(url: str) -> int:
    """Apply pending schema migrations to the database at ``url``; returns how many."""
    from .migrate import apply_postgres_migrations, apply_sqlite_migrations

    try:
        if url.startswith("sqlite://"):
            path = sqlite_path(url)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return apply_sqlite_migrations(path)
        if url.startswith(("postgresql://", "postgres://")):
            return apply_postgres_migrations(url)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot migrate {redact_url(url)}: {exc}") from exc
    raise ConfigError(
        f"unsupported database URL {redact_url(url)!r} (expected sqlite:///PATH or postgresql://…)"
    )


def sqlite_path(url: str) -> str:
    """``sqlite:///appchat.db`` is relative, ``sqlite:////var/lib/appchat.db`` absolute."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ConfigError(
            f"bad SQLite URL {url!r}: expected sqlite:///relative/path or sqlite:////abs"
        )
    return url[len(prefix) :]


def redact_url(url: str) -> str:
    """``url`` fit for a message or a log line: its password (in the user part or a
    ``password=`` parameter) replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}{':***' if colon else ''}@{host}"
    tail = re.sub(r"(?i)(\bpassword=)[^&]*", r"\1***", tail)
    return f"{scheme}://{netloc}{slash}{tail}"
