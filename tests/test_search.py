# ruff: noqa: RUF001  (Cyrillic words are the point)
"""Event.SearchMessages (SPEC, third round): full-text search through ChatService.handle
with a real store, on SQLite and PostgreSQL: who finds what, edits and deletions, Russian
and English words, paging, and queries that try to be query syntax."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appchat.protocol import events as ev
from appchat.store import Store
from appchat.store.sqlite import SqliteStore

from .support import eventually
from .test_service import Chat, Session, chat, store  # noqa: F401

SEARCH = "Event.SearchMessages"


async def found(chat: Chat, s: Session, query: str, **extra: Any) -> list[str]:  # noqa: F811
    """The contents found, newest first (one page)."""
    result = await chat.ok(s, SEARCH, {"query": query, **extra})
    return [r["message"]["content"] for r in result["results"]]


async def test_a_customer_finds_only_their_own_applications_messages(chat: Chat) -> None:  # noqa: F811
    staff = chat.staff(1)
    alice, bob = chat.customer(100, 5), chat.customer(200, 6)
    await chat.add(alice, 100)
    await chat.add(bob, 200)
    await chat.send(alice, 100, "my invoice is wrong")
    await chat.send(bob, 200, "another invoice question")
    await chat.send(staff, 200, "invoice fixed for bob")
    assert await found(chat, alice, "invoice") == ["my invoice is wrong"]
    assert await found(chat, bob, "invoice") == [
        "invoice fixed for bob",
        "another invoice question",
    ]
    assert await found(chat, staff, "invoice") == [
        "invoice fixed for bob",
        "another invoice question",
        "my invoice is wrong",
    ]
    assert await found(chat, staff, "invoice", session_channel="100") == ["my invoice is wrong"]
    # Naming another application's conversation is refused, as for every event.
    assert await chat.err(alice, SEARCH, {"query": "invoice", "session_channel": "200"}) == (
        "forbidden"
    )
    assert await chat.err(alice, SEARCH, {"query": "invoice", "session_channel": "999"}) == (
        "forbidden"
    )
    assert await chat.err(staff, SEARCH, {"query": "invoice", "session_channel": "999"}) == (
        "not_found"
    )


async def test_a_customer_without_a_conversation_finds_nothing(chat: Chat) -> None:  # noqa: F811
    await chat.add(chat.staff(1), 100)
    await chat.send(chat.staff(1), 100, "hello there")
    assert await found(chat, chat.customer(300, 7), "hello") == []


async def test_private_notes_are_found_by_staff_only(chat: Chat) -> None:  # noqa: F811
    staff, alice = chat.staff(1), chat.customer(100, 5)
    await chat.add(alice, 100)
    await chat.send(alice, 100, "refund please")
    await chat.send(staff, 100, "refund approved internally", private=True)
    assert await found(chat, alice, "refund") == ["refund please"]
    assert await found(chat, alice, "internally") == []
    assert await found(chat, staff, "refund") == ["refund approved internally", "refund please"]
    assert await found(chat, staff, "internally", session_channel="100") == [
        "refund approved internally"
    ]


async def index_now(store: Store) -> None:  # noqa: F811
    """SQLite's index follows the messages a moment behind (searches also read what it does
    not hold yet): bring it up to date. PostgreSQL's always is."""
    if isinstance(store, SqliteStore):
        await store.index_for_search()


async def search_ids(chat: Chat, s: Session, query: str, limit: int) -> list[int]:  # noqa: F811
    """Every match, one page after another, newest first."""
    seen: list[int] = []
    cursor = None
    while True:
        args: dict[str, Any] = {"query": query, "limit": limit}
        if cursor is not None:
            args["cursor"] = cursor
        result = await chat.ok(s, SEARCH, args)
        seen += [r["message"]["id"] for r in result["results"]]
        if not result["has_more"]:
            return seen
        cursor = result["next_cursor"]


