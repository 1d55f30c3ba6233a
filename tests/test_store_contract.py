"""One contract for every Store implementation: SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import orjson
import psycopg
import pytest

from appchat.protocol.errors import AppError, Forbidden, NotFound
from appchat.protocol.models import (
    CONVERSATION_CREATED,
    MESSAGE_CREATED,
    MESSAGE_READ,
    Conversation,
    Message,
    SendOutcome,
    WebhookBacklog,
    WebhookEvent,
    WebhookFailure,
)
from appchat.store import Store

from .backends import ENGINES, opened_store, postgres_database
from .support import eventually

NOW = 1_700_000_000_000_000


@pytest.fixture(params=ENGINES)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with opened_store(request.param, tmp_path) as s:
        yield s


async def conversation(store: Store, app: int = 100, user: int = 1) -> Conversation:
    return await store.add_conversation(app, user, staff=True, now=NOW)


async def send(
    store: Store,
    conv: Conversation,
    sender: int,
    text: str,
    *,
    staff: bool = False,
    content_type: int = 1,
    client_msg_id: str | None = None,
) -> int:
    outcome = await store.add_message(
        conv,
        sender_id=sender,
        staff=staff,
        content=text,
        content_type=content_type,
        client_msg_id=client_msg_id,
        now=NOW + 1,
    )
    return outcome.message.id


def sending(
    store: Store,
    conv: Conversation,
    sender: int,
    text: str,
    cmid: str | None,
    *,
    staff: bool = False,
    guard: bool = False,
) -> Awaitable[SendOutcome]:
    """A send not yet awaited: gathered with others, it joins their batch."""
    return store.add_message(
        conv,
        sender_id=sender,
        staff=staff,
        content=text,
        content_type=1,
        client_msg_id=cmid,
        now=NOW + 10,
        guard_staff=guard,
    )


async def test_conversation_is_created_once(store: Store) -> None:
    first = await store.add_conversation(100, 1, staff=True, now=NOW)
    again = await store.add_conversation(100, 2, staff=False, now=NOW + 5)
    assert again == first
    assert first.application_id == 100 and first.create_at == NOW
    assert await store.get_conversation(100) == first
    assert await store.get_conversation(101) is None
    assert [c.id for c in (await store.conversation_page(2, limit=9)).conversations] == [first.id]
    assert (await store.conversation_page(3, limit=9)).conversations == []


async def test_staff_participation_only_grows(store: Store) -> None:
    conv = await conversation(store, user=1)
    assert await store.is_staff_participant(conv.id, 1)
    await store.add_conversation(100, 5, staff=False, now=NOW)
    assert not await store.is_staff_participant(conv.id, 5)
    await store.add_conversation(100, 1, staff=False, now=NOW)
    assert await store.is_staff_participant(conv.id, 1)
    await send(store, conv, 5, "now as staff", staff=True)
    assert await store.is_staff_participant(conv.id, 5)


async def test_add_message_and_participants(store: Store) -> None:
    conv = await conversation(store)
    outcome = await store.add_message(
        conv, sender_id=7, staff=False, content="hi", content_type=2, client_msg_id=None, now=NOW
    )
    m = outcome.message
    assert outcome.created and sorted(outcome.participants) == [1, 7]
    assert (m.application_id, m.sender_id, m.content, m.content_type, m.status) == (
        100,
        7,
        "hi",
        2,
        0,
    )
    page = await store.list_messages(conv, limit=50)
    assert page.messages == [m] and not page.has_more


async def test_activity_time_never_moves_back(store: Store) -> None:
    """A node whose clock is behind sends after one whose clock is ahead: the conversation's
    activity time keeps the later one, alone and in a batch (the engines once disagreed)."""
    conv = await conversation(store)

    async def send_at(now: int) -> None:
        await store.add_message(
            conv, sender_id=1, staff=True, content="t", content_type=1, client_msg_id=None, now=now
        )

    await send_at(NOW + 5_000)
    await send_at(NOW + 3_000)
    got = await store.get_conversation(100)
    assert got is not None and got.update_at == NOW + 5_000
    await asyncio.gather(*(send_at(NOW + 1_000 + i) for i in range(5)))
    got = await store.get_conversation(100)
    assert got is not None and got.update_at == NOW + 5_000
    await send_at(NOW + 9_000)
    got = await store.get_conversation(100)
    assert got is not None and got.update_at == NOW + 9_000


async def test_client_msg_id_is_idempotent_per_sender_and_conversation(store: Store) -> None:
    conv = await conversation(store)
    other = await conversation(store, app=200)
    a = await send(store, conv, 7, "x", client_msg_id="k")
    retry = await store.add_message(
        conv, sender_id=7, staff=False, content="x", content_type=1, client_msg_id="k", now=NOW
    )
    assert not retry.created and retry.message.id == a
    assert await send(store, conv, 8, "x", client_msg_id="k") != a
    assert await send(store, other, 7, "x", client_msg_id="k") != a
    assert len((await store.list_messages(conv, limit=50)).messages) == 2


async def test_paging(store: Store) -> None:
    conv = await conversation(store)
    ids = [await send(store, conv, 1, f"m{i}") for i in range(12)]
    page = await store.list_messages(conv, limit=5)
    assert [m.id for m in page.messages] == ids[-5:] and page.has_more
    page = await store.list_messages(conv, before_id=ids[5], limit=5)
    assert [m.id for m in page.messages] == ids[:5] and not page.has_more
    page = await store.list_messages(conv, after_id=ids[5], limit=3)
    assert [m.id for m in page.messages] == ids[6:9] and page.has_more
    page = await store.list_messages(conv, after_id=ids[8], limit=3)
    assert [m.id for m in page.messages] == ids[9:] and not page.has_more
    page = await store.list_messages(conv, after_id=0, limit=12)
    assert [m.id for m in page.messages] == ids and not page.has_more


async def test_read_positions_status_and_unread(store: Store) -> None:
    conv = await conversation(store, user=1)
    await store.add_conversation(100, 2, staff=False, now=NOW)
    a = await send(store, conv, 2, "a")
    b = await send(store, conv, 1, "b")
    c = await send(store, conv, 2, "c")
    assert await unread_of(store, 1) == {100: 2}
    assert await unread_of(store, 2) == {100: 1}

    moved = await store.read_messages(conv, reader_id=1, staff=True, message_id=b, now=NOW + 9)
    assert moved.moved and sorted(moved.participants) == [1, 2]
    status = {m.id: m.status for m in (await store.list_messages(conv, limit=9)).messages}
    assert status == {a: 1, b: 0, c: 0}  # b is the reader's own
    assert await unread_of(store, 1) == {100: 1}

    back = await store.read_messages(conv, reader_id=1, staff=True, message_id=a, now=NOW)
    assert not back.moved
    await store.read_messages(conv, reader_id=1, staff=True, message_id=c, now=NOW)
    status = {m.id: m.status for m in (await store.list_messages(conv, limit=9)).messages}
    assert status == {a: 1, b: 0, c: 1}
    assert await unread_of(store, 1) == {100: 0}
    with pytest.raises(NotFound):
        await store.read_messages(conv, reader_id=1, staff=True, message_id=c + 1000, now=NOW)


async def test_read_of_another_conversations_message_is_not_found(store: Store) -> None:
    conv = await conversation(store)
    other = await conversation(store, app=200)
    m = await send(store, other, 1, "elsewhere")
    with pytest.raises(NotFound):
        await store.read_messages(conv, reader_id=1, staff=True, message_id=m, now=NOW)


async def test_lists_order_by_activity_and_filter_by_application(store: Store) -> None:
    a = await conversation(store, app=100)
    b = await conversation(store, app=200)
    await store.add_message(
        a, sender_id=1, staff=True, content="x", content_type=1, client_msg_id=None, now=NOW + 50
    )

    async def apps(
        user: int | None, limit: int = 9, application_id: int | None = None
    ) -> list[int]:
        page = await store.conversation_page(user, limit=limit, application_id=application_id)
        return [c.application_id for c in page.conversations]

    assert await apps(1) == [100, 200]
    assert await apps(None) == [100, 200]
    assert await apps(None, limit=1) == [100]
    assert await apps(1, application_id=200) == [b.application_id]
    counts = (await store.unread_page(1, application_id=100, limit=9)).counts
    assert [(u.application_id, u.unread) for u in counts] == [(100, 0)]


async def test_concurrent_sends_to_one_conversation_get_increasing_ids(store: Store) -> None:
    conv = await conversation(store)
    ids = await asyncio.gather(*(send(store, conv, 1 + i % 3, f"c{i}") for i in range(40)))
    assert len(set(ids)) == 40
    page = await store.list_messages(conv, after_id=0, limit=100)
    assert sorted(m.id for m in page.messages) == sorted(ids)


async def test_ping(store: Store) -> None:
    await store.ping()


def test_nodes_starting_at_once_migrate_postgres_once() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from appchat.store.migrate import apply_postgres_migrations, migrations_dir

    every = len(list(Path(migrations_dir("postgresql")).glob("*.sql")))
    assert every >= 2
    with postgres_database() as url, ThreadPoolExecutor(4) as pool:
        applied = list(pool.map(lambda _: apply_postgres_migrations(url), range(4)))
        assert sorted(applied) == [0, 0, 0, every]  # one node applied them all
        assert apply_postgres_migrations(url) == 0


async def unread_of(store: Store, user: int) -> dict[int, int]:
    """Every conversation's unread count for ``user`` (one page holds them all here)."""
    page = await store.unread_page(user, limit=500)
    assert not page.has_more
    return {u.application_id: u.unread for u in page.counts}


