"""Connections that never finish their handshake: a deadline for the whole request, a cap
on the sockets waiting for one, and neither touches a WebSocket once it is upgraded.

The servers run in child processes: the tests read their logs, from addresses of their own
(127.0.0.N).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request

from .support import Server, client, logged, module_server, open_raw, token

HANDSHAKE_TIMEOUT = 1.5
MAX_PENDING = 8

deadline = module_server(
    "--rate",
    "0",
    "--log-level",
    "INFO",
    "--handshake-timeout",
    str(HANDSHAKE_TIMEOUT),
    process=True,
)
# A deadline far beyond the test: what ends a waiting socket here is the cap alone.
crowded = module_server(
    "--rate",
    "0",
    "--log-level",
    "INFO",
    "--handshake-timeout",
    "600",
    "--max-pending-handshakes",
    str(MAX_PENDING),
    process=True,
)


def http_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as r:
        return int(r.status)


async def closed_after(reader: asyncio.StreamReader, within: float) -> float:
    """Seconds until the server ends the connection (EOF or reset); fails after ``within``."""
    start = time.monotonic()
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(65536), within):
            pass
    return time.monotonic() - start


async def test_silent_and_half_sent_handshakes_are_dropped(deadline: Server) -> None:
    silent_r, silent_w = await open_raw(deadline, "127.0.0.31")
    half_r, half_w = await open_raw(deadline, "127.0.0.31")
    half_w.write(b"GET /ws?sid=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nSec-WebSocket-Pro")
    drip_r, drip_w = await open_raw(deadline, "127.0.0.31")

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
        line = logged(deadline, "127.0.0.31", "before its handshake")
        assert f"no complete request within {HANDSHAKE_TIMEOUT:g} s" in line
    finally:
        dripping.cancel()
        for w in (silent_w, half_w, drip_w):
            w.close()


async def test_a_client_gets_in_while_half_open_sockets_pile_up(crowded: Server) -> None:
    idle = [await open_raw(crowded, "127.0.0.32") for _ in range(MAX_PENDING * 5)]
    try:
        # Beyond the cap the oldest waiting sockets are closed at once, not after the
        # deadline: all but the newest MAX_PENDING end (10 s is a stall, the deadline is
        # 600 s), and those stay open: each is still answered when it sends its request.
        for r, _w in idle[:-MAX_PENDING]:
            await closed_after(r, 10)
        for r, w in idle[-MAX_PENDING:]:
            w.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = await asyncio.wait_for(r.readline(), 10)
            assert head.startswith(b"HTTP/1.1 200"), head
        logged(crowded, "127.0.0.32", f"more than {MAX_PENDING} connections without a request")
        # More idle sockets keep coming; a real client still connects and is served.
        more = [await open_raw(crowded, "127.0.0.32") for _ in range(MAX_PENDING * 2)]
        idle += more
        async with client(crowded, 34, token(admin_id=34)) as c:
            assert (await c.ok("Event.GetUnreadInfo", {}))["total"] == 0
        assert await asyncio.to_thread(http_status, crowded.http("/healthz")) == 200
    finally:
        for _r, w in idle:
            w.close()


async def test_an_upgraded_connection_outlives_the_handshake_deadline(
    deadline: Server,
) -> None:
    # The deadline ends with the request: a WebSocket stays open long after it.
    async with client(deadline, 35, token(admin_id=35)) as c:
        await asyncio.sleep(HANDSHAKE_TIMEOUT + 0.5)
        assert (await c.ok("Event.GetUnreadInfo", {}))["total"] == 0