async def test_a_search_spans_the_index_and_the_messages_not_in_it_yet(
    chat: Chat,  # noqa: F811
    store: Store,  # noqa: F811
) -> None:
    """On SQLite the newest messages wait a moment for the index: a search reads both
    sides, every match once and in order, whatever the page size, before and after the
    index caught up; an edit or a deletion on either side is followed."""
    staff = chat.staff(1)
    await chat.add(staff, 100)
    await chat.add(staff, 200)
    ids = [(await chat.send(staff, 100 + n % 2 * 100, f"apple {n}"))["id"] for n in range(9)]
    await index_now(store)
    ids += [(await chat.send(staff, 100 + n % 2 * 100, f"apple {n}"))["id"] for n in range(9, 16)]
    await chat.send(staff, 100, "pear")
    newest_first = sorted(ids, reverse=True)
    for limit in (1, 3, 7, 50):
        assert await search_ids(chat, staff, "apple", limit) == newest_first
    indexed, waiting = ids[2], ids[12]  # one on each side of the index's mark
    for message_id in (indexed, waiting):
        await chat.ok(staff, "Event.EditMessage", {"id": message_id, "content": "plum"})
    await chat.ok(staff, "Event.DeleteMessage", {"id": ids[4]})
    await chat.ok(staff, "Event.DeleteMessage", {"id": ids[14]})
    left = [i for i in newest_first if i not in (indexed, waiting, ids[4], ids[14])]
    for _ in range(2):  # then again once everything is indexed
        assert await search_ids(chat, staff, "apple", 4) == left
        assert await search_ids(chat, staff, "plum", 1) == [waiting, indexed]
        assert await found(chat, staff, "apple 14") == []
        other = await store.get_conversation(200)
        assert other is not None
        page = await store.search_messages(["apple"], conversation_id=other.id, limit=100)
        assert [m.id for m in page.messages] == [i for i in left if i in ids[1::2]]
        await index_now(store)
    if isinstance(store, SqliteStore):  # the index holds exactly what the table does
        await store._write(
            lambda conn: conn.execute(
                "INSERT INTO messages_search (messages_search) VALUES ('integrity-check')"
            )
        )


async def test_sqlite_indexes_by_itself_within_about_a_second(tmp_path: Path) -> None:
    """Nobody asks: the writer indexes the waiting messages once it has been idle for
    INDEX_LAG, and moves the mark."""
    sqlite_store = SqliteStore(str(tmp_path / "i.db"))
    await sqlite_store.open()
    try:
        now = 1_700_000_000_000_000
        conversation = await sqlite_store.add_conversation(100, 1, staff=True, now=now)
        for n in range(3):
            await sqlite_store.add_message(
                conversation,
                sender_id=1,
                staff=True,
                content=f"word {n}",
                content_type=1,
                client_msg_id=None,
                now=now + n,
            )

        async def mark() -> int:
            value: int = await sqlite_store._read(
                lambda conn: conn.execute("SELECT indexed_upto FROM search_progress").fetchone()[0]
            )
            return value

        assert await mark() == 0  # nothing indexed yet: a search still finds them
        assert len((await sqlite_store.search_messages(["word"], limit=10)).messages) == 3

        async def indexed() -> bool:
            return await mark() == 3

        await eventually(indexed, timeout=10, what="the mark at the newest message")
        assert len((await sqlite_store.search_messages(["word"], limit=10)).messages) == 3
    finally:
        await sqlite_store.close()


async def test_edits_and_deletions_are_followed_at_once(chat: Chat) -> None:  # noqa: F811
    staff, alice = chat.staff(1), chat.customer(100, 5)
    await chat.add(alice, 100)
    edited = await chat.send(alice, 100, "the parcel is late")
    gone = await chat.send(alice, 100, "secret password hunter2")
    # Acknowledged: found at once, no waiting.
    assert await found(chat, alice, "parcel") == ["the parcel is late"]
    assert await found(chat, staff, "hunter2") == ["secret password hunter2"]
    await chat.ok(alice, "Event.EditMessage", {"id": edited["id"], "content": "the box arrived"})
    assert await found(chat, alice, "parcel") == []
    assert await found(chat, alice, "box") == ["the box arrived"]
    await chat.ok(alice, "Event.DeleteMessage", {"id": gone["id"]})
    assert await found(chat, staff, "hunter2") == []
    assert await found(chat, staff, "password") == []


async def test_russian_and_english_words_case_insensitively(chat: Chat) -> None:  # noqa: F811
    staff, alice = chat.staff(1), chat.customer(100, 5)
    await chat.add(alice, 100)
    await chat.send(alice, 100, "привет, у меня вопрос про ЗАКАЗ")
    await chat.send(staff, 100, "Hello! Your Order shipped")
    await chat.send(staff, 100, "über naïve café")
    assert await found(chat, alice, "Привет") == ["привет, у меня вопрос про ЗАКАЗ"]
    assert await found(chat, alice, "заказ вопрос") == ["привет, у меня вопрос про ЗАКАЗ"]
    assert await found(chat, alice, "ORDER hello") == ["Hello! Your Order shipped"]
    assert await found(chat, alice, "order привет") == []  # every word is required
    assert await found(chat, alice, "Café") == ["über naïve café"]


