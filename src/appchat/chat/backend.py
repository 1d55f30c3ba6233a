"""The server API's operations: a trusted backend holding an API key acts for the system,
with no principal and every conversation. Arguments go through the protocol's own parsers
and the messages through the chat service's write and pushes, so both surfaces share every
limit and rule that applies to them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from ..blobs.images import IMAGE, ImageReferences
from ..protocol import events as ev
from ..protocol.errors import BadRequest, Forbidden, NotFound
from ..protocol.models import now_us
from ..store import Store
from .service import ChatService, Limits


class BackendService:
    def __init__(
        self,
        chat: ChatService,
        store: Store,
        *,
        limits: Limits | None = None,
        images: ImageReferences | None = None,
        clock_us: Callable[[], int] = now_us,
    ) -> None:
        self._chat = chat
        self._store = store
        self._limits = limits or Limits()
        self._images = images or ImageReferences()
        self._now = clock_us

    async def post_message(
        self,
        application_id: int,
        *,
        sender_id: int,
        content: str,
        content_type: int,
        client_msg_id: str | None,
    ) -> tuple[bool, orjson.Fragment]:
        """A staff or system message: SendMessage's write, ordering and pushes, without a
        connection (every live connection of the participants gets the push). The
        conversation is created if the application has none. Returns whether the message
        was stored now (``False``: a retry of ``client_msg_id``) and ``{"message": …}``."""
        args = ev.parse_send_message(
            {
                "session_channel": str(application_id),
                "sender_id": sender_id,
                "content": content,
                "content_type": content_type,
                "client_msg_id": client_msg_id,
            },
            self._limits.max_content,
        )
        assert args.sender_id is not None
        if args.content_type == IMAGE:  # before a conversation may be created for it
            await self._images.check(args.content, application_id)
        conversation = await self._chat.conversation(application_id)
        if conversation is None:
            now = self._now()
            conversation = await self._store.add_conversation(
                application_id, args.sender_id, staff=True, now=now
            )
            self._chat.announce_if_new(conversation, now)
        elif not await self._store.is_staff_participant(
            conversation.id, args.sender_id
        ) and args.sender_id in await self._store.participant_ids(conversation.id):
            raise Forbidden(
                "sender_id is the customer of this conversation: the server API posts as staff"
            )
        outcome = await self._store.add_message(
            conversation,
            sender_id=args.sender_id,
            staff=True,
            content=args.content,
            content_type=args.content_type,
            client_msg_id=(
                None if args.client_msg_id is None else ev.api_client_msg_id(args.client_msg_id)
            ),
            now=self._now(),
        )
        return outcome.created, self._chat.deliver_message(conversation, outcome, None)

    async def message_list(
        self, application_id: int, *, before_id: int | None, after_id: int | None, limit: int
    ) -> dict[str, Any]:
        """GetMessageList for any conversation: ``{"messages": […], "has_more": …}``."""
        args = ev.parse_get_message_list(
            {
                "session_channel": str(application_id),
                "before_id": before_id,
                "after_id": after_id,
                "limit": limit,
            }
        )
        conversation = await self._chat.conversation(application_id)
        if conversation is None:
            raise NotFound("no such conversation")
        result = await self._chat.message_list_reply(conversation, args, public=False)
        return {"messages": result["Messages"], "has_more": result["has_more"]}

    async def conversation_list(
        self,
        *,
        user_id: int | None,
        limit: int,
        cursor: str | None,
        status: list[str] | None = None,
        assignee: int | str | None = None,
    ) -> dict[str, Any]:
        """Every conversation (or those ``user_id`` takes part in), newest activity first,
        paged and filtered like GetConversationList (``assignee``: an id or ``"none"``)."""
        args = ev.parse_get_conversation_list(
            {
                "user_id": user_id,
                "limit": limit,
                "cursor": cursor,
                "status": status,
                "assignee": assignee,
            }
        )
        if args.assignee == "me":  # (the API acts for nobody)
            raise BadRequest('assignee must be "none" or a staff id')
        page = await self._store.conversation_page(
            args.user_id, limit=args.limit, after=args.cursor, desk=args.desk(0)
        )
        return ev.conversation_page(page.conversations, page.has_more)

    async def update_conversation(
        self, application_id: int, changes: dict[str, Any]
    ) -> dict[str, Any]:
        """Set the status (``status``, ``snooze_until``) and the assignee (``assignee_id``)
        of the conversation, those that ``changes`` names; ``{"conversation": …}``. Each
        change is pushed to the inbox like the staff events' (status first)."""
        conversation = await self._chat.conversation(application_id)
        if conversation is None:
            raise NotFound("no such conversation")
        channel = str(application_id)
        result = None
        if "status" in changes or "snooze_until" in changes:
            status = ev.parse_set_status({"session_channel": channel, **_pick(changes, STATUS)})
            change = await self._store.set_status(
                conversation, status.status, status.snooze_until, now=self._now()
            )
            result = self._chat.changed(change)
        if "assignee_id" in changes:
            assign = ev.parse_assign({"session_channel": channel, **_pick(changes, ASSIGNEE)})
            change = await self._store.assign(conversation, assign.assignee_id, now=self._now())
            result = self._chat.changed(change)
        if result is None:
            view = await self._store.view_conversation(application_id)
            if view is None:
                raise NotFound("no such conversation")
            result = ev.conversation_obj(view)
        return {"conversation": result}

    async def search(
        self, query: str, *, session_channel: str | None, limit: int, cursor: str | None
    ) -> dict[str, Any]:
        """SearchMessages as staff: every conversation (or ``session_channel``'s), private
        notes included; ``{"results": [{"message": …}], "has_more", "next_cursor"}``."""
        args = ev.parse_search_messages(
            {"query": query, "session_channel": session_channel, "limit": limit, "cursor": cursor}
        )
        conversation_id = None
        if args.session_channel is not None:
            conversation = await self._chat.conversation(int(args.session_channel))
            if conversation is None:
                raise NotFound("no such conversation")
            conversation_id = conversation.id
        page = await self._store.search_messages(
            args.words, conversation_id=conversation_id, before_id=args.before_id, limit=args.limit
        )
        return ev.search_results(page.messages, page.has_more)


STATUS = ("status", "snooze_until")
ASSIGNEE = ("assignee_id",)


def _pick(changes: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: changes[k] for k in keys if k in changes}
