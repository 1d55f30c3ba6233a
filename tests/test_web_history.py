"""The web client's history, in headless Chromium against real servers: one's own messages
edited inline and deleted (staff: any), shown live on the other party's page as "edited"
and "Message deleted"; private notes, written in the composer's "Note" mode, on staff
pages only; a page that was away learns of the edits and deletions made meanwhile when it
reconnects (GetMessageList changed_since), and still catches up from a server that refuses
changed_since; the search box opens a result's conversation at the message.

Screenshots of the thread (an edited message, a stub, a note, the editor, the search
results) go into the test's tmp dir; with ``APPCHAT_UPDATE_SCREENSHOTS=1`` also into
docs/img/.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from .support import InProcessServer, client, customer, eventually, staff, token
from .test_web import bubble, join_as_customer, join_as_staff, open_page, screenshot, send
from .test_web_client import sent_frames

LIVE_MS = 2_000  # a change reaches the other pages within this
FILLERS = 35  # more than the page size of the web client's thread (30)


def message(page: Any, message_id: int) -> Any:
    return page.locator(f"#message-list li.msg[data-id='{message_id}']")


async def id_of(page: Any, text: str) -> int:
    """The id of the (stored) message showing ``text``."""
    from playwright.async_api import expect

    node = bubble(page, text)
    await expect(node).to_have_attribute("data-id", re.compile(r"^\d+$"))
    return int(await node.get_attribute("data-id") or 0)


async def edit(page: Any, text: str, new_text: str) -> None:
    """Edit one's own message through its Edit button: the editor opens focused, Enter saves."""
    from playwright.async_api import expect

    node = bubble(page, text)
    await node.hover()
    await node.get_by_role("button", name="Edit message").click()
    editor = page.locator("#message-list .edit-input")
    await expect(editor).to_be_focused()
    await expect(editor).to_have_value(text)
    await editor.fill(new_text)
    await editor.press("Enter")
    await expect(editor).to_have_count(0)


async def delete(page: Any, node: Any) -> None:
    """Delete a message through its Delete button and the confirmation."""
    from playwright.async_api import expect

    await node.hover()
    await node.get_by_role("button", name="Delete message").click()
    confirm = node.locator(".confirm-delete")
    await expect(confirm).to_contain_text("Delete this message for everyone?")
    await expect(confirm.get_by_role("button", name="Delete")).to_be_focused()
    await confirm.get_by_role("button", name="Delete").click()


async def open_request(page: Any, channel: int) -> None:
    await page.locator(f"#conversations li[data-channel='{channel}']").click()


