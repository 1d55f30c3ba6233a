"""The server API's operations and their route table: post a message, read a conversation,
list, change, export and erase conversations, search messages, erase a participant,
disconnect one."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from ...auth.apikeys import ApiKeys
from ...auth.tokens import NO_IDS, IdRanges
from ...chat.backend import BackendService
from ...chat.lifecycle import Lifecycle
from ...fanout.envelope import Whom
from ...fanout.hub import Hub
from ...protocol import defaults
from ...protocol.closecodes import CloseCode
from ...protocol.errors import BadRequest, Forbidden, NotFound
from ...protocol.models import Role
from .models import (
    ApplicationPath,
    ConversationListQuery,
    ConversationPageOut,
    ConversationPatch,
    ConversationReply,
    DisconnectOut,
    DisconnectQuery,
    ErasedOut,
    ExportOut,
    ExportQuery,
    MessageListQuery,
    MessagePageOut,
    MessageReply,
    PostHeaders,
    SearchQuery,
    SearchResultsOut,
    SidPath,
    UserPath,
    post_message_body,
)
from .openapi import openapi_document
from .routing import Call, JsonRoutes, Route, Streamed

log = logging.getLogger("appchat.transport.api")


class ServerApi:
    def __init__(
        self,
        service: BackendService,
        hub: Hub,
        keys: ApiKeys,
        lifecycle: Lifecycle,
        *,
        max_content: int = defaults.MAX_CONTENT,
        max_body: int = defaults.MAX_FRAME,
        monotonic: Callable[[], float] = time.monotonic,
        sender_ids: IdRanges = NO_IDS,
    ) -> None:
        """``sender_ids`` (``--api-sender-ids``): the only ids posts may come from; empty:
        any id but the conversation's customer."""
        self._service = service
        self._lifecycle = lifecycle
        self._sender_ids = sender_ids
        self._hub = hub
        self.routes = [
            Route(
                "POST",
                "/conversations/{application_id}/messages",
                "postMessage",
                "Post a staff or system message",
                self._post_message,
                {
                    201: ("Stored and pushed to the participants' live connections", MessageReply),
                    200: ("A retry with the same Idempotency-Key: the first message", MessageReply),
                },
                (400, 401, 403, 413, 415, 503),
                path_model=ApplicationPath,
                header_model=PostHeaders,
                body_model=post_message_body(max_content),
                description="Stored like Event.SendMessage (answered after the commit, with an "
                "id above every earlier one of the conversation) and pushed as "
                "Event.ReceiveMessage to every live connection of every participant, on "
                "every node. The conversation is created if the application has none; the "
                "sender becomes a staff participant.",
                tags=("messages",),
            ),
            Route(
                "GET",
                "/conversations/{application_id}/messages",
                "listMessages",
                "Read a conversation a page at a time",
                self._list_messages,
                {200: ("A page of messages, oldest first", MessagePageOut)},
                (400, 401, 404, 503),
                path_model=ApplicationPath,
                query_model=MessageListQuery,
                description="Like Event.GetMessageList: the newest page, a page before "
                "`before_id` or after `after_id` (at most one of them).",
                tags=("messages",),
            ),
            Route(
                "GET",
                "/conversations",
                "listConversations",
                "List conversations, newest activity first",
                self._list_conversations,
                {200: ("A page of conversations", ConversationPageOut)},
                (400, 401, 503),
                query_model=ConversationListQuery,
                description="Like Event.GetConversationList with `all`: every conversation, "
                "or those of `user_id`, optionally only some statuses or one assignee.",
                tags=("conversations",),
            ),
            Route(
                "PATCH",
                "/conversations/{application_id}",
                "updateConversation",
                "Change a conversation's status or assignee",
                self._update_conversation,
                {200: ("The conversation as it is now", ConversationReply)},
                (400, 401, 404, 413, 415, 503),
                path_model=ApplicationPath,
                body_model=ConversationPatch,
                description="Like Event.SetConversationStatus and Event.AssignConversation: "
                "each change takes the conversation's next `rev`, is pushed as "
                "Event.ConversationUpdated to the inbox subscribers and recorded as the "
                "`conversation.updated` webhook; a field left out stays as it is.",
                tags=("conversations",),
            ),
            Route(
                "GET",
                "/conversations/{application_id}/export",
                "exportConversation",
                "Export a conversation whole",
                self._export,
                {200: ("The conversation, streamed as one JSON document", ExportOut)},
                (400, 401, 404, 503),
                path_model=ApplicationPath,
                query_model=ExportQuery,
                description="The conversation, its participants with their read positions, "
                "every message (private notes and deleted stubs included; with "
                "`audience=customer` without the notes) and the references "
                "of its uploads (fetch each from /files/…): what a customer's request for "
                "their data needs. Written a chunk at a time: a failure midway cuts the "
                "connection, so an incomplete body is never a valid document.",
                tags=("lifecycle",),
            ),
            Route(
                "DELETE",
                "/conversations/{application_id}",
                "eraseConversation",
                "Erase a conversation and everything of it",
                self._erase_conversation,
                {204: ("Erased", None)},
                (400, 401, 404, 503),
                path_model=ApplicationPath,
                description="Its messages, participants, read positions, counters, search "
                "index, webhook events still waiting and uploaded files go; live connections "
                "in it get Event.ConversationDeleted and the webhook `conversation.deleted` "
                "is sent. A new AddConversation for the application starts afresh.",
                tags=("lifecycle",),
            ),
            Route(
                "POST",
                "/participants/{user_id}/erase",
                "eraseParticipant",
                "Erase what a participant sent",
                self._erase_participant,
                {200: ("Erased", ErasedOut)},
                (400, 401, 503),
                path_model=UserPath,
                description="Every message the participant sent, in every conversation, "
                "becomes a deleted stub (its id kept), its uploads go, and their read "
                "positions and names go; other participants' unread counts stay as they "
                "were.",
                tags=("lifecycle",),
            ),
            Route(
                "POST",
                "/connections/{sid}/disconnect",
                "disconnect",
                "Close the WebSocket connections of a participant",
                self._disconnect,
                {202: ("Closing on every node", DisconnectOut)},
                (400, 401, 503),
                path_model=SidPath,
                query_model=DisconnectQuery,
                description=f"The connections using `sid`, on every node, are closed with "
                f"{int(CloseCode.DISCONNECTED)}: a staff member and a customer (of any "
                "application) may use the same id, so `role` and `application_id` name "
                "whom; without them every connection using the id is closed. Tokens stay "
                "valid: a client may connect again unless the backend stops giving it tokens.",
                tags=("connections",),
            ),
            Route(
                "GET",
                "/search",
                "searchMessages",
                "Find messages by their words, newest first",
                self._search,
                {200: ("A page of messages holding every word of `q`", SearchResultsOut)},
                (400, 401, 404, 503),
                query_model=SearchQuery,
                description="Like Event.SearchMessages as staff: every conversation (or the "
                "one of `session_channel`), private notes included, deleted messages never. "
                "A message is found as soon as it is stored; an edited one by its new words.",
                tags=("messages",),
            ),
        ]
        self.document = openapi_document(self.routes)
        self._router = JsonRoutes(
            self.routes,
            keys,
            orjson.dumps(self.document),
            max_body=max_body,
            monotonic=monotonic,
        )

    def app(self) -> web.Application:
        """The sub-application to mount at ``/api/``."""
        return self._router.app()

    # --- the operations ---------------------------------------------------------------------

    async def _post_message(self, call: Call) -> tuple[int, Any]:
        if self._sender_ids and call.body.sender_id not in self._sender_ids:
            raise Forbidden(
                f"sender_id {call.body.sender_id} is not one of the ids the server API posts "
                f"as ({self._sender_ids})"
            )
        created, body = await self._service.post_message(
            call.path.application_id,
            sender_id=call.body.sender_id,
            content=call.body.content,
            content_type=call.body.content_type,
            client_msg_id=call.headers.idempotency_key,
        )
        return (201 if created else 200), body

    async def _list_messages(self, call: Call) -> tuple[int, Any]:
        q = call.query
        return 200, await self._service.message_list(
            call.path.application_id, before_id=q.before_id, after_id=q.after_id, limit=q.limit
        )

    async def _list_conversations(self, call: Call) -> tuple[int, Any]:
        q = call.query
        return 200, await self._service.conversation_list(
            user_id=q.user_id,
            limit=q.limit,
            cursor=q.cursor,
            status=None if q.status is None else q.status.split(","),
            assignee=q.assignee if q.assignee in (None, "none") else int(q.assignee),
        )

    async def _update_conversation(self, call: Call) -> tuple[int, Any]:
        # A null status or snooze time is one left out; a null assignee is nobody.
        changes = {
            k: v
            for k, v in call.body.model_dump(include=call.body.model_fields_set).items()
            if v is not None or k == "assignee_id"
        }
        return 200, await self._service.update_conversation(call.path.application_id, changes)

    async def _export(self, call: Call) -> tuple[int, Any]:
        public = call.query.audience == "customer"
        return 200, Streamed(await self._lifecycle.export(call.path.application_id, public=public))

    async def _erase_conversation(self, call: Call) -> tuple[int, Any]:
        application_id = call.path.application_id
        if not await self._lifecycle.erase_conversation(application_id):
            raise NotFound("no such conversation")
        log.info("api: conversation of application %s erased (key %s)", application_id, call.key)
        return 204, None

    async def _erase_participant(self, call: Call) -> tuple[int, Any]:
        user_id = call.path.user_id
        count = await self._lifecycle.erase_participant(user_id)
        log.info("api: %d messages of participant %s erased (key %s)", count, user_id, call.key)
        return 200, {"user_id": user_id, "messages": count}

    async def _search(self, call: Call) -> tuple[int, Any]:
        q = call.query
        return 200, await self._service.search(
            q.q, session_channel=q.session_channel, limit=q.limit, cursor=q.cursor
        )

    async def _disconnect(self, call: Call) -> tuple[int, Any]:
        sid = call.path.sid
        q = call.query
        if q.role == "staff" and q.application_id is not None:
            raise BadRequest("query application_id: staff belong to no application")
        role = Role(q.role) if q.role is not None else None
        if q.application_id is not None:
            role = Role.CUSTOMER
        whom = Whom(role, q.application_id)
        code = CloseCode.DISCONNECTED
        closed = await self._hub.disconnect(sid, code, "disconnected by the server", whom)
        log.info(
            "api: %d connections of sid %s%s closed here (key %s)",
            closed,
            sid,
            _describe(whom),
            call.key,
        )
        return 202, {"sid": sid, "code": int(code), "closed_here": closed}


def _describe(whom: Whom) -> str:
    if whom.role is None:
        return ""
    if whom.application_id is None:
        return f" ({whom.role.value})"
    return f" (customer of application {whom.application_id})"
