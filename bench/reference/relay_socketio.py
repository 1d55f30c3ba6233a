"""A python-socketio relay: the same rooms-and-messages relay on Socket.IO (on aiohttp).

Events: ``join`` {application_id} (acknowledged), ``send`` {session_channel, content,
client_msg_id} (acknowledged with the message, which the room's other clients get as a
``message`` event). No auth, no storage: what a team would write with python-socketio.

    python bench/reference/relay_socketio.py --port 0   # prints "listening on ws://…"
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from datetime import UTC, datetime
from typing import Any

import socketio
from aiohttp import web


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    sio = socketio.AsyncServer(async_mode="aiohttp", transports=["websocket"])
    ids = itertools.count(1)

    @sio.on("join")  # type: ignore[untyped-decorator]  # python-socketio ships no types
    async def join(sid: str, data: dict[str, Any]) -> dict[str, Any]:
        channel = str(data["application_id"])
        await sio.enter_room(sid, channel)
        return {"id": int(channel), "session_channel": channel}

    @sio.on("send")  # type: ignore[untyped-decorator]  # python-socketio ships no types
    async def send(sid: str, data: dict[str, Any]) -> dict[str, Any]:
        channel = str(data["session_channel"])
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        message = {
            "id": next(ids),
            "session_channel": channel,
            "content": data["content"],
            "sender_id": 0,
            "status": 0,
            "create_at": now,
            "update_at": now,
            "content_type": 1,
            "client_msg_id": data.get("client_msg_id"),
        }
        await sio.emit("message", {"message": message}, room=channel, skip_sid=sid)
        return {"message": message}

    async def serve() -> None:
        app = web.Application()
        sio.attach(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port)
        await site.start()
        port = runner.addresses[0][1]
        print(f"socketio listening on ws://127.0.0.1:{port}/socket.io/", flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())


if __name__ == "__main__":
    main()