async def by_activity(store: Store, conversations: list[Conversation]) -> list[int]:
    """The ids of ``conversations`` as they are now, newest activity first (ties: the
    higher id first), sorted here rather than by the store."""
    now = [await store.get_conversation(c.application_id) for c in conversations]
    ordered = sorted((c for c in now if c is not None), key=lambda c: (c.update_at, c.id))
    return [c.id for c in reversed(ordered)]


async def test_unread_counters_agree_with_counting(store: Store) -> None:
    """The kept counters say what counting the messages would: others' messages past the
    reader's position, through sends, retries, refusals and reads in any order."""
    conv = await conversation(store, app=100, user=1)
    other = await conversation(store, app=200, user=1)
    sent: list[tuple[int, int]] = []  # (id, sender)
    for i, sender in enumerate([2, 2, 1, 2, 1, 1, 2]):
        sent.append((await send(store, conv, sender, f"m{i}", client_msg_id=f"c{i}"), sender))
    await send(store, conv, 2, "m0 again", client_msg_id="c0")  # a retry counts nothing
    await send(store, other, 3, "elsewhere")

    def expected(user: int, position: int) -> int:
        return sum(1 for mid, sender in sent if mid > position and sender != user)

    assert await unread_of(store, 1) == {100: expected(1, 0), 200: 1}
    assert await unread_of(store, 2) == {100: expected(2, 0)}
    for reader, upto in [(1, sent[2][0]), (2, sent[4][0]), (1, sent[1][0]), (1, sent[5][0])]:
        await store.read_messages(
            conv, reader_id=reader, staff=reader == 1, message_id=upto, now=NOW
        )
    positions = {1: sent[5][0], 2: sent[4][0]}
    assert (await unread_of(store, 1))[100] == expected(1, positions[1]) == 1
    assert (await unread_of(store, 2))[100] == expected(2, positions[2])
    sent.append((await send(store, conv, 1, "after reads"), 1))
    assert (await unread_of(store, 1))[100] == expected(1, positions[1])
    assert (await unread_of(store, 2))[100] == expected(2, positions[2])
    await store.read_messages(conv, reader_id=2, staff=False, message_id=sent[-1][0], now=NOW)
    assert (await unread_of(store, 2))[100] == 0


