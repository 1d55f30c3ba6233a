"""The WebSocket after its handshake (transport/wsconn.py): the socket is taken from aiohttp,
so an open connection keeps none of aiohttp's HTTP machinery; what the client sent with its
upgrade request is not lost; the heartbeat counts silence in the endpoint's sweep."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import WSMsgType, web_protocol

from appchat.transport.wsconn import WebSocket, write_frames

from .support import InProcessServer, RawSocket, client, closed_lines, eventually, token

HEARTBEAT = 30.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    srv = InProcessServer(tmp_path_factory.mktemp("wsconn") / "w.db").start()
    try:
        yield srv
    finally:
        srv.stop()


def read_frame(raw: RawSocket) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = raw.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    first, second = exactly(2)
    size = second & 0x7F
    if size == 126:
        (size,) = struct.unpack("!H", exactly(2))
    elif size == 127:
        (size,) = struct.unpack("!Q", exactly(8))
    return first & 0x0F, exactly(size)


def request_handlers() -> int:
    gc.collect()
    return sum(isinstance(o, web_protocol.RequestHandler) for o in gc.get_objects())


async def test_an_open_websocket_keeps_no_http_request_handler(server: InProcessServer) -> None:
    """aiohttp's request handler (with the parsed upgrade request and its task) is garbage
    once the socket is taken: five open connections leave none behind, and they work."""
    before = request_handlers()
    async with (
        client(server, 11, token(admin_id=11)) as a,
        client(server, 12, token(admin_id=12)) as b,
        client(server, 13, token(admin_id=13)) as c,
        client(server, 14, token(admin_id=14)) as d,
        client(server, 15, token(admin_id=15)) as e,
    ):
        for each in (a, b, c, d, e):
            await each.ok("Event.GetUnreadInfo", {})
        assert request_handlers() <= before


def test_frames_sent_with_the_upgrade_request_are_served(server: InProcessServer) -> None:
    """A client that writes its first frames right behind the upgrade request, in the same
    packet, before the 101 came back: aiohttp read them with the request; they are served
    in order, none lost."""
    tok = token(admin_id=21)
    frames = b"".join(
        RawSocket.frame(json.dumps({"name": "Event.GetUnreadInfo", "id": f"r{n}"}).encode())
        for n in range(3)
    )
    raw = RawSocket.__new__(RawSocket)  # its frames, on a socket of this test's own
    raw.sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        raw.sock.sendall(RawSocket.handshake(21, tok) + frames)
        head = b""
        while b"\r\n\r\n" not in head:
            head += raw.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        ids = []
        for _ in range(3):
            opcode, payload = read_frame(raw)
            assert opcode == 0x1
            reply = json.loads(payload)
            assert reply["ok"] is True, reply
            ids.append(reply["id"])
        assert ids == ["r0", "r1", "r2"]
    finally:
        raw.sock.close()


def inbox_frame(n: int, size: int) -> bytes:
    """An Event.ConversationUpdated push of exactly ``size`` bytes."""
    head = b'{"name":"Event.ConversationUpdated","ok":true,"result":{"n":%d,"pad":"' % n
    tail = b'"}}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


@pytest.mark.parametrize("compressed", [False, True])
async def test_inbox_pushes_of_one_turn_reach_the_client_in_one_write(
    server: InProcessServer, monkeypatch: pytest.MonkeyPatch, compressed: bool
) -> None:
    """The desk's inbox holds its pushes to a connection until the end of the event loop's
    turn and writes them together (one ``write_frames``): over a real socket each frame
    arrives whole and in order, whatever the size of its header (7-bit, 16-bit and 64-bit
    lengths). With permessage-deflate (browsers offer it) each is compressed on its own,
    as before, in the same order."""
    joint: list[int] = []

    def counted(transport: asyncio.Transport, opcode: int, payloads: list[bytes]) -> None:
        joint.append(len(payloads))
        write_frames(transport, opcode, payloads)

    monkeypatch.setattr("appchat.transport.ws.write_frames", counted)
    frames = [inbox_frame(n, size) for n, size in enumerate([60, 125, 126, 4000, 65535, 70000])]
    node = server.node
    assert node is not None

    async def publish() -> None:  # on the server's loop, in one turn
        for frame in frames:
            node.hub.inbox.publish(frame, None, None)

    options = {} if compressed else {"compression": None}
    async with client(server, 31, token(admin_id=31), **options) as agent:
        await agent.ok("Event.SubscribeInbox", {"filter": "all"})
        server.run(publish())
        got = [await agent.desk_push("Event.ConversationUpdated") for _ in frames]
    assert got == [json.loads(frame) for frame in frames]
    assert joint == ([] if compressed else [len(frames)])


async def test_a_push_during_a_close_of_ours_is_dropped_and_the_close_completes(
    server: InProcessServer,
) -> None:
    """Once a close of ours began nothing more may be sent (RFC 6455 5.5.1): a push that
    comes then (a busy desk's, while the server API's disconnect or an expired token
    closes the connection) is dropped, not counted as a failed write (which cut the
    connection short of its close handshake), and the connection ends in order: the CLOSE
    frame, then the end of the TCP stream."""
    raw = RawSocket(server, 51, token(admin_id=51))
    assert raw.status == 101
    node = server.node
    assert node is not None

    async def close_then_push() -> tuple[bool, bool]:  # on the server's loop
        (conn, session) = next((c, s) for c, s in node.ws._live.items() if c.principal.sid == 51)
        closing = asyncio.ensure_future(session.ws.close(code=4000, message=b"closed by the test"))
        # The close's first step (scheduled before this one's) writes the CLOSE frame; the
        # session learns of it a turn later, so the connection is still its own here.
        await asyncio.sleep(0)
        assert session.ws.closed and not closing.done() and node.ws._live.get(conn) is session
        conn.push(b'{"name":"Event.ReceivePresence","ok":true,"result":null}')
        pushed = conn.closed  # (closed: a write failed)
        conn.push_soon(b'{"name":"Event.ConversationUpdated","ok":true,"result":null}')
        conn.push_soon(b'{"name":"Event.ConversationUpdated","ok":true,"result":null}')
        await conn.flush(1)  # what is held goes now (in one write, were it open)
        released = conn.closed
        await closing
        return pushed, released

    assert server.run(close_then_push()) == (False, False)
    opcode, payload = read_frame(raw)
    assert (opcode, payload) == (0x8, struct.pack("!H", 4000) + b"closed by the test")
    assert raw.sock.recv(65536) == b""  # the end, not a reset (ConnectionResetError)
    raw.sock.close()


async def test_a_client_close_without_a_code_is_logged_1005(
    server: InProcessServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A client's CLOSE frame may carry no status code (RFC 6455 7.1.5: the connection's
    close code is then 1005); the connection log said "code 0"."""
    caplog.set_level(logging.INFO, "appchat.connections")
    raw = RawSocket(server, 52, token(admin_id=52))
    assert raw.status == 101
    raw.sock.sendall(RawSocket.frame(b"", opcode=0x8))
    opcode, payload = read_frame(raw)  # the server's answer
    assert opcode == 0x8, payload
    raw.sock.close()
    await eventually(lambda: len(closed_lines(caplog, 52)) == 1, what="the end logged")
    assert ", code 1005 (no status code) after " in closed_lines(caplog, 52)[0]


