"""Metrics (Prometheus text format at ``/metrics``); one registry per node, no globals."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PUBLISH_KINDS = ("push", "inbox", "presence")


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
        self.events = EventStats()
        self.registry.register(self.events)
        self.disconnects = Counter(
            "appchat_disconnects_total",
            "Connections closed by the server, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.webhook_deliveries = Counter(
            "appchat_webhook_deliveries_total",
            "Webhook delivery attempts by this node, by outcome (delivered, failed: to be "
            "retried, given_up)",
            ["outcome"],
            registry=self.registry,
        )
        self.webhook_backlog = Gauge(
            "appchat_webhook_backlog",
            "Webhook deliveries waiting in the outbox (every node's, the configured URLs), "
            "as last counted by this node",
            registry=self.registry,
        )
        self.webhook_dead = Gauge(
            "appchat_webhook_dead",
            "Webhook deliveries given up, kept in the outbox for the operator",
            registry=self.registry,
        )

        self.ready = Gauge(
            "appchat_ready",
            "1 while this node's database and broker answer (what /readyz checks), else 0; "
            "checked each time /metrics is read",
            registry=self.registry,
        )
        self.broker_publish_failures = Counter(
            "appchat_broker_publish_failures_total",
            "Messages this node could not publish on the broker, by what they carried (push: "
            "a participant's push or Event.Resync, inbox: a team inbox change, presence)",
            ["kind"],
            registry=self.registry,
        )
        for kind in PUBLISH_KINDS:
            self.broker_publish_failures.labels(kind)  # shown as 0 from the start
        self.uploads = Counter(
            "appchat_uploads_total",
            "Image uploads (POST /upload) answered, by HTTP status (201: stored)",
            ["status"],
            registry=self.registry,
        )
        self.uploads.labels("201")
        self.upload_bytes = Counter(
            "appchat_upload_bytes",
            "Bytes of the images stored by uploads (thumbnails not counted)",
            registry=self.registry,
        )

    def publish_failed(self, kind: str, messages: int) -> None:
        """``messages`` of ``kind`` (one of PUBLISH_KINDS) that the broker did not take."""
        self.broker_publish_failures.labels(kind).inc(messages)

    def count_event(self, event: str, outcome: str, seconds: float) -> None:
        """One served request: its outcome and its time."""
        self.events.add(event, outcome, seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


EVENT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class EventStats(Collector):
    """``appchat_events_total`` and ``appchat_event_seconds``, kept as plain numbers.

    Every request adds to them, so they cost a dictionary lookup and two additions, no
    lock and no label lookup (the event loop is the only writer); the Prometheus families
    are built when ``/metrics`` is read.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        self._times: dict[str, list[float]] = {}  # per bucket, then +Inf, then the sum

    def add(self, event: str, outcome: str, seconds: float | None) -> None:
        """Count one request; ``seconds`` None: not timed (a frame that named no event)."""
        key = (event, outcome)
        self._counts[key] = self._counts.get(key, 0) + 1
        if seconds is None:
            return
        times = self._times.get(event)
        if times is None:
            times = self._times[event] = [0.0] * (len(EVENT_BUCKETS) + 2)
        times[bisect_left(EVENT_BUCKETS, seconds)] += 1
        times[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        total = CounterMetricFamily(
            "appchat_events",
            "Request frames served, by event and outcome (ok or the error code)",
            labels=["event", "outcome"],
        )
        for (event, outcome), n in sorted(self._counts.items()):
            total.add_metric([event, outcome], n)
        yield total
        timing = HistogramMetricFamily(
            "appchat_event_seconds", "Time to serve a request frame, by event", labels=["event"]
        )
        for event, times in sorted(self._times.items()):
            cumulative, buckets = 0.0, []
            for bound, in_bucket in zip((*EVENT_BUCKETS, float("inf")), times[:-1], strict=True):
                cumulative += in_bucket
                buckets.append((_bound(bound), cumulative))
            timing.add_metric([event], buckets, times[-1])
        yield timing

    def describe(self) -> Iterator[Metric]:
        return iter(())


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)