async def test_a_customer_is_refused_as_a_staff_participant_in_the_write(store: Store) -> None:
    conv = await conversation(store, user=1)  # 1 is staff here
    before = await store.list_messages(conv, limit=10)
    with pytest.raises(Forbidden):
        await store.add_message(
            conv,
            sender_id=1,
            staff=False,
            content="as staff",
            content_type=1,
            client_msg_id=None,
            now=NOW,
            guard_staff=True,
        )
    assert await store.list_messages(conv, limit=10) == before
    assert (await unread_of(store, 1))[100] == 0
    ok = await store.add_message(
        conv,
        sender_id=9,
        staff=False,
        content="me",
        content_type=1,
        client_msg_id=None,
        now=NOW,
        guard_staff=True,
    )
    assert ok.created and sorted(ok.participants) == [1, 9]


async def test_participant_ids(store: Store) -> None:
    conv = await conversation(store, user=1)
    other = await conversation(store, app=200, user=9)
    assert await store.participant_ids(conv.id) == [1]
    await store.add_conversation(100, 2, staff=False, now=NOW)
    await send(store, conv, 3, "a sender takes part")
    m = await send(store, other, 4, "elsewhere")
    await store.read_messages(other, reader_id=5, staff=True, message_id=m, now=NOW)
    assert sorted(await store.participant_ids(conv.id)) == [1, 2, 3]
    assert sorted(await store.participant_ids(other.id)) == [4, 5, 9]
    assert await store.participant_ids(other.id + conv.id + 1000) == []


async def test_a_participants_name_is_the_sender_name_of_their_messages(store: Store) -> None:
    conv = await conversation(store, user=1)
    other = await conversation(store, app=200, user=1)
    await send(store, conv, 2, "before any name")
    await store.set_participant_name(conv.id, 2, "Anna")
    await send(store, conv, 1, "from staff, unnamed")
    await store.set_participant_name(conv.id, 7, "not a participant")  # changes nothing

    async def names(c: Conversation) -> list[tuple[int, str | None]]:
        page = await store.list_messages(c, limit=50)
        return [(m.sender_id, m.sender_name) for m in page.messages]

    assert await names(conv) == [(2, "Anna"), (1, None)]
    await store.set_participant_name(conv.id, 2, "Anna K.")  # the latest one is kept
    await store.set_participant_name(conv.id, 2, "Anna K.")  # and again: nothing changes
    assert await names(conv) == [(2, "Anna K."), (1, None)]
    await send(store, other, 2, "elsewhere")  # per conversation: not named there
    assert await names(other) == [(2, None)]
    retry = await store.add_message(
        conv, sender_id=2, staff=False, content="x", content_type=1, client_msg_id="n1", now=NOW
    )
    again = await store.add_message(
        conv, sender_id=2, staff=False, content="y", content_type=1, client_msg_id="n1", now=NOW
    )
    assert not again.created and again.message.id == retry.message.id
    assert again.message.sender_name == "Anna K."  # a retry answers with the stored name


