"""Away notices (SPEC, third round, "Offline notification"): the ``participant.unread``
webhook for a participant with no connection on any node for ``--notify-after`` and unread
messages, once per participant and conversation until they read.

The rules run through ChatService with a real store on both engines and a clock the tests
move; two "nodes" are two ``AwayNotices`` on one database, each with the users connected
to it. The must-show runs real servers: two nodes on PostgreSQL and Redis, the node of the
participant's last connection killed, the notice delivered once to a real receiver.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import signal
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

import appchat.chat.notices as notices_module
from appchat.chat.notices import AwayNotices, scan_interval, seen_interval
from appchat.store import Store
from appchat.store.notices import PARTICIPANT_UNREAD, UnreadNotice
from appchat.webhooks.dispatcher import event_body

from .backends import REDIS_URL, postgres_database, require, unique_prefix
from .support import Client, customer, staff
from .test_desk import Clock, chat, clock  # noqa: F401
from .test_service import Chat, store  # noqa: F401
from .test_webhooks import Receiver, serve, serve_process

URL = "http://127.0.0.1:9/hook"
DOCS = Path(__file__).parent.parent / "docs" / "api.md"
SECOND = 1_000_000
NOTIFY = 300.0  # --notify-after of these tests (the default)


class Here:
    """The users with a connection on one node, as its hub lists them."""

    def __init__(self) -> None:
        self.users: set[int] = set()

    def connected_user_ids(self) -> list[int]:
        return sorted(self.users)


class Node:
    """One node's part: its connections and its ``AwayNotices``."""

    def __init__(self, store: Store, clock: Clock) -> None:  # noqa: F811
        self.here = Here()
        self.notices = AwayNotices(store, self.here, notify_after=NOTIFY, clock_us=clock)

    async def connect(self, user_id: int) -> None:
        """``user_id``'s first connection here opened (what ``Hub.register`` reports)."""
        self.here.users.add(user_id)
        self.notices.user_edge(user_id)
        await self.notices.write_edges()

    async def leave(self, user_id: int) -> None:
        self.here.users.discard(user_id)
        self.notices.user_edge(user_id)
        await self.notices.write_edges()

    async def look(self) -> list[tuple[int, int, int]]:
        """The notices this node recorded: (application, user, unread) each."""
        return [(n.application_id, n.user_id, n.unread) for n in await self.notices.look()]


async def sent(store: Store) -> list[dict[str, Any]]:  # noqa: F811
    """The ``participant.unread`` events recorded since the last call, as a receiver gets
    their ``data``."""
    events = await store.claim_webhooks(URL, now=2**62, lease_until=2**62 + 1, limit=1000)
    return [orjson.loads(event_body(e))["data"] for e in events if e.type == PARTICIPANT_UNREAD]


def hook(chat: Chat) -> Chat:  # noqa: F811
    """``chat`` with webhooks on (its store records events for ``URL``)."""
    chat.store.record_webhooks([URL], lambda: None)
    return chat


def test_the_intervals_follow_notify_after() -> None:
    assert (seen_interval(300), scan_interval(300)) == (60.0, 10.0)
    assert (seen_interval(2), scan_interval(2)) == (0.5, 0.2)
    assert (seen_interval(3600), scan_interval(3600)) == (60.0, 10.0)


async def test_one_notice_once_away_with_unread_and_none_while_there(
    chat: Chat,  # noqa: F811
    clock: Clock,  # noqa: F811
) -> None:
    node = Node(hook(chat).store, clock)
    agent, visitor = chat.staff(1), chat.customer(100, 5)
    await chat.add(agent, 100)
    await node.connect(5)
    await chat.add(visitor, 100)
    await chat.send(visitor, 100, "Where is my parcel?")  # their own: never unread
    assert await node.look() == []
    answer = await chat.send(agent, 100, "On its way")
    assert await node.look() == []  # connected
    clock.now += 299 * SECOND
    await node.notices.write_seen()  # a node refreshes its users while they stay
    clock.now += 299 * SECOND
    assert await node.look() == []  # connected all along: seen 299 s ago
    await node.leave(5)
    clock.now += 299 * SECOND
    assert await node.look() == []  # gone, not for --notify-after yet
    clock.now += 2 * SECOND
    assert await node.look() == [(100, 5, 1)]
    (data,) = await sent(chat.store)
    assert data == {
        "application_id": 100,
        "user_id": 5,
        "unread": 1,
        "last_message": {**answer, "status": 0},
    }
    assert data["last_message"]["content"] == "On its way"
    # The agent (1) has an unread message too, but was never seen connected: no notice.
    clock.now += 3600 * SECOND
    assert await node.look() == []
    assert await sent(chat.store) == []