async def test_an_image_is_not_found_by_its_reference(chat: Chat) -> None:  # noqa: F811
    staff = chat.staff(1)
    await chat.add(staff, 100)
    await chat.send(staff, 100, "https://example.com/cat.png", content_type=2)
    await chat.send(staff, 100, "a cat picture, png attached")
    assert await found(chat, staff, "png") == ["a cat picture, png attached"]


async def test_pages_go_back_with_the_cursor(chat: Chat) -> None:  # noqa: F811
    staff = chat.staff(1)
    await chat.add(staff, 100)
    ids = [(await chat.send(staff, 100, f"ticket number {i}"))["id"] for i in range(7)]
    await chat.send(staff, 100, "unrelated")
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        args: dict[str, Any] = {"query": "ticket", "limit": 3}
        if cursor is not None:
            args["cursor"] = cursor
        result = await chat.ok(staff, SEARCH, args)
        seen += [r["message"]["id"] for r in result["results"]]
        pages += 1
        assert result["has_more"] == (result["next_cursor"] is not None)
        if not result["has_more"]:
            break
        cursor = result["next_cursor"]
    assert pages == 3 and seen == sorted(ids, reverse=True)


@pytest.mark.parametrize(
    "args",
    [
        {},
        {"query": ""},
        {"query": "   "},
        {"query": "?!.,;:-"},
        {"query": '"*"'},
        {"query": 5},
        {"query": "x" * (ev.MAX_QUERY_LEN + 1)},
        {"query": "ok", "limit": 0},
        {"query": "ok", "limit": ev.MAX_SEARCH_PAGE + 1},
        {"query": "ok", "limit": True},
        {"query": "ok", "cursor": "abc"},
        {"query": "ok", "cursor": 5},
        {"query": "ok", "cursor": "0"},
        {"query": "ok", "session_channel": 3.5},
    ],
)
async def test_bad_queries_are_bad_requests(chat: Chat, args: dict[str, Any]) -> None:  # noqa: F811
    await chat.add(chat.staff(1), 100)
    assert await chat.err(chat.staff(1), SEARCH, args) == "bad_request"


@pytest.mark.parametrize(
    "query",
    [
        'say "hello',
        "hel*",
        "hello OR world",
        "hello -world",
        "content: hello",
        "NEAR(hello world)",
        "hello & world",
        "hello | world",
        "!hello",
        "hello' OR 1=1 --",
        "^hello + (world)",
        "hello\\ world <-> x",
        "AND NOT",
        " ".join(f"w{i}" for i in range(60)),  # 60 words in 229 characters
    ],
)
async def test_query_syntax_is_only_words(chat: Chat, query: str) -> None:  # noqa: F811
    staff = chat.staff(1)
    await chat.add(staff, 100)
    await chat.send(staff, 100, "hello world")
    reply = await chat.call(staff, SEARCH, {"query": query})
    assert reply["ok"] or reply["error"]["code"] == "bad_request", reply


async def test_operators_are_searched_as_words(chat: Chat, store: Store) -> None:  # noqa: F811
    staff = chat.staff(1)
    await chat.add(staff, 100)
    await chat.send(staff, 100, "hello world")
    await chat.send(staff, 100, "hello there")
    # FTS5's operators are no syntax: "-world" is the word "world", required.
    assert await found(chat, staff, "hello -world") == ["hello world"]
    assert await found(chat, staff, 'hello "world"') == ["hello world"]
    page = await store.search_messages(["hello"], limit=1)
    assert [m.content for m in page.messages] == ["hello there"] and page.has_more


async def test_erased_and_expired_messages_are_gone_from_the_index(
    chat: Chat,  # noqa: F811
    store: Store,  # noqa: F811
) -> None:
    staff, alice, bob = chat.staff(1), chat.customer(100, 5), chat.customer(200, 6)
    await chat.add(alice, 100)
    await chat.add(bob, 200)
    await chat.send(alice, 100, "pelican one")
    await chat.send(bob, 200, "pelican two")
    await chat.send(staff, 200, "pelican three")
    await store.erase_conversation(100, now=2_000_000_000_000_000)  # rows deleted
    assert await found(chat, staff, "pelican") == ["pelican three", "pelican two"]
    await store.erase_participant(6, now=2_000_000_000_000_000)  # stubs: content ''
    assert await found(chat, staff, "pelican") == ["pelican three"]
    await store.expire(before=2_000_000_000_000_000, limit=10)
    assert await found(chat, staff, "pelican") == []
    await chat.add(staff, 300)
    await chat.send(staff, 300, "pelican four")  # the index goes on after deletions
    assert await found(chat, staff, "pelican") == ["pelican four"]
