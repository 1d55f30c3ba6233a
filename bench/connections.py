"""Many connections: authenticated idle WebSockets held against ``appchat serve --workers N``.

Starts one ``appchat serve --workers N`` (SQLite or PostgreSQL, always Redis) on 127.0.0.1,
then ``--clients`` client processes that open ``--connections`` authenticated connections
between them, spread over ``--sources`` loopback source addresses (127.0.0.2, 127.0.0.3, …:
one address has only about 28,000 source ports toward one server port). Most connections are
idle customers of applications of their own; ``--pairs`` of them are a customer and a staff
member in one conversation who send ``--rate`` messages a second in all, both ways, for
``--duration`` seconds. Printed: connections held, RSS and open files per worker, messages
a second acknowledged and pushed, p50/p99 acknowledgement and push latency.

Only ever targets 127.0.0.0/8, and stops by itself: connections, rate and time are bounded.
Run from the project folder with the project's interpreter (``pip install -e '.[bench]'``)::

    .venv/bin/python bench/connections.py --connections 2000 --workers 2 --duration 10
    .venv/bin/python bench/connections.py --connections 100000 --workers 6 --clients 4 \\
        --database postgres --duration 60

Raise ``ulimit -n`` first for large runs (docs/deploy.md, "Many connections").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import math
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from common import (  # bench/common.py
    Server,
    percentile,
    postgres_database,
    setup_signals_and_loop,
    source_version,
)
from tqdm import tqdm
from websockets.asyncio.client import ClientConnection, connect

from appchat.auth.tokens import mint

SECRET = "bench-secret-" + uuid.uuid4().hex + uuid.uuid4().hex
MAX_CONNECTIONS = 200_000
MAX_RATE = 20_000.0
MAX_DURATION = 3600.0
PER_SOURCE = 20_000  # connections per source address (of about 28,000 ports)
IDLE_APP_BASE = 10_000_000  # application / participant ids of idle customers
PAIR_APP_BASE = 1_000


# --- one client process -------------------------------------------------------------------------


@dataclass
class Plan:
    index: int
    url: str  # ws://127.0.0.1:PORT/ws
    secret: str  # the server's (each process imports this module afresh: not SECRET)
    sources: list[str]
    idle: list[int]  # idle customers: application ids
    pairs: list[int]  # conversations: application ids
    rate: float  # messages a second sent by this process
    ramp: int  # handshakes in flight at once
    setup_timeout: float
    duration: float


@dataclass
class Tally:
    opened: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    acked: int = 0
    refused: int = 0  # ok:false replies
    refusals: dict[str, int] = field(default_factory=dict)  # their error codes
    pushed: int = 0
    ack_latency: list[float] = field(default_factory=list)
    push_latency: list[float] = field(default_factory=list)
    held: int = 0  # still open when the message phase ended

    def fail(self, exc: BaseException) -> None:
        self.failed += 1
        key = type(exc).__name__ + (f": {exc}"[:80] if str(exc) else "")
        self.failures[key] = self.failures.get(key, 0) + 1


def _client_process(plan: Plan, progress: Any, go: Any, results: Any) -> None:
    raise_open_files()
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    tally = asyncio.run(_client_main(plan, progress, go, results))
    results.put(("done", plan.index, tally))


async def _open(plan: Plan, k: int, sid: int, token: str) -> ClientConnection:
    source = plan.sources[k % len(plan.sources)]
    return await connect(
        f"{plan.url}?sid={sid}",
        subprotocols=["access_token", token],  # type: ignore[list-item]  # Subprotocol: a NewType of str
        compression=None,
        ping_interval=None,  # the server pings idle connections; pongs are automatic
        max_queue=None,
        open_timeout=60,
        close_timeout=2,
        local_addr=(source, 0),
    )


async def _client_main(plan: Plan, progress: Any, go: Any, results: Any) -> Tally:
    tally = Tally()
    secret = plan.secret.encode()
    ttl = plan.setup_timeout + plan.duration + 600
    gate = asyncio.Semaphore(plan.ramp)
    conns: list[ClientConnection] = []
    pairs: list[tuple[int, ClientConnection, ClientConnection]] = []
    deadline = time.monotonic() + plan.setup_timeout

    async def opened(k: int, sid: int, token: str) -> ClientConnection | None:
        async with gate:
            try:
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    ws = await _open(plan, k, sid, token)
            except Exception as exc:
                tally.fail(exc)
                return None
        tally.opened += 1
        conns.append(ws)
        return ws

    async def pair(k: int, app: int) -> None:
        staff_sid, customer_sid = 5_000_000 + app, 6_000_000 + app
        staff = await opened(k, staff_sid, mint(secret, admin_id=staff_sid, ttl=ttl))
        customer = await opened(
            k + 1, customer_sid, mint(secret, request_id=app, sid=customer_sid, ttl=ttl)
        )
        if staff is None or customer is None:
            return
        for ws in (staff, customer):
            reply = await _call(ws, "Event.AddConversation", {"application_id": app})
            if not reply.get("ok"):
                tally.fail(RuntimeError(f"AddConversation: {reply.get('error')}"))
                return
        pairs.append((app, customer, staff))

    async def report() -> None:
        while True:
            progress[plan.index] = tally.opened
            await asyncio.sleep(0.2)

    reporter = asyncio.create_task(report())
    await asyncio.gather(*(pair(2 * i, app) for i, app in enumerate(plan.pairs)))
    base = 2 * len(plan.pairs)
    await asyncio.gather(
        *(
            opened(base + i, app, mint(secret, request_id=app, sid=app, ttl=ttl))
            for i, app in enumerate(plan.idle)
        )
    )
    progress[plan.index] = tally.opened
    results.put(("ready", plan.index, tally.opened, tally.failed))
    started = await asyncio.to_thread(go.wait, plan.setup_timeout + 120)
    if started:
        await _flow(plan, pairs, tally)
    tally.held = sum(1 for ws in conns if ws.close_code is None)
    reporter.cancel()
    for ws in conns:  # the run is over: no closing handshakes for 100,000 sockets
        ws.transport.abort()
    return tally


async def _call(ws: ClientConnection, name: str, args: dict[str, Any]) -> dict[str, Any]:
    request_id = f"setup-{uuid.uuid4().hex[:8]}"
    await ws.send(_frame(name, args, request_id), text=True)
    async with asyncio.timeout(60):
        while True:
            reply: dict[str, Any] = orjson.loads(await ws.recv())
            if reply.get("id") == request_id:
                return reply


def _frame(name: str, args: dict[str, Any], request_id: int | str) -> bytes:
    return orjson.dumps({"name": name, "args": orjson.dumps(args).decode(), "id": request_id})


async def _flow(
    plan: Plan, pairs: list[tuple[int, ClientConnection, ClientConnection]], tally: Tally
) -> None:
    """``plan.rate`` messages a second, round-robin over the pairs, alternating direction."""
    sent_at: dict[str, float] = {}
    sending = True
    settled = asyncio.Event()  # every message sent is answered and pushed

    def check() -> None:
        answered = tally.acked + tally.refused
        if not sending and tally.pushed >= tally.sent and answered >= tally.sent:
            settled.set()

    async def read(ws: ClientConnection) -> None:
        with contextlib.suppress(Exception):
            async for raw in ws:
                now = time.perf_counter()
                frame = orjson.loads(raw)
                request_id = frame.get("id")
                if isinstance(request_id, str) and request_id.startswith("m"):
                    if frame.get("ok"):
                        tally.acked += 1
                        tally.ack_latency.append(now - sent_at.get(request_id[1:], now))
                    else:
                        tally.refused += 1
                        code = str((frame.get("error") or {}).get("code"))
                        tally.refusals[code] = tally.refusals.get(code, 0) + 1
                elif frame.get("name") == "Event.ReceiveMessage":
                    cmid = (frame.get("result") or {}).get("message", {}).get("client_msg_id")
                    sent = sent_at.get(cmid or "")
                    if sent is not None:
                        tally.pushed += 1
                        tally.push_latency.append(now - sent)
                check()

    readers = [asyncio.create_task(read(ws)) for _, *pair in pairs for ws in pair]
    if pairs and plan.rate > 0:
        start = time.perf_counter()
        end = start + plan.duration
        n = 0
        while (now := time.perf_counter()) < end:
            due = min(int((now - start) * plan.rate), int(plan.duration * plan.rate))
            while n < due:
                app, customer, staff = pairs[(n // 2) % len(pairs)]
                ws = customer if n % 2 == 0 else staff
                cmid = f"{plan.index}-{n}"
                sent_at[cmid] = time.perf_counter()
                args = {"session_channel": str(app), "content": "hello", "client_msg_id": cmid}
                with contextlib.suppress(Exception):
                    await ws.send(_frame("Event.SendMessage", args, "m" + cmid), text=True)
                    tally.sent += 1
                n += 1
            await asyncio.sleep(0.005)
        sending = False
        check()
        with contextlib.suppress(TimeoutError):  # the last pushes, at most 5 s
            async with asyncio.timeout(5):
                await settled.wait()
    else:
        await asyncio.sleep(plan.duration)
    for task in readers:
        task.cancel()


# --- the parent ---------------------------------------------------------------------------------


def raise_open_files() -> int:
    """Soft open-file limit up to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return int(soft)


