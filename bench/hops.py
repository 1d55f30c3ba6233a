"""Where does a slow message wait? Timestamps at each hop of SendMessage, send to push.

Starts ``appchat serve`` (one SQLite node, pinned like ``make bench``) under a tracer that
notes, per message, when its frame came off the socket, when its request began to be
served, when it went to the writer thread, when the writer's batch began and committed,
when the event loop took the result back, and when the push was handed to the peer's
socket; the load generator notes the send and the push's arrival. All clocks are
CLOCK_MONOTONIC (``time.perf_counter`` on Linux), so the hops of one message line up
across the two processes. It then prints, for the slowest messages, the time spent
between each pair of hops, and the writer's longest batches.

    .venv/bin/python bench/hops.py --rate 2000 --duration 20 [--saturate 5]

The tracer patches the running server only (nothing of it is in appchat itself).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import orjson

HERE = Path(__file__).resolve().parent
HOPS = ("sent", "read", "served", "queued", "batch", "commit", "settled", "pushed", "arrived")


def _cmid(data: Any) -> str | None:
    """The client_msg_id in a request or push frame (a byte search: cheap, trace only)."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    at = raw.find(b'client_msg_id\\":\\"')
    if at >= 0:
        at += 18
        return raw[at : raw.index(b"\\", at)].decode()
    at = raw.find(b'"client_msg_id":"')
    if at >= 0:
        at += 17
        return raw[at : raw.index(b'"', at)].decode()
    return None


def traced_serve(out: str, argv: list[str]) -> int:
    """Run ``appchat`` with ``argv`` with every hop noted; write them to ``out`` at exit."""
    from aiohttp import WSMsgType

    from appchat.app import cli
    from appchat.chat.service import ChatService
    from appchat.fanout.connection import Connection
    from appchat.store import sqlite
    from appchat.transport.ws import _Session
    from appchat.transport.wsconn import WebSocket

    clock = time.perf_counter
    marks: dict[str, dict[str, float]] = {}
    batches: list[tuple[float, float, int]] = []
    spans: dict[str, list[tuple[float, float]]] = {"commit": [], "checkpoint": [], "index": []}

    def mark(cmid: str | None, hop: str) -> None:
        if cmid is not None:
            marks.setdefault(cmid, {})[hop] = clock()

    receive = WebSocket.receive

    async def traced_receive(self: WebSocket, *a: Any, **kw: Any) -> Any:
        msg = await receive(self, *a, **kw)
        if msg.type is WSMsgType.TEXT and "SendMessage" in msg.data:
            mark(_cmid(msg.data), "read")
        return msg

    offer = _Session.offer

    def traced_offer(self: Any, text: str) -> bool:
        taken = offer(self, text)
        if taken and "SendMessage" in text:
            mark(_cmid(text), "read")
        return taken

    handle = ChatService.handle

    async def traced_handle(self: ChatService, session: Any, frame: Any) -> bytes:
        if "SendMessage" in frame:
            mark(_cmid(frame), "served")
        return await handle(self, session, frame)

    submit = ChatService._submit_send

    async def traced_submit(self: ChatService, session: Any, request: Any, started: float) -> Any:
        mark(request.args.get("client_msg_id"), "served")  # pipelined: served with others
        return await submit(self, session, request, started)

    send = sqlite.SqliteStore._send

    def traced_send(self: Any, s: Any) -> Any:
        cmid = s.client_msg_id
        mark(cmid, "queued")
        future = send(self, s)
        future.add_done_callback(lambda _: mark(cmid, "settled"))
        return future

    commit = sqlite.SqliteStore._commit_batch

    class Timed:
        """A connection whose COMMITs and checkpoints are noted (``spans``)."""

        def __init__(self, conn: Any) -> None:
            self._conn = conn

        def execute(self, sql: str, *a: Any) -> Any:
            kind = "commit" if sql == "COMMIT" else "checkpoint" if "checkpoint" in sql else ""
            began = clock()
            try:
                return self._conn.execute(sql, *a)
            finally:
                if kind:
                    spans[kind].append((began, clock()))

        def __getattr__(self, name: str) -> Any:
            return getattr(self._conn, name)

    def traced_commit(self: Any, conn: Any, batch: list[Any]) -> Any:
        began = clock()
        ids = [fn.client_msg_id for fn, *_ in batch if isinstance(fn, sqlite._SendMessage)]
        result = commit(self, cast(Any, Timed(conn)), batch)
        done = clock()
        batches.append((began, done, len(batch)))
        for cmid in ids:
            if cmid is not None:
                marks.setdefault(cmid, {}).update(batch=began, commit=done)
        return result

    checkpointer = sqlite._Checkpointer.__init__

    def traced_checkpointer(self: Any, connect: Any) -> None:
        checkpointer(self, lambda: cast(Any, Timed(connect())))

    catch_up = sqlite._SearchIndex.catch_up

    def traced_catch_up(self: Any, conn: Any, *, idle: bool) -> None:
        began = clock()
        catch_up(self, conn, idle=idle)
        if (ended := clock()) - began > 0.0002:  # a run, not a look
            spans["index"].append((began, ended))

    push = Connection.push

    def traced_push(self: Connection, frame: bytes) -> None:
        push(self, frame)
        if frame.startswith(b'{"name":"Event.ReceiveMessage"'):
            mark(_cmid(frame), "pushed")

    patches: list[tuple[Any, str, Any]] = [
        (WebSocket, "receive", traced_receive),
        (_Session, "offer", traced_offer),
        (ChatService, "handle", traced_handle),
        (ChatService, "_submit_send", traced_submit),
        (sqlite.SqliteStore, "_send", traced_send),
        (sqlite.SqliteStore, "_commit_batch", traced_commit),
        (Connection, "push", traced_push),
        (sqlite._Checkpointer, "__init__", traced_checkpointer),
        (sqlite._SearchIndex, "catch_up", traced_catch_up),
    ]
    for owner, name, patched in patches:
        setattr(owner, name, patched)
    try:
        return cli.main(argv)
    finally:
        Path(out).write_bytes(orjson.dumps({"marks": marks, "batches": batches, "spans": spans}))


