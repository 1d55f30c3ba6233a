"""The wire protocol: parse request frames into typed events, serialise replies and pushes.

Pure code: text in, typed values (or a precise :class:`FrameError`) out; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson

from .errors import AppError, BadRequest, RateLimited, UnknownEvent
from .models import (
    AVAILABILITIES,
    EVERY_CONVERSATION,
    MAX_ID,
    SNOOZED,
    STATUSES,
    TEXT,
    ActivityKey,
    Conversation,
    DeskFilter,
    Message,
    UnreadCount,
    UnreadPage,
    format_ts,
)

ADD_CONVERSATION = "Event.AddConversation"
GET_CONVERSATION_LIST = "Event.GetConversationList"
GET_MESSAGE_LIST = "Event.GetMessageList"
SEND_MESSAGE = "Event.SendMessage"
RECEIVE_MESSAGE = "Event.ReceiveMessage"
READ_MESSAGE = "Event.ReadMessage"
MESSAGE_READ = "Event.MessageRead"
GET_UNREAD_INFO = "Event.GetUnreadInfo"
REFRESH_TOKEN = "Event.RefreshToken"
RESYNC = "Event.Resync"
TYPING = "Event.Typing"
RECEIVE_TYPING = "Event.ReceiveTyping"
# The support desk (SPEC, third round)
SUBSCRIBE_INBOX = "Event.SubscribeInbox"
UNSUBSCRIBE_INBOX = "Event.UnsubscribeInbox"
CONVERSATION_UPDATED = "Event.ConversationUpdated"
ASSIGN_CONVERSATION = "Event.AssignConversation"
SET_CONVERSATION_STATUS = "Event.SetConversationStatus"
SET_AVAILABILITY = "Event.SetAvailability"
RECEIVE_PRESENCE = "Event.ReceivePresence"
GET_PRESENCE = "Event.GetPresence"
# History (SPEC, third round)
EDIT_MESSAGE = "Event.EditMessage"
DELETE_MESSAGE = "Event.DeleteMessage"
MESSAGE_UPDATED = "Event.MessageUpdated"
CONVERSATION_DELETED = "Event.ConversationDeleted"

INBOX_FILTERS = ("all", "mine", "unassigned")
MAX_STATUSES = 16  # in one GetConversationList ``status`` list (repeats allowed)

DEFAULT_PAGE = 50
MAX_PAGE = 500
DEFAULT_LIST_PAGE = 100  # conversations in a GetConversationList/GetUnreadInfo page
MAX_LIST_PAGE = 1000
MAX_CURSOR_LEN = 64
MAX_CHANNEL_LEN = 64
MAX_CLIENT_MSG_ID_LEN = 64
MAX_TOKEN_LEN = 8192
# The server API's Idempotency-Keys share the stores' exactly-once rule with client_msg_id
# but not its values: a key is stored behind this prefix of MAX_CLIENT_MSG_ID_LEN
# characters, longer than any client_msg_id can be, so no client (a staff member who
# guesses a backend's key) ever matches one. Messages show the key without it.
API_KEY_PREFIX = "server-api:".ljust(MAX_CLIENT_MSG_ID_LEN, "_")

RequestId = str | int | float


class FrameError(Exception):
    """A frame that cannot be served; carries what the error reply needs."""

    def __init__(self, error: AppError, name: str | None, request_id: RequestId | None) -> None:
        super().__init__(error.message)
        self.error = error
        self.name = name
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Request:
    name: str
    args: dict[str, Any]
    id: RequestId | None


@dataclass(frozen=True, slots=True)
class AddConversationArgs:
    application_id: int
    user_id: int | None


@dataclass(frozen=True, slots=True)
class GetConversationListArgs:
    user_id: int | None
    all: bool
    limit: int = DEFAULT_LIST_PAGE
    cursor: ActivityKey | None = None
    statuses: tuple[str, ...] = ()
    assignee: int | Literal["any", "me"] | None = "any"

    def desk(self, me: int) -> DeskFilter:
        """The desk filters, ``"me"`` being ``me``."""
        if not self.statuses and self.assignee == "any":
            return EVERY_CONVERSATION
        return DeskFilter(self.statuses, me if self.assignee == "me" else self.assignee)


@dataclass(frozen=True, slots=True)
class AssignArgs:
    session_channel: str
    assignee_id: int | None


@dataclass(frozen=True, slots=True)
class SetStatusArgs:
    session_channel: str
    status: str
    snooze_until: int | None  # microseconds since the epoch, UTC


@dataclass(frozen=True, slots=True)
class GetMessageListArgs:
    session_channel: str
    executor_id: int | None
    before_id: int | None
    after_id: int | None
    limit: int
    changed_since: int | None = None  # a rev: what was created or changed after it


@dataclass(frozen=True, slots=True)
class EditMessageArgs:
    id: int
    content: str


@dataclass(frozen=True, slots=True)
class SendMessageArgs:
    session_channel: str
    sender_id: int | None
    content: str
    content_type: int
    client_msg_id: str | None
    private: bool = False


@dataclass(frozen=True, slots=True)
class ReadMessageArgs:
    session_channel: str
    executor_id: int | None
    message_id: int


@dataclass(frozen=True, slots=True)
class GetUnreadInfoArgs:
    user_id: int | None
    limit: int = DEFAULT_LIST_PAGE
    cursor: ActivityKey | None = None


@dataclass(frozen=True, slots=True)
class TypingArgs:
    session_channel: str
    user_id: int | None


@dataclass(frozen=True, slots=True)
class RefreshTokenArgs:
    token: str


# --- parsing -------------------------------------------------------------------------------


def parse_request(frame: str | bytes) -> Request:
    """Read one text frame into a :class:`Request`; ``args`` may be a JSON string or object."""
    try:
        doc = orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise FrameError(BadRequest("frame is not valid JSON"), None, None) from None
    if not isinstance(doc, dict):
        raise FrameError(BadRequest("frame must be a JSON object"), None, None)
    request_id = doc.get("id")
    if request_id is not None and (
        isinstance(request_id, bool) or not isinstance(request_id, str | int | float)
    ):
        raise FrameError(BadRequest('"id" must be a string or a number'), None, None)
    name = doc.get("name")
    if not isinstance(name, str):
        raise FrameError(BadRequest('"name" must be a string'), None, request_id)
    raw = doc.get("args")
    if raw is None:
        args: Any = {}
    elif isinstance(raw, str):
        try:
            args = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise FrameError(BadRequest('"args" is not valid JSON'), name, request_id) from None
    else:
        args = raw
    if not isinstance(args, dict):
        raise FrameError(BadRequest('"args" must be a JSON object'), name, request_id)
    return Request(name=name, args=args, id=request_id)


def _int(args: dict[str, Any], key: str, *, minimum: int = 1) -> int | None:
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key} must be an integer")
    if value < minimum or value > MAX_ID:
        raise BadRequest(f"{key} must be between {minimum} and {MAX_ID}")
    return value


def _required_int(args: dict[str, Any], key: str, *, minimum: int = 1) -> int:
    value = _int(args, key, minimum=minimum)
    if value is None:
        raise BadRequest(f"{key} is required")
    return value


def _channel(args: dict[str, Any]) -> str:
    value = args.get("session_channel")
    if value is None:
        raise BadRequest("session_channel is required")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise BadRequest("session_channel must be a string")
    if not value or len(value) > MAX_CHANNEL_LEN:
        raise BadRequest(f"session_channel must be 1 to {MAX_CHANNEL_LEN} characters")
    return value


def _content(args: dict[str, Any], max_len: int) -> str:
    value = args.get("content")
    if value is None:
        raise BadRequest("content is required")
    if not isinstance(value, str):
        raise BadRequest("content must be a string")
    if not value:
        raise BadRequest("content must not be empty")
    if len(value) > max_len:
        raise BadRequest(f"content is longer than {max_len} characters")
    if "\x00" in value:
        raise BadRequest("content must not contain U+0000")
    return value


def _content_type(args: dict[str, Any]) -> int:
    # The original: absent, or anything other than 1 or 2, means text.
    value = args.get("content_type")
    if isinstance(value, int) and not isinstance(value, bool) and value in (1, 2):
        return value
    return TEXT


def _client_msg_id(args: dict[str, Any]) -> str | None:
    value = args.get("client_msg_id")
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_CLIENT_MSG_ID_LEN:
        raise BadRequest(
            f"client_msg_id must be a string of 1 to {MAX_CLIENT_MSG_ID_LEN} characters"
        )
    if "\x00" in value:  # PostgreSQL text cannot hold it; refused alike on every store
        raise BadRequest("client_msg_id must not contain U+0000")
    return value


def parse_add_conversation(args: dict[str, Any]) -> AddConversationArgs:
    return AddConversationArgs(
        application_id=_required_int(args, "application_id"), user_id=_int(args, "user_id")
    )


def parse_get_conversation_list(args: dict[str, Any]) -> GetConversationListArgs:
    everything = args.get("all", False)
    if everything is None:
        everything = False
    if not isinstance(everything, bool):
        raise BadRequest("all must be a boolean")
    return GetConversationListArgs(
        user_id=_int(args, "user_id"),
        all=everything,
        limit=_list_limit(args),
        cursor=_cursor(args),
        statuses=_statuses(args.get("status")),
        assignee=_assignee_filter(args.get("assignee")),
    )


def _status(value: Any, key: str = "status") -> str:
    if not isinstance(value, str) or value not in STATUSES:
        raise BadRequest(f"{key} must be one of {', '.join(STATUSES)}")
    return value


def _statuses(value: Any) -> tuple[str, ...]:
    """GetConversationList's ``status``: a status or a list of them (none: any)."""
    if value is None:
        return ()
    if isinstance(value, list):
        if not value or len(value) > MAX_STATUSES:
            raise BadRequest(f"status must be a status or a list of 1 to {MAX_STATUSES}")
        return tuple(sorted({_status(v) for v in value}))
    return (_status(value),)