async def test_sends_batched_together_keep_every_rule(store: Store) -> None:
    """Many sends at once (one batch on both engines): ids in the order they were made,
    retries answered with the first, refusals refused alone, newcomers joined, counters
    kept, participants listed."""
    conv = await conversation(store, app=100, user=1)  # 1 is staff
    other = await conversation(store, app=200, user=1)
    earlier = await send(store, conv, 2, "earlier", client_msg_id="e")

    def add(
        c: Conversation, sender: int, text: str, cmid: str | None, guard: bool = False
    ) -> Awaitable[SendOutcome]:
        return sending(store, c, sender, text, cmid, guard=guard)

    calls = []
    for i in range(40):
        calls.append(add(conv if i % 3 else other, 2 + i % 4, f"m{i}", f"k{i}"))
    calls.append(add(conv, 1, "as staff", None, guard=True))  # refused, alone
    calls.append(add(conv, 9, "newcomer", None, guard=True))
    first_batch = await asyncio.gather(*calls, return_exceptions=True)
    # then retries, of a message before and of one in the same batch, among new ones
    retries = [add(conv, 2, "again", "e"), add(conv, 3, "twice", "k1"), add(conv, 3, "last", None)]
    second_batch = await asyncio.gather(*retries, return_exceptions=True)
    results = first_batch[:40] + second_batch[:2] + first_batch[40:]

    made = results[:40]
    assert all(not isinstance(r, BaseException) and r.created for r in made)
    ids = [r.message.id for r in made]  # type: ignore[union-attr]
    assert ids == sorted(ids) and len(set(ids)) == 40 and ids[0] > earlier
    retry, twice, refused, newcomer = results[40:]
    assert not isinstance(retry, BaseException) and not retry.created
    assert retry.message.id == earlier and retry.message.content == "earlier"
    assert not isinstance(twice, BaseException) and not twice.created
    assert twice.message.id == ids[1] and twice.message.content == "m1"
    assert isinstance(refused, Forbidden)
    assert not isinstance(newcomer, BaseException) and newcomer.created
    assert 9 in newcomer.participants and newcomer.message.id > ids[-1]

    page = await store.list_messages(conv, limit=500)
    stored = [m.id for m in page.messages]
    assert stored == sorted(stored) and "as staff" not in [m.content for m in page.messages]
    last = second_batch[2]
    assert not isinstance(last, BaseException) and last.created and last.message.id > ids[-1]
    # earlier, the batch's, the newcomer's, the last
    assert len(stored) == 1 + sum(1 for i in range(40) if i % 3) + 1 + 1
    # the counters say what counting says (nobody has read anything)
    for user in (1, 2, 3, 4, 5, 9):
        expected = {}
        for c, app in ((conv, 100), (other, 200)):
            msgs = (await store.list_messages(c, limit=500)).messages
            if any(m.sender_id == user for m in msgs) or user == 1:
                expected[app] = sum(1 for m in msgs if m.sender_id != user)
        assert await unread_of(store, user) == expected, user


async def test_a_batch_sees_its_own_earlier_messages(store: Store) -> None:
    """Within one batch: a client_msg_id sent twice is stored once (the second is answered
    with the first), and the staff rule sees who an earlier message of the batch made staff.
    Twice: a plain batch, and one where a staff message precedes a guarded one of the same
    sender (PostgreSQL checks that kind message by message)."""
    conv = await conversation(store, app=300, user=1)  # 1 is staff

    def add(
        sender: int, text: str, cmid: str | None, *, staff: bool = False, guard: bool = False
    ) -> Awaitable[SendOutcome]:
        return sending(store, conv, sender, text, cmid, staff=staff, guard=guard)

    plain = await asyncio.gather(
        add(5, "first", "dup"),
        add(5, "second", "dup"),
        add(1, "customer as 1", None, guard=True),
        add(6, "customer 6", "c6", guard=True),
        return_exceptions=True,
    )
    mixed = await asyncio.gather(
        add(7, "staff 7", "s7", staff=True),
        add(7, "customer as 7", None, guard=True),
        add(8, "again", "dup"),
        add(6, "customer 6 again", "c6", guard=True),
        add(8, "customer 8", None, guard=True),
        return_exceptions=True,
    )
    first, second, refused, customer = plain
    assert not isinstance(first, BaseException) and first.created
    assert not isinstance(second, BaseException) and not second.created
    assert second.message.id == first.message.id and second.message.content == "first"
    assert isinstance(refused, Forbidden)
    assert not isinstance(customer, BaseException) and customer.created
    assert customer.message.id > first.message.id
    staff7, refused7, again, retried6, customer8 = mixed
    assert not isinstance(staff7, BaseException) and staff7.created
    assert isinstance(refused7, Forbidden)
    assert not isinstance(again, BaseException) and again.created  # another sender's "dup"
    assert not isinstance(retried6, BaseException) and not retried6.created
    assert retried6.message.id == customer.message.id
    assert not isinstance(customer8, BaseException) and customer8.created
    ids = [staff7.message.id, again.message.id, customer8.message.id]
    assert ids == sorted(ids) and ids[0] > customer.message.id
    stored = (await store.list_messages(conv, limit=50)).messages
    assert [m.content for m in stored] == ["first", "customer 6", "staff 7", "again", "customer 8"]
    assert sorted(await store.participant_ids(conv.id)) == [1, 5, 6, 7, 8]


# --- paged lists by activity (issue 12, item 6) ------------------------------------------


