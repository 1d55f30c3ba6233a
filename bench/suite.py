"""``make bench``: appchat beside three reference servers, in one run.

Every server runs pinned to CPU 0 and the load generator to CPU 1 (when the machine has
two or more), so "msg/s" is what one core of server delivers. The same workload drives all
of them: pairs of a customer that sends and a staff member that receives the push. The
reference servers (bench/reference/) do what appchat does minus authentication,
validation and limits: the bare aiohttp relay and the python-socketio relay store
nothing; the durable relay is the bare one that commits each message to SQLite (WAL,
synchronous=FULL, group commit) before it answers and pushes, the ceiling for a server
that commits before it acks. Figures:

* throughput: pairs with a window of messages in flight, as fast as the server goes;
  delivered pushes per second, server CPU per message, and the ratios to the bare and
  to the durable relay; also appchat with ``--inbox`` staff connections subscribed to
  the support desk's inbox, reading every Event.ConversationUpdated ("appchat+inbox10");
* latency: send -> peer's push at fixed offered rates (p50/p99), the same for every
  server, run on the server right after its throughput run ("after saturation"), and
  at ``--fresh-rate`` on a freshly started server of each kind ("fresh server");
* memory: server RSS with 1,000 and 5,000 idle connections; the slope is KiB per connection;
* unread: GetUnreadInfo time for a participant with 10 and with 100,000 unread messages.

Each figure is the median of ``--runs`` runs, the servers alternating within each run.
``--write`` puts the tables into docs/benchmarks.md (between the suite markers) and the
plots into docs/img/. ``--tiny`` is a smoke run of every part (the test suite uses it).

    .venv/bin/python bench/suite.py --runs 3 --write
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from common import (  # bench/common.py
    Server,
    percentile,
    postgres_database,
    process_cpu,
    source_version,
)
from tqdm import tqdm
from wsclient import LeanClient, connect

from appchat.auth.tokens import mint

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-" + uuid.uuid4().hex + uuid.uuid4().hex
SERVERS = ("appchat", "durable", "relay", "socketio")
REFERENCES = {"relay": "the bare relay", "durable": "the durable relay"}  # ratio columns
SERVER_ARGS: list[str] = []  # --server-args: more `appchat serve` options
BASELINE_TREE = Path(tempfile.gettempdir()) / "appchat-bench-baseline"
PARTS = ("throughput", "latency", "memory", "unread", "cluster", "workers")
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"


# --- servers ------------------------------------------------------------------------------------


def pinned(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if (os.cpu_count() or 1) >= 2 else []


def pin_generator() -> None:
    """Run this process (the load generator) on CPU 1, beside the servers' CPU 0."""
    with contextlib.suppress(OSError):
        if (os.cpu_count() or 1) >= 2:
            os.sched_setaffinity(0, {1})


@contextlib.contextmanager
def server(kind: str, workdir: Path, extra: list[str] | None = None) -> Iterator[Server]:
    py = sys.executable
    env = None
    extra_args = list(extra or [])
    if kind.startswith("appchat@"):  # appchat as of --baseline REV, checked out beside
        env = {"PYTHONPATH": str(BASELINE_TREE / kind.split("@", 1)[1] / "src")}
    if kind == "appchat" or kind.startswith(("appchat@", "appchat+")):
        db = workdir / f"bench-{uuid.uuid4().hex[:8]}.db"
        cmd = [py, "-m", "appchat", "serve", "--port", "0", "--rate", "0"]
        cmd += ["--database", f"sqlite:///{db}", "--log-level", "WARNING"]
        extra_args += SERVER_ARGS
    elif kind == "durable":  # a database file of its own per server, in the workdir
        db = workdir / f"durable-{uuid.uuid4().hex[:8]}.db"
        cmd = [py, str(ROOT / "bench/reference/relay_durable.py"), "--database", str(db)]
    elif kind == "relay":
        cmd = [py, str(ROOT / "bench/reference/relay_aiohttp.py")]
    else:
        cmd = [py, str(ROOT / "bench/reference/relay_socketio.py")]
    srv = Server([], SECRET, name=kind, command=pinned(0) + cmd + extra_args, env=env).start()
    try:
        yield srv
    finally:
        srv.stop()


@contextlib.contextmanager
def cluster(
    workdir: Path, args: argparse.Namespace, rev: str | None = None
) -> Iterator[tuple[Server, Server, Callable[[], float], Callable[[], float]]]:
    """Two appchat nodes on a fresh PostgreSQL database and Redis (nothing pinned); as of
    git ``rev`` (a ``--baseline``) when given. Also yields the CPU seconds so far of the
    database's server processes and of Redis."""
    import psycopg

    env = {"PYTHONPATH": str(BASELINE_TREE / rev / "src")} if rev else None

    prefix = f"appchat-bench-{uuid.uuid4().hex[:8]}"
    with postgres_database(args.pg_admin) as (url, name):
        common = [sys.executable, "-m", "appchat", "serve", "--port", "0", "--rate", "0"]
        common += ["--database", url, "--broker", args.redis, "--channel-prefix", prefix]
        common += ["--log-level", "WARNING"]
        nodes: list[Server] = []
        try:
            for n in range(2):
                node = Server([], SECRET, name=f"node {n}", command=common, env=env)
                nodes.append(node.start())

            def db_cpu() -> float:
                """CPU seconds of the database's server processes (the nodes'
                connections), when they run on this machine."""
                with psycopg.connect(args.pg_admin, autocommit=True, connect_timeout=10) as admin:
                    pids = admin.execute(
                        "SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,)
                    ).fetchall()
                return sum(process_cpu(pid) for (pid,) in pids)

            yield nodes[0], nodes[1], db_cpu, redis_cpu(args.redis)
        finally:
            for node in nodes:
                node.stop()


