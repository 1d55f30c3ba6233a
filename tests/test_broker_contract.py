"""One contract for every Broker implementation: memory, Redis and NATS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import pytest

from appchat.broker import Broker, open_broker
from appchat.broker.memory import MemoryBroker, MemoryBus

from .backends import NATS_URL, REDIS_URL, require, unique_prefix


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


async def test_ping(nodes: list[tuple[Broker, Inbox]]) -> None:
    for broker, _ in nodes:
        await broker.ping()
