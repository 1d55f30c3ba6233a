"""Event.Typing: forwarded to the other participants as Event.ReceiveTyping, checked like
SendMessage, never stored, at most one forwarded per connection and conversation per interval."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import orjson

from appchat.auth.tokens import TokenVerifier, bind, mint
from appchat.chat.service import TYPING_INTERVAL_US, ChatService
from appchat.common.ratelimit import Throttle
from appchat.store.sqlite import SqliteStore

from .backends import REDIS_URL, postgres_database, require, unique_prefix
from .support import Server, client, token
from .test_cluster import start_nodes
from .test_service import RecordingFanout, Session

_apps = itertools.count(7000)


def typing(app: int | str, **extra: Any) -> dict[str, Any]:
    return {"session_channel": str(app), **extra}


async def test_typing_reaches_every_connection_of_the_other_participants(
    server: Server,
) -> None:
    app = next(_apps)
    async with (
        client(server, 1, token(admin_id=1)) as staff_a,
        client(server, 1, token(admin_id=1)) as staff_b,
        client(server, 7, token(admin_id=7)) as bystander,
        client(server, 2, token(request_id=app, sid=2)) as cust,
        client(server, 2, token(request_id=app, sid=2)) as cust_other_device,
    ):
        await cust.ok("Event.AddConversation", {"application_id": app})
        await staff_a.ok("Event.AddConversation", {"application_id": app})
        assert await cust.ok("Event.Typing", typing(app)) is None
        for staff in (staff_a, staff_b):
            push = await staff.push("Event.ReceiveTyping")
            assert push["result"] == {
                "session_channel": str(app),
                "application_id": app,
                "user_id": 2,
            }
        # Staff typing reaches the customer's connections, not staff's own other connection.
        assert await staff_a.ok("Event.Typing", typing(app, user_id=1)) is None
        for c in (cust, cust_other_device):
            push = await c.push("Event.ReceiveTyping")
            assert push["result"]["user_id"] == 1
        # Nothing is stored, and non-participants and the typist's devices hear nothing:
        # the next push each of them gets is the message sent after the typing.
        page = await staff_a.ok("Event.GetMessageList", {"session_channel": str(app)})
        assert page["Messages"] == []
        await staff_a.ok("Event.AddConversation", {"application_id": app, "user_id": 7})
        sent = await cust.ok("Event.SendMessage", {"session_channel": str(app), "content": "x"})
        for c in (bystander, staff_b, cust_other_device):
            push = await c.push()
            assert push["name"] == "Event.ReceiveMessage", push
            assert push["result"] == sent


async def test_typing_is_throttled_per_connection_and_conversation(server: Server) -> None:
    app = next(_apps)
    async with (
        client(server, 1, token(admin_id=1)) as staff,
        client(server, 2, token(request_id=app, sid=2)) as cust,
        client(server, 2, token(request_id=app, sid=2)) as cust_again,
    ):
        await cust.ok("Event.AddConversation", {"application_id": app})
        await staff.ok("Event.AddConversation", {"application_id": app})
        assert await cust.ok("Event.Typing", typing(app)) is None
        assert await cust.ok("Event.Typing", typing(app)) is None  # ok, but not forwarded
        assert await cust_again.ok("Event.Typing", typing(app)) is None  # its own allowance
        await cust.ok("Event.SendMessage", {"session_channel": str(app), "content": "x"})
        names = [(await staff.push())["name"] for _ in range(3)]
        assert names == ["Event.ReceiveTyping", "Event.ReceiveTyping", "Event.ReceiveMessage"]


async def test_typing_is_authorized_like_send_message(server: Server) -> None:
    app, other, missing = next(_apps), next(_apps), next(_apps)
    async with (
        client(server, 1, token(admin_id=1)) as staff,
        client(server, 2, token(request_id=app, sid=2)) as cust,
    ):
        await staff.ok("Event.AddConversation", {"application_id": app})
        await staff.ok("Event.AddConversation", {"application_id": other})
        # Another application's conversation, existing or not: the SendMessage answer.
        for channel in (str(other), str(missing), "0100", "abc"):
            sent = await cust.call(
                "Event.SendMessage", {"session_channel": channel, "content": "x"}
            )
            typed = await cust.call("Event.Typing", {"session_channel": channel})
            assert typed["ok"] is False and typed["error"] == sent["error"], (typed, sent)
            assert typed["error"]["code"] == "forbidden"
        # Their own application before the conversation exists: not_found, as for sending.
        async with client(server, 3, token(request_id=missing, sid=3)) as early:
            assert await early.error("Event.Typing", typing(missing)) == "not_found"
        assert await staff.error("Event.Typing", typing(missing)) == "not_found"
        # A customer token naming no participant may not act as a staff participant.
        async with client(server, 1, token(request_id=app)) as posing:
            sent = await posing.call(
                "Event.SendMessage", {"session_channel": str(app), "content": "x"}
            )
            typed = await posing.call("Event.Typing", typing(app))
            assert typed["ok"] is False and typed["error"] == sent["error"], (typed, sent)
            assert typed["error"]["code"] == "forbidden"
        assert await cust.error("Event.Typing", typing(app, user_id=1)) == "forbidden"
        assert await cust.error("Event.Typing", {}) == "bad_request"
        assert await cust.error("Event.Typing", {"session_channel": ""}) == "bad_request"
        assert await cust.error("Event.Typing", typing(app, user_id="2")) == "bad_request"
        await staff.no_push()


async def test_typing_throttle_follows_the_clock(tmp_path: Path) -> None:
    """One forwarded Typing per connection and conversation per interval (clock injected)."""
    secret = b"typing-tests-secret-0123456789abcdef"
    store = SqliteStore(str(tmp_path / "t.db"))
    await store.open()
    try:
        now = [1_600_000_000_000_000]
        fanout = RecordingFanout()
        verifier = TokenVerifier(secret, clock=lambda: 1_700_000_000.0)
        service = ChatService(store, fanout, verifier, clock_us=lambda: now[0])

        def session(conn_id: str, **claims: Any) -> Session:
            tok = mint(secret, now=1_700_000_000.0, **claims)
            return Session(conn_id, bind(verifier.verify(tok), claims["sid"]))

        cust = session("c1", request_id=100, sid=2)
        staff = session("s1", admin_id=1, sid=1)

        async def call(s: Session, name: str, args: dict[str, Any]) -> Any:
            frame = json.dumps({"name": name, "args": json.dumps(args)})
            reply = orjson.loads(await service.handle(s, frame))
            assert reply["ok"] is True, reply
            return reply["result"]

        await call(staff, "Event.AddConversation", {"application_id": 100})
        await call(staff, "Event.AddConversation", {"application_id": 200})
        await call(cust, "Event.AddConversation", {"application_id": 100})

        async def forwarded(s: Session, app: int) -> bool:
            before = len(fanout.calls)
            assert await call(s, "Event.Typing", {"session_channel": str(app)}) is None
            return len(fanout.calls) > before

        assert await forwarded(cust, 100)
        now[0] += TYPING_INTERVAL_US - 1
        assert not await forwarded(cust, 100)
        assert await forwarded(staff, 100)  # another connection
        assert await forwarded(staff, 200) is False  # nobody else takes part: nothing to send
        now[0] += 1
        assert await forwarded(cust, 100)
        now[0] -= 10 * TYPING_INTERVAL_US  # a clock that went back does not silence anyone
        assert await forwarded(cust, 100)
        typed = fanout.calls[0]
        assert typed.user_ids == [1] and typed.application_id == 100 and typed.origin == "c1"
        assert typed.frame == {
            "name": "Event.ReceiveTyping",
            "ok": True,
            "result": {"session_channel": "100", "application_id": 100, "user_id": 2},
        }
        assert (await store.list_messages(await _conv(store, 100), limit=5)).messages == []
    finally:
        await store.close()


async def _conv(store: SqliteStore, app: int) -> Any:
    conv = await store.get_conversation(app)
    assert conv is not None
    return conv


def test_throttle_memory_is_bounded() -> None:
    t = Throttle(10, max_keys=4)
    assert all(t.allow(k, 0) for k in range(4))
    assert not t.allow(0, 5)
    assert t.allow(4, 20)  # the full table drops the expired keys first
    assert len(t) == 1
    for k in range(5, 9):
        t.allow(k, 21)
    assert len(t) <= 4 and not t.allow(8, 22)


async def test_typing_crosses_nodes() -> None:
    """Two nodes on PostgreSQL and Redis: typing on one reaches every device on the other."""
    require("Redis", "127.0.0.1", 6379)
    with postgres_database() as url:
        a, b = start_nodes(2, url, REDIS_URL, unique_prefix())
        try:
            async with (
                client(a, 2, token(request_id=100, sid=2)) as cust,
                client(b, 1, token(admin_id=1)) as desk,
                client(a, 1, token(admin_id=1)) as phone,
            ):
                await cust.ok("Event.AddConversation", {"application_id": 100})
                await desk.ok("Event.AddConversation", {"application_id": 100})
                await cust.ok("Event.Typing", typing(100))
                for device in (desk, phone):
                    push = await device.push("Event.ReceiveTyping")
                    assert push["result"]["user_id"] == 2
                await desk.ok("Event.Typing", typing(100))
                assert (await cust.push("Event.ReceiveTyping"))["result"]["user_id"] == 1
                sent = await cust.ok(
                    "Event.SendMessage", {"session_channel": "100", "content": "x"}
                )
                assert (await phone.push())["result"] == sent  # no typing of its own user
        finally:
            a.stop()
            b.stop()