def _assignee_filter(value: Any) -> int | Literal["any", "me"] | None:
    if value is None:
        return "any"
    if value == "me":
        return "me"
    if value == "none":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ID:
        return value
    raise BadRequest(f'assignee must be "me", "none" or a staff id (1 to {MAX_ID})')


def parse_timestamp(value: Any, key: str) -> int:
    """An RFC 3339 time with its offset, as microseconds since the epoch (UTC)."""
    if not isinstance(value, str) or not 10 <= len(value) <= 40:
        raise BadRequest(f"{key} must be an RFC 3339 time, e.g. 2030-01-31T09:00:00Z")
    try:
        when = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        raise BadRequest(f"{key} must be an RFC 3339 time, e.g. 2030-01-31T09:00:00Z") from None
    if when.tzinfo is None:
        raise BadRequest(f"{key} must give its offset (Z for UTC)")
    seconds = when.timestamp()
    if not 0 <= seconds < 2**53 / 1_000_000:
        raise BadRequest(f"{key} is out of range")
    return round(seconds * 1_000_000)


def parse_subscribe_inbox(args: dict[str, Any]) -> str:
    value = args.get("filter")
    if value is None:
        return "all"
    if not isinstance(value, str) or value not in INBOX_FILTERS:
        raise BadRequest(f"filter must be one of {', '.join(INBOX_FILTERS)}")
    return value