async def test_no_second_notice_until_they_read(chat: Chat, clock: Clock) -> None:  # noqa: F811
    node, other = Node(hook(chat).store, clock), Node(chat.store, clock)
    agent, visitor = chat.staff(1), chat.customer(100, 5)
    await chat.add(agent, 100)
    await node.connect(5)
    await chat.add(visitor, 100)
    first = await chat.send(agent, 100, "one")
    await node.leave(5)
    clock.now += 301 * SECOND
    assert await node.look() == [(100, 5, 1)]
    assert len(await sent(chat.store)) == 1

    # More messages, another node, a node started afresh (nothing in memory): no second.
    await chat.send(agent, 100, "two")
    third = await chat.send(agent, 100, "three")
    restarted = Node(chat.store, clock)
    assert await node.look() == [] and await other.look() == []
    assert await restarted.look() == []
    clock.now += 3600 * SECOND
    assert await node.look() == [] and await restarted.look() == []
    assert await sent(chat.store) == []

    # They come back on the other node, read the first, leave: away again, a new one.
    await other.connect(5)
    await chat.read(visitor, 100, first["id"])
    await other.leave(5)
    clock.now += 299 * SECOND
    assert await node.look() == []
    clock.now += 2 * SECOND
    assert await node.look() == [(100, 5, 2)]
    (data,) = await sent(chat.store)
    assert (data["unread"], data["last_message"]["content"]) == (2, "three")

    # They read everything: nothing is due while nothing is unread.
    await other.connect(5)
    await chat.read(visitor, 100, third["id"])
    await other.leave(5)
    clock.now += 400 * SECOND
    assert await node.look() == []
    # A message while they are away: due at the next look.
    clock.now += 10 * SECOND
    await chat.send(agent, 100, "four")
    assert await node.look() == [(100, 5, 1)]
    (data,) = await sent(chat.store)
    assert data["last_message"]["content"] == "four"


async def test_two_nodes_looking_at_once_record_each_notice_once(
    chat: Chat,  # noqa: F811
    clock: Clock,  # noqa: F811
) -> None:
    nodes = [Node(hook(chat).store, clock) for _ in range(3)]
    agent = chat.staff(1)
    for app in range(100, 110):
        await chat.add(agent, app)
        await nodes[0].connect(app)
        await chat.add(chat.customer(app, app), app)
        await chat.send(agent, app, f"to {app}")
        await nodes[0].leave(app)
    clock.now += 301 * SECOND
    looks = await asyncio.gather(*(n.look() for n in nodes))
    recorded = sorted(n for look in looks for n in look)
    assert recorded == [(app, app, 1) for app in range(100, 110)]
    assert sorted(d["user_id"] for d in await sent(chat.store)) == list(range(100, 110))


