"""The server's account of its connections: the connection log and the close codes' names
with plain values and a moved clock, then a real server's log (a child process): opens and
closes, refused handshakes, malformed requests, aborted uploads and a database outage, each
in a line or a few, never with a token, and budgeted per remote address.

The tests that read the server's log connect from addresses of their own (127.0.0.N): the
log's budget is per remote address, so they never share it.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from appchat.common.ratelog import RateLimitedLog
from appchat.protocol.closecodes import CloseCode, describe
from appchat.transport.connlog import ConnectionLog

from .backends import postgres_database
from .support import (
    Clock,
    Server,
    ServerProcess,
    TcpProxy,
    client,
    lines_with,
    logged,
    module_server,
    open_raw,
    status,
    token,
)

logging_server = module_server("--rate", "0", "--log-level", "INFO", process=True)


@pytest.fixture
def clock() -> Clock:
    return Clock(lambda: 1000.0)


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "appchat.connections"]


def test_every_close_code_the_server_sends_has_a_name() -> None:
    assert {describe(int(code)) for code in CloseCode} == {
        "normal closure",
        "going away",
        "protocol error",
        "unsupported data",
        "no status code",
        "connection lost",
        "invalid data",
        "policy violation",
        "frame too big",
        "server error",
        "token expired",
        "slow consumer",
        "disconnected by the server API",
    }
    assert describe(4009) == "disconnected by the server API"
    assert describe(4321) == describe(3000) == "application code"
    assert describe(1004) == describe(999) == "other"


def test_open_and_close_lines_carry_who_how_and_how_long(
    caplog: pytest.LogCaptureFixture, clock: Clock
) -> None:
    caplog.set_level(logging.INFO, "appchat.connections")
    log = ConnectionLog(clock=clock)
    since = log.opened("c1", sid=7, role="customer", remote="10.0.0.1")
    clock.advance(2.5)
    log.closed("c1", sid=7, remote="10.0.0.1", code=4009, since=since)
    log.closed("c2", sid=8, remote="10.0.0.2", code=None, since=since)  # no close frame
    log.refused(401, "token has expired", remote="10.0.0.3", sid=None)
    log.refused(401, "bad signature", remote="10.0.0.4", sid=3, what="token check")
    assert lines(caplog) == [
        "connection c1 opened: sid 7 (customer) from 10.0.0.1",
        "connection c1 closed: sid 7 from 10.0.0.1, code 4009 "
        "(disconnected by the server API) after 2.5 s",
        "connection c2 closed: sid 8 from 10.0.0.2, code 1006 (connection lost) after 2.5 s",
        "handshake refused from 10.0.0.3 (sid -): 401 token has expired",
        "token check refused from 10.0.0.4 (sid 3): 401 bad signature",
    ]
    closed = next(r for r in caplog.records if "closed" in r.getMessage())
    assert (closed.__dict__["code"], closed.__dict__["duration"]) == (4009, 2.5)


def test_an_address_reconnecting_in_a_loop_gets_a_budget_of_lines(
    caplog: pytest.LogCaptureFixture, clock: Clock
) -> None:
    caplog.set_level(logging.INFO, "appchat.connections")
    log = ConnectionLog(period=10.0, burst=3, clock=clock)
    for n in range(50):
        log.refused(401, "bad token", remote="10.0.0.9", sid=n)
    log.refused(401, "bad token", remote="10.0.0.10", sid=1)  # another address: its own
    assert len(lines(caplog)) == 4
    clock.advance(10.0)
    log.refused(401, "bad token", remote="10.0.0.9", sid=99)
    assert lines(caplog)[-1] == (
        "handshake refused from 10.0.0.9 (sid 99): 401 bad token (47 similar line(s) left out)"
    )


def test_rate_limited_log_counts_what_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
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


# --- a real server's log ---------------------------------------------------------------------


async def test_open_and_close_are_logged_with_id_sid_remote_code_and_duration(
    logging_server: Server,
) -> None:
    tok = token(admin_id=41)
    async with client(logging_server, 41, tok, local_addr=("127.0.0.41", 0)) as c:
        await c.ok("Event.GetUnreadInfo", {})
    opened = logged(logging_server, "opened: sid 41 (staff) from 127.0.0.41")
    conn_id = opened.split("connection ", 1)[1].split(" ", 1)[0]
    closed = logged(logging_server, f"connection {conn_id} closed: sid 41 from 127.0.0.41")
    assert "code 1000 (normal closure) after " in closed and closed.rstrip().endswith(" s")
    assert " INFO " in opened and " INFO " in closed
    assert tok not in logging_server.output and tok.split(".")[1] not in logging_server.output


async def test_refused_handshakes_are_logged_with_their_reason(logging_server: Server) -> None:
    bad = token(admin_id=42, secret="another-secret-" + "9" * 40)
    assert await status(logging_server, 42, bad, local_addr=("127.0.0.42", 0)) == 401
    line = logged(logging_server, "handshake refused from 127.0.0.42 (sid 42): 401")
    assert "token signature is invalid" in line
    assert bad.split(".")[1] not in logging_server.output
    other = token(admin_id=43)
    assert await status(logging_server, 42, other, local_addr=("127.0.0.42", 0)) == 401
    logged(logging_server, "refused from 127.0.0.42 (sid 42): 401 sid 42 does not match")


async def test_connection_lines_are_rate_limited_per_remote(logging_server: Server) -> None:
    flood = 60
    bad = token(admin_id=44, secret="another-secret-" + "9" * 40)
    for _ in range(flood):
        assert await status(logging_server, 44, bad, local_addr=("127.0.0.44", 0)) == 401
    # Another address is not affected; its line also marks the end of the flood's lines.
    assert await status(logging_server, 44, bad, local_addr=("127.0.0.45", 0)) == 401
    logged(logging_server, "handshake refused from 127.0.0.45")
    from_flood = lines_with(logging_server, "handshake refused from 127.0.0.44")
    assert 1 <= len(from_flood) <= 40, len(from_flood)  # 20 per 10 s


async def test_an_oversize_header_is_one_line_without_the_token(logging_server: Server) -> None:
    tok = token(admin_id=39) + "x" * 9000  # over aiohttp's 8190-byte field limit
    r, w = await open_raw(logging_server, "127.0.0.33")
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
    line = logged(logging_server, "malformed HTTP request from 127.0.0.33")
    assert "LineTooLong" in line or "400" in line
    assert tok[:20] not in logging_server.output
    assert "Traceback" not in logging_server.output


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


async def test_an_aborted_upload_logs_one_short_line_rate_limited(logging_server: Server) -> None:
    for _ in range(20):
        await aborted_upload(logging_server, "127.0.0.46")
    await aborted_upload(logging_server, "127.0.0.47")  # another address: marks the end
    line = logged(logging_server, "upload from 127.0.0.47 aborted")
    assert line.rstrip().endswith("ConnectionResetError"), line
    from_flood = lines_with(logging_server, "upload from 127.0.0.46 aborted")
    assert 1 <= len(from_flood) <= 5, from_flood  # 5 per 10 s and address
    assert "Error handling request" not in logging_server.output
    assert "Traceback" not in logging_server.output


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