def parse_assign(args: dict[str, Any]) -> AssignArgs:
    if "assignee_id" not in args:
        raise BadRequest("assignee_id is required (a staff id, or null for nobody)")
    return AssignArgs(session_channel=_channel(args), assignee_id=_int(args, "assignee_id"))


def parse_set_status(args: dict[str, Any]) -> SetStatusArgs:
    channel = _channel(args)
    status = _status(args.get("status"))
    raw = args.get("snooze_until")
    if status == SNOOZED:
        if raw is None:
            raise BadRequest("snooze_until is required with status snoozed")
        return SetStatusArgs(channel, status, parse_timestamp(raw, "snooze_until"))
    if raw is not None:
        raise BadRequest("snooze_until is only for status snoozed")
    return SetStatusArgs(channel, status, None)


def parse_set_availability(args: dict[str, Any]) -> str:
    value = args.get("availability")
    if not isinstance(value, str) or value not in AVAILABILITIES:
        raise BadRequest(f"availability must be one of {', '.join(AVAILABILITIES)}")
    return value


def parse_get_presence(args: dict[str, Any]) -> str | None:
    """GetPresence's ``session_channel``; ``None``: the whole desk (staff)."""
    if args.get("session_channel") is None:
        return None
    return _channel(args)


def _list_limit(args: dict[str, Any]) -> int:
    limit = args.get("limit")
    if limit is None:
        return DEFAULT_LIST_PAGE
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_PAGE:
        raise BadRequest(f"limit must be an integer between 1 and {MAX_LIST_PAGE}")
    return limit


