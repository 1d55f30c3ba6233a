"""Every request and response shape of the server API, as pydantic models: requests are
validated with them and the OpenAPI document is generated from them. Limits are the
protocol's own (``events``), so both surfaces refuse the same things."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from ...protocol import events as ev
from ...protocol.models import MAX_ID


def _integral(value: Any) -> Any:
    """JSON Schema counts 5.0 as an integer: take it as 5 (a string or a boolean stays out)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2.0**64:
        return int(value)
    return value


Integral = BeforeValidator(_integral)
Id = Annotated[int, Field(ge=1, le=MAX_ID), Integral]
Position = Annotated[
    int, Field(ge=0, le=MAX_ID, description="a message id; 0: the start"), Integral
]
# ``next_cursor`` is "<update_at>_<id>"; 18 digits each keep a valid cursor below 2**63.
CURSOR = r"^[0-9]{1,18}_[1-9][0-9]{0,17}$"
Timestamp = Annotated[
    str, Field(description="RFC 3339, UTC, microseconds", examples=["2020-03-06T03:29:29.321142Z"])
]
ErrorCode = Literal[
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "unsupported_type",
    "unavailable",
    "internal",
]


class ErrorDetail(BaseModel):
    code: ErrorCode = Field(description="stable, the same codes as the WebSocket protocol")
    message: str = Field(description="for people; may change")


class ErrorReply(BaseModel):
    """Every error: a code and a human message."""

    error: ErrorDetail


class MessageOut(BaseModel):
    """A message, as in the WebSocket protocol."""

    id: Id = Field(description="grows in commit order within a conversation (may skip numbers)")
    session_channel: str = Field(description="the application id as a string")
    content: str
    sender_id: Id
    status: int
    create_at: Timestamp
    update_at: Timestamp
    content_type: int = Field(description="1 text, 2 image")
    client_msg_id: str | None = Field(
        default=None, description="the Idempotency-Key (or client_msg_id) it was sent with"
    )
    sender_name: str | None = Field(
        default=None,
        description="the sender's display name (the name claim of their latest token), if any",
    )
    private: bool | None = Field(default=None, description="true: a staff-only note")
    edited_at: Timestamp | None = Field(default=None, description="when it was last edited")
    deleted: bool | None = Field(default=None, description="true: a deleted message's stub")
    rev: int = Field(ge=0, description="the conversation's revision of its latest change")


class MessageReply(BaseModel):
    message: MessageOut


class MessagePageOut(BaseModel):
    """Messages oldest first; ``has_more``: more lie beyond the page in its direction."""

    messages: list[MessageOut]
    has_more: bool


Status = Literal["open", "pending", "resolved", "snoozed"]


class ConversationOut(BaseModel):
    id: Id
    session_channel: str
    application_id: Id
    create_at: Timestamp
    update_at: Timestamp = Field(description="time of the last activity")
    status: Status = Field(description="the desk status; a new conversation is open")
    assignee_id: Id | None = Field(description="the staff member it is assigned to, if any")
    snooze_until: Timestamp | None = Field(description="when a snoozed conversation reopens")
    last_message: MessageOut | None = Field(description="its newest message, if any")
    rev: int = Field(
        ge=0, description="grows with every message and every change of status or assignee"
    )


class ConversationReply(BaseModel):
    conversation: ConversationOut


class ConversationPatch(BaseModel):
    """What to change; a field left out (or a null status or snooze time) stays as it
    is; a null ``assignee_id`` leaves the conversation unassigned."""

    model_config = ConfigDict(extra="forbid", strict=True)

    status: Status | None = Field(
        default=None,
        description="with `snooze_until` when snoozed; a customer's message "
        "reopens a resolved or snoozed conversation, a snoozed one reopens at its time",
    )
    snooze_until: Timestamp | None = Field(
        default=None, description="RFC 3339 with an offset; only with status snoozed"
    )
    assignee_id: Id | None = Field(
        default=None, description="a staff id, or null for nobody; the assignee joins"
    )


class ConversationPageOut(BaseModel):
    """Conversations, newest activity first; pass ``next_cursor`` on for the next page."""

    conversations: list[ConversationOut]
    has_more: bool
    next_cursor: str | None


class ExportParticipant(BaseModel):
    user_id: Id
    staff: bool = Field(description="whether they acted in it as staff")
    name: str | None = Field(description="their display name, if a token gave one")
    read_position: int = Field(ge=0, description="the highest message id they have read")
    joined_at: Timestamp


