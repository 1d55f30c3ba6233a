"""The in-process broker: the single-node default and the test double."""

from __future__ import annotations

from collections import defaultdict

from . import Handler, ResyncHandler


class MemoryBus:
    """What several in-process brokers share, so two nodes in one process can talk."""

    def __init__(self) -> None:
        self.subscribers: defaultdict[str, set[MemoryBroker]] = defaultdict(set)
        self.members = 0  # brokers started on this bus


class MemoryBroker:
    def __init__(self, bus: MemoryBus | None = None) -> None:
        self._bus = bus or MemoryBus()
        self._handler: Handler | None = None
        self._channels: set[str] = set()

    @property
    def shared(self) -> bool:
        """Only when another node in this process shares the bus (tests of two nodes)."""
        return self._bus.members > 1

    async def start(self, handler: Handler, on_resync: ResyncHandler | None = None) -> None:
        self._handler = handler
        self._bus.members += 1

    async def close(self) -> None:
        for channel in list(self._channels):
            await self.unsubscribe(channel)
        if self._handler is not None:
            self._bus.members -= 1
        self._handler = None

    async def ping(self) -> None:
        return None

    async def publish(self, channel: str, data: bytes) -> None:
        for broker in list(self._bus.subscribers.get(channel, ())):
            if broker._handler is not None:
                broker._handler(channel, data)

    async def publish_many(self, messages: list[tuple[str, bytes]]) -> None:
        for channel, data in messages:
            await self.publish(channel, data)

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)
        self._bus.subscribers[channel].add(self)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        subscribers = self._bus.subscribers.get(channel)
        if subscribers is not None:
            subscribers.discard(self)
            if not subscribers:
                del self._bus.subscribers[channel]
