"""The rules of the WebSocket events: conversations, messages, reads, unread counts, and
who may do what. The server API's operations are BackendService's (backend.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import orjson

from ..auth.tokens import TokenVerifier, bind, parse_id
from ..blobs.images import IMAGE, ImageReferences
from ..common.metrics import Metrics
from ..common.ratelimit import Throttle
from ..common.ratelog import RateLimitedLog
from ..protocol import defaults
from ..protocol import events as ev
from ..protocol.errors import (
    AppError,
    BadRequest,
    Forbidden,
    Internal,
    NotFound,
    Unauthorized,
    Unavailable,
)
from ..protocol.models import (
    Conversation,
    ConversationChange,
    Message,
    MessageChange,
    MessagePage,
    Principal,
    SendOutcome,
    now_us,
)
from ..store import Store
from .desk import AutoAssigner

log = logging.getLogger(__name__)
best_effort_errors = RateLimitedLog(log)  # a store failing in best-effort writes after an answer

MAX_KNOWN_CONVERSATIONS = 100_000  # application -> conversation, remembered per node
NAMES_REMEMBERED = 100_000  # (connection, conversation, participant) -> display name stored
MAX_REPLY_BYTES = 1024 * 1024  # messages in one GetMessageList reply, serialised
PAGE_CHUNK = 50  # messages read at once for a longer GetMessageList page
# At most one forwarded Typing per connection and conversation: half the web client's
# cadence, so that jitter between two of its frames never drops the second.
TYPING_INTERVAL_US = 1_000_000


class Fanout(Protocol):
    def deliver(
        self,
        user_ids: Iterable[int],
        application_id: int,
        frame: bytes,
        origin: str | None,
        staff_only: bool = False,
    ) -> None:
        """Hand ``frame`` to every connection of these users but ``origin`` (``staff_only``:
        to their staff connections only); never waits."""


class Session(Protocol):
    """The connection an event came in on (the hub's ``Connection`` is one)."""

    id: str
    principal: Principal

    def push(self, frame: bytes) -> None:
        """Send a push to this connection alone; never waits."""

    def push_soon(self, frame: bytes) -> None:
        """The same, written with what else the connection gets in this turn of the loop."""


class _Submitted:
    """A SendMessage handed to storage: what its reply needs once it committed."""

    __slots__ = ("conversation", "request", "sender", "started", "stored")

    def __init__(
        self, conversation: Conversation, sender: int, stored: Awaitable[SendOutcome]
    ) -> None:
        self.conversation = conversation
        self.sender = sender
        self.stored = stored
        self.request: ev.Request | None = None  # pipelined: the request it answers
        self.started = 0.0


class Inbox(Protocol):
    """Staff connections subscribed to conversation changes, on every node (the hub's)."""

    @property
    def wanted(self) -> bool:
        """Whether a change may concern anyone (subscribers here, or other nodes)."""

    async def subscribe(self, session: Session, inbox_filter: str) -> None: ...

    async def unsubscribe(self, session: Session) -> None: ...

    def publish(self, frame: bytes, assignee: int | None, before: int | None) -> None:
        """Push ``frame`` (Event.ConversationUpdated about a conversation assigned to
        ``assignee``, and to ``before`` until this change) to the subscribers it concerns."""


class Presence(Protocol):
    """Who is there, across nodes (``appchat.fanout.presence``)."""

    def availability(self, user_id: int) -> str: ...

    def set_availability(self, user_id: int, availability: str) -> None: ...

    def staff(self) -> list[tuple[int, str, str | None]]:
        """(user id, availability, name) of every staff member known now."""

    def staff_available(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Limits:
    max_content: int = defaults.MAX_CONTENT
    max_reply_bytes: int = MAX_REPLY_BYTES  # a page holds fewer messages beyond it
    edit_window_us: int = int(defaults.EDIT_WINDOW * 1_000_000)  # --edit-window


class ChatService:
    def __init__(
        self,
        store: Store,
        fanout: Fanout,
        verifier: TokenVerifier,
        *,
        limits: Limits | None = None,
        trust_query_sid: bool = False,
        metrics: Metrics | None = None,
        clock_us: Callable[[], int] = now_us,
        images: ImageReferences | None = None,
        inbox: Inbox | None = None,
        presence: Presence | None = None,
        auto_assign: AutoAssigner | None = None,
    ) -> None:
        """``images`` checks image messages; without one only their form is checked.
        Without ``inbox`` and ``presence`` the desk's events answer ``unavailable``."""
        self._store = store
        self._inbox = inbox
        self._presence = presence
        self._auto_assign = auto_assign
        self._images = images or ImageReferences()
        self._fanout = fanout
        self._verifier = verifier
        self._limits = limits or Limits()
        self._trust_query_sid = trust_query_sid
        self._known: dict[int, Conversation] = {}
        # (connection id, conversation id, user id) -> the display name that connection stored
        self._names: dict[tuple[str, int, int], str] = {}
        self._metrics = metrics or Metrics()
        self._now = clock_us
        self._handlers: dict[str, Callable[[Session, dict[str, Any]], Awaitable[Any]]] = {
            ev.ADD_CONVERSATION: self._add_conversation,
            ev.GET_CONVERSATION_LIST: self._get_conversation_list,
            ev.GET_MESSAGE_LIST: self._get_message_list,
            ev.SEND_MESSAGE: self._send_message,
            ev.READ_MESSAGE: self._read_message,
            ev.GET_UNREAD_INFO: self._get_unread_info,
            ev.REFRESH_TOKEN: self._refresh_token,
            ev.TYPING: self._typing,
            ev.SUBSCRIBE_INBOX: self._subscribe_inbox,
            ev.UNSUBSCRIBE_INBOX: self._unsubscribe_inbox,
            ev.ASSIGN_CONVERSATION: self._assign_conversation,
            ev.SET_CONVERSATION_STATUS: self._set_conversation_status,
            ev.SET_AVAILABILITY: self._set_availability,
            ev.GET_PRESENCE: self._get_presence,
            ev.EDIT_MESSAGE: self._edit_message,
            ev.DELETE_MESSAGE: self._delete_message,
            ev.SEARCH_MESSAGES: self._search_messages,
        }
        self._typing_throttle = Throttle(TYPING_INTERVAL_US)

    # --- the entry point of every frame ---------------------------------------------------------

    async def handle(self, session: Session, frame: str | bytes) -> bytes:
        """Serve one request frame; always returns the reply frame, never raises."""
        try:
            request = ev.parse_request(frame)
        except ev.FrameError as exc:
            return ev.error_reply(exc.name, exc.error, exc.request_id)
        handler = self._handlers.get(request.name)
        if handler is None:
            self._metrics.events.add("unknown", "unknown_event", None)
            return ev.error_reply(request.name, ev.unknown_event(request.name), request.id)
        started = time.perf_counter()
        try:
            result = await handler(session, request.args)
        except AppError as exc:
            self._count(request.name, exc.code, started)
            return ev.error_reply(request.name, exc, request.id)
        except Exception:
            log.exception("internal error serving %s", request.name)
            self._count(request.name, Internal.code, started)
            return ev.error_reply(request.name, Internal(), request.id)
        self._count(request.name, "ok", started)
        return ev.reply(request.name, result, request.id)

    async def handle_sends(
        self, session: Session, frames: Sequence[str | bytes], reply: Callable[[bytes], None]
    ) -> int:
        """Serve the SendMessage requests at the head of ``frames`` (a connection's
        backlog), replying to each through ``reply`` in order; how many frames it served
        (0: the first is another request, for ``handle``).

        They are pipelined: each is checked and handed to storage before the one before it
        has committed, so a burst shares one transaction instead of waiting a commit each
        (with a sequential server a connection that sends faster than one message per
        commit falls further behind with every one). They are stored, pushed and answered
        in the order they came. A frame that is not a request gets its error reply in its
        place; any other request ends the run: it waits for the sends before it."""
        run: list[bytes | _Submitted] = []
        served = 0
        try:
            for frame in frames:
                try:
                    request = ev.parse_request(frame)
                except ev.FrameError as exc:
                    run.append(ev.error_reply(exc.name, exc.error, exc.request_id))
                    served += 1
                    continue
                if request.name != ev.SEND_MESSAGE:
                    break
                served += 1
                started = time.perf_counter()
                try:
                    run.append(await self._submit_send(session, request, started))
                except AppError as exc:
                    self._count(request.name, exc.code, started)
                    run.append(ev.error_reply(request.name, exc, request.id))
                except Exception:
                    log.exception("internal error serving %s", request.name)
                    self._count(request.name, Internal.code, started)
                    run.append(ev.error_reply(request.name, Internal(), request.id))
        finally:
            for item in run:  # answered in order, each once it committed
                reply(item if isinstance(item, bytes) else await self._finish_send(session, item))
        return served

    def _count(self, name: str, outcome: str, started: float) -> None:
        self._metrics.count_event(name, outcome, time.perf_counter() - started)

    # --- who may do what ------------------------------------------------------------------------

    @staticmethod
    def _actor(principal: Principal, given: int | None, field: str) -> int:
        """Ids naming the acting user default to the connection's sid and must equal it."""
        if given is None:
            return principal.sid
        if given != principal.sid:
            raise Forbidden(f"{field} must be your own id ({principal.sid})")
        return given

    @staticmethod
    def _check_application(principal: Principal, application_id: int) -> None:
        if not principal.may_read_application(application_id):
            raise Forbidden("you may not access this conversation")

    async def _not_impersonating_staff(
        self, principal: Principal, conversation_id: int, user_id: int
    ) -> None:
        # A customer whose token names no participant may not act as a staff participant.
        if principal.is_staff or principal.bound:
            return
        if await self._store.is_staff_participant(conversation_id, user_id):
            raise Forbidden("you may not act as this participant")

    async def _not_impersonating_staff_in_own(self, principal: Principal, user_id: int) -> None:
        """The same rule for events that span conversations: a customer has just one."""
        if principal.is_staff or principal.bound or principal.application_id is None:
            return
        conversation = await self.conversation(principal.application_id)
        if conversation is not None:
            await self._not_impersonating_staff(principal, conversation.id, user_id)

    async def _open(
        self, principal: Principal, channel: str, actor: int, *, guard: bool = True
    ) -> Conversation:
        """The conversation behind ``channel`` if the caller may use it; never reveals others.

        ``guard=False``: the caller checks the staff rule itself (inside its write)."""
        application_id = parse_id(channel)
        if application_id is None or str(application_id) != channel:
            if not principal.is_staff:
                raise Forbidden("you may not access this conversation")
            raise NotFound("no such conversation")
        self._check_application(principal, application_id)
        conversation = await self.conversation(application_id)
        if conversation is None:
            raise NotFound("no such conversation")
        if guard:
            await self._not_impersonating_staff(principal, conversation.id, actor)
        return conversation

    async def conversation_for(self, principal: Principal, application_id: int) -> Conversation:
        """The conversation of ``application_id`` if ``principal`` may use it (uploads);
        ``NotFound`` alike for a missing one and one the caller may not see."""
        conversation = None
        if principal.may_read_application(application_id):
            conversation = await self.conversation(application_id)
        if conversation is None:
            raise NotFound("no such conversation")
        return conversation

    def forget(self, application_id: int) -> None:
        """The application's conversation was erased: look it up again next time. (Other
        nodes learn it when their next write to it finds it gone.)"""
        self._known.pop(application_id, None)

    def announce_deletion(self, conversation: Conversation, participants: list[int]) -> None:
        """Event.ConversationDeleted to the erased conversation's live connections, on
        every node, and to the inbox."""
        body = ev.conversation_deleted(conversation.application_id)
        frame = ev.push(ev.CONVERSATION_DELETED, body)
        self._fanout.deliver(participants, conversation.application_id, frame, None)
        if self._inbox is not None and self._inbox.wanted:
            self._inbox.publish(frame, conversation.assignee_id, None)

    async def conversation(self, application_id: int) -> Conversation | None:
        """Which conversation belongs to an application never changes once created, so this
        node remembers it (only ``id`` and ``application_id`` of the result are used)."""
        known = self._known.get(application_id)
        if known is not None:
            return known
        conversation = await self._store.get_conversation(application_id)
        if conversation is not None:
            if len(self._known) >= MAX_KNOWN_CONVERSATIONS:
                self._known.clear()
            self._known[application_id] = conversation
        return conversation

    # --- events ---------------------------------------------------------------------------------

    async def _add_conversation(self, session: Session, raw: dict[str, Any]) -> Any:
        p = session.principal
        args = ev.parse_add_conversation(raw)
        user_id = p.sid if args.user_id is None else args.user_id
        self._check_application(p, args.application_id)
        if not p.is_staff and user_id != p.sid:
            raise Forbidden("a customer may only add themselves")
        await self._not_impersonating_staff_in_own(p, user_id)
        now = self._now()
        conversation = await self._store.add_conversation(
            args.application_id, user_id, staff=p.is_staff and user_id == p.sid, now=now
        )
        known = self._known.get(conversation.application_id)
        if known is not None and known.id != conversation.id:  # erased and made again
            self._known[conversation.application_id] = replace(conversation, last_message=None)
        if self.announce_if_new(conversation, now) and not p.is_staff:
            await self._assign_automatically(conversation)
        if user_id == p.sid:
            await self._keep_name(session, conversation, user_id)
        last = conversation.last_message
        if last is not None and last.private and not p.is_staff:  # as a customer sees it
            conversation = await self._store.view_conversation(
                conversation.application_id, public=True
            ) or replace(conversation, last_message=None)
        return ev.conversation_obj(conversation)

    async def _get_conversation_list(self, session: Session, raw: dict[str, Any]) -> Any:
        p = session.principal
        args = ev.parse_get_conversation_list(raw)
        user_id = self._actor(p, args.user_id, "user_id")
        await self._not_impersonating_staff_in_own(p, user_id)
        everyone = args.all and p.is_staff  # the staff inbox: every conversation
        page = await self._store.conversation_page(
            None if everyone else user_id,
            application_id=p.application_id,
            limit=args.limit,
            after=args.cursor,
            desk=args.desk(user_id),
            public=not p.is_staff,
        )
        return ev.conversation_page(page.conversations, page.has_more)

    async def _get_message_list(self, session: Session, raw: dict[str, Any]) -> Any:
        p = session.principal
        args = ev.parse_get_message_list(raw)
        executor = self._actor(p, args.executor_id, "executor_id")
        conversation = await self._open(p, args.session_channel, executor)
        return await self.message_list_reply(conversation, args, public=not p.is_staff)

    async def message_list_reply(
        self, conversation: Conversation, args: ev.GetMessageListArgs, *, public: bool
    ) -> dict[str, Any]:
        """``{"Messages": […], "has_more": …}``: the page, within the reply's byte budget
        (``public``: without private notes, as a customer reads)."""
        page = await self._message_page(conversation, args, public)
        return ev.message_list_within(
            page.messages,
            page.has_more,
            self._limits.max_reply_bytes,
            keep_newest=args.after_id is None and args.changed_since is None,
        )

    async def _message_page(
        self, conversation: Conversation, args: ev.GetMessageListArgs, public: bool
    ) -> MessagePage:
        """The page asked for, read in chunks when it is long: no more is read than the
        reply can hold (``max_reply_bytes``), however big the messages. Pages go back from
        ``before_id`` (or the newest), forward from ``after_id``, or forward by revision
        from ``changed_since``."""
        store = self._store

        async def read(cursor: int | None, n: int) -> MessagePage:
            if args.changed_since is not None:
                assert cursor is not None
                return await store.changed_messages(
                    conversation, since=cursor, limit=n, public=public
                )
            if args.after_id is not None:
                return await store.list_messages(
                    conversation, after_id=cursor, limit=n, public=public
                )
            return await store.list_messages(conversation, before_id=cursor, limit=n, public=public)

        forward = args.after_id is not None or args.changed_since is not None
        cursor = next(
            (c for c in (args.changed_since, args.after_id, args.before_id) if c is not None),
            None,
        )
        messages: list[Message] = []
        chars = 0
        while True:
            chunk = await read(cursor, min(PAGE_CHUNK, args.limit - len(messages)))
            if forward:
                messages += chunk.messages
            else:
                messages[:0] = chunk.messages
            chars += sum(len(m.content) for m in chunk.messages)
            full = len(messages) >= args.limit or chars >= self._limits.max_reply_bytes
            if not chunk.has_more or not chunk.messages or full:
                return MessagePage(messages, chunk.has_more)
            if args.changed_since is not None:
                cursor = chunk.messages[-1].rev
            elif forward:
                cursor = chunk.messages[-1].id
            else:
                cursor = chunk.messages[0].id

    async def _send_message(self, session: Session, raw: dict[str, Any]) -> Any:
        sent = await self._send_checked(session, raw)
        return await self._send_done(session, sent)

    async def _submit_send(
        self, session: Session, request: ev.Request, started: float
    ) -> _Submitted:
        """A SendMessage checked and handed to storage, not yet committed."""
        sent = await self._send_checked(session, request.args)
        sent.request, sent.started = request, started
        return sent

    async def _finish_send(self, session: Session, sent: _Submitted) -> bytes:
        """The reply to a pipelined SendMessage, once its write is done (never raises)."""
        request = sent.request
        assert request is not None
        try:
            result = await self._send_done(session, sent)
        except AppError as exc:
            self._count(request.name, exc.code, sent.started)
            return ev.error_reply(request.name, exc, request.id)
        except Exception:
            log.exception("internal error serving %s", request.name)
            self._count(request.name, Internal.code, sent.started)
            return ev.error_reply(request.name, Internal(), request.id)
        self._count(request.name, "ok", sent.started)
        return ev.reply(request.name, result, request.id)

    async def _send_checked(self, session: Session, raw: dict[str, Any]) -> _Submitted:
        """Check a SendMessage and hand it to storage (at once: in the order of calls)."""
        p = session.principal
        args = ev.parse_send_message(raw, self._limits.max_content)
        sender = self._actor(p, args.sender_id, "sender_id")
        if args.private and not p.is_staff:
            raise Forbidden("only staff may write private notes")
        conversation = await self._open(p, args.session_channel, sender, guard=False)
        if args.content_type == IMAGE:
            await self._images.check(args.content, conversation.application_id)
        stored = self._store.add_message(
            conversation,
            sender_id=sender,
            staff=p.is_staff,
            content=args.content,
            content_type=args.content_type,
            client_msg_id=args.client_msg_id,
            now=self._now(),
            guard_staff=not (p.is_staff or p.bound),
            private=args.private,
        )
        return _Submitted(conversation, sender, stored)

    async def _send_done(self, session: Session, sent: _Submitted) -> Any:
        """A stored SendMessage pushed, its name kept: the reply's result."""
        p, conversation, sender = session.principal, sent.conversation, sent.sender
        try:
            outcome = await sent.stored
        except NotFound:  # erased meanwhile (on another node): forget it
            self.forget(conversation.application_id)
            raise
        if outcome.created and p.name is not None:
            outcome = replace(outcome, message=replace(outcome.message, sender_name=p.name))
        body = self.deliver_message(conversation, outcome, session.id)
        await self._keep_name(session, conversation, sender)
        after = outcome.conversation
        if outcome.reopened and after is not None and after.assignee_id is None:
            await self._assign_automatically(conversation)
        return body

    async def _keep_name(self, session: Session, conversation: Conversation, user_id: int) -> None:
        """Store the connection's display name for ``user_id``, a participant of
        ``conversation`` now, unless this connection stored it already (one write per
        connection and conversation while the name stays the same: another connection, on
        any node, with another name, writes its own). Best effort: the action it follows
        is committed and pushed already, so a failure here is logged, never answered."""
        name = session.principal.name
        key = (session.id, conversation.id, user_id)
        if name is None or self._names.get(key) == name:
            return
        try:
            await self._store.set_participant_name(conversation.id, user_id, name)
        except AppError as exc:
            best_effort_errors.warning(exc.code, "could not keep a display name: %s", exc.message)
            return
        if len(self._names) >= NAMES_REMEMBERED:
            self._names.clear()
        self._names[key] = name

    def deliver_message(
        self, conversation: Conversation, outcome: SendOutcome, origin: str | None
    ) -> orjson.Fragment:
        # Serialised once, for the reply, the push and the inbox's last_message.
        message = orjson.dumps(ev.message_obj(outcome.message))
        body = orjson.Fragment(b'{"message":' + message + b"}")
        if outcome.created:
            frame = ev.push(ev.RECEIVE_MESSAGE, body)
            self._fanout.deliver(
                outcome.participants,
                conversation.application_id,
                frame,
                origin,
                staff_only=outcome.message.private,
            )
            after = outcome.conversation
            if after is not None and self._inbox is not None and self._inbox.wanted:
                obj = ev.conversation_obj(after)
                obj["rev"] = outcome.message.rev  # as it was right after this message
                obj["last_message"] = orjson.Fragment(message)
                self._inbox.publish(
                    ev.push(ev.CONVERSATION_UPDATED, {"conversation": obj}),
                    after.assignee_id,
                    after.assignee_id,
                )
        return body

    def announce_if_new(self, conversation: Conversation, now: int) -> bool:
        """Tell the inbox about the conversation if an AddConversation at ``now`` made it
        (it was created then and nothing has happened in it since); whether it did."""
        if conversation.create_at != now or conversation.rev != 0:
            return False
        self.publish(ev.conversation_obj(conversation), conversation.assignee_id)
        return True

    def publish(
        self, obj: dict[str, Any], assignee: int | None, before: int | bool | None = False
    ) -> None:
        """Push Event.ConversationUpdated with the conversation ``obj`` to the inbox
        (assigned to ``assignee``, and to ``before`` until now if it changed)."""
        if self._inbox is not None and self._inbox.wanted:
            frame = ev.push(ev.CONVERSATION_UPDATED, {"conversation": obj})
            self._inbox.publish(frame, assignee, assignee if before is False else before)

    async def _assign_automatically(self, conversation: Conversation) -> None:
        """``--auto-assign``: give a new or reopened conversation nobody has to an agent.
        Best effort: what it follows is committed and answered for already."""
        if self._auto_assign is None:
            return
        try:
            change = await self._auto_assign.assign(conversation, now=self._now())
        except AppError as exc:
            best_effort_errors.warning(exc.code, "could not assign a conversation: %s", exc.message)
            return
        if change is not None:
            self.changed(change)

    def changed(self, change: ConversationChange) -> dict[str, Any]:
        """Tell the inbox about a change of status or assignee (if something changed);
        the conversation's object, for a reply."""
        obj = ev.conversation_obj(change.conversation)
        if change.before is not change.conversation:
            self.publish(obj, change.conversation.assignee_id, change.before.assignee_id)
        return obj

    async def _read_message(self, session: Session, raw: dict[str, Any]) -> Any:
        p = session.principal
        args = ev.parse_read_message(raw)
        reader = self._actor(p, args.executor_id, "executor_id")
        conversation = await self._open(p, args.session_channel, reader)
        outcome = await self._store.read_messages(
            conversation,
            reader_id=reader,
            staff=p.is_staff,
            message_id=args.message_id,
            now=self._now(),
        )
        if outcome.moved:
            frame = ev.push(
                ev.MESSAGE_READ,
                ev.message_read(conversation.application_id, reader, args.message_id),
            )
            self._fanout.deliver(
                outcome.participants, conversation.application_id, frame, session.id
            )
        await self._keep_name(session, conversation, reader)
        return None

    async def _get_unread_info(self, session: Session, raw: dict[str, Any]) -> Any:
        p = session.principal
        args = ev.parse_get_unread_info(raw)
        user_id = self._actor(p, args.user_id, "user_id")
        await self._not_impersonating_staff_in_own(p, user_id)
        page = await self._store.unread_page(
            user_id, application_id=p.application_id, limit=args.limit, after=args.cursor
        )
        return ev.unread_page(page)

    async def _refresh_token(self, session: Session, raw: dict[str, Any]) -> Any:
        p = session.principal
        args = ev.parse_refresh_token(raw)
        claims = self._verifier.verify(args.token)
        renewed = bind(claims, p.sid, trust_query_sid=self._trust_query_sid)
        if renewed.subject != p.subject:
            raise Unauthorized("the new token names a different identity")
        session.principal = renewed
        return {"exp": claims.exp}

    # --- the support desk (SPEC, third round) ---------------------------------------------

    @staticmethod
    def _staff_only(principal: Principal, what: str) -> None:
        if not principal.is_staff:
            raise Forbidden(f"only staff may {what}")

    def _inbox_here(self) -> Inbox:
        if self._inbox is None:
            raise Unavailable("the inbox is not available on this server")
        return self._inbox

    def _presence_here(self) -> Presence:
        if self._presence is None:
            raise Unavailable("presence is not available on this server")
        return self._presence

    async def _subscribe_inbox(self, session: Session, raw: dict[str, Any]) -> Any:
        self._staff_only(session.principal, "subscribe to the inbox")
        inbox_filter = ev.parse_subscribe_inbox(raw)
        await self._inbox_here().subscribe(session, inbox_filter)
        return None

    async def _unsubscribe_inbox(self, session: Session, raw: dict[str, Any]) -> Any:
        self._staff_only(session.principal, "subscribe to the inbox")
        await self._inbox_here().unsubscribe(session)
        return None

    async def _assign_conversation(self, session: Session, raw: dict[str, Any]) -> Any:
        p = session.principal
        self._staff_only(p, "assign conversations")
        args = ev.parse_assign(raw)
        conversation = await self._open(p, args.session_channel, p.sid)
        change = await self._store.assign(conversation, args.assignee_id, now=self._now())
        return {"conversation": self.changed(change)}

    async def _set_conversation_status(self, session: Session, raw: dict[str, Any]) -> Any:
        p = session.principal
        self._staff_only(p, "change a conversation's status")
        args = ev.parse_set_status(raw)
        conversation = await self._open(p, args.session_channel, p.sid)
        change = await self._store.set_status(
            conversation, args.status, args.snooze_until, now=self._now()
        )
        return {"conversation": self.changed(change)}

    async def _set_availability(self, session: Session, raw: dict[str, Any]) -> Any:
        p = session.principal
        self._staff_only(p, "set an availability")
        availability = ev.parse_set_availability(raw)
        self._presence_here().set_availability(p.sid, availability)
        return None

    async def _get_presence(self, session: Session, raw: dict[str, Any]) -> Any:
        """The participants of a conversation with their presence, or (staff, no
        ``session_channel``) every staff member the desk knows now."""
        p = session.principal
        channel = ev.parse_get_presence(raw)
        presence = self._presence_here()
        if channel is None:
            self._staff_only(p, "list the whole desk")
            people = [
                ev.presence_obj(user_id, True, availability, name)
                for user_id, availability, name in presence.staff()
            ]
        else:
            conversation = await self._open(p, channel, p.sid)
            people = [
                ev.presence_obj(x.user_id, x.staff, presence.availability(x.user_id), x.name)
                for x in await self._store.participant_list(conversation.id)
            ]
        return {"participants": people, "staff_available": presence.staff_available()}

    # --- history: edits and deletions ------------------------------------------------------

    async def _message_of(self, p: Principal, message_id: int) -> tuple[Message, Conversation]:
        """The message ``message_id`` and its conversation, if ``p`` may read it; one it
        may not (another application's, a private note for a customer) is ``not_found``
        like one that does not exist."""
        message = await self._store.get_message(message_id)
        if (
            message is None
            or not p.may_read_application(message.application_id)
            or (message.private and not p.is_staff)
        ):
            raise NotFound("no such message")
        conversation = await self.conversation(message.application_id)
        if conversation is None:  # (a message has its conversation)
            raise NotFound("no such message")
        await self._not_impersonating_staff(p, conversation.id, p.sid)
        return message, conversation

    async def _edit_message(self, session: Session, raw: dict[str, Any]) -> Any:
        p = session.principal
        args = ev.parse_edit_message(raw, self._limits.max_content)
        message, conversation = await self._message_of(p, args.id)
        if message.sender_id != p.sid:
            raise Forbidden("only its sender may edit a message")
        if message.content_type == IMAGE:
            raise BadRequest("an image message cannot be edited (delete it and send another)")
        now = self._now()
        if now - message.create_at > self._limits.edit_window_us:
            window = self._limits.edit_window_us // 1_000_000
            raise Forbidden(f"messages may be edited for {window} s after they were sent")
        change = await self._store.edit_message(conversation, message.id, args.content, now=now)
        return self._deliver_change(conversation, change, session.id)

    async def _delete_message(self, session: Session, raw: dict[str, Any]) -> Any:
        p = session.principal
        message, conversation = await self._message_of(p, ev.parse_delete_message(raw))
        if message.sender_id != p.sid and not p.is_staff:
            raise Forbidden("only its sender or staff may delete a message")
        change = await self._store.delete_message(conversation, message.id, now=self._now())
        if change.conversation is not None and message.content_type == IMAGE:
            await self._images.remove(message.content)
        return self._deliver_change(conversation, change, session.id)

    def _deliver_change(
        self, conversation: Conversation, change: MessageChange, origin: str
    ) -> orjson.Fragment:
        """Event.MessageUpdated to the participants (staff only for a note) but ``origin``,
        and the conversation's new revision to the inbox; ``{"message": …}``."""
        body = orjson.Fragment(orjson.dumps({"message": ev.message_obj(change.message)}))
        if change.conversation is None:  # nothing changed: nothing to tell
            return body
        frame = ev.push(ev.MESSAGE_UPDATED, body)
        self._fanout.deliver(
            change.participants,
            conversation.application_id,
            frame,
            origin,
            staff_only=change.message.private,
        )
        after = change.conversation
        self.publish(ev.conversation_obj(after), after.assignee_id)
        return body

    async def _typing(self, session: Session, raw: dict[str, Any]) -> Any:
        """Forward "is typing" to the other participants; never stored. Checked like
        SendMessage; more than one per connection and conversation within the interval is
        answered ``ok`` and dropped."""
        p = session.principal
        args = ev.parse_typing(raw)
        typist = self._actor(p, args.user_id, "user_id")
        conversation = await self._open(p, args.session_channel, typist)
        if not self._typing_throttle.allow((session.id, conversation.id), self._now()):
            return None
        others = [u for u in await self._store.participant_ids(conversation.id) if u != typist]
        if others:
            frame = ev.push(
                ev.RECEIVE_TYPING, ev.receive_typing(conversation.application_id, typist)
            )
            self._fanout.deliver(others, conversation.application_id, frame, session.id)
        return None

    # --- full-text search -------------------------------------------------------------------

    async def _search_messages(self, session: Session, raw: dict[str, Any]) -> Any:
        """Messages holding every word of the query, newest first, of what the caller may
        read: staff everything (or one conversation), a customer their own application's
        conversation without private notes. Another application's channel is refused like
        every event's (``_open``)."""
        p = session.principal
        args = ev.parse_search_messages(raw)
        channel = args.session_channel
        conversation_id = None
        if channel is None and not p.is_staff:
            if p.application_id is None:
                raise Forbidden("you may not search")
            conversation = await self.conversation(p.application_id)
            if conversation is None:  # nothing written yet: nothing to find
                return ev.search_results([], False)
            await self._not_impersonating_staff(p, conversation.id, p.sid)
            conversation_id = conversation.id
        elif channel is not None:
            conversation_id = (await self._open(p, channel, p.sid)).id
        page = await self._store.search_messages(
            args.words,
            conversation_id=conversation_id,
            public=not p.is_staff,
            before_id=args.before_id,
            limit=args.limit,
        )
        return ev.search_results(page.messages, page.has_more)
