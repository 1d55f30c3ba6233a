"""The bare aiohttp relay: appchat's wire format with no auth, no storage, no limits.

It accepts any token, joins a connection to a room on ``Event.AddConversation`` and, on
``Event.SendMessage``, answers the sender and pushes the message to the room's other
connections. It is the ceiling a WebSocket server in Python on aiohttp reaches on this
machine; appchat's figures are read against it.

    python bench/reference/relay_aiohttp.py --port 0   # prints "listening on ws://…/ws"
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from collections import defaultdict
from datetime import UTC, datetime

import orjson
from aiohttp import WSMsgType, web


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    rooms: defaultdict[str, set[web.WebSocketResponse]] = defaultdict(set)
    ids = itertools.count(1)

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
                if name == "Event.AddConversation":
                    channel = str(a["application_id"])
                    rooms[channel].add(ws)
                    joined.add(channel)
                    result: object = {"id": int(channel), "session_channel": channel}
                elif name == "Event.SendMessage":
                    channel = str(a["session_channel"])
                    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                    message = {
                        "id": next(ids),
                        "session_channel": channel,
                        "content": a["content"],
                        "sender_id": sid,
                        "status": 0,
                        "create_at": now,
                        "update_at": now,
                        "content_type": 1,
                        "client_msg_id": a.get("client_msg_id"),
                    }
                    result = {"message": message}
                    push = orjson.dumps(
                        {"name": "Event.ReceiveMessage", "ok": True, "result": result}
                    ).decode()
                    for peer in rooms.get(channel, ()):
                        if peer is not ws:
                            await peer.send_str(push)
                else:
                    result = None
                await ws.send_str(
                    orjson.dumps({"name": name, "ok": True, "result": result, "id": rid}).decode()
                )
        finally:
            for channel in joined:
                rooms[channel].discard(ws)
        return ws

    async def serve() -> None:
        app = web.Application()
        app.router.add_get("/ws", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port)
        await site.start()
        port = runner.addresses[0][1]
        print(f"relay listening on ws://127.0.0.1:{port}/ws", flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())


if __name__ == "__main__":
    main()
