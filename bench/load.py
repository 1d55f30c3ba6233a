"""Load benchmark: pairs of customer and staff clients against real ``appchat serve`` processes.

Each pair is one customer (token ``request_id`` R with a ``sid`` claim) and one staff client
that joined conversation R. Every customer sends ``--messages`` messages, pipelined with
request ids and at most ``--window`` unanswered at a time; the staff client counts the
``Event.ReceiveMessage`` pushes. Each run starts its server(s) afresh on an empty database.

Scenarios:

* ``sqlite``: one node, a SQLite file in a temporary folder, ``memory://`` broker.
* ``postgres-redis``: two nodes on one fresh PostgreSQL database and Redis (a channel prefix
  of their own); customers connect to node A and staff to node B, so every push crosses nodes.

Run from the project folder with the project's interpreter, e.g.::

    .venv/bin/python bench/load.py --scenario sqlite --sqlite-synchronous NORMAL
    .venv/bin/python bench/load.py --scenario postgres-redis --runs 5

The load generator runs in this one process and competes with the server(s) for the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from common import Server, percentile, setup_signals_and_loop, source_version  # bench/common.py
from websockets.asyncio.client import ClientConnection, connect

from appchat.auth import mint

SECRET = "bench-secret-" + uuid.uuid4().hex + uuid.uuid4().hex
SCENARIOS = ("sqlite", "postgres-redis")


# --- server processes ---------------------------------------------------------------------------


@contextlib.contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A fresh, uniquely named database, dropped afterwards; yields its URL."""
    import psycopg

    name = f"appchat_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- the workload -------------------------------------------------------------------------------


@dataclass
class Pair:
    index: int
    application_id: int
    customer_sid: int
    staff_sid: int
    messages: int
    sent_at: list[float] = field(default_factory=list)
    acked: int = 0
    pushed: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    last_seq: int = -1
    last_ack: float = 0.0
    last_push: float = 0.0
    seen: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        self.sent_at = [0.0] * self.messages
        self.seen = bytearray(self.messages)


@dataclass
class RunStats:
    pairs: list[Pair]
    t0: float = 0.0
    push_latency: list[float] = field(default_factory=list)
    ack_latency: list[float] = field(default_factory=list)
    error_replies: collections.Counter[str] = field(default_factory=collections.Counter)
    connection_errors: int = 0
    setup_errors: int = 0


def frame(name: str, args: dict[str, Any], request_id: int | str) -> bytes:
    # ``args`` double-encoded, as the original protocol does.
    return orjson.dumps({"name": name, "args": orjson.dumps(args).decode(), "id": request_id})


async def call(ws: ClientConnection, name: str, args: dict[str, Any]) -> Any:
    """One request before the pipelined phase; returns the reply frame."""
    request_id = f"setup-{uuid.uuid4().hex[:8]}"
    await ws.send(frame(name, args, request_id), text=True)
    while True:
        reply = orjson.loads(await ws.recv())
        if reply.get("id") == request_id:
            return reply


async def open_client(url: str, token: str) -> ClientConnection:
    return await connect(
        url,
        subprotocols=["access_token", token],  # type: ignore[list-item]  # Subprotocol: a NewType of str
        compression=None,
        ping_interval=None,
        max_queue=None,
        open_timeout=30,
        close_timeout=5,
    )


