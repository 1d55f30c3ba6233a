"""History an agent works with (SPEC, third round), through ChatService.handle with a real
store on both engines: private notes never reaching a customer by any path, edits within
the window, deletions leaving a stub, revisions and GetMessageList's changed_since."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from appchat.auth.tokens import TokenVerifier
from appchat.blobs.images import ImageReferences
from appchat.blobs.local import LocalBlobStore
from appchat.broker.memory import MemoryBroker
from appchat.chat.service import ChatService, Limits
from appchat.fanout.inbox import Inbox
from appchat.store import Store

from .test_desk import Clock, updates
from .test_service import NOW, SECRET, Chat, RecordingFanout, Session, store  # noqa: F401

EDIT_WINDOW_US = 60_000_000


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def blobs(tmp_path: Path) -> LocalBlobStore:
    found = LocalBlobStore(str(tmp_path / "uploads"))
    await found.open()
    return found


@pytest.fixture
def chat(store: Store, clock: Clock, blobs: LocalBlobStore) -> Chat:  # noqa: F811
    fanout = RecordingFanout()
    verifier = TokenVerifier(SECRET, clock=lambda: NOW)
    service = ChatService(
        store,
        fanout,
        verifier,
        limits=Limits(max_content=100, edit_window_us=EDIT_WINDOW_US),
        clock_us=clock,
        inbox=Inbox(MemoryBroker(), "node-a"),
        images=ImageReferences(blobs),
    )
    return Chat(service=service, store=store, fanout=fanout, verifier=verifier)


async def setup(chat: Chat) -> tuple[Session, Session, Session]:
    """Application 100: customer 5, staff 1 and 2 taking part."""
    customer, agent, colleague = chat.customer(100, 5), chat.staff(1), chat.staff(2)
    await chat.add(customer, 100)
    await chat.add(agent, 100)
    await chat.add(colleague, 100)
    return customer, agent, colleague


async def edit(chat: Chat, s: Session, message_id: int, content: str) -> dict[str, Any]:
    result = await chat.ok(s, "Event.EditMessage", {"id": message_id, "content": content})
    message: dict[str, Any] = result["message"]
    return message


async def delete(chat: Chat, s: Session, message_id: int) -> dict[str, Any]:
    message: dict[str, Any] = (await chat.ok(s, "Event.DeleteMessage", {"id": message_id}))[
        "message"
    ]
    return message


# --- private notes ---------------------------------------------------------------------------


async def test_a_private_note_never_reaches_the_customer(chat: Chat) -> None:
    customer, agent, colleague = await setup(chat)
    hello = await chat.send(customer, 100, "hello")
    chat.fanout.calls.clear()
    note = await chat.send(agent, 100, "she called twice", private=True)
    assert note["private"] is True
    # Pushed to the staff participants, and only to their staff connections.
    (push,) = chat.fanout.calls
    assert push.user_ids == [1, 2] and push.staff_only is True
    assert push.frame["result"]["message"] == note
    # Not in the customer's list, unread count, last_message, nor readable by id.
    ids = [m["id"] for m in (await chat.messages(customer, 100))["Messages"]]
    assert ids == [hello["id"]]
    staff_ids = [m["id"] for m in (await chat.messages(colleague, 100))["Messages"]]
    assert staff_ids == [hello["id"], note["id"]]
    assert (await chat.unread(customer))["total"] == 0
    assert (await chat.unread(colleague))["total"] == 2  # staff count notes
    (mine,) = (await chat.ok(customer, "Event.GetConversationList", {}))["conversations"]
    assert mine["last_message"]["id"] == hello["id"]
    again = await chat.add(customer, 100)
    assert again["last_message"]["id"] == hello["id"]
    (inbox,) = (await chat.ok(agent, "Event.GetConversationList", {"all": True}))["conversations"]
    assert inbox["last_message"]["id"] == note["id"]
    code = await chat.err(
        customer, "Event.ReadMessage", {"session_channel": "100", "message_id": note["id"]}
    )
    assert code == "not_found"
    # changed_since and edits by id tell a customer nothing either.
    changed = await chat.messages(customer, 100, changed_since=0)
    assert [m["id"] for m in changed["Messages"]] == [hello["id"]]
    assert await chat.err(customer, "Event.DeleteMessage", {"id": note["id"]}) == "not_found"


async def test_a_staff_read_up_to_a_note_is_told_to_staff_only(chat: Chat) -> None:
    customer, agent, colleague = await setup(chat)
    await chat.send(customer, 100, "hello")
    note = await chat.send(agent, 100, "internal", private=True)
    chat.fanout.calls.clear()
    await chat.read(colleague, 100, note["id"])
    (push,) = chat.fanout.calls
    assert push.frame["name"] == "Event.MessageRead" and 5 not in push.user_ids
    # The customer's own read of the public message moves and is told to everyone.
    mine = await chat.messages(customer, 100)
    chat.fanout.calls.clear()
    await chat.read(customer, 100, mine["Messages"][-1]["id"])
    assert {1, 2} <= set(chat.fanout.calls[0].user_ids)


async def test_only_staff_write_private_notes(chat: Chat) -> None:
    customer, _agent, _colleague = await setup(chat)
    args = {"session_channel": "100", "content": "x", "private": True}
    assert await chat.err(customer, "Event.SendMessage", args) == "forbidden"
    bad = {"session_channel": "100", "content": "x", "private": "yes"}
    assert await chat.err(chat.staff(1), "Event.SendMessage", bad) == "bad_request"
    assert (await chat.messages(chat.staff(1), 100))["Messages"] == []


async def test_notes_are_marked_private_in_the_webhook(chat: Chat, clock: Clock) -> None:
    url = "http://127.0.0.1:9/hook"
    chat.store.record_webhooks([url], lambda: None)
    _customer, agent, _colleague = await setup(chat)
    await chat.send(agent, 100, "internal", private=True)
    events = await chat.store.claim_webhooks(
        url, now=clock.now + 10**9, lease_until=clock.now + 2 * 10**9, limit=10
    )
    (created,) = [orjson.loads(e.data) for e in events if e.type == "message.created"]
    assert created["private"] is True and created["content"] == "internal"


# --- edits and deletions -----------------------------------------------------------------------


async def test_the_sender_edits_within_the_window(chat: Chat, clock: Clock) -> None:
    customer, agent, colleague = await setup(chat)
    sent = await chat.send(customer, 100, "helo")
    await chat.ok(colleague, "Event.SubscribeInbox", {})
    chat.fanout.calls.clear()
    edited = await edit(chat, customer, sent["id"], "hello")
    assert edited["id"] == sent["id"] and edited["content"] == "hello"
    assert edited["rev"] > sent["rev"] and "edited_at" in edited
    (push,) = chat.fanout.calls
    assert push.frame["name"] == "Event.MessageUpdated" and push.frame["result"]["message"] == (
        edited
    )
    assert push.user_ids == [1, 2, 5] and push.origin is not None  # but the editing connection
    (inbox,) = updates(colleague)
    assert inbox["rev"] == edited["rev"] and inbox["last_message"] == edited
    assert (await chat.messages(agent, 100))["Messages"][-1] == edited
    # Someone else's message, an image, the window passed: refused, nothing changed.
    assert await chat.err(agent, "Event.EditMessage", {"id": sent["id"], "content": "x"}) == (
        "forbidden"
    )
    clock.now += EDIT_WINDOW_US + 1
    late = {"id": sent["id"], "content": "too late"}
    assert await chat.err(customer, "Event.EditMessage", late) == "forbidden"
    assert (await chat.messages(agent, 100))["Messages"][-1] == edited


@pytest.mark.parametrize(
    "args",
    [{}, {"id": "1"}, {"id": 1}, {"id": 1, "content": ""}, {"id": 1, "content": "x" * 101}],
)
async def test_bad_edits_are_bad_requests(chat: Chat, args: dict[str, Any]) -> None:
    await setup(chat)
    assert await chat.err(chat.staff(1), "Event.EditMessage", args) == "bad_request"


async def test_deletion_leaves_a_stub_once(chat: Chat) -> None:
    customer, agent, colleague = await setup(chat)
    mine = await chat.send(customer, 100, "oops, my card number")
    theirs = await chat.send(agent, 100, "from staff")
    assert await chat.err(customer, "Event.DeleteMessage", {"id": theirs["id"]}) == "forbidden"
    chat.fanout.calls.clear()
    stub = await delete(chat, colleague, mine["id"])  # any staff may delete
    assert stub["id"] == mine["id"] and stub["deleted"] is True and stub["content"] == ""
    assert stub["rev"] > theirs["rev"]
    (push,) = chat.fanout.calls
    assert push.frame["name"] == "Event.MessageUpdated"
    listed = (await chat.messages(customer, 100))["Messages"]
    assert [m["id"] for m in listed] == [mine["id"], theirs["id"]] and listed[0] == stub
    chat.fanout.calls.clear()
    assert await delete(chat, customer, mine["id"]) == stub  # again: the same, nothing new
    assert chat.fanout.calls == []
    code = await chat.err(customer, "Event.EditMessage", {"id": mine["id"], "content": "x"})
    assert code == "bad_request"


async def test_messages_of_other_applications_are_not_found(chat: Chat) -> None:
    await setup(chat)
    other = chat.customer(200, 6)
    await chat.add(other, 200)
    theirs = await chat.send(other, 200, "mine")
    intruder = chat.customer(100, 5)
    for name, args in (
        ("Event.EditMessage", {"id": theirs["id"], "content": "x"}),
        ("Event.DeleteMessage", {"id": theirs["id"]}),
        ("Event.DeleteMessage", {"id": 987654}),
    ):
        assert await chat.err(intruder, name, args) == "not_found"


async def test_deleting_an_image_removes_its_upload(chat: Chat, blobs: LocalBlobStore) -> None:
    customer, _agent, _colleague = await setup(chat)
    key = "100/0123456789abcdef0123456789abcdef"
    await blobs.put(key, b"\x89PNG\r\n\x1a\n-image")
    await blobs.put(key + ".thumb", b"\x89PNG\r\n\x1a\n-thumb")
    image = await chat.send(customer, 100, f"/files/{key}", content_type=2)
    assert await chat.err(customer, "Event.EditMessage", {"id": image["id"], "content": "x"}) == (
        "bad_request"
    )
    await delete(chat, customer, image["id"])
    assert not await blobs.exists(key) and not await blobs.exists(key + ".thumb")


# --- revisions and changed_since -----------------------------------------------------------------


async def test_changed_since_returns_what_changed_by_rev(chat: Chat) -> None:
    customer, agent, _colleague = await setup(chat)
    first = await chat.send(customer, 100, "one")
    second = await chat.send(agent, 100, "two")
    seen = second["rev"]  # a page that held both goes away here
    third = await chat.send(customer, 100, "three")
    edited = await edit(chat, customer, first["id"], "one, corrected")
    stub = await delete(chat, agent, second["id"])
    note = await chat.send(agent, 100, "internal", private=True)
    changed = await chat.messages(customer, 100, changed_since=seen)
    assert [m["id"] for m in changed["Messages"]] == [third["id"], first["id"], second["id"]]
    assert changed["Messages"][1] == edited and changed["Messages"][2] == stub
    assert changed["has_more"] is False
    revs = [m["rev"] for m in changed["Messages"]]
    assert revs == sorted(revs) and len(set(revs)) == len(revs)
    staff_view = await chat.messages(agent, 100, changed_since=seen, limit=2)
    assert [m["id"] for m in staff_view["Messages"]] == [third["id"], first["id"]]
    assert staff_view["has_more"] is True
    rest = await chat.messages(agent, 100, changed_since=staff_view["Messages"][-1]["rev"])
    assert [m["id"] for m in rest["Messages"]] == [second["id"], note["id"]]
    assert await chat.messages(customer, 100, changed_since=note["rev"]) == {
        "Messages": [],
        "has_more": False,
    }


@pytest.mark.parametrize(
    "extra", [{"changed_since": -1}, {"changed_since": "1"}, {"changed_since": 1, "after_id": 1}]
)
async def test_bad_changed_since_is_a_bad_request(chat: Chat, extra: dict[str, Any]) -> None:
    customer, _agent, _colleague = await setup(chat)
    args = {"session_channel": "100", **extra}
    assert await chat.err(customer, "Event.GetMessageList", args) == "bad_request"


async def test_revisions_of_messages_and_changes_share_one_counter(chat: Chat) -> None:
    customer, agent, _colleague = await setup(chat)
    a = await chat.send(customer, 100, "a")
    assigned = await chat.ok(
        agent, "Event.AssignConversation", {"session_channel": "100", "assignee_id": 1}
    )
    b = await chat.send(customer, 100, "b")
    assert a["rev"] < assigned["conversation"]["rev"] < b["rev"]
    (conv,) = (await chat.ok(agent, "Event.GetConversationList", {"all": True}))["conversations"]
    assert conv["rev"] == b["rev"] and conv["last_message"] == b