def redis_cpu(url: str) -> Callable[[], float]:
    """CPU seconds of the Redis server at ``url`` (0 when it runs elsewhere)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    return lambda: process_cpu(pid)


# --- the two wire formats -----------------------------------------------------------------------


class Wire:
    """How a client of one server joins a room, sends a message and reads what comes back."""

    def __init__(self, kind: str, port: int, staff_port: int | None = None) -> None:
        self.kind = kind
        self.port = port
        self.staff_port = staff_port or port  # two nodes: staff on the other one

    def url(self, sid: int, port: int | None = None) -> str:
        port = port or self.port
        if self.kind == "socketio":
            return f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"
        return f"ws://127.0.0.1:{port}/ws?sid={sid}"

    def protocols(self, token: str) -> list[str] | None:
        return None if self.kind == "socketio" else ["access_token", token]

    def request(self, name: str, args: dict[str, Any], rid: int) -> bytes:
        if self.kind == "socketio":
            event = {"Event.AddConversation": "join", "Event.SendMessage": "send"}[name]
            return b"42" + str(rid).encode() + orjson.dumps([event, args])
        return orjson.dumps({"name": name, "args": orjson.dumps(args).decode(), "id": rid})

    def read(self, data: bytes) -> tuple[str, Any]:
        """("ack", id) for a reply, ("push", client_msg_id) for a message push, else ("", x)."""
        if self.kind == "socketio":
            if data.startswith(b"43"):
                end = data.index(b"[")
                return "ack", int(data[2:end])
            if data.startswith(b'42["message"'):
                return "push", orjson.loads(data[2:])[1]["message"]["client_msg_id"]
            return "", data
        # Byte searches instead of a JSON parse: the generator must stay cheaper than the
        # fastest server it measures (both servers write these keys in this order).
        if data.startswith(b'{"name":"Event.ReceiveMessage"'):
            at = data.find(b'"client_msg_id":"')
            if at < 0:
                return "push", None
            at += 17
            return "push", data[at : data.index(b'"', at)].decode()
        at = data.rfind(b',"id":')
        if at > 0 and data.endswith(b"}"):
            ok = data.find(b'"ok":true', 0, 64) > 0
            return ("ack" if ok else "error"), orjson.loads(data[at + 6 : -1])
        return "", data


class Peer:
    """One client connection with a callback per frame."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.client: LeanClient | None = None
        self.on_frame: Callable[[str, Any], None] = lambda kind, value: None
        self._waiting: dict[int, asyncio.Future[None]] = {}

    async def open(self, sid: int, token: str, port: int | None = None) -> Peer:
        self.client = await connect(
            self.wire.url(sid, port), self._frame, subprotocols=self.wire.protocols(token)
        )
        if self.wire.kind == "socketio":
            opened = self._expect(b"40")
            self.client.send(b"40")
            await asyncio.wait_for(opened, 30)
        return self

    def _expect(self, prefix: bytes) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[-1] = fut
        self._prefix = prefix
        return fut

    def _frame(self, data: bytes) -> None:
        if self.wire.kind == "socketio":
            if data == b"2":  # Engine.IO ping
                assert self.client is not None
                self.client.send(b"3")
                return
            if -1 in self._waiting and data.startswith(self._prefix):
                self._waiting.pop(-1).set_result(None)
                return
        kind, value = self.wire.read(data)
        fut = self._waiting.pop(value, None) if kind in ("ack", "error") else None
        if fut is not None:
            if kind == "ack":
                fut.set_result(None)
            else:
                fut.set_exception(RuntimeError(f"error reply: {data[:200]!r}"))
            return
        self.on_frame(kind, value)

    async def call(self, name: str, args: dict[str, Any], rid: int) -> None:
        assert self.client is not None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        self.client.send(self.wire.request(name, args, rid))
        await asyncio.wait_for(fut, 30)

    def close(self) -> None:
        if self.client is not None:
            self.client.abort()


async def close_peers(*peers: Peer) -> None:
    """Abort each connection and wait until its socket is gone: a server stopped next then
    has no client left to wait for (it gives each one its close timeout, 2 s)."""
    for p in peers:
        p.close()
    closing = [p.client.closed for p in peers if p.client is not None]
    await asyncio.wait_for(asyncio.gather(*closing), 10)


# --- the support desk's inbox -------------------------------------------------------------------

INBOX_PUSH = b'{"name":"Event.ConversationUpdated"'
NO_MESSAGE = b'"last_message":null'  # a new conversation's push (AddConversation)
FIRST_INBOX_SID = 700_000  # the subscribers' staff ids (the pairs use 100,000+ and 200,000+)


@dataclass
class Inbox:
    """Staff connections subscribed to the whole inbox, each counting the pushes about a
    message it reads: a prefix and a substring test on the raw frame, never a parse."""

    peers: list[Peer] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    def reader(self, index: int) -> Callable[[bytes], None]:
        counts = self.counts

        def count(data: bytes) -> None:
            if data.startswith(INBOX_PUSH) and NO_MESSAGE not in data:
                counts[index] += 1

        return count


async def subscribe_inbox(port: int, n: int) -> Inbox:
    """``n`` staff connections (tokens with ``admin_id``), each subscribed with
    Event.SubscribeInbox ``{"filter": "all"}``; from then on their frames are only counted."""
    wire = Wire("appchat", port)
    inbox = Inbox(counts=[0] * n)

    async def one(i: int) -> Peer:
        sid = FIRST_INBOX_SID + i
        peer = await Peer(wire).open(sid, mint(SECRET.encode(), admin_id=sid))
        await peer.call("Event.SubscribeInbox", {"filter": "all"}, 1)
        assert peer.client is not None
        peer.client.on_text = inbox.reader(i)
        return peer

    inbox.peers = list(await asyncio.gather(*(one(i) for i in range(n))))
    return inbox


