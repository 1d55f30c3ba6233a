"""The connection core and the hub's routing, without sockets: a fake ``send`` the test
drives (writes at once, blocks until released, or fails) and the in-process broker."""

from __future__ import annotations

import asyncio
import itertools
from functools import partial

import pytest

from appchat.broker.memory import MemoryBroker, MemoryBus
from appchat.fanout.connection import Connection
from appchat.fanout.hub import Hub
from appchat.protocol.errors import Unavailable
from appchat.protocol.events import RESYNC, push
from appchat.protocol.models import Principal, Role

_ids = itertools.count(1)


class FakeSocket:
    """The socket side of a Connection: what it wrote, and a gate the test opens."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.arrived: asyncio.Queue[bytes] = asyncio.Queue()
        self.gate = asyncio.Event()
        self.gate.set()  # open: a write completes at once
        self.fail = False  # a write (or the blocked one, when released) raises
        self.calls = 0
        self.cancelled = asyncio.Event()
        self.batches: list[list[bytes]] = []  # what each send_many wrote

    def block(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    async def send(self, frame: bytes) -> None:
        self.calls += 1
        if self.fail:
            raise ConnectionResetError("reset by peer")
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        if self.fail:
            raise ConnectionResetError("reset by peer")
        self.written.append(frame)
        self.arrived.put_nowait(frame)

    async def next(self) -> bytes:
        return await asyncio.wait_for(self.arrived.get(), 2)

    def send_many(self, frames: list[bytes]) -> bool:
        """Several frames in one write, when the gate is open (else False: nothing written)."""
        if not self.gate.is_set():
            return False
        if self.fail:
            raise ConnectionResetError("reset by peer")
        self.batches.append(list(frames))
        self.written += frames
        return True


class Calls:
    """Records the connections a callback was called with."""

    def __init__(self) -> None:
        self.got: list[Connection] = []

    def __call__(self, conn: Connection) -> None:
        self.got.append(conn)


def staff_principal(sid: int) -> Principal:
    return Principal(sid, Role.STAFF, None, True, 1e12, f"admin:{sid}")


def customer_principal(sid: int, application_id: int) -> Principal:
    return Principal(sid, Role.CUSTOMER, application_id, True, 1e12, f"request:{application_id}")


def connect(
    sock: FakeSocket,
    principal: Principal | None = None,
    *,
    max_queue: int = 4,
    max_bytes: int = 1_000,
    on_overflow: Calls | None = None,
    on_broken: Calls | None = None,
    many: bool = False,
) -> Connection:
    """``many``: the socket can write several frames at once (``send_many``)."""
    return Connection(
        f"c-{next(_ids)}",
        principal or staff_principal(1),
        sock.send,
        max_queue=max_queue,
        max_bytes=max_bytes,
        on_overflow=on_overflow or Calls(),
        on_broken=on_broken,
        send_many=sock.send_many if many else None,
    )


async def settle() -> None:
    """Let every task that can run, run (no time passes)."""
    for _ in range(10):
        await asyncio.sleep(0)


# --- the connection core ---------------------------------------------------------------------


async def test_a_frame_with_nothing_before_it_is_written_at_once() -> None:
    sock = FakeSocket()
    conn = connect(sock)
    conn.push(b"p1")
    conn.reply(b"r1")
    conn.push(b"p2")
    # no await in between: the fast path wrote them in the caller's own step
    assert sock.written == [b"p1", b"r1", b"p2"]
    assert conn.backlog == 0
    assert conn.queued_bytes == 0


async def test_frames_are_written_in_order_through_fast_path_and_backlog() -> None:
    sock = FakeSocket()
    conn = connect(sock, max_queue=10)
    conn.push(b"1")
    sock.block()
    conn.push(b"2")  # the socket's buffer is full: the rest goes to the backlog
    conn.reply(b"3")
    conn.push(b"4")
    assert sock.written == [b"1"]
    assert conn.backlog == 3
    assert conn.queued_bytes == 3
    sock.release()
    await conn.flush(2)
    assert sock.written == [b"1", b"2", b"3", b"4"]
    assert conn.backlog == 0
    assert conn.queued_bytes == 0
    conn.push(b"5")  # the backlog is gone: straight to the socket again
    assert sock.written[-1] == b"5"
    assert conn.backlog == 0


async def test_a_push_beyond_the_frame_bound_overflows_once_and_writes_nothing_more() -> None:
    sock = FakeSocket()
    overflow = Calls()
    conn = connect(sock, max_queue=2, on_overflow=overflow)
    sock.block()
    conn.push(b"a")  # being written
    conn.push(b"b")
    conn.push(b"c")  # two wait: the bound
    assert overflow.got == []
    conn.push(b"d")
    assert overflow.got == [conn]
    assert conn.overflowed
    conn.push(b"e")
    conn.push(b"f")
    assert overflow.got == [conn]
    sock.release()
    await conn.flush(2)
    assert sock.written == [b"a", b"b", b"c"]
    conn.push(b"g")  # even with room again, an overflowed client gets no more pushes
    assert sock.written == [b"a", b"b", b"c"]
    assert overflow.got == [conn]


async def test_a_push_beyond_the_byte_bound_overflows_once() -> None:
    sock = FakeSocket()
    overflow = Calls()
    conn = connect(sock, max_queue=100, max_bytes=10, on_overflow=overflow)
    sock.block()
    conn.push(b"aaaa")
    conn.push(b"bbbb")  # 8 bytes wait
    assert overflow.got == []
    conn.push(b"ccc")  # 11 > 10
    assert overflow.got == [conn]
    conn.push(b"d")
    assert overflow.got == [conn]
    sock.release()
    await conn.flush(2)
    assert sock.written == [b"aaaa", b"bbbb"]


async def test_a_first_frame_larger_than_the_byte_bound_is_still_written() -> None:
    sock = FakeSocket()
    overflow = Calls()
    conn = connect(sock, max_bytes=10, on_overflow=overflow)
    conn.push(b"x" * 50)
    assert sock.written == [b"x" * 50]
    assert overflow.got == []


async def test_replies_never_overflow_and_room_waits_for_the_backlog() -> None:
    sock = FakeSocket()
    overflow = Calls()
    conn = connect(sock, max_queue=2, max_bytes=1_000, on_overflow=overflow)
    await asyncio.wait_for(conn.room(), 1)  # empty: room at once
    sock.block()
    for i in range(6):
        conn.reply(str(i).encode())
    assert overflow.got == []
    assert not conn.overflowed
    assert conn.backlog == 6
    waiting = asyncio.create_task(conn.room())
    await settle()
    assert not waiting.done()
    sock.release()
    await asyncio.wait_for(waiting, 2)
    await conn.flush(2)
    assert sock.written == [str(i).encode() for i in range(6)]
    assert overflow.got == []


async def test_room_waits_for_bytes_too() -> None:
    sock = FakeSocket()
    conn = connect(sock, max_queue=100, max_bytes=10)
    sock.block()
    conn.reply(b"x" * 8)
    conn.reply(b"y" * 8)  # 16 bytes wait: over the bound
    waiting = asyncio.create_task(conn.room())
    await settle()
    assert not waiting.done()
    sock.release()
    await asyncio.wait_for(waiting, 2)
    assert conn.queued_bytes <= 10


async def test_a_failed_write_on_the_fast_path_marks_the_connection_broken() -> None:
    sock = FakeSocket()
    broken, overflow = Calls(), Calls()
    conn = connect(sock, on_broken=broken, on_overflow=overflow)
    sock.fail = True
    conn.push(b"a")
    assert broken.got == [conn]
    assert conn.closed
    conn.push(b"b")
    conn.reply(b"c")
    assert sock.calls == 1  # nothing more was tried
    assert broken.got == [conn]
    assert overflow.got == []
    await asyncio.wait_for(conn.room(), 1)


async def test_close_asks_the_endpoint_unless_the_socket_already_failed() -> None:
    asked: list[tuple[int, str]] = []

    def endpoint_close(code: int, reason: str) -> bool:
        asked.append((code, reason))
        return True

    sock = FakeSocket()
    conn = Connection(
        "c-close",
        staff_principal(1),
        sock.send,
        max_queue=4,
        max_bytes=1_000,
        on_overflow=Calls(),
        on_close=endpoint_close,
    )
    assert conn.close(4009, "bye") is True and asked == [(4009, "bye")]
    sock.fail = True
    conn.push(b"a")  # the socket fails: the connection is broken, nothing left to close
    assert conn.close(4009, "again") is False and asked == [(4009, "bye")]
    assert connect(FakeSocket()).close(4009, "no endpoint said how") is False


async def test_a_failed_write_in_the_backlog_frees_room_and_drops_the_rest() -> None:
    sock = FakeSocket()
    broken = Calls()
    conn = connect(sock, max_queue=2, on_broken=broken)
    sock.block()
    for frame in (b"a", b"b", b"c", b"d"):
        conn.reply(frame)
    waiting = asyncio.create_task(conn.room())
    await settle()
    assert not waiting.done()
    sock.fail = True
    sock.release()
    await asyncio.wait_for(waiting, 2)  # the reader is let go
    await conn.flush(2)
    assert broken.got == [conn]
    assert conn.closed
    assert sock.written == []
    assert sock.calls == 1  # b, c and d were dropped, not tried
    assert conn.backlog == 0
    assert conn.queued_bytes == 0
    conn.reply(b"e")
    assert sock.calls == 1


async def test_abandon_cancels_the_backlog_task() -> None:
    sock = FakeSocket()
    conn = connect(sock, max_queue=1)
    sock.block()
    conn.push(b"a")
    conn.reply(b"b")
    conn.reply(b"c")
    waiting = asyncio.create_task(conn.room())
    await settle()
    assert not waiting.done()
    conn.abandon()
    await asyncio.wait_for(sock.cancelled.wait(), 2)  # the write in progress was cancelled
    await asyncio.wait_for(waiting, 2)
    await settle()
    assert conn.closed
    assert conn.backlog == 0
    sock.release()
    await settle()
    conn.push(b"d")
    assert sock.written == []
    assert sock.calls == 1


async def test_flush_waits_at_most_its_bound() -> None:
    sock = FakeSocket()
    conn = connect(sock)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await conn.flush(5)  # nothing waits: at once
    assert loop.time() - started < 1
    sock.block()
    conn.push(b"a")
    started = loop.time()
    await conn.flush(0.05)
    waited = loop.time() - started
    assert 0.05 <= waited < 1
    assert sock.written == []
    assert conn.backlog == 1  # flush gave up; it did not cancel the write
    sock.release()
    await conn.flush(2)
    assert sock.written == [b"a"]


async def test_frames_pushed_soon_go_out_together_at_the_end_of_the_turn() -> None:
    sock = FakeSocket()
    conn = connect(sock, many=True)
    conn.push_soon(b"s1")
    conn.push_soon(b"s2")
    conn.reply(b"r1")  # what follows a held frame waits with it: the order is kept
    conn.push(b"p1")
    assert sock.written == [] and sock.calls == 0
    assert conn.backlog == 4
    await asyncio.sleep(0)  # the end of this turn of the event loop
    assert sock.batches == [[b"s1", b"s2", b"r1", b"p1"]]
    assert sock.calls == 0  # nothing went one at a time
    assert conn.backlog == 0
    conn.push(b"p2")  # nothing held any more: straight to the socket
    assert sock.written[-1] == b"p2" and sock.calls == 1


async def test_one_frame_held_or_no_joint_write_goes_out_one_at_a_time() -> None:
    sock = FakeSocket()
    alone = connect(sock, many=True)
    alone.push_soon(b"a")
    await asyncio.sleep(0)
    assert sock.written == [b"a"] and sock.batches == []  # one frame: the plain write
    other = FakeSocket()
    plain = connect(other)  # a socket with no joint write
    plain.push_soon(b"b")
    plain.push_soon(b"c")
    plain.push(b"d")
    await asyncio.sleep(0)
    assert other.written == [b"b", b"c", b"d"] and other.calls == 3


async def test_frames_held_when_the_socket_cannot_take_them_at_once_wait_in_order() -> None:
    sock = FakeSocket()
    conn = connect(sock, max_queue=10, many=True)
    conn.push_soon(b"a")
    conn.push_soon(b"b")
    conn.reply(b"c")
    sock.block()  # at the end of the turn the socket's buffer is full
    await asyncio.sleep(0)
    assert sock.batches == [] and sock.written == []
    assert conn.backlog == 3
    sock.release()
    await conn.flush(2)
    assert sock.written == [b"a", b"b", b"c"]
    assert conn.backlog == 0 and conn.queued_bytes == 0


async def test_a_push_soon_behind_a_backlog_waits_in_it_within_its_bounds() -> None:
    sock = FakeSocket()
    overflow = Calls()
    conn = connect(sock, max_queue=2, many=True, on_overflow=overflow)
    sock.block()
    conn.push(b"1")  # being written
    conn.push_soon(b"2")  # a backlog exists: queued behind it at once, nothing held
    conn.push_soon(b"3")
    assert conn.backlog == 3 and overflow.got == []
    conn.push_soon(b"4")  # beyond the frame bound: too slow, as a push would be
    assert overflow.got == [conn]
    sock.release()
    await conn.flush(2)
    assert sock.written == [b"1", b"2", b"3"] and sock.batches == []


async def test_frames_held_are_written_by_flush_and_dropped_by_abandon() -> None:
    sock = FakeSocket()
    conn = connect(sock, many=True)
    conn.push_soon(b"a")
    conn.push_soon(b"b")
    await conn.flush(2)  # a closing connection sends what it holds first
    assert sock.batches == [[b"a", b"b"]]
    gone = connect(sock, many=True)
    gone.push_soon(b"c")
    gone.abandon()
    await asyncio.sleep(0)
    assert sock.written == [b"a", b"b"] and gone.backlog == 0
    gone.push_soon(b"d")  # closed: nothing is held
    assert gone.backlog == 0


@pytest.mark.parametrize("joint", [True, False])
async def test_frames_held_stop_at_the_first_failed_write(joint: bool) -> None:
    """The joint write fails, or (``joint`` False: the socket cannot take them at once)
    the first of the writes one at a time: the connection is broken once, the rest
    dropped, not tried."""
    sock = FakeSocket()
    broken = Calls()
    conn = connect(sock, many=True, on_broken=broken)
    conn.push_soon(b"a")
    conn.push_soon(b"b")
    conn.reply(b"c")
    if not joint:
        sock.block()
    sock.fail = True
    await asyncio.sleep(0)
    assert broken.got == [conn] and conn.closed
    assert sock.calls == (0 if joint else 1)
    assert conn.backlog == 0


# --- the hub's routing -----------------------------------------------------------------------


async def hub_on(
    bus: MemoryBus | None = None, broker: MemoryBroker | None = None, publish_timeout: float = 2.0
) -> Hub:
    hub = Hub(broker or MemoryBroker(bus), publish_timeout=publish_timeout)
    await hub.start()
    return hub


async def join(
    hub: Hub, principal: Principal, closer: Closer | None = None
) -> tuple[Connection, FakeSocket]:
    sock = FakeSocket()
    conn_id = hub.new_connection_id()
    conn = Connection(
        conn_id,
        principal,
        sock.send,
        max_queue=10,
        max_bytes=10_000,
        on_overflow=Calls(),
        on_close=None if closer is None else partial(closer, conn_id),
    )
    await hub.register(conn)
    return conn, sock


async def test_deliver_reaches_local_connections_but_the_origin_and_the_unauthorised() -> None:
    hub = await hub_on()
    origin, origin_sock = await join(hub, staff_principal(1))
    _, same_user_sock = await join(hub, staff_principal(1))
    _, buyer_sock = await join(hub, customer_principal(2, 100))
    _, stranger_sock = await join(hub, customer_principal(3, 200))
    _, bystander_sock = await join(hub, staff_principal(4))
    frame = push("Event.NewMessage", {"x": 1})
    hub.deliver([1, 2, 3], 100, frame, origin.id)
    assert origin_sock.written == []
    assert same_user_sock.written == [frame]
    assert buyer_sock.written == [frame]
    assert stranger_sock.written == []  # may not read application 100
    assert bystander_sock.written == []  # not addressed


async def test_deliver_crosses_nodes_and_a_node_ignores_its_own_publications() -> None:
    bus = MemoryBus()
    a, b = await hub_on(bus), await hub_on(bus)
    origin, origin_sock = await join(a, staff_principal(1))
    _, a_other_sock = await join(a, staff_principal(1))
    _, b_sock = await join(b, staff_principal(1))
    _, b_buyer_sock = await join(b, customer_principal(2, 100))
    _, b_stranger_sock = await join(b, customer_principal(3, 200))
    frame = push("Event.NewMessage", {"x": 2})
    a.deliver([1, 2, 3], 100, frame, origin.id)
    assert a_other_sock.written == [frame]  # locally, at once
    assert await b_sock.next() == frame
    assert await b_buyer_sock.next() == frame
    await a.stop()  # the publisher has finished: every publication has come back
    await settle()
    assert a_other_sock.written == [frame]  # not a second time from the broker
    assert origin_sock.written == []
    assert b_sock.written == [frame]
    assert b_stranger_sock.written == []


class FailingBroker(MemoryBroker):
    """The in-process broker, with publishing that fails while ``failing`` is set."""

    failing = False

    async def publish_many(self, messages: list[tuple[str, bytes]]) -> None:
        if self.failing:
            raise Unavailable("the broker is unreachable")
        await super().publish_many(messages)


async def test_users_whose_push_was_not_published_get_resync_when_the_broker_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = MemoryBus()
    broker = FailingBroker(bus)
    # stop() gives the publisher, retrying Event.Resync while the broker is down, the
    # publish timeout to finish before it cancels it: a short one, the broker stays down.
    a, b = await hub_on(broker=broker, publish_timeout=0.3), await hub_on(bus)
    _, lost_sock = await join(b, staff_principal(5))
    _, later_sock = await join(b, staff_principal(6))
    broker.failing = True
    lost = push("Event.NewMessage", {"x": "lost"})
    a.deliver([5], 100, lost, None)
    await a.stop()
    assert "1 pushes not published" in caplog.text
    assert lost_sock.written == []
    broker.failing = False
    later = push("Event.NewMessage", {"x": "later"})
    a.deliver([6], 100, later, None)
    assert await later_sock.next() == later
    assert await lost_sock.next() == push(RESYNC, None)
    await a.stop()
    await settle()
    assert lost_sock.written == [push(RESYNC, None)]
    assert later_sock.written == [later]


async def test_a_broker_message_that_cannot_be_read_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = MemoryBus()
    b = await hub_on(bus)
    _, sock = await join(b, staff_principal(1))
    await MemoryBroker(bus).publish("appchat:user:1", b"no envelope")
    assert sock.written == []
    assert "malformed broker message" in caplog.text


class Closer:
    """The WebSocket endpoint's part of a disconnect: records what it was asked to close."""

    def __init__(self) -> None:
        self.closed: list[tuple[str, int, str]] = []
        self.arrived: asyncio.Queue[str] = asyncio.Queue()

    def __call__(self, conn_id: str, code: int, reason: str) -> bool:
        self.closed.append((conn_id, code, reason))
        self.arrived.put_nowait(conn_id)
        return True


