"""One WebSocket as the hub sees it: who it is, and its bounded write path.

A frame is written straight to the socket when nothing waits before it; otherwise it waits
in a queue drained by a task that exists only while there is a backlog. A push that does
not fit marks the client as too slow; a reply always fits, because the reader takes no new
request while there is no room. A push may also wait for the end of the event loop's turn
(``push_soon``, the inbox's), so that what a connection gets within a turn goes out in one
write. The endpoint that made the connection says how to close it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Generator
from typing import Any

from ..protocol.models import Principal

Send = Callable[[bytes], Coroutine[Any, Any, None] | None]
"""Writes one text frame: None when it was written at once, else a coroutine that writes it
(and returns at once unless the socket's buffer is full)."""

SendMany = Callable[[list[bytes]], bool]
"""Writes several text frames in one write if it can at once (nothing unusual: the socket's
buffer empty, no compression); False when it wrote nothing."""


class Connection:
    """One WebSocket as the hub sees it: who it is, and the frames not yet written.

    A frame is written straight to the socket when nothing waits before it; otherwise it
    waits in a queue drained by a task that exists only while there is a backlog. What
    waits is bounded in frames and in bytes. A push that does not fit marks the client as
    too slow (it is then disconnected); a reply always fits, because the reader takes no
    new request while there is no room (``room()``).
    """

    __slots__ = (
        "_closed",
        "_drainer",
        "_held",
        "_max_bytes",
        "_max_queue",
        "_on_broken",
        "_on_close",
        "_on_overflow",
        "_principal",
        "_queue",
        "_room",
        "_send",
        "_send_many",
        "id",
        "overflowed",
        "queued_bytes",
    )

    def __init__(
        self,
        conn_id: str,
        principal: Principal,
        send: Send,
        *,
        max_queue: int,
        max_bytes: int,
        on_overflow: Callable[[Connection], None],
        on_broken: Callable[[Connection], None] | None = None,
        on_close: Callable[[int, str], bool] | None = None,
        send_many: SendMany | None = None,
    ) -> None:
        self.id = conn_id
        self._principal = principal
        self._send = send
        self._send_many = send_many
        self._held: list[bytes] | None = None  # this turn's frames, written at its end
        self._queue: list[bytes] = []  # short, and an empty list is small (idle connections)
        self.queued_bytes = 0
        self._max_queue = max_queue
        self._max_bytes = max_bytes
        self._room: asyncio.Event | None = None  # made when a reader has to wait for room
        self._drainer: asyncio.Task[None] | None = None
        self._on_overflow = on_overflow
        self._on_broken = on_broken
        self._on_close = on_close
        self.overflowed = False
        self._closed = False  # the socket failed: nothing more is written

    @property
    def principal(self) -> Principal:
        return self._principal

    @principal.setter
    def principal(self, value: Principal) -> None:
        self._principal = value

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def full(self) -> bool:
        """No room for a reply: the reader must wait (``room()``) before reading more."""
        return not self._closed and (
            self.queued_bytes > self._max_bytes or len(self._queue) >= self._max_queue
        )

    @property
    def backlog(self) -> int:
        """Frames waiting to be written (the one being written and those held for the end
        of the turn included)."""
        held = 0 if self._held is None else len(self._held)
        return len(self._queue) + (self._drainer is not None) + held

    def push(self, frame: bytes) -> None:
        """Send a push; a client too slow to take its pushes is disconnected."""
        if self.overflowed or self._closed:
            return
        if (self._queue or self._drainer is not None) and (
            len(self._queue) >= self._max_queue or self.queued_bytes + len(frame) > self._max_bytes
        ):
            self.overflowed = True
            self._on_overflow(self)
            return
        self._write(frame)

    def push_soon(self, frame: bytes) -> None:
        """A push that may wait until the end of this turn of the event loop: what the
        connection gets meanwhile (pushes and replies alike, in order) joins it, and all of
        it goes out in one write. For the desk's inbox, where a batch of messages committed
        together makes an Event.ConversationUpdated each for every subscriber."""
        if self.overflowed or self._closed:
            return
        if self._held is not None:
            self._held.append(frame)
        elif self._queue or self._drainer is not None:
            self.push(frame)  # a backlog: it waits behind it, within the limits
        else:
            self._held = [frame]
            asyncio.get_running_loop().call_soon(self._release)

    def _release(self) -> None:
        held, self._held = self._held, None
        if not held or self._closed:
            return
        if len(held) > 1 and self._send_many is not None:
            try:
                if self._send_many(held):
                    return
            except (ConnectionError, RuntimeError):
                self._broken()
                return
        for frame in held:  # one at a time, a backlog queued as any write's
            if self._closed:  # a write failed: the rest is dropped
                return
            self._write(frame)

    def reply(self, frame: bytes) -> None:
        """Send the reply to a request (the reader waited for room before reading it)."""
        if not self._closed:
            self._write(frame)

    def _write(self, frame: bytes) -> None:
        if self._held is not None:  # after frames held for the end of the turn
            self._held.append(frame)
            return
        if self._queue or self._drainer is not None:
            self._enqueue(frame)
            return
        try:
            coro = self._send(frame)
            if coro is None:
                return  # written at once: the common case
            waiting = coro.send(None)
        except StopIteration:
            return  # written by the coroutine without waiting
        except (ConnectionError, RuntimeError):
            self._broken()
            return
        # The socket's buffer is full: the rest of this write runs in a task, and what
        # comes after waits behind it in the queue.
        self.queued_bytes += len(frame)
        self._drainer = asyncio.get_running_loop().create_task(
            self._drain(_resume(coro, waiting), len(frame))
        )
        self._full()

    def _enqueue(self, frame: bytes) -> None:
        self._queue.append(frame)
        self.queued_bytes += len(frame)
        self._full()

    def _full(self) -> None:
        if self.queued_bytes > self._max_bytes or len(self._queue) >= self._max_queue:
            if self._room is None:
                self._room = asyncio.Event()
            self._room.clear()

    async def _drain(self, first: Coroutine[Any, Any, None], size: int) -> None:
        try:
            try:
                await first
            finally:
                self.queued_bytes -= size
            while self._queue:
                frame = self._queue.pop(0)
                try:
                    if (sending := self._send(frame)) is not None:
                        await sending
                finally:
                    self.queued_bytes -= len(frame)
                    self._has_room()
        except (ConnectionError, RuntimeError):
            self._broken()
        finally:
            self._drainer = None
            self._has_room()

    def _has_room(self) -> None:
        if (
            self._room is not None
            and self.queued_bytes <= self._max_bytes
            and len(self._queue) < self._max_queue
        ):
            self._room.set()

    def _broken(self) -> None:
        """The socket refused a write: drop what waits and let the reader go."""
        self._closed = True
        self._held = None
        self._queue.clear()
        self.queued_bytes = 0
        if self._room is not None:
            self._room.set()
        if self._on_broken is not None:
            self._on_broken(self)

    async def room(self) -> None:
        """Wait until the buffer has room (or the socket failed)."""
        while not self._closed and (
            self.queued_bytes > self._max_bytes or len(self._queue) >= self._max_queue
        ):
            if self._room is None:
                self._room = asyncio.Event()
            self._room.clear()
            await self._room.wait()

    async def flush(self, within: float) -> None:
        """Wait (at most ``within`` seconds) until everything queued reached the socket."""
        self._release()
        drainer = self._drainer
        if drainer is not None:
            await asyncio.wait([drainer], timeout=within)

    def close(self, code: int, reason: str) -> bool:
        """Close the connection with a close code (the server API's disconnect), through
        what its endpoint gave as ``on_close``; whether it was open to close."""
        if self._closed or self._on_close is None:
            return False
        return self._on_close(code, reason)

    def abandon(self) -> None:
        """Stop writing: cancel the backlog's task (the connection is going away)."""
        self._closed = True
        self._held = None
        self._queue.clear()
        if self._drainer is not None:
            self._drainer.cancel()
        if self._room is not None:
            self._room.set()


async def _resume(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    """Finish a coroutine that was started by hand and is suspended on ``waiting``."""
    while True:
        try:
            await _Yield(waiting)
        except BaseException as exc:  # cancelled, or the awaited future failed
            try:
                waiting = coro.throw(exc)
            except StopIteration:
                return
            continue
        try:
            waiting = coro.send(None)
        except StopIteration:
            return


class _Yield:
    """Await what a hand-driven coroutine yielded, as a Task would have."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, None, None]:
        yield self.value