async def test_edits_and_deletions_show_live_on_the_other_page(
    browser: Any, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    server = InProcessServer(tmp_path / "edit.db", "--dev", "--rate", "0").start()
    try:
        errors: list[str] = []
        cust = await open_page(browser, server, errors)
        await join_as_customer(cust, 2, 100)
        await expect(cust.locator("#thread-empty")).to_be_visible()
        await send(cust, "My parcel is late")
        await send(cust, "wrong window, sorry")
        agent = await open_page(browser, server, errors)
        await join_as_staff(agent, 1)
        await open_request(agent, 100)
        await expect(bubble(agent, "wrong window")).to_be_visible()
        await send(agent, "Let me check the tracking")
        await expect(bubble(cust, "Let me check the tracking")).to_be_visible()

        # The customer edits a message: Enter saves, both pages say "edited".
        late = await id_of(cust, "My parcel is late")
        await edit(cust, "My parcel is late", "My parcel is three days late")
        for page in (cust, agent):
            node = message(page, late)
            await expect(node.locator(".text")).to_have_text(
                "My parcel is three days late", timeout=LIVE_MS
            )
            await expect(node.locator(".edited")).to_have_text("edited")
        # Esc cancels an edit: nothing changes, the focus goes back to the Edit button.
        node = message(cust, late)
        await node.hover()
        await node.get_by_role("button", name="Edit message").click()
        await cust.locator("#message-list .edit-input").fill("never saved")
        await cust.locator("#message-list .edit-input").press("Escape")
        await expect(node.locator(".text")).to_have_text("My parcel is three days late")
        await expect(node.get_by_role("button", name="Edit message")).to_be_focused()

        # Only one's own messages can be edited; a customer deletes only their own.
        theirs = bubble(cust, "Let me check the tracking")
        await expect(theirs.get_by_role("button", name="Edit message")).to_have_count(0)
        await expect(theirs.get_by_role("button", name="Delete message")).to_have_count(0)

        # The customer deletes a message of theirs: a stub on both pages.
        wrong = await id_of(cust, "wrong window")
        await delete(cust, message(cust, wrong))
        for page in (cust, agent):
            stub = message(page, wrong)
            await expect(stub.locator(".text")).to_have_text("Message deleted", timeout=LIVE_MS)
            await expect(stub).to_have_class(re.compile(r"\bdeleted\b"))
            await expect(stub.get_by_role("button")).to_have_count(0)  # no Edit nor Delete

        # Staff may delete any message: here the customer's edited one, keyboard only.
        await agent.locator("#input").focus()
        await message(agent, late).get_by_role("button", name="Delete message").focus()
        await agent.keyboard.press("Enter")
        await expect(agent.locator(".confirm-delete")).to_contain_text("(as staff)")
        await agent.keyboard.press("Escape")  # not yet
        await expect(agent.locator(".confirm-delete")).to_have_count(0)
        await expect(
            message(agent, late).get_by_role("button", name="Delete message")
        ).to_be_focused()
        await agent.keyboard.press("Enter")
        await agent.keyboard.press("Enter")  # the confirmation's Delete has the focus
        await expect(message(cust, late).locator(".text")).to_have_text(
            "Message deleted", timeout=LIVE_MS
        )
        await expect(message(agent, late).locator(".text")).to_have_text("Message deleted")

        # The agent edits their own reply.
        await edit(agent, "Let me check the tracking", "Let me check the tracking number")
        await expect(
            bubble(cust, "Let me check the tracking number").locator(".edited")
        ).to_be_visible(timeout=LIVE_MS)
        # The conversation's row shows the latest text too.
        await expect(agent.locator("#conversations li[data-channel='100'] .sub")).to_have_text(
            "You: Let me check the tracking number"
        )
        node = bubble(agent, "Let me check the tracking number")
        await node.hover()
        await node.get_by_role("button", name="Edit message").click()
        await screenshot(agent, tmp_path, "web-edit.png")
        await agent.locator("#message-list .edit-input").press("Escape")

        # After a reload, what the server keeps: the same.
        await cust.reload()
        await expect(message(cust, wrong).locator(".text")).to_have_text("Message deleted")
        await expect(message(cust, late).locator(".text")).to_have_text("Message deleted")
        await expect(
            bubble(cust, "Let me check the tracking number").locator(".edited")
        ).to_be_visible()
        assert errors == []
    finally:
        server.stop()


async def test_a_private_note_shows_on_staff_pages_only(browser: Any, tmp_path: Path) -> None:
    from playwright.async_api import expect

    server = InProcessServer(tmp_path / "note.db", "--dev", "--rate", "0").start()
    try:
        errors: list[str] = []
        cust = await open_page(browser, server, errors)
        await join_as_customer(cust, 2, 300)
        await expect(cust.locator("#thread-empty")).to_be_visible()
        # A customer has no Note mode.
        await expect(cust.locator("#note-toggle")).to_be_hidden()
        await send(cust, "Can I get a refund?")
        anna = await open_page(browser, server, errors)
        notes = sent_frames(anna, "Event.SendMessage")
        await join_as_staff(anna, 1)
        await open_request(anna, 300)
        boris = await open_page(browser, server, errors)
        await join_as_staff(boris, 3)
        await open_request(boris, 300)
        await expect(bubble(boris, "Can I get a refund?")).to_be_visible()

        # Anna switches the composer to "Note" and writes one.
        toggle = anna.locator("#note-toggle")
        await expect(toggle).to_have_attribute("aria-pressed", "false")
        await toggle.click()
        await expect(toggle).to_have_attribute("aria-pressed", "true")
        await expect(anna.locator("#input")).to_be_focused()
        await expect(anna.locator("#input")).to_have_attribute(
            "placeholder", "Private note: only staff see it…"
        )
        await expect(anna.locator("#send")).to_have_text("Add note")
        await send(anna, "Refund approved by finance, ticket 4471")
        note = bubble(anna, "Refund approved by finance")
        await expect(note).to_have_class(re.compile(r"\bprivate\b"))
        await expect(note.locator(".note-label")).to_have_text("Private note")
        await expect(note.locator(".ticks")).to_have_text(re.compile("✓"))  # stored
        # Boris, another agent in the conversation, gets it live, styled apart.
        other = bubble(boris, "Refund approved by finance")
        await expect(other).to_have_class(re.compile(r"\bprivate\b"), timeout=LIVE_MS)
        await expect(other.locator(".note-label")).to_have_text("Private note")
        await expect(boris.locator("#conversations li[data-channel='300'] .sub")).to_have_text(
            "Note: Refund approved by finance, ticket 4471"
        )

        # Back to a reply: the customer gets the reply, never the note.
        await toggle.click()
        await expect(toggle).to_have_attribute("aria-pressed", "false")
        await send(anna, "Your refund is on its way")
        await expect(bubble(cust, "Your refund is on its way")).to_be_visible(timeout=LIVE_MS)
        assert [n.get("private") for n in notes] == [True, None]
        await expect(bubble(cust, "Refund approved")).to_have_count(0)
        await expect(cust.locator("#message-list .msg.private")).to_have_count(0)
        await screenshot(anna, tmp_path, "web-note.png")
        # Nor after a reload (the list the server gives a customer has no notes).
        await cust.reload()
        await expect(bubble(cust, "Your refund is on its way")).to_be_visible()
        await expect(cust.locator("#message-list .msg")).to_have_count(2)
        await expect(bubble(cust, "Refund approved")).to_have_count(0)
        # A note cannot be mistaken for a reply: opening another conversation ends Note mode.
        await toggle.click()
        await expect(toggle).to_have_attribute("aria-pressed", "true")
        async with customer(server, 301, 4) as other_customer:
            await other_customer.ok("Event.AddConversation", {"application_id": 301})
            await other_customer.ok(
                "Event.SendMessage", {"session_channel": "301", "content": "Hello?"}
            )
        await open_request(anna, 301)
        await expect(toggle).to_have_attribute("aria-pressed", "false")
        assert errors == []
    finally:
        server.stop()


def gated() -> tuple[list[Any], asyncio.Event, Any]:
    """Route the page's WebSockets through the test: every socket is kept (to close it), and
    a new one reaches the server only while the gate is open; a closed gate holds the
    page's reconnect in its handshake (the page is away: no pushes, no requests)."""
    sockets: list[Any] = []
    gate = asyncio.Event()
    gate.set()

    async def handler(route: Any) -> None:
        sockets.append(route)
        await gate.wait()
        upstream = route.connect_to_server()
        route.on_message(upstream.send)
        upstream.on_message(route.send)

    return sockets, gate, handler


async def test_a_page_that_was_away_shows_the_edits_and_deletions_made_meanwhile(
    browser: Any, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    server = InProcessServer(tmp_path / "resume.db", "--dev", "--rate", "0").start()
    try:
        errors: list[str] = []
        cust = await open_page(browser, server, errors)
        sockets, gate, handler = gated()
        await cust.route_web_socket(re.compile(r"/ws\?"), handler)
        changes = sent_frames(cust, "Event.GetMessageList")
        await join_as_customer(cust, 2, 500)
        await expect(cust.locator("#status")).to_have_attribute("data-state", "online")
        await send(cust, "Hello, is my order shipped?")
        agent = await open_page(browser, server, errors)
        await join_as_staff(agent, 1)
        await open_request(agent, 500)
        for text in ("It shipped on Monday", "Tracking: XY-1", "Ignore this one"):
            await send(agent, text)
            await expect(bubble(cust, text)).to_be_visible(timeout=LIVE_MS)
        await cust.evaluate("() => { window.samePage = true; }")  # gone after a reload
        await screenshot(cust, tmp_path, "web-before-away.png")

        # The customer's page loses its connection and stays away.
        gate.clear()
        await sockets[0].close(code=1011)
        await eventually(lambda: len(sockets) == 2, what="the page trying to reconnect")
        await expect(cust.locator("#status")).not_to_have_attribute("data-state", "online")

        # Meanwhile the agent edits one reply, deletes another, and writes a new one.
        await edit(agent, "It shipped on Monday", "It shipped on Tuesday")
        await delete(agent, bubble(agent, "Ignore this one"))
        await expect(agent.locator("#message-list .deleted-text")).to_have_count(1)
        await send(agent, "Anything else?")
        await expect(bubble(agent, "Anything else?").locator(".ticks")).to_have_text("✓")
        # And the customer's own message is deleted by staff through the API.
        async with staff(server, 3) as other_agent:
            page = await other_agent.ok("Event.GetMessageList", {"session_channel": "500"})
            first = page["Messages"][0]
            assert first["content"] == "Hello, is my order shipped?"
            await other_agent.ok("Event.DeleteMessage", {"id": first["id"]})
            # Then more messages than the newest page the page refetches for its read
            # ticks: only changed_since tells it of the changes above.
            await other_agent.ok("Event.AddConversation", {"application_id": 500})
            for n in range(FILLERS):
                await other_agent.ok(
                    "Event.SendMessage", {"session_channel": "500", "content": f"filler {n}"}
                )
        # Nothing of it reached the page.
        await expect(bubble(cust, "It shipped on Monday")).to_be_visible()
        await expect(bubble(cust, "Ignore this one")).to_be_visible()
        await expect(bubble(cust, "Anything else?")).to_have_count(0)
        assert not any("changed_since" in c for c in changes)

        # Back online: without a reload the page shows the edit, both deletions and the
        # new message.
        gate.set()
        await expect(cust.locator("#status")).to_have_attribute("data-state", "online")
        await expect(bubble(cust, "It shipped on Tuesday").locator(".edited")).to_have_text(
            "edited"
        )
        await expect(bubble(cust, "It shipped on Monday")).to_have_count(0)
        await expect(bubble(cust, "Ignore this one")).to_have_count(0)
        await expect(bubble(cust, "Anything else?")).to_be_visible()
        await expect(bubble(cust, f"filler {FILLERS - 1}")).to_be_visible()
        texts = await cust.locator("#message-list .msg .text").all_text_contents()
        assert texts == [
            "Message deleted",
            "It shipped on Tuesday",
            "Tracking: XY-1",
            "Message deleted",
            "Anything else?",
            *(f"filler {n}" for n in range(FILLERS)),
        ], texts
        assert await cust.evaluate("() => window.samePage") is True
        asked = [c for c in changes if "changed_since" in c]
        assert len(asked) == 1 and asked[0]["session_channel"] == "500", changes
        await screenshot(cust, tmp_path, "web-resumed.png")
        assert errors == []
    finally:
        server.stop()


async def test_a_server_without_changed_since_still_catches_up(
    browser: Any, tmp_path: Path
) -> None:
    """An older server answers changed_since with bad_request: the page catches up new
    messages as before, says nothing, and does not ask again."""
    from playwright.async_api import expect

    server = InProcessServer(tmp_path / "older.db", "--dev", "--rate", "0").start()
    try:
        errors: list[str] = []
        page = await open_page(browser, server, errors)
        sockets: list[Any] = []
        refused: list[dict[str, Any]] = []
        # Per socket, the refetches of the newest page: the web client's, once a catch-up
        # has ended (after changed_since's answer was taken in).
        refetches: list[int] = []

        def handler(route: Any) -> None:
            sockets.append(route)
            index = len(sockets) - 1
            upstream = route.connect_to_server()

            def to_server(data: str | bytes) -> None:
                frame = json.loads(data)
                args = json.loads(frame.get("args") or "{}")
                cursors = {"after_id", "before_id", "changed_since"}
                if frame.get("name") == "Event.GetMessageList" and not cursors & set(args):
                    refetches.append(index)
                if frame.get("name") == "Event.GetMessageList" and "changed_since" in args:
                    refused.append(args)
                    error = {"code": "bad_request", "message": "unknown argument changed_since"}
                    route.send(
                        json.dumps(
                            {"name": frame["name"], "ok": False, "error": error, "id": frame["id"]}
                        )
                    )
                    return
                upstream.send(data)

            route.on_message(to_server)
            upstream.on_message(route.send)

        await page.route_web_socket(re.compile(r"/ws\?"), handler)
        await join_as_customer(page, 2, 700)
        await send(page, "first")
        await expect(bubble(page, "first").locator(".ticks")).to_have_text("✓")
        for n in (1, 2):
            await sockets[-1].close(code=1011)

            def reconnected(n: int = n) -> bool:
                return len(sockets) == n + 1

            await eventually(reconnected, what="the page reconnecting")

            def caught_up(n: int = n) -> bool:
                return n in refetches

            # Its catch-up ends before the connection is taken away again.
            await eventually(caught_up, what="the page's catch-up")
            async with staff(server, 1) as agent:
                await agent.ok("Event.AddConversation", {"application_id": 700})
                await agent.ok(
                    "Event.SendMessage", {"session_channel": "700", "content": f"reply {n}"}
                )
            await expect(bubble(page, f"reply {n}")).to_be_visible()
        await expect(page.locator("#status")).to_have_attribute("data-state", "online")
        await expect(page.locator("#banner")).to_be_hidden()
        assert len(refused) == 1, refused  # asked once, then never again
        texts = await page.locator("#message-list .msg .text").all_text_contents()
        assert texts == ["first", "reply 1", "reply 2"], texts
        assert errors == []
    finally:
        server.stop()


async def test_search_opens_the_conversation_at_the_message(browser: Any, tmp_path: Path) -> None:
    from playwright.async_api import expect

    server = InProcessServer(tmp_path / "search.db", "--dev", "--rate", "0").start()
    try:
        # A long conversation: the word is far up, before the first page the thread loads.
        async with customer(server, 900, 2) as cust:
            await cust.ok("Event.AddConversation", {"application_id": 900})
            for n in range(70):
                text = "Where is my umbrella?" if n == 3 else f"filler message {n}"
                await cust.ok("Event.SendMessage", {"session_channel": "900", "content": text})
        async with customer(server, 901, 5) as other:
            await other.ok("Event.AddConversation", {"application_id": 901})
            await other.ok(
                "Event.SendMessage",
                {"session_channel": "901", "content": "My umbrella broke on day one"},
            )
        async with client(server, 1, token(admin_id=1)) as agent:
            probe = await agent.call("Event.SearchMessages", {"query": "umbrella"})
            if not probe.get("ok") and probe.get("error", {}).get("code") == "unknown_event":
                pytest.skip("this server has no Event.SearchMessages yet")
            await agent.ok("Event.AddConversation", {"application_id": 900})
            await agent.ok(
                "Event.SendMessage",
                {"session_channel": "900", "content": "Umbrella note for staff", "private": True},
            )

        errors: list[str] = []
        page = await open_page(browser, server, errors)
        await join_as_staff(page, 1)
        await expect(page.locator("#conversations li")).to_have_count(2)
        box = page.get_by_role("searchbox", name="Search messages")
        await box.fill("umbrella")
        await box.press("Enter")
        results = page.locator("#search-list .result")
        # Staff search every conversation, their notes included, newest first.
        await expect(results).to_have_count(3)
        await expect(page.locator("#search-summary")).to_contain_text("“umbrella”")
        await expect(results.nth(0)).to_contain_text("Umbrella note for staff")
        await expect(results.nth(0)).to_contain_text("Private note")
        await expect(results.locator("mark").first).to_have_text(re.compile("umbrella", re.I))
        await screenshot(page, tmp_path, "web-search.png")
        target = results.filter(has_text="Where is my umbrella?")
        await expect(target).to_have_attribute("data-channel", "900")
        await target.click()
        found = bubble(page, "Where is my umbrella?")
        await expect(found).to_be_in_viewport()
        await expect(found).to_have_class(re.compile(r"\bhighlight\b"))
        await expect(found).to_be_focused()
        await expect(page.locator("#thread-title")).to_have_text("Request #900")
        # Esc in the box closes the results: the inbox is back.
        await box.focus()
        await box.press("Escape")
        await expect(page.locator("#search-results")).to_be_hidden()
        await expect(page.locator("#conversations li")).to_have_count(2)

        # A customer searches their own conversation only, without staff notes.
        cust_page = await open_page(browser, server, errors)
        await join_as_customer(cust_page, 2, 900)
        await expect(cust_page.locator("#status")).to_have_attribute("data-state", "online")
        cbox = cust_page.get_by_role("searchbox", name="Search messages")
        await cbox.fill("umbrella")
        await cbox.press("Enter")
        cresults = cust_page.locator("#search-list .result")
        try:
            await expect(cresults).to_have_count(1)
        except AssertionError as exc:  # (seen once in a full run, not since): say what showed
            pane = await cust_page.locator("#search-results").inner_text()
            raise AssertionError(f"{exc}\nthe customer's search pane: {pane!r}") from exc
        await expect(cresults).to_contain_text("Where is my umbrella?")
        await cresults.click()
        await expect(bubble(cust_page, "Where is my umbrella?")).to_be_in_viewport()
        assert errors == []
    finally:
        server.stop()