async def paged_conversations(
    store: Store, user: int | None, limit: int, application_id: int | None = None
) -> list[int]:
    """Walk every page; check each page's size and has_more."""
    ids: list[int] = []
    after = None
    while True:
        page = await store.conversation_page(
            user, limit=limit, after=after, application_id=application_id
        )
        assert len(page.conversations) <= limit
        ids += [c.id for c in page.conversations]
        if not page.has_more:
            return ids
        assert len(page.conversations) == limit
        last = page.conversations[-1]
        after = (last.update_at, last.id)


async def test_conversation_pages_walk_every_conversation_once(store: Store) -> None:
    # 23 conversations of user 1; ties of update_at (many created at NOW) broken by id.
    convs = [await conversation(store, app=1000 + i) for i in range(23)]
    await conversation(store, app=2000, user=2)  # not user 1's
    for i, conv in enumerate(convs[::4]):  # some with later activity
        await store.add_message(
            conv,
            sender_id=1,
            staff=True,
            content="x",
            content_type=1,
            client_msg_id=None,
            now=NOW + 100 - i,
        )
    everything = await by_activity(store, convs)
    assert len(everything) == 23
    for limit in (1, 5, 23, 100):
        assert await paged_conversations(store, 1, limit) == everything
    # Every conversation (the staff inbox), in the same order.
    inbox = await by_activity(store, [*convs, await conversation(store, app=2000, user=2)])
    assert len(inbox) == 24
    assert await paged_conversations(store, None, 7) == inbox
    # One application's: a page of one, no more.
    only = await store.conversation_page(1, application_id=1003, limit=5)
    assert [c.application_id for c in only.conversations] == [1003] and not only.has_more
    empty = await store.conversation_page(3, limit=5)
    assert empty.conversations == [] and not empty.has_more


async def test_unread_pages_and_a_total_over_every_conversation(store: Store) -> None:
    convs = [await conversation(store, app=3000 + i, user=1) for i in range(9)]
    for i, conv in enumerate(convs):
        await store.add_conversation(conv.application_id, 2, staff=False, now=NOW)
        for n in range(i % 3):  # 0, 1 or 2 unread for user 1
            await send(store, conv, 2, f"{i}-{n}")
    order = {c: n for n, c in enumerate(await by_activity(store, convs))}
    everything = [
        (c.application_id, i % 3) for i, c in sorted(enumerate(convs), key=lambda x: order[x[1].id])
    ]
    total = sum(n for _, n in everything)
    assert total == 9
    for limit in (1, 4, 9, 50):
        seen: list[tuple[int, int]] = []
        after = None
        while True:
            page = await store.unread_page(1, limit=limit, after=after)
            assert page.total == total  # always the whole sum, not the page's
            assert len(page.counts) <= limit
            seen += [(u.application_id, u.unread) for u in page.counts]
            if not page.has_more:
                break
            assert page.last is not None
            after = page.last
        assert seen == everything
    one = await store.unread_page(1, application_id=3002, limit=5)
    assert [(u.application_id, u.unread) for u in one.counts] == [(3002, 2)]
    assert one.total == 2 and not one.has_more
    none = await store.unread_page(7, limit=5)
    assert none.counts == [] and none.total == 0 and none.last is None


async def test_sqlite_that_cannot_be_opened_fails_fast_instead_of_hanging(tmp_path: Path) -> None:
    """The writer thread's failure to connect reaches open() (it used to wait forever)."""
    from appchat.protocol.errors import Unavailable
    from appchat.store.sqlite import SqliteStore

    store = SqliteStore(str(tmp_path), migrate=False)  # a folder: sqlite cannot open it
    with pytest.raises(Unavailable):
        await asyncio.wait_for(store.open(), 10)