async def test_a_look_takes_every_notice_due_in_batches(
    chat: Chat,  # noqa: F811
    clock: Clock,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(notices_module, "BATCH", 3)
    node = Node(hook(chat).store, clock)
    agent = chat.staff(1)
    await chat.add(agent, 100)
    for user in range(10, 18):
        await node.connect(user)
        await chat.add(chat.customer(100, user), 100)
        await node.leave(user)
    await chat.send(agent, 100, "to everyone")
    clock.now += 301 * SECOND
    assert sorted(await node.look()) == [(100, user, 1) for user in range(10, 18)]
    assert len(await sent(chat.store)) == 8


async def test_a_look_after_the_first_covers_what_changed_since(
    chat: Chat,  # noqa: F811
    clock: Clock,  # noqa: F811
) -> None:
    """Each look after the first asks only for participants who became away, or whose
    conversation had a message, since the previous one (less a margin): both kinds are
    found, however long ago the participant left."""
    node = Node(hook(chat).store, clock)
    agent = chat.staff(1)
    await chat.add(agent, 100)
    await chat.add(agent, 200)
    await node.connect(5)
    await node.connect(6)
    await chat.add(chat.customer(100, 5), 100)
    await chat.add(chat.customer(200, 6), 200)
    await node.leave(5)  # long before any look
    clock.now += 400 * SECOND
    assert await node.look() == []  # the first: everything; nothing unread yet
    clock.now += 100 * SECOND
    await node.notices.write_seen()  # 6 is still here
    await chat.send(agent, 100, "a message for someone away for 500 s")
    await chat.send(agent, 200, "a message for someone here")
    assert await node.look() == [(100, 5, 1)]
    clock.now += 20 * SECOND
    await node.leave(6)
    clock.now += 250 * SECOND
    assert await node.look() == []
    clock.now += 51 * SECOND  # 6 away for 301 s
    assert await node.look() == [(200, 6, 1)]

    # What the store is asked: the same participant, found or not by ``since``.
    await node.connect(6)
    await chat.read(chat.customer(200, 6), 200, (await chat.send(agent, 200, "x"))["id"] - 1)
    await node.leave(6)
    left = clock.now  # away from left + 300 s
    clock.now += 302 * SECOND
    ask: dict[str, Any] = {"now": clock.now, "away_before": clock.now - 300 * SECOND, "limit": 10}
    # Away and the message both before ``since``: a look since then had seen them.
    assert (await chat.store.notice_unread(since=left + 301 * SECOND, **ask)).found == 0
    found = await chat.store.notice_unread(since=left + 299 * SECOND, **ask)
    assert (found.found, [(n.user_id, n.unread) for n in found.recorded]) == (1, [(6, 1)])


async def test_nothing_is_written_or_sent_without_webhooks(chat: Chat, clock: Clock) -> None:  # noqa: F811
    node = Node(chat.store, clock)
    agent = chat.staff(1)
    await chat.add(agent, 100)
    await node.connect(5)
    await node.notices.write_seen()
    await chat.add(chat.customer(100, 5), 100)
    await chat.send(agent, 100, "hello")
    await node.leave(5)
    clock.now += 3600 * SECOND
    assert await node.look() == []
    # Had the user been kept as seen, turning webhooks on now would notice them at once.
    chat.store.record_webhooks([URL], lambda: None)
    assert await node.look() == []
    assert await sent(chat.store) == []


async def test_a_graceful_stop_writes_the_users_who_left(chat: Chat, clock: Clock) -> None:  # noqa: F811
    node = Node(hook(chat).store, clock)
    agent = chat.staff(1)
    await chat.add(agent, 100)
    await node.connect(5)
    await chat.add(chat.customer(100, 5), 100)
    await chat.send(agent, 100, "hello")
    clock.now += 200 * SECOND  # connected all along, but not written since
    node.here.users.discard(5)
    node.notices.user_edge(5)  # its connection closed as the node stopped
    await node.notices.stop()
    clock.now += 299 * SECOND
    assert await Node(chat.store, clock).look() == []  # seen until the stop
    clock.now += 2 * SECOND
    assert await Node(chat.store, clock).look() == [(100, 5, 1)]


def unread_notices(receiver: Receiver, user_id: int) -> list[dict[str, Any]]:
    """The ``participant.unread`` events of ``user_id`` received, each once (a delivery
    repeated with the same id is the at-least-once of every webhook, not a second one)."""
    events = [e for e in receiver.of_type(PARTICIPANT_UNREAD) if e["data"]["user_id"] == user_id]
    return list({e["id"]: e for e in events}.values())


async def pushed(client: Client, content: str) -> None:
    async with asyncio.timeout(10):
        while True:
            frame = await client.pushes.get()
            if (
                frame["name"] == "Event.ReceiveMessage"
                and frame["result"]["message"]["content"] == content
            ):
                return


@pytest.fixture
def cluster_database() -> Iterator[str]:
    require("Redis", "127.0.0.1", 6379)
    with postgres_database() as url:
        yield url


async def test_the_node_of_the_last_connection_killed_the_notice_comes_once(
    cluster_database: str,
) -> None:
    """Two nodes on PostgreSQL and Redis: the customer's only connection is on node A,
    which is killed (SIGKILL: nothing written on the way out). Node B finds them away
    ``--notify-after`` after A's last refresh, and the notice arrives once, also after
    more messages and a restart of A."""
    receiver = await Receiver().start()
    more = (
        "--broker",
        REDIS_URL,
        "--channel-prefix",
        unique_prefix(),
        "--notify-after",
        "2",
    )
    # Started and stopped beside this loop: the receiver answers meanwhile.
    b = await asyncio.to_thread(serve(cluster_database, receiver.url, more=more).start)
    a = await asyncio.to_thread(serve_process(cluster_database, receiver.url, more=more).start)
    try:
        async with staff(b, 1) as agent:
            for app, sid in ((8101, 9101), (8102, 9102), (8103, 9103)):
                await agent.ok("Event.AddConversation", {"application_id": app})
                async with customer(b if sid != 9101 else a, app, sid) as c:
                    await c.ok("Event.AddConversation", {"application_id": app})
            async with customer(a, 8101, 9101) as visitor:
                await agent.ok("Event.SendMessage", {"session_channel": "8101", "content": "hi"})
                await pushed(visitor, "hi")
                # 9102 comes and goes (on B) after 9101 connected: once its notice is here,
                # 9101 has been connected (on A) for longer than --notify-after.
                async with customer(b, 8102, 9102):
                    pass
                await agent.ok("Event.SendMessage", {"session_channel": "8102", "content": "yo"})
                await receiver.until(lambda: len(unread_notices(receiver, 9102)) == 1)
                killed_at = datetime.now(UTC)
                assert await asyncio.to_thread(a.stop, signal.SIGKILL) == -signal.SIGKILL
                await receiver.until(lambda: len(unread_notices(receiver, 9101)) == 1)
            (notice,) = unread_notices(receiver, 9101)
            # Recorded after the kill: while A lived, it kept 9101 seen.
            assert datetime.fromisoformat(notice["created_at"]) > killed_at
            assert notice["data"]["application_id"] == 8101
            assert notice["data"]["unread"] == 1
            assert notice["data"]["last_message"]["content"] == "hi"

            # More messages, A back (its first look covers everything): no second notice.
            await asyncio.to_thread(a.start)
            await agent.ok("Event.SendMessage", {"session_channel": "8101", "content": "again"})
            async with customer(a, 8103, 9103):
                pass  # 9103 leaves from A
            await agent.ok("Event.SendMessage", {"session_channel": "8103", "content": "clock"})
            await receiver.until(lambda: len(unread_notices(receiver, 9103)) == 1)
            assert len(unread_notices(receiver, 9101)) == 1
            assert len(unread_notices(receiver, 9102)) == 1
    finally:
        await asyncio.to_thread(b.stop)
        await asyncio.to_thread(a.stop)
        await receiver.stop()


async def test_workers_on_one_sqlite_file_record_each_notice_once(tmp_path: Path) -> None:
    """``serve --workers 2``: both processes look every 0.1 s on one file; each away
    participant's notice is recorded by one of them."""
    require("Redis", "127.0.0.1", 6379)
    receiver = await Receiver().start()
    more = (
        *("--workers", "2", "--notify-after", "1"),
        *("--broker", REDIS_URL, "--channel-prefix", unique_prefix()),
    )
    srv = await asyncio.to_thread(serve_process(tmp_path / "w.db", receiver.url, more=more).start)
    users = {8200 + k: 9200 + k for k in range(1, 9)}  # application -> customer
    try:
        async with staff(srv, 1) as agent:
            for app, sid in users.items():
                await agent.ok("Event.AddConversation", {"application_id": app})
                async with customer(srv, app, sid) as c:
                    await c.ok("Event.AddConversation", {"application_id": app})
            for app in users:
                args = {"session_channel": str(app), "content": f"for {app}"}
                await agent.ok("Event.SendMessage", args)

            def noticed() -> bool:
                return all(unread_notices(receiver, sid) for sid in users.values())

            await receiver.until(noticed)
            async with customer(srv, 8299, 9299) as c:  # the clock: a look or ten later
                await c.ok("Event.AddConversation", {"application_id": 8299})
            await agent.ok("Event.SendMessage", {"session_channel": "8299", "content": "tick"})
            await receiver.until(lambda: bool(unread_notices(receiver, 9299)))
            for app, sid in users.items():
                (notice,) = unread_notices(receiver, sid)
                assert notice["data"]["application_id"] == app
                assert notice["data"]["last_message"]["content"] == f"for {app}"
    finally:
        await asyncio.to_thread(srv.stop)
        await receiver.stop()


def email_example() -> dict[str, Any]:
    """The e-mail handler of docs/api.md's away notices, executed."""
    text = DOCS.read_text()
    marker = "<!-- unread e-mail example: tests/test_away_notices.py executes this block -->"
    found = re.search(re.escape(marker) + r"\s*```python\n(.*?)```", text, re.S)
    assert found, "docs/api.md lost its unread e-mail example"
    namespace: dict[str, Any] = {"__name__": "appchat_docs_email"}
    exec(compile(found.group(1), str(DOCS), "exec"), namespace)
    return namespace


class Smtp:
    """A minimal SMTP server on 127.0.0.1 that keeps each mail's DATA."""

    def __init__(self) -> None:
        self.mails: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 test\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"DATA":
                writer.write(b"354 go on\r\n")
                data = await reader.readuntil(b"\r\n.\r\n")
                self.mails.append(data[: -len(b"\r\n.\r\n")])
                writer.write(b"250 kept\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:  # EHLO, MAIL, RCPT, RSET …
                writer.write(b"250 ok\r\n")
            await writer.drain()
        await writer.drain()
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_the_docs_handler_turns_a_notice_into_an_email(chat: Chat, clock: Clock) -> None:  # noqa: F811
    node = Node(hook(chat).store, clock)
    agent = chat.staff(1)
    await chat.add(agent, 100)
    await chat.add(agent, 200)
    for app, user in ((100, 5), (200, 6)):
        await node.connect(user)
        await chat.add(chat.customer(app, user), app)
        await node.leave(user)
    await chat.send(agent, 100, "first")
    await chat.send(agent, 100, "Your parcel left today")
    await chat.send(agent, 200, "hello")
    clock.now += 301 * SECOND
    assert len(await node.look()) == 2
    events = await chat.store.claim_webhooks(URL, now=2**62, lease_until=2**62 + 1, limit=100)
    bodies = [orjson.loads(event_body(e)) for e in events]

    example = email_example()
    smtp = Smtp()
    example["SMTP_HOST"] = await smtp.start()
    addresses = {5: "visitor@example.org"}  # 6 left no address

    async def address_of(user_id: int) -> str | None:
        return addresses.get(user_id)

    handle = example["email_unread"](address_of)
    try:
        for body in bodies:  # message.created, conversation.created …: skipped
            await handle(body)
    finally:
        await smtp.stop()
    (raw,) = smtp.mails
    mail = email.message_from_bytes(raw, policy=email.policy.default)
    assert mail["To"] == "visitor@example.org"
    assert mail["Subject"] == "2 unread messages from support"
    text = mail.get_content()
    assert "Your parcel left today" in text and "first" not in text
    assert "https://example.com/support/100" in text


async def test_notice_data_is_the_documented_shape() -> None:
    """What a receiver gets: application_id, user_id, unread, last_message (or null)."""
    from appchat.protocol.models import Message, WebhookEvent
    from appchat.store.notices import notice_data

    message = Message(7, 100, 1, "hello", 1, 0, 1_600_000_000_000_000, 1_600_000_000_000_000)
    for last, shown in ((message, {"id": 7, "content": "hello"}), (None, None)):
        data = notice_data(UnreadNotice(100, 5, 3, last))
        event = WebhookEvent(1, "e", URL, PARTICIPANT_UNREAD, 1_600_000_000_000_000, data, 0, 0)
        body = orjson.loads(event_body(event))
        assert body["type"] == "participant.unread"
        got = body["data"]
        assert (got["application_id"], got["user_id"], got["unread"]) == (100, 5, 3)
        if shown is None:
            assert got["last_message"] is None
        else:
            assert {k: got["last_message"][k] for k in shown} == shown
            assert got["last_message"]["session_channel"] == "100"