def stored_messages(srv: Server) -> int:
    """How many messages an appchat server's SQLite file holds (read beside the server)."""
    path = srv.cmd[srv.cmd.index("--database") + 1].removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
        return int(db.execute("SELECT count(*) FROM messages").fetchone()[0])


async def inbox_delivery(srv: Server, inbox: Inbox, within: float = 30.0) -> tuple[int, int]:
    """Once the load has stopped: wait (up to ``within`` s) until every subscriber has read
    one push per stored message. Returns (messages stored, fewest pushes one subscriber read)."""
    deadline = time.monotonic() + within
    last = -1
    while True:
        stored = stored_messages(srv)
        if (stored == last and min(inbox.counts) == stored) or time.monotonic() > deadline:
            return stored, min(inbox.counts)
        last = stored
        await asyncio.sleep(0.2)


# --- the workload -------------------------------------------------------------------------------


@dataclass
class Pair:
    index: int
    customer: Peer
    staff: Peer
    content: str
    sent_at: dict[int, float] = field(default_factory=dict)
    next_seq: int = 0
    in_flight: int = 0
    pushed: int = 0
    errors: int = 0
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])  # unique per phase

    def send(self) -> None:
        seq = self.next_seq
        self.next_seq += 1
        self.in_flight += 1
        args = {
            "session_channel": str(1000 + self.index),
            "content": self.content,
            "client_msg_id": f"{self.tag}{self.index}-{seq}",
        }
        self.sent_at[seq] = time.perf_counter()
        assert self.customer.client is not None
        self.customer.client.send(self.customer.wire.request("Event.SendMessage", args, seq))


async def open_pairs(wire: Wire, count: int, content: str) -> list[Pair]:
    gate = asyncio.Semaphore(50)

    async def one(i: int) -> Pair:
        app = 1000 + i
        async with gate:
            staff = await Peer(wire).open(
                100_000 + i, mint(SECRET.encode(), admin_id=100_000 + i), wire.staff_port
            )
            customer = await Peer(wire).open(
                200_000 + i, mint(SECRET.encode(), request_id=app, sid=200_000 + i)
            )
            await staff.call("Event.AddConversation", {"application_id": app}, 10**9)
            await customer.call("Event.AddConversation", {"application_id": app}, 10**9)
        return Pair(i, customer, staff, content)

    return list(await asyncio.gather(*(one(i) for i in range(count))))


class Tally:
    """Pushes received across pairs, with an event when a target is reached."""

    def __init__(self) -> None:
        self.count = 0
        self.target = math.inf
        self.reached = asyncio.Event()

    def add(self) -> None:
        self.count += 1
        if self.count >= self.target:
            self.reached.set()

    async def wait_for(self, target: float, within: float) -> None:
        self.target = target
        if self.count >= target:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.reached.wait(), within)


def wire_pair(
    pair: Pair,
    latencies: list[float] | None,
    on_ack: Callable[[Pair], None],
    tally: Tally | None = None,
) -> None:
    def customer_frame(kind: str, value: Any) -> None:
        if kind == "ack" or kind == "error":
            pair.in_flight -= 1
            if kind == "error":
                pair.errors += 1
            on_ack(pair)

    def staff_frame(kind: str, value: Any) -> None:
        # Only this phase's messages: the server may still be pushing an earlier phase's
        # (its last window), and the same staff members are in the same conversations.
        if kind != "push" or value is None or not value.startswith(pair.tag):
            return
        seq = int(value.rsplit("-", 1)[1])
        sent = pair.sent_at.pop(seq, None)
        pair.pushed += 1
        if latencies is not None and sent is not None:
            latencies.append(time.perf_counter() - sent)
        if tally is not None:
            tally.add()

    # replies to the customer's sends arrive as "ack" frames with no waiter
    pair.customer.on_frame = customer_frame
    pair.staff.on_frame = staff_frame


async def throughput(
    kind: str,
    port: int,
    args: argparse.Namespace,
    *servers: Server,
    staff_port: int = 0,
    db_cpu: Callable[[], float] | None = None,
    redis_cpu: Callable[[], float] | None = None,
) -> dict[str, float]:
    """Closed loop: each customer keeps ``window`` sends unanswered; pushes counted per second."""
    wire = Wire(kind, port, staff_port)
    pairs = await open_pairs(wire, args.pairs, "x" * args.content_bytes)
    running = True

    def refill(pair: Pair) -> None:
        if running and pair.in_flight < args.window:
            pair.send()

    for p in pairs:
        wire_pair(p, None, refill)
        for _ in range(args.window):
            p.send()
    await asyncio.sleep(args.warmup)

    def cpu() -> float:
        return sum(srv.cpu_seconds() for srv in servers)

    db0 = db_cpu() if db_cpu else 0.0
    redis0 = redis_cpu() if redis_cpu else 0.0
    pushed0, cpu0, t0 = sum(p.pushed for p in pairs), cpu(), time.perf_counter()
    gen0 = time.process_time()
    await asyncio.sleep(args.duration)
    pushed1, cpu1, t1 = sum(p.pushed for p in pairs), cpu(), time.perf_counter()
    gen1 = time.process_time()
    db1 = db_cpu() if db_cpu else 0.0
    redis1 = redis_cpu() if redis_cpu else 0.0
    running = False
    errors = sum(p.errors for p in pairs)
    await close_peers(*(peer for p in pairs for peer in (p.customer, p.staff)))
    delivered = pushed1 - pushed0
    return {
        "msg_s": delivered / (t1 - t0),
        "cpu_us": (cpu1 - cpu0) / max(delivered, 1) * 1e6,
        "db_cpu_us": (db1 - db0) / max(delivered, 1) * 1e6,
        "redis_cpu_us": (redis1 - redis0) / max(delivered, 1) * 1e6,
        "srv_cpu": (cpu1 - cpu0) / (t1 - t0) * 100,
        "gen_cpu": (gen1 - gen0) / (t1 - t0) * 100,
        "errors": errors,
    }


