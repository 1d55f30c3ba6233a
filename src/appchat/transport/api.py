"""The server API: JSON over HTTP under ``/api/`` for trusted backends, with API keys.

One table (``ServerApi.routes``) names every operation with the pydantic models of its
path, query, headers and body: requests are validated with those models, and the OpenAPI
document at ``/api/openapi.json`` is generated from the same models. The rules themselves
are the chat service's (``BackendService.post_message`` and its neighbours), so a message
posted here is stored, ordered and pushed exactly like a SendMessage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model
from pydantic.json_schema import models_json_schema

from .. import __version__
from ..auth.apikeys import ApiKeys
from ..auth.tokens import NO_IDS, IdRanges
from ..chat.backend import BackendService
from ..common.ratelog import RateLimitedLog
from ..fanout.envelope import Whom
from ..fanout.hub import Hub
from ..protocol import defaults
from ..protocol import events as ev
from ..protocol.closecodes import CloseCode
from ..protocol.errors import AppError, BadRequest, Forbidden, Internal, NotFound, Unauthorized
from ..protocol.models import MAX_ID, Role
from .rest import bearer, error_response, status_of

log = logging.getLogger(__name__)
refusals = RateLimitedLog(log)

SCHEME = "apiKey"  # the OpenAPI security scheme: ``Authorization: Bearer <key>``

# --- the definitions: every request and response shape -------------------------------------


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
    "bad_request", "unauthorized", "forbidden", "not_found", "unavailable", "internal"
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


class MessageReply(BaseModel):
    message: MessageOut


class MessagePageOut(BaseModel):
    """Messages oldest first; ``has_more``: more lie beyond the page in its direction."""

    messages: list[MessageOut]
    has_more: bool


class ConversationOut(BaseModel):
    id: Id
    session_channel: str
    application_id: Id
    create_at: Timestamp
    update_at: Timestamp = Field(description="time of the last activity")


class ConversationPageOut(BaseModel):
    """Conversations, newest activity first; pass ``next_cursor`` on for the next page."""

    conversations: list[ConversationOut]
    has_more: bool
    next_cursor: str | None


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


# --- the route table -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """A validated request."""

    path: Any
    query: Any
    headers: Any
    body: Any
    key: str  # the name of the API key used


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    operation_id: str
    summary: str
    handler: Callable[[Call], Awaitable[tuple[int, Any]]]
    responses: dict[int, tuple[str, type[BaseModel]]]
    errors: tuple[int, ...]
    path_model: type[BaseModel] | None = None
    query_model: type[BaseModel] | None = None
    header_model: type[BaseModel] | None = None
    body_model: type[BaseModel] | None = None
    description: str = ""
    tags: tuple[str, ...] = field(default=())


class ServerApi:
    def __init__(
        self,
        service: BackendService,
        hub: Hub,
        keys: ApiKeys,
        *,
        max_content: int = defaults.MAX_CONTENT,
        max_body: int = defaults.MAX_FRAME,
        monotonic: Callable[[], float] = time.monotonic,
        sender_ids: IdRanges = NO_IDS,
    ) -> None:
        """``sender_ids`` (``--api-sender-ids``): the only ids posts may come from; empty:
        any id but the conversation's customer."""
        self._service = service
        self._sender_ids = sender_ids
        self._hub = hub
        self._keys = keys
        self._max_body = max_body
        self._monotonic = monotonic
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
                (400, 401, 403, 413, 503),
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
                "or those of `user_id`.",
                tags=("conversations",),
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
        ]
        self.document = openapi_document(self.routes)
        self._document_bytes = orjson.dumps(self.document)

    def app(self) -> web.Application:
        """The sub-application to mount at ``/api/``."""
        app = web.Application(middlewares=[_json_errors])
        app.router.add_get("/openapi.json", self._openapi, allow_head=False)
        for route in self.routes:
            app.router.add_route(route.method, route.path, self._endpoint(route))
        return app

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._document_bytes, content_type="application/json")

    def _endpoint(self, route: Route) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def endpoint(request: web.Request) -> web.Response:
            return await self._serve(route, request)

        return endpoint

    async def _serve(self, route: Route, request: web.Request) -> web.Response:
        started = self._monotonic()
        key: str | None = None
        try:
            key = self._authenticate(request)
            call = Call(
                path=_validate(route.path_model, dict(request.match_info), "path"),
                query=_validate(
                    route.query_model, _pick(route.query_model, request.query, True), "query"
                ),
                headers=_validate(
                    route.header_model, _pick(route.header_model, request.headers), "header"
                ),
                body=await self._body(route, request),
                key=key,
            )
            status, result = await route.handler(call)
        except AppError as exc:
            status = _status(exc)
            response = error_response(exc, status)
        except Exception:
            log.exception("internal error serving %s %s", request.method, request.path)
            status = 500
            response = error_response(Internal(), status)
        else:
            response = web.Response(
                body=orjson.dumps(result), status=status, content_type="application/json"
            )
        response.headers["Cache-Control"] = "no-store"
        if key is not None:
            log.info(
                "api %s %s -> %d (key %s, %.1f ms)",
                request.method,
                request.path,
                status,
                key,
                (self._monotonic() - started) * 1000,
            )
        return response

    def _authenticate(self, request: web.Request) -> str:
        if not self._keys.configured:
            raise NotFound(
                "the server API is off on this server: configure --api-keys-file or --api-key"
            )
        presented = bearer(request, "missing API key: send Authorization: Bearer <key>")
        name = self._keys.check(presented)
        if name is None:
            remote = request.remote or "unknown"
            refusals.warning(remote, "api: refused an unknown API key from %s", remote)
            raise Unauthorized("invalid API key")
        return name

    async def _body(self, route: Route, request: web.Request) -> Any:
        if route.body_model is None:
            return None
        if request.content_length is not None and request.content_length > self._max_body:
            raise _TooLarge(self._max_body)
        # The whole body, however the network cut it (a read returns what has arrived).
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > self._max_body:
                raise _TooLarge(self._max_body)
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise BadRequest("the body is not valid JSON") from None
        if not isinstance(doc, dict):
            raise BadRequest("the body must be a JSON object")
        return _validate(route.body_model, doc, "body")

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
            user_id=q.user_id, limit=q.limit, cursor=q.cursor
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


