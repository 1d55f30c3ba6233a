"""Presence across nodes (``fanout/presence.py``): nodes on one in-process bus (the memory
broker), a tap that records what crosses it, clocks the test moves on (no sleeps), and
the same over a real Redis."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import orjson
import pytest

from appchat.broker import Broker
from appchat.broker.memory import MemoryBroker, MemoryBus
from appchat.broker.redis import RedisBroker
from appchat.fanout.presence import Presence

from .backends import REDIS_URL, free_port, require, unique_prefix
from .support import Clock, eventually

GRACE = 30.0
HEARTBEAT = 100.0  # no heartbeat falls due unless a test moves a clock that far
START = 1000.0


def frozen() -> Clock:
    """A clock that stands still until the test moves it."""
    return Clock(lambda: START)


class Tap:
    """Every message of the presence channel, as one more node's broker receives it."""

    def __init__(self, broker: Broker, channel: str) -> None:
        self.broker = broker
        self.channel = channel
        self.seen: list[bytes] = []

    async def start(self) -> None:
        await self.broker.start(self._got)
        await self.broker.subscribe(self.channel)

    def _got(self, channel: str, data: bytes) -> None:
        if channel == self.channel:
            self.seen.append(data)

    def mark(self) -> int:
        return len(self.seen)

    def sent(self, node: str, kind: str, since: int = 0) -> list[bytes]:
        head = f"P1\t{node}\t{kind}\n".encode()
        return [m for m in self.seen[since:] if m.startswith(head)]

    async def next(self, node: str, kind: str, since: int) -> bytes:
        await eventually(lambda: bool(self.sent(node, kind, since)), timeout=5, what=kind)
        return self.sent(node, kind, since)[0]


def route(presence: Presence) -> Callable[[str, bytes], None]:
    """The broker handler a node gives its broker: presence messages to ``presence``."""

    def handler(channel: str, data: bytes) -> None:
        if channel == presence.channel:
            presence.handle(data)

    return handler


class Cluster:
    """Nodes of one bus, each with what its ``on_change`` reported."""

    def __init__(self, stack: AsyncExitStack) -> None:
        self.stack = stack
        self.bus = MemoryBus()
        self.clock = frozen()
        self.changes: dict[str, list[tuple[int, str]]] = {}
        self.tap = Tap(MemoryBroker(self.bus), "appchat:presence")

    async def node(
        self,
        name: str,
        *,
        clock: Clock | None = None,
        grace: float = GRACE,
        heartbeat: float = HEARTBEAT,
    ) -> Presence:
        broker = MemoryBroker(self.bus)
        presence = Presence(
            broker, name, grace=grace, heartbeat=heartbeat, clock=clock or self.clock
        )
        changes = self.changes[name] = []
        presence.on_change = lambda user_id, availability: changes.append((user_id, availability))
        await broker.start(route(presence))
        self.stack.push_async_callback(broker.close)
        await presence.start()
        self.stack.push_async_callback(presence.stop)
        return presence


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with AsyncExitStack() as stack:
        c = Cluster(stack)
        await c.tap.start()
        stack.push_async_callback(c.tap.broker.close)
        yield c


async def sees(presence: Presence, user_id: int, availability: str) -> None:
    await eventually(
        lambda: presence.availability(user_id) == availability,
        timeout=5,
        what=f"{presence.node_id} sees {user_id} {availability}",
    )


def tick(*nodes: Presence) -> None:
    for node in nodes:
        node.tick()


async def test_a_connection_on_one_node_is_seen_on_the_other(cluster: Cluster) -> None:
    a, b = await cluster.node("a"), await cluster.node("b")
    a.connected(1, staff=True, name="Anna")
    await sees(b, 1, "online")
    assert (b.is_staff(1), b.name(1)) == (True, "Anna")
    assert cluster.changes == {"a": [(1, "online")], "b": [(1, "online")]}
    assert (b.availability(2), b.is_staff(2), b.name(2)) == ("offline", None, None)
    a.connected(2, staff=False)  # a customer: known, never reported
    await sees(b, 2, "online")
    assert b.is_staff(2) is False
    assert cluster.changes["b"] == [(1, "online")]


