"""A WebSocket after its handshake, on a protocol of its own.

aiohttp answers the upgrade; then the socket is taken from it (``take``): its request
handler, the parsed upgrade request, the HTTP parser and the handler's task become garbage,
and an idle connection holds only this object, aiohttp's frame reader and writer, and what
appchat keeps. Frame rules stay aiohttp's (its reader: masking, fragments, UTF-8, close
codes, the size limit, permessage-deflate; its writer: compression), as does the
behaviour its ``WebSocketResponse`` had for us: a CLOSE from the peer is answered, a close
of ours waits for the peer's, a frame the reader refuses closes with its code (1002, 1007,
1009), a peer gone without a close ends with 1006.

The handshake answer and the heartbeat are here too: the heartbeat runs in the endpoint's
once-a-second sweep (``beat``) instead of a timer per connection.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
from collections.abc import Callable
from struct import Struct

from aiohttp import WSCloseCode, WSMessage, WSMsgType, web
from aiohttp._websocket.reader import WebSocketDataQueue
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import DEFAULT_CHUNK_SIZE
from aiohttp.http_websocket import (
    WS_CLOSED_MESSAGE,
    WS_CLOSING_MESSAGE,
    WS_KEY,
    WebSocketError,
    WebSocketReader,
    WebSocketWriter,
    WSMessageTextBytes,
    ws_ext_gen,
    ws_ext_parse,
)
from aiohttp.streams import EofStream

from ..protocol.closecodes import CloseCode

log = logging.getLogger(__name__)

VERSIONS = ("13", "8", "7")
CLOSE_CODE = Struct("!H").pack
PING = bytes((0x80 | WSMsgType.PING, 0))  # FIN, no payload; a server never masks
HEADER_SHORT = Struct("!BB").pack  # FIN + opcode, a payload under 126 bytes
HEADER_MEDIUM = Struct("!BBH").pack  # ... 126, a 16-bit length
HEADER_LONG = Struct("!BBQ").pack  # ... 127, a 64-bit length
ONE_WRITE = 16 * 1024  # a longer payload is written after its header, not copied to it


def frame_header(opcode: int, size: int) -> bytes:
    """The header of one unfragmented frame of ``size`` bytes, unmasked (RFC 6455 5.1: a
    server never masks): a 7-bit, 16-bit or 64-bit length."""
    if size < 126:
        return HEADER_SHORT(0x80 | opcode, size)
    if size < 65536:
        return HEADER_MEDIUM(0x80 | opcode, 126, size)
    return HEADER_LONG(0x80 | opcode, 127, size)


def write_frame(transport: asyncio.Transport, opcode: int, payload: bytes) -> None:
    """One frame; a long payload is written after its header, not copied to it."""
    header = frame_header(opcode, len(payload))
    if len(payload) > ONE_WRITE:
        transport.write(header)
        transport.write(payload)
    else:
        transport.write(header + payload)


def write_frames(transport: asyncio.Transport, opcode: int, payloads: list[bytes]) -> None:
    """Several frames in one write."""
    transport.write(b"".join(part for p in payloads for part in (frame_header(opcode, len(p)), p)))


class Handshake:
    """What the upgrade request asked for, when it is a valid WebSocket upgrade."""

    __slots__ = ("compress", "headers", "notakeover")

    def __init__(self, headers: dict[str, str], compress: int, notakeover: bool) -> None:
        self.headers, self.compress, self.notakeover = headers, compress, notakeover


def handshake(request: web.Request, protocol: str) -> Handshake | None:
    """The 101 answer's headers for ``request`` (RFC 6455 4.2.1; the subprotocol
    ``protocol`` when offered, permessage-deflate when offered), or None when it is not a
    WebSocket upgrade aiohttp would accept."""
    headers = request.headers
    if headers.get("Upgrade", "").lower().strip() != "websocket":
        return None
    if not request._message.upgrade:  # "Connection: upgrade", as aiohttp's parser read it
        return None
    if headers.get("Sec-WebSocket-Version", "") not in VERSIONS:
        return None
    key = headers.get("Sec-WebSocket-Key")
    try:
        if not key or len(base64.b64decode(key)) != 16:
            return None
    except binascii.Error:
        return None
    accept = base64.b64encode(hashlib.sha1(key.encode() + WS_KEY).digest()).decode()
    answer = {"Upgrade": "websocket", "Connection": "upgrade", "Sec-WebSocket-Accept": accept}
    compress, notakeover = ws_ext_parse(headers.get("Sec-WebSocket-Extensions"), isserver=True)
    if compress:
        answer["Sec-WebSocket-Extensions"] = ws_ext_gen(
            compress=compress, isserver=True, server_notakeover=notakeover
        )
    offered = [
        p.strip() for v in headers.getall("Sec-WebSocket-Protocol", []) for p in v.split(",")
    ]
    if protocol in offered:
        answer["Sec-WebSocket-Protocol"] = protocol
    return Handshake(answer, compress, notakeover)


Offer = Callable[[str], bool]
"""Takes a text frame as it is read, or says no (False): then ``receive`` returns it."""


class _Frames(WebSocketDataQueue):
    """aiohttp's queue of frames read, which first offers a text frame to ``offer`` when
    a ``receive`` waits on an empty queue: a frame served without waking the reading
    task. Once a frame is queued, the ones after it are queued too, in order."""

    __slots__ = ("offer", "waiting")

    def __init__(self, protocol: BaseProtocol, limit: int, loop: asyncio.AbstractEventLoop):
        super().__init__(protocol, limit, loop=loop)
        self.offer: Offer | None = None
        self.waiting = False  # a receive() waits on the empty queue

    def feed_data(self, data: WSMessage | WSMessageTextBytes, size: int) -> None:
        offer = self.offer
        if offer is not None and self.waiting and data.type is WSMsgType.TEXT:
            try:
                if offer(data.data):
                    return
            except Exception:  # a bug: the frame goes the usual way, and offers stop
                log.exception("offering a frame failed")
                self.offer = None
        self.waiting = False  # what comes after waits behind this frame
        super().feed_data(data, size)


class WebSocket(BaseProtocol):
    """The transport's protocol once the handshake is answered, and the socket the
    endpoint reads and writes: ``receive``, ``send_frame``, ``pong``, ``close``."""

    __slots__ = (
        "_close_wait",
        "_closing",
        "_exception",
        "_heard",
        "_pinged",
        "_queue",
        "_reader",
        "_sent_close",
        "_silent",
        "_waiting",
        "_writer",
        "close_code",
        "closed",
        "compress",
        "prepared",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._upgraded = True  # BaseProtocol: no HTTP parser to pause
        self._queue: _Frames | None = None
        self._reader: WebSocketReader | None = None
        self._writer: WebSocketWriter | None = None
        self.compress = 0
        self.prepared = False  # taken from aiohttp: frames can be read and written
        self.closed = False  # a close of ours began (or the socket failed)
        self._closing = False  # the peer's CLOSE came
        self.close_code: int | None = None
        self._exception: BaseException | None = None
        self._waiting = False  # a receive() waits for a frame
        self._close_wait: asyncio.Future[None] | None = None
        self._heard = True  # something came since the last beat
        self._silent = 0.0  # seconds of silence counted by the beats
        self._pinged = False
        self._sent_close = False

    # -- taking the socket ---------------------------------------------------------

    def take(self, request: web.Request, shake: Handshake, max_size: int) -> None:
        """Take the socket from aiohttp, whose 101 answer is written: from here every
        byte the client sends comes to this object. Call it in the tick the answer was
        written in (bytes the client sent meanwhile wait in aiohttp's tail, passed on)."""
        handler = request.protocol
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client left during the handshake")
        tail: bytes = handler._message_tail
        handler._message_tail = b""
        self.attach(transport, max_size, shake.compress, shake.notakeover)
        transport.set_protocol(self)
        # aiohttp's side lets go: without the transport (its force_close would close
        # it), its handler forgets the connection and ends once the endpoint returns.
        handler.transport = None
        handler.connection_lost(None)
        self.prepared = True
        if tail:
            self.data_received(tail)
        if (handler._reading_paused or handler._buffer_paused) and not self._reading_paused:
            # aiohttp had paused reading for its tail; unless the tail filled this
            # socket's queue (which then resumes reading once it is drained), read on.
            self._resume_transport_reading()

    def attach(
        self,
        transport: asyncio.Transport | None,
        max_size: int,
        compress: int = 0,
        notakeover: bool = False,
    ) -> None:
        """Frames from here on: aiohttp's reader (frames up to ``max_size`` bytes) into
        this socket's queue, and its writer when compression was agreed."""
        self._queue = _Frames(self, DEFAULT_CHUNK_SIZE, self._loop)
        self._reader = WebSocketReader(
            self._queue, max_size, compress=bool(compress), decode_text=True
        )
        self.compress = compress
        self.transport = transport
        if compress and transport is not None:  # aiohttp's writer keeps the compressor
            self._writer = WebSocketWriter(
                self, transport, compress=compress, notakeover=notakeover
            )

    # -- asyncio.Protocol ----------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._heard = True
        if self._reader is not None:
            self._reader.feed_data(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self._queue is not None:
            self._queue.feed_eof()

    async def _drain_helper(self) -> None:
        """Wait until the transport takes writes again. Unlike BaseProtocol's, a writer
        cancelled while waiting (a backlog abandoned) does not cancel the wait of the
        next one (the close frame's): each waits on the shared future through a shield."""
        if self.transport is None:
            raise ConnectionResetError("Connection lost")
        if not self._paused:
            return
        waiter = self._drain_waiter
        if waiter is None or waiter.done():
            waiter = self._drain_waiter = self._loop.create_future()
        await asyncio.shield(waiter)

    # -- the heartbeat -------------------------------------------------------------

    def beat(self, elapsed: float, heartbeat: float) -> None:
        """Called every ``elapsed`` seconds: after ``heartbeat`` seconds of silence, ping;
        if nothing comes back within half of it, the connection is dead (1006)."""
        if self._heard:
            self._heard, self._silent, self._pinged = False, 0.0, False
            return
        if self.closed or self._closing or not self.prepared:
            return
        self._silent += elapsed
        if self._pinged:
            if self._silent >= heartbeat * 1.5:
                self._dead(TimeoutError(f"no PONG within {heartbeat / 2:g} seconds"))
        elif self._silent >= heartbeat:
            self._pinged = True
            self._silent = heartbeat
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(PING)

    def _dead(self, exc: BaseException) -> None:
        if self.closed:
            return
        self.closed = True
        self._abnormal(exc)
        if self._waiting and not self._closing and self._queue is not None:
            self._queue.feed_data(WSMessage(WSMsgType.ERROR, exc, None), 0)

    # -- the socket ----------------------------------------------------------------

    def offer_to(self, offer: Offer | None) -> None:
        """While a ``receive`` waits with nothing read before it, hand each text frame to
        ``offer`` as it is read; one it declines (False) is returned by ``receive``."""
        if self._queue is not None:
            self._queue.offer = offer

    def exception(self) -> BaseException | None:
        return self._exception

    async def send_frame(self, message: bytes, opcode: WSMsgType) -> None:
        """Write one frame, then wait while the socket's buffer is over its high-water
        mark. Compressed connections write through aiohttp's writer (its compressor)."""
        if not self.prepared:
            raise RuntimeError("the WebSocket is not open yet")
        transport = self.transport
        if transport is None or transport.is_closing() or self._sent_close:
            raise ConnectionResetError("Cannot write to a closing WebSocket")
        if opcode == WSMsgType.CLOSE:
            self._sent_close = True
        if self._writer is not None:
            await self._writer.send_frame(message, opcode)
            return
        write_frame(transport, opcode, message)
        if self._paused:
            await self._drain_helper()

    async def pong(self, message: bytes = b"") -> None:
        await self.send_frame(message, WSMsgType.PONG)

    async def receive(self) -> WSMessage:
        """The next text or binary frame, PING, PONG, CLOSE (answered before it is
        returned), CLOSING (a close of ours began), CLOSED or ERROR."""
        queue = self._queue
        if queue is None:
            raise RuntimeError("the WebSocket is not open yet")
        if self.closed:
            return WS_CLOSED_MESSAGE
        if self._closing:
            return WS_CLOSING_MESSAGE
        try:
            self._waiting = True
            # Frames are offered only while nothing read waits before them: not while a
            # read takes a queued frame (which may parse frames set aside behind it).
            queue.waiting = not queue._buffer
            try:
                msg: WSMessage = await queue.read()  # type: ignore[assignment]
            finally:
                self._waiting = queue.waiting = False
                if self._close_wait is not None and not self._close_wait.done():
                    self._close_wait.set_result(None)
        except EofStream:
            self.close_code = WSCloseCode.OK
            await self.close()
            return WS_CLOSED_MESSAGE
        except WebSocketError as exc:
            self.close_code = exc.code
            await self.close(code=exc.code)
            return WSMessage(WSMsgType.ERROR, exc, None)
        except Exception as exc:  # what the reader or the heartbeat failed with
            self._exception = exc
            self._closing = True
            self.close_code = WSCloseCode.ABNORMAL_CLOSURE
            await self.close()
            return WSMessage(WSMsgType.ERROR, exc, None)
        if msg.type is WSMsgType.CLOSE:
            self._closing = True
            if self.close_code is None:  # the client's close came first (else ours stays)
                self.close_code = msg.data or CloseCode.NO_STATUS
            if not self.closed:
                # The client is about to close the TCP connection: no drain.
                await self.close(drain=False)
        elif msg.type is WSMsgType.CLOSING:
            self._closing = True
            if self.close_code is None:  # (set by the close that began)
                self.close_code = WSCloseCode.OK
        return msg

    async def close(
        self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        """Send a CLOSE with ``code`` and wait for the peer's (the caller bounds the
        wait); whether this call closed it."""
        queue = self._queue
        if queue is None:
            raise RuntimeError("the WebSocket is not open yet")
        if self.closed:
            return False
        self.closed = True
        if self.close_code is None:  # a close of ours: its code is the connection's
            self.close_code = code
        try:
            await self.send_frame(CLOSE_CODE(code) + message, WSMsgType.CLOSE)
            if drain and self.transport is not None and self._paused:
                await self._drain_helper()
        except (asyncio.CancelledError, TimeoutError):
            self._abnormal(None)
            raise
        except Exception as exc:
            return self._abnormal(exc)
        if self._waiting:  # a receive() in another task: let it see CLOSING first
            self._close_wait = self._loop.create_future()
            queue.feed_data(WS_CLOSING_MESSAGE, 0)
            await self._close_wait
        if self._closing:
            self._close_transport(None)
            return True
        try:
            while True:
                msg = await queue.read()
                if msg.type is WSMsgType.CLOSE:  # the answer (the code stays ours)
                    self._close_transport(None)
                    return True
        except asyncio.CancelledError:
            self._abnormal(None)
            raise
        except Exception as exc:
            return self._abnormal(exc)

    def _abnormal(self, exc: BaseException | None) -> bool:
        """The connection failed (``exc``; None: cancelled): closed, 1006, unless a close
        of ours is out already (a client that stopped reading, one cut at shutdown): its
        code stays, the reason the connection ended."""
        if exc is not None:
            self._exception = exc
        ours = self._sent_close and self.close_code is not None
        self._close_transport(None if ours else WSCloseCode.ABNORMAL_CLOSURE)
        return True

    def _close_transport(self, code: int | None) -> None:
        if code is not None:
            self.close_code = code
        if self.transport is not None:
            self.transport.close()
