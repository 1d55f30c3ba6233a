"""The web client's HTTP routes: static files with their headers, and POST /dev/token,
which exists only in --dev."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import appchat
from appchat.auth.tokens import TokenVerifier

from .support import SECRET, InProcessServer, Server, client, token


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    proc = InProcessServer(tmp_path_factory.mktemp("dev") / "d.db", "--dev").start()
    yield proc
    proc.stop()


async def fetch(
    url: str, method: str = "GET", *, json: Any = None, data: Any = None, headers: Any = None
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, json=json, data=data, headers=headers) as r,
    ):
        return r.status, dict(r.headers), await r.read()


@pytest.mark.parametrize(
    ("path", "kind", "needle"),
    [
        ("/", "text/html", b"<title>appchat</title>"),
        ("/appchat.js", "text/javascript", b"export class AppChat"),
        ("/app.js", "text/javascript", b'from "/appchat.js"'),
        ("/style.css", "text/css", b".bubble"),
    ],
)
async def test_static_files_are_served_with_a_strict_policy(
    server: Server, path: str, kind: str, needle: bytes
) -> None:
    status, headers, body = await fetch(server.http(path))
    assert status == 200 and headers["Content-Type"].startswith(kind)
    assert needle in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"


async def test_the_page_loads_each_of_its_modules_as_javascript(
    server: Server, browser: Any
) -> None:
    """index.html loads app.js, which imports appchat.js and the modules in web/ui/: each is
    served as JavaScript (a browser runs no module script of another type), every module
    shipped is loaded, and the page comes up (the sign-in form) with no console error."""
    from playwright.async_api import expect

    page = await (await browser.new_context()).new_page()
    errors: list[str] = []

    def console(message: Any) -> None:
        if message.type == "error":
            errors.append(message.text)

    page.on("console", console)
    page.on("pageerror", lambda e: errors.append(str(e)))
    responses: list[Any] = []
    page.on("response", lambda r: responses.append(r))
    await page.goto(server.http("/"))
    await expect(page.locator("#signin")).to_be_visible()
    scripts = {
        r.url.removeprefix(server.http("")): (r.status, await r.header_value("content-type"))
        for r in responses
        if r.request.resource_type == "script"
    }
    ui = Path(appchat.__file__).parent / "web" / "ui"
    shipped = {f"/ui/{module.name}" for module in ui.glob("*.js")}
    assert len(shipped) > 1
    assert set(scripts) == {"/app.js", "/appchat.js"} | shipped
    assert all(
        status == 200 and (kind or "").startswith("text/javascript")
        for status, kind in scripts.values()
    ), scripts
    assert errors == []


async def test_without_dev_there_is_no_token_endpoint(server: Server) -> None:
    status, _, body = await fetch(server.http("/client-config.json"))
    assert status == 200 and body == b'{"dev": false}'
    status, _, _ = await fetch(server.http("/dev/token"), "POST", json={"role": "staff", "id": 1})
    assert status == 404


async def test_dev_tokens_name_their_participant(dev_server: Server) -> None:
    status, _, body = await fetch(dev_server.http("/client-config.json"))
    assert body == b'{"dev": true}'
    url = dev_server.http("/dev/token")
    verifier = TokenVerifier(SECRET.encode())
    status, _, body = await fetch(url, "POST", json={"role": "staff", "id": 7})
    doc = json.loads(body)
    assert status == 200 and doc["sid"] == 7
    claims = verifier.verify(doc["token"])
    assert claims.subject == "admin:7" and claims.participant_id == 7
    status, _, body = await fetch(
        url, "POST", json={"role": "customer", "application_id": 55, "id": 3}
    )
    doc = json.loads(body)
    claims = verifier.verify(doc["token"])
    assert claims.subject == "request:55" and claims.participant_id == 3
    async with client(dev_server, 3, doc["token"]) as c:
        await c.ok("Event.AddConversation", {"application_id": 55})


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        ({"role": "staff", "id": 1}, {"Origin": "https://evil.example"}, 403),
        ('{"role": "staff", "id": 1}', {"Content-Type": "text/plain"}, 415),
        ("{not json", {"Content-Type": "application/json"}, 400),
        ([1], None, 400),
        ({"role": "root", "id": 1}, None, 400),
        ({"role": "staff", "id": 0}, None, 400),
        ({"role": "staff", "id": True}, None, 400),
        ({"role": "staff", "id": 2**53}, None, 400),
        ({"role": "customer", "id": 2}, None, 400),
        ({"role": "customer", "id": 2, "application_id": "100"}, None, 400),
    ],
)
async def test_dev_token_refuses_bad_requests(
    dev_server: Server, body: Any, headers: Any, status: int
) -> None:
    kwargs: dict[str, Any] = {"headers": headers}
    if isinstance(body, str):
        kwargs["data"] = body
    else:
        kwargs["json"] = body
    got, _, text = await fetch(dev_server.http("/dev/token"), "POST", **kwargs)
    assert got == status, text
    assert b"token" not in text


async def test_dev_token_accepts_its_own_origin(dev_server: Server) -> None:
    origin = f"http://127.0.0.1:{dev_server.port}"
    status, _, _ = await fetch(
        dev_server.http("/dev/token"),
        "POST",
        json={"role": "staff", "id": 1},
        headers={"Origin": origin},
    )
    assert status == 200


@pytest.mark.parametrize(
    "host",
    [
        "rebound.example:{port}",  # a page whose name now resolves to 127.0.0.1
        "rebound.example",
        "127.0.0.1.rebound.example:{port}",
        "127.0.0.1:{other}",
        "localhost",
        "",
    ],
)
async def test_dev_token_refuses_a_host_other_than_loopback(dev_server: Server, host: str) -> None:
    """DNS rebinding: a page of another site, its name rebound to 127.0.0.1, posts to the
    dev server from its own origin (so no Origin check can tell); its Host gives it away."""
    forged = host.format(port=dev_server.port, other=dev_server.port + 1)
    origin = f"http://{forged}" if forged else None
    for headers in ({"Host": forged}, {"Host": forged, "Origin": origin}):
        status, reply_headers, body = await fetch(
            dev_server.http("/dev/token"),
            "POST",
            json={"role": "staff", "id": 1},
            headers={k: v for k, v in headers.items() if v is not None},
        )
        assert status == 403, body
        assert reply_headers["Content-Type"].startswith("application/json")
        assert "loopback" in json.loads(body)["error"]
        assert b"token" not in body


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "[::1]", "LOCALHOST"])
async def test_dev_token_accepts_every_loopback_name(dev_server: Server, name: str) -> None:
    host = f"{name}:{dev_server.port}"
    status, _, body = await fetch(
        dev_server.http("/dev/token"),
        "POST",
        json={"role": "staff", "id": 1},
        headers={"Host": host, "Origin": f"http://{host}"},
    )
    assert status == 200, body
    assert "token" in json.loads(body)


# --- POST /auth/check: the handshake's verdict on a token, readable by a page ---------------


async def handshake_refusal(server: Server, tok: str, sid: str) -> tuple[int, str]:
    """What the WebSocket handshake answers this token and sid (status, reason)."""
    status, _, body = await fetch(
        server.http(f"/ws?sid={sid}"),
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Protocol": f"access_token, {tok}",
        },
    )
    return status, body.decode().strip()


async def check(server: Server, tok: str | None, sid: str | None = None) -> tuple[int, Any]:
    query = f"?sid={sid}" if sid is not None else ""
    headers = {"Authorization": f"Bearer {tok}"} if tok is not None else {}
    status, got, body = await fetch(server.http("/auth/check" + query), "POST", headers=headers)
    assert got["Content-Type"].startswith("application/json")
    assert got["Cache-Control"] == "no-store"
    if status == 401:
        assert got["WWW-Authenticate"] == 'Bearer realm="appchat"'
    return status, json.loads(body)


async def test_auth_check_accepts_what_the_handshake_accepts(server: Server) -> None:
    assert await check(server, token(admin_id=7)) == (
        200,
        {"ok": True, "role": "staff", "id": 7},
    )
    customer = {"ok": True, "role": "customer", "id": 2, "application_id": 100}
    assert await check(server, token(request_id=100, sid=2)) == (200, customer)
    assert await check(server, token(request_id=100), sid="2") == (200, customer)
    assert await check(server, token(request_id=100, sid=2), sid="2") == (200, customer)
    # Nothing else happens: the same token still connects, and the check created nothing.
    async with client(server, 2, token(request_id=100, sid=2)) as c:
        assert await c.ok("Event.GetConversationList", {}) == {
            "conversations": [],
            "has_more": False,
            "next_cursor": None,
        }


@pytest.mark.parametrize(
    ("tok", "sid", "reason"),
    [
        (token(admin_id=1, secret="another-secret-" + "x" * 40), "1", "signature is invalid"),
        (token(admin_id=1, ttl=-5), "1", "token has expired"),
        ("not-a-jwt", "1", "token is malformed"),
        (token(request_id=100, sid=2), "3", "does not match"),
        (token(admin_id=4), "5", "does not match"),
    ],
)
async def test_auth_check_refuses_with_the_handshakes_reason(
    server: Server, tok: str, sid: str, reason: str
) -> None:
    handshake = await handshake_refusal(server, tok, sid)
    assert handshake[0] == 401 and reason in handshake[1]
    status, doc = await check(server, tok, sid=sid)
    assert status == 401
    assert doc == {"ok": False, "error": {"code": "unauthorized", "message": handshake[1]}}


async def test_auth_check_refuses_bad_requests(server: Server) -> None:
    status, doc = await check(server, None)
    assert status == 401 and doc["error"]["code"] == "unauthorized"
    assert "Authorization: Bearer" in doc["error"]["message"]
    status, doc = await check(server, token(request_id=100))
    assert status == 401 and "names no participant" in doc["error"]["message"]
    status, doc = await check(server, token(admin_id=1), sid="abc")
    assert status == 400 and doc["error"]["code"] == "bad_request"
    status, _, _ = await fetch(server.http("/auth/check"))
    assert status == 405


async def test_auth_check_keeps_the_origin_allow_list(tmp_path: Path) -> None:
    srv = InProcessServer(tmp_path / "o.db", "--allowed-origins", "https://app.example").start()
    try:
        url = srv.http("/auth/check")
        headers = {"Authorization": f"Bearer {token(admin_id=1)}"}
        status, _, body = await fetch(url, "POST", headers={**headers, "Origin": "https://x.test"})
        assert status == 403 and json.loads(body)["error"]["code"] == "forbidden"
        status, _, _ = await fetch(
            url, "POST", headers={**headers, "Origin": "https://app.example"}
        )
        assert status == 200
    finally:
        srv.stop()
