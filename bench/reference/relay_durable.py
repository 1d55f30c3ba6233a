"""The durable relay: the bare aiohttp relay that commits every message before it answers.

It is ``relay_aiohttp.py`` (same wire format, same CLI, any token accepted) plus exactly
one thing: every ``Event.SendMessage`` is committed to a SQLite file (WAL journal,
``synchronous=FULL``) before the sender gets its answer and the room its push. A writer
thread does group commit: it takes every message waiting in its queue, inserts them all
in one transaction, commits, and hands the batch back to the event loop with one
``call_soon_threadsafe``; only then are the answers and pushes written, in the order the
messages arrived. The message id in them is the stored row's id. One table, no index
beyond the primary key, no auth, no limits.

It is the ceiling for a server in Python on aiohttp that commits before it acks, on this
machine; appchat's figures are read against it as well as against the bare relay.

    python bench/reference/relay_durable.py --port 0 [--database PATH]
    # prints "listening on ws://…/ws"; without --database, a temporary file deleted at exit
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import shutil
import signal
import sqlite3
import tempfile
import threading
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import WSMsgType, web

SCHEMA = """CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    channel TEXT NOT NULL,
    sender INTEGER NOT NULL,
    content TEXT NOT NULL,
    client_msg_id TEXT,
    create_at TEXT NOT NULL
)"""
INSERT = (
    "INSERT INTO messages (channel, sender, content, client_msg_id, create_at) "
    "VALUES (?, ?, ?, ?, ?)"
)

# One message waiting for its commit: the sender's socket, the request id, and the row.
Pending = tuple[web.WebSocketResponse, Any, tuple[str, int, str, str | None, str]]


class Writer(threading.Thread):
    """Group commit: each transaction holds every message queued while the last one ran."""

    def __init__(
        self,
        path: str,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[list[tuple[Pending, int]]], None],
    ) -> None:
        super().__init__(name="writer", daemon=True)
        self.queue: queue.SimpleQueue[Pending | None] = queue.SimpleQueue()
        self.loop = loop
        self.deliver = deliver
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(SCHEMA)

    def run(self) -> None:
        q = self.queue
        db = self.db
        stopping = False
        while not stopping:
            first = q.get()
            if first is None:
                break
            batch = [first]
            while True:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            db.execute("BEGIN")
            done = [(p, db.execute(INSERT, p[2]).lastrowid or 0) for p in batch]
            db.execute("COMMIT")
            self.loop.call_soon_threadsafe(self.deliver, done)
        db.close()

    def stop(self) -> None:
        self.queue.put(None)
        self.join(10)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--database", help="the SQLite file [a temporary one, deleted at exit]")
    args = p.parse_args()
    tmpdir = None
    if args.database is None:
        tmpdir = tempfile.mkdtemp(prefix="relay-durable-")
        args.database = os.path.join(tmpdir, "relay.db")
    try:
        try:
            import uvloop

            uvloop.run(serve(args.port, args.database))
        except ImportError:
            asyncio.run(serve(args.port, args.database))
    except KeyboardInterrupt:
        pass
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


async def serve(port: int, path: str) -> None:
    rooms: defaultdict[str, set[web.WebSocketResponse]] = defaultdict(set)
    committed: asyncio.Queue[list[tuple[Pending, int]]] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    writer = Writer(path, loop, committed.put_nowait)
    writer.start()

    async def answer() -> None:
        """Once a batch is committed: each message's push to the room, then its answer."""
        while True:
            for (
                ws,
                rid,
                (channel, sid, content, client_msg_id, now),
            ), row_id in await committed.get():
                message = {
                    "id": row_id,
                    "session_channel": channel,
                    "content": content,
                    "sender_id": sid,
                    "status": 0,
                    "create_at": now,
                    "update_at": now,
                    "content_type": 1,
                    "client_msg_id": client_msg_id,
                }
                result = {"message": message}
                push = orjson.dumps(
                    {"name": "Event.ReceiveMessage", "ok": True, "result": result}
                ).decode()
                for peer in tuple(rooms.get(channel, ())):  # may change while one waits
                    if peer is not ws and not peer.closed:
                        with contextlib.suppress(ConnectionError):
                            await peer.send_str(push)
                if not ws.closed:
                    reply = {"name": "Event.SendMessage", "ok": True, "result": result, "id": rid}
                    with contextlib.suppress(ConnectionError):
                        await ws.send_str(orjson.dumps(reply).decode())

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("access_token",), max_msg_size=64 * 1024)
        await ws.prepare(request)
        sid = int(request.query.get("sid", "0"))
        joined: set[str] = set()
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                frame = orjson.loads(msg.data)
                name, rid = frame.get("name"), frame.get("id")
                raw = frame.get("args") or {}
                a = orjson.loads(raw) if isinstance(raw, str) else raw
                if name == "Event.SendMessage":
                    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                    row = (
                        str(a["session_channel"]),
                        sid,
                        a["content"],
                        a.get("client_msg_id"),
                        now,
                    )
                    writer.queue.put((ws, rid, row))  # answered once committed
                    continue
                if name == "Event.AddConversation":
                    channel = str(a["application_id"])
                    rooms[channel].add(ws)
                    joined.add(channel)
                    result: object = {"id": int(channel), "session_channel": channel}
                else:
                    result = None
                await ws.send_str(
                    orjson.dumps({"name": name, "ok": True, "result": result, "id": rid}).decode()
                )
        finally:
            for channel in joined:
                rooms[channel].discard(ws)
        return ws

    app = web.Application()
    app.router.add_get("/ws", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    answering = asyncio.create_task(answer())
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"durable relay listening on ws://127.0.0.1:{runner.addresses[0][1]}/ws", flush=True)
    try:
        await stop.wait()
    finally:
        answering.cancel()
        await runner.cleanup()
        await loop.run_in_executor(None, writer.stop)


if __name__ == "__main__":
    main()
