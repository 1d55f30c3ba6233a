"""What the transport's JSON endpoints share (the server API, uploads and downloads, the
token check): the HTTP status of each error code, the error as a JSON body, and the
credential of ``Authorization: Bearer``, with the participant a token and ``?sid=`` name."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web

from ..auth.tokens import NO_IDS, IdRanges, TokenVerifier, bind, named_participant, parse_id
from ..protocol.errors import (
    AppError,
    BadRequest,
    Forbidden,
    Internal,
    NotFound,
    RateLimited,
    TooLarge,
    Unauthorized,
    Unavailable,
    UnsupportedType,
)
from ..protocol.models import Principal

STATUS = {
    BadRequest.code: 400,
    Unauthorized.code: 401,
    Forbidden.code: 403,
    NotFound.code: 404,
    TooLarge.code: 413,
    UnsupportedType.code: 415,
    RateLimited.code: 429,
    Internal.code: 500,
    Unavailable.code: 503,
}


def status_of(exc: AppError) -> int:
    return STATUS.get(exc.code, 500)


def error_response(
    exc: AppError,
    status: int | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    **fields: object,
) -> web.Response:
    """``{"error": {"code", "message"}}`` (and ``fields`` beside it) with the error's
    status, unless ``status`` says otherwise; a 401 says how to authenticate."""
    status = status_of(exc) if status is None else status
    response = web.Response(
        body=orjson.dumps({**fields, "error": {"code": exc.code, "message": exc.message}}),
        status=status,
        content_type="application/json",
        headers=headers,
    )
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="appchat"'
    return response


def origin_allowed(allowed: frozenset[str], origin: str | None) -> bool:
    """``--allowed-origins`` (empty: any). Browsers always send Origin; other clients may
    not, and are not what this guards."""
    return not allowed or origin is None or origin in allowed


def refuse_encoded(request: web.Request, what: str) -> None:
    """``UnsupportedType`` for a body sent with a ``Content-Encoding``: the server inflates
    no request body (a few KiB could stand for gigabytes), so it is refused unread."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedType(
            f"send {what} without Content-Encoding (got {encoding[:40]!r}): "
            "the server decodes no request body"
        )


def bearer(request: web.Request, missing: str) -> str:
    """The credential of ``Authorization: Bearer <credential>``; ``Unauthorized(missing)``
    without one."""
    scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise Unauthorized(missing)
    return credential


def request_principal(
    request: web.Request,
    verifier: TokenVerifier,
    *,
    trust_query_sid: bool = False,
    reserved: IdRanges = NO_IDS,
) -> Principal:
    """Who an HTTP request is: its Bearer token bound to the participant the token names,
    or ``?sid=`` checked exactly as the WebSocket's query is (``reserved``: ids no customer
    may act as, ``--api-sender-ids``)."""
    claims = verifier.verify(bearer(request, "send the token as Authorization: Bearer <token>"))
    raw = request.query.get("sid")
    if raw:
        sid = parse_id(raw)
        if sid is None:
            raise BadRequest("sid must be a positive 64-bit integer")
    else:
        sid = named_participant(claims, trust_query_sid=trust_query_sid)
        if sid is None:
            raise Unauthorized("this token names no participant: add ?sid=<your id>")
    return bind(claims, sid, trust_query_sid=trust_query_sid, reserved=reserved)
