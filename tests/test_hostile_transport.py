"""The hostile catalogue, round two (issue 12), the transport's part: connections that
outlive their sockets, replies bigger than a connection's budget, ping floods, big
inboxes and a hung broker.

The attackers here speak WebSocket over raw sockets (``RawSocket``): they choose their
receive buffer, never read, and end with a TCP reset, as no polite client library would.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import struct
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from .backends import PrivateRedis, postgres_database, require
from .support import InProcessServer, Server, ServerProcess, client, token, wait_until
from .test_cluster import _start_all

BIG_ID = "x" * 60_000  # echoed back in every reply: a 60 KB reply to a 60 KB request


OPEN: list[socket.socket] = []  # every RawSocket's socket, closed after each test


@pytest.fixture(autouse=True)
def close_attackers() -> Iterator[None]:
    yield
    while OPEN:
        OPEN.pop().close()


class RawSocket:
    """A WebSocket client on a plain socket: it writes frames and reads only when told."""

    def __init__(self, srv: Server, sid: int, tok: str, *, rcvbuf: int = 4096) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        OPEN.append(self.sock)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", srv.port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /ws?sid={sid} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: access_token, {tok}\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            head += chunk
        self.status = int(head.split(b" ", 2)[1])

    @staticmethod
    def frame(payload: bytes, opcode: int = 0x1) -> bytes:
        """A client frame, masked with the key 0 (legal, and the payload stays as is)."""
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        return head + b"\0\0\0\0" + payload

    def request(self, name: str, args: dict[str, object], request_id: str) -> bytes:
        doc = {"name": name, "id": request_id, "args": json.dumps(args)}
        return self.frame(json.dumps(doc).encode())

    def pipeline(self, data: bytes, *, until_blocked: float = 1.0, most: int = 10_000) -> int:
        """Send ``data`` again and again until the server stops taking it; how many went."""
        self.sock.settimeout(until_blocked)
        sent = 0
        try:
            for _ in range(most):
                self.sock.sendall(data)
                sent += 1
        except TimeoutError:
            pass
        return sent

    def reset(self) -> None:
        """End with a TCP reset (SO_LINGER 0), whatever is still buffered."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def metric(srv: Server, name: str) -> float:
    with urllib.request.urlopen(srv.http("/metrics"), timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def connections(srv: Server) -> int:
    return int(metric(srv, "appchat_connections"))


def rss_mb(srv: ServerProcess) -> float:
    assert srv.proc is not None
    for line in Path(f"/proc/{srv.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def served(srv: Server, sid: int, tok: str) -> int:
    """Connect, ask, close; the handshake's status (101 when served)."""

    async def run() -> int:
        try:
            async with client(srv, sid, tok) as c:
                await c.ok("Event.GetUnreadInfo", {})
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    return asyncio.run(run())


# --- item 1: a connection never outlives its socket ---------------------------------------

MAX_CONNECTIONS = 10


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """No heartbeat (it would end the attackers' connections on its own), 10 connections."""
    db = tmp_path_factory.mktemp("capped") / "appchat.db"
    proc = ServerProcess(
        db,
        "--rate",
        "0",
        "--heartbeat",
        "0",
        "--max-connections",
        str(MAX_CONNECTIONS),
        "--log-level",
        "WARNING",
    ).start()
    yield proc
    proc.stop()


def attack_and_reset(srv: Server, sid: int) -> None:
    """Fill the server with clients that pipeline big replies, never read, then reset."""
    attackers = [RawSocket(srv, sid + i, token(admin_id=sid + i)) for i in range(MAX_CONNECTIONS)]
    try:
        assert all(a.status == 101 for a in attackers)
        request = attackers[0].request("Event.GetUnreadInfo", {}, BIG_ID)
        with concurrent.futures.ThreadPoolExecutor(len(attackers)) as pool:
            assert all(sent > 0 for sent in pool.map(lambda a: a.pipeline(request), attackers))
        # Every slot is held: the server counts them all.
        assert connections(srv) == MAX_CONNECTIONS
        assert served(srv, sid + 99, token(admin_id=sid + 99)) == 503
    finally:
        for a in attackers:
            a.reset()


def test_reset_connections_with_backlogs_are_ended(capped: ServerProcess) -> None:
    baseline = rss_mb(capped)
    for round_ in range(3):
        attack_and_reset(capped, 1000 + round_ * 100)
        # Each reset ends its connection: the count comes back to zero...
        wait_until(lambda: connections(capped) == 0, timeout=15)
        # ... the memory the attackers held is given back (they held ~80 MB) ...
        wait_until(lambda: rss_mb(capped) < baseline + 30, timeout=15)
        # ... and every slot can be taken again.
        for i in range(MAX_CONNECTIONS):
            assert served(capped, 1500 + i, token(admin_id=1500 + i)) == 101


def test_a_closed_connection_is_ended(capped: Server) -> None:
    async def run() -> None:
        async with client(capped, 1600, token(admin_id=1600)) as c:
            await c.ok("Event.GetUnreadInfo", {})
            assert await asyncio.to_thread(connections, capped) == 1

    wait_until(lambda: connections(capped) == 0, timeout=15)
    asyncio.run(run())
    wait_until(lambda: connections(capped) == 0, timeout=15)


def test_a_closed_connection_with_a_backlog_is_ended(capped: Server) -> None:
    wait_until(lambda: connections(capped) == 0, timeout=15)
    a = RawSocket(capped, 1601, token(admin_id=1601))
    assert a.status == 101
    a.pipeline(a.request("Event.GetUnreadInfo", {}, BIG_ID))
    assert connections(capped) == 1
    a.close()  # a FIN, not a reset: the server's writes then fail
    wait_until(lambda: connections(capped) == 0, timeout=15)


def test_a_heartbeat_timeout_ends_a_connection_with_a_backlog(tmp_path: Path) -> None:
    srv = InProcessServer(tmp_path / "hb.db", "--rate", "0", "--heartbeat", "1").start()
    try:
        quiet = RawSocket(srv, 1700, token(admin_id=1700))  # answers no ping
        stuck = RawSocket(srv, 1701, token(admin_id=1701))  # nor reads its replies
        assert quiet.status == stuck.status == 101
        stuck.pipeline(stuck.request("Event.GetUnreadInfo", {}, BIG_ID))
        assert connections(srv) == 2
        started = time.monotonic()
        wait_until(lambda: connections(srv) == 0, timeout=15)
        assert time.monotonic() - started < 10
        quiet.close()
        stuck.close()
    finally:
        srv.stop()


def test_a_slow_consumer_is_closed_4008_and_ended(tmp_path: Path) -> None:
    srv = InProcessServer(
        tmp_path / "slow.db", "--rate", "0", "--send-buffer", "200000", "--heartbeat", "0"
    ).start()
    try:
        stuck = RawSocket(srv, 1800, token(admin_id=1800))
        assert stuck.status == 101

        async def flood() -> None:
            async with client(srv, 1801, token(admin_id=1801)) as s:
                await s.ok("Event.AddConversation", {"application_id": 1800})
                stuck.sock.sendall(
                    stuck.request("Event.AddConversation", {"application_id": 1800}, "join")
                )
                # Pushes of ~4 KB until the stuck client's budget is spent.
                for _ in range(2000):
                    await s.ok(
                        "Event.SendMessage",
                        {"session_channel": "1800", "content": "\U0001f600" * 4000},
                    )
                    if await asyncio.to_thread(connections, srv) == 1:
                        return
                raise AssertionError("the slow consumer was never dropped")

        asyncio.run(flood())
        wait_until(lambda: connections(srv) == 0, timeout=15)
        assert 'appchat_disconnects_total{reason="slow consumer"} 1.0' in metrics_text(srv)
        stuck.close()
    finally:
        srv.stop()


def metrics_text(srv: Server) -> str:
    with urllib.request.urlopen(srv.http("/metrics"), timeout=10) as r:
        body: bytes = r.read()
    return body.decode()


# --- item 4: one reply cannot blow the per-connection budget -----------------------------

EMOJI_MESSAGES = 300  # of 4000 emoji each: 16 KB apiece, a 500-page would be ~5 MB
SEND_BUFFER = 256 * 1024


@pytest.fixture(scope="module")
def emoji(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    db = tmp_path_factory.mktemp("emoji") / "appchat.db"
    proc = ServerProcess(
        db,
        "--rate",
        "0",
        "--heartbeat",
        "0",
        "--send-buffer",
        str(SEND_BUFFER),
        "--sqlite-synchronous",
        "NORMAL",
    ).start()

    async def seed() -> None:
        async with client(proc, 2000, token(admin_id=2000)) as c:
            await c.ok("Event.AddConversation", {"application_id": 2000})
            for i in range(EMOJI_MESSAGES):
                content = f"{i:04d}" + "\U0001f600" * 3996
                await c.ok("Event.SendMessage", {"session_channel": "2000", "content": content})

    asyncio.run(seed())
    yield proc
    proc.stop()


def page_bytes(reply: dict[str, object]) -> int:
    return len(json.dumps(reply, ensure_ascii=False).encode())


async def test_a_reading_client_pages_through_every_big_message(emoji: Server) -> None:
    async with client(emoji, 2001, token(admin_id=2001), max_size=None) as c:
        # Back from the newest, 500 at a time asked: each page stays within the bound
        # (the reply bound is the send buffer when that is below 1 MiB).
        back: list[int] = []
        args: dict[str, object] = {"session_channel": "2000", "limit": 500}
        pages = 0
        while True:
            reply = await c.call("Event.GetMessageList", args)
            assert reply["ok"] is True
            assert page_bytes(reply) <= SEND_BUFFER + 4096
            result = reply["result"]
            ids = [m["id"] for m in result["Messages"]]
            assert ids == sorted(ids) and ids
            back = ids + back
            pages += 1
            if not result["has_more"]:
                break
            args = {"session_channel": "2000", "limit": 500, "before_id": ids[0]}
        assert pages >= 15  # ~5 MB of messages in pages of at most 256 KiB
        # Forward from the start, the same messages, none skipped, none twice.
        forward: list[int] = []
        cursor = 0
        while True:
            reply = await c.call(
                "Event.GetMessageList",
                {"session_channel": "2000", "limit": 500, "after_id": cursor},
            )
            assert page_bytes(reply) <= SEND_BUFFER + 4096
            result = reply["result"]
            forward += [m["id"] for m in result["Messages"]]
            if not result["has_more"]:
                break
            cursor = forward[-1]
        assert forward == back and len(forward) == EMOJI_MESSAGES
        assert len(set(forward)) == EMOJI_MESSAGES
        # Small pages are what they were: exactly the limit, has_more from the store.
        small = await c.ok("Event.GetMessageList", {"session_channel": "2000", "limit": 3})
        assert [m["id"] for m in small["Messages"]] == forward[-3:] and small["has_more"]


def peak_rss_mb(srv: ServerProcess) -> float:
    assert srv.proc is not None
    for line in Path(f"/proc/{srv.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def served_pages(srv: Server) -> float:
    text = metrics_text(srv)
    for line in text.splitlines():
        if line.startswith('appchat_events_total{event="Event.GetMessageList",outcome="ok"}'):
            return float(line.split()[1])
    return 0.0


def test_never_reading_clients_asking_huge_pages_hold_their_budget_only(
    emoji: ServerProcess,
) -> None:
    attackers_count, asks = 16, 8
    assert emoji.proc is not None
    Path(f"/proc/{emoji.proc.pid}/clear_refs").write_text("5")  # resets the peak RSS
    before = rss_mb(emoji)
    attackers = [
        RawSocket(emoji, 2100 + i, token(admin_id=2100 + i)) for i in range(attackers_count)
    ]
    try:
        ask = attackers[0].request(
            "Event.GetMessageList", {"session_channel": "2000", "limit": 500}, "big"
        )
        for a in attackers:
            assert a.status == 101
            a.sock.sendall(ask * asks)
        # Wait until the server has served all it will: every attacker had a page at
        # least (so every budget is in use), then the count stops moving.
        wait_until(lambda: served_pages(emoji) >= attackers_count, timeout=30)
        last = -1.0
        while (now := served_pages(emoji)) != last:
            last = now
            time.sleep(1.0)
        grown = peak_rss_mb(emoji) - before
        # Each holds at most its send budget and a reply beyond it (256 KiB each, the
        # one being written twice: as a reply and as a frame) and what serving a page
        # takes: ~1.5 MB each at most, far below one ~5 MB page each (as before).
        assert grown < attackers_count * 2.5, (before, grown, last)
        assert connections(emoji) == attackers_count
    finally:
        for a in attackers:
            a.reset()
    wait_until(lambda: connections(emoji) == 0, timeout=15)


# --- item 5: ping floods ---------------------------------------------------------------


async def test_a_ping_flood_is_closed_1008_and_others_stay_fast(tmp_path: Path) -> None:
    # The default budget: --rate 50 --burst 100. A process of its own: the flood comes
    # from this one, and would take the server's turns here.
    srv = await asyncio.to_thread(ServerProcess(tmp_path / "ping.db").start)
    try:
        async with client(srv, 1900, token(admin_id=1900)) as other:
            await other.ok("Event.GetUnreadInfo", {})
            calm = []
            for _ in range(5):
                t0 = time.perf_counter()
                await other.ok("Event.GetUnreadInfo", {})
                calm.append(time.perf_counter() - t0)

            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            try:
                key = base64.b64encode(os.urandom(16)).decode()
                writer.write(
                    (
                        f"GET /ws?sid=1901 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                        f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                        f"Sec-WebSocket-Key: {key}\r\n"
                        f"Sec-WebSocket-Protocol: access_token, {token(admin_id=1901)}\r\n\r\n"
                    ).encode()
                )
                head = await reader.readuntil(b"\r\n\r\n")
                assert b" 101 " in head
                ping = RawSocket.frame(b"p" * 100, opcode=0x9)
                closed = asyncio.Event()

                async def flood() -> int:
                    sent = 0
                    with contextlib.suppress(ConnectionError):
                        while not closed.is_set():
                            writer.write(ping * 50)
                            sent += 50
                            await writer.drain()
                    return sent

                async def close_code() -> int:
                    # Read frames until the server's close frame: its code.
                    try:
                        while True:
                            b0, b1 = await reader.readexactly(2)
                            n = b1 & 0x7F
                            if n == 126:
                                (n,) = struct.unpack("!H", await reader.readexactly(2))
                            elif n == 127:
                                (n,) = struct.unpack("!Q", await reader.readexactly(8))
                            payload = await reader.readexactly(n)
                            if b0 & 0x0F == 0x8:
                                return int(struct.unpack("!H", payload[:2])[0])
                    finally:
                        closed.set()

                flooding = asyncio.create_task(flood())
                during: list[float] = []
                code_task = asyncio.create_task(close_code())
                while not code_task.done() and len(during) < 20:
                    t0 = time.perf_counter()
                    await other.ok("Event.GetUnreadInfo", {})
                    during.append(time.perf_counter() - t0)
                code = await asyncio.wait_for(code_task, 10)
                sent = await asyncio.wait_for(flooding, 10)
                assert code == 1008, code
                assert sent >= 100  # it got past its burst before it was closed
                # Another connection is served as before while the flood lasts.
                assert max(during, default=0) < max(0.25, 10 * max(calm)), (calm, during)
                await other.ok("Event.GetUnreadInfo", {})
            finally:
                writer.close()
        flood_counted = 'appchat_disconnects_total{reason="frame flood"} 1.0'
        await asyncio.to_thread(wait_until, lambda: flood_counted in metrics_text(srv))
    finally:
        await asyncio.to_thread(srv.stop)


# --- item 9: a hung broker -------------------------------------------------------------


async def handshake_status(srv: Server, sid: int, tok: str) -> int:
    try:
        async with client(srv, sid, tok) as c:
            await c.ok("Event.GetUnreadInfo", {})
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def test_a_stopped_broker_stalls_no_ack_and_silences_no_connection(
    tmp_path: Path,
) -> None:
    require("Redis", "127.0.0.1", 6379)  # the binary is what matters; the service proves it
    redis = PrivateRedis(tmp_path)
    redis.start()
    assert redis.proc is not None
    keepalive = {"ping_interval": 0.5, "ping_timeout": 1.5}  # as a mobile app would
    try:
        with postgres_database() as url:
            a, b = await asyncio.to_thread(
                _start_all,
                [InProcessServer(url, "--broker", redis.url, "--rate", "0") for _ in range(2)],
            )
            try:
                async with (
                    client(a, 960, token(request_id=310, sid=960), **keepalive) as c,
                    client(b, 9, token(admin_id=9), **keepalive) as s,
                ):
                    await c.ok("Event.AddConversation", {"application_id": 310})
                    await s.ok("Event.AddConversation", {"application_id": 310})
                    first = await c.ok(
                        "Event.SendMessage", {"session_channel": "310", "content": "0"}
                    )
                    assert (await s.push("Event.ReceiveMessage"))["result"] == first

                    redis.proc.send_signal(signal.SIGSTOP)  # open socket, nobody answers
                    try:
                        started = time.monotonic()
                        stalled = await c.ok(
                            "Event.SendMessage", {"session_channel": "310", "content": "1"}
                        )
                        assert time.monotonic() - started < 0.5  # the ack waits for the commit only
                        # The connection answers pings all along, past the publish timeout.
                        until = time.monotonic() + 3.0
                        while time.monotonic() < until:
                            pong = await c.ws.ping()
                            await asyncio.wait_for(pong, 1.0)
                            started = time.monotonic()
                            await c.ok("Event.GetUnreadInfo", {})
                            assert time.monotonic() - started < 0.5
                            await asyncio.sleep(0.25)
                        # A new participant's handshake ends in bounded time: in, or 503.
                        started = time.monotonic()
                        code = await asyncio.wait_for(
                            handshake_status(a, 961, token(request_id=311, sid=961)), 10
                        )
                        assert code in (101, 503) and time.monotonic() - started < 5, code
                    finally:
                        redis.proc.send_signal(signal.SIGCONT)

                    # Staff on the other node lost the push: it is told to refetch.
                    frame = await s.push(timeout=20)
                    while frame["name"] != "Event.Resync":
                        assert frame["result"] == stalled  # (a late copy of the lost push)
                        frame = await s.push(timeout=20)
                    page = await s.ok("Event.GetMessageList", {"session_channel": "310"})
                    assert [m["id"] for m in page["Messages"]][-1] == stalled["message"]["id"]
                    # Pushes flow again.
                    again = await c.ok(
                        "Event.SendMessage", {"session_channel": "310", "content": "2"}
                    )
                    frame = await s.push("Event.ReceiveMessage", timeout=10)
                    while frame["result"] != again:
                        assert frame["result"] == stalled
                        frame = await s.push("Event.ReceiveMessage", timeout=10)
                    # Neither client gave up on its connection for want of a pong.
                    assert c.ws.close_code is None and s.ws.close_code is None
            finally:
                for n in (a, b):
                    await asyncio.to_thread(n.stop)
    finally:
        if redis.proc is not None:
            redis.proc.send_signal(signal.SIGCONT)
        redis.kill()