def child_pids(parent: int) -> list[int]:
    """The worker processes of ``serve --workers``: children of the server's pid."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{entry}/stat") as f:
            if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                pids.append(int(entry))
    return sorted(pids)


def process_status(pid: int) -> tuple[float, int]:
    """RSS in MiB and open files of ``pid`` (NaN, 0 when gone)."""
    rss = math.nan
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    try:
        files = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        files = 0
    return rss, files


@contextlib.contextmanager
def database(kind: str, admin_url: str) -> Iterator[str]:
    if kind == "postgres":
        with postgres_database(admin_url) as (url, _):
            yield url
        return
    folder = tempfile.mkdtemp(prefix="appchat-conns-")
    try:
        yield f"sqlite:///{folder}/chat.db"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def loopback_sources(count: int) -> list[str]:
    sources = [str(ipaddress.IPv4Address("127.0.0.2") + i) for i in range(count)]
    for s in sources:
        if ipaddress.IPv4Address(s) not in ipaddress.IPv4Network("127.0.0.0/8"):
            raise SystemExit(f"source address {s} is outside 127.0.0.0/8")
    return sources


def plans(args: argparse.Namespace, url: str) -> list[Plan]:
    sources = loopback_sources(args.sources)
    pair_apps = [PAIR_APP_BASE + i for i in range(args.pairs)]
    idle_count = args.connections - 2 * args.pairs
    idle_apps = [IDLE_APP_BASE + i for i in range(idle_count)]
    out = []
    for i in range(args.clients):
        out.append(
            Plan(
                index=i,
                url=url,
                secret=SECRET,
                # each process uses every source address, so ports spread evenly
                sources=sources,
                idle=idle_apps[i :: args.clients],
                pairs=pair_apps[i :: args.clients],
                rate=args.rate / args.clients,
                ramp=args.ramp,
                setup_timeout=args.setup_timeout,
                duration=args.duration,
            )
        )
    return out


def run(args: argparse.Namespace) -> int:
    per_worker = math.ceil(args.connections * 1.2 / args.workers) + 1000
    limit = raise_open_files()
    print(source_version(), f"| {setup_signals_and_loop()} | client open-file limit {limit}")
    ctx = mp.get_context("spawn")
    with database(args.database, args.pg_admin) as db:
        server = Server(
            [
                "--workers",
                str(args.workers),
                "--database",
                db,
                "--broker",
                args.redis,
                "--channel-prefix",
                f"appchat-bench-{uuid.uuid4().hex[:8]}",
                "--max-connections",
                str(per_worker),
                "--max-connections-per-user",
                "4",
                "--log-level",
                "WARNING",
            ],
            SECRET,
            name="appchat serve --workers",
            stop_timeout=120,
        ).start()
        try:
            return _measure(args, server, ctx)
        finally:
            code = server.stop()
            print(f"server exit code {code} after SIGTERM; warnings logged: {server.warnings}")
            warned = [line for line in server.lines if " WARNING " in line or " ERROR " in line]
            for line in warned[:3] + warned[-3:]:
                print("  server:", line.rstrip()[:200])


def _measure(args: argparse.Namespace, server: Server, ctx: Any) -> int:
    workers = child_pids(server.pid) or [server.pid]  # --workers 1: the server itself
    print(f"server pid {server.pid}, workers {workers}, port {server.port}")
    at_rest = {pid: process_status(pid)[0] for pid in workers}
    progress = ctx.Array("i", args.clients, lock=False)
    go, results = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_client_process, args=(plan, progress, go, results), daemon=True)
        for plan in plans(args, f"ws://127.0.0.1:{server.port}/ws")
    ]
    for p in procs:
        p.start()
    ready: dict[int, tuple[int, int]] = {}
    t0 = time.monotonic()
    with tqdm(total=args.connections, desc="connecting", unit="conn", smoothing=0.1) as bar:
        while len(ready) < len(procs) and time.monotonic() - t0 < args.setup_timeout + 60:
            if all(not p.is_alive() for i, p in enumerate(procs) if i not in ready):
                break  # the ones that did not report died
            with contextlib.suppress(Exception):
                kind, index, opened, failed = results.get(timeout=0.2)
                ready[index] = (opened, failed)
            bar.update(sum(progress) - bar.n)
        bar.update(sum(progress) - bar.n)
    setup_s = time.monotonic() - t0
    opened = sum(o for o, _ in ready.values())
    print(f"opened {opened} of {args.connections} in {setup_s:.1f} s")
    go.set()
    peak: dict[int, tuple[float, int]] = {pid: process_status(pid) for pid in workers}
    tallies: dict[int, Tally] = {}
    t1 = time.monotonic()
    total_wait = args.duration + 30
    with tqdm(total=round(args.duration), desc="messages", unit="s") as bar:
        while len(tallies) < len(procs) and time.monotonic() - t1 < total_wait:
            if all(not p.is_alive() for i, p in enumerate(procs) if i not in tallies):
                break
            for pid in workers:
                rss, files = process_status(pid)
                old_rss, old_files = peak.get(pid, (math.nan, 0))
                top = rss if math.isnan(old_rss) else max(rss, old_rss)
                peak[pid] = (top, max(files, old_files))
            with contextlib.suppress(Exception):
                kind, index, tally = results.get(timeout=0.5)
                if kind == "done":
                    tallies[index] = tally
            bar.update(min(round(args.duration), int(time.monotonic() - t1)) - bar.n)
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    return report(args, setup_s, opened, at_rest, peak, list(tallies.values()), len(procs))


def report(
    args: argparse.Namespace,
    setup_s: float,
    opened: int,
    at_rest: dict[int, float],
    peak: dict[int, tuple[float, int]],
    tallies: list[Tally],
    processes: int,
) -> int:
    held = sum(t.held for t in tallies)
    sent = sum(t.sent for t in tallies)
    acked = sum(t.acked for t in tallies)
    pushed = sum(t.pushed for t in tallies)
    refused = sum(t.refused for t in tallies)
    failures: dict[str, int] = {}
    for t in tallies:
        for k, v in t.failures.items():
            failures[k] = failures.get(k, 0) + v
    acks = [x for t in tallies for x in t.ack_latency]
    pushes = [x for t in tallies for x in t.push_latency]
    print()
    print(
        f"connections: {args.connections} asked, {opened} opened, {held} held to the end "
        f"({args.workers} workers, {args.clients} client processes, {args.sources} sources)"
    )
    for pid, (rss, files) in sorted(peak.items()):
        print(
            f"  worker pid {pid}: peak RSS {rss:.0f} MiB ({at_rest.get(pid, math.nan):.0f} at "
            f"rest), open files {files}"
        )
    if opened:
        grown = sum(r - at_rest.get(pid, math.nan) for pid, (r, _) in peak.items())
        print(f"  {grown * 1024 / opened:.1f} KiB of RSS per connection (growth over rest)")
    print(
        f"messages: {sent} sent, {acked} acknowledged, {refused} refused, {pushed} pushed "
        f"in {args.duration:.0f} s: {acked / args.duration:.0f} msg/s acknowledged, "
        f"{pushed / args.duration:.0f} pushes/s"
    )
    print(
        f"latency ms: ack p50 {percentile(acks, 50) * 1000:.1f} p99 "
        f"{percentile(acks, 99) * 1000:.1f} | push p50 {percentile(pushes, 50) * 1000:.1f} "
        f"p99 {percentile(pushes, 99) * 1000:.1f}"
    )
    refusals: dict[str, int] = {}
    for t in tallies:
        for k, v in t.refusals.items():
            refusals[k] = refusals.get(k, 0) + v
    if refusals:
        print("refused sends by code:", ", ".join(f"{k} {v}" for k, v in refusals.items()))
    if failures:
        print("connection failures:")
        for k, v in sorted(failures.items(), key=lambda kv: -kv[1])[:10]:
            print(f"  {v} x {k}")
    complete = len(tallies) == processes and held == args.connections and pushed == sent
    print("result:", "complete" if complete else "INCOMPLETE")
    return 0 if complete else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--connections", type=int, default=2000, help="connections in all [2000]")
    p.add_argument("--workers", type=int, default=2, help="server --workers [2]")
    p.add_argument("--clients", type=int, default=2, help="client processes [2]")
    p.add_argument(
        "--sources",
        type=int,
        default=0,
        help=f"source addresses 127.0.0.2… [0: one per {PER_SOURCE} connections, at least 2]",
    )
    p.add_argument("--pairs", type=int, default=500, help="conversations exchanging messages")
    p.add_argument("--rate", type=float, default=1000, help="messages a second in all [1000]")
    p.add_argument("--duration", type=float, default=30, help="seconds of messages [30]")
    p.add_argument("--ramp", type=int, default=200, help="handshakes in flight per process")
    p.add_argument("--setup-timeout", type=float, default=600, help="seconds to connect [600]")
    p.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument(
        "--pg-admin",
        default=os.environ.get("APPCHAT_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="PostgreSQL to create a fresh database in",
    )
    p.add_argument(
        "--redis", default=os.environ.get("APPCHAT_BENCH_REDIS", "redis://127.0.0.1:6379/0")
    )
    args = p.parse_args(argv)
    if not 1 <= args.connections <= MAX_CONNECTIONS:
        p.error(f"--connections: 1 to {MAX_CONNECTIONS}")
    if not 0 <= args.rate <= MAX_RATE or not 0 < args.duration <= MAX_DURATION:
        p.error(f"--rate up to {MAX_RATE:.0f}, --duration up to {MAX_DURATION:.0f} s")
    if args.workers < 1 or args.clients < 1 or args.ramp < 1:
        p.error("--workers, --clients and --ramp are at least 1")
    args.pairs = max(0, min(args.pairs, args.connections // 2))
    if args.sources <= 0:
        args.sources = max(2, math.ceil(args.connections / PER_SOURCE))
    if args.sources > 250:
        p.error("--sources: at most 250 (127.0.0.2 to 127.0.0.251)")
    if args.redis.split("://", 1)[-1].split(":")[0].split("/")[0] not in (
        "127.0.0.1",
        "localhost",
    ):
        p.error("--redis must be on this machine (127.0.0.1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