async def test_online_while_a_connection_is_left_anywhere_then_offline_after_the_grace(
    cluster: Cluster,
) -> None:
    a, b = await cluster.node("a"), await cluster.node("b")
    a.connected(1, staff=True)
    b.connected(1, staff=True)
    mark = cluster.tap.mark()
    a.disconnected(1, staff=True)
    await cluster.tap.next("a", "delta", mark)
    cluster.clock.advance(GRACE + 1)
    tick(a, b)
    assert (a.availability(1), b.availability(1)) == ("online", "online")

    mark = cluster.tap.mark()
    b.disconnected(1, staff=True)
    await cluster.tap.next("b", "delta", mark)
    cluster.clock.advance(GRACE - 0.1)
    tick(a, b)
    assert (a.availability(1), b.availability(1)) == ("online", "online")
    assert [(u, n) for u, n, _ in a.staff()] == [(1, "online")]
    cluster.clock.advance(0.1)
    assert a.availability(1) == "offline"  # by the clock, before the tick
    tick(a, b)
    tick(a, b)
    assert cluster.changes == {n: [(1, "online"), (1, "offline")] for n in "ab"}
    assert (a.is_staff(1), b.is_staff(1), a.staff()) == (None, None, [])


async def test_a_connection_back_within_the_grace_changes_nothing(cluster: Cluster) -> None:
    a, b = await cluster.node("a"), await cluster.node("b")
    a.connected(1, staff=True, name="Anna")
    await sees(b, 1, "online")
    a.disconnected(1, staff=True)
    cluster.clock.advance(GRACE - 1)
    mark = cluster.tap.mark()
    b.connected(1, staff=True)  # reconnected to the other node
    await cluster.tap.next("b", "delta", mark)
    cluster.clock.advance(2)
    tick(a, b)
    assert (a.availability(1), b.availability(1), b.name(1)) == ("online", "online", "Anna")
    assert cluster.changes == {n: [(1, "online")] for n in "ab"}


@pytest.mark.parametrize(
    ("grace", "heartbeat"),
    [(30.0, 5.0), (5.0, 20.0)],
    ids=["grace-longer-than-silence", "silence-longer-than-grace"],
)
async def test_the_users_of_a_node_that_falls_silent_go_offline(
    cluster: Cluster, grace: float, heartbeat: float
) -> None:
    """A node heard last at t is dead at t + 3 heartbeats; its users left at t, so they
    are offline at t + max(3 heartbeats, grace). Its clock stands still: it sends no more."""
    clock_a = frozen()
    a = await cluster.node("a", clock=clock_a, grace=grace, heartbeat=heartbeat)
    b = await cluster.node("b", grace=grace, heartbeat=heartbeat)
    a.connected(1, staff=True)
    await sees(b, 1, "online")
    offline_at = max(3 * heartbeat, grace)
    cluster.clock.advance(offline_at - 0.1)
    b.tick()
    assert b.availability(1) == "online"
    cluster.clock.advance(0.1)
    b.tick()
    assert b.availability(1) == "offline"
    assert cluster.changes["b"] == [(1, "online"), (1, "offline")]

    clock_a.advance(heartbeat)
    a.tick()  # it speaks again (a heartbeat): its users are back
    await sees(b, 1, "online")


async def test_a_node_that_stops_says_so_and_its_users_get_the_grace(cluster: Cluster) -> None:
    a, b = await cluster.node("a"), await cluster.node("b")
    a.connected(1, staff=True)
    await sees(b, 1, "online")
    cluster.clock.advance(60)  # a's users left when it stopped, not when last heard
    await a.stop()
    assert cluster.tap.sent("a", "leave")
    cluster.clock.advance(GRACE - 0.1)
    b.tick()
    assert b.availability(1) == "online"
    cluster.clock.advance(0.1)
    b.tick()
    assert cluster.changes["b"] == [(1, "online"), (1, "offline")]


async def test_availability_is_shown_everywhere_and_the_last_writer_wins(
    cluster: Cluster,
) -> None:
    a, b = await cluster.node("a"), await cluster.node("b")
    a.connected(1, staff=True)
    b.connected(1, staff=True)
    a.set_availability(1, "busy")
    await sees(b, 1, "busy")
    assert a.availability(1) == "busy"

    mark = cluster.tap.mark()
    a.set_availability(1, "offline")  # at the same time: neither has seen the other's
    b.set_availability(1, "online")
    await cluster.tap.next("a", "delta", mark)
    await cluster.tap.next("b", "delta", mark)
    # same Lamport stamp: the higher node id wins, on both
    assert (a.availability(1), b.availability(1)) == ("online", "online")

    a.set_availability(1, "offline")  # later than everything a has seen: it wins
    await sees(b, 1, "offline")
    assert a.availability(1) == "offline"
    assert cluster.changes["b"] == [(1, "online"), (1, "busy"), (1, "online"), (1, "offline")]
    assert not b.staff_available()

    with pytest.raises(ValueError):
        a.set_availability(1, "away")
    a.set_availability(7, "busy")  # nobody knows 7: nothing to show it on
    assert a.availability(7) == "offline"