def text(payload: str) -> bytes:
    return RawSocket.frame(payload.encode())


async def test_text_frames_are_offered_in_order_and_the_rest_is_received() -> None:
    """While a receive waits on an empty queue, text frames go to the offer as they are
    read (in order); a ping read with them still comes out of receive."""
    ws = WebSocket(asyncio.get_running_loop())
    ws.attach(None, 64 * 1024)
    offered: list[str] = []

    def offer(frame: str) -> bool:
        offered.append(frame)
        return True

    ws.offer_to(offer)
    receiving = ws.receive()
    receiving.send(None)  # runs up to its wait for a frame (on the queue's future)
    ws.data_received(text("a") + text("b") + RawSocket.frame(b"p", opcode=0x9) + text("c"))
    with pytest.raises(StopIteration) as done:  # the ping ended the wait
        receiving.send(None)
    msg = done.value.value
    assert offered == ["a", "b"]
    assert msg.type is WSMsgType.PING
    assert (await asyncio.wait_for(ws.receive(), 5)).data == "c"  # queued behind the ping


async def test_frames_set_aside_by_a_full_queue_keep_their_order() -> None:
    """aiohttp's queue sets frames aside (unparsed) once it holds 512 KiB and parses them
    while a receive takes a queued frame: they are not offered ahead of that frame."""
    ws = WebSocket(asyncio.get_running_loop())
    ws.attach(None, 1024 * 1024)
    order: list[str] = []

    def offer(frame: str) -> bool:
        order.append(frame[0])
        return True

    ws.offer_to(offer)
    big = [letter * 300_000 for letter in "ABC"]
    ws.data_received(b"".join(text(f) for f in [*big, "d", "e"]))  # nobody receiving yet
    while len(order) < 5:
        msg = await asyncio.wait_for(ws.receive(), 5)
        order.append(msg.data[0])
    assert order == ["A", "B", "C", "d", "e"]