async def drive(args: argparse.Namespace, workdir: Path) -> None:
    sys.path.insert(0, str(HERE))
    from common import Server
    from suite import (
        SECRET,
        Pair,
        Wire,
        open_pairs,
        pinned,
        throughput,
        wire_pair,
    )

    trace = workdir / "hops.json"
    db = workdir / "hops.db"
    cmd = [sys.executable, str(HERE / "hops.py"), "--traced", str(trace), "serve"]
    cmd += ["--port", "0", "--rate", "0", "--database", f"sqlite:///{db}"]
    cmd += ["--log-level", "WARNING", *args.server_args.split()]
    srv = Server([], SECRET, name="traced", command=pinned(0) + cmd).start()
    client: dict[str, dict[str, float]] = {}
    try:
        if args.saturate:
            ns = argparse.Namespace(
                pairs=args.pairs, content_bytes=100, window=16, warmup=0.5, duration=args.saturate
            )
            t = await throughput("appchat", srv.port, ns, srv)
            print(f"saturation phase: {t['msg_s']:,.0f} msg/s", flush=True)
        wire = Wire("appchat", srv.port)
        pairs = await open_pairs(wire, args.pairs, "x" * 100)
        sent_at: dict[str, float] = {}

        def on_push(pair: Pair) -> Any:
            original = pair.staff.on_frame

            def frame(kind: str, value: Any) -> None:
                if kind == "push" and value in sent_at:
                    client[value] = {"sent": sent_at.pop(value), "arrived": time.perf_counter()}
                original(kind, value)

            return frame

        for p in pairs:
            wire_pair(p, None, lambda pair: None)
            p.staff.on_frame = on_push(p)
        await asyncio.sleep(0.2)
        started = time.perf_counter()
        sent = i = 0
        while (now := time.perf_counter()) - started < args.duration:
            while args.rate * (now - started) - sent >= 1:
                pair = pairs[i % len(pairs)]
                sent_at[f"{pair.tag}{pair.index}-{pair.next_seq}"] = time.perf_counter()
                pair.send()
                i += 1
                sent += 1
            await asyncio.sleep(0.005)
        for _ in range(200):  # the last pushes, up to 10 s
            if not sent_at:
                break
            await asyncio.sleep(0.05)
        for p in pairs:
            p.customer.close()
            p.staff.close()
    finally:
        srv.stop()
    data = orjson.loads(trace.read_bytes())
    if args.dump:
        dump = orjson.dumps({"client": client, **data})
        await asyncio.to_thread(Path(args.dump).write_bytes, dump)
    report(client, data["marks"], data["batches"], data["spans"], args)


