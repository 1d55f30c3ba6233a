"""Webhooks: the events the stores record in their outbox, delivered over HTTP, signed.

Every change that makes an event (a stored message, a read position that moved, a new
conversation, a notice to a participant away: ``appchat.chat.notices``) writes one outbox
row per configured URL in its own transaction (``Store.record_webhooks``). A
:class:`WebhookDispatcher` per node delivers them: one task per URL (a URL that is down
holds back no other) claims due rows with a lease, posts them at once, deletes what a 2xx
answered and reschedules the rest with exponential backoff. The claim is what lets several
nodes (or ``serve --workers``) share one database: a row claimed by one is not due for the
others until its lease ends. Nothing here runs on the chat path: a commit that wrote rows
only wakes the dispatcher.

What a receiver sees is in docs/api.md, "Webhooks".
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import orjson

from .. import __version__
from ..common.metrics import Metrics
from ..common.ratelog import RateLimitedLog
from ..protocol import defaults
from ..protocol import events as ev
from ..protocol.errors import AppError
from ..protocol.models import (
    CONVERSATION_CREATED,
    CONVERSATION_UPDATED,
    MESSAGE_CREATED,
    MESSAGE_DELETED,
    MESSAGE_READ,
    MESSAGE_UPDATED,
    Conversation,
    Message,
    WebhookBacklog,
    WebhookEvent,
    WebhookFailure,
    format_ts,
    now_us,
)
from ..store import Store
from ..store.notices import PARTICIPANT_UNREAD

log = logging.getLogger(__name__)
_failure_log = RateLimitedLog(log)  # a receiver that is down fails every attempt: log a few

SIGNATURE_HEADER = "Appchat-Signature"
EVENT_ID_HEADER = "Appchat-Event-Id"
EVENT_TYPE_HEADER = "Appchat-Event-Type"
ATTEMPT_HEADER = "Appchat-Delivery-Attempt"

BATCH = 32  # rows a URL's task claims and posts at once
POLL = 5.0  # seconds between looks at the outbox when nothing is due (rows of other nodes)
FAULT_PAUSE = 1.0  # seconds to wait after the database failed
MAX_ERROR = 200  # characters of the last error kept in the row
COUNT_EVERY = 1_000_000  # microseconds between two counts of the backlog while delivering


@dataclass(frozen=True, slots=True)
class WebhookOptions:
    timeout: float = defaults.WEBHOOK_TIMEOUT
    retry_min: float = defaults.WEBHOOK_RETRY_MIN
    retry_max: float = defaults.WEBHOOK_RETRY_MAX
    give_up: float = defaults.WEBHOOK_GIVE_UP  # 0: never

    @property
    def lease(self) -> float:
        """How long a claim holds its rows: the delivery and its bookkeeping, with room."""
        return 2 * self.timeout + 1


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The ``Appchat-Signature`` header: ``t=<unix seconds>,v1=<hex HMAC-SHA256>`` over
    ``<t>.<body>``."""
    mac = hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def event_body(event: WebhookEvent) -> bytes:
    """The JSON a receiver gets: the same bytes on every attempt and for every URL."""
    data = orjson.loads(event.data)
    payload: object
    if event.type in (MESSAGE_CREATED, MESSAGE_UPDATED, MESSAGE_DELETED):
        payload = {"message": ev.message_obj(Message(**data))}
    elif event.type == CONVERSATION_CREATED:
        payload = {"conversation": ev.conversation_obj(Conversation(**data))}
    elif event.type == CONVERSATION_UPDATED:  # its messages have webhooks of their own
        conversation = ev.conversation_obj(Conversation(**data))
        del conversation["last_message"]
        payload = {"conversation": conversation}
    elif event.type == MESSAGE_READ:
        payload = ev.message_read(**data)
    elif event.type == PARTICIPANT_UNREAD:  # {"application_id", "user_id", "unread", …}
        last = data["last_message"]
        payload = {**data, "last_message": ev.message_obj(Message(**last)) if last else None}
    else:  # recorded by a newer release: passed on as it was recorded
        payload = data
    return orjson.dumps(
        {
            "id": event.event_id,
            "type": event.type,
            "created_at": format_ts(event.occurred_at),
            "data": payload,
        }
    )


def retry_delay(attempts: int, options: WebhookOptions, jitter: float) -> float:
    """Seconds before the next attempt after ``attempts`` failures: ``retry_min`` doubled
    per failure, at most ``retry_max``, then a random part of its upper half taken off
    (``jitter`` in [0, 1)) so that deliveries failed together do not retry together."""
    ceiling = min(options.retry_max, options.retry_min * 2.0 ** min(attempts - 1, 60))
    return ceiling * (1 - jitter / 2)


