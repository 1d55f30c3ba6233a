"""``POST /auth/check``: would the WebSocket take this token? For pages, which cannot read
the status of a refused handshake (a browser reports only "closed, 1006").

It asks the same verifier as the handshake (``transport/ws.py``) and binds the same way,
and answers no more than the handshake's 401 says (its reason). It reads and writes
nothing else: no store, no connection quota, no rate bucket; refusals are logged through
the same per-address budget of lines as refused handshakes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from ..auth import TokenVerifier, bind, named_participant, parse_id
from ..errors import AppError, BadRequest, Forbidden, Unauthorized
from ..models import Role
from .connlog import ConnectionLog

HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
STATUS = {BadRequest.code: 400, Unauthorized.code: 401, Forbidden.code: 403}


class TokenCheck:
    def __init__(
        self,
        verifier: TokenVerifier,
        *,
        trust_query_sid: bool = False,
        allowed_origins: frozenset[str] = frozenset(),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._verifier = verifier
        self._trust_query_sid = trust_query_sid
        self._allowed_origins = allowed_origins
        self._log = ConnectionLog(clock=monotonic)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/auth/check", self.check)

    async def check(self, request: web.Request) -> web.Response:
        """``Authorization: Bearer <token>`` (and ``?sid=N`` as the WebSocket URL has it)
        -> 200 ``{"ok": true, "role", "id"[, "application_id"]}``, or the handshake's
        refusal as a JSON error."""
        sid = None
        try:
            origin = request.headers.get("Origin")
            if self._allowed_origins and origin is not None and origin not in self._allowed_origins:
                raise Forbidden(f"origin {origin[:200]} is not allowed")
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthorized("send the token as Authorization: Bearer <token>")
            claims = self._verifier.verify(token.strip())
            raw = request.query.get("sid")
            if raw:
                sid = parse_id(raw)
                if sid is None:
                    raise BadRequest("sid must be a positive 64-bit integer")
            else:
                sid = named_participant(claims, trust_query_sid=self._trust_query_sid)
                if sid is None:
                    raise Unauthorized("this token names no participant: add ?sid=<your id>")
            principal = bind(claims, sid, trust_query_sid=self._trust_query_sid)
        except AppError as exc:
            status = STATUS.get(exc.code, 400)
            self._log.refused(status, exc.message, remote=request.remote or "unknown", sid=sid)
            headers = dict(HEADERS)
            if status == 401:
                headers["WWW-Authenticate"] = 'Bearer realm="appchat"'
            return web.json_response(
                {"ok": False, "error": {"code": exc.code, "message": exc.message}},
                status=status,
                headers=headers,
            )
        doc: dict[str, object] = {
            "ok": True,
            "role": "staff" if principal.role is Role.STAFF else "customer",
            "id": principal.sid,
        }
        if principal.application_id is not None:
            doc["application_id"] = principal.application_id
        return web.json_response(doc, headers=HEADERS)