async def customer(
    ws: ClientConnection,
    pair: Pair,
    stats: RunStats,
    content: str,
    window: int,
    go: asyncio.Event,
    deadline: float,
) -> None:
    slots = asyncio.Semaphore(window)
    pending: dict[int, float] = {}
    done = asyncio.Event()
    channel = str(pair.application_id)
    answered = 0

    async def read() -> None:
        nonlocal answered
        try:
            async for raw in ws:
                now = time.perf_counter()
                reply = orjson.loads(raw)
                sent = pending.pop(reply.get("id"), None)
                if sent is None:
                    continue  # a push to the customer (none expected) or a stray reply
                answered += 1
                if reply.get("ok"):
                    pair.acked += 1
                    pair.last_ack = now
                    stats.ack_latency.append(now - sent)
                else:
                    stats.error_replies[str((reply.get("error") or {}).get("code"))] += 1
                slots.release()
                if answered == pair.messages:
                    done.set()
        except Exception:
            stats.connection_errors += 1
        finally:
            done.set()
            for _ in range(window):
                slots.release()  # wake the sender if the connection is gone

    reader = asyncio.create_task(read())
    try:
        await go.wait()
        for seq in range(pair.messages):
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await slots.acquire()
            if done.is_set():
                break  # the connection is gone
            args = {
                "session_channel": channel,
                "content": content,
                "client_msg_id": f"{pair.index}-{seq}",
            }
            data = frame("Event.SendMessage", args, seq)
            now = time.perf_counter()
            pair.sent_at[seq] = now
            pending[seq] = now
            await ws.send(data, text=True)
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            await done.wait()
    except TimeoutError:
        pass  # unanswered messages are counted as missing acks
    except Exception:
        stats.connection_errors += 1
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def staff(
    ws: ClientConnection, pair: Pair, stats: RunStats, all_pushed: asyncio.Event
) -> None:
    try:
        async for raw in ws:
            now = time.perf_counter()
            push = orjson.loads(raw)
            if push.get("name") != "Event.ReceiveMessage":
                continue
            cmid = push["result"]["message"].get("client_msg_id") or ""
            try:
                seq = int(cmid.rsplit("-", 1)[1])
            except (IndexError, ValueError):
                continue
            if not 0 <= seq < pair.messages:
                continue
            if pair.seen[seq]:
                pair.duplicates += 1
                continue
            pair.seen[seq] = 1
            if seq < pair.last_seq:
                pair.out_of_order += 1
            pair.last_seq = max(pair.last_seq, seq)
            pair.pushed += 1
            pair.last_push = now
            sent = pair.sent_at[seq]
            if sent:
                stats.push_latency.append(now - sent)
            if pair.pushed == pair.messages:
                all_pushed.set()
                return
    except Exception:
        stats.connection_errors += 1
    finally:
        all_pushed.set()


async def setup_pair(
    pair: Pair, customer_node: Server, staff_node: Server, ttl: float
) -> tuple[ClientConnection, ClientConnection]:
    secret = SECRET.encode()
    staff_token = mint(secret, admin_id=pair.staff_sid, ttl=ttl)
    customer_token = mint(secret, request_id=pair.application_id, sid=pair.customer_sid, ttl=ttl)
    opened: list[ClientConnection] = []
    try:
        staff_ws = await open_client(staff_node.url(pair.staff_sid), staff_token)
        opened.append(staff_ws)
        customer_ws = await open_client(customer_node.url(pair.customer_sid), customer_token)
        opened.append(customer_ws)
        # Staff opens the conversation (and joins it), then the customer joins.
        for ws, name in ((staff_ws, "staff"), (customer_ws, "customer")):
            args = {"application_id": pair.application_id}
            reply = await call(ws, "Event.AddConversation", args)
            if not reply.get("ok"):
                raise RuntimeError(f"{name} AddConversation failed: {reply}")
    except BaseException:
        for ws in opened:
            with contextlib.suppress(Exception):
                await ws.close()
        raise
    return customer_ws, staff_ws


