"""Metrics (Prometheus text format at ``/metrics``); one registry per node, no globals."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections = Gauge(
            "appchat_connections", "Open WebSocket connections on this node", registry=self.registry
        )
        self.handshakes_refused = Counter(
            "appchat_handshakes_refused_total",
            "Handshakes answered with an HTTP error, by status",
            ["status"],
            registry=self.registry,
        )
        self.events = Counter(
            "appchat_events_total",
            "Request frames served, by event and outcome (ok or the error code)",
            ["event", "outcome"],
            registry=self.registry,
        )
        self.event_seconds = Histogram(
            "appchat_event_seconds",
            "Time to serve a request frame, by event",
            ["event"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self._event_counters: dict[tuple[str, str], Any] = {}
        self._event_timers: dict[str, Any] = {}
        self.disconnects = Counter(
            "appchat_disconnects_total",
            "Connections closed by the server, by reason",
            ["reason"],
            registry=self.registry,
        )

    def count_event(self, event: str, outcome: str, seconds: float) -> None:
        """One served request: its outcome and its time (label children kept, so the
        hot path does no label lookup)."""
        counter = self._event_counters.get((event, outcome))
        if counter is None:
            counter = self._event_counters[(event, outcome)] = self.events.labels(event, outcome)
        timer = self._event_timers.get(event)
        if timer is None:
            timer = self._event_timers[event] = self.event_seconds.labels(event)
        counter.inc()
        timer.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
