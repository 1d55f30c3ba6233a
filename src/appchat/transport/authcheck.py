"""``POST /auth/check``: would the WebSocket take this token? For pages, which cannot read
the status of a refused handshake (a browser reports only "closed, 1006").

It asks the same verifier as the handshake (``transport/ws.py``) and binds the same way,
and answers no more than the handshake's 401 says (its reason). It reads and writes
nothing else: no store, no connection quota, no rate bucket; refusals are logged as
"token check refused" lines, with a budget of lines per address of their own (as refused
handshakes have theirs).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from ..auth.tokens import NO_IDS, IdRanges, TokenVerifier, parse_id
from ..protocol.errors import AppError, Forbidden
from ..protocol.models import Role
from .connlog import ConnectionLog
from .rest import error_response, origin_allowed, request_principal, status_of

HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


class TokenCheck:
    def __init__(
        self,
        verifier: TokenVerifier,
        *,
        trust_query_sid: bool = False,
        allowed_origins: frozenset[str] = frozenset(),
        reserved: IdRanges = NO_IDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``reserved``: ids no customer may act as (``--api-sender-ids``)."""
        self._verifier = verifier
        self._reserved = reserved
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
            if not origin_allowed(self._allowed_origins, origin):
                raise Forbidden(f"origin {origin[:200] if origin else ''} is not allowed")
            sid = parse_id(request.query.get("sid"))
            principal = request_principal(
                request,
                self._verifier,
                trust_query_sid=self._trust_query_sid,
                reserved=self._reserved,
            )
        except AppError as exc:
            status = status_of(exc)
            remote = request.remote or "unknown"
            self._log.refused(status, exc.message, remote=remote, sid=sid, what="token check")
            return error_response(exc, status, headers=HEADERS, ok=False)
        doc: dict[str, object] = {
            "ok": True,
            "role": "staff" if principal.role is Role.STAFF else "customer",
            "id": principal.sid,
        }
        if principal.application_id is not None:
            doc["application_id"] = principal.application_id
        return web.json_response(doc, headers=HEADERS)
