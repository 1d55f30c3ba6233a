"""Webhooks with real receivers over HTTP: signed, retried, never lost, delivered once.

The receivers verify signatures with the code of docs/api.md's example, executed here.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from appchat.app.cli import main
from appchat.common.metrics import Metrics
from appchat.protocol.models import WebhookBacklog, WebhookEvent
from appchat.webhooks.dispatcher import (
    WebhookDispatcher,
    WebhookOptions,
    event_body,
    retry_delay,
    sign,
)

from .backends import (
    REDIS_URL,
    free_port,
    opened_store,
    postgres_database,
    require,
    unique_prefix,
)
from .support import InProcessServer, Server, ServerProcess, customer, eventually, staff

HOOK_SECRET = "hook-secret-" + "fedcba9876543210" * 3
DOCS = Path(__file__).parent.parent / "docs" / "api.md"
# Quick retries: a test waits for events, never for a schedule.
FAST = (
    "--webhook-retry-min",
    "0.05",
    "--webhook-retry-max",
    "0.2",
    "--webhook-timeout",
    "1",
    "--rate",
    "0",
)


def docs_example() -> dict[str, Any]:
    """The receiver example of docs/api.md, executed: its ``verify`` and ``receiver``."""
    text = DOCS.read_text()
    marker = "<!-- webhook receiver example: tests/test_webhooks.py executes this block -->"
    found = re.search(re.escape(marker) + r"\s*```python\n(.*?)```", text, re.S)
    assert found, "docs/api.md lost its webhook receiver example"
    namespace: dict[str, Any] = {"__name__": "appchat_docs_example"}
    exec(compile(found.group(1), str(DOCS), "exec"), namespace)
    return namespace


EXAMPLE = docs_example()
verify: Callable[..., bool] = EXAMPLE["verify"]


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    event: dict[str, Any]


class Receiver:
    """An HTTP receiver on 127.0.0.1 that records every delivery (redeliveries too)."""

    def __init__(self, port: int = 0, *, fail_first: int = 0) -> None:
        self.port = port or free_port()
        self.fail_first = fail_first  # answer 503 to this many deliveries first
        self.deliveries: list[Delivery] = []
        self.refused = 0
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def start(self, app: web.Application | None = None) -> Receiver:
        if app is None:
            app = web.Application()
            app.router.add_post("/hooks", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(HOOK_SECRET.encode(), request.headers.get("Appchat-Signature", ""), body):
            self.refused += 1
            return web.Response(status=401)
        if self.fail_first > 0:
            self.fail_first -= 1
            self.note()
            return web.Response(status=503)
        self.deliveries.append(Delivery(dict(request.headers), body, orjson.loads(body)))
        self.note()
        return web.Response(status=204)

    def note(self) -> None:
        self._changed.set()

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [d.event for d in self.deliveries if d.event["type"] == kind]

    async def until(self, done: Callable[[], bool], timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                self._changed.clear()
                await self._changed.wait()


def serve(database: Path | str, *urls: str, more: tuple[str, ...] = ()) -> InProcessServer:
    args = [a for url in urls for a in ("--webhook-url", url)]
    env = {"APPCHAT_WEBHOOK_SECRET": HOOK_SECRET}
    return InProcessServer(database, *args, *FAST, *more, env=env)


def serve_process(database: Path | str, *urls: str, more: tuple[str, ...] = ()) -> ServerProcess:
    """``serve`` as a child process: for SIGKILL and ``--workers``."""
    args = [a for url in urls for a in ("--webhook-url", url)]
    env = {"APPCHAT_WEBHOOK_SECRET": HOOK_SECRET}
    return ServerProcess(database, *args, *FAST, *more, env=env)


def metric(srv: Server, name: str) -> float:
    with urllib.request.urlopen(srv.http("/metrics"), timeout=5) as r:
        text = r.read().decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def until_metric(
    srv: Server, name: str, done: Callable[[float], bool], timeout: float = 30
) -> None:
    async def reached() -> bool:
        return done(await asyncio.to_thread(metric, srv, name))

    await eventually(reached, timeout)


FAILED = 'appchat_webhook_deliveries_total{outcome="failed"}'
DELIVERED = 'appchat_webhook_deliveries_total{outcome="delivered"}'
BACKLOG = "appchat_webhook_backlog"


# --- pure parts ------------------------------------------------------------------------------


def test_the_docs_example_verifies_what_appchat_signs() -> None:
    secret, body, now = HOOK_SECRET.encode(), b'{"id":"e1","type":"message.created"}', 1_800_000_000
    header = sign(secret, body, now)
    assert re.fullmatch(r"t=1800000000,v1=[0-9a-f]{64}", header)
    assert verify(secret, header, body, now=now)
    assert verify(secret, header, body, now=now + 300)  # within the replay window
    assert not verify(secret, header, body, now=now + 301)  # a replay, later
    assert not verify(secret, header, body + b" ", now=now)  # another body
    assert not verify(b"another secret of at least 32 bytes!!", header, body, now=now)
    assert not verify(secret, header.replace("t=1800000000", "t=1800000001"), body, now=now)
    assert not verify(secret, "", body, now=now)
    assert not verify(secret, "v1=" + header.split("v1=")[1], body, now=now)  # no timestamp
    rotated = f"{header},v1={'0' * 64}"  # several signatures: one must match
    assert verify(secret, rotated, body, now=now)


def test_retry_delay_doubles_up_to_the_cap_with_jitter_below_it() -> None:
    options = WebhookOptions(retry_min=1.0, retry_max=600.0)
    assert [retry_delay(n, options, 0.0) for n in (1, 2, 3, 4, 10, 11, 200)] == [
        1.0,
        2.0,
        4.0,
        8.0,
        512.0,
        600.0,
        600.0,
    ]
    assert retry_delay(3, options, 0.999) == pytest.approx(2.002)  # at most half taken off
    assert all(2.0 < retry_delay(3, options, j / 10) <= 4.0 for j in range(10))


def test_an_event_body_is_the_same_bytes_every_time() -> None:
    event = WebhookEvent(
        row=1,
        event_id="e-1",
        url="http://x/",
        type="message.read",
        occurred_at=1_700_000_000_000_001,
        data='{"application_id": 100, "reader_id": 2, "message_id": 9}',
        attempts=0,
        lease=0,
    )
    body = event_body(event)
    assert body == event_body(event)
    assert orjson.loads(body) == {
        "id": "e-1",
        "type": "message.read",
        "created_at": "2023-11-14T22:13:20.000001Z",
        "data": {"session_channel": "100", "reader_id": 2, "message_id": 9},
    }


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--webhook-url", "http://127.0.0.1:9/h"], {}, "--webhook-url needs a signing secret"),
        (["--webhook-url", "ftp://x/h"], {"APPCHAT_WEBHOOK_SECRET": HOOK_SECRET}, "expected http"),
        (["--webhook-url", "http://x/h"], {"APPCHAT_WEBHOOK_SECRET": "short"}, "at least 32"),
        (
            ["--webhook-url", "http://x/h", "--webhook-retry-min", "5", "--webhook-retry-max", "1"],
            {"APPCHAT_WEBHOOK_SECRET": HOOK_SECRET},
            "min <= max",
        ),
        (
            ["--webhook-url", "http://x/h", "--webhook-secret-file", "/nonexistent"],
            {"APPCHAT_WEBHOOK_SECRET": HOOK_SECRET},
            "not both",
        ),
    ],
)
@pytest.mark.usefixtures("root_logging_restored")
def test_bad_webhook_settings_refuse_to_start(
    args: list[str],
    env: dict[str, str],
    says: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("APPCHAT_WEBHOOK_SECRET", "APPCHAT_WEBHOOK_SECRET_FILE", "APPCHAT_WEBHOOK_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("APPCHAT_JWT_SECRET", "x" * 40)
    database = f"sqlite:///{tmp_path / 'never.db'}"
    assert main(["serve", "--port", "0", "--database", database, *args]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "never.db").exists()  # refused before anything was opened


# --- one server, a receiver running the docs example ------------------------------------------


async def test_events_arrive_signed_shaped_like_the_protocol(tmp_path: Path) -> None:
    handled: list[dict[str, Any]] = []
    arrived = asyncio.Event()

    async def handle(event: dict[str, Any]) -> None:
        handled.append(event)
        arrived.set()

    docs_receiver = Receiver()
    await docs_receiver.start(EXAMPLE["receiver"](HOOK_SECRET.encode(), handle))
    url = f"http://127.0.0.1:{docs_receiver.port}/appchat"
    srv = serve(tmp_path / "hooks.db", url).start()
    try:
        async with customer(srv, 100, 900) as c, staff(srv, 1) as s:
            conversation = await c.ok("Event.AddConversation", {"application_id": 100})
            await s.ok("Event.AddConversation", {"application_id": 100})  # exists: no event
            sent = await c.ok("Event.SendMessage", {"session_channel": "100", "content": "hi"})
            await s.push("Event.ReceiveMessage")
            mid = sent["message"]["id"]
            await s.ok("Event.ReadMessage", {"session_channel": "100", "message_id": mid})
            read = await c.push("Event.MessageRead")
            assigned = await s.ok(
                "Event.AssignConversation", {"session_channel": "100", "assignee_id": 1}
            )
        async with asyncio.timeout(30):
            while len(handled) < 4:
                arrived.clear()
                await arrived.wait()
        by_type = {e["type"]: e for e in handled}
        assert by_type["conversation.created"]["data"] == {"conversation": conversation}
        assert by_type["message.created"]["data"] == sent
        assert by_type["message.read"]["data"] == read["result"]
        updated = dict(assigned["conversation"])
        del updated["last_message"]  # its messages have events of their own
        assert by_type["conversation.updated"]["data"] == {"conversation": updated}
        assert len({e["id"] for e in handled}) == 4
        assert all(
            re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", e["created_at"])
            for e in handled
        )
        assert by_type["message.created"]["created_at"] == sent["message"]["create_at"]
        await until_metric(srv, DELIVERED, lambda n: n >= 4)  # counted once settled
        assert metric(srv, DELIVERED) == 4 and metric(srv, FAILED) == 0
        # the docs receiver refuses what was not signed with the secret
        req = urllib.request.Request(
            url,
            data=b'{"id": "forged"}',
            headers={"Appchat-Signature": sign(b"not the secret" * 3, b'{"id": "forged"}', 0)},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            await asyncio.to_thread(urllib.request.urlopen, req, timeout=5)
        assert refused.value.code == 401
        refused.value.close()
        assert len(handled) == 4
    finally:
        assert srv.stop() == 0
        await docs_receiver.stop()


async def test_headers_name_the_event_and_the_attempt(tmp_path: Path) -> None:
    receiver = await Receiver(fail_first=2).start()  # answers 503 twice: retried
    srv = serve(tmp_path / "headers.db", receiver.url).start()
    try:
        async with staff(srv, 1) as s:
            await s.ok("Event.AddConversation", {"application_id": 7})
        await receiver.until(lambda: len(receiver.deliveries) == 1)
        delivery = receiver.deliveries[0]
        assert delivery.headers["Appchat-Event-Id"] == delivery.event["id"]
        assert delivery.headers["Appchat-Event-Type"] == "conversation.created"
        assert delivery.headers["Appchat-Delivery-Attempt"] == "3"
        assert delivery.headers["Content-Type"] == "application/json"
        assert delivery.headers["User-Agent"].startswith("appchat-webhooks/")
        await until_metric(srv, DELIVERED, lambda n: n >= 1)
        assert metric(srv, FAILED) == 2 and metric(srv, DELIVERED) == 1
    finally:
        assert srv.stop() == 0
        await receiver.stop()


async def test_acks_never_wait_for_a_receiver(tmp_path: Path) -> None:
    """A receiver holds its first request unanswered: the chat goes on meanwhile."""
    release, holding = asyncio.Event(), asyncio.Event()
    received: list[str] = []

    async def slow(request: web.Request) -> web.Response:
        received.append(orjson.loads(await request.read())["type"])
        holding.set()
        await release.wait()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hooks", slow)
    receiver = await Receiver().start(app)
    srv = serve(tmp_path / "slow.db", receiver.url, more=("--webhook-timeout", "60"))
    srv.start()
    try:
        async with staff(srv, 1) as s:
            await s.ok("Event.AddConversation", {"application_id": 8})
            async with asyncio.timeout(30):
                await holding.wait()  # the conversation's event is being delivered, held
            for k in range(5):
                await s.ok("Event.SendMessage", {"session_channel": "8", "content": f"m{k}"})
            assert received == ["conversation.created"]  # still held: the acks did not wait
            release.set()
        await until_metric(srv, DELIVERED, lambda n: n == 6)
        assert sorted(received) == ["conversation.created"] + ["message.created"] * 5
    finally:
        release.set()
        assert srv.stop() == 0
        await receiver.stop()


# --- receivers that are down -----------------------------------------------------------------


async def test_a_receiver_down_at_first_gets_the_event_later_and_holds_back_no_other(
    tmp_path: Path,
) -> None:
    up = await Receiver().start()
    down = Receiver()  # its port has nothing listening yet
    srv = serve(tmp_path / "down.db", up.url, down.url).start()
    try:
        async with staff(srv, 1) as s:
            await s.ok("Event.AddConversation", {"application_id": 5})
            sent = await s.ok("Event.SendMessage", {"session_channel": "5", "content": "hi"})
        # the URL that is up has both at once, while the other keeps failing
        await up.until(lambda: len(up.deliveries) == 2)
        await until_metric(srv, FAILED, lambda n: n >= 4)
        await until_metric(srv, BACKLOG, lambda n: n == 2)  # the down URL's two rows wait
        assert down.deliveries == []
        await down.start()
        await down.until(lambda: len(down.deliveries) == 2)
        await until_metric(srv, BACKLOG, lambda n: n == 0)
        assert [d.event for d in down.deliveries if d.event["type"] == "message.created"] == [
            e for e in up.of_type("message.created")
        ]
        assert down.of_type("message.created")[0]["data"] == sent
        assert all(int(d.headers["Appchat-Delivery-Attempt"]) >= 2 for d in down.deliveries)
        assert {d.event["id"] for d in down.deliveries} == {d.event["id"] for d in up.deliveries}
    finally:
        assert srv.stop() == 0
        await up.stop()
        await down.stop()


async def test_a_server_killed_between_the_ack_and_the_delivery_loses_nothing(
    tmp_path: Path,
) -> None:
    receiver = Receiver()  # down
    srv = serve_process(tmp_path / "killed.db", receiver.url).start()
    try:
        async with staff(srv, 1) as s:
            await s.ok("Event.AddConversation", {"application_id": 6})
            sent = await s.ok("Event.SendMessage", {"session_channel": "6", "content": "kept"})
        await until_metric(srv, FAILED, lambda n: n >= 2)  # both tried, neither delivered
        assert srv.stop(signal.SIGKILL) == -signal.SIGKILL
        await receiver.start()
        srv.start()
        await receiver.until(lambda: len(receiver.deliveries) == 2)
        assert receiver.of_type("message.created")[0]["data"] == sent
        assert (
            receiver.of_type("conversation.created")[0]["data"]["conversation"]["application_id"]
            == 6
        )
        await until_metric(srv, DELIVERED, lambda n: n >= 2)  # by the restarted server
        assert len(receiver.deliveries) == 2
    finally:
        assert srv.stop() == 0
        await receiver.stop()


# --- several deliverers on one database ------------------------------------------------------


async def send_through(nodes: Sequence[Server], app: int, count: int) -> list[int]:
    """``count`` messages into application ``app``, through each node in turn; their ids."""
    ids: list[int] = []
    async with staff(nodes[0], 1) as first:
        await first.ok("Event.AddConversation", {"application_id": app})
    for k in range(count):
        node = nodes[k % len(nodes)]
        async with staff(node, 10 + k % 3) as s:
            sent = await s.ok(
                "Event.SendMessage", {"session_channel": str(app), "content": f"m{k}"}
            )
            ids.append(sent["message"]["id"])
            await s.ok("Event.ReadMessage", {"session_channel": str(app), "message_id": ids[-1]})
    return ids


async def delivered_by(nodes: Sequence[Server]) -> float:
    counts = await asyncio.gather(*(asyncio.to_thread(metric, n, DELIVERED) for n in nodes))
    return sum(counts)


async def delivered_once(receiver: Receiver, nodes: Sequence[Server], ids: list[int]) -> None:
    """Every event arrives, then (with nothing left to deliver anywhere) none came twice."""
    expected = 1 + 2 * len(ids)  # the conversation, each message and each read
    await receiver.until(lambda: len({d.event["id"] for d in receiver.deliveries}) == expected)

    async def counted() -> bool:  # the nodes count a delivery once it settled
        return await delivered_by(nodes) >= expected

    await eventually(counted)
    event_ids = [d.event["id"] for d in receiver.deliveries]
    assert len(event_ids) == len(set(event_ids)) == expected
    assert sorted(e["data"]["message"]["id"] for e in receiver.of_type("message.created")) == ids
    assert sum(metric(n, DELIVERED) for n in nodes) == expected


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    try:
        yield r
    finally:
        await r.stop()


async def test_two_nodes_on_postgres_deliver_each_event_exactly_once(receiver: Receiver) -> None:
    require("Redis", "127.0.0.1", 6379)
    with postgres_database() as url:
        prefix = unique_prefix()
        nodes = [
            serve(url, receiver.url, more=("--broker", REDIS_URL, "--channel-prefix", prefix))
            for _ in range(2)
        ]
        await asyncio.gather(*(asyncio.to_thread(n.start) for n in nodes))
        try:
            ids = await send_through(nodes, 300, 24)
            await delivered_once(receiver, nodes, ids)
        finally:
            for n in nodes:
                assert n.stop() == 0


async def test_workers_on_one_sqlite_file_deliver_each_event_exactly_once(
    receiver: Receiver, tmp_path: Path
) -> None:
    require("Redis", "127.0.0.1", 6379)
    more = ("--workers", "2", "--broker", REDIS_URL, "--channel-prefix", unique_prefix())
    srv = serve_process(tmp_path / "workers.db", receiver.url, more=more).start()
    try:
        ids = await send_through([srv], 400, 24)
        expected = 1 + 2 * len(ids)
        await receiver.until(lambda: len({d.event["id"] for d in receiver.deliveries}) == expected)
        # each worker answers /metrics for itself: drained when the outbox is empty
        await until_outbox_empty(tmp_path / "workers.db")
        event_ids = [d.event["id"] for d in receiver.deliveries]
        assert len(event_ids) == len(set(event_ids)) == expected
    finally:
        assert srv.stop() == 0


async def until_outbox_empty(path: Path, timeout: float = 30) -> None:
    def count() -> int:
        with closing(sqlite3.connect(path)) as conn:
            return int(conn.execute("SELECT count(*) FROM webhook_outbox").fetchone()[0])

    async def empty() -> bool:
        return not await asyncio.to_thread(count)

    await eventually(empty, timeout)


# --- the dispatcher in-process, on an injected clock --------------------------------------------

NOW = 1_800_000_000_000_000


async def test_failures_are_rescheduled_in_the_row_then_given_up(tmp_path: Path) -> None:
    attempts: list[dict[str, str]] = []

    async def broken(request: web.Request) -> web.Response:
        body = await request.read()
        header = request.headers["Appchat-Signature"]
        assert verify(HOOK_SECRET.encode(), header, body, now=clock[0] / 1e6)
        attempts.append(dict(request.headers))
        return web.Response(status=500)

    app = web.Application()
    app.router.add_post("/hooks", broken)
    receiver = await Receiver().start(app)
    clock = [NOW]
    metrics = Metrics()
    options = WebhookOptions(timeout=2, retry_min=100, retry_max=1000, give_up=3600)

    def count(outcome: str) -> float:
        value = metrics.registry.get_sample_value(
            "appchat_webhook_deliveries_total", {"outcome": outcome}
        )
        return value or 0.0

    async def until_counted(outcome: str, n: float) -> None:
        await eventually(lambda: count(outcome) >= n, 20, 0.01)

    async with opened_store("sqlite", tmp_path) as store:
        dispatcher = WebhookDispatcher(
            store,
            [receiver.url],
            HOOK_SECRET.encode(),
            options=options,
            metrics=metrics,
            clock_us=lambda: clock[0],
            jitter=lambda: 0.0,
        )
        await dispatcher.start()
        try:
            await store.add_conversation(1, 1, staff=True, now=NOW)  # wakes the dispatcher
            await until_counted("failed", 1)
            backlog = await store.webhook_backlog(receiver.url)
            assert backlog == WebhookBacklog(1, 0, NOW + 100_000_000)  # kept in the row
            clock[0] = NOW + 3600_000_000  # due, and the event is an hour old
            dispatcher.wake()
            await until_counted("given_up", 1)
            assert await store.webhook_backlog(receiver.url) == WebhookBacklog(0, 1, None)
            assert [a["Appchat-Delivery-Attempt"] for a in attempts] == ["1", "2"]
            assert len({a["Appchat-Event-Id"] for a in attempts}) == 1
            assert count("delivered") == 0
        finally:
            await dispatcher.stop()
            await receiver.stop()
