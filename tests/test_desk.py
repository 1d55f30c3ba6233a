"""The support desk's rules (SPEC, third round), through ChatService.handle with a real
store and the real inbox: status, assignee, snooze, revisions, last_message, inbox pushes,
the reopen rules and who may do what. Every test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from appchat.auth.tokens import TokenVerifier
from appchat.broker.memory import MemoryBroker
from appchat.chat.desk import AutoAssigner, SnoozeWaker
from appchat.chat.service import ChatService, Limits
from appchat.fanout.inbox import Inbox
from appchat.fanout.presence import Presence
from appchat.protocol.models import format_ts
from appchat.store import Store

from .test_service import NOW, SECRET, Chat, RecordingFanout, Session, store  # noqa: F401

START_US = 1_600_000_000_000_000
UPDATED = "Event.ConversationUpdated"


class Clock:
    """Microseconds that move 1 ms at every reading, and jump when told."""

    def __init__(self) -> None:
        self.now = START_US

    def __call__(self) -> int:
        self.now += 1_000
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def chat(store: Store, clock: Clock) -> Chat:  # noqa: F811
    fanout = RecordingFanout()
    verifier = TokenVerifier(SECRET, clock=lambda: NOW)
    service = ChatService(
        store,
        fanout,
        verifier,
        limits=Limits(max_content=100),
        clock_us=clock,
        inbox=Inbox(MemoryBroker(), "node-a"),
    )
    return Chat(service=service, store=store, fanout=fanout, verifier=verifier)


def updates(session: Session) -> list[dict[str, Any]]:
    """The conversations ConversationUpdated brought this session, in order; emptied."""
    got = [p["result"]["conversation"] for p in session.pushes if p["name"] == UPDATED]
    session.pushes.clear()
    return got


async def assign(chat: Chat, s: Session, app: int, assignee: int | None) -> dict[str, Any]:
    args = {"session_channel": str(app), "assignee_id": assignee}
    conversation: dict[str, Any] = (await chat.ok(s, "Event.AssignConversation", args))[
        "conversation"
    ]
    return conversation


async def set_status(chat: Chat, s: Session, app: int, status: str, **extra: Any) -> Any:
    args = {"session_channel": str(app), "status": status, **extra}
    return (await chat.ok(s, "Event.SetConversationStatus", args))["conversation"]


async def listed(chat: Chat, s: Session, **filters: Any) -> list[int]:
    result = await chat.ok(s, "Event.GetConversationList", {"all": True, **filters})
    return [c["application_id"] for c in result["conversations"]]


# --- the conversation's new fields -----------------------------------------------------------


async def test_new_conversation_is_open_unassigned_with_no_last_message(chat: Chat) -> None:
    conv = await chat.add(chat.staff(1), 100)
    assert conv["status"] == "open" and conv["assignee_id"] is None
    assert conv["snooze_until"] is None and conv["last_message"] is None and conv["rev"] == 0
    sent = await chat.send(chat.customer(100, 5), 100, "hello")
    (listed_conv,) = (await chat.ok(chat.staff(1), "Event.GetConversationList", {"all": True}))[
        "conversations"
    ]
    assert listed_conv["last_message"] == sent and listed_conv["rev"] == 1


async def test_every_change_takes_the_next_revision_and_a_repeat_none(chat: Chat) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    await chat.send(staff, 100, "one")
    await chat.send(staff, 100, "two")
    assert (await assign(chat, staff, 100, 7))["rev"] == 3
    assert (await assign(chat, staff, 100, 7))["rev"] == 3  # nothing changed
    assert (await set_status(chat, staff, 100, "pending"))["rev"] == 4
    assert (await set_status(chat, staff, 100, "pending"))["rev"] == 4


async def test_concurrent_sends_each_take_their_own_revision(chat: Chat) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    await chat.ok(staff, "Event.SubscribeInbox", {})
    # Sent at once: SQLite stores them in one batch, PostgreSQL in one or a few.
    await asyncio.gather(*(chat.send(chat.customer(100, 5), 100, f"m{i}") for i in range(20)))
    got = updates(staff)
    assert sorted(c["rev"] for c in got) == list(range(1, 21))
    by_rev = {c["rev"]: c["last_message"]["id"] for c in got}
    assert [by_rev[r] for r in sorted(by_rev)] == sorted(by_rev.values())  # ids grow with rev
    (final,) = (await chat.ok(staff, "Event.GetConversationList", {"all": True}))["conversations"]
    assert final["rev"] == 20 and final["last_message"]["id"] == max(by_rev.values())


# --- who may do what ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("Event.SubscribeInbox", {}),
        ("Event.UnsubscribeInbox", {}),
        ("Event.AssignConversation", {"session_channel": "100", "assignee_id": 5}),
        ("Event.AssignConversation", {"session_channel": "999", "assignee_id": 5}),
        ("Event.SetConversationStatus", {"session_channel": "100", "status": "resolved"}),
        ("Event.SetAvailability", {"availability": "online"}),
    ],
)
async def test_customers_are_refused_the_staff_events(
    chat: Chat, name: str, args: dict[str, Any]
) -> None:
    await chat.add(chat.staff(1), 100)
    customer = chat.customer(100, 5)
    assert await chat.err(customer, name, args) == "forbidden"
    (conv,) = (await chat.ok(chat.staff(1), "Event.GetConversationList", {"all": True}))[
        "conversations"
    ]
    assert conv["status"] == "open" and conv["assignee_id"] is None and conv["rev"] == 0


async def test_staff_changes_of_a_missing_conversation_are_not_found(chat: Chat) -> None:
    staff = chat.staff(1)
    assert (
        await chat.err(
            staff, "Event.AssignConversation", {"session_channel": "404", "assignee_id": 1}
        )
        == "not_found"
    )
    assert (
        await chat.err(
            staff, "Event.SetConversationStatus", {"session_channel": "404", "status": "open"}
        )
        == "not_found"
    )


@pytest.mark.parametrize(
    "args",
    [
        {"status": "closed"},
        {"status": 1},
        {"status": "snoozed"},  # without its time
        {"status": "snoozed", "snooze_until": "tomorrow"},
        {"status": "snoozed", "snooze_until": "2030-01-01T09:00:00"},  # no offset
        {"status": "resolved", "snooze_until": "2030-01-01T09:00:00Z"},
    ],
)
async def test_bad_status_changes_are_bad_requests(chat: Chat, args: dict[str, Any]) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    code = await chat.err(staff, "Event.SetConversationStatus", {"session_channel": "100", **args})
    assert code == "bad_request"


@pytest.mark.parametrize("assignee", ["5", 0, -1, True, 2**63])
async def test_bad_assignees_are_bad_requests(chat: Chat, assignee: Any) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    args = {"session_channel": "100", "assignee_id": assignee}
    assert await chat.err(staff, "Event.AssignConversation", args) == "bad_request"
    assert await chat.err(staff, "Event.AssignConversation", {"session_channel": "100"}) == (
        "bad_request"
    )


@pytest.mark.parametrize(
    "filters",
    [{"status": "gone"}, {"status": []}, {"status": [1]}, {"assignee": "you"}, {"assignee": 0}],
)
async def test_bad_list_filters_are_bad_requests(chat: Chat, filters: dict[str, Any]) -> None:
    code = await chat.err(chat.staff(1), "Event.GetConversationList", {"all": True, **filters})
    assert code == "bad_request"


# --- assignment, status, the list's filters ----------------------------------------------------


async def test_the_assignee_joins_and_gets_the_messages(chat: Chat) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    conv = await assign(chat, staff, 100, 7)
    assert conv["assignee_id"] == 7
    chat.fanout.calls.clear()
    await chat.send(chat.customer(100, 5), 100, "anyone?")
    assert 7 in chat.fanout.calls[-1].user_ids
    assert await chat.conversations(chat.staff(7)) == [100]  # a participant now
    assert (await assign(chat, staff, 100, None))["assignee_id"] is None


async def test_list_filters_by_status_and_assignee(chat: Chat) -> None:
    staff = chat.staff(1)
    for app in (100, 200, 300, 400):
        await chat.add(staff, app)
    await assign(chat, staff, 100, 1)
    await assign(chat, staff, 200, 2)
    await set_status(chat, staff, 200, "resolved")
    await set_status(chat, staff, 300, "pending")
    await set_status(chat, staff, 400, "snoozed", snooze_until="2030-01-01T09:00:00+03:00")
    assert await listed(chat, staff, assignee="me") == [100]
    assert await listed(chat, staff, assignee=2) == [200]
    assert set(await listed(chat, staff, assignee="none")) == {300, 400}
    assert await listed(chat, staff, status="resolved") == [200]
    assert set(await listed(chat, staff, status=["open", "pending"])) == {100, 300}
    assert await listed(chat, staff, status="open", assignee="me") == [100]
    assert await listed(chat, staff, status="open", assignee="none") == []
    (snoozed,) = (
        await chat.ok(staff, "Event.GetConversationList", {"all": True, "status": "snoozed"})
    )["conversations"]
    assert snoozed["snooze_until"] == "2030-01-01T06:00:00.000000Z"
    # Paged with filters: every matching conversation once.
    first = await chat.ok(
        staff, "Event.GetConversationList", {"all": True, "assignee": "none", "limit": 1}
    )
    assert first["has_more"] is True
    rest = await chat.ok(
        staff,
        "Event.GetConversationList",
        {"all": True, "assignee": "none", "limit": 1, "cursor": first["next_cursor"]},
    )
    seen = [c["application_id"] for c in first["conversations"] + rest["conversations"]]
    assert sorted(seen) == [300, 400] and rest["has_more"] is False


async def test_leaving_snoozed_clears_the_snooze_time(chat: Chat) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    snoozed = await set_status(chat, staff, 100, "snoozed", snooze_until="2030-01-01T00:00:00Z")
    assert snoozed["snooze_until"] == "2030-01-01T00:00:00.000000Z"
    assert (await set_status(chat, staff, 100, "pending"))["snooze_until"] is None


# --- the reopen rules --------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["resolved", "snoozed"])
async def test_a_customer_message_reopens(chat: Chat, status: str) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    await assign(chat, staff, 100, 1)
    extra = {"snooze_until": "2030-01-01T00:00:00Z"} if status == "snoozed" else {}
    await set_status(chat, staff, 100, status, **extra)
    await chat.ok(staff, "Event.SubscribeInbox", {"filter": "mine"})
    await chat.send(chat.customer(100, 5), 100, "me again")
    (pushed,) = updates(staff)
    assert pushed["status"] == "open" and pushed["snooze_until"] is None
    assert pushed["assignee_id"] == 1 and pushed["last_message"]["content"] == "me again"
    assert await listed(chat, staff, status="open") == [100]


@pytest.mark.parametrize("status", ["resolved", "snoozed", "pending"])
async def test_what_does_not_reopen(chat: Chat, status: str) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    customer = chat.customer(100, 5)
    await chat.send(customer, 100, "first", client_msg_id="c-1")
    extra = {"snooze_until": "2030-01-01T00:00:00Z"} if status == "snoozed" else {}
    await set_status(chat, staff, 100, status, **extra)
    await chat.send(staff, 100, "a staff message")  # staff: no
    await chat.send(customer, 100, "first", client_msg_id="c-1")  # a retry: no
    if status == "pending":
        await chat.send(customer, 100, "a new one")  # pending stays pending
    assert await listed(chat, staff, status=status) == [100]


# --- the inbox ---------------------------------------------------------------------------------


async def test_inbox_all_gets_every_kind_of_change(chat: Chat) -> None:
    agent = chat.staff(1)
    await chat.ok(agent, "Event.SubscribeInbox", {"filter": "all"})
    await chat.add(chat.customer(100, 5), 100)
    (new,) = updates(agent)
    assert new["application_id"] == 100 and new["status"] == "open" and new["rev"] == 0
    await chat.send(chat.customer(100, 5), 100, "help")
    (message,) = updates(agent)
    assert message["last_message"]["content"] == "help" and message["rev"] == 1
    await assign(chat, chat.staff(2), 100, 2)
    await set_status(chat, chat.staff(2), 100, "resolved")
    assigned, resolved = updates(agent)
    assert assigned["assignee_id"] == 2 and assigned["rev"] == 2
    assert resolved["status"] == "resolved" and resolved["rev"] == 3
    assert resolved["last_message"]["content"] == "help"
    await set_status(chat, chat.staff(2), 100, "resolved")  # no change: no push
    assert updates(agent) == []
    await chat.ok(agent, "Event.UnsubscribeInbox", {})
    await chat.send(chat.customer(100, 5), 100, "again")
    assert updates(agent) == []


async def test_inbox_mine_and_unassigned_see_conversations_come_and_go(chat: Chat) -> None:
    mine, other, unassigned = chat.staff(1), chat.staff(2), chat.staff(3)
    await chat.ok(mine, "Event.SubscribeInbox", {"filter": "mine"})
    await chat.ok(other, "Event.SubscribeInbox", {"filter": "mine"})
    await chat.ok(unassigned, "Event.SubscribeInbox", {"filter": "unassigned"})
    await chat.add(chat.customer(100, 5), 100)
    assert updates(mine) == [] and len(updates(unassigned)) == 1
    await assign(chat, chat.staff(9), 100, 1)
    assert [c["assignee_id"] for c in updates(mine)] == [1]
    assert [c["assignee_id"] for c in updates(unassigned)] == [1]  # it left "unassigned"
    await chat.send(chat.customer(100, 5), 100, "hi")
    assert len(updates(mine)) == 1 and updates(unassigned) == [] and updates(other) == []
    await assign(chat, chat.staff(9), 100, 2)
    assert [c["assignee_id"] for c in updates(mine)] == [2]  # it left "mine"
    assert [c["assignee_id"] for c in updates(other)] == [2]
    # Subscribing again replaces the filter.
    await chat.ok(mine, "Event.SubscribeInbox", {"filter": "all"})
    await chat.send(chat.customer(100, 5), 100, "still there?")
    assert len(updates(mine)) == 1


async def test_subscribe_inbox_filter_must_be_known(chat: Chat) -> None:
    for bad in ("everything", 1, ["all"]):
        code = await chat.err(chat.staff(1), "Event.SubscribeInbox", {"filter": bad})
        assert code == "bad_request"


# --- snoozes fall due ----------------------------------------------------------------------------


async def test_a_snooze_wakes_once_at_its_time(chat: Chat, clock: Clock) -> None:
    staff = chat.staff(1)
    await chat.add(staff, 100)
    await chat.ok(staff, "Event.SubscribeInbox", {})
    due = clock.now + 60_000_000
    await set_status(
        chat, staff, 100, "snoozed", snooze_until=format_ts(due).replace(".000000", "")
    )
    updates(staff)
    changes: list[Any] = []
    waker = SnoozeWaker(chat.store, chat.service.changed, clock_us=clock)
    other_node = SnoozeWaker(chat.store, changes.append, clock_us=clock)
    assert await waker.wake_due() == 0 and updates(staff) == []
    clock.now = due
    assert await waker.wake_due() == 1
    (woken,) = updates(staff)
    assert woken["status"] == "open" and woken["snooze_until"] is None
    assert await other_node.wake_due() == 0 and changes == []
    assert await listed(chat, staff, status="open") == [100]


async def test_many_snoozes_due_wake_in_batches(chat: Chat, clock: Clock) -> None:
    staff = chat.staff(1)
    for app in range(1, 131):
        await chat.add(staff, app)
        await set_status(chat, staff, app, "snoozed", snooze_until="2020-09-13T12:00:00Z")
    waker = SnoozeWaker(chat.store, chat.service.changed, clock_us=clock)
    assert await waker.wake_due() == 130
    assert await listed(chat, staff, status="snoozed") == []


# --- webhooks ----------------------------------------------------------------------------------


async def test_changes_are_recorded_as_conversation_updated(chat: Chat, clock: Clock) -> None:
    url = "http://127.0.0.1:9/hook"
    chat.store.record_webhooks([url], lambda: None)
    staff = chat.staff(1)
    await chat.add(staff, 100)
    await assign(chat, staff, 100, 1)
    await set_status(chat, staff, 100, "resolved")
    await chat.send(chat.customer(100, 5), 100, "back")  # reopens
    events = await chat.store.claim_webhooks(
        url, now=clock.now + 10**9, lease_until=clock.now + 2 * 10**9, limit=100
    )
    updated = [orjson.loads(e.data) for e in events if e.type == "conversation.updated"]
    assert [(u["assignee_id"], u["status"]) for u in updated] == [
        (1, "open"),
        (1, "resolved"),
        (1, "open"),
    ]
    assert [u["rev"] for u in updated] == [1, 2, 3]
    assert {e.type for e in events} == {
        "conversation.created",
        "conversation.updated",
        "message.created",
    }


async def test_ids_of_another_conversation_stay_apart(chat: Chat) -> None:
    """A change of one conversation leaves every other exactly as it was."""
    staff = chat.staff(1)
    await chat.add(staff, 100)
    await chat.add(staff, 200)
    before = await chat.ok(staff, "Event.GetConversationList", {"all": True})
    await assign(chat, staff, 100, 3)
    await set_status(chat, staff, 100, "resolved")
    after = await chat.ok(staff, "Event.GetConversationList", {"all": True})
    other = [c for c in after["conversations"] if c["application_id"] == 200]
    assert other == [c for c in before["conversations"] if c["application_id"] == 200]


# --- auto-assignment (--auto-assign round-robin) -------------------------------------------------


def auto_chat(store: Store, clock: Clock, max_open: int = 0) -> tuple[Chat, Presence]:  # noqa: F811
    presence = Presence(MemoryBroker(), "node-a")
    verifier = TokenVerifier(SECRET, clock=lambda: NOW)
    fanout = RecordingFanout()
    service = ChatService(
        store,
        fanout,
        verifier,
        clock_us=clock,
        inbox=Inbox(MemoryBroker(), "node-a"),
        presence=presence,
        auto_assign=AutoAssigner(store, presence, max_open=max_open),
    )
    return Chat(service=service, store=store, fanout=fanout, verifier=verifier), presence


async def assignee_of(chat: Chat, app: int) -> int | None:
    (conv,) = [
        c
        for c in (await chat.ok(chat.staff(99), "Event.GetConversationList", {"all": True}))[
            "conversations"
        ]
        if c["application_id"] == app
    ]
    assignee: int | None = conv["assignee_id"]
    return assignee


async def test_auto_assign_goes_round_the_online_agents_with_fewest_open(
    store: Store,  # noqa: F811
    clock: Clock,
) -> None:
    chat, presence = auto_chat(store, clock)
    await chat.add(chat.customer(100, 500), 100)
    assert await assignee_of(chat, 100) is None  # nobody online
    for agent in (1, 2, 3):
        presence.connected(agent, staff=True)
    presence.set_availability(3, "busy")  # there, but not taking new ones
    await chat.add(chat.staff(1), 200)  # made by staff: not assigned automatically
    assert await assignee_of(chat, 200) is None
    await assign(chat, chat.staff(1), 200, 1)  # agent 1 has one open
    await chat.add(chat.customer(300, 501), 300)
    assert await assignee_of(chat, 300) == 2  # the fewest
    await chat.add(chat.customer(400, 502), 400)
    await chat.add(chat.customer(500, 503), 500)
    # 1 and 2 had one each: round from the last chosen (2) to 1, then 2 again.
    assert [await assignee_of(chat, a) for a in (400, 500)] == [1, 2]
    await set_status(chat, chat.staff(1), 400, "resolved")  # 1 has fewer open now
    await chat.add(chat.customer(600, 504), 600)
    assert await assignee_of(chat, 600) == 1


async def test_auto_assign_respects_max_open_and_reopens(
    store: Store,  # noqa: F811
    clock: Clock,
) -> None:
    chat, presence = auto_chat(store, clock, max_open=1)
    presence.connected(7, staff=True)
    await chat.add(chat.customer(100, 500), 100)
    await chat.add(chat.customer(200, 501), 200)
    assert [await assignee_of(chat, a) for a in (100, 200)] == [7, None]  # 7 is full
    staff = chat.staff(7)
    await set_status(chat, staff, 100, "resolved")
    await assign(chat, staff, 100, None)
    await set_status(chat, staff, 200, "resolved")
    await chat.send(chat.customer(100, 500), 100, "it broke again")  # reopens, unassigned
    assert await assignee_of(chat, 100) == 7
    await assign(chat, staff, 200, 8)
    await chat.send(chat.customer(200, 501), 200, "me too")  # reopens, keeps its agent
    assert await assignee_of(chat, 200) == 8
