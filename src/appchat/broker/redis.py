"""Redis pub/sub broker (redis-py asyncio): a channel per participant.

One pub/sub connection per node reads every subscribed channel; publishing goes through
the client's pool. When the pub/sub connection drops, the node reconnects with backoff,
subscribes to every channel again and calls ``on_resync``: pushes published meanwhile
are lost, and clients are told to refetch.

The hot path is kept lean: a batch of publishes is one script call (one reply for the
whole batch instead of one per channel), and the subscriber reads replies straight from
its connection (RESP2, parsed by hiredis) rather than through redis-py's ``PubSub``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..protocol import defaults
from ..protocol.errors import Unavailable
from . import Handler, ResyncHandler

log = logging.getLogger(__name__)

_FAULTS = (RedisError, OSError, TimeoutError)
SUBSCRIBE_TIMEOUT = 5.0  # seconds to connect the pub/sub connection and subscribe

# PUBLISH channel data for each pair of arguments: a batch costs one reply.
_PUBLISH_ALL = """
for i = 1, #ARGV, 2 do
    redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
return 0
"""


class RedisBroker:
    def __init__(
        self, url: str, *, prefix: str = defaults.CHANNEL_PREFIX, max_backoff: float = 2.0
    ) -> None:
        # Publishing retries once, at once, when its pooled connection turns out stale (a
        # Redis restart), and never hangs on a Redis that stopped answering. No longer: a
        # push that arrives late, after the clients were told to refetch, is worse than one
        # that is not delivered (its users get Event.Resync instead).
        self._client = aioredis.from_url(
            url,
            socket_connect_timeout=2.0,
            socket_timeout=5.0,
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        # The pub/sub connection waits for messages indefinitely: no socket timeout. And no
        # retries: redis-py would reconnect and resubscribe silently, and pushes published
        # meanwhile would be lost without the Resync that _reconnect sends.
        self._subscriber = aioredis.from_url(
            url,
            socket_connect_timeout=2.0,
            socket_timeout=None,  # redis-py's default is 5 s: an idle node would reconnect
            retry=Retry(NoBackoff(), 0),
            protocol=2,
        )
        self._publish_all = self._client.register_script(_PUBLISH_ALL)
        self._max_backoff = max_backoff
        # Keeps the pub/sub connection open (and its loss noticed) with no participant on.
        self._own = f"{prefix}:node:{secrets.token_hex(8)}"
        self._channels: set[str] = {self._own}
        self._pubsub: AbstractConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._handler: Handler | None = None
        self._on_resync: ResyncHandler | None = None
        self._healthy = False
        self._closed = False

    async def start(self, handler: Handler, on_resync: ResyncHandler | None = None) -> None:
        self._handler = handler
        self._on_resync = on_resync
        try:
            self._pubsub = await self._subscribe_all()
        except _FAULTS as exc:
            raise Unavailable(f"cannot reach the broker: {exc}") from exc
        self._healthy = True
        self._reader = asyncio.create_task(self._read_loop(), name="appchat-redis-reader")

    async def close(self) -> None:
        self._healthy = False  # (un)subscribing after this only changes the remembered set
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._pubsub is not None:
            with contextlib.suppress(*_FAULTS):
                await self._pubsub.disconnect()
            self._pubsub = None
        await self._client.aclose()
        await self._subscriber.aclose()

    async def ping(self) -> None:
        if not self._healthy:
            raise Unavailable("the broker connection is down, reconnecting")
        try:
            await self._client.ping()
        except _FAULTS as exc:
            raise Unavailable("the broker is unreachable") from exc

    @property
    def shared(self) -> bool:
        return True

    def _check_open(self) -> None:
        # a closed client would open new connections, never to be closed
        if self._closed:
            raise Unavailable("the broker connection is closed")

    async def publish(self, channel: str, data: bytes) -> None:
        self._check_open()
        try:
            await self._client.publish(channel, data)
        except _FAULTS as exc:
            raise Unavailable("the broker is unreachable") from exc

    async def publish_many(self, messages: list[tuple[str, bytes]]) -> None:
        """One round trip and one reply for the whole batch (a script that publishes each
        in order; no MULTI)."""
        if not messages:
            return
        self._check_open()
        args = [part for message in messages for part in message]
        try:
            await self._publish_all(args=args)
        except _FAULTS as exc:
            raise Unavailable("the broker is unreachable") from exc

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)
        await self._send_subscription("SUBSCRIBE", channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        await self._send_subscription("UNSUBSCRIBE", channel)

    async def _send_subscription(self, command: str, channel: str) -> None:
        conn = self._pubsub
        # Never on a connection that dropped: that would reconnect it silently, without
        # the Resync. The reader reconnects, and subscribes to what is wanted by then.
        if self._healthy and conn is not None and conn.is_connected:
            with contextlib.suppress(*_FAULTS):
                await conn.send_command(command, channel)

    async def _subscribe_all(self) -> AbstractConnection:
        conn: AbstractConnection = self._subscriber.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):  # the connection has no timeout
                await conn.connect()  # type: ignore[no-untyped-call]
                await conn.send_command("SUBSCRIBE", *self._channels)
        except BaseException:
            with contextlib.suppress(*_FAULTS):
                await conn.disconnect()
            raise
        return conn

    async def _read_loop(self) -> None:
        """Every reply of the pub/sub connection: messages go to the handler; the
        confirmations of (un)subscriptions are skipped."""
        own = self._own.encode()
        while True:
            conn = self._pubsub
            assert conn is not None
            try:
                reply = await conn.read_response()  # no socket timeout: waits for the next
            except _FAULTS as exc:
                log.warning("broker connection lost (%s); reconnecting", exc)
                await self._reconnect()
                continue
            if type(reply) is not list or len(reply) != 3 or reply[0] != b"message":
                continue
            channel = reply[1]
            if self._handler is not None and channel != own:
                try:
                    self._handler(channel.decode(), reply[2])
                except Exception:
                    log.exception("push handler failed")

    async def _reconnect(self) -> None:
        self._healthy = False
        if self._pubsub is not None:
            with contextlib.suppress(*_FAULTS):
                await self._pubsub.disconnect()
        delay = 0.05
        while True:
            try:
                wanted = set(self._channels)
                self._pubsub = await self._subscribe_all()
                self._healthy = True
                # (un)subscriptions made while reconnecting found no connection to use
                while self._channels != wanted:
                    added, removed = self._channels - wanted, wanted - self._channels
                    wanted = set(self._channels)
                    if added:
                        await self._pubsub.send_command("SUBSCRIBE", *added)
                    if removed:
                        await self._pubsub.send_command("UNSUBSCRIBE", *removed)
                break
            except _FAULTS:
                self._healthy = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)
        log.info("broker connection back; %d channels resubscribed", len(self._channels))
        if self._on_resync is not None:
            result = self._on_resync()
            if result is not None:
                await result