async def test_a_choice_lasts_while_the_user_is_there_and_is_forgotten_after(
    cluster: Cluster,
) -> None:
    a, b = await cluster.node("a"), await cluster.node("b")
    a.connected(1, staff=True)
    a.set_availability(1, "busy")
    await sees(b, 1, "busy")
    mark = cluster.tap.mark()
    a.disconnected(1, staff=True)
    await cluster.tap.next("a", "delta", mark)
    cluster.clock.advance(GRACE - 1)
    b.connected(1, staff=True)
    assert b.availability(1) == "busy"
    mark = cluster.tap.mark()
    b.disconnected(1, staff=True)
    await cluster.tap.next("b", "delta", mark)
    cluster.clock.advance(GRACE)
    tick(a, b)
    assert b.availability(1) == "offline"
    b.connected(1, staff=True)
    assert b.availability(1) == "online"
    await sees(a, 1, "online")


async def test_a_node_that_starts_later_learns_what_the_others_know_at_once(
    cluster: Cluster,
) -> None:
    a = await cluster.node("a")
    a.connected(1, staff=True, name="Anna")
    a.connected(2, staff=False, name="Bob")
    mark = cluster.tap.mark()
    a.set_availability(1, "busy")
    await cluster.tap.next("a", "delta", mark)  # published before c listens
    c = await cluster.node("c")  # a answers its first snapshot with its own
    await sees(c, 1, "busy")
    assert (c.name(1), c.is_staff(1), c.is_staff(2), c.availability(2)) == (
        "Anna",
        True,
        False,
        "online",
    )
    assert c.staff() == [(1, "busy", "Anna")]


async def test_the_heartbeat_snapshot_repairs_a_view_that_missed_messages(
    cluster: Cluster,
) -> None:
    """``lone`` hears nothing but what the test hands it: two of a's heartbeats."""
    a = await cluster.node("a")
    lone = Presence(MemoryBroker(), "lone", grace=GRACE, heartbeat=HEARTBEAT, clock=cluster.clock)
    a.connected(1, staff=True, name="Anna")
    a.set_availability(1, "busy")

    mark = cluster.tap.mark()
    cluster.clock.advance(HEARTBEAT)
    a.tick()
    lone.handle(await cluster.tap.next("a", "snap", mark))
    assert (lone.availability(1), lone.name(1)) == ("busy", "Anna")

    a.disconnected(1, staff=True)  # its delta does not reach lone
    mark = cluster.tap.mark()
    cluster.clock.advance(HEARTBEAT)
    a.tick()
    lone.handle(await cluster.tap.next("a", "snap", mark))
    assert lone.availability(1) == "busy"  # gone from the snapshot: gone now, grace applies
    cluster.clock.advance(GRACE)
    lone.tick()
    assert lone.availability(1) == "offline"


async def test_a_node_ignores_its_own_messages(cluster: Cluster) -> None:
    """Were a's snapshot taken for another node's, user 1 would stay on that node."""
    a = await cluster.node("a", grace=5.0)
    mark = cluster.tap.mark()
    a.connected(1, staff=True)
    own = await cluster.tap.next("a", "delta", mark)
    mark = cluster.tap.mark()
    a.disconnected(1, staff=True)
    await cluster.tap.next("a", "delta", mark)
    a.handle(own)
    cluster.clock.advance(5.0)
    a.tick()
    assert a.availability(1) == "offline"
    assert cluster.changes["a"] == [(1, "online"), (1, "offline")]


def message(kind: str, body: object, node: str = "x") -> bytes:
    return f"P1\t{node}\t{kind}\n".encode() + orjson.dumps(body)


GOOD_ENTRY = [1, True, ["Anna", 1, "x"], ["busy", 2, "x"]]
MALFORMED = [
    b"",
    b"garbage",
    b"P1\tx\tsnap",
    b"P1\tx\tsnap\n{not json",
    b"P1\tx\tsnap\n\xff",
    b"P1\t\xff\tsnap\n{}",
    b"P1\t\tsnap\n{}",
    b"P1\tx\ty\tsnap\n{}",
    message("snap", []),
    message("snap", {}),
    message("snap", {"users": {}}),
    message("snap", {"users": [GOOD_ENTRY, [2, "yes", None, None]]}),  # all or nothing
    message("snap", {"users": [GOOD_ENTRY, ["2", True, None, None]]}),
    message("snap", {"users": [GOOD_ENTRY, [True, True, None, None]]}),
    message("snap", {"users": [GOOD_ENTRY, [2, True, None]]}),
    message("snap", {"users": [GOOD_ENTRY, [2, True, None, ["away", 1, "x"]]]}),
    message("snap", {"users": [GOOD_ENTRY, [2, True, ["B", -1, "x"], None]]}),
    message("snap", {"users": [GOOD_ENTRY, [2, True, ["B", 1, ""], None]]}),
    message("snap", {"users": [GOOD_ENTRY, [2, True, [3, 1, "x"], None]]}),
    message("delta", {"up": [GOOD_ENTRY], "down": ["1"]}),
    message("delta", {"up": [GOOD_ENTRY], "avail": [[1, None]]}),
    message("delta", {"up": [GOOD_ENTRY], "avail": [[1, ["online", 1.5, "x"]]]}),
    message("hello", {"users": [GOOD_ENTRY]}),
    b"P2\tx\tsnap\n" + orjson.dumps({"users": [GOOD_ENTRY]}),  # a later version
]


