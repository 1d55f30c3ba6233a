"""The in-process broker: the single-node default and the test double."""

from __future__ import annotations

from . import Handler, ResyncHandler


class MemoryBus:
    """What several in-process brokers share, so two nodes in one process can talk."""

    def __init__(self) -> None:
        # Each channel's brokers: one for a single node (a user's channel on the default
        # broker, for every connected user), so a list, a third of an empty set's size.
        self.subscribers: dict[str, list[MemoryBroker]] = {}
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
        brokers = self._bus.subscribers.setdefault(channel, [])
        if self not in brokers:
            brokers.append(self)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        subscribers = self._bus.subscribers.get(channel)
        if subscribers is not None and self in subscribers:
            subscribers.remove(self)
            if not subscribers:
                del self._bus.subscribers[channel]