def _cursor(args: dict[str, Any]) -> ActivityKey | None:
    """The ``next_cursor`` of an earlier page: ``"<update_at>_<id>"`` (opaque to clients)."""
    value = args.get("cursor")
    if value is None:
        return None
    if isinstance(value, str) and len(value) <= MAX_CURSOR_LEN:
        update_at, sep, conversation_id = value.partition("_")
        if sep and update_at.isdigit() and conversation_id.isdigit() and update_at.isascii():
            key = (int(update_at), int(conversation_id))
            if key[0] <= MAX_ID and 1 <= key[1] <= MAX_ID and conversation_id.isascii():
                return key
    raise BadRequest("cursor must be the next_cursor of an earlier page")


def cursor_of(key: ActivityKey) -> str:
    return f"{key[0]}_{key[1]}"


def parse_get_message_list(args: dict[str, Any]) -> GetMessageListArgs:
    before_id = _int(args, "before_id", minimum=0)
    after_id = _int(args, "after_id", minimum=0)
    changed_since = _int(args, "changed_since", minimum=0)
    if sum(x is not None for x in (before_id, after_id, changed_since)) > 1:
        raise BadRequest("give at most one of before_id, after_id and changed_since")
    limit = args.get("limit")
    if limit is None:
        limit = DEFAULT_PAGE
    elif isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise BadRequest(f"limit must be an integer between 1 and {MAX_PAGE}")
    return GetMessageListArgs(
        session_channel=_channel(args),
        executor_id=_int(args, "executor_id"),
        before_id=before_id,
        after_id=after_id,
        limit=limit,
        changed_since=changed_since,
    )


def parse_send_message(args: dict[str, Any], max_content: int) -> SendMessageArgs:
    return SendMessageArgs(
        session_channel=_channel(args),
        sender_id=_int(args, "sender_id"),
        content=_content(args, max_content),
        content_type=_content_type(args),
        client_msg_id=_client_msg_id(args),
        private=_flag(args, "private"),
    )


def _flag(args: dict[str, Any], key: str) -> bool:
    value = args.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be a boolean")
    return value


def parse_edit_message(args: dict[str, Any], max_content: int) -> EditMessageArgs:
    return EditMessageArgs(id=_required_int(args, "id"), content=_content(args, max_content))


def parse_delete_message(args: dict[str, Any]) -> int:
    return _required_int(args, "id")


