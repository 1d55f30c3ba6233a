"""The data's lifecycle on both engines: export whole, erasure of a conversation (files on
local disk and on the S3 test server) and of a participant (other unread counts exact),
retention with the clock moved forward, orphan uploads swept; and the server API's routes
over real HTTP."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from appchat.auth.tokens import TokenVerifier
from appchat.blobs import BlobStore
from appchat.blobs.local import LocalBlobStore
from appchat.broker.memory import MemoryBroker
from appchat.chat.lifecycle import Lifecycle
from appchat.chat.service import ChatService, Limits
from appchat.fanout.inbox import Inbox
from appchat.store import Store

from .motoserver import CREDENTIALS, moto_server, new_bucket
from .support import Server, ServerProcess, customer, staff
from .test_desk import Clock, updates
from .test_service import NOW, SECRET, Chat, RecordingFanout, store  # noqa: F401

DAY_US = 86_400 * 1_000_000


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(params=["local", "s3"])
async def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    found: BlobStore
    if request.param == "local":
        found = LocalBlobStore(tmp_path / "uploads")
    else:
        from appchat.blobs.s3 import S3BlobStore

        endpoint = request.getfixturevalue("s3_endpoint")
        found = S3BlobStore(new_bucket(endpoint), endpoint_url=endpoint, client_options=CREDENTIALS)
    await found.open()
    yield found
    await found.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


class World:
    def __init__(self, store: Store, blobs: BlobStore, clock: Clock) -> None:  # noqa: F811
        self.clock = clock
        self.fanout = RecordingFanout()
        verifier = TokenVerifier(SECRET, clock=lambda: NOW)
        self.service = ChatService(
            store,
            self.fanout,
            verifier,
            limits=Limits(max_content=100),
            clock_us=clock,
            inbox=Inbox(MemoryBroker(), "node-a"),
        )
        self.chat = Chat(service=self.service, store=store, fanout=self.fanout, verifier=verifier)
        self.blobs = blobs
        self.lifecycle = Lifecycle(
            store, blobs, self.service, retention_days=30, orphan_ttl=3600, clock_us=clock
        )

    async def image(self, app: int, name: str) -> str:
        """An upload of ``app`` (and its thumbnail) in the blob store; its reference."""
        key = f"{app}/{name:0>32}"
        await self.blobs.put(key, b"\x89PNG\r\n\x1a\n" + name.encode())
        await self.blobs.put(key + ".thumb", b"\x89PNG\r\n\x1a\n" + b"thumb")
        return "/files/" + key

    async def keys(self, prefix: str = "") -> set[str]:
        return {key for key, _when in await self.blobs.listing(prefix)}


@pytest.fixture
def world(store: Store, blobs: BlobStore, clock: Clock) -> World:  # noqa: F811
    return World(store, blobs, clock)


async def export(world: World, app: int) -> dict[str, Any]:
    pieces = [piece async for piece in await world.lifecycle.export(app)]
    assert len(pieces) > 2  # written in pieces, not built whole
    doc: dict[str, Any] = orjson.loads(b"".join(pieces))
    return doc


async def test_export_holds_everything_of_the_conversation(world: World) -> None:
    chat = world.chat
    c, s = chat.customer(100, 5), chat.staff(1)
    await chat.add(c, 100)
    await chat.add(s, 100)
    texts = [await chat.send(c, 100, f"m{i}") for i in range(1203)]  # several chunks
    note = await chat.send(s, 100, "internal", private=True)
    gone = await chat.ok(s, "Event.DeleteMessage", {"id": texts[0]["id"]})
    picture = await chat.send(c, 100, await world.image(100, "a1"), content_type=2)
    await chat.read(s, 100, picture["id"])
    doc = await export(world, 100)
    assert list(doc) == ["conversation", "participants", "messages", "uploads"]
    assert doc["conversation"]["application_id"] == 100
    ids = [m["id"] for m in doc["messages"]]
    assert ids == sorted(ids) and len(ids) == 1205
    by_id = {m["id"]: m for m in doc["messages"]}
    assert by_id[note["id"]]["private"] is True
    stub = by_id[texts[0]["id"]]  # (read since it was deleted: its status moved on)
    assert (
        stub["deleted"] is True and stub["content"] == "" and stub["rev"] == gone["message"]["rev"]
    )
    assert doc["uploads"] == [picture["content"]]
    people = {p["user_id"]: p for p in doc["participants"]}
    assert people[1]["staff"] is True and people[1]["read_position"] == picture["id"]
    assert people[5]["staff"] is False and people[5]["read_position"] == 0
    # Handed to the customer: everything but the note.
    public = orjson.loads(
        b"".join([p async for p in await world.lifecycle.export(100, public=True)])
    )
    assert [m["id"] for m in public["messages"]] == [i for i in ids if i != note["id"]]
    assert not any(m.get("private") for m in public["messages"])
    assert public["conversation"]["last_message"]["id"] == picture["id"]
    with pytest.raises(Exception) as missing:
        await world.lifecycle.export(404)
    assert getattr(missing.value, "code", None) == "not_found"


async def test_erasing_a_conversation_leaves_nothing(world: World) -> None:
    chat, db = world.chat, world.chat.store
    url = "http://127.0.0.1:9/hook"
    db.record_webhooks([url], lambda: None)
    c, s = chat.customer(100, 5), chat.staff(1)
    await chat.add(c, 100)
    await chat.add(chat.customer(200, 6), 200)
    await chat.send(chat.customer(200, 6), 200, "the other one stays")
    kept = await world.image(200, "b2")
    await chat.ok(s, "Event.SubscribeInbox", {})
    await chat.send(c, 100, "my address is …")
    await chat.send(c, 100, await world.image(100, "c3"), content_type=2)
    await world.image(100, "d4")  # uploaded, never sent
    world.fanout.calls.clear()
    updates(s)
    assert await world.lifecycle.erase_conversation(100) is True
    assert await world.keys("100/") == set()
    assert kept[len("/files/") :] in await world.keys("200/")
    (told,) = [d for d in world.fanout.calls if d.frame["name"] == "Event.ConversationDeleted"]
    assert told.user_ids == [5] and told.frame["result"] == {
        "session_channel": "100",
        "application_id": 100,
    }
    assert [p["name"] for p in s.pushes] == ["Event.ConversationDeleted"]
    assert await db.get_conversation(100) is None
    assert await chat.conversations(chat.staff(1), all=True) == [200]
    assert (await chat.unread(c))["total"] == 0
    events = await db.claim_webhooks(
        url, now=world.clock.now + 10**9, lease_until=world.clock.now + 2 * 10**9, limit=100
    )
    mentions_100 = [e for e in events if orjson.loads(e.data).get("application_id") == 100]
    assert [e.type for e in mentions_100] == ["conversation.deleted"]
    assert {orjson.loads(e.data)["application_id"] for e in events} == {100, 200}
    assert await world.lifecycle.erase_conversation(100) is False
    # The application starts afresh, on this node too.
    again = await chat.add(c, 100)
    assert again["rev"] == 0 and again["last_message"] is None
    await chat.send(c, 100, "hello again")
    assert [m["content"] for m in (await chat.messages(c, 100))["Messages"]] == ["hello again"]


async def test_erasing_a_participant_keeps_everyone_elses_counts(world: World) -> None:
    chat = world.chat
    c, s, other = chat.customer(100, 5), chat.staff(1), chat.staff(2)
    for who in (c, s, other):
        await chat.add(who, 100)
    await chat.send(s, 100, "hello")
    picture = await chat.send(c, 100, await world.image(100, "e5"), content_type=2)
    mine = [await chat.send(c, 100, f"private detail {i}") for i in range(3)]
    await chat.read(other, 100, mine[0]["id"])
    before = {who: (await chat.unread(chat.staff(who)))["total"] for who in (1, 2)}
    assert before == {1: 4, 2: 2}
    assert await world.lifecycle.erase_participant(5) == 4
    after = {who: (await chat.unread(chat.staff(who)))["total"] for who in (1, 2)}
    assert after == before
    listed = (await chat.messages(s, 100))["Messages"]
    stubs = [m for m in listed if m["sender_id"] == 5]
    assert len(stubs) == 4 and all(m["deleted"] and m["content"] == "" for m in stubs)
    assert {m["id"] for m in stubs} == {picture["id"], *(m["id"] for m in mine)}
    assert await world.keys("100/") == set()
    conversation = await chat.store.get_conversation(100)
    assert conversation is not None
    participants = await chat.store.participant_list(conversation.id)
    assert [p.user_id for p in participants] == [1, 2]  # their read position went
    changed = await chat.messages(s, 100, changed_since=mine[-1]["rev"])
    assert {m["id"] for m in changed["Messages"]} == {m["id"] for m in stubs}


async def test_retention_deletes_old_messages_and_their_files(world: World) -> None:
    chat, clock = world.chat, world.clock
    c, s = chat.customer(100, 5), chat.staff(1)
    await chat.add(c, 100)
    await chat.add(s, 100)
    await chat.add(chat.customer(300, 7), 300)
    old_picture = await chat.send(c, 100, await world.image(100, "f6"), content_type=2)
    shared = await world.image(100, "a7")
    await chat.send(c, 100, shared, content_type=2)
    old = [await chat.send(c, 100, f"old {i}") for i in range(1100)]  # more than a batch
    await chat.send(chat.customer(300, 7), 300, "old too")  # its conversation empties
    await chat.read(s, 100, old[500]["id"])
    clock.now += 31 * DAY_US
    await chat.send(c, 100, shared, content_type=2)  # shows the shared upload again
    recent = await chat.send(c, 100, "recent")
    unread_before = (await chat.unread(s))["total"]
    assert await world.lifecycle.expire() == 1103
    listed = (await chat.messages(s, 100))["Messages"]
    assert [m["content"] for m in listed] == [shared, "recent"]
    assert unread_before == 599 + 2  # old ones after the read position, and the new two
    assert (await chat.unread(s))["total"] == 2
    assert (await chat.unread(c))["total"] == 0
    assert await chat.store.get_conversation(300) is None
    keys = await world.keys("100/")
    assert old_picture["content"][len("/files/") :] not in keys
    assert shared[len("/files/") :] in keys
    await chat.read(s, 100, recent["id"])
    assert (await chat.unread(s))["total"] == 0
    assert await world.lifecycle.expire() == 0


async def test_orphan_uploads_go_and_used_ones_stay(world: World) -> None:
    chat = world.chat
    c = chat.customer(100, 5)
    await chat.add(c, 100)
    used = await world.image(100, "b8")
    await chat.send(c, 100, used, content_type=2)
    orphan = await world.image(100, "c9")
    if isinstance(world.blobs, LocalBlobStore):  # files a day old, as the clock sees them
        for key in await world.keys():
            path = world.blobs.root / key
            os.utime(path, (time.time() - 7200, time.time() - 7200))
        assert await world.lifecycle.sweep_orphans() == 2
        keys = await world.keys()
        assert used[len("/files/") :] in keys and used[len("/files/") :] + ".thumb" in keys
        assert not {orphan[len("/files/") :], orphan[len("/files/") :] + ".thumb"} & keys
    else:  # S3 sets the time itself: nothing is old enough yet
        assert await world.lifecycle.sweep_orphans() == 0


# --- over real HTTP ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    db = tmp_path_factory.mktemp("life") / "appchat.db"
    proc = ServerProcess(db, "--rate", "0", "--api-key", "ops:" + "k" * 40).start()
    yield proc
    proc.stop()


async def test_routes_export_erase_and_erase_a_participant(api_server: Server) -> None:
    headers = {"Authorization": "Bearer " + "k" * 40}
    async with (
        customer(api_server, 500, 55) as c,
        customer(api_server, 501, 56) as leaving,
        staff(api_server, 1) as s,
        aiohttp.ClientSession(headers=headers) as http,
    ):
        await c.ok("Event.AddConversation", {"application_id": 500})
        await leaving.ok("Event.AddConversation", {"application_id": 501})
        for i in range(3):
            await c.ok("Event.SendMessage", {"session_channel": "500", "content": f"m{i}"})
            await leaving.ok("Event.SendMessage", {"session_channel": "501", "content": f"x{i}"})
        async with http.get(api_server.http("/api/conversations/500/export")) as r:
            assert r.status == 200 and r.content_type == "application/json"
            doc = await r.json()
        assert [m["content"] for m in doc["messages"]] == ["m0", "m1", "m2"]
        await s.ok(
            "Event.SendMessage", {"session_channel": "500", "content": "note", "private": True}
        )
        url = api_server.http("/api/conversations/500/export?audience=customer")
        async with http.get(url) as r:
            assert r.status == 200
            handed = await r.json()
        assert [m["content"] for m in handed["messages"]] == ["m0", "m1", "m2"]

        async with http.post(api_server.http("/api/participants/56/erase")) as r:
            assert r.status == 200 and await r.json() == {"user_id": 56, "messages": 3}
        page = await s.ok("Event.GetMessageList", {"session_channel": "501"})
        assert [(m["deleted"], m["content"]) for m in page["Messages"]] == [(True, "")] * 3

        async with http.delete(api_server.http("/api/conversations/500")) as r:
            assert r.status == 204 and await r.read() == b""
        deleted = await c.push("Event.ConversationDeleted")
        assert deleted["result"] == {"session_channel": "500", "application_id": 500}
        async with http.delete(api_server.http("/api/conversations/500")) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        async with http.get(api_server.http("/api/conversations/500/export")) as r:
            assert r.status == 404
        page = await s.ok("Event.GetMessageList", {"session_channel": "501"})
        assert len(page["Messages"]) == 3  # the other conversation is untouched