class WebhookDispatcher:
    """Delivers this node's share of the outbox; started and stopped with the node."""

    def __init__(
        self,
        store: Store,
        urls: Sequence[str],
        secret: bytes,
        *,
        options: WebhookOptions | None = None,
        metrics: Metrics | None = None,
        clock_us: Callable[[], int] = now_us,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._secret = secret
        self._options = options or WebhookOptions()
        self._metrics = metrics or Metrics()
        self._now = clock_us
        self._jitter = jitter
        self._lanes = [_Lane(url) for url in dict.fromkeys(urls)]
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        store.record_webhooks([lane.url for lane in self._lanes], self.wake)
        for outcome in ("delivered", "failed", "given_up"):
            self._metrics.webhook_deliveries.labels(outcome)  # shown as 0 from the start

    def wake(self) -> None:
        """Rows were committed: look at the outbox now (called on the event loop)."""
        for lane in self._lanes:
            lane.wake.set()

    async def start(self) -> None:
        self._stopping = False
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._options.timeout),
            headers={"User-Agent": f"appchat-webhooks/{__version__}"},
        )
        self._tasks = [asyncio.create_task(self._run(lane)) for lane in self._lanes]

    async def stop(self) -> None:
        """Claim nothing more; let deliveries under way finish (at most a timeout), then
        close. A delivery cut short is tried again once its lease ends."""
        self._stopping = True
        self.wake()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=self._options.timeout + 1)
            for task in late:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- one task per URL -----------------------------------------------------------------------

    async def _run(self, lane: _Lane) -> None:
        while not self._stopping:
            lane.wake.clear()
            try:
                if await self._pass(lane):
                    if self._now() - lane.counted > COUNT_EVERY:
                        await self._count(lane)  # a long backlog: keep /metrics current
                    continue
                wait = await self._idle_wait(lane)
            except AppError as exc:
                _failure_log.warning("outbox", "webhooks: the database failed: %s", exc.message)
                wait = FAULT_PAUSE
            except Exception:  # a bug must not end deliveries for good
                log.exception("webhooks: delivering to %s failed", _host(lane.url))
                wait = FAULT_PAUSE
            if wait > 0:
                with suppress(TimeoutError):
                    await asyncio.wait_for(lane.wake.wait(), wait)

    async def _pass(self, lane: _Lane) -> bool:
        """Claim what is due for this URL and deliver it; whether there was any."""
        now = self._now()
        lease = now + int(self._options.lease * 1_000_000)
        events = await self._store.claim_webhooks(lane.url, now=now, lease_until=lease, limit=BATCH)
        if not events:
            return False
        errors = await asyncio.gather(*(self._deliver(e) for e in events))
        delivered: list[int] = []
        failed: list[WebhookFailure] = []
        done = self._now()
        for event, error in zip(events, errors, strict=True):
            if error is None:
                delivered.append(event.row)
            else:
                failed.append(self._failure(event, error, done))
        await self._store.settle_webhooks(delivered, failed)
        counter = self._metrics.webhook_deliveries
        if delivered:
            counter.labels("delivered").inc(len(delivered))
        for failure in failed:
            counter.labels("failed" if failure.next_attempt is not None else "given_up").inc()
        return True

    def _failure(self, event: WebhookEvent, error: str, now: int) -> WebhookFailure:
        attempts = event.attempts + 1
        give_up = self._options.give_up
        if give_up and now - event.occurred_at >= give_up * 1_000_000:
            log.warning(
                "webhook %s (%s) given up after %d attempts: %s",
                event.event_id,
                event.type,
                attempts,
                error,
            )
            return WebhookFailure(event.row, event.lease, attempts, None, error)
        delay = retry_delay(attempts, self._options, self._jitter())
        _failure_log.warning(
            ("delivery", event.url),
            "webhook delivery to %s failed (attempt %d, next in %.1f s): %s",
            _host(event.url),
            attempts,
            delay,
            error,
        )
        return WebhookFailure(event.row, event.lease, attempts, now + int(delay * 1e6), error)

    async def _count(self, lane: _Lane) -> WebhookBacklog:
        backlog = await self._store.webhook_backlog(lane.url)
        lane.pending, lane.dead, lane.counted = backlog.pending, backlog.dead, self._now()
        self._metrics.webhook_backlog.set(sum(x.pending for x in self._lanes))
        self._metrics.webhook_dead.set(sum(x.dead for x in self._lanes))
        return backlog

    async def _idle_wait(self, lane: _Lane) -> float:
        """Nothing was due: count the backlog; seconds until the next row is due."""
        backlog = await self._count(lane)
        if backlog.next_due is None:
            return POLL
        # a row due already but not claimed is held by another node's claim under way
        return min(POLL, max(0.01, (backlog.next_due - self._now()) / 1e6))

    async def _deliver(self, event: WebhookEvent) -> str | None:
        """Post one event; ``None`` if a 2xx answered, else what went wrong."""
        assert self._session is not None
        try:
            body = event_body(event)
        except (ValueError, TypeError) as exc:  # a row this release cannot read
            return f"cannot build the body: {exc}"[:MAX_ERROR]
        headers = {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: event.event_id,
            EVENT_TYPE_HEADER: event.type,
            ATTEMPT_HEADER: str(event.attempts + 1),
            SIGNATURE_HEADER: sign(self._secret, body, self._now() // 1_000_000),
        }
        try:
            async with self._session.post(
                event.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)[:MAX_ERROR]


class _Lane:
    """One URL: its task's wake-up and what it last counted."""

    __slots__ = ("counted", "dead", "pending", "url", "wake")

    def __init__(self, url: str) -> None:
        self.url = url
        self.wake = asyncio.Event()
        self.pending = 0
        self.dead = 0
        self.counted = 0  # when (microseconds)


def _host(url: str) -> str:
    """Where a URL points, for a log line: its path or query may hold a receiver's token."""
    return urlsplit(url).hostname or "?"
