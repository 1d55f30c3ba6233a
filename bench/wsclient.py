"""A lean WebSocket client for load generation: one asyncio protocol, no per-frame task.

A general client (websockets) spends more CPU per frame than the servers measured here,
so a load generator built on it measures itself. This one does only what a benchmark
needs: the opening handshake with subprotocols, text frames out (masked with a zero key,
which RFC 6455 allows: the mask is there, its value is the client's choice), and text
frames in, handed to a callback. It answers pings and nothing else.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import Callable
from urllib.parse import urlsplit

OnText = Callable[[bytes], None]

_ZERO_MASK = b"\x00\x00\x00\x00"


def encode_text(payload: bytes, opcode: int = 0x1) -> bytes:
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + _ZERO_MASK + payload


class LeanClient(asyncio.Protocol):
    def __init__(self, on_text: OnText) -> None:
        self.on_text = on_text
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf = bytearray()
        self._handshaken = False
        self._request = b""

    # --- connection -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.write(self._request)  # type: ignore[attr-defined]  # a stream transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(encode_text(payload))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_text(struct.pack("!H", 1000), opcode=0x8))
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # --- frames -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._handshaken:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buf[:end])
            del self._buf[: end + 4]
            if not head.startswith(b"HTTP/1.1 101"):
                status = head.split(b"\r\n", 1)[0].decode(errors="replace")
                self.opened.set_exception(ConnectionError(f"handshake refused: {status}"))
                assert self.transport is not None
                self.transport.close()
                return
            self._handshaken = True
            self.opened.set_result(None)
        buf = self._buf
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            at = pos + 2
            if n == 126:
                if size - at < 2:
                    break
                (n,) = struct.unpack_from("!H", buf, at)
                at += 2
            elif n == 127:
                if size - at < 8:
                    break
                (n,) = struct.unpack_from("!Q", buf, at)
                at += 8
            if size - at < n:
                break
            payload = bytes(buf[at : at + n])
            pos = at + n
            opcode = b0 & 0x0F
            if opcode == 0x1:
                self.on_text(payload)
            elif opcode == 0x9 and self.transport is not None:
                self.transport.write(encode_text(payload, opcode=0xA))
            elif opcode == 0x8 and self.transport is not None:
                self.transport.close()
        if pos:
            del buf[:pos]


async def connect(
    url: str,
    on_text: OnText,
    *,
    subprotocols: list[str] | None = None,
    local_addr: str | None = None,
    within: float = 30.0,
) -> LeanClient:
    """Open a WebSocket to ``url`` (``ws://`` only); frames go to ``on_text``."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if subprotocols:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(subprotocols))
    loop = asyncio.get_running_loop()
    client = LeanClient(on_text)
    client._request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    await asyncio.wait_for(
        loop.create_connection(
            lambda: client, host, port, local_addr=(local_addr, 0) if local_addr else None
        ),
        within,
    )
    await asyncio.wait_for(client.opened, within)
    return client
