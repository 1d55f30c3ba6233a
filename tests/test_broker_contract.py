"""One contract for every Broker implementation: memory, Redis and NATS, and its fault
rule: a broker that cannot be reached raises ``Unavailable`` and nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from appchat.broker import Broker, open_broker
from appchat.broker.memory import MemoryBroker, MemoryBus
from appchat.broker.nats import NatsBroker
from appchat.protocol.errors import Unavailable

from .backends import NATS_URL, REDIS_URL, PrivateRedis, free_port, require, unique_prefix


class Inbox:
    def __init__(self) -> None:
        self.got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    def __call__(self, channel: str, data: bytes) -> None:
        self.got.put_nowait((channel, data))

    async def next(self, timeout: float = 5) -> tuple[str, bytes]:
        return await asyncio.wait_for(self.got.get(), timeout)

    async def nothing(self, within: float = 0.3) -> None:
        await asyncio.sleep(within)
        assert self.got.empty(), self.got.get_nowait()


@pytest.fixture(params=["memory", "redis", "nats"])
def make_broker(request: pytest.FixtureRequest) -> Callable[[], Broker]:
    """A factory of brokers that reach each other, like the nodes of one cluster."""
    if request.param == "memory":
        bus = MemoryBus()
        return lambda: MemoryBroker(bus)
    if request.param == "redis":
        require("Redis", "127.0.0.1", 6379)
        return lambda: open_broker(REDIS_URL)
    require("NATS", "127.0.0.1", 4222)
    return lambda: open_broker(NATS_URL)


@pytest.fixture
async def nodes(make_broker: Callable[[], Broker]) -> AsyncIterator[list[tuple[Broker, Inbox]]]:
    async with AsyncExitStack() as stack:
        pairs = []
        for _ in range(2):
            broker, inbox = make_broker(), Inbox()
            await broker.start(inbox)
            stack.push_async_callback(broker.close)
            pairs.append((broker, inbox))
        yield pairs


async def settle(broker: Broker) -> None:
    """Subscriptions travel to the server; a ping makes sure they arrived."""
    await broker.ping()
    await asyncio.sleep(0.05)


async def test_publish_reaches_subscribers_on_every_node(
    nodes: list[tuple[Broker, Inbox]],
) -> None:
    (a, inbox_a), (b, inbox_b) = nodes
    channel = f"{unique_prefix()}:user:1"
    await a.subscribe(channel)
    await b.subscribe(channel)
    await settle(a)
    await settle(b)
    await a.publish(channel, b"hello \x00\xff")
    assert await inbox_a.next() == (channel, b"hello \x00\xff")
    assert await inbox_b.next() == (channel, b"hello \x00\xff")


async def test_only_subscribed_channels_arrive_and_unsubscribe_stops(
    nodes: list[tuple[Broker, Inbox]],
) -> None:
    (a, inbox_a), (b, inbox_b) = nodes
    prefix = unique_prefix()
    mine, other = f"{prefix}:user:1", f"{prefix}:user:2"
    await b.subscribe(mine)
    await settle(b)
    await a.publish(other, b"not for b")
    await a.publish(mine, b"for b")
    assert await inbox_b.next() == (mine, b"for b")
    await inbox_b.nothing()
    await inbox_a.nothing(0)
    await b.unsubscribe(mine)
    await settle(b)
    await a.publish(mine, b"after unsubscribe")
    await inbox_b.nothing()


async def test_order_is_kept_per_publisher(nodes: list[tuple[Broker, Inbox]]) -> None:
    (a, _), (b, inbox_b) = nodes
    channel = f"{unique_prefix()}:user:9"
    await b.subscribe(channel)
    await settle(b)
    for i in range(100):
        await a.publish(channel, str(i).encode())
    got = [int((await inbox_b.next())[1]) for _ in range(100)]
    assert got == list(range(100))


async def test_publish_many_keeps_order_and_bytes_on_every_channel(
    nodes: list[tuple[Broker, Inbox]],
) -> None:
    (a, _), (b, inbox_b) = nodes
    prefix = unique_prefix()
    one, two, unheard = f"{prefix}:user:1", f"{prefix}:user:2", f"{prefix}:user:3"
    await b.subscribe(one)
    await b.subscribe(two)
    await settle(b)
    batch = [(one if i % 3 else two, str(i).encode() + b"\x00\xff\r\n") for i in range(200)]
    await a.publish_many([*batch[:100], (unheard, b"nobody listens"), *batch[100:], (one, b"")])
    got = [await inbox_b.next() for _ in range(201)]
    for channel in (one, two):
        sent = [d for c, d in [*batch, (one, b"")] if c == channel]
        assert [d for c, d in got if c == channel] == sent
    await inbox_b.nothing()


async def test_an_idle_redis_subscription_stays_up() -> None:
    """No read timeout on the pub/sub connection (redis-py's default is 5 s, after which a
    quiet node would reconnect and tell everyone to refetch). Read off the live connection
    rather than waited out: idling past 5 s would cost every run of the suite 6 s."""
    require("Redis", "127.0.0.1", 6379)
    inbox, resyncs = Inbox(), 0

    def resynced() -> None:
        nonlocal resyncs
        resyncs += 1

    broker = open_broker(REDIS_URL, prefix=unique_prefix())
    await broker.start(inbox, resynced)
    try:
        channel = f"{unique_prefix()}:user:1"
        await broker.subscribe(channel)
        await settle(broker)
        live: Any = broker._pubsub  # type: ignore[attr-defined]
        assert live is not None and live.is_connected
        assert live.socket_timeout is None  # reads wait for the next message for ever
        assert live.socket_connect_timeout is not None  # connecting is still bounded
        await broker.publish(channel, b"still here")
        assert await inbox.next() == (channel, b"still here")
        assert resyncs == 0
    finally:
        await broker.close()


async def test_ping(nodes: list[tuple[Broker, Inbox]]) -> None:
    for broker, _ in nodes:
        await broker.ping()


async def test_redis_node_channel_honours_the_channel_prefix() -> None:
    require("Redis", "127.0.0.1", 6379)
    prefix = unique_prefix()
    broker = open_broker(REDIS_URL, prefix=prefix)
    await broker.start(Inbox())
    observer = aioredis.from_url(REDIS_URL, decode_responses=True)
    try:
        await settle(broker)
        channels = [str(c) for c in await observer.pubsub_channels(f"{prefix}:*")]
        assert len(channels) == 1, channels
        assert re.fullmatch(rf"{prefix}:node:[0-9a-f]{{16}}", channels[0]), channels
    finally:
        await observer.aclose()
        await broker.close()


# --- the fault rule ----------------------------------------------------------------------------


async def only_unavailable(call: Callable[[], Awaitable[object]]) -> bool:
    """Run a broker call: True if it raised ``Unavailable``, False if it succeeded; any other
    exception fails the test."""
    try:
        await call()
    except Unavailable:
        return True
    return False


@pytest.fixture(params=["redis", "nats"])
def unreachable(request: pytest.FixtureRequest) -> Broker:
    """A broker whose server does not exist: a port nobody listens on."""
    url = f"{request.param}://127.0.0.1:{free_port()}"
    return NatsBroker(url, connect_timeout=0.5) if request.param == "nats" else open_broker(url)


async def test_an_unreachable_broker_raises_unavailable(unreachable: Broker) -> None:
    with pytest.raises(Unavailable):
        await unreachable.start(Inbox())
    channel = f"{unique_prefix()}:user:1"
    assert await only_unavailable(unreachable.ping)
    assert await only_unavailable(lambda: unreachable.publish(channel, b"x"))
    assert await only_unavailable(lambda: unreachable.publish_many([(channel, b"x")]))
    # a subscription may be remembered for later instead; it never raises anything else
    await only_unavailable(lambda: unreachable.subscribe(channel))
    await only_unavailable(lambda: unreachable.unsubscribe(channel))
    await unreachable.close()


async def test_a_closed_broker_raises_only_unavailable(make_broker: Callable[[], Broker]) -> None:
    broker = make_broker()
    await broker.start(Inbox())
    await broker.close()
    channel = f"{unique_prefix()}:user:1"
    await only_unavailable(broker.ping)
    await only_unavailable(lambda: broker.publish(channel, b"x"))
    await only_unavailable(lambda: broker.publish_many([(channel, b"x")]))
    await only_unavailable(lambda: broker.subscribe(channel))
    await only_unavailable(lambda: broker.unsubscribe(channel))


async def test_redis_going_away_raises_unavailable_and_subscriptions_wait_for_its_return(
    tmp_path: Path,
) -> None:
    require("Redis", "127.0.0.1", 6379)  # the binary is what matters; the service proves it
    server = PrivateRedis(tmp_path)
    server.start()
    resynced = asyncio.Event()
    inbox = Inbox()
    broker = open_broker(server.url, prefix=unique_prefix())
    try:
        await broker.start(inbox, resynced.set)
        before, during = f"{unique_prefix()}:user:1", f"{unique_prefix()}:user:2"
        await broker.subscribe(before)
        await settle(broker)
        server.kill()
        assert await only_unavailable(broker.ping)
        assert await only_unavailable(lambda: broker.publish(before, b"x"))
        assert await only_unavailable(lambda: broker.publish_many([(before, b"x")]))
        assert not await only_unavailable(lambda: broker.subscribe(during))  # remembered
        server.start()
        await asyncio.wait_for(resynced.wait(), 10)
        await broker.publish(during, b"after")
        await broker.publish(before, b"again")
        assert {await inbox.next(), await inbox.next()} == {
            (before, b"again"),
            (during, b"after"),
        }
    finally:
        with contextlib.suppress(Unavailable):
            await broker.close()
        server.kill()