async def test_malformed_messages_are_dropped_and_logged_a_few_times(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    b = await cluster.node("b")
    await cluster.tap.next("b", "snap", 0)
    mark = cluster.tap.mark()
    caplog.set_level(logging.WARNING, logger="appchat.fanout.presence")
    for data in MALFORMED:
        b.handle(data)
    assert (b.availability(1), b.is_staff(1), b.staff()) == ("offline", None, [])
    lines = [r for r in caplog.records if "dropping" in r.getMessage()]
    assert 1 <= len(lines) <= 10  # (rate-limited: a few per kind of fault)
    assert any("version" in r.getMessage() for r in lines)
    b.handle(message("snap", {"users": [GOOD_ENTRY]}))  # the well-formed one is taken
    assert (b.availability(1), b.name(1)) == ("busy", "Anna")
    await cluster.tap.next("b", "snap", mark)  # and b answered the node it heard first


async def test_staff_lists_every_staff_member_there_and_whether_one_is_online(
    cluster: Cluster,
) -> None:
    a, b = await cluster.node("a"), await cluster.node("b")
    assert (a.staff(), a.staff_available()) == ([], False)
    a.connected(1, staff=True, name="Anna")
    a.connected(2, staff=False, name="Customer")
    b.connected(3, staff=True)
    b.connected(5, staff=False)
    a.connected(5, staff=True)  # an id used by both: staff, since one connection is
    await sees(a, 3, "online")
    await eventually(lambda: b.is_staff(5) is True, timeout=5)
    expected = [(1, "online", "Anna"), (3, "online", None), (5, "online", None)]
    assert a.staff() == expected
    assert b.staff() == expected
    assert a.staff_available()

    for user_id in (1, 5):
        a.set_availability(user_id, "busy")
    b.set_availability(3, "offline")
    await eventually(lambda: not a.staff_available() and not b.staff_available(), timeout=5)
    assert a.staff() == [(1, "busy", "Anna"), (3, "offline", None), (5, "busy", None)]

    mark = cluster.tap.mark()
    a.disconnected(1, staff=True)
    await cluster.tap.next("a", "delta", mark)
    cluster.clock.advance(GRACE - 1)
    assert [u for u, _, _ in b.staff()] == [1, 3, 5]  # within the grace
    cluster.clock.advance(1)
    assert [u for u, _, _ in b.staff()] == [3, 5]


async def test_on_change_failing_breaks_nothing(cluster: Cluster) -> None:
    a = await cluster.node("a")

    def broken(user_id: int, availability: str) -> None:
        raise RuntimeError("a subscriber failed")

    a.on_change = broken
    a.connected(1, staff=True)
    assert a.availability(1) == "online"


async def test_alone_on_its_broker_a_node_publishes_nothing_and_works_locally() -> None:
    heard: list[bytes] = []
    broker = MemoryBroker()
    presence = Presence(broker, "a", grace=GRACE, clock=frozen())
    handler = route(presence)

    def listen(channel: str, data: bytes) -> None:
        heard.append(data)
        handler(channel, data)

    await broker.start(listen)
    await presence.start()
    try:
        presence.connected(1, staff=True)
        presence.set_availability(1, "busy")
        presence.disconnected(1, staff=True)
        presence.tick()
        await presence.resync()
        assert presence.availability(1) == "busy"
    finally:
        await presence.stop()
        await broker.close()
    assert heard == []


async def test_a_broker_that_refuses_is_logged_and_nothing_waits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = RedisBroker(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    presence = Presence(broker, "a", clock=frozen())
    await presence.start()
    try:
        presence.connected(1, staff=True)
        assert presence.availability(1) == "online"
        await eventually(lambda: "not published" in caplog.text, timeout=10)
    finally:
        await presence.stop()
        await broker.close()


def test_settings_are_checked() -> None:
    broker = MemoryBroker()
    assert Presence(broker, "a", prefix="p").channel == "p:presence"
    for bad in ("", "a\tb", "a\nb"):
        with pytest.raises(ValueError):
            Presence(broker, bad)
    with pytest.raises(ValueError):
        Presence(broker, "a", grace=-1)
    with pytest.raises(ValueError):
        Presence(broker, "a", heartbeat=0)


# -- over a real Redis -------------------------------------------------------------------


class RedisNodes:
    def __init__(self, stack: AsyncExitStack) -> None:
        self.stack = stack
        self.prefix = unique_prefix()
        self.changes: dict[str, list[tuple[int, str]]] = {}
        self.brokers: dict[str, RedisBroker] = {}

    async def node(self, name: str, clock: Clock, *, heartbeat: float) -> Presence:
        broker = self.brokers[name] = RedisBroker(REDIS_URL, prefix=self.prefix)
        presence = Presence(
            broker, name, prefix=self.prefix, grace=GRACE, heartbeat=heartbeat, clock=clock
        )
        changes = self.changes[name] = []
        presence.on_change = lambda user_id, availability: changes.append((user_id, availability))
        await broker.start(route(presence))
        self.stack.push_async_callback(self.kill, name)
        await presence.start()
        self.stack.push_async_callback(presence.stop)
        return presence

    async def kill(self, name: str) -> None:
        """Close the node's broker connection (nothing more reaches the others)."""
        broker = self.brokers.pop(name, None)
        if broker is not None:
            await broker.close()


@pytest.fixture
async def redis_nodes() -> AsyncIterator[RedisNodes]:
    require("Redis", "127.0.0.1", 6379)
    async with AsyncExitStack() as stack:
        yield RedisNodes(stack)


async def test_over_redis_presence_reaches_every_node_and_a_stop_starts_the_grace(
    redis_nodes: RedisNodes,
) -> None:
    clock_b = frozen()
    a = await redis_nodes.node("a", frozen(), heartbeat=HEARTBEAT)
    b = await redis_nodes.node("b", clock_b, heartbeat=HEARTBEAT)
    a.connected(1, staff=True, name="Anna")
    await sees(b, 1, "online")
    assert b.name(1) == "Anna"
    a.set_availability(1, "busy")
    await sees(b, 1, "busy")

    c = await redis_nodes.node("c", frozen(), heartbeat=HEARTBEAT)
    await sees(c, 1, "busy")  # a answered c's first snapshot
    assert c.staff() == [(1, "busy", "Anna")]

    await a.stop()
    c.connected(2, staff=False)  # published after a's leave: b reads it after the leave
    await sees(b, 2, "online")
    assert b.availability(1) == "busy"
    clock_b.advance(GRACE)
    b.tick()
    assert b.availability(1) == "offline"
    assert redis_nodes.changes["b"] == [(1, "online"), (1, "busy"), (1, "offline")]


async def test_over_redis_the_users_of_a_killed_node_go_offline(redis_nodes: RedisNodes) -> None:
    heartbeat = 5.0
    clock_b = frozen()
    a = await redis_nodes.node("a", frozen(), heartbeat=heartbeat)
    b = await redis_nodes.node("b", clock_b, heartbeat=heartbeat)
    a.connected(1, staff=True)
    await sees(b, 1, "online")
    await redis_nodes.kill("a")  # no leave: a's messages stop
    c = await redis_nodes.node("c", frozen(), heartbeat=heartbeat)
    c.connected(2, staff=False)  # once b has this, it has everything a published
    await sees(b, 2, "online")
    clock_b.advance(GRACE - 0.1)  # (3 heartbeats < the grace)
    b.tick()
    assert b.availability(1) == "online"
    clock_b.advance(0.1)
    b.tick()
    assert b.availability(1) == "offline"
    assert redis_nodes.changes["b"] == [(1, "online"), (1, "offline")]


async def test_connections_are_counted_per_node_and_unpaired_closes_are_harmless(
    cluster: Cluster,
) -> None:
    a = await cluster.node("a", grace=0.0)
    a.connected(1, staff=True)
    a.connected(1, staff=False)
    a.disconnected(1, staff=False)
    a.tick()
    assert a.availability(1) == "online"
    a.disconnected(1, staff=False)  # said of the wrong kind: the staff one closes
    a.tick()
    assert a.availability(1) == "offline"
    a.disconnected(1, staff=True)  # one close too many: logged, nothing else
    a.disconnected(2, staff=True)
    assert (a.availability(1), a.availability(2)) == ("offline", "offline")
    assert cluster.changes["a"] == [(1, "online"), (1, "offline")]
