"""Wiring: settings -> store, broker, hub, service, HTTP app; start, stop and draining."""

from __future__ import annotations

import logging
import ssl

from aiohttp import web

from .auth import TokenVerifier, public_key
from .broker import Broker, open_broker
from .config import Settings
from .hub import Hub
from .observability import Metrics
from .service import ChatService, Limits
from .store import Store, open_store
from .transport.http import HealthEndpoints
from .transport.web import WebClient
from .transport.ws import WebSocketEndpoint, WsOptions

log = logging.getLogger(__name__)


class Node:
    """One appchat server process (or one of several in a test): everything it owns."""

    def __init__(
        self,
        settings: Settings,
        secret: bytes | None,
        *,
        store: Store | None = None,
        broker: Broker | None = None,
    ) -> None:
        self.settings = settings
        self.verifier = TokenVerifier(
            secret, keys=[public_key(spec) for spec in settings.jwt_public_key]
        )
        self.store = store or open_store(
            settings.database,
            synchronous=settings.sqlite_synchronous,
            busy_timeout=settings.sqlite_busy_timeout,
        )
        self.broker = broker or open_broker(settings.broker)
        self.metrics = Metrics()
        self._dev_secret = secret if settings.dev else None  # mints tokens for the web client
        self.hub = Hub(self.broker, prefix=settings.channel_prefix)
        self.service = ChatService(
            self.store,
            self.hub,
            self.verifier,
            limits=Limits(max_content=settings.max_content),
            trust_query_sid=settings.trust_query_sid,
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
            ),
            metrics=self.metrics,
        )
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port: int = settings.port

    def web_app(self) -> web.Application:
        app = web.Application()
        health = HealthEndpoints(self.store, self.broker, self.metrics)
        app.router.add_get("/ws", self.ws.handle)
        app.router.add_get("/healthz", health.healthz)
        app.router.add_get("/readyz", health.readyz)
        app.router.add_get("/metrics", health.metrics)
        WebClient(dev_secret=self._dev_secret).add_routes(app)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, app: web.Application) -> None:
        # Listening sockets are closed already; in-flight handlers finish after this.
        await self.ws.close_all()

    @property
    def scheme(self) -> str:
        return "wss" if self.settings.tls_cert else "ws"

    async def start(self) -> None:
        await self.store.open()
        await self.hub.start()
        self._runner = web.AppRunner(
            self.web_app(), handle_signals=False, access_log=None, shutdown_timeout=10.0
        )
        await self._runner.setup()
        self._site = web.TCPSite(
            self._runner,
            self.settings.host,
            self.settings.port,
            ssl_context=self._ssl_context(),
        )
        await self._site.start()
        addresses = self._runner.addresses
        if addresses:
            self.port = addresses[0][1]

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.settings.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.settings.tls_cert, self.settings.tls_key)
        return ctx

    async def stop(self) -> None:
        """Stop accepting, close every WebSocket with 1001, finish writes in flight, close."""
        if self._runner is not None:
            await self._runner.cleanup()
        await self.hub.stop()
        await self.broker.close()
        await self.store.close()