async def latency(
    kind: str, port: int, args: argparse.Namespace, rate: float, srv: Server
) -> dict[str, float]:
    """Open loop: ``rate`` sends a second spread over the pairs; send -> push percentiles,
    and the server's CPU per message at that rate (steadier than at saturation, where
    how the work batches up depends on what else the machine does)."""
    wire = Wire(kind, port)
    pairs = await open_pairs(wire, args.pairs, "x" * args.content_bytes)
    lat: list[float] = []
    tally = Tally()
    for p in pairs:
        wire_pair(p, lat, lambda pair: None, tally)
    await asyncio.sleep(0.2)
    tick = 0.005
    owed = 0.0
    cpu0 = srv.cpu_seconds()
    started = time.perf_counter()
    i = 0
    sent = 0
    while (now := time.perf_counter()) - started < args.duration:
        owed = rate * (now - started) - sent
        while owed >= 1:
            pairs[i % len(pairs)].send()
            i += 1
            sent += 1
            owed -= 1
        await asyncio.sleep(tick)
    wanted = sent
    await tally.wait_for(wanted, 10)
    pushed = tally.count
    cpu_us = (srv.cpu_seconds() - cpu0) / max(pushed, 1) * 1e6
    await close_peers(*(peer for p in pairs for peer in (p.customer, p.staff)))
    return {
        "offered": rate,
        "msg_s": pushed / max(time.perf_counter() - started, 1e-9) if pushed < wanted else rate,
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "lost": wanted - pushed,
        "cpu_us": cpu_us,
    }


async def idle_memory(
    kind: str, port: int, srv: Server, counts: list[int], settle: float
) -> dict[int, float]:
    """Server RSS (MiB) with ``counts`` idle connections open (each a different staff id),
    read ``settle`` seconds after the last one opened."""
    wire = Wire(kind, port)
    held: list[Peer] = []
    out: dict[int, float] = {}
    gate = asyncio.Semaphore(100)

    async def one(n: int) -> Peer:
        async with gate:
            return await Peer(wire).open(n, mint(SECRET.encode(), admin_id=n, ttl=3600))

    for target in counts:
        held += await asyncio.gather(*(one(300_000 + n) for n in range(len(held), target)))
        await asyncio.sleep(settle)
        out[target] = srv.status()["rss"]
    await close_peers(*held)
    return out


async def unread_timing(port: int, counts: list[int], calls: int) -> dict[int, float]:
    """Median GetUnreadInfo time (ms) of a staff member with each count of unread messages."""
    wire = Wire("appchat", port)
    out: dict[int, float] = {}
    for k, unread in enumerate(counts):
        app = 50_000 + k
        staff = await Peer(wire).open(400_000 + k, mint(SECRET.encode(), admin_id=400_000 + k))
        customer = await Peer(wire).open(
            500_000 + k, mint(SECRET.encode(), request_id=app, sid=500_000 + k)
        )
        await staff.call("Event.AddConversation", {"application_id": app}, 10**9)
        await customer.call("Event.AddConversation", {"application_id": app}, 10**9)
        window = asyncio.Semaphore(64)
        acked = Tally()

        def on_ack(
            kind: str, value: Any, window: asyncio.Semaphore = window, acked: Tally = acked
        ) -> None:
            window.release()
            acked.add()

        customer.on_frame = on_ack
        args = {"session_channel": str(app), "content": "unread"}
        for seq in range(unread):
            await window.acquire()
            assert customer.client is not None
            customer.client.send(wire.request("Event.SendMessage", args, seq))
        await acked.wait_for(unread, 300)
        times = []
        for c in range(calls):
            t = time.perf_counter()
            await staff.call("Event.GetUnreadInfo", {}, 10**9 + c + 1)
            times.append(time.perf_counter() - t)
        out[unread] = statistics.median(times) * 1000
        await close_peers(staff, customer)
    return out


async def unpinned_sqlite(
    workdir: Path, args: argparse.Namespace, extra: list[str] | None = None
) -> dict[str, float]:
    db = workdir / f"single-{uuid.uuid4().hex[:8]}.db"
    cmd = [sys.executable, "-m", "appchat", "serve", "--port", "0", "--rate", "0"]
    cmd += ["--database", f"sqlite:///{db}", "--log-level", "WARNING", *(extra or [])]
    srv = Server([], SECRET, name="single", command=cmd).start()
    try:
        return await throughput("appchat", srv.port, args, *[srv, *worker_processes(srv)])
    finally:
        srv.stop()


def worker_processes(parent: Server) -> list[Server]:
    """The worker processes of ``appchat serve --workers N`` (for their CPU time)."""
    out = []
    try:
        with open(f"/proc/{parent.pid}/task/{parent.pid}/children") as f:
            pids = [int(p) for p in f.read().split()]
    except OSError:
        return []
    for pid in pids:
        child = Server([], SECRET, name=f"worker {pid}", command=["true"])
        child.proc = _Pid(pid)  # type: ignore[assignment]  # cpu_seconds() reads /proc only
        child.pid = pid
        out.append(child)
    return out


class _Pid:
    def __init__(self, pid: int) -> None:
        self.pid = pid


# --- running and reporting ----------------------------------------------------------------------


ONE_NODE = "one SQLite node"


def two_nodes(rev: str | None) -> str:
    return "two nodes, PostgreSQL + Redis" + (f", appchat@{rev}" if rev else "")


def ratio(value: float, reference: float) -> float:
    """``value / reference``; NaN (left out of medians) when the reference delivered
    nothing in its run, as a smoke run on a busy machine can see."""
    return value / reference if reference else math.nan