async def test_sqlite_checkpoints_the_wal_outside_the_writers_commits(tmp_path: Path) -> None:
    """The writer checkpoints only past CHECKPOINT_SAFETY pages; below that a thread of
    its own copies the committed pages into the database file a moment after writes:
    the file grows while the writer alone would have left everything in the WAL."""
    from appchat.store.sqlite import CHECKPOINT_SAFETY, SqliteStore

    path = tmp_path / "c.db"
    sqlite_store = SqliteStore(str(path))
    await sqlite_store.open()
    try:
        before = path.stat().st_size
        conv = await sqlite_store.add_conversation(100, 1, staff=True, now=NOW)
        for n in range(300):  # about 2,000 WAL pages: far below CHECKPOINT_SAFETY
            await sqlite_store.add_message(
                conv,
                sender_id=1,
                staff=True,
                content=f"{n} " + "x" * 1000,
                content_type=1,
                client_msg_id=None,
                now=NOW + n,
            )
        with contextlib.closing(sqlite3.connect(path)) as db:
            (wal_pages,) = db.execute("PRAGMA wal_autocheckpoint").fetchone()
        assert wal_pages == 1000  # (another connection's own setting: SQLite's default)
        assert (path.with_name("c.db-wal").stat().st_size // 4096) < CHECKPOINT_SAFETY

        def copied() -> bool:
            return path.stat().st_size > before + 300 * 1000

        await eventually(copied, timeout=10, what="the messages' pages in the database file")
        page = await sqlite_store.list_messages(conv, limit=500)
        assert len(page.messages) == 300
    finally:
        await sqlite_store.close()


# --- the webhook outbox (issue 10) -------------------------------------------------------

HOOKS = ["http://one.example/hooks", "http://two.example/hooks?key=k"]
LATER = NOW + 10**12  # every recorded row is due by then


def record(store: Store, urls: list[str] = HOOKS) -> list[int]:
    """Turn recording on; the list grows by one for every wake-up."""
    wakes: list[int] = []
    store.record_webhooks(urls, lambda: wakes.append(1))
    return wakes


async def claim_all(store: Store, url: str, now: int = LATER) -> list[WebhookEvent]:
    return await store.claim_webhooks(url, now=now, lease_until=now + 1, limit=1000)


async def test_outbox_records_every_event_once_per_url_only_while_configured(
    store: Store,
) -> None:
    before = await conversation(store, app=100)
    await send(store, before, 1, "not recorded")  # webhooks off: nothing is written
    wakes = record(store)
    assert await store.webhook_backlog(HOOKS[0]) == WebhookBacklog(0, 0, None)

    conv = await store.add_conversation(200, 1, staff=True, now=NOW)
    await store.add_conversation(200, 2, staff=False, now=NOW + 1)  # exists: no event
    sent = await store.add_message(
        conv, sender_id=2, staff=False, content="hi", content_type=1, client_msg_id="k", now=NOW
    )
    retry = await store.add_message(
        conv, sender_id=2, staff=False, content="hi", content_type=1, client_msg_id="k", now=NOW
    )
    assert not retry.created  # a retry: no second event
    read = await store.read_messages(
        conv, reader_id=1, staff=True, message_id=sent.message.id, now=NOW + 2
    )
    again = await store.read_messages(
        conv, reader_id=1, staff=True, message_id=sent.message.id, now=NOW + 3
    )
    assert read.moved and not again.moved  # nothing moved: no event
    assert len(wakes) >= 3  # after each commit that wrote rows

    per_url = [await claim_all(store, url) for url in HOOKS]
    for events in per_url:
        assert [e.type for e in events] == [CONVERSATION_CREATED, MESSAGE_CREATED, MESSAGE_READ]
        assert all(e.attempts == 0 for e in events)
    one, two = per_url
    assert [e.event_id for e in one] == [e.event_id for e in two]  # one id, every URL
    assert len({e.event_id for e in one}) == 3
    assert [e.url for e in two] == [HOOKS[1]] * 3
    created, message, moved = (orjson.loads(e.data) for e in one)
    assert Conversation(**created) == conv and one[0].occurred_at == conv.create_at
    assert Message(**message) == sent.message and one[1].occurred_at == sent.message.create_at
    assert moved == {"application_id": 200, "reader_id": 1, "message_id": sent.message.id}
    assert one[2].occurred_at == NOW + 2


async def test_outbox_records_every_message_of_a_batch(store: Store) -> None:
    conv = await conversation(store)
    record(store, HOOKS[:1])
    outcomes = await asyncio.gather(
        *(
            store.add_message(
                conv,
                sender_id=2 + i % 3,
                staff=False,
                content=f"m{i}",
                content_type=1,
                client_msg_id=None,
                now=NOW + i,
            )
            for i in range(30)
        )
    )
    events = await claim_all(store, HOOKS[0])
    assert [Message(**orjson.loads(e.data)) for e in events] == [o.message for o in outcomes]
    assert len({e.event_id for e in events}) == 30


async def test_outbox_rows_commit_with_their_change_or_not_at_all(store: Store) -> None:
    """A change whose outbox row cannot be written is not made, and a change that fails
    leaves no outbox row: both are one transaction."""
    conv = await conversation(store, app=100, user=1)
    await store.add_conversation(100, 77, staff=False, now=NOW)
    record(store, HOOKS[:1])
    await execute(
        store,
        sqlite=[
            "CREATE TRIGGER no_boom BEFORE INSERT ON webhook_outbox "
            "WHEN NEW.data LIKE '%boom%' OR NEW.data LIKE '%\"application_id\":300,%' "
            "OR NEW.data LIKE '%\"reader_id\":77,%' BEGIN SELECT RAISE(ABORT, 'boom'); END",
            "CREATE TRIGGER no_bang BEFORE INSERT ON messages WHEN NEW.content = 'bang' "
            "BEGIN SELECT RAISE(ABORT, 'bang'); END",
        ],
        postgres=[
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'refused'; END $$",
            "CREATE TRIGGER no_boom BEFORE INSERT ON webhook_outbox FOR EACH ROW "
            "WHEN (NEW.data LIKE '%boom%' OR NEW.data LIKE '%\"application_id\":300,%' "
            "OR NEW.data LIKE '%\"reader_id\":77,%') "
            "EXECUTE FUNCTION refuse()",
            "CREATE TRIGGER no_bang BEFORE INSERT ON messages FOR EACH ROW "
            "WHEN (NEW.content = 'bang') EXECUTE FUNCTION refuse()",
        ],
    )
    kept = await send(store, conv, 2, "kept")
    for text in ("boom", "bang"):  # the event fails / the change fails
        with pytest.raises(AppError):
            await send(store, conv, 2, text)
    with pytest.raises(AppError):  # the read's event fails: the position stays
        await store.read_messages(conv, reader_id=77, staff=False, message_id=kept, now=NOW)
    with pytest.raises(AppError):  # the new conversation's event fails
        await store.add_conversation(300, 1, staff=True, now=NOW)

    assert [m.content for m in (await store.list_messages(conv, limit=50)).messages] == ["kept"]
    assert await unread_of(store, 77) == {100: 1}
    assert await unread_of(store, 1) == {100: 1}  # the counters did not count the failed
    assert await store.get_conversation(300) is None
    events = await claim_all(store, HOOKS[0])
    assert [(e.type, orjson.loads(e.data).get("content")) for e in events] == [
        (MESSAGE_CREATED, "kept")
    ]


async def test_claims_lease_rows_and_settle_them(store: Store) -> None:
    url = HOOKS[0]
    record(store, [url])
    conv = await conversation(store)  # an event
    for i in range(3):
        await send(store, conv, 2, f"m{i}")  # three more, due at NOW + 1
    first = await store.claim_webhooks(url, now=NOW + 1, lease_until=NOW + 100, limit=2)
    second = await store.claim_webhooks(url, now=NOW + 1, lease_until=NOW + 101, limit=10)
    assert len(first) == 2 and len(second) == 2
    assert [e.row for e in first + second] == sorted(e.row for e in first + second)  # oldest first
    assert first[0].type == CONVERSATION_CREATED and first[0].lease == NOW + 100
    assert await claim_all(store, url, now=NOW + 99) == []  # every row is held

    await store.settle_webhooks(
        [first[0].row],
        [
            WebhookFailure(first[1].row, first[1].lease, 1, NOW + 50, "HTTP 500"),
            WebhookFailure(second[0].row, NOW + 7, 1, None, "a stale claim"),  # ignored
        ],
    )
    assert await store.webhook_backlog(url) == WebhookBacklog(3, 0, NOW + 50)
    assert await claim_all(store, url, now=NOW + 49) == []
    retried = await claim_all(store, url, now=NOW + 50)
    assert [(e.row, e.attempts, e.event_id) for e in retried] == [
        (first[1].row, 1, first[1].event_id)
    ]
    await store.settle_webhooks(
        [], [WebhookFailure(retried[0].row, retried[0].lease, 2, None, "given up")]
    )
    assert await store.webhook_backlog(url) == WebhookBacklog(2, 1, NOW + 101)
    # the second claim's lease ended without an answer: its rows are due again
    assert [e.row for e in await claim_all(store, url, now=NOW + 101)] == [e.row for e in second]
    assert await store.webhook_backlog(HOOKS[1]) == WebhookBacklog(0, 0, None)


async def test_claims_made_at_once_take_different_rows(store: Store) -> None:
    url = HOOKS[0]
    record(store, [url])
    conv = await conversation(store)
    await asyncio.gather(*(send(store, conv, 2, f"m{i}") for i in range(40)))
    claims = await asyncio.gather(
        *(
            store.claim_webhooks(url, now=LATER, lease_until=LATER + 1000 + k, limit=7)
            for k in range(8)
        )
    )
    rows = [e.row for claim in claims for e in claim]
    assert len(rows) == len(set(rows)) == 41


async def execute(store: Store, *, sqlite: list[str], postgres: list[str]) -> None:
    """Change the schema under an open store, from a connection of the test's own."""
    from appchat.store.postgres import PostgresStore
    from appchat.store.sqlite import SqliteStore

    def run() -> None:
        if isinstance(store, SqliteStore):
            with contextlib.closing(sqlite3.connect(store.path)) as conn:
                for statement in sqlite:
                    conn.execute(statement)
                conn.commit()
        else:
            assert isinstance(store, PostgresStore)
            with psycopg.connect(store.dsn, autocommit=True) as conn:
                for statement in postgres:
                    conn.execute(statement.encode())

    await asyncio.to_thread(run)


def test_sqlite_search_indexing_that_fails_waits_before_it_tries_again() -> None:
    """A failing index run (here: no tables at all) must not become a busy loop of the
    writer: it is tried again only after INDEX_LAG, on the idle path and after batches."""
    from appchat.store.sqlite import INDEX_LAG, _SearchIndex

    index = _SearchIndex()
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        assert index.wait() == 0.0  # unknown at start: look at once
        index.catch_up(conn, idle=True)  # fails (no search_progress), logged
    wait = index.wait()
    assert wait is not None and INDEX_LAG / 2 < wait <= INDEX_LAG
    assert not index.due()


async def test_sqlite_close_returns_when_the_writer_already_ended(tmp_path: Path) -> None:
    """close() asks the writer to index what waits; a writer that has ended (here: told
    to stop) would never answer, so close() must not wait for it."""
    from appchat.store.sqlite import SqliteStore

    sqlite_store = SqliteStore(str(tmp_path / "w.db"))
    await sqlite_store.open()
    sqlite_store._jobs.put(None)  # the writer stops, as it does when it fails for good
    assert sqlite_store._writer is not None
    await asyncio.to_thread(sqlite_store._writer.join, 10)
    await asyncio.wait_for(sqlite_store.close(), 10)


async def test_changes_since_every_revision_are_what_changed_after_it(store: Store) -> None:
    """``changed_messages`` against counting, for every revision of a history that mixes
    sends (alone and several in one batch), edits, deletions, private notes and status
    changes over two conversations: every message whose rev is above ``since``, by rev,
    page by page, private notes left out for a customer."""
    rng = random.Random(22)
    convs = []
    for app in (700, 701):
        await store.add_conversation(app, 1, staff=False, now=NOW)
        convs.append(await store.add_conversation(app, 9, staff=True, now=NOW))
    ids: dict[int, list[int]] = {c.id: [] for c in convs}
    deleted: set[int] = set()
    status = "open"
    for step in range(90):
        conv = rng.choice(convs)
        kind = rng.random()
        editable = [i for i in ids[conv.id] if i not in deleted]
        if kind < 0.5 or len(editable) < 3:
            staff = [rng.random() < 0.5 for _ in range(rng.randint(1, 4))]
            outcomes = await asyncio.gather(
                *(
                    store.add_message(
                        conv,
                        sender_id=9 if s else 1,
                        staff=s,
                        content=f"m{step}.{k}",
                        content_type=1,
                        client_msg_id=None,
                        now=NOW + step,
                        private=s and rng.random() < 0.3,
                    )
                    for k, s in enumerate(staff)
                )
            )
            ids[conv.id] += [o.message.id for o in outcomes]
        elif kind < 0.7:
            await store.edit_message(conv, rng.choice(editable), f"e{step}", now=NOW + step)
        elif kind < 0.85:
            victim = rng.choice(ids[conv.id])  # (a stub deleted again changes nothing)
            deleted.add(victim)
            await store.delete_message(conv, victim, now=NOW + step)
        else:
            status = "resolved" if status == "open" else "open"
            await store.set_status(conv, status, None, now=NOW + step)
    for conv in convs:
        current = await store.get_conversation(conv.application_id)
        assert current is not None
        for public in (False, True):
            every = (await store.list_messages(conv, limit=1000, public=public)).messages
            assert len(every) == len(ids[conv.id]) or public
            for since in range(current.rev + 2):
                expected = sorted((m for m in every if m.rev > since), key=lambda m: m.rev)
                for limit in (2, 1000):
                    page = await store.changed_messages(
                        conv, since=since, limit=limit, public=public
                    )
                    assert page.messages == expected[:limit], (since, limit, public)
                    assert page.has_more == (len(expected) > limit)


async def test_sqlite_a_snapshot_read_sees_one_state_of_the_database(tmp_path: Path) -> None:
    """The statements of a snapshot read see one state of the database: a write committed
    between two of them is not seen by the second (``changed_since`` reads the changes
    in two)."""
    from appchat.store.plan import Plan, Step
    from appchat.store.sqlite import SqliteStore

    path = tmp_path / "snapshot.db"
    store = SqliteStore(str(path))
    await store.open()
    try:
        await conversation(store, app=100)

        def read_twice() -> Plan[tuple[int, int]]:
            first = yield Step("value", "SELECT update_at FROM conversations", ())
            with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
                other.execute("UPDATE conversations SET update_at = update_at + 1")
            second = yield Step("value", "SELECT update_at FROM conversations", ())
            return first, second

        first, second = await store._read_snapshot(read_twice)
        assert first == second == NOW
        first, second = await store._read_snapshot(read_twice)  # the next one sees it
        assert first == second == NOW + 1
        # (a plain read plan runs each statement on its own: it sees the write between)
        first, second = await store._read_plan(read_twice)
        assert second == first + 1 == NOW + 3
    finally:
        await store.close()


def test_sqlite_reads_changes_through_the_index_of_changed_messages(tmp_path: Path) -> None:
    """The query for changed messages matches messages_changed's WHERE (SQLite uses a
    partial index only then; otherwise it would read the whole conversation and sort)."""
    from appchat.store.migrate import apply_sqlite_migrations
    from appchat.store.sqlstore import (
        CHANGED_AFTER,
        FIRST_UNCHANGED_BETWEEN,
        NEWEST_UNCHANGED,
        UNCHANGED_AFTER,
    )

    path = tmp_path / "plan.db"
    apply_sqlite_migrations(str(path))
    with contextlib.closing(sqlite3.connect(path)) as db:

        def plan(sql: str) -> str:
            rows = db.execute("EXPLAIN QUERY PLAN " + sql, (1,) * sql.count("?"))
            return " / ".join(r[3] for r in rows)

        for public in (False, True):
            assert "USING INDEX messages_changed (conversation_id=? AND rev>?)" in plan(
                CHANGED_AFTER[public]
            )
            assert "messages_conversation (conversation_id=? AND id>?)" in plan(
                UNCHANGED_AFTER[public]
            )
        assert "messages_conversation (conversation_id=? AND id>? AND id<?)" in plan(
            FIRST_UNCHANGED_BETWEEN
        )
        assert "messages_conversation (conversation_id=?)" in plan(NEWEST_UNCHANGED)
