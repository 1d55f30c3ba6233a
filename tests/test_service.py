"""The rules, through ChatService.handle with a real store and a recording fan-out.

Every test runs on both engines: SQLite and PostgreSQL.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from appchat.auth.tokens import TokenVerifier, bind, mint
from appchat.chat.service import ChatService, Limits
from appchat.protocol.errors import Unavailable
from appchat.protocol.models import Principal
from appchat.store import Store

from .backends import ENGINES, opened_store
from .support import CONVERSATION_KEYS, MESSAGE_KEYS, RFC3339_UTC

SECRET = b"service-tests-secret-0123456789abcdef"
NOW = 1_700_000_000.0


@dataclass
class Delivery:
    user_ids: list[int]
    application_id: int
    frame: dict[str, Any]
    origin: str | None
    staff_only: bool = False


class RecordingFanout:
    def __init__(self) -> None:
        self.calls: list[Delivery] = []

    def deliver(
        self,
        user_ids: Iterable[int],
        application_id: int,
        frame: bytes,
        origin: str | None,
        staff_only: bool = False,
    ) -> None:
        self.calls.append(
            Delivery(sorted(set(user_ids)), application_id, orjson.loads(frame), origin, staff_only)
        )


@dataclass(eq=False)  # hashed by identity, as a connection is
class Session:
    id: str
    principal: Principal
    pushes: list[dict[str, Any]] = field(default_factory=list)  # what the inbox sent it

    def push(self, frame: bytes) -> None:
        self.pushes.append(orjson.loads(frame))

    def push_soon(self, frame: bytes) -> None:  # written at once: nothing else is batched
        self.push(frame)


@dataclass
class Chat:
    service: ChatService
    store: Store
    fanout: RecordingFanout
    verifier: TokenVerifier
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def session(
        self,
        *,
        admin_id: int | None = None,
        request_id: int | None = None,
        sid: int,
        sid_claim: int | None = None,
        trust: bool = False,
    ) -> Session:
        tok = mint(SECRET, admin_id=admin_id, request_id=request_id, sid=sid_claim, now=NOW)
        principal = bind(self.verifier.verify(tok), sid, trust_query_sid=trust)
        return Session(id=f"conn-{next(self._ids)}", principal=principal)

    def staff(self, admin_id: int) -> Session:
        return self.session(admin_id=admin_id, sid=admin_id)

    def customer(self, request_id: int, sid: int, *, bound: bool = True) -> Session:
        return self.session(request_id=request_id, sid=sid, sid_claim=sid if bound else None)

    async def raw(self, session: Session, frame: str | bytes) -> dict[str, Any]:
        reply = await self.service.handle(session, frame)
        assert isinstance(reply, bytes)
        doc: dict[str, Any] = orjson.loads(reply)
        return doc

    async def call(
        self, session: Session, name: str, args: dict[str, Any], *, request_id: Any = None
    ) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": name, "args": json.dumps(args)}
        if request_id is not None:
            doc["id"] = request_id
        reply = await self.raw(session, json.dumps(doc))
        assert reply["name"] == name
        return reply

    async def ok(self, session: Session, name: str, args: dict[str, Any]) -> Any:
        reply = await self.call(session, name, args)
        assert reply["ok"] is True, reply
        assert "error" not in reply
        return reply["result"]

    async def err(self, session: Session, name: str, args: dict[str, Any]) -> str:
        reply = await self.call(session, name, args)
        assert reply["ok"] is False, reply
        assert reply["result"] is None
        assert isinstance(reply["error"]["message"], str)
        return str(reply["error"]["code"])

    # shorthands
    async def add(self, s: Session, app: int, user_id: int | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {"application_id": app}
        if user_id is not None:
            args["user_id"] = user_id
        result: dict[str, Any] = await self.ok(s, "Event.AddConversation", args)
        return result

    async def send(self, s: Session, app: int | str, content: str, **extra: Any) -> dict[str, Any]:
        args = {"session_channel": str(app), "content": content, **extra}
        result = await self.ok(s, "Event.SendMessage", args)
        message: dict[str, Any] = result["message"]
        return message

    async def read(self, s: Session, app: int, message_id: int) -> None:
        args = {"session_channel": str(app), "message_id": message_id}
        assert await self.ok(s, "Event.ReadMessage", args) is None

    async def messages(self, s: Session, app: int, **extra: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self.ok(
            s, "Event.GetMessageList", {"session_channel": str(app), **extra}
        )
        return result

    async def unread(self, s: Session) -> dict[str, Any]:
        result: dict[str, Any] = await self.ok(s, "Event.GetUnreadInfo", {})
        return result

    async def conversations(self, s: Session, **extra: Any) -> list[int]:
        result = await self.ok(s, "Event.GetConversationList", extra)
        return [c["application_id"] for c in result["conversations"]]


@pytest.fixture(params=ENGINES)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with opened_store(request.param, tmp_path) as s:
        yield s


@pytest.fixture
def chat(store: Store) -> Chat:
    ticks = itertools.count(1_600_000_000_000_000, 1_000)
    fanout = RecordingFanout()
    verifier = TokenVerifier(SECRET, clock=lambda: NOW)
    service = ChatService(
        store, fanout, verifier, limits=Limits(max_content=100), clock_us=lambda: next(ticks)
    )
    return Chat(service=service, store=store, fanout=fanout, verifier=verifier)


async def statuses(chat: Chat, s: Session, app: int) -> dict[int, int]:
    page = await chat.messages(s, app)
    return {m["id"]: m["status"] for m in page["Messages"]}


# --- happy paths and result shapes ----------------------------------------------------------


async def test_add_conversation_created_once_per_application(chat: Chat) -> None:
    staff = chat.staff(1)
    first = await chat.add(staff, 100, user_id=1)
    assert set(first) == CONVERSATION_KEYS
    assert first["session_channel"] == "100"
    assert first["application_id"] == 100
    assert isinstance(first["id"], int)
    assert RFC3339_UTC.match(first["create_at"])
    assert RFC3339_UTC.match(first["update_at"])
    again = await chat.add(staff, 100, user_id=2)
    assert again == first
    other = await chat.add(staff, 200, user_id=1)
    assert other["id"] != first["id"]
    # user 2 was added as a participant of 100 only
    assert await chat.conversations(chat.customer(100, 2)) == [100]
    assert await chat.conversations(chat.staff(2)) == [100]


async def test_add_conversation_user_id_defaults_to_sid(chat: Chat) -> None:
    staff = chat.staff(7)
    await chat.add(staff, 100)
    assert await chat.conversations(staff) == [100]
    customer = chat.customer(300, 8)
    await chat.add(customer, 300)
    assert await chat.conversations(customer) == [300]


async def test_get_conversation_list_newest_activity_first(chat: Chat) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    await chat.add(staff, 200)
    await chat.add(staff, 300)
    result = await chat.ok(staff, "Event.GetConversationList", {"user_id": 1})
    assert set(result) == {"conversations", "has_more", "next_cursor"}
    assert result["has_more"] is False and result["next_cursor"] is None
    assert [c["application_id"] for c in result["conversations"]] == [300, 200, 100]
    for c in result["conversations"]:
        assert set(c) == CONVERSATION_KEYS
        assert c["session_channel"] == str(c["application_id"])
    await chat.send(staff, 100, "bump")
    assert await chat.conversations(staff) == [100, 300, 200]
    assert await chat.conversations(chat.staff(99)) == []


async def test_send_message_result_and_storage(chat: Chat) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    reply = await chat.call(
        staff,
        "Event.SendMessage",
        {"session_channel": "100", "sender_id": 1, "content": "Hey"},
        request_id="r-1",
    )
    assert reply["ok"] is True
    assert reply["id"] == "r-1"
    assert set(reply["result"]) == {"message"}
    message = reply["result"]["message"]
    assert set(message) == MESSAGE_KEYS
    assert message["session_channel"] == "100"
    assert message["content"] == "Hey"
    assert message["sender_id"] == 1
    assert message["status"] == 0
    assert message["content_type"] == 1
    assert RFC3339_UTC.match(message["create_at"])
    assert RFC3339_UTC.match(message["update_at"])
    page = await chat.messages(staff, 100)
    assert page == {"Messages": [message], "has_more": False}


async def test_send_message_content_type_and_integer_channel(chat: Chat) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    # Without a blob store the service checks the reference's form and conversation only.
    image = await chat.send(staff, 100, "/files/100/" + "ab" * 16, content_type=2)
    with pytest.raises(AssertionError, match="bad_request"):
        await chat.send(staff, 100, "/files/101/" + "ab" * 16, content_type=2)
    odd = await chat.send(staff, 100, "x", content_type=9)
    as_int = await chat.ok(staff, "Event.SendMessage", {"session_channel": 100, "content": "i"})
    assert image["content_type"] == 2
    assert odd["content_type"] == 1
    assert as_int["message"]["session_channel"] == "100"
    ids = [image["id"], odd["id"], as_int["message"]["id"]]
    assert ids == sorted(ids)
    assert len(set(ids)) == 3


async def test_send_message_to_missing_conversation_creates_nothing(chat: Chat) -> None:
    staff = chat.staff(1)
    args = {"session_channel": "5", "content": "x"}
    assert await chat.err(staff, "Event.SendMessage", args) == "not_found"
    assert await chat.ok(staff, "Event.GetConversationList", {"all": True}) == {
        "conversations": [],
        "has_more": False,
        "next_cursor": None,
    }
    assert chat.fanout.calls == []


async def test_content_limit_from_limits(chat: Chat) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    assert (await chat.send(staff, 100, "é" * 100))["content"] == "é" * 100
    code = await chat.err(
        staff, "Event.SendMessage", {"session_channel": "100", "content": "é" * 101}
    )
    assert code == "bad_request"


async def test_read_message_and_unread_info_happy_path(chat: Chat) -> None:
    staff, customer = chat.staff(1), chat.customer(100, 2)
    await chat.add(staff, 100)
    await chat.add(customer, 100)
    m = await chat.send(staff, 100, "hello")
    info = await chat.ok(customer, "Event.GetUnreadInfo", {"user_id": 2})
    assert info == {
        "total": 1,
        "conversations": [{"session_channel": "100", "application_id": 100, "unread": 1}],
        "has_more": False,
        "next_cursor": None,
    }
    reply = await chat.call(
        customer,
        "Event.ReadMessage",
        {"session_channel": "100", "executor_id": 2, "message_id": m["id"]},
        request_id=42,
    )
    assert reply == {"name": "Event.ReadMessage", "ok": True, "result": None, "id": 42}
    assert (await chat.unread(customer))["total"] == 0


async def test_unknown_event_and_unreadable_frames(chat: Chat) -> None:
    staff = chat.staff(1)
    reply = await chat.raw(staff, '{"name":"Event.Nope","args":"{}","id":"x"}')
    assert reply["ok"] is False
    assert reply["name"] == "Event.Nope"
    assert reply["id"] == "x"
    assert reply["error"]["code"] == "unknown_event"
    for push_only in ("Event.ReceiveMessage", "Event.MessageRead", "Event.Resync"):
        assert await chat.err(staff, push_only, {}) == "unknown_event"
    reply = await chat.raw(staff, "not json")
    assert reply == {
        "name": None,
        "ok": False,
        "result": None,
        "error": {"code": "bad_request", "message": reply["error"]["message"]},
    }
    reply = await chat.raw(staff, '{"name":"Event.SendMessage","args":"{oops","id":5}')
    assert (reply["name"], reply["id"], reply["error"]["code"]) == (
        "Event.SendMessage",
        5,
        "bad_request",
    )
    reply = await chat.raw(staff, b'{"name":"Event.GetUnreadInfo","args":{"user_id":"1"}}')
    assert reply["error"]["code"] == "bad_request"


# --- acting ids -----------------------------------------------------------------------------

ACTING = [
    ("Event.GetConversationList", "user_id", {}),
    ("Event.GetUnreadInfo", "user_id", {}),
    ("Event.GetMessageList", "executor_id", {"session_channel": "100"}),
    ("Event.SendMessage", "sender_id", {"session_channel": "100", "content": "x"}),
    ("Event.ReadMessage", "executor_id", {"session_channel": "100", "message_id": "MSG"}),
]


@pytest.mark.parametrize(("event", "field", "base"), ACTING, ids=[e for e, _, _ in ACTING])
@pytest.mark.parametrize("who", ["staff", "customer"])
async def test_acting_ids_must_be_the_sid(
    chat: Chat, event: str, field: str, base: dict[str, Any], who: str
) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    message = await chat.send(staff, 100, "m")
    base = {k: (message["id"] if v == "MSG" else v) for k, v in base.items()}
    session = staff if who == "staff" else chat.customer(100, 2)
    await chat.add(session, 100)
    sid = session.principal.sid
    assert await chat.err(session, event, {**base, field: sid + 1}) == "forbidden"
    await chat.ok(session, event, {**base, field: sid})
    await chat.ok(session, event, base)


async def test_staff_may_add_any_user_but_customer_only_themselves(chat: Chat) -> None:
    staff, customer = chat.staff(1), chat.customer(100, 2)
    await chat.add(staff, 100, user_id=55)
    assert await chat.conversations(chat.staff(55)) == [100]
    args = {"application_id": 100, "user_id": 3}
    assert await chat.err(customer, "Event.AddConversation", args) == "forbidden"
    assert await chat.conversations(chat.customer(100, 3)) == []
    await chat.add(customer, 100, user_id=2)
    assert await chat.conversations(customer) == [100]


# --- customers and other applications --------------------------------------------------------


async def test_customer_may_not_add_another_application(chat: Chat) -> None:
    customer = chat.customer(100, 2)
    staff = chat.staff(1)
    await chat.add(staff, 200)
    for app in (200, 300):  # exists, does not exist
        args = {"application_id": app, "user_id": 2}
        assert await chat.err(customer, "Event.AddConversation", args) == "forbidden"
    assert await chat.ok(staff, "Event.GetConversationList", {"all": True}) == {
        "conversations": [await chat.add(staff, 200)],
        "has_more": False,
        "next_cursor": None,
    }


@pytest.mark.parametrize(
    ("event", "extra"),
    [
        ("Event.GetMessageList", {}),
        ("Event.SendMessage", {"content": "sneaky"}),
        ("Event.ReadMessage", {"message_id": "MSG"}),
    ],
)
async def test_customer_other_application_forbidden_whether_it_exists_or_not(
    chat: Chat, event: str, extra: dict[str, Any]
) -> None:
    staff, customer = chat.staff(1), chat.customer(100, 2)
    await chat.add(customer, 100)
    await chat.add(staff, 200)
    message = await chat.send(staff, 200, "private")
    extra = {k: (message["id"] if v == "MSG" else v) for k, v in extra.items()}
    replies = []
    for channel in ("200", "300", 200, "0200", "abc", str(2**63 - 1)):
        reply = await chat.call(customer, event, {"session_channel": channel, **extra})
        assert reply["ok"] is False
        assert reply["error"]["code"] == "forbidden"
        replies.append(reply)
    # the same answer, word for word, for an existing and a missing conversation
    assert replies[0] == replies[1] == replies[2]
    assert len(chat.fanout.calls) == 1  # only the staff message above
    page = await chat.messages(staff, 200)
    assert [m["content"] for m in page["Messages"]] == ["private"]
    assert {m["status"] for m in page["Messages"]} == {0}


@pytest.mark.parametrize(
    ("event", "extra"),
    [
        ("Event.GetMessageList", {}),
        ("Event.SendMessage", {"content": "x"}),
        ("Event.ReadMessage", {"message_id": 1}),
    ],
)
async def test_staff_gets_not_found_for_a_missing_conversation(
    chat: Chat, event: str, extra: dict[str, Any]
) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    for channel in ("999", "abc", "0100", "-1"):
        assert await chat.err(staff, event, {"session_channel": channel, **extra}) == "not_found"


async def test_customer_own_application_not_yet_created_is_not_found(chat: Chat) -> None:
    customer = chat.customer(100, 2)
    code = await chat.err(customer, "Event.GetMessageList", {"session_channel": "100"})
    assert code == "not_found"


async def test_unbound_customer_may_not_act_as_a_staff_participant(chat: Chat) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    await chat.send(staff, 100, "from staff")
    # a customer token without a sid claim, connecting with the staff member's id
    impostor = chat.customer(100, 1, bound=False)
    assert impostor.principal.bound is False
    m = (await chat.messages(staff, 100))["Messages"][0]["id"]
    attempts: list[tuple[str, dict[str, Any]]] = [
        ("Event.SendMessage", {"session_channel": "100", "content": "x"}),
        ("Event.GetMessageList", {"session_channel": "100"}),
        ("Event.ReadMessage", {"session_channel": "100", "message_id": m}),
        ("Event.AddConversation", {"application_id": 100}),
        # nor read the staff member's inbox or unread counts
        ("Event.GetUnreadInfo", {}),
        ("Event.GetConversationList", {}),
        ("Event.GetConversationList", {"all": True}),
    ]
    for event, args in attempts:
        assert await chat.err(impostor, event, args) == "forbidden", event
    assert (await statuses(chat, staff, 100)) == {m: 0}
    assert [x["content"] for x in (await chat.messages(staff, 100))["Messages"]] == ["from staff"]
    # the same customer token under its own id is fine
    honest = chat.customer(100, 2, bound=False)
    await chat.add(honest, 100)
    await chat.send(honest, 100, "hi")


async def test_staff_participant_by_sending_is_protected_too(chat: Chat) -> None:
    customer = chat.customer(100, 2, bound=False)
    await chat.add(customer, 100)
    staff = chat.staff(5)
    await chat.send(staff, 100, "staff joined by sending")
    impostor = chat.customer(100, 5, bound=False)
    args = {"session_channel": "100", "content": "x"}
    assert await chat.err(impostor, "Event.SendMessage", args) == "forbidden"
    # a customer id is no staff participant: another unbound customer connection may use it
    await chat.send(chat.customer(100, 2, bound=False), 100, "still me")


async def test_bound_customer_acts_under_its_claim(chat: Chat) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    customer = chat.customer(100, 2)
    assert customer.principal.bound is True
    assert (await chat.send(customer, 100, "hi"))["sender_id"] == 2


# --- ReadMessage ----------------------------------------------------------------------------


async def test_read_marks_earlier_messages_of_others_and_moves_forward_only(chat: Chat) -> None:
    staff, customer = chat.staff(1), chat.customer(100, 2)
    await chat.add(staff, 100)
    await chat.add(customer, 100)
    m1 = (await chat.send(staff, 100, "1"))["id"]
    m2 = (await chat.send(staff, 100, "2"))["id"]
    m3 = (await chat.send(staff, 100, "3"))["id"]
    c4 = (await chat.send(customer, 100, "4"))["id"]
    chat.fanout.calls.clear()

    await chat.read(customer, 100, m2)
    assert await statuses(chat, staff, 100) == {m1: 1, m2: 1, m3: 0, c4: 0}
    assert len(chat.fanout.calls) == 1
    push = chat.fanout.calls[0]
    assert push.user_ids == [1, 2]
    assert push.application_id == 100
    assert push.origin == customer.id
    assert push.frame == {
        "name": "Event.MessageRead",
        "ok": True,
        "result": {"session_channel": "100", "reader_id": 2, "message_id": m2},
    }
    assert (await chat.unread(customer))["total"] == 1

    # a repeat, or an older message: ok, nothing pushed, position stays
    await chat.read(customer, 100, m2)
    await chat.read(customer, 100, m1)
    assert len(chat.fanout.calls) == 1
    assert (await chat.unread(customer))["total"] == 1

    # reading one's own message marks the others' before it, never one's own
    await chat.read(customer, 100, c4)
    assert await statuses(chat, staff, 100) == {m1: 1, m2: 1, m3: 1, c4: 0}
    assert len(chat.fanout.calls) == 2
    assert (await chat.unread(customer))["total"] == 0
    await chat.read(customer, 100, m1)  # going back does not raise unread again
    assert (await chat.unread(customer))["total"] == 0

    # the other side reads: now c4 is read too
    await chat.read(staff, 100, c4)
    assert await statuses(chat, staff, 100) == {m1: 1, m2: 1, m3: 1, c4: 1}
    assert chat.fanout.calls[-1].frame["result"] == {
        "session_channel": "100",
        "reader_id": 1,
        "message_id": c4,
    }
    assert chat.fanout.calls[-1].origin == staff.id


async def test_reading_only_own_messages_leaves_them_unread(chat: Chat) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    mine = [(await chat.send(staff, 100, str(i)))["id"] for i in range(3)]
    await chat.read(staff, 100, mine[-1])
    assert set((await statuses(chat, staff, 100)).values()) == {0}
    assert len(chat.fanout.calls) == 4  # three sends and one read that moved the position


async def test_read_of_a_message_in_another_conversation_is_not_found(chat: Chat) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    await chat.add(staff, 200)
    here = (await chat.send(staff, 100, "here"))["id"]
    there = (await chat.send(staff, 200, "there"))["id"]
    chat.fanout.calls.clear()
    for message_id in (there, there + 1000):
        args = {"session_channel": "100", "message_id": message_id}
        assert await chat.err(staff, "Event.ReadMessage", args) == "not_found"
    assert chat.fanout.calls == []
    reader = chat.staff(3)
    args = {"session_channel": "200", "message_id": here}
    assert await chat.err(reader, "Event.ReadMessage", args) == "not_found"
    assert (await statuses(chat, staff, 200)) == {there: 0}
    assert await chat.conversations(reader) == []  # a failed read joins nothing


async def test_read_joins_the_reader(chat: Chat) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    m = (await chat.send(staff, 100, "hi"))["id"]
    other = chat.staff(9)
    assert await chat.conversations(other) == []
    await chat.read(other, 100, m)
    assert await chat.conversations(other) == [100]
    assert chat.fanout.calls[-1].user_ids == [1, 9]
    assert await statuses(chat, staff, 100) == {m: 1}


# --- unread counts --------------------------------------------------------------------------


async def test_unread_counts(chat: Chat) -> None:
    staff, customer = chat.staff(1), chat.customer(100, 2)
    await chat.add(staff, 100)
    await chat.add(customer, 100)
    await chat.add(staff, 200)
    sent = [(await chat.send(staff, 100, f"s{i}"))["id"] for i in range(3)]
    assert await chat.unread(customer) == {
        "total": 3,
        "conversations": [{"session_channel": "100", "application_id": 100, "unread": 3}],
        "has_more": False,
        "next_cursor": None,
    }
    own = await chat.unread(staff)
    assert own["total"] == 0
    assert {c["application_id"]: c["unread"] for c in own["conversations"]} == {100: 0, 200: 0}
    await chat.send(customer, 100, "c")
    # sending does not move the sender's read position
    assert (await chat.unread(customer))["total"] == 3
    assert (await chat.unread(staff))["total"] == 1
    await chat.read(customer, 100, sent[1])
    assert (await chat.unread(customer))["conversations"][0]["unread"] == 1
    # a conversation with nothing unread is still listed, and staff's newest activity is first
    staff_info = await chat.unread(staff)
    assert staff_info["conversations"] == [
        {"session_channel": "100", "application_id": 100, "unread": 1},
        {"session_channel": "200", "application_id": 200, "unread": 0},
    ]
    assert await chat.unread(chat.staff(77)) == {
        "total": 0,
        "conversations": [],
        "has_more": False,
        "next_cursor": None,
    }


async def test_customer_sees_only_their_application(chat: Chat) -> None:
    staff, customer = chat.staff(1), chat.customer(100, 2)
    await chat.add(customer, 100)
    await chat.add(staff, 200, user_id=2)  # staff put user 2 into another application too
    await chat.send(staff, 200, "elsewhere")
    await chat.send(staff, 100, "here")
    assert await chat.conversations(customer) == [100]
    assert await chat.conversations(customer, all=True) == [100]
    info = await chat.unread(customer)
    assert info == {
        "total": 1,
        "conversations": [{"session_channel": "100", "application_id": 100, "unread": 1}],
        "has_more": False,
        "next_cursor": None,
    }
    # the same user id under a staff token sees both
    assert await chat.conversations(chat.staff(2)) == [100, 200]
    assert (await chat.unread(chat.staff(2)))["total"] == 2


async def test_get_conversation_list_all_for_staff(chat: Chat) -> None:
    staff, other = chat.staff(1), chat.staff(2)
    await chat.add(staff, 100)
    await chat.add(other, 200)
    await chat.add(other, 300)
    assert await chat.conversations(staff) == [100]
    assert await chat.conversations(staff, all=False) == [100]
    assert await chat.conversations(staff, all=True) == [300, 200, 100]
    await chat.send(other, 100, "bump")
    assert await chat.conversations(staff, all=True) == [100, 300, 200]
    assert await chat.err(staff, "Event.GetConversationList", {"all": "yes"}) == "bad_request"


# --- GetMessageList paging ------------------------------------------------------------------


@pytest.fixture
async def sixty(chat: Chat) -> tuple[Session, list[int]]:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    ids = [(await chat.send(staff, 100, f"m{i}"))["id"] for i in range(60)]
    assert ids == sorted(ids)
    return staff, ids


def page_ids(page: dict[str, Any]) -> list[int]:
    return [m["id"] for m in page["Messages"]]


async def test_default_page_is_newest_fifty_oldest_first(
    chat: Chat, sixty: tuple[Session, list[int]]
) -> None:
    staff, ids = sixty
    page = await chat.messages(staff, 100)
    assert page_ids(page) == ids[10:]
    assert page["Messages"][0]["content"] == "m10"
    assert page["has_more"] is True
    older = await chat.messages(staff, 100, before_id=ids[10])
    assert page_ids(older) == ids[:10]
    assert older["has_more"] is False


async def test_before_id_pages(chat: Chat, sixty: tuple[Session, list[int]]) -> None:
    staff, ids = sixty
    page = await chat.messages(staff, 100, before_id=ids[30], limit=5)
    assert page_ids(page) == ids[25:30]
    assert page["has_more"] is True
    page = await chat.messages(staff, 100, before_id=ids[5], limit=5)
    assert page_ids(page) == ids[:5]
    assert page["has_more"] is False
    page = await chat.messages(staff, 100, before_id=ids[0])
    assert page == {"Messages": [], "has_more": False}


async def test_after_id_pages(chat: Chat, sixty: tuple[Session, list[int]]) -> None:
    staff, ids = sixty
    page = await chat.messages(staff, 100, after_id=0, limit=20)
    assert page_ids(page) == ids[:20]
    assert page["has_more"] is True
    page = await chat.messages(staff, 100, after_id=ids[19])
    assert page_ids(page) == ids[20:]
    assert page["has_more"] is False
    page = await chat.messages(staff, 100, after_id=ids[49], limit=10)
    assert page_ids(page) == ids[50:]
    assert page["has_more"] is False
    page = await chat.messages(staff, 100, after_id=ids[48], limit=10)
    assert page_ids(page) == ids[49:59]
    assert page["has_more"] is True
    assert await chat.messages(staff, 100, after_id=ids[-1]) == {"Messages": [], "has_more": False}


async def test_limit_bounds(chat: Chat, sixty: tuple[Session, list[int]]) -> None:
    staff, ids = sixty
    page = await chat.messages(staff, 100, limit=60)
    assert (page_ids(page), page["has_more"]) == (ids, False)
    page = await chat.messages(staff, 100, limit=59)
    assert (page_ids(page), page["has_more"]) == (ids[1:], True)
    page = await chat.messages(staff, 100, limit=500)
    assert (page_ids(page), page["has_more"]) == (ids, False)
    page = await chat.messages(staff, 100, limit=1)
    assert (page_ids(page), page["has_more"]) == (ids[-1:], True)
    for limit in (0, 501, -5):
        code = await chat.err(
            staff, "Event.GetMessageList", {"session_channel": "100", "limit": limit}
        )
        assert code == "bad_request"
    args = {"session_channel": "100", "before_id": ids[5], "after_id": ids[1]}
    assert await chat.err(staff, "Event.GetMessageList", args) == "bad_request"


async def test_paging_stays_inside_the_conversation(chat: Chat) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    await chat.add(staff, 200)
    a = [(await chat.send(staff, 100 if i % 2 else 200, str(i)))["id"] for i in range(10)]
    page = await chat.messages(staff, 100, after_id=0)
    assert page_ids(page) == a[1::2]
    assert {m["session_channel"] for m in page["Messages"]} == {"100"}
    page = await chat.messages(staff, 200, limit=2)
    assert (page_ids(page), page["has_more"]) == (a[6::2], True)


# --- SendMessage delivery and idempotency -----------------------------------------------------


async def test_send_delivers_receive_message_to_every_participant(chat: Chat) -> None:
    staff, customer = chat.staff(1), chat.customer(100, 2)
    await chat.add(staff, 100)
    await chat.add(staff, 100, user_id=3)
    await chat.add(customer, 100)
    await chat.add(staff, 200, user_id=4)  # someone in another conversation
    reply = await chat.call(
        customer, "Event.SendMessage", {"session_channel": "100", "content": "hi"}, request_id=9
    )
    assert reply["id"] == 9
    assert chat.fanout.calls == [
        Delivery(
            user_ids=[1, 2, 3],
            application_id=100,
            frame={"name": "Event.ReceiveMessage", "ok": True, "result": reply["result"]},
            origin=customer.id,
        )
    ]


async def test_client_msg_id_makes_a_retry_return_the_first_message(chat: Chat) -> None:
    staff, customer = chat.staff(1), chat.customer(100, 2)
    await chat.add(staff, 100)
    await chat.add(customer, 100)
    first = await chat.send(customer, 100, "hello", client_msg_id="abc")
    assert first["client_msg_id"] == "abc"
    assert len(chat.fanout.calls) == 1
    image = "/files/100/" + "0f" * 16
    retry = await chat.send(customer, 100, image, client_msg_id="abc", content_type=2)
    assert retry == first
    assert len(chat.fanout.calls) == 1  # nothing pushed again
    assert page_ids(await chat.messages(staff, 100)) == [first["id"]]
    # another sender, the same client_msg_id: a new message
    other = await chat.send(staff, 100, "from staff", client_msg_id="abc")
    assert other["id"] != first["id"]
    assert other["sender_id"] == 1
    assert len(chat.fanout.calls) == 2
    # another conversation, same sender and id: a new message
    await chat.add(staff, 200)
    elsewhere = await chat.send(staff, 200, "elsewhere", client_msg_id="abc")
    assert elsewhere["id"] not in (first["id"], other["id"])
    assert elsewhere["session_channel"] == "200"
    assert len(chat.fanout.calls) == 3
    # a different client_msg_id, or none: new messages
    assert (await chat.send(customer, 100, "hello", client_msg_id="abd"))["id"] != first["id"]
    plain = [await chat.send(customer, 100, "hello") for _ in range(2)]
    assert plain[0]["id"] != plain[1]["id"]
    assert "client_msg_id" not in plain[0]


async def test_retry_returns_the_current_state_of_the_message(chat: Chat) -> None:
    staff, customer = chat.staff(1), chat.customer(100, 2)
    await chat.add(staff, 100)
    first = await chat.send(customer, 100, "hello", client_msg_id="k")
    await chat.read(staff, 100, first["id"])
    retry = await chat.send(customer, 100, "hello", client_msg_id="k")
    assert retry["id"] == first["id"]
    assert retry["status"] == 1


# --- RefreshToken ---------------------------------------------------------------------------


async def test_refresh_token_same_identity(chat: Chat) -> None:
    staff = chat.staff(1)
    assert staff.principal.exp == NOW + 3600
    new = mint(SECRET, admin_id=1, now=NOW, ttl=7200)
    result = await chat.ok(staff, "Event.RefreshToken", {"token": new})
    assert result == {"exp": NOW + 7200}
    assert staff.principal.exp == NOW + 7200
    assert (staff.principal.sid, staff.principal.subject) == (1, "admin:1")

    customer = chat.customer(100, 2)
    new = mint(SECRET, request_id=100, sid=2, now=NOW, ttl=60)
    assert await chat.ok(customer, "Event.RefreshToken", {"token": new}) == {"exp": NOW + 60}
    assert customer.principal.exp == NOW + 60
    assert customer.principal.application_id == 100


@pytest.mark.parametrize(
    ("who", "claims"),
    [
        ("staff", {"admin_id": 2}),
        ("staff", {"admin_id": 2, "sid": 1}),  # the same participant, another identity
        ("staff", {"request_id": 100, "sid": 1}),
        ("staff", {"admin_id": 1, "sid": 3}),
        ("customer", {"request_id": 200, "sid": 2}),
        ("customer", {"request_id": 100, "sid": 3}),
        ("customer", {"admin_id": 2, "sid": 2}),
        ("unbound", {"request_id": 200}),
    ],
)
async def test_refresh_token_with_another_identity_is_unauthorized(
    chat: Chat, who: str, claims: dict[str, Any]
) -> None:
    session = {
        "staff": lambda: chat.staff(1),
        "customer": lambda: chat.customer(100, 2),
        "unbound": lambda: chat.customer(100, 2, bound=False),
    }[who]()
    before = session.principal
    new = mint(SECRET, now=NOW, ttl=7200, **claims)
    assert await chat.err(session, "Event.RefreshToken", {"token": new}) == "unauthorized"
    assert session.principal == before


async def test_refresh_token_bad_tokens(chat: Chat) -> None:
    staff = chat.staff(1)
    before = staff.principal
    expired = mint(SECRET, admin_id=1, now=NOW - 7200, ttl=3600)
    forged = mint(b"another-secret-0123456789abcdefghij", admin_id=1, now=NOW, ttl=7200)
    for tok in (expired, forged, "garbage"):
        assert await chat.err(staff, "Event.RefreshToken", {"token": tok}) == "unauthorized"
    assert await chat.err(staff, "Event.RefreshToken", {}) == "bad_request"
    assert staff.principal == before


async def test_trust_query_sid_service(chat: Chat, store: Store) -> None:
    trusting = ChatService(store, chat.fanout, chat.verifier, trust_query_sid=True)
    chat.service = trusting
    staff = chat.session(admin_id=1, sid=2, trust=True)
    assert (staff.principal.sid, staff.principal.bound) == (2, False)
    await chat.add(staff, 100)
    assert (await chat.send(staff, 100, "as 2"))["sender_id"] == 2
    args = {"session_channel": "100", "content": "x", "sender_id": 1}
    assert await chat.err(staff, "Event.SendMessage", args) == "forbidden"
    same = mint(SECRET, admin_id=1, now=NOW, ttl=100)
    assert await chat.ok(staff, "Event.RefreshToken", {"token": same}) == {"exp": NOW + 100}
    assert staff.principal.sid == 2
    other = mint(SECRET, admin_id=2, now=NOW, ttl=100)
    assert await chat.err(staff, "Event.RefreshToken", {"token": other}) == "unauthorized"
    assert staff.principal.subject == "admin:1"


# --- faults ---------------------------------------------------------------------------------


async def test_internal_error_leaks_nothing(
    chat: Chat,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)

    async def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(store, "get_conversation", boom)
    monkeypatch.setattr(store, "conversation_page", boom)
    for event, args in [
        ("Event.GetMessageList", {"session_channel": "100"}),
        ("Event.SendMessage", {"session_channel": "100", "content": "x"}),
        ("Event.GetConversationList", {}),
    ]:
        raw = await chat.service.handle(
            staff, json.dumps({"name": event, "args": json.dumps(args), "id": "i"})
        )
        assert b"secret" not in raw
        assert b"RuntimeError" not in raw
        reply = orjson.loads(raw)
        assert reply["ok"] is False
        assert reply["name"] == event
        assert reply["id"] == "i"
        assert reply["result"] is None
        assert reply["error"]["code"] == "internal"
    assert chat.fanout.calls == []
    assert "secret detail" in caplog.text  # logged for the operator, not sent to the client


async def test_closed_store_is_unavailable(chat: Chat, store: Store) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    await store.close()
    assert await chat.err(staff, "Event.GetConversationList", {}) == "unavailable"
    assert await chat.err(staff, "Event.AddConversation", {"application_id": 5}) == "unavailable"


async def test_names_are_kept_per_connection_and_never_cost_a_push(
    chat: Chat, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)

    def named(name: str) -> Session:
        tok = mint(SECRET, request_id=100, sid=7, now=NOW, name=name)
        return Session(id=f"conn-{name}", principal=bind(chat.verifier.verify(tok), 7))

    phone, laptop = named("Anna"), named("Anna K.")
    await chat.add(phone, 100)
    first = await chat.send(phone, 100, "from the phone")
    assert first["sender_name"] == "Anna"
    await chat.send(laptop, 100, "from the laptop")  # another connection, another name
    page = await chat.messages(staff, 100)
    assert [m["sender_name"] for m in page["Messages"]] == ["Anna K.", "Anna K."]

    async def down(*args: Any, **kwargs: Any) -> None:
        raise Unavailable("the database is away")

    # The name is written after the message is committed and pushed: its failure is
    # logged, and neither answered nor allowed to swallow the push.
    monkeypatch.setattr(store, "set_participant_name", down)
    pushes = len(chat.fanout.calls)
    later = await chat.send(named("Anna Karenina"), 100, "while names cannot be kept")
    assert later["sender_name"] == "Anna Karenina"
    assert chat.fanout.calls[pushes].frame["result"]["message"] == later
    await chat.read(named("A."), 100, later["id"])
    assert chat.fanout.calls[-1].frame["name"] == "Event.MessageRead"
