"""Bad frames get a clear error reply and the connection stays up; the WebSocket layer
itself refuses only oversize frames (1009), invalid UTF-8 (1007) and a flood of control
frames beyond the frame budget (1008)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import struct
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.exceptions import ConnectionClosed

from appchat.app.config import Settings
from appchat.app.node import Node
from appchat.store.sqlite import SqliteStore

from .backends import postgres_database
from .support import (
    SECRET,
    Client,
    Clock,
    InProcessServer,
    RawSocket,
    Server,
    ServerProcess,
    client,
    metrics_text,
    module_server,
    staff,
    token,
    wait_until,
)

APP = 3000

# The default frame budget (--rate 50 --burst 100), in a child process: its log is read, and
# a flood sent from this process would take the turns of a server running here.
process = module_server(process=True)


BAD_FRAMES: list[tuple[str, str | None, str]] = [
    ("not json", None, "bad_request"),
    ("[1,2]", None, "bad_request"),
    ('"Event.GetUnreadInfo"', None, "bad_request"),
    ("42", None, "bad_request"),
    ("{}", None, "bad_request"),
    ('{"name": 5}', None, "bad_request"),
    ('{"name": "Event.SendMessage", "args": "{not json"}', "Event.SendMessage", "bad_request"),
    ('{"name": "Event.SendMessage", "args": "[1]"}', "Event.SendMessage", "bad_request"),
    ('{"name": "Event.SendMessage", "args": 7}', "Event.SendMessage", "bad_request"),
    ('{"name": "Event.GetUnreadInfo", "id": true}', None, "bad_request"),
    ('{"name": "Event.GetUnreadInfo", "id": {"a": 1}}', None, "bad_request"),
    ("[" * 5000 + "]" * 5000, None, "bad_request"),
    ('{"name": "Event.Nope"}', "Event.Nope", "unknown_event"),
    ('{"name": "Event.ReceiveMessage"}', "Event.ReceiveMessage", "unknown_event"),
    (
        '{"name": "Event.GetMessageList", "args": {"session_channel": "1", "limit": 1e400}}',
        None,
        "bad_request",
    ),
]


@pytest.mark.parametrize(("frame", "name", "code"), BAD_FRAMES)
async def test_bad_frame_gets_error_and_connection_stays(
    server: Server, frame: str, name: str | None, code: str
) -> None:
    async with staff(server) as s:
        await s.send_raw(frame)
        reply = await s.unmatched()
        assert reply["ok"] is False and reply["result"] is None
        assert reply["name"] == name
        assert reply["error"]["code"] == code and reply["error"]["message"]
        assert (await s.ok("Event.GetUnreadInfo", {}))["total"] >= 0


BAD_ARGS: list[tuple[str, dict[str, Any]]] = [
    ("Event.AddConversation", {}),
    ("Event.AddConversation", {"application_id": "100"}),
    ("Event.AddConversation", {"application_id": 1.0}),
    ("Event.AddConversation", {"application_id": True}),
    ("Event.AddConversation", {"application_id": 2**63}),
    ("Event.AddConversation", {"application_id": -3}),
    ("Event.AddConversation", {"application_id": 10**30}),
    ("Event.GetConversationList", {"all": "yes"}),
    ("Event.GetConversationList", {"user_id": "1"}),
    ("Event.GetMessageList", {}),
    ("Event.GetMessageList", {"session_channel": ["1"]}),
    ("Event.GetMessageList", {"session_channel": "x" * 65}),
    ("Event.GetMessageList", {"session_channel": str(APP), "after_id": -1}),
    ("Event.SendMessage", {"session_channel": str(APP)}),
    ("Event.SendMessage", {"session_channel": str(APP), "content": ""}),
    ("Event.SendMessage", {"session_channel": str(APP), "content": 5}),
    ("Event.SendMessage", {"session_channel": str(APP), "content": "a\u0000b"}),
    ("Event.SendMessage", {"session_channel": str(APP), "content": "é" * 4001}),
    ("Event.SendMessage", {"session_channel": str(APP), "content": "x", "client_msg_id": ""}),
    ("Event.SendMessage", {"session_channel": str(APP), "content": "x", "client_msg_id": 5}),
    ("Event.SendMessage", {"session_channel": str(APP), "content": "x", "sender_id": "1"}),
    ("Event.ReadMessage", {"session_channel": str(APP)}),
    ("Event.ReadMessage", {"session_channel": str(APP), "message_id": "1"}),
    ("Event.GetUnreadInfo", {"user_id": 1.5}),
    ("Event.RefreshToken", {"token": 5}),
]


async def test_bad_arguments_are_bad_request_and_store_nothing(server: Server) -> None:
    async with staff(server) as s:
        await s.ok("Event.AddConversation", {"application_id": APP})
        for name, args in BAD_ARGS:
            assert await s.error(name, args) == "bad_request", (name, args)
        page = await s.ok("Event.GetMessageList", {"session_channel": str(APP)})
        assert page["Messages"] == []
        # 4000 code points is the limit, whatever their UTF-8 size
        await s.ok("Event.SendMessage", {"session_channel": str(APP), "content": "é" * 4000})


async def test_hostile_content_is_stored_verbatim(server: Server) -> None:
    async with staff(server) as s:
        await s.ok("Event.AddConversation", {"application_id": APP + 1})
        texts = [
            "'; DROP TABLE messages; --",
            'Robert"); DELETE FROM conversations WHERE ("1"="1',
            "Привет, мир 👋 — 你好 \u202e",
            "<script>alert(1)</script>",
        ]
        for t in texts:
            await s.ok("Event.SendMessage", {"session_channel": str(APP + 1), "content": t})
        page = await s.ok("Event.GetMessageList", {"session_channel": str(APP + 1)})
        assert [m["content"] for m in page["Messages"]] == texts


async def nul_client_msg_id_is_refused(srv: Server) -> None:
    async with client(srv, 38, token(admin_id=38)) as c:
        await c.ok("Event.AddConversation", {"application_id": 380})
        args = {"session_channel": "380", "content": "hi", "client_msg_id": "a\x00b"}
        assert await c.error("Event.SendMessage", args) == "bad_request"
        page = await c.ok("Event.GetMessageList", {"session_channel": "380"})
        assert page["Messages"] == []  # nothing stored
    assert "Traceback" not in srv.output


async def test_nul_in_client_msg_id_is_bad_request_on_sqlite(process: Server) -> None:
    await nul_client_msg_id_is_refused(process)


async def test_nul_in_client_msg_id_is_bad_request_on_postgres() -> None:
    with postgres_database() as url:
        srv = await asyncio.to_thread(InProcessServer(url, "--rate", "0").start)
        try:
            await nul_client_msg_id_is_refused(srv)
        finally:
            await asyncio.to_thread(srv.stop)


async def test_binary_frame_is_bad_request(server: Server) -> None:
    async with staff(server) as s:
        await s.send_raw(b'{"name": "Event.GetUnreadInfo"}')
        reply = await s.unmatched()
        assert reply["name"] is None and reply["error"]["code"] == "bad_request"
        assert "binary" in reply["error"]["message"]
        await s.ok("Event.GetUnreadInfo", {})


async def closed_with(c: Client) -> int:
    with pytest.raises(ConnectionClosed) as info:
        for _ in range(50):
            await c.ws.send('{"name": "Event.GetUnreadInfo"}')
            await asyncio.sleep(0.1)
    assert info.value.rcvd is not None
    return info.value.rcvd.code


async def test_oversize_frame_closes_1009(server: Server) -> None:
    async with staff(server) as s:
        await s.send_raw("x" * (64 * 1024 + 1))
        assert await closed_with(s) == 1009
    async with staff(server) as s:
        await s.ok("Event.GetUnreadInfo", {})  # the server goes on


async def test_invalid_utf8_closes_1007(server: Server) -> None:
    async with staff(server) as s:
        await s.send_raw(b'{"name": "\xff\xfe"}', text=True)
        assert await closed_with(s) == 1007


async def test_a_ping_flood_is_closed_1008_and_others_are_served(process: Server) -> None:
    async with client(process, 1900, token(admin_id=1900)) as other:
        await other.ok("Event.GetUnreadInfo", {})
        reader, writer = await asyncio.open_connection("127.0.0.1", process.port)
        try:
            writer.write(RawSocket.handshake(1901, token(admin_id=1901)))
            head = await reader.readuntil(b"\r\n\r\n")
            assert b" 101 " in head
            ping = RawSocket.frame(b"p" * 100, opcode=0x9)
            closed = asyncio.Event()

            async def flood() -> int:
                sent = 0
                with contextlib.suppress(ConnectionError):
                    while not closed.is_set():
                        writer.write(ping * 50)
                        sent += 50
                        await writer.drain()
                return sent

            async def close_code() -> int:
                # Read frames until the server's close frame: its code.
                try:
                    while True:
                        b0, b1 = await reader.readexactly(2)
                        n = b1 & 0x7F
                        if n == 126:
                            (n,) = struct.unpack("!H", await reader.readexactly(2))
                        elif n == 127:
                            (n,) = struct.unpack("!Q", await reader.readexactly(8))
                        payload = await reader.readexactly(n)
                        if b0 & 0x0F == 0x8:
                            return int(struct.unpack("!H", payload[:2])[0])
                finally:
                    closed.set()

            flooding = asyncio.create_task(flood())
            code_task = asyncio.create_task(close_code())
            # Another connection is served while the flood lasts: each request answered
            # (within the client's 10 s: a starved connection would wait for good).
            during = 0
            while not code_task.done() and during < 20:
                await other.ok("Event.GetUnreadInfo", {})
                during += 1
            code = await asyncio.wait_for(code_task, 10)
            sent = await asyncio.wait_for(flooding, 10)
            assert code == 1008, code
            assert sent >= 100  # it got past its burst before it was closed
            await other.ok("Event.GetUnreadInfo", {})  # and after it
        finally:
            writer.close()
    flood_counted = 'appchat_disconnects_total{reason="frame flood"} 1.0'
    await asyncio.to_thread(wait_until, lambda: flood_counted in metrics_text(process))


async def test_rate_limited(tmp_path: Path) -> None:
    monotonic = Clock(time.monotonic)  # what the frame budget is paced by
    srv = InProcessServer(tmp_path / "r.db", "--rate", "5", "--burst", "5", monotonic=monotonic)
    srv.start()
    try:
        async with client(srv, 1, token(admin_id=1)) as s:
            for i in range(12):
                await s.send_raw(f'{{"name": "Event.GetUnreadInfo", "id": {i}}}')
            replies = [await s.unmatched() for _ in range(12)]
            limited = [r for r in replies if not r["ok"]]
            assert limited, "some frames are over the rate"
            assert all(r["error"]["code"] == "rate_limited" for r in limited)
            assert all(r["name"] == "Event.GetUnreadInfo" for r in limited)
            assert sorted(r["id"] for r in replies) == list(range(12))
            monotonic.advance(1.2)
            await s.ok("Event.GetUnreadInfo", {})  # the bucket refilled
    finally:
        srv.stop()


async def test_storage_locked_is_unavailable_and_stores_nothing(tmp_path: Path) -> None:
    db = tmp_path / "u.db"
    srv = InProcessServer(db, "--sqlite-busy-timeout", "0.3").start()
    try:
        async with client(srv, 1, token(admin_id=1)) as s:
            await s.ok("Event.AddConversation", {"application_id": 5})
            holder = sqlite3.connect(db, isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock
            try:
                args = {"session_channel": "5", "content": "not acked", "client_msg_id": "k1"}
                reply = await s.call("Event.SendMessage", args)
                assert reply["ok"] is False
                assert reply["error"]["code"] == "unavailable"
            finally:
                holder.execute("ROLLBACK")
                holder.close()
            page = await s.ok("Event.GetMessageList", {"session_channel": "5"})
            assert page["Messages"] == []
            retried = await s.ok("Event.SendMessage", args)
            assert retried["message"]["content"] == "not acked"
    finally:
        srv.stop()


class BrokenStore(SqliteStore):
    async def get_conversation(self, application_id: int) -> Any:
        raise RuntimeError("secret detail: /var/lib/db password=hunter2")


async def test_server_fault_is_internal_and_leaks_nothing(tmp_path: Path) -> None:
    settings = Settings(port=0, database=f"sqlite:///{tmp_path / 'i.db'}", heartbeat=0)
    store = BrokenStore(str(tmp_path / "i.db"))
    node = Node(settings, SECRET.encode(), store=store)
    await node.start()
    srv = ServerProcess(tmp_path / "unused.db")
    srv.port = node.port
    try:
        async with client(srv, 1, token(admin_id=1)) as s:
            reply = await s.call("Event.GetMessageList", {"session_channel": "5"})
            assert reply["error"]["code"] == "internal"
            assert "secret" not in reply["error"]["message"]
            assert "hunter2" not in str(reply)
            await s.ok("Event.GetUnreadInfo", {})
    finally:
        await node.stop()


@pytest.mark.parametrize("compression", [None, "deflate"], ids=["plain", "permessage-deflate"])
async def test_replies_and_pushes_of_every_frame_length_arrive_whole(
    server: Server, compression: str | None
) -> None:
    """Frames are written straight to the socket when nothing is unusual, through aiohttp
    when compression was negotiated: payloads under 126 bytes, with a 16-bit length (one
    write, and header then payload above 16 KiB) and a 64-bit length, each intact and in
    order, for a client that offers no compression and one that does."""
    app = APP + 100 + (compression is None)
    contents = [
        "a",  # a reply and a push of a few hundred bytes: a 16-bit length
        "я" * 2000,  # 4,000 bytes: a 16-bit length, one write
        "\x01" * 4000,  # escaped as \u0001: 24,000 bytes, above 16 KiB
        "😀" * 4000,  # 16,000 bytes
    ]
    async with (
        client(server, 71, token(admin_id=71), compression=compression) as s,
        client(server, 72, token(admin_id=72), compression=compression) as peer,
    ):
        negotiated = [len(c.ws.protocol.extensions) for c in (s, peer)]
        assert negotiated == ([0, 0] if compression is None else [1, 1])
        await s.ok("Event.AddConversation", {"application_id": app})
        await peer.ok("Event.AddConversation", {"application_id": app})
        await s.ok("Event.Typing", {"session_channel": str(app)})
        short = await peer.push("Event.ReceiveTyping")
        assert len(orjson.dumps(short)) < 126, short  # a 7-bit length
        sent = []
        for content in contents * 3:
            result = await s.ok(
                "Event.SendMessage", {"session_channel": str(app), "content": content}
            )
            assert result["message"]["content"] == content
            pushed = await peer.push("Event.ReceiveMessage")
            assert pushed["result"] == result
            sent.append(result["message"])
        # a page of twelve such messages: a reply above 64 KiB (a 64-bit length)
        page = await peer.ok("Event.GetMessageList", {"session_channel": str(app), "limit": 50})
        assert page["Messages"] == sent
        assert len(orjson.dumps(page)) > 65536


def test_a_frame_for_a_connection_before_its_handshake_ended_fails_as_a_broken_socket() -> None:
    """A connection whose handshake has not ended has no socket to write to yet: the frame
    goes to the socket's ``send_frame``, whose RuntimeError marks the connection broken
    (never an AttributeError that would stop a push to everyone else)."""
    from appchat.transport.ws import _Link
    from appchat.transport.wsconn import WebSocket

    loop = asyncio.new_event_loop()
    try:
        link = _Link(None, WebSocket(loop), None)  # type: ignore[arg-type]
        sending = link.send(b'{"name":"Event.ReceiveMessage"}')
        assert sending is not None
        with pytest.raises(RuntimeError):
            sending.send(None)
    finally:
        loop.close()
