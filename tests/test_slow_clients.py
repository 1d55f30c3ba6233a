"""Clients that read slowly or never, and connections whose socket is gone: every way a
connection ends ends all of it (its slot, its backlog, the memory it held), whether the
client resets, closes, stops answering pings or falls too far behind (4008).

The attackers speak WebSocket over raw sockets (``RawSocket``): they choose their receive
buffer, never read, and end with a TCP reset, as no polite client library would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from pathlib import Path

from .support import (
    InProcessServer,
    RawSocket,
    Server,
    ServerProcess,
    client,
    connections,
    metrics_text,
    module_server,
    rss_mb,
    status,
    token,
    wait_until,
)

BIG_ID = "x" * 60_000  # echoed back in every reply: a 60 KB reply to a 60 KB request
MAX_CONNECTIONS = 10

# No heartbeat (it would end the attackers' connections on its own), 10 connections; a
# process of its own, whose memory the tests read.
capped = module_server(
    "--rate",
    "0",
    "--heartbeat",
    "0",
    "--max-connections",
    str(MAX_CONNECTIONS),
    "--log-level",
    "WARNING",
    process=True,
)


def served(srv: Server, sid: int, tok: str) -> int:
    """Connect, ask, close; the handshake's status (101 when served)."""
    return asyncio.run(status(srv, sid, tok))


# --- a connection never outlives its socket -------------------------------------------------


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
    # A heartbeat of 2 s: the count of both connections below is read well before the
    # quiet one can be dropped (with 1 s a loaded machine sometimes read it after).
    srv = InProcessServer(tmp_path / "hb.db", "--rate", "0", "--heartbeat", "2").start()
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