class _TooLarge(AppError):
    code = "bad_request"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the body is larger than {limit} bytes")


def _status(exc: AppError) -> int:
    return 413 if isinstance(exc, _TooLarge) else status_of(exc)


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Errors aiohttp answers itself under /api/ (no such route, method) as JSON too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 503: "unavailable"}.get(exc.status, "bad_request")
        response = web.Response(
            body=orjson.dumps({"error": {"code": code, "message": exc.reason}}),
            status=exc.status,
            content_type="application/json",
        )
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response


def _pick(model: type[BaseModel] | None, values: Any, only: bool = False) -> dict[str, str]:
    """The values of a query or header multidict that ``model`` reads, once each;
    ``only``: any other name is refused (a misspelt query parameter is not ignored)."""
    out: dict[str, str] = {}
    fields = {} if model is None else model.model_fields
    if only:
        known = {info.alias or name for name, info in fields.items()}
        for name in values:
            if name not in known:
                raise BadRequest(f"query {name[:64]}: unknown parameter")
    for name, info in fields.items():
        wire = info.alias or name
        given = values.getall(wire, [])
        if len(given) > 1:
            raise BadRequest(f"{wire} is given more than once")
        if given:
            out[wire] = given[0]
    return out


def _validate(model: type[BaseModel] | None, data: dict[str, Any], where: str) -> Any:
    if model is None:
        return None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(_explain(exc, where)) from None


def _explain(exc: ValidationError, where: str) -> str:
    first = exc.errors(include_url=False, include_input=False)[0]
    loc = ".".join(str(part) for part in first["loc"])
    return f"{where} {loc}: {first['msg']}" if loc else f"{where}: {first['msg']}"


# --- the OpenAPI document ------------------------------------------------------------------


def openapi_document(routes: list[Route]) -> dict[str, Any]:
    """OpenAPI 3.1 from the route table's models (their JSON Schema, via pydantic)."""
    models: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (ErrorReply, "serialization")
    ]
    for route in routes:
        if route.body_model is not None:
            models.append((route.body_model, "validation"))
        models += [(model, "serialization") for _, model in route.responses.values()]
    refs, top = models_json_schema(models, ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = top.get("$defs", {})
    error_ref = refs[(ErrorReply, "serialization")]
    paths: dict[str, Any] = {}
    for route in routes:
        operation: dict[str, Any] = {
            "operationId": route.operation_id,
            "summary": route.summary,
            "description": route.description,
            "tags": list(route.tags),
            "security": [{SCHEME: []}],
            "parameters": [
                *_parameters(route.path_model, "path"),
                *_parameters(route.query_model, "query"),
                *_parameters(route.header_model, "header"),
            ],
            "responses": {},
        }
        if route.body_model is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(route.body_model, "validation")]}},
            }
        for status, (text, model) in sorted(route.responses.items()):
            operation["responses"][str(status)] = {
                "description": text,
                "content": {"application/json": {"schema": refs[(model, "serialization")]}},
            }
        for status in route.errors:
            operation["responses"][str(status)] = {
                "description": ERROR_TEXT[status],
                "content": {"application/json": {"schema": error_ref}},
            }
        paths.setdefault("/api" + route.path, {})[route.method.lower()] = operation
    paths["/api/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "security": [],
            "responses": {
                "200": {
                    "description": "OpenAPI 3.1",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "appchat server API",
            "version": __version__,
            "description": "For trusted backends: post into conversations, read them, close "
            "connections. Authenticate with an API key: `Authorization: Bearer <key>`.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API key from --api-keys-file or --api-key "
                    "(not a WebSocket token)",
                }
            },
        },
    }


ERROR_TEXT = {
    400: "Malformed request: code bad_request",
    401: "Missing, unknown or revoked API key: code unauthorized",
    403: "Refused by a rule: code forbidden",
    404: "No such conversation, or the server API is off: code not_found",
    413: "The body is too large: code bad_request",
    503: "The database or the broker cannot serve now, try again: code unavailable",
}


def _parameters(model: type[BaseModel] | None, where: str) -> list[dict[str, Any]]:
    if model is None:
        return []
    schema = model.model_json_schema(by_alias=True)
    required = set(schema.get("required", ()))
    params = []
    for name, prop in schema["properties"].items():
        prop = dict(prop)
        description = prop.pop("description", None)
        prop.pop("title", None)
        if "anyOf" in prop:  # optional: the parameter is absent rather than null
            variants = prop.pop("anyOf")
            prop.update(next(s for s in variants if s.get("type") != "null"))
        if prop.get("default", 0) is None:
            del prop["default"]
        param: dict[str, Any] = {
            "name": name,
            "in": where,
            "required": where == "path" or name in required,
            "schema": prop,
        }
        if description:
            param["description"] = description
        params.append(param)
    return params