def parse_read_message(args: dict[str, Any]) -> ReadMessageArgs:
    return ReadMessageArgs(
        session_channel=_channel(args),
        executor_id=_int(args, "executor_id"),
        message_id=_required_int(args, "message_id"),
    )


def parse_get_unread_info(args: dict[str, Any]) -> GetUnreadInfoArgs:
    return GetUnreadInfoArgs(
        user_id=_int(args, "user_id"), limit=_list_limit(args), cursor=_cursor(args)
    )


def parse_refresh_token(args: dict[str, Any]) -> RefreshTokenArgs:
    token = args.get("token")
    if not isinstance(token, str) or not token:
        raise BadRequest("token must be a non-empty string")
    if len(token) > MAX_TOKEN_LEN:
        raise BadRequest(f"token is longer than {MAX_TOKEN_LEN} characters")
    return RefreshTokenArgs(token=token)


def parse_typing(args: dict[str, Any]) -> TypingArgs:
    return TypingArgs(session_channel=_channel(args), user_id=_int(args, "user_id"))


def unknown_event(name: str) -> UnknownEvent:
    shown = name if len(name) <= 64 else name[:64] + "..."
    return UnknownEvent(f"unknown event {shown!r}")


# --- serialising ---------------------------------------------------------------------------


def conversation_obj(c: Conversation) -> dict[str, Any]:
    return {
        "id": c.id,
        "session_channel": c.session_channel,
        "application_id": c.application_id,
        "create_at": format_ts(c.create_at),
        "update_at": format_ts(c.update_at),
        "status": c.status,
        "assignee_id": c.assignee_id,
        "snooze_until": None if c.snooze_until is None else format_ts(c.snooze_until),
        "last_message": None if c.last_message is None else message_obj(c.last_message),
        "rev": c.rev,
    }


def message_obj(m: Message) -> dict[str, Any]:
    created = format_ts(m.create_at)
    obj: dict[str, Any] = {
        "id": m.id,
        "session_channel": m.session_channel,
        "content": m.content,
        "sender_id": m.sender_id,
        "status": m.status,
        "create_at": created,
        "update_at": created if m.update_at == m.create_at else format_ts(m.update_at),
        "content_type": m.content_type,
    }
    if m.client_msg_id is not None:
        obj["client_msg_id"] = shown_client_msg_id(m.client_msg_id)
    if m.sender_name is not None:
        obj["sender_name"] = m.sender_name
    if m.private:
        obj["private"] = True
    if m.edited_at is not None:
        obj["edited_at"] = format_ts(m.edited_at)
    if m.deleted:
        obj["deleted"] = True
    obj["rev"] = m.rev
    return obj


def api_client_msg_id(idempotency_key: str) -> str:
    """How the store keeps a server API ``Idempotency-Key`` (see ``API_KEY_PREFIX``)."""
    return API_KEY_PREFIX + idempotency_key


def shown_client_msg_id(stored: str) -> str:
    """A stored ``client_msg_id`` as messages show it: an API key without its prefix."""
    if len(stored) > MAX_CLIENT_MSG_ID_LEN and stored.startswith(API_KEY_PREFIX):
        return stored[len(API_KEY_PREFIX) :]
    return stored


def message_list(messages: list[Message], has_more: bool) -> dict[str, Any]:
    return {"Messages": [message_obj(m) for m in messages], "has_more": has_more}


MESSAGE_OVERHEAD = 512  # bytes of a serialised message besides its content, at most


