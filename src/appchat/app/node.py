"""Wiring: settings -> store, broker, hub, service, HTTP app; start, stop and draining."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Callable

from aiohttp import web

from ..auth.apikeys import ApiKeys, parse_key_spec
from ..auth.tokens import IdRanges, TokenVerifier, public_key
from ..blobs import BlobStore, open_blob_store
from ..blobs.images import ImageLimits, ImageReferences
from ..broker import Broker, open_broker
from ..chat.backend import BackendService
from ..chat.desk import AutoAssigner, SnoozeWaker
from ..chat.lifecycle import Lifecycle
from ..chat.notices import AwayNotices
from ..chat.service import MAX_REPLY_BYTES, ChatService, Limits
from ..common.metrics import Metrics
from ..fanout.hub import Hub
from ..store import Store, open_store
from ..transport.api import ServerApi
from ..transport.authcheck import TokenCheck
from ..transport.guard import HandshakeGuard, handler_args
from ..transport.http import HealthEndpoints
from ..transport.uploads import UploadEndpoints
from ..transport.web import WebClient
from ..transport.ws import WebSocketEndpoint, WsOptions
from ..webhooks.dispatcher import WebhookDispatcher, WebhookOptions
from .config import Settings, upload_directory
from .credentials import resolve_webhook_secret

log = logging.getLogger(__name__)

# Connections the kernel may hold for accept(): many clients reconnecting at once after a
# restart would overflow aiohttp's 128 and be dropped. Linux caps it at net.core.somaxconn.
LISTEN_BACKLOG = 4096


class Node:
    """One appchat server process (or one of several in a test): everything it owns."""

    def __init__(
        self,
        settings: Settings,
        secret: bytes | None,
        *,
        store: Store | None = None,
        broker: Broker | None = None,
        blobs: BlobStore | None = None,
        worker: int | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``worker``: this node is worker number ``worker`` of ``serve --workers`` (its port
        is shared through SO_REUSEPORT, the parent migrated the database). ``clock`` tells
        the time tokens expire by (their check and the sweep that closes connections at
        ``exp``); ``monotonic`` paces each connection's frame budget (``--rate``)."""
        self.settings = settings
        self.worker = worker
        self.verifier = TokenVerifier(
            secret, keys=[public_key(spec) for spec in settings.jwt_public_key], clock=clock
        )
        self.store = store or open_store(
            settings.database,
            synchronous=settings.sqlite_synchronous,
            busy_timeout=settings.sqlite_busy_timeout,
            migrate=worker is None,
            shared=worker is not None,
        )
        self.broker = broker or open_broker(settings.broker, prefix=settings.channel_prefix)
        self.metrics = Metrics()
        self.api_sender_ids = IdRanges.parse(settings.api_sender_ids)
        self.webhooks = self._webhooks(settings)
        self._dev_secret = secret if settings.dev else None  # mints tokens for the web client
        self.hub = Hub(
            self.broker,
            prefix=settings.channel_prefix,
            presence_grace=settings.presence_grace,
            on_publish_failure=self.metrics.publish_failed,
        )
        self.blobs = blobs or open_blob_store(
            str(upload_directory(settings)),
            s3_url=settings.upload_s3,
            s3_endpoint=settings.upload_s3_endpoint,
        )
        limits = Limits(
            max_content=settings.max_content,
            max_reply_bytes=min(MAX_REPLY_BYTES, settings.send_buffer),
            edit_window_us=int(settings.edit_window * 1_000_000),
        )
        images = ImageReferences(self.blobs, policy=settings.images)
        self.service = ChatService(
            self.store,
            self.hub,
            self.verifier,
            limits=limits,
            trust_query_sid=settings.trust_query_sid,
            metrics=self.metrics,
            images=images,
            inbox=self.hub.inbox,
            presence=self.hub.presence,
            auto_assign=(
                AutoAssigner(self.store, self.hub.presence, max_open=settings.max_open_per_agent)
                if settings.auto_assign == "round-robin"
                else None
            ),
        )
        self.snoozes = SnoozeWaker(self.store, self.service.changed)
        # participant.unread: only with webhooks (nothing is written or looked for without)
        self.notices: AwayNotices | None = None
        if self.webhooks is not None:
            self.notices = AwayNotices(self.store, self.hub, notify_after=settings.notify_after)
            self.hub.on_user_edge = self.notices.user_edge
        backend = BackendService(self.service, self.store, limits=limits, images=images)
        self.uploads = UploadEndpoints(
            self.service,
            self.verifier,
            self.blobs,
            max_upload=settings.max_upload,
            trust_query_sid=settings.trust_query_sid,
            reserved=self.api_sender_ids,
            image_limits=ImageLimits(
                max_decode_memory=settings.max_decode_memory,
                max_jpeg_scans=settings.max_jpeg_scans,
            ),
            max_uploads_per_user=settings.max_uploads_per_user,
            upload_rate=settings.upload_rate,
            upload_timeout=settings.upload_timeout,
            monotonic=monotonic,
            metrics=self.metrics,
        )
        self.ws = WebSocketEndpoint(
            self.service,
            self.hub,
            self.verifier,
            WsOptions(
                max_frame=settings.max_frame,
                send_queue=settings.send_queue,
                send_buffer=settings.send_buffer,
                heartbeat=settings.heartbeat or None,
                trust_query_sid=settings.trust_query_sid,
                rate=settings.rate,
                burst=settings.burst,
                max_connections=settings.max_connections,
                max_connections_per_user=settings.max_connections_per_user,
                allowed_origins=frozenset(settings.allowed_origins),
                reserved_sids=self.api_sender_ids,
            ),
            metrics=self.metrics,
            clock=clock,
            monotonic=monotonic,
        )
        self.lifecycle = Lifecycle(
            self.store,
            self.blobs,
            self.service,
            retention_days=settings.retention_days,
            orphan_ttl=settings.upload_orphan_ttl,
        )
        self.api = ServerApi(
            backend,
            self.hub,
            ApiKeys(
                [parse_key_spec(spec) for spec in settings.api_key],
                settings.api_keys_file,
            ),
            self.lifecycle,
            max_content=settings.max_content,
            max_body=settings.max_frame,
            sender_ids=self.api_sender_ids,
        )
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self.guard = HandshakeGuard(
            timeout=settings.handshake_timeout, max_pending=settings.max_pending_handshakes
        )
        self.port: int = settings.port

    def _webhooks(self, settings: Settings) -> WebhookDispatcher | None:
        """With --webhook-url: the store records events in its outbox, this delivers them."""
        secret = resolve_webhook_secret(settings)
        if secret is None:
            return None
        options = WebhookOptions(
            timeout=settings.webhook_timeout,
            retry_min=settings.webhook_retry_min,
            retry_max=settings.webhook_retry_max,
            give_up=settings.webhook_give_up,
        )
        return WebhookDispatcher(
            self.store, settings.webhook_url, secret, options=options, metrics=self.metrics
        )

    def web_app(self) -> web.Application:
        app = web.Application(middlewares=[self.guard.middleware()])
        health = HealthEndpoints(self.store, self.broker, self.metrics)
        app.router.add_get("/ws", self.ws.handle)
        app.router.add_get("/healthz", health.healthz)
        app.router.add_get("/readyz", health.readyz)
        app.router.add_get("/metrics", health.metrics)
        WebClient(dev_secret=self._dev_secret).add_routes(app)
        TokenCheck(
            self.verifier,
            trust_query_sid=self.settings.trust_query_sid,
            allowed_origins=frozenset(self.settings.allowed_origins),
            reserved=self.api_sender_ids,
        ).add_routes(app)
        self.uploads.add_routes(app)
        app.add_subapp("/api/", self.api.app())
        if self.worker is not None:
            app.on_response_prepare.append(self._name_worker)
        return app

    async def _name_worker(self, request: web.Request, response: web.StreamResponse) -> None:
        # Which process answered: for operators and tests of ``serve --workers``.
        response.headers["Appchat-Worker"] = f"{self.worker} pid={os.getpid()}"

    @property
    def scheme(self) -> str:
        return "wss" if self.settings.tls_cert else "ws"

    async def start(self) -> None:
        await self.store.open()
        await self.blobs.open()
        await self.hub.start()
        if self.webhooks is not None:
            await self.webhooks.start()
        self.snoozes.start()
        self.lifecycle.start()
        if self.notices is not None:
            self.notices.start()
        timeout = self.settings.handshake_timeout
        self._runner = web.AppRunner(
            self.web_app(),
            handle_signals=False,
            access_log=None,
            shutdown_timeout=10.0,
            # Request bodies are taken as sent: a few KiB of gzip would inflate to MiB
            # before any handler could count them (an encoded upload is refused, 415).
            auto_decompress=False,
            **handler_args(timeout),
        )
        await self._runner.setup()
        assert self._runner.server is not None
        self.guard.serve(self._runner.server)
        # Listening through the guard (instead of web.TCPSite): every accepted socket gets
        # a deadline for its request and counts against --max-pending-handshakes.
        self._listener = await asyncio.get_running_loop().create_server(
            self.guard,
            self.settings.host,
            self.settings.port,
            ssl=self._ssl_context(),
            backlog=LISTEN_BACKLOG,
            reuse_port=self.worker is not None or None,
            ssl_handshake_timeout=timeout if self.settings.tls_cert else None,
        )
        self.port = self._listener.sockets[0].getsockname()[1]

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.settings.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.settings.tls_cert, self.settings.tls_key)
        return ctx

    async def stop(self) -> None:
        """Stop accepting, close every WebSocket with 1001, finish writes in flight, close."""
        if self._listener is not None:
            self._listener.close()  # what web.TCPSite.stop does before the runner cleans up
            self._listener = None
            self.guard.close()  # and no connection it accepted just before is served
        if self._runner is not None:
            # The WebSockets first: aiohttp no longer knows them (transport/wsconn.py), so
            # its cleanup would not end them; close_all closes each with 1001 and cuts
            # those left after the grace. Then the runner ends the HTTP connections.
            await self.ws.close_all()
            server = self._runner.server
            handlers = server.connections if server is not None else []
            transports = [h.transport for h in handlers if h.transport is not None]
            await self._runner.cleanup()
            # A peer that reads nothing leaves its transport closing for ever, the last
            # replies still in its buffer: end it, as the exit of the process would.
            for transport in transports:
                transport.abort()
        await self.snoozes.stop()
        await self.lifecycle.stop()
        if self.notices is not None:
            await self.notices.stop()  # the users whose connections closed: seen until now
        await self.hub.stop()
        if self.webhooks is not None:
            await self.webhooks.stop()
        await self.broker.close()
        await self.blobs.close()
        await self.store.close()