def median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def inbox_kinds(args: argparse.Namespace) -> dict[str, str]:
    """The throughput rows of appchat (and of each ``--baseline``) with ``--inbox``
    subscribers, when they run: appchat's kind -> its row's ("appchat@REV+inbox10")."""
    if args.inbox <= 0 or "throughput" not in args.parts:
        return {}
    return {k: f"{k}+inbox{args.inbox}" for k in args.servers if k.partition("@")[0] == "appchat"}


def after_label(args: argparse.Namespace) -> str:
    """What the latency rates of a server ran after, in the same process."""
    return "after saturation" if "throughput" in args.parts else "one process, rates in turn"


async def inbox_throughput(workdir: Path, args: argparse.Namespace, kind: str) -> dict[str, float]:
    """The throughput workload on appchat (``kind``: as of this checkout or a baseline)
    with ``--inbox`` subscribers reading every push about a message; also how many
    messages were stored and the fewest pushes read."""
    with server(kind, workdir) as srv:
        inbox = await subscribe_inbox(srv.port, args.inbox)
        result = await throughput("appchat", srv.port, args, srv)
        result["stored"], result["inbox_read"] = await inbox_delivery(srv, inbox)
        await close_peers(*inbox.peers)
    return result


async def run_all(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    kinds = list(args.servers)
    with_inbox = inbox_kinds(args)
    rows = []  # the throughput table's: appchat with the inbox right after appchat
    for kind in kinds:
        rows += [kind, with_inbox[kind]] if kind in with_inbox else [kind]
    parts = set(args.parts)
    rates = args.rates if "latency" in parts else []
    fresh = "latency" in parts and args.fresh_rate > 0
    results: dict[str, Any] = {
        "throughput": {k: [] for k in rows},
        "latency": {k: {r: [] for r in args.rates} for k in kinds},
        "fresh": {k: {args.fresh_rate: []} for k in kinds} if fresh else {},
        "memory": {k: [] for k in kinds},
        "unread": [],
        "cluster": {ONE_NODE: [], **{two_nodes(rev): [] for rev in [*args.baseline, None]}},
        "workers": {1: [], 2: []},
    }
    per_server = ("throughput" in parts) + len(rates) + fresh + ("memory" in parts)
    steps = args.runs * (
        len(kinds) * per_server
        + len(with_inbox)
        + ("unread" in parts)
        + (2 + len(args.baseline)) * ("cluster" in parts)
    ) + args.runs * 2 * ("workers" in parts)
    with tqdm(total=steps, desc="bench", unit="step", file=sys.stderr) as bar:
        for _run in range(args.runs):
            for kind in kinds if per_server else []:
                if "throughput" in parts or rates:
                    with server(kind, workdir) as srv:
                        if "throughput" in parts:
                            bar.set_postfix_str(f"{kind} throughput")
                            results["throughput"][kind].append(
                                await throughput(kind, srv.port, args, srv)
                            )
                            bar.update()
                        for rate in rates:
                            bar.set_postfix_str(f"{kind} latency @ {rate:g}/s")
                            results["latency"][kind][rate].append(
                                await latency(kind, srv.port, args, rate, srv)
                            )
                            bar.update()
                if kind in with_inbox:
                    bar.set_postfix_str(f"{with_inbox[kind]} throughput")
                    results["throughput"][with_inbox[kind]].append(
                        await inbox_throughput(workdir, args, kind)
                    )
                    bar.update()
                if fresh:  # its own process, nothing run on it before
                    with server(kind, workdir) as srv:
                        bar.set_postfix_str(f"{kind} latency @ {args.fresh_rate:g}/s, fresh")
                        results["fresh"][kind][args.fresh_rate].append(
                            await latency(kind, srv.port, args, args.fresh_rate, srv)
                        )
                        bar.update()
                if "memory" in parts:
                    with server(kind, workdir) as srv:
                        bar.set_postfix_str(f"{kind} idle memory")
                        results["memory"][kind].append(
                            await idle_memory(kind, srv.port, srv, args.idle, args.settle)
                        )
                        bar.update()
            if "cluster" in parts:
                # Side by side, nothing pinned: customers on node A, staff on node B.
                bar.set_postfix_str("one SQLite node (unpinned)")
                single = await unpinned_sqlite(workdir, args)
                results["cluster"][ONE_NODE].append(single)
                bar.update()
                revs = [*args.baseline, None]  # --baseline: the same as of each REV,
                shift = _run % len(revs)  # in turns first, so that no order favours one
                for rev in revs[shift:] + revs[:shift]:
                    bar.set_postfix_str(two_nodes(rev))
                    with cluster(workdir, args, rev) as (a, b, db_cpu, rd_cpu):
                        two = await throughput(
                            "appchat",
                            a.port,
                            args,
                            a,
                            b,
                            staff_port=b.port,
                            db_cpu=db_cpu,
                            redis_cpu=rd_cpu,
                        )
                    results["cluster"][two_nodes(rev)].append(two)
                    bar.update()
            if "workers" in parts:
                # --workers 1 and 2 on one SQLite file and Redis, nothing pinned.
                for n in (1, 2):
                    bar.set_postfix_str(f"--workers {n}")
                    extra = ["--workers", str(n), "--broker", args.redis]
                    extra += ["--channel-prefix", f"appchat-bench-{uuid.uuid4().hex[:8]}"]
                    results["workers"][n].append(await unpinned_sqlite(workdir, args, extra))
                    bar.update()
            if "unread" not in parts:
                continue
            with server("appchat", workdir) as srv:
                bar.set_postfix_str("appchat unread")
                results["unread"].append(await unread_timing(srv.port, args.unread, args.calls))
                bar.update()
    return results


def summarise(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {"throughput": {}, "latency": {}, "memory": {}, "unread": {}}
    for kind, runs in results["throughput"].items():
        if not runs:
            continue
        t = s["throughput"][kind] = {
            key: median([r[key] for r in runs])
            for key in ("msg_s", "cpu_us", "errors", "srv_cpu", "gen_cpu")
        }
        # the ratio to each reference in each run (servers side by side), then its median
        for ref in REFERENCES:
            if results["throughput"].get(ref):
                t[f"ratio_{ref}"] = median(
                    [
                        ratio(r["msg_s"], b["msg_s"])
                        for r, b in zip(runs, results["throughput"][ref], strict=True)
                    ]
                )
        if "stored" in runs[0]:  # with inbox subscribers: was every push read?
            t["stored"] = median([r["stored"] for r in runs])
            t["all_read"] = all(r["inbox_read"] == r["stored"] for r in runs)
    for part in ("latency", "fresh"):
        s[part] = {}
        for kind, by_rate in results[part].items():
            s[part][kind] = {
                rate: {key: median([r[key] for r in runs]) for key in runs[0]}
                for rate, runs in by_rate.items()
                if runs
            }
            if not s[part][kind]:
                del s[part][kind]
    lo, hi = args.idle[0], args.idle[-1]
    for kind, runs in results["memory"].items():
        if not runs:
            continue
        slopes = [(r[hi] - r[lo]) * 1024 / (hi - lo) for r in runs]
        s["memory"][kind] = {
            "kib_per_conn": median(slopes),
            "rss": {n: median([r[n] for r in runs]) for n in args.idle},
        }
    s["cluster"] = {}
    cl = results["cluster"]
    if all(cl.values()):
        for label, runs in cl.items():
            s["cluster"][label] = {
                k: median([r.get(k, 0.0) for r in runs])
                for k in ("msg_s", "cpu_us", "db_cpu_us", "redis_cpu_us")
            }
        one = cl[ONE_NODE]
        for label, runs in cl.items():
            s["cluster"][label]["ratio"] = median(
                [ratio(t["msg_s"], o["msg_s"]) for o, t in zip(one, runs, strict=True)]
            )
        s["cluster"]["ratio"] = s["cluster"][two_nodes(None)]["ratio"]
    s["workers"] = {}
    if all(results["workers"].values()):
        for n, runs in results["workers"].items():
            s["workers"][n] = {k: median([r[k] for r in runs]) for k in ("msg_s", "cpu_us")}
        s["workers"]["ratio"] = median(
            [
                ratio(two["msg_s"], one["msg_s"])
                for one, two in zip(results["workers"][1], results["workers"][2], strict=True)
            ]
        )
    for n in args.unread if results["unread"] else []:
        s["unread"][n] = median([r[n] for r in results["unread"]])
    return s


def ratio_text(value: float) -> str:
    """A ratio as the tables show it: "-" for a run whose reference delivered nothing."""
    return "-" if math.isnan(value) else f"{value:.2f}"


def ratio_cell(kind: str, t: dict[str, float], ref: str) -> str:
    """The throughput table's ratio of ``kind`` to the reference server ``ref``."""
    if kind == ref:
        return "1"
    return ratio_text(t.get(f"ratio_{ref}", math.nan))


def report(args: argparse.Namespace, s: dict[str, Any]) -> str:
    lines = [
        f"Command: `{' '.join(['.venv/bin/python', 'bench/suite.py', *sys.argv[1:]])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}; {source_version()}; {time.strftime('%Y-%m-%d')}  ",
        f"Servers pinned to CPU 0, the load generator to CPU 1; medians of {args.runs} runs; "
        f"{args.pairs} pairs, {args.content_bytes}-byte messages.",
    ]
    if s["throughput"]:
        lines += [
            "",
            f"**Throughput** (window {args.window} per customer, {args.duration:g} s per run):",
            "",
            "| server | delivered msg/s | server CPU per message "
            + "".join(f"| ratio to {name} " for name in REFERENCES.values())
            + "| server CPU | generator CPU |",
            "|---|---|---|" + "---|" * len(REFERENCES) + "---|---|",
        ]
        for kind, t in s["throughput"].items():
            ratios = "".join(f"| {ratio_cell(kind, t, ref)} " for ref in REFERENCES)
            lines.append(
                f"| {kind} | {t['msg_s']:,.0f} | {t['cpu_us']:.1f} µs {ratios}"
                f"| {t['srv_cpu']:.0f}% | {t['gen_cpu']:.0f}% |"
            )
        for kind, t in s["throughput"].items():
            if "stored" in t:
                lines += [
                    "",
                    f"{kind}: appchat with {args.inbox} staff connections subscribed to the "
                    'whole inbox (Event.SubscribeInbox `{"filter": "all"}`) while the same '
                    "workload runs, each reading every Event.ConversationUpdated push (read, not "
                    f"parsed); every subscriber read one per stored message "
                    f"({t['stored']:,.0f} stored): {'yes' if t['all_read'] else 'NO'}.",
                ]
    if s["latency"] or s["fresh"]:
        lines += ["", "**Latency**, send to the peer's push, at fixed offered load:", ""]
        lines += [
            "| server | server process | offered msg/s | delivered msg/s | p50 ms | p99 ms "
            "| lost | server CPU per message |"
        ]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for kind in dict.fromkeys([*s["latency"], *s["fresh"]]):
            for label, by_rate in (
                (after_label(args), s["latency"].get(kind, {})),
                ("fresh server", s["fresh"].get(kind, {})),
            ):
                for rate, r in by_rate.items():
                    lines.append(
                        f"| {kind} | {label} | {rate:,.0f} | {r['msg_s']:,.0f} "
                        f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['lost']:.0f} "
                        f"| {r['cpu_us']:.1f} µs |"
                    )
    if s["memory"]:
        lo, hi = args.idle[0], args.idle[-1]
        lines += ["", f"**Memory** of idle authenticated connections ({lo:,} and {hi:,}):", ""]
        lines += [f"| server | RSS at {lo:,} | RSS at {hi:,} | KiB per connection |"]
        lines += ["|---|---|---|---|"]
        for kind, m in s["memory"].items():
            lines.append(
                f"| {kind} | {m['rss'][lo]:.1f} MiB | {m['rss'][hi]:.1f} MiB | "
                f"{m['kib_per_conn']:.1f} |"
            )
    if s["cluster"]:
        c = s["cluster"]
        lines += [
            "",
            "**Two nodes against one**, side by side, nothing pinned (customers on node A,",
        ]
        lines += ["staff on node B, so every push crosses nodes through Redis):", ""]
        lines += [
            "| deployment | delivered msg/s | CPU per message (all nodes) "
            "| PostgreSQL CPU per message | Redis CPU per message | ratio |"
        ]
        lines += ["|---|---|---|---|---|---|"]
        for label in c:
            if label != "ratio":
                r = c[label]
                db = f"{r['db_cpu_us']:.1f} µs" if r["db_cpu_us"] else "in the node"
                rd = f"{r['redis_cpu_us']:.1f} µs" if r["db_cpu_us"] else "none"
                lines.append(
                    f"| {label} | {r['msg_s']:,.0f} | {r['cpu_us']:.1f} µs | {db} | {rd} "
                    f"| {ratio_text(r['ratio'])} |"
                )
        lines += [
            "",
            f"Ratio two nodes / one node: **{ratio_text(c['ratio'])}** (median of the runs' "
            "ratios).",
        ]
    if s["workers"]:
        w = s["workers"]
        lines += [
            "",
            "**`--workers`** on one SQLite file and Redis, side by side, nothing pinned:",
            "",
            "| workers | delivered msg/s | CPU per message (all workers) |",
            "|---|---|---|",
        ]
        for n in (1, 2):
            lines.append(f"| {n} | {w[n]['msg_s']:,.0f} | {w[n]['cpu_us']:.1f} µs |")
        lines += ["", f"Ratio 2 workers / 1 worker: **{ratio_text(w['ratio'])}**."]
    if s["unread"]:
        lines += ["", f"**GetUnreadInfo** (median of {args.calls} calls):", ""]
        lines += ["| unread messages | time |", "|---|---|"]
        for n, ms in s["unread"].items():
            lines.append(f"| {n:,} | {ms:.2f} ms |")
    return "\n".join(lines) + "\n"


FRESH_SHIFT = 1.06  # the fresh server's points, drawn this factor right of their rate


def rates_axis(ax: Any, rates: list[float]) -> None:
    """A log x axis of offered msg/s ticked at the rates measured, plain numbers on both axes."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    ax.set_xlabel("offered msg/s (log scale)")
    if rates:
        ax.set_xticks(rates, [f"{r:,.0f}" for r in rates])
        ax.set_xlim(min(rates) / 1.25, max(rates) * 1.25)
    ax.xaxis.set_minor_formatter(NullFormatter())

    def minor(v: float, _pos: int) -> str:
        """Between the powers of ten, 2, 3 and 5 times one, when the axis spans little."""
        lo, hi = ax.get_ylim()
        if v <= 0 or lo <= 0 or hi / lo > 100:
            return ""
        return f"{v:,.6g}" if round(v / 10 ** math.floor(math.log10(v))) in (2, 3, 5) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.6g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))
    ax.grid(alpha=0.3, which="both")


def colours(s: dict[str, Any]) -> dict[str, Any]:
    """One colour per server, the same in every plot."""
    import matplotlib.pyplot as plt

    kinds = dict.fromkeys([*s["throughput"], *s["latency"], *s["fresh"], *s["memory"]])
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {kind: cycle[n % len(cycle)] for n, kind in enumerate(kinds)}


def plots(args: argparse.Namespace, s: dict[str, Any], outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    outdir.mkdir(parents=True, exist_ok=True)
    colour = colours(s)
    made = []

    def save(fig: Any, name: str) -> None:
        made.append(outdir / name)
        fig.tight_layout()
        fig.savefig(made[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)

    # Throughput: two bar charts side by side, each bar labelled with its value.
    kinds = list(s["throughput"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, fmt, title in (
        (left, "msg_s", "{:,.0f}", "Closed-loop delivered msg/s (higher is better)"),
        (right, "cpu_us", "{:.1f} µs", "Server CPU per message, µs (lower is better)"),
    ):
        values = [s["throughput"][k][key] for k in kinds]
        bars = ax.bar(range(len(kinds)), values, color=[colour[k] for k in kinds])
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], padding=2, fontsize="small")
        ax.set_xticks(range(len(kinds)), kinds, rotation=15 if len(kinds) > 4 else 0)
        ax.set_title(title, fontsize="medium")
        ax.margins(y=0.12)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    fig.suptitle(
        f"Throughput, one core of server ({args.pairs} pairs, window {args.window}, "
        f"median of {args.runs} run{'s' if args.runs > 1 else ''})"
    )
    save(fig, "bench-throughput.png")

    # Latency against offered load, the fresh servers as stars drawn just right of their
    # rate; beside it delivered against offered msg/s, when there are rates to draw it with.
    offered = sorted({r for by_rate in s["latency"].values() for r in by_rate})
    two = len(offered) >= 2
    fig = plt.figure(figsize=(12, 6) if two else (7, 6))
    lat = fig.add_subplot(1, 2 if two else 1, 1)
    kinds = list(dict.fromkeys([*s["latency"], *s["fresh"]]))
    for kind in kinds:
        c = colour[kind]
        by_rate = s["latency"].get(kind, {})
        rates = list(by_rate)
        lat.plot(rates, [by_rate[r]["p50_ms"] for r in rates], marker="o", color=c)
        lat.plot(rates, [by_rate[r]["p99_ms"] for r in rates], marker="x", ls="--", color=c)
        for r, f in s["fresh"].get(kind, {}).items():
            star = {"color": c, "marker": "*", "markersize": 11, "linestyle": "none"}
            lat.plot([r * FRESH_SHIFT], [f["p50_ms"]], **star)
            lat.plot([r * FRESH_SHIFT], [f["p99_ms"]], **star, markerfacecolor="none")
    lat.set_yscale("log")
    rates_axis(lat, sorted({*offered, *(r for f in s["fresh"].values() for r in f)}))
    lat.set_ylabel("send -> push, ms (log scale)")
    lat.set_title("Latency against offered load", fontsize="medium")
    after = after_label(args)
    handles = [Line2D([], [], color=colour[k], linewidth=4, label=k) for k in kinds]
    handles += [
        Line2D([], [], color="black", marker="o", label=f"p50, {after}"),
        Line2D([], [], color="black", marker="x", linestyle="--", label=f"p99, {after}"),
    ]
    if s["fresh"]:
        star = {"color": "black", "marker": "*", "markersize": 11, "linestyle": "none"}
        handles += [
            Line2D([], [], **star, label="p50, fresh server (right of its rate)"),
            Line2D([], [], **star, markerfacecolor="none", label="p99, fresh server"),
        ]
    below: dict[str, Any] = {"fontsize": "small", "ncols": 2, "bbox_to_anchor": (0.5, -0.14)}
    lat.legend(handles=handles, loc="upper center", **below)
    if two:
        rate = fig.add_subplot(1, 2, 2)
        for n, (kind, by_rate) in enumerate(s["latency"].items()):
            rates = list(by_rate)
            size = max(3.0, 9.0 - 1.5 * n)  # shrinking: points that coincide stay visible
            rate.plot(
                rates,
                [by_rate[r]["msg_s"] for r in rates],
                marker="o",
                markersize=size,
                color=colour[kind],
            )
        rate.plot(offered, offered, color="grey", linewidth=1)
        rate.set_yscale("log")
        rates_axis(rate, offered)
        rate.set_ylabel("delivered msg/s (log scale)")
        rate.set_title(f"Delivered against offered load ({after})", fontsize="medium")
        rate.legend(
            handles=[Line2D([], [], color=colour[k], marker="o", label=k) for k in s["latency"]]
            + [Line2D([], [], color="grey", linewidth=1, label="delivered = offered")],
            loc="upper center",
            **below,
        )
    save(fig, "bench-latency.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    for kind, m in s["memory"].items():
        ns = list(m["rss"])
        ax.plot(
            ns,
            [m["rss"][n] for n in ns],
            marker="o",
            color=colour[kind],
            label=f"{kind} ({m['kib_per_conn']:.1f} KiB/conn)",
        )
    ax.set_xlabel("idle connections")
    ax.set_ylabel("server RSS, MiB")
    ax.set_title("Memory against connections")
    ax.grid(alpha=0.3)
    if s["memory"]:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    save(fig, "bench-memory.png")
    return made


def write_doc(doc: Path, text: str) -> None:
    body = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{text}\n![throughput](img/bench-throughput.png) "
    block += "![latency](img/bench-latency.png) ![memory](img/bench-memory.png)\n" + END
    if BEGIN in body and END in body:
        head, rest = body.split(BEGIN, 1)
        body = head + block + rest.split(END, 1)[1]
    else:
        body = body.rstrip() + "\n\n## make bench\n\n" + block + "\n"
    doc.write_text(body)


def checkout_baseline(rev: str) -> None:
    """Put the tree of ``rev`` under BASELINE_TREE (its ``src`` goes first on PYTHONPATH)."""
    import shutil
    import subprocess

    tree = BASELINE_TREE / rev
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="what to measure [all]",
    )
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    p.add_argument(
        "--inbox",
        type=int,
        default=10,
        metavar="N",
        help="also appchat's throughput with N inbox subscribers, 'appchat+inboxN' "
        "(and each --baseline's, 'appchat@REV+inboxN'; 0: not) [10]",
    )
    p.add_argument(
        "--baseline",
        metavar="REV",
        nargs="+",
        default=[],
        help="also run appchat as of each git REV ('appchat@REV'), for before/after figures",
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--server-args", default="", help="more `appchat serve` options, quoted")
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--content-bytes", type=int, default=100)
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rates", type=float, nargs="+", default=[500, 1000, 2000, 5000, 10000])
    p.add_argument(
        "--fresh-rate",
        type=float,
        default=2000,
        help="the latency at this rate on a freshly started server of each kind (0: not) [2000]",
    )
    p.add_argument("--idle", type=int, nargs="+", default=[1000, 5000])
    p.add_argument(
        "--settle", type=float, default=1.0, help="seconds idle connections rest before RSS"
    )
    p.add_argument("--unread", type=int, nargs="+", default=[10, 100_000])
    p.add_argument("--calls", type=int, default=50)
    p.add_argument(
        "--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres", help="[cluster]"
    )
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="[cluster]")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md and docs/img")
    p.add_argument("--out", type=Path, help="write the report and plots here instead")
    p.add_argument("--tiny", action="store_true", help="a smoke run of every part")
    args = p.parse_args(argv)
    if args.tiny:
        args.runs, args.pairs, args.window, args.duration, args.warmup = 1, 4, 2, 0.3, 0.1
        args.rates, args.idle, args.unread, args.calls = [100], [10, 20], [3, 30], 3
        args.fresh_rate = min(args.fresh_rate, 100)
        args.settle = 0.1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    SERVER_ARGS.extend(args.server_args.split())
    for n, rev in enumerate(args.baseline):
        checkout_baseline(rev)
        args.servers.insert(n, f"appchat@{rev}")
    pin_generator()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    with tempfile.TemporaryDirectory(prefix="appchat-bench-") as tmp:
        results = asyncio.run(run_all(args, Path(tmp)))
    s = summarise(args, results)
    text = report(args, s)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "benchmarks.md").write_text(text)
        plots(args, s, args.out)
    elif args.write:
        plots(args, s, ROOT / "docs" / "img")
        write_doc(ROOT / "docs" / "benchmarks.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
