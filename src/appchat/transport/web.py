"""The web client: its static files (``/``, ``/appchat.js``, ``/app.js`` and the page's
modules under ``/ui/``, …) and, only in ``--dev``, an endpoint that mints tokens for the
one-click "join as" buttons."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from aiohttp import web

from ..auth.tokens import mint

JAVASCRIPT = "text/javascript; charset=utf-8"  # a module script needs a JavaScript type
# path -> (file in appchat/web/, content type); and every ``ui/*.js`` (the page's modules,
# which app.js imports) at ``/ui/<name>``
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/appchat.js": ("appchat.js", JAVASCRIPT),
    "/app.js": ("app.js", JAVASCRIPT),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
MODULES = "ui"
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data: blob:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
DEV_TOKEN_TTL = 3600
# Names a browser on this machine uses for a loopback listener. Any other Host (a name
# that resolves to 127.0.0.1 only since a moment ago: DNS rebinding) is refused.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
MAX_JS_ID = 2**53 - 1  # ids a browser holds exactly


class WebClient:
    def __init__(self, *, dev_secret: bytes | None) -> None:
        """``dev_secret`` is given only in ``--dev``: it turns on ``POST /dev/token``."""
        self._dev_secret = dev_secret
        root = files("appchat") / "web"
        self._files = {
            path: ((root / name).read_bytes(), kind) for path, (name, kind) in FILES.items()
        }
        for module in (root / MODULES).iterdir():
            if module.name.endswith(".js"):
                self._files[f"/{MODULES}/{module.name}"] = (module.read_bytes(), JAVASCRIPT)

    def add_routes(self, app: web.Application) -> None:
        for path in self._files:
            app.router.add_get(path, self.file)
        app.router.add_get("/client-config.json", self.config)
        if self._dev_secret is not None:
            app.router.add_post("/dev/token", self.dev_token)

    async def file(self, request: web.Request) -> web.Response:
        body, kind = self._files[request.path]
        return web.Response(body=body, headers={"Content-Type": kind, **HEADERS})

    async def config(self, request: web.Request) -> web.Response:
        """What the page needs to know about this server."""
        return web.json_response({"dev": self._dev_secret is not None}, headers=HEADERS)

    async def dev_token(self, request: web.Request) -> web.Response:
        """``{"role": "staff", "id": N}`` or ``{"role": "customer", "application_id": A,
        "id": N}`` -> ``{"token", "sid", "exp"}``. Only in ``--dev`` (loopback only); a
        loopback ``Host`` with this listener's port, a JSON body and a same-origin ``Origin``
        keep other web pages from minting through it."""
        assert self._dev_secret is not None
        if not _loopback_host(request):
            return _error(403, "Host must name this server by a loopback address")
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            return _error(403, "cross-origin requests are refused")
        if request.content_type != "application/json":
            return _error(415, "send a JSON body")
        try:
            doc = await request.json()
        except ValueError:
            return _error(400, "the body is not valid JSON")
        if not isinstance(doc, dict):
            return _error(400, "the body must be a JSON object")
        sid = _id(doc.get("id"))
        if sid is None:
            return _error(400, f"id must be an integer from 1 to {MAX_JS_ID}")
        if doc.get("role") == "staff":
            tok = mint(self._dev_secret, admin_id=sid, sid=sid, ttl=DEV_TOKEN_TTL)
        elif doc.get("role") == "customer":
            app = _id(doc.get("application_id"))
            if app is None:
                return _error(400, f"application_id must be an integer from 1 to {MAX_JS_ID}")
            tok = mint(self._dev_secret, request_id=app, sid=sid, ttl=DEV_TOKEN_TTL)
        else:
            return _error(400, 'role must be "staff" or "customer"')
        return web.json_response({"token": tok, "sid": sid}, headers=HEADERS)


def _loopback_host(request: web.Request) -> bool:
    """``Host`` is ``localhost``, ``127.0.0.1`` or ``[::1]`` with the port this request came
    in on (a page of another site that rebinds its name to 127.0.0.1 still sends its own
    name)."""
    host = request.headers.get("Host", "").lower()
    if host in LOOPBACK_HOSTS:  # no port: the scheme's own
        name, port = host, "443" if request.secure else "80"
    else:
        name, _, port = host.rpartition(":")
    if name not in LOOPBACK_HOSTS:
        return False
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return sockname is not None and port == str(sockname[1])


def _id(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_JS_ID:
        return None
    return value


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=HEADERS)
