"""Big replies are paged: conversation lists and unread counts by cursor, and message pages
bounded by a connection's send budget, so a huge inbox or a page of big messages neither
loses an item nor lets one reply (or clients that never read theirs) take the server's
memory."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import (
    RawSocket,
    Server,
    ServerProcess,
    client,
    connections,
    metrics_text,
    module_server,
    rss_mb,
    token,
    wait_until,
)

INBOX = 260  # conversations of staff 46 (the had 20,000: the paging is the same)
EMOJI_MESSAGES = 300  # of 4000 emoji each: 16 KB apiece, a 500-page would be ~5 MB
SEND_BUFFER = 256 * 1024

# A process of its own, whose memory the tests read.
paged = module_server(
    "--rate",
    "0",
    "--heartbeat",
    "0",
    "--send-buffer",
    str(SEND_BUFFER),
    "--sqlite-synchronous",
    "NORMAL",
    process=True,
)


@pytest.fixture(scope="module")
def emoji(paged: ServerProcess) -> Iterator[ServerProcess]:
    """The server with conversation 2000 holding EMOJI_MESSAGES big messages."""

    async def seed() -> None:
        async with client(paged, 2000, token(admin_id=2000)) as c:
            await c.ok("Event.AddConversation", {"application_id": 2000})
            for i in range(EMOJI_MESSAGES):
                content = f"{i:04d}" + "\U0001f600" * 3996
                await c.ok("Event.SendMessage", {"session_channel": "2000", "content": content})

    asyncio.run(seed())
    yield paged


# --- conversation lists and unread counts -----------------------------------------------------


async def test_conversation_list_and_unread_info_are_paged(paged: Server) -> None:
    async with (
        client(paged, 46, token(admin_id=46)) as s,
        client(paged, 47, token(admin_id=47)) as other,
    ):
        apps = [460_000 + i for i in range(INBOX)]
        await asyncio.gather(*(s.ok("Event.AddConversation", {"application_id": a}) for a in apps))
        # Another staff member writes in every third: unread for 46, newest activity.
        for a in apps[::3]:
            await other.ok("Event.SendMessage", {"session_channel": str(a), "content": "hi"})
        unread_total = len(apps[::3])

        # The seed's call, no paging args: a small first page that says more exist.
        first = await s.ok("Event.GetConversationList", {})
        assert len(first["conversations"]) == 100
        assert first["has_more"] is True and isinstance(first["next_cursor"], str)
        walked = [c["application_id"] for c in first["conversations"]]
        cursor = first["next_cursor"]
        while cursor is not None:
            page = await s.ok("Event.GetConversationList", {"limit": 70, "cursor": cursor})
            assert len(page["conversations"]) <= 70
            walked += [c["application_id"] for c in page["conversations"]]
            cursor = page["next_cursor"]
            assert (cursor is not None) == page["has_more"]
        assert sorted(walked) == apps and len(set(walked)) == INBOX
        # Newest activity first: the conversations written in come first, newest first.
        assert walked[:unread_total] == list(reversed(apps[::3]))
        whole = await s.ok("Event.GetConversationList", {"limit": 1000})
        assert [c["application_id"] for c in whole["conversations"]] == walked
        assert whole["has_more"] is False and whole["next_cursor"] is None

        info = await s.ok("Event.GetUnreadInfo", {})
        assert len(info["conversations"]) == 100 and info["has_more"] is True
        assert info["total"] == unread_total  # every conversation's, not the page's
        counted = info["conversations"]
        cursor = info["next_cursor"]
        while cursor is not None:
            page = await s.ok("Event.GetUnreadInfo", {"limit": 90, "cursor": cursor})
            assert page["total"] == unread_total
            counted += page["conversations"]
            cursor = page["next_cursor"]
        assert [c["application_id"] for c in counted] == walked
        assert sum(c["unread"] for c in counted) == unread_total

        # The staff inbox ("all") is paged the same way.
        inbox = await s.ok("Event.GetConversationList", {"all": True, "limit": 5})
        assert len(inbox["conversations"]) == 5 and inbox["has_more"] is True

        for bad in (
            {"limit": 0},
            {"limit": 1001},
            {"limit": "5"},
            {"cursor": "x"},
            {"cursor": 5},
            {"cursor": "1_0"},
            {"cursor": "-1_5"},
        ):
            for event in ("Event.GetConversationList", "Event.GetUnreadInfo"):
                assert await s.error(event, bad) == "bad_request", (event, bad)
        await s.ok("Event.GetUnreadInfo", {})  # the connection stays up


# --- one reply cannot blow the per-connection budget ----------------------------------------


def page_bytes(reply: dict[str, object]) -> int:
    return len(json.dumps(reply, ensure_ascii=False).encode())


async def test_a_reading_client_pages_through_every_big_message(emoji: Server) -> None:
    async with client(emoji, 2001, token(admin_id=2001), max_size=None) as c:
        # Back from the newest, 500 at a time asked: each page stays within the bound
        # (the reply bound is the send buffer when that is below 1 MiB).
        back: list[int] = []
        args: dict[str, object] = {"session_channel": "2000", "limit": 500}
        pages = 0
        while True:
            reply = await c.call("Event.GetMessageList", args)
            assert reply["ok"] is True
            assert page_bytes(reply) <= SEND_BUFFER + 4096
            result = reply["result"]
            ids = [m["id"] for m in result["Messages"]]
            assert ids == sorted(ids) and ids
            back = ids + back
            pages += 1
            if not result["has_more"]:
                break
            args = {"session_channel": "2000", "limit": 500, "before_id": ids[0]}
        assert pages >= 15  # ~5 MB of messages in pages of at most 256 KiB
        # Forward from the start, the same messages, none skipped, none twice.
        forward: list[int] = []
        cursor = 0
        while True:
            reply = await c.call(
                "Event.GetMessageList",
                {"session_channel": "2000", "limit": 500, "after_id": cursor},
            )
            assert page_bytes(reply) <= SEND_BUFFER + 4096
            result = reply["result"]
            forward += [m["id"] for m in result["Messages"]]
            if not result["has_more"]:
                break
            cursor = forward[-1]
        assert forward == back and len(forward) == EMOJI_MESSAGES
        assert len(set(forward)) == EMOJI_MESSAGES
        # Small pages are what they were: exactly the limit, has_more from the store.
        small = await c.ok("Event.GetMessageList", {"session_channel": "2000", "limit": 3})
        assert [m["id"] for m in small["Messages"]] == forward[-3:] and small["has_more"]


def served_pages(srv: Server) -> float:
    text = metrics_text(srv)
    for line in text.splitlines():
        if line.startswith('appchat_events_total{event="Event.GetMessageList",outcome="ok"}'):
            return float(line.split()[1])
    return 0.0


def test_never_reading_clients_asking_huge_pages_hold_their_budget_only(
    emoji: ServerProcess,
) -> None:
    attackers_count, asks = 16, 8
    assert emoji.proc is not None
    Path(f"/proc/{emoji.proc.pid}/clear_refs").write_text("5")  # resets the peak RSS
    before = rss_mb(emoji)
    attackers = [
        RawSocket(emoji, 2100 + i, token(admin_id=2100 + i)) for i in range(attackers_count)
    ]
    try:
        ask = attackers[0].request(
            "Event.GetMessageList", {"session_channel": "2000", "limit": 500}, "big"
        )
        for a in attackers:
            assert a.status == 101
            a.sock.sendall(ask * asks)
        # Wait until the server has served all it will: every attacker had a page at
        # least (so every budget is in use), then the count stops moving.
        wait_until(lambda: served_pages(emoji) >= attackers_count, timeout=30)
        last = -1.0
        while (now := served_pages(emoji)) != last:
            last = now
            time.sleep(1.0)
        grown = rss_mb(emoji, "VmHWM") - before
        # Each holds at most its send budget and a reply beyond it (256 KiB each, the
        # one being written twice: as a reply and as a frame) and what serving a page
        # takes: ~1.5 MB each at most, far below one ~5 MB page each (as before).
        assert grown < attackers_count * 2.5, (before, grown, last)
        assert connections(emoji) == attackers_count
    finally:
        for a in attackers:
            a.reset()
    wait_until(lambda: connections(emoji) == 0, timeout=15)
