"""Pub/sub between nodes: one interface, implementations chosen by URL (``memory://``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from ..errors import ConfigError

Handler = Callable[[str, bytes], None]
"""Called on the event loop with (channel, data) for every message of a subscribed channel."""

ResyncHandler = Callable[[], Awaitable[None] | None]
"""Called after the broker connection came back: pushes may have been missed meanwhile."""


class Broker(Protocol):
    async def start(self, handler: Handler, on_resync: ResyncHandler | None = None) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise ``Unavailable`` when the broker cannot deliver."""

    async def publish(self, channel: str, data: bytes) -> None: ...

    async def subscribe(self, channel: str) -> None: ...

    async def unsubscribe(self, channel: str) -> None: ...


def open_broker(url: str) -> Broker:
    """Pick the broker implementation for ``url``."""
    if url in ("memory://", "memory:"):
        from .memory import MemoryBroker

        return MemoryBroker()
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisBroker

        return RedisBroker(url)
    if url.startswith(("nats://", "tls://")):
        from .nats import NatsBroker

        return NatsBroker(url)
    raise ConfigError(f"unsupported broker URL {url!r} (expected memory://, redis://… or nats://…)")
