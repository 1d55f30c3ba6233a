"""NATS broker (nats-py): a subject per participant; the client reconnects on its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from nats.aio.client import Client
from nats.errors import Error as NatsError

from ..protocol.errors import Unavailable
from . import Handler, ResyncHandler

log = logging.getLogger(__name__)

_FAULTS = (NatsError, OSError, TimeoutError)


class NatsBroker:
    def __init__(self, url: str, *, connect_timeout: float = 2.0) -> None:
        self._url = url
        self._connect_timeout = connect_timeout
        self._nc: Any = None
        self._subs: dict[str, Any] = {}
        self._handler: Handler | None = None
        self._on_resync: ResyncHandler | None = None

    async def start(self, handler: Handler, on_resync: ResyncHandler | None = None) -> None:
        self._handler = handler
        self._on_resync = on_resync
        # The client retries its first connection forever too (it reconnects forever once
        # connected): bound that first one, so a node refuses to start without its broker.
        nc = Client()
        # seconds, as floats (nats-py annotates the two times as int but takes any number)
        times: dict[str, Any] = {
            "reconnect_time_wait": 0.5,
            "connect_timeout": self._connect_timeout,
        }
        try:
            async with asyncio.timeout(self._connect_timeout):
                await nc.connect(
                    self._url,
                    reconnected_cb=self._reconnected,
                    disconnected_cb=self._disconnected,
                    max_reconnect_attempts=-1,
                    allow_reconnect=True,
                    **times,
                )
        except (TimeoutError, NatsError, OSError) as exc:
            with contextlib.suppress(*_FAULTS):
                await nc.close()
            raise Unavailable(f"cannot reach the broker: {exc or 'no answer'}") from exc
        self._nc = nc

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.drain()
            self._nc = None

    async def ping(self) -> None:
        if self._nc is None or not self._nc.is_connected:
            raise Unavailable("the broker connection is down, reconnecting")
        try:
            await self._nc.flush(timeout=2)
        except (TimeoutError, NatsError, OSError) as exc:
            raise Unavailable("the broker is unreachable") from exc

    @property
    def shared(self) -> bool:
        return True

    def _client(self) -> Any:
        """The connection; ``Unavailable`` before ``start`` succeeded or after ``close``."""
        if self._nc is None:
            raise Unavailable("the broker is not connected")
        return self._nc

    async def publish(self, channel: str, data: bytes) -> None:
        try:
            await self._client().publish(channel, data)
        except _FAULTS as exc:
            raise Unavailable("the broker is unreachable") from exc

    async def publish_many(self, messages: list[tuple[str, bytes]]) -> None:
        """The client buffers publishes and writes them out together."""
        try:
            nc = self._client()
            for channel, data in messages:
                await nc.publish(channel, data)
        except _FAULTS as exc:
            raise Unavailable("the broker is unreachable") from exc

    async def subscribe(self, channel: str) -> None:
        if channel in self._subs:
            return
        try:
            self._subs[channel] = await self._client().subscribe(channel, cb=self._on_message)
        except _FAULTS as exc:
            raise Unavailable("the broker is unreachable") from exc

    async def unsubscribe(self, channel: str) -> None:
        sub = self._subs.pop(channel, None)
        if sub is None:
            return
        try:
            await sub.unsubscribe()
        except _FAULTS as exc:
            raise Unavailable("the broker is unreachable") from exc

    async def _on_message(self, msg: Any) -> None:
        if self._handler is not None:
            self._handler(msg.subject, msg.data)

    async def _disconnected(self) -> None:
        log.warning("broker connection lost; reconnecting")

    async def _reconnected(self) -> None:
        log.info("broker connection back")
        if self._on_resync is not None:
            result = self._on_resync()
            if result is not None:
                await result
