"""The web client's HTTP routes: static files with their headers, and POST /dev/token,
which exists only in --dev."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from appchat.auth import TokenVerifier

from .support import SECRET, InProcessServer, Server, client


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
