"""The hostile catalogue, round two (issue 12): lock-outs, handshakes without an end,
the smaller holes, and the server's account of its connections.

One server serves the module; the tests that need their own flags or a database of
their own start one. Tests that read the server's log connect from addresses of their
own (127.0.0.N): the log's budget is per remote address, so they never share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from .backends import postgres_database
from .support import (
    SECRET,
    Client,
    InProcessServer,
    Server,
    ServerProcess,
    TcpProxy,
    client,
    raw_token,
    token,
    wait_until,
)

HANDSHAKE_TIMEOUT = 1.5
MAX_PENDING = 8
PER_USER = 3


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    db = tmp_path_factory.mktemp("hostile") / "appchat.db"
    proc = ServerProcess(
        db,
        "--rate",
        "0",
        "--log-level",
        "INFO",
        "--handshake-timeout",
        str(HANDSHAKE_TIMEOUT),
        "--max-pending-handshakes",
        str(MAX_PENDING),
        "--max-connections-per-user",
        str(PER_USER),
    ).start()
    yield proc
    proc.stop()


@contextlib.asynccontextmanager
async def connected(
    srv: Server, sid: int, tok: str, *, source: str = "127.0.0.1"
) -> AsyncIterator[Client]:
    ws = await connect(
        srv.url(sid),
        subprotocols=["access_token", tok],  # type: ignore[list-item]
        local_addr=(source, 0),
    )
    c = Client(ws)
    try:
        yield c
    finally:
        await c.close()


async def status(srv: Server, sid: int, tok: str, *, source: str = "127.0.0.1") -> int:
    try:
        async with connected(srv, sid, tok, source=source) as c:
            await c.ok("Event.GetUnreadInfo", {})
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def http_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as r:
        return int(r.status)


def lines_with(srv: Server, *parts: str) -> list[str]:
    return [line for line in list(srv.lines) if all(p in line for p in parts)]


def logged(srv: Server, *parts: str, timeout: float = 10) -> str:
    """The first log line holding every part (waits for the output pipe)."""
    wait_until(lambda: bool(lines_with(srv, *parts)), timeout)
    return lines_with(srv, *parts)[0]


# --- item 2: a foreign token cannot use up a participant's connection allowance -------


async def test_unbound_customer_cannot_lock_staff_out(hostile: Server) -> None:
    # A customer token of application 500 naming no participant, as ?sid=31 (the issue's
    # attack with 32 connections; the module's server allows 3).
    customer = token(request_id=500)
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(PER_USER):
            c = await stack.enter_async_context(connected(hostile, 31, customer))
            await c.ok("Event.GetUnreadInfo", {})
        # Staff 31 is not touched by that: before, this was 429.
        assert await status(hostile, 31, token(admin_id=31)) == 101
        # So is a customer of another application naming participant 31.
        assert await status(hostile, 31, token(request_id=501, sid=31)) == 101
        # The unbound tokens of application 500 share one allowance, whatever the sid.
        assert await status(hostile, 31, customer) == 429
        assert await status(hostile, 32, customer) == 429


async def test_each_identity_keeps_its_own_limit_and_gets_it_back(
    hostile: Server,
) -> None:
    staff = token(admin_id=33)
    async with contextlib.AsyncExitStack() as stack:
        held = [await stack.enter_async_context(connected(hostile, 33, staff)) for _ in "abc"]
        assert await status(hostile, 33, staff) == 429
        await held[0].close()
        # The slot comes back once the server has ended that connection.
        deadline = time.monotonic() + 10
        while (code := await status(hostile, 33, staff)) == 429:
            assert time.monotonic() < deadline, "the closed connection's slot never came back"
            await asyncio.sleep(0.05)
        assert code == 101


# --- item 3: handshakes without an end --------------------------------------------------


async def open_raw(srv: Server, source: str) -> tuple[asyncio.StreamReader, Any]:
    return await asyncio.open_connection("127.0.0.1", srv.port, local_addr=(source, 0))


async def closed_after(reader: asyncio.StreamReader, within: float) -> float:
    """Seconds until the server ends the connection (EOF or reset); fails after ``within``."""
    start = time.monotonic()
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(65536), within):
            pass
    return time.monotonic() - start


async def test_silent_and_half_sent_handshakes_are_dropped(hostile: Server) -> None:
    silent_r, silent_w = await open_raw(hostile, "127.0.0.31")
    half_r, half_w = await open_raw(hostile, "127.0.0.31")
    half_w.write(b"GET /ws?sid=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nSec-WebSocket-Pro")
    drip_r, drip_w = await open_raw(hostile, "127.0.0.31")

    async def drip() -> None:  # a byte now and then does not buy more time
        with contextlib.suppress(ConnectionError):
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
                drip_w.write(bytes([byte]))
                await drip_w.drain()
                await asyncio.sleep(0.2)

    dripping = asyncio.create_task(drip())
    try:
        limit = HANDSHAKE_TIMEOUT + 5
        waits = await asyncio.gather(
            closed_after(silent_r, limit), closed_after(half_r, limit), closed_after(drip_r, limit)
        )
        assert all(w < limit for w in waits), waits
        line = logged(hostile, "127.0.0.31", "before its handshake")
        assert f"no complete request within {HANDSHAKE_TIMEOUT:g} s" in line
    finally:
        dripping.cancel()
        for w in (silent_w, half_w, drip_w):
            w.close()


async def test_a_client_gets_in_while_half_open_sockets_pile_up(hostile: Server) -> None:
    idle = [await open_raw(hostile, "127.0.0.32") for _ in range(MAX_PENDING * 5)]
    try:
        # Beyond the cap the oldest waiting sockets are closed at once, not after the
        # deadline: at most MAX_PENDING stay open.
        still_open = 0
        for r, _w in idle:
            try:
                await closed_after(r, 0.3)
            except TimeoutError:
                still_open += 1
        assert still_open <= MAX_PENDING, still_open
        logged(hostile, "127.0.0.32", f"more than {MAX_PENDING} connections without a request")
        # More idle sockets keep coming; a real client still connects and is served.
        more = [await open_raw(hostile, "127.0.0.32") for _ in range(MAX_PENDING * 2)]
        idle += more
        async with connected(hostile, 34, token(admin_id=34)) as c:
            assert (await c.ok("Event.GetUnreadInfo", {}))["total"] == 0
        assert await asyncio.to_thread(http_status, hostile.http("/healthz")) == 200
    finally:
        for _r, w in idle:
            w.close()


async def test_an_upgraded_connection_outlives_the_handshake_deadline(
    hostile: Server,
) -> None:
    # The deadline ends with the request: a WebSocket stays open long after it.
    async with connected(hostile, 35, token(admin_id=35)) as c:
        await asyncio.sleep(HANDSHAKE_TIMEOUT + 0.5)
        assert (await c.ok("Event.GetUnreadInfo", {}))["total"] == 0


# --- item 6: big inboxes and lists are paged ----------------------------------------------

INBOX = 260  # conversations of staff 46 (the had 20,000: the paging is the same)


async def test_conversation_list_and_unread_info_are_paged(hostile: Server) -> None:
    async with (
        client(hostile, 46, token(admin_id=46)) as s,
        client(hostile, 47, token(admin_id=47)) as other,
    ):
        apps = [460_000 + i for i in range(INBOX)]
        await asyncio.gather(*(s.ok("Event.AddConversation", {"application_id": a}) for a in apps))
        # Another staff member writes in every third: unread for 46, newest activity.
        for a in apps[::3]:
            await other.ok("Event.SendMessage", {"session_channel": str(a), "content": "hi"})
        unread_total = len(apps[::3])

        # The seed's call, no paging args: a small first page that says more exist.
        first = await s.ok("Event.GetConversationList", {})
        assert len(first["conversations"]) == 100
        assert first["has_more"] is True and isinstance(first["next_cursor"], str)
        walked = [c["application_id"] for c in first["conversations"]]
        cursor = first["next_cursor"]
        while cursor is not None:
            page = await s.ok("Event.GetConversationList", {"limit": 70, "cursor": cursor})
            assert len(page["conversations"]) <= 70
            walked += [c["application_id"] for c in page["conversations"]]
            cursor = page["next_cursor"]
            assert (cursor is not None) == page["has_more"]
        assert sorted(walked) == apps and len(set(walked)) == INBOX
        # Newest activity first: the conversations written in come first, newest first.
        assert walked[:unread_total] == list(reversed(apps[::3]))
        whole = await s.ok("Event.GetConversationList", {"limit": 1000})
        assert [c["application_id"] for c in whole["conversations"]] == walked
        assert whole["has_more"] is False and whole["next_cursor"] is None

        info = await s.ok("Event.GetUnreadInfo", {})
        assert len(info["conversations"]) == 100 and info["has_more"] is True
        assert info["total"] == unread_total  # every conversation's, not the page's
        counted = info["conversations"]
        cursor = info["next_cursor"]
        while cursor is not None:
            page = await s.ok("Event.GetUnreadInfo", {"limit": 90, "cursor": cursor})
            assert page["total"] == unread_total
            counted += page["conversations"]
            cursor = page["next_cursor"]
        assert [c["application_id"] for c in counted] == walked
        assert sum(c["unread"] for c in counted) == unread_total

        # The staff inbox ("all") is paged the same way.
        inbox = await s.ok("Event.GetConversationList", {"all": True, "limit": 5})
        assert len(inbox["conversations"]) == 5 and inbox["has_more"] is True

        for bad in (
            {"limit": 0},
            {"limit": 1001},
            {"limit": "5"},
            {"cursor": "x"},
            {"cursor": 5},
            {"cursor": "1_0"},
            {"cursor": "-1_5"},
        ):
            for event in ("Event.GetConversationList", "Event.GetUnreadInfo"):
                assert await s.error(event, bad) == "bad_request", (event, bad)
        await s.ok("Event.GetUnreadInfo", {})  # the connection stays up


# --- item 7: the smaller ones -------------------------------------------------------------


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
async def test_a_huge_time_claim_is_401_not_500(hostile: Server, claim: str) -> None:
    claims: dict[str, Any] = {"admin_id": 36, "exp": int(time.time()) + 600}
    claims[claim] = 10**400
    assert await status(hostile, 36, raw_token(claims)) == 401
    async with connected(hostile, 36, token(admin_id=36)) as c:
        reply = await c.call("Event.RefreshToken", {"token": raw_token(claims)})
        assert reply["ok"] is False and reply["error"]["code"] == "unauthorized", reply
        await c.ok("Event.GetUnreadInfo", {})  # the connection stays up
    assert "OverflowError" not in hostile.output


@pytest.mark.parametrize("aud", [0, False, {}, [], "api", ["api"]])
async def test_only_an_absent_or_empty_audience_is_accepted(hostile: Server, aud: Any) -> None:
    exp = int(time.time()) + 600
    assert await status(hostile, 37, raw_token({"admin_id": 37, "exp": exp, "aud": aud})) == 401
    assert await status(hostile, 37, raw_token({"admin_id": 37, "exp": exp, "aud": ""})) == 101
    assert await status(hostile, 37, raw_token({"admin_id": 37, "exp": exp, "aud": None})) == 101


async def nul_client_msg_id_is_refused(srv: Server) -> None:
    async with client(srv, 38, token(admin_id=38)) as c:
        await c.ok("Event.AddConversation", {"application_id": 380})
        args = {"session_channel": "380", "content": "hi", "client_msg_id": "a\x00b"}
        assert await c.error("Event.SendMessage", args) == "bad_request"
        page = await c.ok("Event.GetMessageList", {"session_channel": "380"})
        assert page["Messages"] == []  # nothing stored
    assert "Traceback" not in srv.output


async def test_nul_in_client_msg_id_is_bad_request_on_sqlite(hostile: Server) -> None:
    await nul_client_msg_id_is_refused(hostile)


async def test_nul_in_client_msg_id_is_bad_request_on_postgres() -> None:
    with postgres_database() as url:
        srv = await asyncio.to_thread(InProcessServer(url, "--rate", "0").start)
        try:
            await nul_client_msg_id_is_refused(srv)
        finally:
            await asyncio.to_thread(srv.stop)


def appchat(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appchat", *args],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("APPCHAT_")},
            "APPCHAT_JWT_SECRET": SECRET,
        },
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_migrate_does_not_print_the_database_password() -> None:
    with postgres_database() as url:  # the server trusts local users: any password works
        with_password = url.replace("postgres@", "postgres:hunter2-secret@", 1)
        out = appchat("migrate", "--database", with_password)
        assert out.returncode == 0, out.stderr
        assert "hunter2" not in out.stdout + out.stderr
        assert "postgres:***@" in out.stdout
    out = appchat("migrate", "--database", "postgresql://postgres:hunter2-secret@127.0.0.1:1/x")
    assert out.returncode == 2 and "hunter2" not in out.stdout + out.stderr


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_port_out_of_range_is_refused(port: str, tmp_path: Path) -> None:
    try:
        out = appchat("serve", "--port", port, "--database", f"sqlite:///{tmp_path}/p.db")
    except subprocess.TimeoutExpired:
        pytest.fail(f"--port {port} was taken: the server ran instead of refusing")
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"--port {port}" in out.stderr and "65535" in out.stderr
    assert "Traceback" not in out.stderr


async def test_an_oversize_header_is_one_line_without_the_token(hostile: Server) -> None:
    tok = token(admin_id=39) + "x" * 9000  # over aiohttp's 8190-byte field limit
    r, w = await open_raw(hostile, "127.0.0.33")
    w.write(
        b"GET /ws?sid=39 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Protocol: access_token, " + tok.encode() + b"\r\n\r\n"
    )
    try:
        head = await asyncio.wait_for(r.read(12), 10)
        assert head.startswith(b"HTTP/1.") and head.endswith(b" 400"), head
    finally:
        w.close()
    line = logged(hostile, "malformed HTTP request from 127.0.0.33")
    assert "LineTooLong" in line or "400" in line
    assert tok[:20] not in hostile.output
    assert "Traceback" not in hostile.output


async def test_a_database_outage_logs_a_few_lines_not_one_per_request() -> None:
    requests = 30
    with postgres_database() as url:
        proxy = await TcpProxy(5432).start()
        proxied = url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        srv = await asyncio.to_thread(ServerProcess(proxied, "--rate", "0").start)
        try:
            async with client(srv, 40, token(admin_id=40)) as c:
                await c.ok("Event.GetUnreadInfo", {})
                await proxy.stop()
                for _ in range(requests):
                    reply = await c.call("Event.GetUnreadInfo", {}, timeout=30)
                    assert reply["ok"] is False and reply["error"]["code"] == "unavailable"
        finally:
            await asyncio.to_thread(srv.stop)
            await proxy.stop()
    warnings = lines_with(srv, "WARNING", "database unavailable")
    assert 1 <= len(warnings) <= 10, len(warnings)


# --- item 8: the server's account of its connections -------------------------------------


async def test_open_and_close_are_logged_with_id_sid_remote_code_and_duration(
    hostile: Server,
) -> None:
    tok = token(admin_id=41)
    async with connected(hostile, 41, tok, source="127.0.0.41") as c:
        await c.ok("Event.GetUnreadInfo", {})
    opened = logged(hostile, "opened: sid 41 (staff) from 127.0.0.41")
    conn_id = opened.split("connection ", 1)[1].split(" ", 1)[0]
    closed = logged(hostile, f"connection {conn_id} closed: sid 41 from 127.0.0.41")
    assert "code 1000 (normal closure) after " in closed and closed.rstrip().endswith(" s")
    assert " INFO " in opened and " INFO " in closed
    assert tok not in hostile.output and tok.split(".")[1] not in hostile.output


async def test_refused_handshakes_are_logged_with_their_reason(hostile: Server) -> None:
    bad = token(admin_id=42, secret="another-secret-" + "9" * 40)
    assert await status(hostile, 42, bad, source="127.0.0.42") == 401
    line = logged(hostile, "handshake refused from 127.0.0.42 (sid 42): 401")
    assert "token signature is invalid" in line
    assert bad.split(".")[1] not in hostile.output
    assert await status(hostile, 42, token(admin_id=43), source="127.0.0.42") == 401
    logged(hostile, "refused from 127.0.0.42 (sid 42): 401 sid 42 does not match")


async def test_connection_lines_are_rate_limited_per_remote(hostile: Server) -> None:
    flood = 60
    bad = token(admin_id=44, secret="another-secret-" + "9" * 40)
    for _ in range(flood):
        assert await status(hostile, 44, bad, source="127.0.0.44") == 401
    # Another address is not affected; its line also marks the end of the flood's lines.
    assert await status(hostile, 44, bad, source="127.0.0.45") == 401
    logged(hostile, "handshake refused from 127.0.0.45")
    from_flood = lines_with(hostile, "handshake refused from 127.0.0.44")
    assert 1 <= len(from_flood) <= 40, len(from_flood)  # 20 per 10 s


def test_rate_limited_log_counts_what_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    from appchat.common.ratelog import RateLimitedLog

    now = [0.0]
    limited = RateLimitedLog(
        logging.getLogger("test.ratelog"), period=10, burst=2, clock=lambda: now[0]
    )
    with caplog.at_level(logging.INFO, logger="test.ratelog"):
        written = [limited.info("k", "line %d", i) for i in range(5)]
        assert limited.info("other", "other key")
        now[0] = 10.0
        assert limited.info("k", "line again")
    assert written == [True, True, False, False, False]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["line 0", "line 1", "other key", "line again (3 similar line(s) left out)"]


# --- issue 17: uploads cut short -----------------------------------------------------------


async def aborted_upload(srv: Server, source: str) -> None:
    """An upload whose client goes away after half its body (Content-Length says more)."""
    part = (
        b'--b\r\nContent-Disposition: form-data; name="application_id"\r\n\r\n1\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    )
    _, w = await open_raw(srv, source)
    w.write(
        b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + token(admin_id=46).encode()
        + b"\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        + b"Content-Length: 100000\r\n\r\n"
        + part
        + b"x" * 1000
    )
    await w.drain()
    w.close()
    await w.wait_closed()


async def test_an_aborted_upload_logs_one_short_line_rate_limited(hostile: Server) -> None:
    for _ in range(20):
        await aborted_upload(hostile, "127.0.0.46")
    await aborted_upload(hostile, "127.0.0.47")  # another address: marks the end
    line = logged(hostile, "upload from 127.0.0.47 aborted")
    assert line.rstrip().endswith("ConnectionResetError"), line
    from_flood = lines_with(hostile, "upload from 127.0.0.46 aborted")
    assert 1 <= len(from_flood) <= 5, from_flood  # 5 per 10 s and address
    assert "Error handling request" not in hostile.output
    assert "Traceback" not in hostile.output
