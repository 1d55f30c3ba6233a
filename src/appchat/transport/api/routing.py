"""A small JSON router for the server API: each route's path, query, headers and body
validated with its models, the API key checked, bodies read within a bound, and every
error (aiohttp's own too) answered as JSON."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from ...auth.apikeys import ApiKeys
from ...common.ratelog import RateLimitedLog
from ...protocol.errors import (
    AppError,
    BadRequest,
    Internal,
    NotFound,
    Unauthorized,
)
from ..rest import bearer, error_response, refuse_encoded, status_of

log = logging.getLogger("appchat.transport.api")
refusals = RateLimitedLog(log)


@dataclass(frozen=True, slots=True)
class Call:
    """A validated request."""

    path: Any
    query: Any
    headers: Any
    body: Any
    key: str  # the name of the API key used


@dataclass(frozen=True, slots=True)
class Streamed:
    """A JSON body written a piece at a time (an export of 100,000 messages is never held
    whole): the handler's result for a route that streams. A failure after the first
    piece can no longer be answered with an error: the connection is cut, so the client
    sees a truncated body, never a complete-looking one."""

    pieces: AsyncIterator[bytes]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    operation_id: str
    summary: str
    handler: Callable[[Call], Awaitable[tuple[int, Any]]]
    responses: dict[int, tuple[str, type[BaseModel] | None]]  # None: no body (204)
    errors: tuple[int, ...]
    path_model: type[BaseModel] | None = None
    query_model: type[BaseModel] | None = None
    header_model: type[BaseModel] | None = None
    body_model: type[BaseModel] | None = None
    description: str = ""
    tags: tuple[str, ...] = field(default=())


class JsonRoutes:
    """Serves ``routes`` as an aiohttp sub-application; ``document``: the bytes served at
    ``/openapi.json``."""

    def __init__(
        self,
        routes: list[Route],
        keys: ApiKeys,
        document: bytes,
        *,
        max_body: int,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._routes = routes
        self._keys = keys
        self._document = document
        self._max_body = max_body
        self._monotonic = monotonic

    def app(self) -> web.Application:
        """The sub-application to mount at ``/api/``."""
        app = web.Application(middlewares=[_json_errors])
        app.router.add_get("/openapi.json", self._openapi, allow_head=False)
        for route in self._routes:
            app.router.add_route(route.method, route.path, self._endpoint(route))
        return app

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._document, content_type="application/json")

    def _endpoint(self, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def endpoint(request: web.Request) -> web.StreamResponse:
            return await self._serve(route, request)

        return endpoint

    async def _serve(self, route: Route, request: web.Request) -> web.StreamResponse:
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
            if isinstance(result, Streamed):
                return await self._stream(request, status, result, key, started)
        except AppError as exc:
            status = _status(exc)
            response: web.StreamResponse = error_response(exc, status)
        except Exception:
            log.exception("internal error serving %s %s", request.method, request.path)
            status = 500
            response = error_response(Internal(), status)
        else:
            if status == 204:
                response = web.Response(status=status)
            else:
                response = web.Response(
                    body=orjson.dumps(result), status=status, content_type="application/json"
                )
        response.headers["Cache-Control"] = "no-store"
        self._log(request, status, key, started)
        return response

    async def _stream(
        self, request: web.Request, status: int, body: Streamed, key: str | None, started: float
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=status)
        response.content_type = "application/json"
        response.headers["Cache-Control"] = "no-store"
        await response.prepare(request)
        try:
            async for piece in body.pieces:
                await response.write(piece)
        except Exception as exc:
            if not isinstance(exc, AppError | ConnectionResetError):
                log.exception("internal error streaming %s %s", request.method, request.path)
            assert request.transport is not None
            request.transport.abort()  # a truncated body, never a complete-looking one
            self._log(request, status, key, started, " (cut off)")
            return response
        await response.write_eof()
        self._log(request, status, key, started)
        return response

    def _log(
        self, request: web.Request, status: int, key: str | None, started: float, note: str = ""
    ) -> None:
        if key is not None:
            log.info(
                "api %s %s -> %d (key %s, %.1f ms)%s",
                request.method,
                request.path,
                status,
                key,
                (self._monotonic() - started) * 1000,
                note,
            )

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
        refuse_encoded(request, "the body")
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
