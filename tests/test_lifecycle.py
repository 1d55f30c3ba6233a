"""The server as a process: restarts on the same file, token expiry, shutdown, health."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .support import (
    Clock,
    InProcessServer,
    RawSocket,
    Server,
    ServerProcess,
    client,
    closed_lines,
    connections,
    eventually,
    token,
)


async def test_restart_on_the_same_database_file(tmp_path: Path) -> None:
    db = tmp_path / "restart.db"
    srv = InProcessServer(db).start()
    try:
        async with client(srv, 1, token(admin_id=1)) as s:
            conv = await s.ok("Event.AddConversation", {"application_id": 77})
            first = await s.ok(
                "Event.SendMessage",
                {"session_channel": "77", "content": "before", "client_msg_id": "a"},
            )
    finally:
        assert srv.stop() == 0
    srv.start()
    try:
        async with client(srv, 1, token(admin_id=1)) as s:
            again = await s.ok("Event.AddConversation", {"application_id": 77})
            assert again["id"] == conv["id"] and again["create_at"] == conv["create_at"]
            retry = await s.ok(
                "Event.SendMessage",
                {"session_channel": "77", "content": "before", "client_msg_id": "a"},
            )
            assert retry == first  # idempotency survives the restart
            second = await s.ok("Event.SendMessage", {"session_channel": "77", "content": "after"})
            assert second["message"]["id"] > first["message"]["id"]
            page = await s.ok("Event.GetMessageList", {"session_channel": "77"})
            assert [m["content"] for m in page["Messages"]] == ["before", "after"]
            listed = await s.ok("Event.GetConversationList", {})
            assert [c["id"] for c in listed["conversations"]] == [conv["id"]]
    finally:
        assert srv.stop() == 0


async def test_expired_token_closes_4001_unless_refreshed(tmp_path: Path) -> None:
    clock = Clock(time.time)  # the server's: the test moves it past exp
    server = InProcessServer(tmp_path / "expiry.db", clock=clock).start()
    try:
        await expired_token_closes_4001_unless_refreshed(server, clock)
    finally:
        server.stop()


async def expired_token_closes_4001_unless_refreshed(server: Server, clock: Clock) -> None:
    async with (
        client(server, 1, token(admin_id=1, ttl=2)) as lapsing,
        client(server, 1, token(admin_id=1, ttl=2)) as refreshed,
    ):
        result = await refreshed.ok("Event.RefreshToken", {"token": token(admin_id=1, ttl=60)})
        assert result["exp"] > 0
        clock.advance(2)  # past the first exp, long before the refreshed one
        with pytest.raises(ConnectionClosed) as info:
            for _ in range(60):
                await lapsing.ws.send('{"name": "Event.GetUnreadInfo"}')
                await asyncio.sleep(0.1)
        assert info.value.rcvd is not None and info.value.rcvd.code == 4001
        await refreshed.ok("Event.GetUnreadInfo", {})  # still up past the first exp


async def test_refresh_to_an_earlier_expiry_closes_then(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """...and the connection log says why it ended: the code of the close the server
    began, not the "normal closure" its read loop saw (it used to log 1000)."""
    caplog.set_level(logging.INFO, "appchat.connections")
    clock = Clock(time.time)  # the server's: the test moves it past the new exp
    server = InProcessServer(tmp_path / "earlier.db", clock=clock).start()
    try:
        async with client(server, 1, token(admin_id=1, ttl=600)) as c:
            await c.ok("Event.RefreshToken", {"token": token(admin_id=1, ttl=2)})
            clock.advance(2)
            assert await c.close_code(timeout=10) == 4001
        await eventually(
            lambda: len(closed_lines(caplog, 1)) == 1, what="the connection's end logged"
        )
        assert ", code 4001 (token expired) after " in closed_lines(caplog, 1)[0]
    finally:
        server.stop()


def get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_and_readiness(server: Server) -> None:
    assert get(server.http("/healthz")) == (200, {"status": "ok"})
    status, body = get(server.http("/readyz"))
    assert status == 200 and body["checks"] == {"database": "ok", "broker": "ok"}


async def test_sigterm_closes_1001_keeps_acked_messages_and_exits_0(tmp_path: Path) -> None:
    db = tmp_path / "term.db"
    srv = ServerProcess(db).start()
    acked: list[int] = []
    async with client(srv, 1, token(admin_id=1)) as s:
        await s.ok("Event.AddConversation", {"application_id": 9})
        for i in range(20):
            r = await s.ok("Event.SendMessage", {"session_channel": "9", "content": f"m{i}"})
            acked.append(r["message"]["id"])
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        assert await s.close_code() == 1001
    assert srv.stop() == 0
    srv.start()
    try:
        async with client(srv, 1, token(admin_id=1)) as s:
            page = await s.ok("Event.GetMessageList", {"session_channel": "9", "limit": 500})
            assert [m["id"] for m in page["Messages"]] == acked
    finally:
        srv.stop()


async def test_shutdown_reads_the_clients_answer_to_its_close(tmp_path: Path) -> None:
    """SIGTERM closes each connection with 1001 and reads the client's close frame back:
    the connection ends as going away, not lost after the close timeout."""
    srv = ServerProcess(tmp_path / "answer.db", "--log-level", "INFO").start()
    async with client(srv, 1, token(admin_id=1)) as s:
        await s.ok("Event.GetUnreadInfo", {})
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        assert await s.close_code() == 1001
    assert srv.stop() == 0
    closed = [line for line in srv.lines if " closed: sid 1 " in line]
    assert len(closed) == 1 and "code 1001 (going away)" in closed[0], srv.output


async def test_no_websocket_is_taken_once_the_drain_began(tmp_path: Path) -> None:
    """Once shutdown began closing the WebSockets, an upgrade that still reaches the node
    (on a kept-alive connection, or accepted just before the listener closed) is refused
    with 503 instead of opening a session the drain would never close."""
    srv = InProcessServer(tmp_path / "drain.db").start()
    try:
        async with client(srv, 1, token(admin_id=1)) as s:
            await s.ok("Event.GetUnreadInfo", {})
            assert srv.node is not None
            await asyncio.to_thread(srv.run, srv.node.ws.close_all())
            assert await s.close_code() == 1001
        with pytest.raises(InvalidStatus) as refused:
            async with client(srv, 1, token(admin_id=1)):
                pass
        assert refused.value.response.status_code == 503
        assert b"shutting down" in refused.value.response.body
    finally:
        srv.stop()


async def test_connections_without_a_request_are_ended_once_shutdown_began(
    tmp_path: Path,
) -> None:
    """Shutdown ends the connections that have sent no request yet, and any the listener
    still hands over after it closed (a socket accepted just before arrives a few loop
    turns later): none of them reaches a node that is stopping."""
    # a handshake deadline that cannot be what ends them
    srv = InProcessServer(tmp_path / "guard.db", "--handshake-timeout", "60").start()
    writers: list[asyncio.StreamWriter] = []
    try:
        node = srv.node
        assert node is not None
        early, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writers.append(writer)
        await eventually(lambda: node.guard.pending == 1)

        async def close_guard() -> None:
            node.guard.close()  # what Node.stop does once its listener is closed

        await asyncio.to_thread(srv.run, close_guard())
        assert await ended(early)
        late, writer = await asyncio.open_connection("127.0.0.1", srv.port)  # still listening
        writers.append(writer)
        assert await ended(late)
        assert node.guard.pending == 0
    finally:
        for writer in writers:
            writer.close()
        srv.stop()


async def ended(reader: asyncio.StreamReader) -> bool:
    """The server ended this connection (closed or reset it) without a word."""
    try:
        return await asyncio.wait_for(reader.read(), 10) == b""
    except ConnectionResetError:
        return True


async def test_repeated_sigterm_during_shutdown_still_exits_0(tmp_path: Path) -> None:
    """A supervisor that keeps signalling while the server drains (and after its event loop
    has closed) must not turn a clean exit into death by signal."""
    srv = ServerProcess(tmp_path / "again.db").start()
    proc = srv.proc
    assert proc is not None
    async with client(srv, 1, token(admin_id=1)) as s:
        await s.ok("Event.AddConversation", {"application_id": 9})
        signals = 0
        while proc.poll() is None:  # every phase of the shutdown, up to the process's exit
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
                signals += 1
            await asyncio.sleep(0.002)
        assert signals > 1
    assert proc.wait() == 0
    assert "Traceback" not in srv.output
    srv.stop()


async def test_metrics_count_connections_and_events(server: Server) -> None:
    def scrape() -> str:
        with urllib.request.urlopen(server.http("/metrics"), timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            return str(r.read().decode())

    async with client(server, 1, token(admin_id=1)) as c:
        await c.ok("Event.GetUnreadInfo", {})
        await c.error("Event.GetMessageList", {})
        text = scrape()
        assert "appchat_connections 1.0" in text
        assert 'appchat_events_total{event="Event.GetUnreadInfo",outcome="ok"}' in text
        assert 'appchat_events_total{event="Event.GetMessageList",outcome="bad_request"}' in text
    await asyncio.sleep(0.2)
    assert "appchat_connections 0.0" in scrape()


def live_raw(srv: Server, sid: int) -> RawSocket:
    """A raw client whose session is live (it was answered once)."""
    raw = RawSocket(srv, sid, token(admin_id=sid))
    assert raw.status == 101
    raw.sock.sendall(raw.request("Event.GetUnreadInfo", {}, "r1"))
    seen = b""
    while b'"r1"' not in seen:
        seen += raw.sock.recv(65536)
    return raw


async def test_shutdown_logs_its_own_close_code_whatever_the_client_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection log says why a connection ended: a client that answers the
    shutdown's close with another code (1000) and one that never answers (cut after the
    grace) are both logged 1001, the server's code (they used to be logged 1000 and 1006)."""
    caplog.set_level(logging.INFO, "appchat.connections")
    srv = InProcessServer(tmp_path / "codes.db").start()
    try:
        polite, silent = live_raw(srv, 1), live_raw(srv, 2)
        assert srv.node is not None
        ws = srv.node.ws

        def answer_with_1000() -> None:
            seen = b""
            while not seen.endswith(b"server shutdown"):  # our close frame
                seen += polite.sock.recv(65536)
            polite.sock.sendall(RawSocket.frame(struct.pack("!H", 1000), opcode=0x8))
            while polite.sock.recv(65536):  # until the server ends the stream
                pass

        await asyncio.gather(
            asyncio.to_thread(srv.run, ws.close_all(grace=1.0)),
            asyncio.to_thread(answer_with_1000),
        )
        for sid in (1, 2):
            (line,) = closed_lines(caplog, sid)
            assert ", code 1001 (going away) after " in line, line
        polite.close()
        silent.close()
    finally:
        srv.stop()