def report(
    client: dict[str, dict[str, float]],
    server: dict[str, dict[str, float]],
    batches: list[list[float]],
    spans: dict[str, list[list[float]]],
    args: argparse.Namespace,
) -> None:
    rows = []
    for cmid, c in client.items():
        rows.append({**server.get(cmid, {}), **c})
    lat = sorted((r["arrived"] - r["sent"]) * 1000 for r in rows)
    if not lat:
        print("no message arrived")
        return

    def p(q: float) -> float:
        return lat[min(len(lat) - 1, int(len(lat) * q / 100))]

    print(
        f"{len(rows):,} messages at {args.rate:g}/s: p50 {p(50):.2f} ms, p99 {p(99):.2f} ms,"
        f" max {lat[-1]:.1f} ms"
    )
    complete = [r for r in rows if all(h in r for h in HOPS)]
    print(f"{len(complete):,} with every hop noted")
    steps = list(itertools.pairwise(HOPS))

    def table(title: str, chosen: list[dict[str, float]]) -> None:
        print(f"\n{title} ({len(chosen)} messages), ms between hops (median / max):")
        for a, b in steps:
            d = [(r[b] - r[a]) * 1000 for r in chosen]
            print(f"  {a:>8} -> {b:<8} {statistics.median(d):8.2f} {max(d):9.2f}")

    complete.sort(key=lambda r: r["arrived"] - r["sent"])
    table("all", complete)
    slow = [r for r in complete if (r["arrived"] - r["sent"]) * 1000 > max(args.slow, p(99))]
    if slow:
        table(f"slower than max({args.slow:g} ms, p99)", slow)
        t0 = min(r["sent"] for r in complete)
        print("\nthe 10 slowest, each hop in ms after the send (s = when it was sent):")
        for r in slow[-10:]:
            hops = " ".join(f"{h}+{(r[h] - r['sent']) * 1000:.1f}" for h in HOPS[1:])
            print(f"  s={r['sent'] - t0:7.3f} {hops}")
    begun = min(r["sent"] for r in rows)  # the measured phase: not the saturation before it
    batches = [b for b in batches if b[0] >= begun] or batches
    long = sorted(batches, key=lambda b: b[1] - b[0])[-5:]
    sizes = [b[2] for b in batches]
    print(
        f"\nwriter: {len(batches):,} batches, median {statistics.median(sizes):.0f} writes,"
        f" longest (ms, writes): " + ", ".join(f"{(b[1] - b[0]) * 1000:.1f}/{b[2]}" for b in long)
    )
    for kind, noted in spans.items():  # commit, checkpoint, index (a run of the search index)
        took = sorted((b - a) * 1000 for a, b in noted if a >= begun)
        if took:
            print(
                f"{kind}: {len(took):,}, ms median {statistics.median(took):.2f}, max "
                f"{took[-1]:.1f}, {sum(took):,.0f} ms in all"
            )
    checkpoints = [(a, b) for a, b in spans.get("checkpoint", []) if b >= begun]
    slow_batches = [b for b in batches if b[1] - b[0] > args.slow / 1000]
    beside = sum(any(a < b[1] and e > b[0] for a, e in checkpoints) for b in slow_batches)
    print(
        f"batches longer than {args.slow:g} ms: {len(slow_batches):,}, {beside:,} of them"
        f" while a checkpoint ran (all batches: {len(batches):,})"
    )


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--traced":
        return traced_serve(sys.argv[2], sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rate", type=float, default=2000)
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--saturate", type=float, default=0, help="seconds of closed-loop load first")
    p.add_argument("--slow", type=float, default=50, help="ms: split the messages above it and p99")
    p.add_argument("--dump", help="also write every hop and batch to this JSON file")
    p.add_argument("--server-args", default="", help="more `appchat serve` options, quoted")
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    from common import setup_signals_and_loop
    from suite import pin_generator

    pin_generator()
    setup_signals_and_loop()
    with tempfile.TemporaryDirectory(prefix="appchat-hops-") as tmp:
        asyncio.run(drive(args, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