class ExportOut(BaseModel):
    """The whole conversation, as one JSON document (streamed)."""

    conversation: ConversationOut
    participants: list[ExportParticipant]
    messages: list[MessageOut] = Field(
        description="every message, oldest first: private notes and deleted stubs included"
    )
    uploads: list[str] = Field(description="the references of the uploads its messages show")


class ExportQuery(BaseModel):
    audience: Literal["staff", "customer"] = Field(
        default="staff",
        description="`customer`: what the customer may see (no private notes), to hand to "
        "them; `staff`: everything",
    )


class ErasedOut(BaseModel):
    user_id: Id
    messages: int = Field(ge=0, description="messages made deleted stubs")


class UserPath(BaseModel):
    user_id: Id = Field(description="the participant id")


class DisconnectOut(BaseModel):
    sid: Id
    code: int = Field(description="the WebSocket close code the connections get")
    closed_here: int = Field(
        ge=0, description="connections the answering node closed; other nodes close theirs"
    )


class ApplicationPath(BaseModel):
    application_id: Id = Field(description="the application whose conversation this is")


class SidPath(BaseModel):
    sid: Id = Field(description="the participant id whose connections to close")


class DisconnectQuery(BaseModel):
    role: Literal["staff", "customer"] | None = Field(
        default=None,
        description="only the staff connections of `sid`, or only its customers' "
        "(default: every connection using the id)",
    )
    application_id: Id | None = Field(
        default=None,
        description="only the connections of the customer of this application "
        "(implies role=customer)",
    )


class MessageListQuery(BaseModel):
    before_id: Position | None = Field(default=None, description="a page before this id")
    after_id: Position | None = Field(default=None, description="a page after this id")
    limit: int = Field(default=ev.DEFAULT_PAGE, ge=1, le=ev.MAX_PAGE)


class ConversationListQuery(BaseModel):
    user_id: Id | None = Field(
        default=None, description="only the conversations this participant takes part in"
    )
    status: str | None = Field(
        default=None,
        max_length=40,
        pattern=r"^(open|pending|resolved|snoozed)(,(open|pending|resolved|snoozed))*$",
        description="only these statuses, comma-separated (open,pending)",
    )
    assignee: str | None = Field(
        default=None,
        max_length=20,
        pattern=r"^(none|[1-9][0-9]{0,17})$",
        description="only those assigned to this staff id, or `none`: unassigned",
    )
    limit: int = Field(default=ev.DEFAULT_LIST_PAGE, ge=1, le=ev.MAX_LIST_PAGE)
    cursor: str | None = Field(
        default=None,
        max_length=ev.MAX_CURSOR_LEN,
        pattern=CURSOR,
        description="the next_cursor of the previous page",
    )


class PostHeaders(BaseModel):
    idempotency_key: str | None = Field(
        default=None,
        alias="Idempotency-Key",
        min_length=1,
        max_length=ev.MAX_CLIENT_MSG_ID_LEN,
        description="the message is stored once per key, sender and conversation; a retry "
        "answers 200 with the first message and pushes nothing",
    )


def post_message_body(max_content: int) -> type[BaseModel]:
    """The body of a posted message; ``content``'s length is a setting (--max-content)."""
    return create_model(
        "PostMessage",
        __config__=ConfigDict(extra="forbid", strict=True),
        __doc__="A staff or system message.",
        sender_id=(
            Id,
            Field(description="the staff or system participant it is from (not the customer)"),
        ),
        content=(
            str,
            Field(min_length=1, max_length=max_content, pattern=r"^[^\x00]*$"),
        ),
        content_type=(
            Annotated[Literal[1, 2], Integral],
            Field(default=1, description="1 text, 2 image"),
        ),
    )


class SearchQuery(BaseModel):
    q: str = Field(
        min_length=1,
        max_length=ev.MAX_QUERY_LEN,
        pattern=r"[^\W_]",
        description="words, every one required (letters and digits; anything else separates "
        "words and is no syntax); case does not matter",
    )
    session_channel: str | None = Field(
        default=None,
        max_length=20,
        pattern=r"^[1-9][0-9]{0,18}$",
        description="only this application's conversation",
    )
    limit: int = Field(default=ev.DEFAULT_SEARCH_PAGE, ge=1, le=ev.MAX_SEARCH_PAGE)
    cursor: str | None = Field(
        default=None,
        max_length=19,
        pattern=r"^[1-9][0-9]{0,18}$",
        description="the next_cursor of the previous page",
    )


class SearchResultOut(BaseModel):
    message: MessageOut


class SearchResultsOut(BaseModel):
    """Messages holding every word, newest first; pass ``next_cursor`` on for older ones."""

    results: list[SearchResultOut]
    has_more: bool
    next_cursor: str | None
