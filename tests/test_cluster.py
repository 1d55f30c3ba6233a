"""Several nodes on PostgreSQL and Redis: cross-node delivery, gap-free history, faults."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from .backends import (
    REDIS_URL,
    PrivateRedis,
    free_port,
    postgres_database,
    reachable,
    require,
    unique_prefix,
)
from .support import (
    InProcessServer,
    Server,
    ServerProcess,
    TcpProxy,
    client,
    connections,
    customer,
    eventually,
    staff,
    status,
    token,
    wait_until,
)


def start_nodes(count: int, database: str, broker: str, prefix: str) -> list[InProcessServer]:
    """Start ``count`` nodes at once (they race to migrate the same database)."""
    return _start_all(
        [
            InProcessServer(database, "--broker", broker, "--channel-prefix", prefix, "--rate", "0")
            for _ in range(count)
        ]
    )


def _start_all(nodes: list[InProcessServer]) -> list[InProcessServer]:
    with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
        list(pool.map(lambda n: n.start(), nodes))
    return nodes


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[InProcessServer]]:
    require("Redis", "127.0.0.1", 6379)
    with postgres_database() as url:
        nodes = start_nodes(2, url, REDIS_URL, unique_prefix())
        try:
            yield nodes
        finally:
            for n in nodes:
                n.stop()


async def test_chat_across_nodes_both_ways(cluster: list[Server]) -> None:
    a, b = cluster
    async with customer(a, 100, 900) as c, staff(b, 1) as s:
        await c.ok("Event.AddConversation", {"application_id": 100})
        await s.ok("Event.AddConversation", {"application_id": 100})
        sent = await c.ok("Event.SendMessage", {"session_channel": "100", "content": "from A"})
        assert (await s.push("Event.ReceiveMessage"))["result"] == sent
        back = await s.ok("Event.SendMessage", {"session_channel": "100", "content": "from B"})
        assert (await c.push("Event.ReceiveMessage"))["result"] == back
        await s.ok(
            "Event.ReadMessage", {"session_channel": "100", "message_id": sent["message"]["id"]}
        )
        read = await c.push("Event.MessageRead")
        assert read["result"]["reader_id"] == 1
        await c.no_push()
        await s.no_push()


async def test_second_device_on_the_other_node(cluster: list[Server]) -> None:
    a, b = cluster
    async with (
        customer(a, 101, 901) as c,
        staff(a, 2) as desk,
        staff(b, 2) as phone,
    ):
        await c.ok("Event.AddConversation", {"application_id": 101})
        await desk.ok("Event.AddConversation", {"application_id": 101})
        sent = await c.ok("Event.SendMessage", {"session_channel": "101", "content": "hello"})
        for device in (desk, phone):
            assert (await device.push("Event.ReceiveMessage"))["result"] == sent
        mine = await desk.ok("Event.SendMessage", {"session_channel": "101", "content": "hi"})
        assert (await phone.push("Event.ReceiveMessage"))["result"] == mine
        assert (await c.push("Event.ReceiveMessage"))["result"] == mine
        await desk.ok(
            "Event.ReadMessage", {"session_channel": "101", "message_id": sent["message"]["id"]}
        )
        assert (await phone.push("Event.MessageRead"))["result"]["reader_id"] == 2
        await desk.no_push()


async def test_racing_nodes_leave_no_gap_for_after_id(cluster: list[Server]) -> None:
    """Writers on both nodes race into one conversation while readers page with after_id;
    every reader must collect every message, never skipping an id it passed."""
    a, b = cluster
    app, writers_per_node, per_writer = 102, 6, 25
    async with staff(a, 3) as s:
        await s.ok("Event.AddConversation", {"application_id": app})
    done = asyncio.Event()

    async def writer(node: Server, sid: int) -> None:
        async with staff(node, sid) as w:
            for i in range(per_writer):
                await w.ok(
                    "Event.SendMessage", {"session_channel": str(app), "content": f"{sid}-{i}"}
                )

    async def reader(node: Server, sid: int) -> list[int]:
        seen: list[int] = []
        async with staff(node, sid) as r:
            cursor = 0
            while True:
                finished = done.is_set()
                page = await r.ok(
                    "Event.GetMessageList",
                    {"session_channel": str(app), "after_id": cursor, "limit": 500},
                )
                ids = [m["id"] for m in page["Messages"]]
                seen += ids
                if ids:
                    cursor = ids[-1]
                if finished and not ids:
                    return seen

    readers = [asyncio.create_task(reader(n, 50 + i)) for i, n in enumerate((a, b))]
    await asyncio.gather(
        *(writer(n, 10 + i * 10 + j) for i, n in enumerate((a, b)) for j in range(writers_per_node))
    )
    done.set()
    collected = await asyncio.gather(*readers)
    async with staff(b, 3) as s:
        everything: list[int] = []
        cursor = 0
        while True:
            page = await s.ok(
                "Event.GetMessageList",
                {"session_channel": str(app), "after_id": cursor, "limit": 500},
            )
            everything += [m["id"] for m in page["Messages"]]
            if not page["has_more"]:
                break
            cursor = everything[-1]
    assert len(everything) == 2 * writers_per_node * per_writer
    for seen in collected:
        assert seen == everything


def _readyz(node: Server) -> int:
    try:
        with urllib.request.urlopen(node.http("/readyz"), timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


async def test_postgres_down_is_unavailable_never_a_false_ack(tmp_path: Path) -> None:
    with postgres_database() as url:
        proxy = await TcpProxy(5432).start()
        proxied = url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        # the proxy runs on this event loop: start the node without blocking it
        node = await asyncio.to_thread(InProcessServer(proxied, "--rate", "0").start)
        try:
            async with staff(node, 1) as s:
                await s.ok("Event.AddConversation", {"application_id": 5})
                await s.ok("Event.SendMessage", {"session_channel": "5", "content": "before"})
                assert await asyncio.to_thread(_readyz, node) == 200
                await proxy.stop()
                for attempt in range(3):
                    reply = await s.call(
                        "Event.SendMessage",
                        {"session_channel": "5", "content": f"lost {attempt}"},
                        timeout=30,
                    )
                    assert reply["ok"] is False, reply
                    assert reply["error"]["code"] == "unavailable"
                assert await asyncio.to_thread(_readyz, node) == 503
                await proxy.start()

                async def sent_again() -> bool:
                    reply = await s.call(
                        "Event.SendMessage", {"session_channel": "5", "content": "after"}
                    )
                    assert reply["ok"] or reply["error"]["code"] == "unavailable", reply
                    return bool(reply["ok"])

                await eventually(sent_again, timeout=20, interval=0.2, what="a send once back")
                page = await s.ok("Event.GetMessageList", {"session_channel": "5"})
                assert [m["content"] for m in page["Messages"]] == ["before", "after"]
                assert await asyncio.to_thread(_readyz, node) == 200
        finally:
            await asyncio.to_thread(node.stop)
            await proxy.stop()


@asynccontextmanager
async def two_nodes_on_a_private_redis(
    tmp_path: Path,
) -> AsyncIterator[tuple[PrivateRedis, InProcessServer, InProcessServer]]:
    """Two nodes on one PostgreSQL database and on a Redis of the test's own, which the test
    may kill, start again or stop."""
    require("Redis", "127.0.0.1", 6379)  # the binary is what matters; the service proves it
    redis = PrivateRedis(tmp_path)
    redis.start()
    try:
        with postgres_database() as url:
            a, b = await asyncio.to_thread(
                _start_all,
                [InProcessServer(url, "--broker", redis.url, "--rate", "0") for _ in range(2)],
            )
            try:
                yield redis, a, b
            finally:
                for n in (a, b):
                    await asyncio.to_thread(n.stop)
    finally:
        redis.kill()


async def test_redis_restart_mid_traffic(tmp_path: Path) -> None:
    async with (
        two_nodes_on_a_private_redis(tmp_path) as (redis, a, b),
        customer(a, 300, 950) as c,
        staff(b, 1) as s,
    ):
        await c.ok("Event.AddConversation", {"application_id": 300})
        await s.ok("Event.AddConversation", {"application_id": 300})
        sent: list[int] = []
        first = await c.ok("Event.SendMessage", {"session_channel": "300", "content": "0"})
        sent.append(first["message"]["id"])
        await s.push("Event.ReceiveMessage")

        redis.kill()
        for i in range(1, 6):  # committed while the broker is gone: still acked
            r = await c.ok("Event.SendMessage", {"session_channel": "300", "content": str(i)})
            sent.append(r["message"]["id"])
        redis.start()

        # both nodes come back and tell their clients to refetch
        for who in (c, s):
            frame = await who.push(timeout=20)
            while frame["name"] != "Event.Resync":
                frame = await who.push(timeout=20)
            assert frame["result"] is None
        page = await s.ok("Event.GetMessageList", {"session_channel": "300"})
        assert [m["id"] for m in page["Messages"]] == sent

        # and pushes flow across nodes again, from the very first message
        r = await c.ok("Event.SendMessage", {"session_channel": "300", "content": "again"})
        frame = await s.push(timeout=5)
        while frame["name"] == "Event.Resync":  # node A's, for what it lost
            frame = await s.push(timeout=5)
        assert frame["name"] == "Event.ReceiveMessage" and frame["result"] == r


async def test_a_stopped_broker_stalls_no_ack_and_silences_no_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keepalive = {"ping_interval": 0.5, "ping_timeout": 1.5}  # as a mobile app would

    def gave_up() -> bool:
        """Whether a node gave up publishing a push: after its publish timeout (2 s), so
        what comes before it did not wait for the broker."""
        return "pushes not published" in caplog.text

    async with two_nodes_on_a_private_redis(tmp_path) as (redis, a, b):
        assert redis.proc is not None
        async with (
            client(a, 960, token(request_id=310, sid=960), **keepalive) as c,
            client(b, 9, token(admin_id=9), **keepalive) as s,
        ):
            await c.ok("Event.AddConversation", {"application_id": 310})
            await s.ok("Event.AddConversation", {"application_id": 310})
            first = await c.ok("Event.SendMessage", {"session_channel": "310", "content": "0"})
            assert (await s.push("Event.ReceiveMessage"))["result"] == first

            redis.proc.send_signal(signal.SIGSTOP)  # open socket, nobody answers
            try:
                stalled = await c.ok(
                    "Event.SendMessage", {"session_channel": "310", "content": "1"}
                )
                # The ack waits for the commit only; a ping and the next request wait for
                # nothing either: all three come before node A gives up on the broker.
                await asyncio.wait_for(await c.ws.ping(), 10)
                await c.ok("Event.GetUnreadInfo", {})
                assert not gave_up()
                # The connection answers pings all along, past the publish timeout: until
                # node A gave up, and a round after.
                async with asyncio.timeout(30):
                    while not gave_up():
                        pong = await c.ws.ping()
                        await asyncio.wait_for(pong, 1.0)
                        await c.ok("Event.GetUnreadInfo", {})
                        await asyncio.sleep(0.25)
                await asyncio.wait_for(await c.ws.ping(), 1.0)
                await c.ok("Event.GetUnreadInfo", {})
                # A new participant's handshake ends in bounded time: in, or 503.
                started = time.monotonic()
                code = await asyncio.wait_for(status(a, 961, token(request_id=311, sid=961)), 10)
                assert code in (101, 503) and time.monotonic() - started < 5, code
            finally:
                redis.proc.send_signal(signal.SIGCONT)

            # Staff on the other node lost the push: it is told to refetch.
            frame = await s.push(timeout=20)
            while frame["name"] != "Event.Resync":
                assert frame["result"] == stalled  # (a late copy of the lost push)
                frame = await s.push(timeout=20)
            page = await s.ok("Event.GetMessageList", {"session_channel": "310"})
            assert [m["id"] for m in page["Messages"]][-1] == stalled["message"]["id"]
            # Pushes flow again.
            again = await c.ok("Event.SendMessage", {"session_channel": "310", "content": "2"})
            frame = await s.push("Event.ReceiveMessage", timeout=10)
            while frame["result"] != again:
                assert frame["result"] == stalled
                frame = await s.push("Event.ReceiveMessage", timeout=10)
            # Neither client gave up on its connection for want of a pong.
            assert c.ws.close_code is None and s.ws.close_code is None


def test_nodes_report_ready(cluster: list[Server]) -> None:
    for node in cluster:
        with urllib.request.urlopen(node.http("/readyz"), timeout=5) as r:
            body = json.loads(r.read())
        assert body["checks"] == {"database": "ok", "broker": "ok"}


NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_in_front(nodes: list[Server], workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Run nginx with deploy/nginx/appchat.conf (as shipped), pointed at these nodes."""
    from .test_hardening import self_signed

    cert, key = self_signed(workdir)
    port = free_port()
    site = (Path(__file__).parent.parent / "deploy" / "nginx" / "appchat.conf").read_text()
    upstreams = "".join(f"    server 127.0.0.1:{n.port};\n" for n in nodes)
    site = re.sub(r"(upstream appchat_nodes \{\n)(?:    server .*\n)+", r"\g<1>" + upstreams, site)
    site = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
    site = site.replace("/etc/ssl/appchat/fullchain.pem", str(cert))
    site = site.replace("/etc/ssl/appchat/privkey.pem", str(key))
    (workdir / "appchat.conf").write_text(site)
    (workdir / "nginx.conf").write_text(
        f"daemon off;\nuser root;\nworker_processes 1;\npid {workdir}/nginx.pid;\n"
        f"error_log {workdir}/error.log warn;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {workdir}/body;\n"
        f"  proxy_temp_path {workdir}/proxy;\n  fastcgi_temp_path {workdir}/fcgi;\n"
        f"  uwsgi_temp_path {workdir}/uwsgi;\n  scgi_temp_path {workdir}/scgi;\n"
        f"  include {workdir}/appchat.conf;\n}}\n"
    )
    proc = subprocess.Popen(
        [NGINX, "-c", str(workdir / "nginx.conf"), "-e", str(workdir / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        assert proc.poll() is None, (workdir / "error.log").read_text()
        return reachable("127.0.0.1", port)

    wait_until(listening, what="nginx listening")
    return proc, port


def require_nginx() -> None:
    if not os.path.exists(NGINX):
        if os.environ.get("CI"):
            pytest.fail("nginx is missing (CI requires it: apt-get install nginx-light)")
        pytest.skip("SKIPPED LOUDLY: nginx is not installed")


async def test_behind_nginx_with_tls_no_sticky_sessions(
    cluster: list[Server], tmp_path: Path
) -> None:
    require_nginx()
    proc, port = nginx_in_front(cluster, tmp_path)
    try:
        front = ServerProcess(tmp_path / "unused.db")
        front.port, front.scheme = port, "wss"
        ctx = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        async with AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    client(front, 700 + i, token(request_id=400, sid=700 + i), ssl=ctx)
                )
                for i in range(4)
            ]
            staff_c = await stack.enter_async_context(client(front, 1, token(admin_id=1), ssl=ctx))
            # round robin spread the five sockets over both nodes
            counts = [await asyncio.to_thread(connections, n) for n in cluster]
            assert all(count >= 1 for count in counts), counts
            await staff_c.ok("Event.AddConversation", {"application_id": 400})
            for c in clients:
                await c.ok("Event.AddConversation", {"application_id": 400})
            sent = await clients[0].ok(
                "Event.SendMessage", {"session_channel": "400", "content": "via nginx"}
            )
            for other in [*clients[1:], staff_c]:
                assert (await other.push("Event.ReceiveMessage"))["result"] == sent
        ready = f"https://127.0.0.1:{port}/readyz"
        status = await asyncio.to_thread(lambda: urllib.request.urlopen(ready, context=ctx).status)
        assert status == 200
    finally:
        proc.terminate()
        proc.wait(10)