async def test_shutdown_cuts_a_connection_still_open_after_the_grace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that never answers the close frame keeps its session waiting for the
    answer (up to the close timeout, 2 s); shutdown's grace ends first: the socket is cut,
    and no session is left when close_all returns (aiohttp no longer knows these sockets,
    so nothing else would end them). The cut connection is counted as closed and logged
    as any other."""
    caplog.set_level(logging.INFO, "appchat.connections")
    srv = InProcessServer(tmp_path / "cut.db").start()
    try:
        raw = live_raw(srv, 1)
        assert srv.node is not None
        ws = srv.node.ws
        (session,) = list(ws._handlers)
        await asyncio.to_thread(srv.run, ws.close_all(grace=1.0))
        # cut (cancelled) after the grace, while its own close waited for the answer (up
        # to 2 s, CLOSE_TIMEOUT), and gone
        assert session.cancelled() and not ws._handlers
        assert connections(srv) == 0
        assert len(closed_lines(caplog, 1)) == 1, closed_lines(caplog, 1)
        seen = b""
        with contextlib.suppress(ConnectionResetError):  # cut: a reset, or the end
            while chunk := raw.sock.recv(65536):
                seen += chunk
        # the close frame last (1001, "server shutdown"): the answer was not awaited
        assert seen.endswith(b"\x88\x11\x03\xe9server shutdown"), seen
    finally:
        srv.stop()