def test_the_heartbeat_pings_after_silence_and_ends_a_silent_peer() -> None:
    """Beats of 1 s with a 30 s heartbeat: a ping after 30 s of silence, the connection
    dead (1006) when nothing came 15 s after it; anything heard starts the count again."""
    loop = asyncio.new_event_loop()
    try:
        ws = WebSocket(loop)
        ws.prepared = True  # no transport: nothing is written, the counting is what is tested
        ws.beat(1.0, HEARTBEAT)  # heard at the start (the handshake)
        for _ in range(29):
            ws.beat(1.0, HEARTBEAT)
        assert not ws._pinged
        ws.beat(1.0, HEARTBEAT)
        assert ws._pinged and not ws.closed
        ws.data_received(b"")  # the pong (or any frame)
        ws.beat(1.0, HEARTBEAT)
        assert not ws._pinged and not ws.closed
        for _ in range(30):
            ws.beat(1.0, HEARTBEAT)
        assert ws._pinged
        for _ in range(14):
            ws.beat(1.0, HEARTBEAT)
        assert not ws.closed
        ws.beat(1.0, HEARTBEAT)
        assert ws.closed and ws.close_code == 1006
        assert isinstance(ws.exception(), TimeoutError)
    finally:
        loop.close()


def test_aiohttp_still_has_what_taking_the_socket_relies_on() -> None:
    """The private parts of aiohttp that ``WebSocket.take`` uses (pyproject pins aiohttp
    below the next minor release; raise the pin only with this test passing)."""
    handler = web_protocol.RequestHandler
    for name in ("_message_tail", "_reading_paused", "_buffer_paused", "transport"):
        assert any(name in getattr(k, "__slots__", ()) for k in handler.__mro__), name
    assert callable(handler.connection_lost) and callable(handler.force_close)
    from aiohttp._websocket.reader import WebSocketDataQueue
    from aiohttp.base_protocol import BaseProtocol
    from aiohttp.http_parser import RawRequestMessage
    from aiohttp.test_utils import make_mocked_request

    assert hasattr(RawRequestMessage, "upgrade")
    request = make_mocked_request("GET", "/ws", headers={"Upgrade": "websocket"})
    assert isinstance(request._message.upgrade, bool)
    assert "_buffer" in dir(WebSocketDataQueue)  # the offer's queue reads whether it is empty
    for name in ("_paused", "_drain_waiter", "_upgraded"):
        assert name in BaseProtocol.__slots__, name


async def test_a_stop_ends_a_socket_whose_client_reads_nothing(tmp_path: Path) -> None:
    """aiohttp no longer knows the taken sockets, so its own shutdown would not end them:
    the node's does, even for a client that reads nothing (its close frame never gets
    through, and the socket is cut). The client sees its connection end."""
    from .test_hardening import events_served, store_messages

    srv = InProcessServer(tmp_path / "s.db", "--rate", "0", "--send-buffer", "262144").start()
    stopped = False
    try:
        await store_messages(srv, 5, 60)
        raw = RawSocket(srv, 2, token(admin_id=2))  # a 4 KiB receive buffer, never read
        assert raw.status == 101
        request = RawSocket.frame(
            b'{"name":"Event.GetMessageList","args":"{\\"session_channel\\":\\"5\\",\\"limit\\":60}"}'
        )
        raw.sock.sendall(request * 200)  # about 47 MB of replies, if all were written
        await eventually(
            lambda: events_served(srv, "Event.GetMessageList") >= 3,
            timeout=10,
            interval=0.1,
            what="big replies written towards the client",
        )
        await asyncio.to_thread(srv.stop)
        stopped = True
        raw.sock.settimeout(10)
        ended = False
        try:
            while raw.sock.recv(65536):  # what was written before the end, then EOF
                pass
            ended = True
        except ConnectionResetError:  # or the cut
            ended = True
        assert ended
    finally:
        if not stopped:
            srv.stop()