def message_list_within(
    messages: list[Message], has_more: bool, max_bytes: int, *, keep_newest: bool
) -> dict[str, Any]:
    """A GetMessageList result whose messages take at most ``max_bytes`` serialised.

    A page that would be bigger holds fewer messages, those nearest the cursor (the
    newest for a page walking back, the oldest for an ``after_id`` page), and says
    ``has_more``: paging on from its first (or last) id loses nothing. One message is
    always kept, whatever its size.
    """
    # Content is at most 4 bytes a code point in UTF-8, 6 escaped: most pages are far
    # below the bound and are serialised as they are.
    if sum(len(m.content) for m in messages) * 6 + MESSAGE_OVERHEAD * len(messages) <= max_bytes:
        return message_list(messages, has_more)
    kept: list[bytes] = []
    total = 0
    for m in reversed(messages) if keep_newest else messages:
        encoded = orjson.dumps(message_obj(m))
        if kept and total + len(encoded) + 1 > max_bytes:  # (+1: its comma)
            has_more = True
            break
        kept.append(encoded)
        total += len(encoded) + 1
    if keep_newest:
        kept.reverse()
    return {"Messages": [orjson.Fragment(e) for e in kept], "has_more": has_more}


def unread_info(counts: list[UnreadCount]) -> dict[str, Any]:
    return {
        "total": sum(c.unread for c in counts),
        "conversations": [
            {
                "session_channel": str(c.application_id),
                "application_id": c.application_id,
                "unread": c.unread,
            }
            for c in counts
        ],
    }


def conversation_page(conversations: list[Conversation], has_more: bool) -> dict[str, Any]:
    """GetConversationList's result: the seed's ``conversations`` and where to go on."""
    last = conversations[-1] if has_more and conversations else None
    return {
        "conversations": [conversation_obj(c) for c in conversations],
        "has_more": has_more,
        "next_cursor": None if last is None else cursor_of((last.update_at, last.id)),
    }


def unread_page(page: UnreadPage) -> dict[str, Any]:
    """GetUnreadInfo's result: ``total`` over every conversation, a page of them."""
    result = unread_info(page.counts)
    result["total"] = page.total
    result["has_more"] = page.has_more
    result["next_cursor"] = (
        cursor_of(page.last) if page.has_more and page.last is not None else None
    )
    return result


def message_read(application_id: int, reader_id: int, message_id: int) -> dict[str, Any]:
    return {
        "session_channel": str(application_id),
        "reader_id": reader_id,
        "message_id": message_id,
    }


def presence_obj(user_id: int, staff: bool, availability: str, name: str | None) -> dict[str, Any]:
    """A participant in GetPresence's result (``name`` only when known)."""
    obj: dict[str, Any] = {"user_id": user_id, "staff": staff, "availability": availability}
    if name is not None:
        obj["name"] = name
    return obj


def conversation_deleted(application_id: int) -> dict[str, Any]:
    return {"session_channel": str(application_id), "application_id": application_id}


def receive_presence(user_id: int, availability: str) -> dict[str, Any]:
    return {"user_id": user_id, "availability": availability}


def receive_typing(application_id: int, user_id: int) -> dict[str, Any]:
    return {
        "session_channel": str(application_id),
        "application_id": application_id,
        "user_id": user_id,
    }


def reply(name: str, result: Any, request_id: RequestId | None = None) -> bytes:
    doc: dict[str, Any] = {"name": name, "ok": True, "result": result}
    if request_id is not None:
        doc["id"] = request_id
    return orjson.dumps(doc)


def error_reply(name: str | None, error: AppError, request_id: RequestId | None = None) -> bytes:
    doc: dict[str, Any] = {
        "name": name,
        "ok": False,
        "result": None,
        "error": {"code": error.code, "message": error.message},
    }
    if request_id is not None:
        doc["id"] = request_id
    return orjson.dumps(doc)


def rate_limited_reply(frame: str | None) -> bytes:
    """The reply to a frame refused unread: echo its name and id when cheaply readable."""
    name: str | None = None
    request_id: RequestId | None = None
    if frame is not None:
        try:
            request = parse_request(frame)
            name, request_id = request.name, request.id
        except FrameError as exc:
            name, request_id = exc.name, exc.request_id
    return error_reply(name, RateLimited(), request_id)


def push(name: str, result: Any) -> bytes:
    return orjson.dumps({"name": name, "ok": True, "result": result})