async def one_run(
    args: argparse.Namespace, customer_node: Server, staff_node: Server, servers: list[Server]
) -> dict[str, Any]:
    pairs = [
        Pair(
            index=i,
            application_id=1000 + i,
            customer_sid=200_000 + i,
            staff_sid=100_000 + i,
            messages=args.messages,
        )
        for i in range(args.pairs)
    ]
    stats = RunStats(pairs)
    content = ("load-" * (args.content_bytes // 5 + 1))[: args.content_bytes]
    ttl = args.run_timeout + 600
    gate = asyncio.Semaphore(20)  # handshakes in flight at once

    async def setup(pair: Pair) -> tuple[ClientConnection, ClientConnection] | None:
        async with gate:
            try:
                async with asyncio.timeout(60):
                    return await setup_pair(pair, customer_node, staff_node, ttl)
            except Exception as exc:
                stats.setup_errors += 1
                print(f"  setup of pair {pair.index} failed: {exc!r}", flush=True)
                return None

    conns = await asyncio.gather(*(setup(p) for p in pairs))
    go = asyncio.Event()
    deadline = time.monotonic() + args.run_timeout
    tasks: list[asyncio.Task[None]] = []
    pushed_events: list[asyncio.Event] = []
    for pair, c in zip(pairs, conns, strict=True):
        if c is None:
            continue
        customer_ws, staff_ws = c
        ev = asyncio.Event()
        pushed_events.append(ev)
        tasks.append(asyncio.create_task(staff(staff_ws, pair, stats, ev)))
        tasks.append(
            asyncio.create_task(
                customer(customer_ws, pair, stats, content, args.window, go, deadline)
            )
        )

    server_cpu0 = [s.cpu_seconds() for s in servers]
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    stats.t0 = time.perf_counter()
    wall0 = stats.t0
    go.set()
    customers_done = asyncio.gather(*tasks[1::2])
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            await customers_done
            await asyncio.gather(*(e.wait() for e in pushed_events))
    wall = time.perf_counter() - wall0
    node_cpu = [s.cpu_seconds() - c0 for s, c0 in zip(servers, server_cpu0, strict=True)]
    server_cpu = sum(node_cpu)
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    gen_cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)

    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(
        *(ws.close() for c in conns if c is not None for ws in c), return_exceptions=True
    )

    expected = args.pairs * args.messages
    acked = sum(p.acked for p in pairs)
    pushed = sum(p.pushed for p in pairs)
    last_ack = max((p.last_ack for p in pairs), default=stats.t0) - stats.t0
    last_push = max((p.last_push for p in pairs), default=stats.t0) - stats.t0
    lat = sorted(stats.push_latency)
    ack = sorted(stats.ack_latency)
    error_replies = sum(stats.error_replies.values())
    missing_acks = expected - acked - error_replies
    missing_pushes = acked - pushed  # every stored message should reach the peer
    errors = (
        error_replies
        + stats.connection_errors
        + stats.setup_errors
        + max(0, missing_acks)
        + max(0, missing_pushes)
        + sum(p.duplicates for p in pairs)
    )
    return {
        "acked": acked,
        "pushed": pushed,
        "seconds": last_ack,
        "acked_per_s": acked / last_ack if last_ack > 0 else 0.0,
        "pushed_per_s": pushed / last_push if last_push > 0 else 0.0,
        "p50_ms": percentile(lat, 50) * 1000,
        "p95_ms": percentile(lat, 95) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "max_ms": (lat[-1] if lat else math.nan) * 1000,
        "ack_p50_ms": percentile(ack, 50) * 1000,
        "ack_p99_ms": percentile(ack, 99) * 1000,
        "errors": errors,
        "error_replies": error_replies,
        "connection_errors": stats.connection_errors + stats.setup_errors,
        "missing_acks": max(0, missing_acks),
        "missing_pushes": max(0, missing_pushes),
        "duplicates": sum(p.duplicates for p in pairs),
        "out_of_order": sum(p.out_of_order for p in pairs),
        "server_cpu_pct": 100 * server_cpu / wall if wall > 0 else 0.0,
        "node_cpu_ms_per_msg": {
            s.name: 1000 * c / acked if acked else math.nan
            for s, c in zip(servers, node_cpu, strict=True)
        },
        "generator_cpu_pct": 100 * gen_cpu / wall if wall > 0 else 0.0,
        "error_codes": dict(stats.error_replies),
    }


# --- scenarios ----------------------------------------------------------------------------------


@contextlib.contextmanager
def scenario_servers(args: argparse.Namespace) -> Iterator[tuple[Server, Server, list[Server]]]:
    """Fresh server(s) on a fresh database for one run: (customer node, staff node, all)."""
    common = ["--log-level", args.server_log_level]
    if args.scenario == "sqlite":
        with tempfile.TemporaryDirectory(prefix="appchat-bench-") as tmp:
            db = f"sqlite:///{os.path.join(tmp, 'bench.db')}"
            server = Server(
                [
                    "--database",
                    db,
                    "--broker",
                    "memory://",
                    "--sqlite-synchronous",
                    args.sqlite_synchronous,
                    *common,
                ],
                SECRET,
                name="node",
            )
            server.start()
            try:
                yield server, server, [server]
            finally:
                server.stop()
        return
    with postgres_database(args.pg_admin) as db:
        prefix = f"appchat-bench-{uuid.uuid4().hex[:10]}"
        node_args = ["--database", db, "--broker", args.redis, "--channel-prefix", prefix, *common]
        a = Server(node_args, SECRET, name="node A").start()
        try:
            b = Server(node_args, SECRET, name="node B").start()
            try:
                yield a, b, [a, b]
            finally:
                b.stop()
        finally:
            a.stop()


def describe(args: argparse.Namespace) -> list[str]:
    lines = [
        f"scenario            {args.scenario}",
        f"pairs               {args.pairs} (one customer + one staff client each)",
        f"messages per pair   {args.messages} (total {args.pairs * args.messages})",
        f"window              {args.window} unanswered SendMessage per customer",
        f"content             {args.content_bytes} bytes",
        f"runs                {args.runs} (fresh server(s) and database each)",
        "server flags        --port 0 --rate 0 (no per-connection rate limit)",
        "client              websockets, compression off, no client pings, orjson",
    ]
    if args.scenario == "sqlite":
        lines.append("storage / broker    SQLite file in a temp folder / memory://")
        lines.append(f"sqlite synchronous  {args.sqlite_synchronous}")
        lines.append("topology            one node; customers and staff on it")
    else:
        lines.append(f"storage / broker    fresh PostgreSQL database / {args.redis}")
        lines.append("topology            customers on node A, staff on node B (pushes cross)")
    return lines


FIGURES = [
    ("acked msg/s", "acked_per_s", "{:.0f}"),
    ("pushes/s", "pushed_per_s", "{:.0f}"),
    ("p50 ms", "p50_ms", "{:.1f}"),
    ("p95 ms", "p95_ms", "{:.1f}"),
    ("p99 ms", "p99_ms", "{:.1f}"),
    ("max ms", "max_ms", "{:.0f}"),
    ("ack p50", "ack_p50_ms", "{:.1f}"),
    ("ack p99", "ack_p99_ms", "{:.1f}"),
    ("errors", "errors", "{:.0f}"),
    ("srv CPU%", "server_cpu_pct", "{:.0f}"),
    ("gen CPU%", "generator_cpu_pct", "{:.0f}"),
]


def table_row(label: str, values: dict[str, Any]) -> str:
    cells = [f"{label:<7}"]
    for title, key, fmt in FIGURES:
        cells.append(f"{fmt.format(values[key]):>{max(len(title), 7)}}")
    return " | ".join(cells)


def table_header() -> str:
    cells = [f"{'run':<7}"] + [f"{title:>{max(len(title), 7)}}" for title, _k, _f in FIGURES]
    return " | ".join(cells)


async def main_async(args: argparse.Namespace) -> int:
    results: list[dict[str, Any]] = []
    print(table_header(), flush=True)
    for run in range(1, args.runs + 1):
        with scenario_servers(args) as (customer_node, staff_node, servers):
            result = await one_run(args, customer_node, staff_node, servers)
            warnings = sum(s.warnings for s in servers)
            tails = [
                line
                for s in servers
                for line in s.lines
                if " WARNING " in line or " ERROR " in line
            ]
        results.append(result)
        print(table_row(f"#{run}", result), flush=True)
        details = (
            f"        acked {result['acked']:.0f}, pushes {result['pushed']:.0f}"
            f" in {result['seconds']:.2f} s; error replies {result['error_replies']:.0f}"
            f"{' ' + str(result['error_codes']) if result['error_codes'] else ''},"
            " connection errors"
            f" {result['connection_errors']:.0f}, missing acks {result['missing_acks']:.0f},"
            f" missing pushes {result['missing_pushes']:.0f}, duplicate pushes"
            f" {result['duplicates']:.0f}, out-of-order pushes {result['out_of_order']:.0f},"
            f" server log lines at WARNING+ {warnings}; server CPU ms per acked message:"
            f" {', '.join(f'{k} {v:.3f}' for k, v in result['node_cpu_ms_per_msg'].items())}"
        )
        print(details, flush=True)
        for line in tails[-5:]:
            print("        server: " + line.rstrip()[:300], flush=True)
    median = {key: statistics.median(r[key] for r in results) for _t, key, _f in FIGURES}
    print("-" * len(table_header()))
    print(table_row("median", median), flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scenario", choices=SCENARIOS, default="sqlite")
    p.add_argument("--pairs", type=int, default=50, help="customer+staff pairs [50]")
    p.add_argument("--messages", type=int, default=200, help="messages per customer [200]")
    p.add_argument("--window", type=int, default=8, help="unanswered sends per customer [8]")
    p.add_argument("--runs", type=int, default=3, help="repetitions; the median is printed [3]")
    p.add_argument("--content-bytes", type=int, default=100, help="message length [100]")
    p.add_argument(
        "--sqlite-synchronous",
        type=str.upper,
        choices=("FULL", "NORMAL"),
        default="FULL",
        help="passed to the server (sqlite scenario) [FULL]",
    )
    p.add_argument(
        "--pg-admin",
        default=os.environ.get("APPCHAT_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="PostgreSQL URL allowed to CREATE/DROP DATABASE [env APPCHAT_BENCH_PG]",
    )
    p.add_argument(
        "--redis",
        default=os.environ.get("APPCHAT_BENCH_REDIS", "redis://127.0.0.1:6379"),
        help="Redis URL for the postgres-redis scenario [env APPCHAT_BENCH_REDIS]",
    )
    p.add_argument(
        "--run-timeout", type=float, default=300.0, help="give up on a run after this [300 s]"
    )
    p.add_argument("--server-log-level", default="WARNING", help="server --log-level [WARNING]")
    args = p.parse_args(argv)
    for name in ("pairs", "messages", "window", "runs", "content_bytes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    loop_name = setup_signals_and_loop()
    print("appchat load benchmark")
    print(f"command             {shlex.join(sys.orig_argv)}")
    print(f"python              {platform.python_version()} ({sys.executable})")
    print(f"generator loop      {loop_name}")
    print(f"server code         {source_version()}")
    print(
        f"machine             {platform.machine()}, {os.cpu_count()} CPUs,"
        f" load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at start"
    )
    print(f"started             {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    for line in describe(args):
        print(line)
    print(
        f"note                the load generator is this one Python process; on a"
        f" {os.cpu_count()}-CPU machine it competes with the server(s) for the CPU, so"
        " the figures are a floor for the server, not a ceiling (see gen CPU%)."
    )
    print(
        "figures             acked msg/s = acks / time to last ack; pushes/s = pushes to staff"
        " / time to last push; pN ms = send -> peer's ReceiveMessage push; ack pN = send ->"
        " reply; errors = error replies + connection errors + missing acks + missing or"
        " duplicate pushes; CPU% = CPU seconds / wall seconds of the run (100 = one core)."
    )
    print(flush=True)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
