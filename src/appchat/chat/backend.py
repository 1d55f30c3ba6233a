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
from ..protocol.errors import Forbidden, NotFound
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
            conversation = await self._store.add_conversation(
                application_id, args.sender_id, staff=True, now=self._now()
            )
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
        result = await self._chat.message_list_reply(conversation, args)
        return {"messages": result["Messages"], "has_more": result["has_more"]}

    async def conversation_list(
        self, *, user_id: int | None, limit: int, cursor: str | None
    ) -> dict[str, Any]:
        """Every conversation (or those ``user_id`` takes part in), newest activity first,
        paged like GetConversationList."""
        args = ev.parse_get_conversation_list(
            {"user_id": user_id, "limit": limit, "cursor": cursor}
        )
        page = await self._store.conversation_page(
            args.user_id, limit=args.limit, after=args.cursor
        )
        return ev.conversation_page(page.conversations, page.has_more)
