"""The small HTTP surface beside the WebSocket: liveness (``/healthz``), readiness
(``/readyz``) and the Prometheus metrics (``/metrics``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..broker import Broker
from ..common.metrics import CONTENT_TYPE, Metrics
from ..protocol.errors import AppError
from ..store import Store

READY_TIMEOUT = 5.0  # seconds each readiness check may take before it counts as failed


class HealthEndpoints:
    def __init__(self, store: Store, broker: Broker, metrics: Metrics) -> None:
        self._store = store
        self._broker = broker
        self._metrics = metrics

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text format; ``appchat_ready`` is checked afresh for each read."""
        await self._checks()
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(self, request: web.Request) -> web.Response:
        """The process is up and serving HTTP."""
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """The storage and the broker answer: this node can take traffic."""
        checks = await self._checks()
        ready = all(v == "ok" for v in checks.values())
        return web.json_response(
            {"status": "ok" if ready else "unavailable", "checks": checks},
            status=200 if ready else 503,
        )

    async def _checks(self) -> dict[str, str]:
        """Each dependency's answer ("ok" or why not), both asked at once; sets
        ``appchat_ready``."""
        names = ("database", "broker")
        answers = await asyncio.gather(_check(self._store.ping), _check(self._broker.ping))
        checks = dict(zip(names, answers, strict=True))
        self._metrics.ready.set(1 if all(v == "ok" for v in answers) else 0)
        return checks


async def _check(ping: Callable[[], Awaitable[None]]) -> str:
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await ping()
        return "ok"
    except AppError as exc:
        return exc.message
    except TimeoutError:
        return f"no answer within {READY_TIMEOUT:g} s"
    except Exception:
        return "unreachable"
