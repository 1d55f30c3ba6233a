"""Pub/sub between nodes: one interface, implementations chosen by URL (``memory://``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from ..protocol import defaults
from ..protocol.errors import ConfigError

Handler = Callable[[str, bytes], None]
"""Called on the event loop with (channel, data) for every message of a subscribed channel."""

ResyncHandler = Callable[[], Awaitable[None] | None]
"""Called after the broker connection came back: pushes may have been missed meanwhile."""


class Broker(Protocol):
    """Channels between nodes.

    The fault rule: every method that talks to the broker raises
    :class:`appchat.protocol.errors.Unavailable` (and nothing else) when the broker cannot be
    reached or fails; ``subscribe`` and ``unsubscribe`` made while the connection is
    down are remembered and carried out when it comes back (followed by ``on_resync``).
    A node's own publications may come back to it; the hub ignores them.
    """

    @property
    def shared(self) -> bool:
        """Whether other nodes may listen: if not, publishing is skipped altogether."""

    async def start(self, handler: Handler, on_resync: ResyncHandler | None = None) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise ``Unavailable`` when the broker cannot deliver."""

    async def publish(self, channel: str, data: bytes) -> None: ...

    async def publish_many(self, messages: list[tuple[str, bytes]]) -> None:
        """Publish each (channel, data) in order, in as few round trips as the broker allows."""

    async def subscribe(self, channel: str) -> None: ...

    async def unsubscribe(self, channel: str) -> None: ...


def open_broker(url: str, *, prefix: str = defaults.CHANNEL_PREFIX) -> Broker:
    """Pick the broker implementation for ``url``; every channel it makes of its own
    starts with ``prefix`` (``--channel-prefix``), as the hub's do."""
    if url in ("memory://", "memory:"):
        from .memory import MemoryBroker

        return MemoryBroker()
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisBroker

        return RedisBroker(url, prefix=prefix)
    if url.startswith(("nats://", "tls://")):
        from .nats import NatsBroker

        return NatsBroker(url)
    raise ConfigError(f"unsupported broker URL {url!r} (expected memory://, redis://… or nats://…)")