async def test_disconnect_closes_the_users_connections_on_every_node(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = MemoryBus()
    a, b = await hub_on(bus), await hub_on(bus)
    closers = Closer(), Closer()
    here, _ = await join(a, customer_principal(7, 100), closers[0])
    there, _ = await join(b, customer_principal(7, 100), closers[1])
    other, _ = await join(b, staff_principal(8), closers[1])
    assert await a.disconnect(7, 4009, "disconnected by the server") == 1
    assert closers[0].closed == [(here.id, 4009, "disconnected by the server")]
    assert await asyncio.wait_for(closers[1].arrived.get(), 2) == there.id
    assert closers[1].closed == [(there.id, 4009, "disconnected by the server")]
    assert other.id not in [c for c, _, _ in closers[1].closed]
    # a control message that cannot be read is dropped, like a bad envelope
    await MemoryBroker(bus).publish("appchat:user:7", b"!disconnect\tno-code")
    assert "malformed broker message" in caplog.text
    assert len(closers[1].closed) == 1


async def test_disconnect_reports_a_broker_that_refuses() -> None:
    bus = MemoryBus()
    broker = FailingBroker(bus)
    hub, _other_node = await hub_on(broker=broker), await hub_on(bus)
    closer = Closer()
    conn, _ = await join(hub, staff_principal(9), closer)
    broker.failing = True
    with pytest.raises(Unavailable):
        await hub.disconnect(9, 4009, "disconnected by the server")
    assert closer.closed == [(conn.id, 4009, "disconnected by the server")]  # local: done


async def test_the_hub_lists_its_users_and_reports_first_and_last_connections() -> None:
    """What the away notices keep ``seen`` by: a user's first connection on the node and
    their last one closing are reported, the ones between are not."""
    hub = await hub_on()
    edges: list[int] = []
    hub.on_user_edge = edges.append
    first, _ = await join(hub, customer_principal(7, 100))
    second, _ = await join(hub, customer_principal(7, 100))
    staff_conn, _ = await join(hub, staff_principal(8))
    assert edges == [7, 8]
    assert sorted(hub.connected_user_ids()) == [7, 8]
    await hub.unregister(first)
    assert edges == [7, 8] and sorted(hub.connected_user_ids()) == [7, 8]
    await hub.unregister(second)
    assert edges == [7, 8, 7] and hub.connected_user_ids() == [8]
    await hub.unregister(staff_conn)
    assert edges == [7, 8, 7, 8] and hub.connected_user_ids() == []
