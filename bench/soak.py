"""Soak test: hold a steady load on one ``appchat serve`` process and watch it for leaks.

Opens ``--connections`` WebSocket clients spread over ``--conversations`` conversations
(alternately customers and staff, each with an id of its own, all participants of their
conversation), sends ``--rate`` messages a second in total, spread over the clients, and
reconnects ``--churn`` of the clients per ``--interval`` (spread evenly over the interval), so
that memory, file descriptors or connections left behind by closed connections would show.
Every ``--interval`` seconds it prints the server's RSS, open file descriptors, the
``appchat_connections`` gauge from ``/metrics``, messages acknowledged so far and errors;
at the end a summary. It stops by itself after ``--duration`` seconds.

Run from the project folder with the project's interpreter, e.g.::

    .venv/bin/python bench/soak.py --duration 600
    .venv/bin/python bench/soak.py --duration 120 --interval 10 --sqlite-synchronous NORMAL

By default the server keeps a SQLite file in a temporary folder with the ``memory://``
broker; ``--database`` and ``--broker`` are passed to the server as given (a Redis or NATS
broker gets a channel prefix of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import math
import os
import platform
import re
import shlex
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from common import Server, percentile, setup_signals_and_loop, source_version  # bench/common.py
from websockets.asyncio.client import ClientConnection, connect

from appchat.auth.tokens import mint

GAUGE = re.compile(rb"^appchat_connections (\S+)$", re.MULTILINE)
SECRET = "soak-secret-" + uuid.uuid4().hex + uuid.uuid4().hex


# --- the server ---------------------------------------------------------------------------------


async def connections_gauge(port: int) -> float | None:
    """``appchat_connections`` from GET /metrics (plain HTTP/1.0 on loopback)."""
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                await writer.drain()
                body = await reader.read(-1)
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return None
    m = GAUGE.search(body)
    return float(m.group(1)) if m else None


# --- the clients --------------------------------------------------------------------------------


@dataclass
class Stats:
    sent: int = 0
    acked: int = 0
    pushes: int = 0
    resyncs: int = 0
    reconnects: int = 0
    skipped: int = 0  # sends not made: no client up, or too many unanswered
    inflight: int = 0
    error_replies: collections.Counter[str] = field(default_factory=collections.Counter)
    unexpected_closes: collections.Counter[str] = field(default_factory=collections.Counter)
    failed_connects: int = 0
    failed_sends: int = 0
    lost: int = 0  # unanswered when a connection dropped by itself
    latencies: list[float] = field(default_factory=list)  # this interval's ack latencies

    @property
    def errors(self) -> int:
        return (
            sum(self.error_replies.values())
            + sum(self.unexpected_closes.values())
            + self.failed_connects
            + self.failed_sends
            + self.lost
        )


class SoakClient:
    ids = itertools.count(1)

    def __init__(self, index: int, conversations: int, ttl: float) -> None:
        self.index = index
        self.application_id = 1000 + index % conversations
        self.sid = 10_000 + index
        self.staff = (index // conversations) % 2 == 1
        secret = SECRET.encode()
        if self.staff:
            self.token = mint(secret, admin_id=self.sid, ttl=ttl)
        else:
            self.token = mint(secret, request_id=self.application_id, sid=self.sid, ttl=ttl)
        self.ws: ClientConnection | None = None
        self.reader: asyncio.Task[None] | None = None
        self.pending: dict[int, float] = {}
        self.up = False
        self.closing = False
        self.dropped = False  # closed by the server, or could not connect: to be put back
        self.abandoned = 0

    async def open(self, server: Server, stats: Stats) -> bool:
        self.closing = False
        try:
            async with asyncio.timeout(30):
                ws = await connect(
                    server.url(self.sid),
                    subprotocols=["access_token", self.token],  # type: ignore[list-item]  # Subprotocol: a NewType of str
                    compression=None,
                    ping_interval=None,
                    max_queue=None,
                    close_timeout=5,
                )
                try:
                    rid = next(self.ids)
                    args = orjson.dumps({"application_id": self.application_id}).decode()
                    frame = {"name": "Event.AddConversation", "args": args, "id": rid}
                    await ws.send(orjson.dumps(frame), text=True)
                    while True:
                        reply = orjson.loads(await ws.recv())
                        if reply.get("id") == rid:
                            break
                        if reply.get("name") == "Event.ReceiveMessage":
                            stats.pushes += 1
                    if not reply.get("ok"):
                        raise RuntimeError(f"AddConversation failed: {reply}")
                except BaseException:
                    await ws.close()
                    raise
        except Exception as exc:
            stats.failed_connects += 1
            self.dropped = True
            print(f"  client {self.index}: connect failed: {exc!r}"[:300], flush=True)
            return False
        self.ws = ws
        self.up = True
        self.dropped = False
        self.reader = asyncio.create_task(self._read(ws, stats))
        return True

    async def _read(self, ws: ClientConnection, stats: Stats) -> None:
        with contextlib.suppress(Exception):
            async for raw in ws:
                msg = orjson.loads(raw)
                rid = msg.get("id")
                if rid is not None:
                    sent = self.pending.pop(rid, None)
                    if sent is None:
                        continue
                    stats.inflight -= 1
                    if msg.get("ok"):
                        stats.acked += 1
                        stats.latencies.append(time.perf_counter() - sent)
                    else:
                        stats.error_replies[str((msg.get("error") or {}).get("code"))] += 1
                elif msg.get("name") == "Event.ReceiveMessage":
                    stats.pushes += 1
                elif msg.get("name") == "Event.Resync":
                    stats.resyncs += 1
        self.up = False
        if not self.closing:
            self.dropped = True
            stats.unexpected_closes[f"{ws.close_code} {ws.close_reason or ''}".strip()] += 1
            stats.lost += len(self.pending)
            stats.inflight -= len(self.pending)
            self.pending.clear()

    async def send(self, content: str, stats: Stats) -> None:
        assert self.ws is not None
        rid = next(self.ids)
        args = {
            "session_channel": str(self.application_id),
            "content": content,
            "client_msg_id": f"s{rid}",
        }
        data = orjson.dumps(
            {"name": "Event.SendMessage", "args": orjson.dumps(args).decode(), "id": rid}
        )
        self.pending[rid] = time.perf_counter()
        stats.inflight += 1
        stats.sent += 1
        try:
            await self.ws.send(data, text=True)
        except Exception:
            stats.failed_sends += 1
            if self.pending.pop(rid, None) is not None:
                stats.inflight -= 1

    async def close(self, stats: Stats, drain: float = 5.0) -> None:
        """Close from our side: wait (bounded) for the replies we are owed, then close."""
        self.up = False  # no new sends
        for _ in range(int(drain / 0.02)):  # bounded wait for the replies we are owed
            if not self.pending:
                break
            await asyncio.sleep(0.02)
        self.closing = True
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        if self.reader is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):
                    await self.reader
            if not self.reader.done():
                self.reader.cancel()
        # Replies still owed after the drain: the message may be stored, but it is unacknowledged.
        self.abandoned = len(self.pending)
        stats.inflight -= len(self.pending)
        self.pending.clear()
        self.ws = None
        self.reader = None


# --- the soak -----------------------------------------------------------------------------------


COLUMNS = [
    ("elapsed s", 9),
    ("RSS MiB", 8),
    ("fds", 5),
    ("threads", 7),
    ("conns", 6),
    ("clients up", 10),
    ("sent", 8),
    ("acked", 8),
    ("acked/s", 7),
    ("ack p50 ms", 10),
    ("ack p99 ms", 10),
    ("pushes", 8),
    ("reconnects", 10),
    ("errors", 6),
]


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


async def soak(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    stats = Stats()
    ttl = args.duration + 3600
    clients = [SoakClient(i, args.conversations, ttl) for i in range(args.connections)]
    content = ("soak-" * (args.content_bytes // 5 + 1))[: args.content_bytes]
    gate = asyncio.Semaphore(20)

    async def first_open(c: SoakClient) -> None:
        async with gate:
            await c.open(server, stats)

    await asyncio.gather(*(first_open(c) for c in clients))
    print(f"{sum(c.up for c in clients)} of {len(clients)} clients connected", flush=True)
    print(" | ".join(f"{title:>{width}}" for title, width in COLUMNS), flush=True)

    samples: list[dict[str, Any]] = []
    abandoned = 0
    t0 = time.monotonic()
    stop = asyncio.Event()
    last = {"acked": 0, "t": t0}

    async def sample() -> None:
        now = time.monotonic()
        st = server.status()
        conns = await connections_gauge(server.port)
        lat = stats.latencies
        stats.latencies = []
        rate = (stats.acked - last["acked"]) / (now - last["t"]) if now > last["t"] else 0.0
        last.update(acked=stats.acked, t=now)
        row = {
            "elapsed": now - t0,
            "rss": st["rss"],
            "fds": st["fds"],
            "threads": st["threads"],
            "conns": conns,
            "up": sum(c.up for c in clients),
            "sent": stats.sent,
            "acked": stats.acked,
            "rate": rate,
            "p50": percentile(lat, 50) * 1000,
            "p99": percentile(lat, 99) * 1000,
            "pushes": stats.pushes,
            "reconnects": stats.reconnects,
            "errors": stats.errors,
        }
        samples.append(row)
        cells = [
            fmt(row["elapsed"]),
            fmt(row["rss"], 1),
            fmt(row["fds"]),
            fmt(row["threads"]),
            fmt(row["conns"]),
            fmt(row["up"]),
            fmt(row["sent"]),
            fmt(row["acked"]),
            fmt(row["rate"]),
            fmt(row["p50"], 1),
            fmt(row["p99"], 1),
            fmt(row["pushes"]),
            fmt(row["reconnects"]),
            fmt(row["errors"]),
        ]
        print(
            " | ".join(f"{c:>{w}}" for c, (_t, w) in zip(cells, COLUMNS, strict=True)), flush=True
        )

    async def sender() -> None:
        tick = 0.02
        attempted = 0
        order = itertools.cycle(clients)
        while not stop.is_set():
            elapsed = time.monotonic() - t0
            due = int(args.rate * elapsed) - attempted
            cap = max(1, int(args.rate))
            if due > cap:  # more than a second behind: drop the backlog, count it
                stats.skipped += due - cap
                attempted += due - cap
                due = cap
            for _ in range(max(0, due)):
                attempted += 1
                if stats.inflight >= args.max_inflight:
                    stats.skipped += 1
                    continue
                for _try in range(len(clients)):
                    c = next(order)
                    if c.up:
                        await c.send(content, stats)
                        break
                else:
                    stats.skipped += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await stop.wait()

    async def churner() -> None:
        nonlocal abandoned
        per_interval = max(0, round(args.churn * len(clients)))
        if per_interval == 0:
            return
        period = args.interval / per_interval
        order = itertools.cycle(clients)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period):
                    await stop.wait()
            if stop.is_set():
                return
            c = next(order)
            await c.close(stats)
            abandoned += c.abandoned
            if await c.open(server, stats):
                stats.reconnects += 1
            # Put back a few clients the server dropped (each drop is counted as an error).
            for other in [x for x in clients if x.dropped and x is not c][:5]:
                await other.close(stats, drain=0)
                if await other.open(server, stats):
                    stats.reconnects += 1

    await sample()
    tasks = [asyncio.create_task(sender()), asyncio.create_task(churner())]
    try:
        end = t0 + args.duration
        for n in itertools.count(1):
            at = t0 + n * args.interval
            if at >= end - 0.001:
                break
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            await sample()
        await asyncio.sleep(max(0.0, end - time.monotonic()))
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    # Answers still owed, then the last row.
    for _ in range(300):  # at most 15 s
        if stats.inflight <= 0:
            break
        await asyncio.sleep(0.05)
    await sample()
    for c in clients:
        if c.ws is not None:
            await c.close(stats, drain=0)
            abandoned += c.abandoned
    await asyncio.sleep(2)
    after = await connections_gauge(server.port)
    return {
        "samples": samples,
        "stats": stats,
        "abandoned": abandoned,
        "after_close": after,
        "status_after_close": server.status(),
    }


def summary(result: dict[str, Any], server: Server, code: int | None) -> None:
    samples: list[dict[str, Any]] = result["samples"]
    stats: Stats = result["stats"]
    rss = [s["rss"] for s in samples if not math.isnan(s["rss"])]
    conns = [s["conns"] for s in samples if s["conns"] is not None]
    fds = [s["fds"] for s in samples if not math.isnan(s["fds"])]
    elapsed = samples[-1]["elapsed"] if samples else 0.0
    print()
    print("summary")
    if rss:
        print(
            f"  server RSS MiB      first {rss[0]:.1f}, last {rss[-1]:.1f}, max {max(rss):.1f}"
            f" (last - first {rss[-1] - rss[0]:+.1f})"
        )
    if fds:
        print(f"  server open fds     first {fds[0]:.0f}, last {fds[-1]:.0f}, max {max(fds):.0f}")
    if conns:
        print(f"  appchat_connections min {min(conns):.0f}, max {max(conns):.0f}")
    print(
        "  after closing every client: appchat_connections"
        f" {fmt(result['after_close'])}, open fds {fmt(result['status_after_close']['fds'])},"
        f" RSS {fmt(result['status_after_close']['rss'], 1)} MiB"
    )
    print(
        f"  messages            sent {stats.sent}, acked {stats.acked}"
        f" ({stats.acked / elapsed if elapsed else 0:.1f}/s over {elapsed:.0f} s),"
        f" skipped {stats.skipped}, abandoned at our own closes {result['abandoned']}"
    )
    print(f"  pushes received     {stats.pushes} (Resync {stats.resyncs})")
    print(f"  reconnects (churn)  {stats.reconnects}")
    print(
        f"  errors              {stats.errors}: error replies {dict(stats.error_replies) or 0},"
        f" closed by the server {dict(stats.unexpected_closes) or 0},"
        f" failed connects {stats.failed_connects}, failed sends {stats.failed_sends},"
        f" unanswered at a drop {stats.lost}"
    )
    print(f"  server log lines at WARNING+ {server.warnings}; exit code {code}")
    for line in [ln for ln in server.lines if " WARNING " in ln or " ERROR " in ln][-5:]:
        print("    server: " + line.rstrip()[:300])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=600, help="seconds of load [600]")
    p.add_argument("--interval", type=float, default=30, help="seconds between reports [30]")
    p.add_argument("--connections", type=int, default=200, help="WebSocket clients [200]")
    p.add_argument("--conversations", type=int, default=50, help="conversations [50]")
    p.add_argument("--rate", type=float, default=200, help="messages a second in total [200]")
    p.add_argument(
        "--churn", type=float, default=0.05, help="share of clients reconnected per interval [0.05]"
    )
    p.add_argument("--content-bytes", type=int, default=100, help="message length [100]")
    p.add_argument(
        "--max-inflight", type=int, default=2000, help="unanswered sends before skipping [2000]"
    )
    p.add_argument("--database", help="server --database [a SQLite file in a temp folder]")
    p.add_argument("--broker", default="memory://", help="server --broker [memory://]")
    p.add_argument(
        "--sqlite-synchronous",
        type=str.upper,
        choices=("FULL", "NORMAL"),
        help="server --sqlite-synchronous [the server's default]",
    )
    p.add_argument(
        "--heartbeat",
        type=float,
        help="server --heartbeat in seconds, 0: off [the server's default]",
    )
    p.add_argument("--server-log-level", default="WARNING", help="server --log-level [WARNING]")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.interval <= 0 or args.rate <= 0:
        p.error("--duration, --interval and --rate must be positive")
    if args.connections < 1 or args.conversations < 1 or args.conversations > args.connections:
        p.error("need 1 <= --conversations <= --connections")
    if not 0 <= args.churn <= 1:
        p.error("--churn is a fraction between 0 and 1")
    return args


async def main_async(args: argparse.Namespace, server_args: list[str]) -> int:
    server = Server(server_args, SECRET, stop_timeout=30.0)
    server.start()
    code: int | None = None
    try:
        async with asyncio.timeout(args.duration + 600):  # the whole soak stops by itself
            result = await soak(args, server)
    finally:
        code = await asyncio.to_thread(server.stop)
    summary(result, server, code)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    loop_name = setup_signals_and_loop()
    with tempfile.TemporaryDirectory(prefix="appchat-soak-") as tmp:
        database = args.database or f"sqlite:///{os.path.join(tmp, 'soak.db')}"
        server_args = ["--database", database, "--broker", args.broker]
        server_args += ["--log-level", args.server_log_level]
        if args.broker.split(":", 1)[0] != "memory":
            server_args += ["--channel-prefix", f"appchat-soak-{uuid.uuid4().hex[:10]}"]
        if args.sqlite_synchronous:
            server_args += ["--sqlite-synchronous", args.sqlite_synchronous]
        if args.heartbeat is not None:
            server_args += ["--heartbeat", f"{args.heartbeat:g}"]
        per_interval = round(args.churn * args.connections)
        print("appchat soak test")
        print(f"command        {shlex.join(sys.orig_argv)}")
        print(f"python         {platform.python_version()} ({sys.executable}), {loop_name}")
        print(
            f"machine        {platform.machine()}, {os.cpu_count()} CPUs, load average"
            f" {' '.join(f'{x:.2f}' for x in os.getloadavg())} at start"
        )
        print(f"started        {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
        print(f"server code    {source_version()}")
        print(f"server         appchat serve --port 0 --rate 0 {shlex.join(server_args)}")
        print(
            f"load           {args.connections} clients over {args.conversations} conversations"
            f" (customers and staff alternately), {args.rate:g} messages/s in total,"
            f" {args.content_bytes}-byte messages, at most {args.max_inflight} unanswered"
        )
        print(
            f"churn          {per_interval} clients ({args.churn:.0%}) reconnected per"
            f" {args.interval:g} s, one every"
            f" {args.interval / per_interval if per_interval else 0:.1f} s"
        )
        print(f"duration       {args.duration:g} s, a row every {args.interval:g} s")
        print(
            "columns        RSS/fds/threads of the server process (/proc), conns ="
            " appchat_connections from /metrics, acked/s and ack pN over the last interval,"
            " errors = error replies + closes by the server + failed connects/sends +"
            " replies lost at a drop"
        )
        print(
            "note           the load generator shares the machine with the server (and with"
            " whatever else runs on it)"
        )
        print(flush=True)
        return asyncio.run(main_async(args, server_args))


if __name__ == "__main__":
    sys.exit(main())
