"""The web client's rough edges, in headless Chromium against real servers: tokens the
server refuses, messages that could not be sent, a resume that times out, who is who,
keyboard and screen readers, a phone-sized screen, a thread holding images."""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image

from .backends import free_port
from .support import Clock, InProcessServer, Server, eventually, staff, token
from .support import customer as customer_client
from .test_uploads import form, upload
from .test_web import bubble, join_as_customer, join_as_staff, open_page, send

OTHER_SECRET = "rotated-secret-" + "fedcba9876543210" * 4


async def sign_in_with(page: Any, jwt: str) -> None:
    form = page.locator("#token-form")
    await form.locator("textarea").fill(jwt)
    await form.get_by_role("button", name="Sign in").click()


async def test_a_token_the_server_refuses_is_explained_at_sign_in(
    browser: Any, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    # The server's clock runs two hours ahead: a token the page thinks valid has expired.
    clock = Clock(time.time)
    clock.advance(7200)
    server = InProcessServer(tmp_path / "refused.db", "--rate", "0", clock=clock).start()
    try:
        errors: list[str] = []
        page = await open_page(browser, server, errors)
        await sign_in_with(page, token(admin_id=1, secret=OTHER_SECRET))
        error = page.locator("#signin-error")
        await expect(error).to_have_text("This token was refused: token signature is invalid.")
        await expect(page.locator("#app")).to_be_hidden()
        await sign_in_with(page, token(request_id=100, sid=2, ttl=3600))
        await expect(error).to_have_text("This token was refused: token has expired.")
        await expect(page.locator("#app")).to_be_hidden()
        assert errors == []
    finally:
        server.stop()


async def test_a_token_refused_on_reconnect_stops_the_retries(browser: Any, tmp_path: Path) -> None:
    from playwright.async_api import expect

    port = free_port()
    db = tmp_path / "rotation.db"
    server = InProcessServer(db, "--rate", "0", "--port", str(port)).start()
    rotated: Server | None = None
    try:
        errors: list[str] = []
        page = await open_page(browser, server, errors, clock=True)
        attempts: list[str] = []
        page.on("websocket", lambda ws: attempts.append(ws.url))
        await sign_in_with(page, token(admin_id=1))
        status = page.locator("#status")
        await expect(status).to_have_attribute("data-state", "online")
        # The server comes back with another key: the page's token is no longer valid.
        server.stop()
        await expect(status).to_have_attribute("data-state", "offline")
        rotated = InProcessServer(
            db, "--rate", "0", "--port", str(port), secret=OTHER_SECRET
        ).start()
        await page.clock.fast_forward(15_000)  # past the reconnect's backoff
        await expect(status).to_have_attribute("data-state", "refused")
        await expect(status).to_have_text("Signed out")
        banner = page.locator("#banner")
        await expect(banner).to_contain_text("This token was refused: token signature is invalid.")
        # No more attempts, however long the page waits.
        tried = len(attempts)
        await page.clock.fast_forward(120_000)
        await expect(status).to_have_attribute("data-state", "refused")
        assert len(attempts) == tried
        await banner.get_by_role("button", name="Sign in again").click()
        await expect(page.locator("#token-form")).to_be_visible()
        assert errors == []
    finally:
        server.stop()
        if rotated is not None:
            rotated.stop()


def sent_frames(page: Any, name: str) -> list[dict[str, Any]]:
    """The args of every ``name`` request the page sends from now on (observed, not
    altered)."""
    seen: list[dict[str, Any]] = []

    def on_frame(payload: str | bytes) -> None:
        frame = json.loads(payload)
        if frame.get("name") == name:
            seen.append(json.loads(frame["args"]))

    page.on("websocket", lambda ws: ws.on("framesent", on_frame))
    return seen


async def test_a_failed_message_can_be_retried_or_dismissed(browser: Any, tmp_path: Path) -> None:
    from playwright.async_api import expect

    server = InProcessServer(tmp_path / "failed.db", "--dev", "--rate", "0", "--max-content", "20")
    server.start()
    try:
        errors: list[str] = []
        page = await open_page(browser, server, errors)
        sends = sent_frames(page, "Event.SendMessage")
        await join_as_customer(page, 2, 100)
        await expect(page.locator("#thread-empty")).to_be_visible()
        too_long = "This one is far too long to be stored"
        await send(page, too_long)
        failed = page.locator("#message-list .msg.failed")
        ticks = failed.locator(".ticks")
        await expect(ticks).to_have_text("Not sent: content is longer than 20 characters")
        # Readable: the check marks' tight spacing is not applied to words.
        spacing = await ticks.evaluate("(e) => getComputedStyle(e).letterSpacing")
        assert spacing == "normal", spacing
        await expect(page.locator("#input")).to_have_value("")

        await failed.get_by_role("button", name="Retry").click()
        await eventually(lambda: len(sends) == 2)
        assert sends[0]["client_msg_id"] == sends[1]["client_msg_id"]
        assert sends[1]["content"] == too_long
        await expect(ticks).to_have_text("Not sent: content is longer than 20 characters")

        await failed.get_by_role("button", name="Dismiss").click()
        await expect(failed).to_have_count(0)
        await expect(page.locator("#input")).to_have_value(too_long)  # nothing typed is lost
        await send(page, "Short enough")
        await expect(bubble(page, "Short enough").locator(".ticks")).to_have_text("✓")
        await expect(page.locator("#message-list .msg")).to_have_count(1)
        assert errors == []
    finally:
        server.stop()


async def test_a_file_that_is_no_image_is_refused_before_upload(
    browser: Any, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    server = InProcessServer(tmp_path / "pdf.db", "--dev", "--rate", "0").start()
    try:
        pdf = tmp_path / "invoice.pdf"
        pdf.write_bytes(b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n")
        errors: list[str] = []
        page = await open_page(browser, server, errors)
        requested: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        await join_as_customer(page, 2, 100)
        await expect(page.locator("#thread-empty")).to_be_visible()
        await page.locator("#attach").set_input_files(str(pdf))
        await expect(page.locator("#composer-error")).to_have_text(
            "invoice.pdf is not an image that can be sent: choose a PNG, JPEG, WebP or GIF file."
        )
        await expect(page.locator("#message-list .msg")).to_have_count(0)
        await expect(page.locator("#thread-empty")).to_be_visible()
        await send(page, "Sending the invoice as text instead")
        await expect(page.locator("#composer-error")).to_be_hidden()
        await expect(page.locator("#message-list img")).to_have_count(0)
        assert not [url for url in requested if "/upload" in url], requested
        assert errors == []
    finally:
        server.stop()


def picture(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (800, 600), color).save(out, "PNG")
    return out.getvalue()


async def send_picture(
    http: aiohttp.ClientSession, server: Server, s: Any, application: int, color: Any
) -> None:
    """Staff 1 uploads a picture and sends its reference."""
    status, doc = await upload(http, server, token(admin_id=1), form(application, picture(color)))
    assert status == 201, doc
    await s.ok(
        "Event.SendMessage",
        {"session_channel": str(application), "content": doc["reference"], "content_type": 2},
    )


async def scrolled_to_the_end(page: Any) -> bool:
    left: float = await page.locator("#messages").evaluate(
        "(box) => box.scrollHeight - box.scrollTop - box.clientHeight"
    )
    return left < 2


async def test_the_newest_message_stays_in_view_as_images_load(
    browser: Any, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    from playwright.async_api import expect

    server = InProcessServer(tmp_path / "scroll.db", "--dev", "--rate", "0").start()
    try:
        async with staff(server) as s:
            await s.ok("Event.AddConversation", {"application_id": 600})
            for i in range(8):
                await s.ok("Event.SendMessage", {"session_channel": "600", "content": f"text {i}"})
            for color in ((200, 40, 40), (40, 200, 40), (40, 40, 200)):
                await send_picture(http, server, s, 600, color)
            await s.ok("Event.SendMessage", {"session_channel": "600", "content": "the newest"})

            errors: list[str] = []
            page = await open_page(browser, server, errors)
            await join_as_customer(page, 2, 600)
            images = page.locator("#message-list img.image")
            await expect(images).to_have_count(3)
            await expect(page.locator("#message-list img.image.loading")).to_have_count(0)
            for i in range(3):
                await expect(images.nth(i)).to_have_js_property("complete", True)
            await expect(bubble(page, "the newest")).to_be_in_viewport()
            assert await scrolled_to_the_end(page)

            # One more arrives while the reader is at the end: still in view once loaded.
            await send_picture(http, server, s, 600, (250, 200, 0))
            await expect(page.locator("#message-list img.image:not(.loading)")).to_have_count(4)
            await expect(images.nth(3)).to_have_js_property("complete", True)
            await expect(images.nth(3)).to_be_in_viewport(ratio=1)
            assert await scrolled_to_the_end(page)
            assert errors == []
    finally:
        server.stop()


class StalledResume:
    """The server's first catch-up read (GetMessageList with ``after_id``) answers only once
    ``release`` is set, as on a machine too loaded to answer in time; the others at once."""

    def __init__(self, server: InProcessServer) -> None:
        assert server.node is not None
        store = server.node.store
        self.entered = threading.Event()
        self.release = threading.Event()
        original = store.list_messages

        async def list_messages(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("after_id") is not None and not self.entered.is_set():
                self.entered.set()
                await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 60)
            return await original(*args, **kwargs)

        store.list_messages = list_messages  # type: ignore[method-assign]


async def test_a_resume_that_times_out_is_tried_again(browser: Any, tmp_path: Path) -> None:
    from playwright.async_api import expect

    port = free_port()
    db = tmp_path / "resume.db"
    server = InProcessServer(db, "--dev", "--rate", "0", "--port", str(port)).start()
    stalled: StalledResume | None = None
    try:
        errors: list[str] = []
        page = await open_page(browser, server, errors, clock=True)
        await join_as_customer(page, 2, 700)
        await expect(page.locator("#thread-empty")).to_be_visible()
        status = page.locator("#status")
        server.stop()
        await expect(status).to_have_attribute("data-state", "offline")
        away = InProcessServer(db, "--rate", "0").start()
        try:
            async with staff(away) as s:
                await s.ok("Event.SendMessage", {"session_channel": "700", "content": "while away"})
        finally:
            away.stop()

        server.start()
        stalled = StalledResume(server)
        await page.clock.fast_forward(15_000)  # past the reconnect's backoff
        await expect(status).to_have_attribute("data-state", "online")
        assert await asyncio.to_thread(stalled.entered.wait, 15)
        await page.clock.fast_forward(10_000)  # appchat.js's request timeout: no reply yet
        await expect(status).to_contain_text("Catching up · retrying in")
        stalled.release.set()  # the late reply to the timed-out request is dropped
        await page.clock.fast_forward(15_000)  # past the retry's backoff
        await expect(bubble(page, "while away")).to_be_visible()
        await expect(status).to_have_text("Online")
        await expect(page.locator("#banner")).to_be_hidden()
        await expect(page.locator("#message-list .msg")).to_have_count(1)
        assert errors == []
    finally:
        if stalled is not None:
            stalled.release.set()
        server.stop()


def sender_of(page: Any, text: str) -> Any:
    return bubble(page, text).locator(".sender")


async def test_staff_and_customers_are_labelled_as_such(browser: Any, tmp_path: Path) -> None:
    from playwright.async_api import expect

    server = InProcessServer(tmp_path / "labels.db", "--dev", "--rate", "0").start()
    try:
        errors: list[str] = []
        customer = await open_page(browser, server, errors)
        await join_as_customer(customer, 2, 800)
        await expect(customer.locator("#thread-empty")).to_be_visible()
        agent = await open_page(browser, server, errors)
        await join_as_staff(agent, 1)
        await agent.locator("#conversations li[data-channel='800']").click()
        await expect(agent.locator("#thread-empty")).to_be_visible()

        await send(customer, "Where is my order?")
        await expect(sender_of(agent, "Where is my order?")).to_have_text("Customer")
        await send(agent, "On its way")
        await expect(sender_of(customer, "On its way")).to_have_text("Support #1")
        await customer.locator("#input").fill("Thanks")
        await expect(agent.locator("#typing")).to_have_text("Customer is typing…")
        await agent.locator("#input").fill("You are welcome")
        await expect(customer.locator("#typing")).to_have_text("Support #1 is typing…")
        assert errors == []
    finally:
        server.stop()


async def relay_names_and_roles(page: Any, names: dict[int, str], staff_ids: set[int]) -> None:
    """Between the page and the server, add what a server with display names and presence
    sends (SPEC: ``sender_name`` on message objects; GetPresence with each participant's
    ``staff``), which this server does not send yet. Everything else passes unchanged."""

    def named(message: dict[str, Any]) -> dict[str, Any]:
        if message.get("sender_id") in names:
            return {**message, "sender_name": names[message["sender_id"]]}
        return message

    def to_page(route: Any, data: str | bytes) -> None:
        frame = json.loads(data)
        result = frame.get("result")
        if isinstance(result, dict):
            if isinstance(result.get("message"), dict):
                result["message"] = named(result["message"])
            if isinstance(result.get("Messages"), list):
                result["Messages"] = [named(m) for m in result["Messages"]]
        route.send(json.dumps(frame))

    def handler(route: Any) -> None:
        server = route.connect_to_server()

        def to_server(data: str | bytes) -> None:
            frame = json.loads(data)
            if frame.get("name") != "Event.GetPresence":
                server.send(data)
                return
            participants = [
                {"user_id": uid, "staff": uid in staff_ids, "availability": "online"}
                for uid in sorted({*names, *staff_ids})
            ]
            reply = {"name": frame["name"], "ok": True, "id": frame["id"]}
            route.send(json.dumps({**reply, "result": {"participants": participants}}))

        route.on_message(to_server)
        server.on_message(lambda data: to_page(route, data))

    await page.route_web_socket(re.compile(r"/ws\?"), handler)


async def test_display_names_and_other_agents(browser: Any, tmp_path: Path) -> None:
    from playwright.async_api import expect

    server = InProcessServer(tmp_path / "names.db", "--dev", "--rate", "0").start()
    try:
        async with staff(server, 3) as other, customer_client(server, 900, 2) as anna:
            await anna.ok("Event.AddConversation", {"application_id": 900})
            await anna.ok("Event.SendMessage", {"session_channel": "900", "content": "Hello?"})
            await other.ok("Event.SendMessage", {"session_channel": "900", "content": "Hi Anna"})
            errors: list[str] = []
            page = await open_page(browser, server, errors)
            await relay_names_and_roles(page, {2: "Anna", 3: "Boris"}, {1, 3})
            await join_as_staff(page, 1)
            await page.locator("#conversations li[data-channel='900']").click()
            await expect(sender_of(page, "Hello?")).to_have_text("Anna")
            await expect(sender_of(page, "Hi Anna")).to_have_text("Boris (support)")
            await other.ok("Event.Typing", {"session_channel": "900"})
            await expect(page.locator("#typing")).to_have_text("Boris (support) is typing…")

            # Without names, the presence list alone still tells an agent from a customer.
            plain = await open_page(browser, server, errors)
            await relay_names_and_roles(plain, {}, {1, 3})
            await join_as_staff(plain, 1)
            await plain.locator("#conversations li[data-channel='900']").click()
            await expect(sender_of(plain, "Hello?")).to_have_text("Customer")
            await expect(sender_of(plain, "Hi Anna")).to_have_text("Support #3")
            assert errors == []
    finally:
        server.stop()


async def test_the_keyboard_reaches_and_opens_conversations(browser: Any, tmp_path: Path) -> None:
    from playwright.async_api import expect

    server = InProcessServer(tmp_path / "keys.db", "--dev", "--rate", "0").start()
    try:
        for application in (1001, 1002):
            async with customer_client(server, application, 2) as c:
                await c.ok("Event.AddConversation", {"application_id": application})
                await c.ok(
                    "Event.SendMessage",
                    {"session_channel": str(application), "content": f"about {application}"},
                )
        errors: list[str] = []
        page = await open_page(browser, server, errors)
        await join_as_staff(page, 1)
        rows = page.get_by_role("button", name=re.compile(r"^Request #100[12]"))
        await expect(rows).to_have_count(2)
        # From the last control of the top bar, Tab walks through the search box, the
        # inbox's tabs (the selected one) and its status filter into the list, newest first.
        await page.get_by_role("button", name="Sign out").focus()
        await page.keyboard.press("Tab")
        await expect(page.get_by_role("searchbox", name="Search messages")).to_be_focused()
        await page.keyboard.press("Tab")
        await expect(page.get_by_role("tab", name=re.compile("^All"))).to_be_focused()
        await page.keyboard.press("Tab")
        await expect(page.get_by_label("Show")).to_be_focused()
        await page.keyboard.press("Tab")
        await expect(page.locator("#conversations li[data-channel='1002']")).to_be_focused()
        await page.keyboard.press("Tab")
        newer_second = page.locator("#conversations li[data-channel='1001']")
        await expect(newer_second).to_be_focused()
        await page.keyboard.press("Enter")
        await expect(page.locator("#thread-title")).to_have_text("Request #1001")
        await expect(newer_second).to_have_attribute("aria-current", "true")
        await expect(bubble(page, "about 1001")).to_be_visible()
        await page.locator("#conversations li[data-channel='1002']").focus()
        await page.keyboard.press(" ")
        await expect(page.locator("#thread-title")).to_have_text("Request #1002")

        # The message list is a live region: a new message is added to it, and the
        # messages already there stay the same nodes (a screen reader reads out only the
        # new one).
        messages = page.locator("#message-list")
        await expect(messages).to_have_attribute("aria-live", "polite")
        first = bubble(page, "about 1002")
        await first.evaluate("(li) => { li.dataset.seen = 'yes'; }")
        async with customer_client(server, 1002, 2) as c:
            await c.ok("Event.SendMessage", {"session_channel": "1002", "content": "and more"})
        await expect(bubble(page, "and more")).to_be_visible()
        await expect(first).to_have_attribute("data-seen", "yes")
        assert errors == []
    finally:
        server.stop()


async def test_a_phone_shows_the_list_or_the_thread(browser: Any, tmp_path: Path) -> None:
    from playwright.async_api import expect

    server = InProcessServer(tmp_path / "phone.db", "--dev", "--rate", "0").start()
    try:
        async with customer_client(server, 1100, 2) as c:
            await c.ok("Event.AddConversation", {"application_id": 1100})
            for i in range(30):
                await c.ok("Event.SendMessage", {"session_channel": "1100", "content": f"line {i}"})
        errors: list[str] = []
        context = await browser.new_context(
            viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
        )
        page = await context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        await page.goto(server.http("/"))
        await join_as_staff(page, 1)
        row = page.locator("#conversations li[data-channel='1100']")
        await expect(row).to_be_visible()
        await expect(page.locator(".thread-pane")).to_be_hidden()
        box = await page.locator(".list-pane").bounding_box()
        assert box is not None and box["height"] > 600, box  # the list has the screen
        await row.tap()
        # The thread has the whole screen: the list is gone, the newest message and the
        # composer are in view, and a button leads back.
        await expect(page.locator(".list-pane")).to_be_hidden()
        await expect(bubble(page, "line 29")).to_be_in_viewport()
        await expect(page.locator("#composer")).to_be_in_viewport()
        box = await page.locator("#messages").bounding_box()
        assert box is not None and box["height"] > 500, box
        await page.get_by_role("button", name="Back to the conversations").tap()
        await expect(row).to_be_visible()
        await expect(page.locator(".thread-pane")).to_be_hidden()
        await row.tap()
        await expect(bubble(page, "line 29")).to_be_in_viewport()
        assert errors == []
    finally:
        server.stop()


async def test_an_image_that_failed_offline_is_sent_on_retry(browser: Any, tmp_path: Path) -> None:
    from playwright.async_api import expect

    port = free_port()
    db = tmp_path / "retry.db"
    server = InProcessServer(db, "--dev", "--rate", "0", "--port", str(port)).start()
    try:
        photo = tmp_path / "photo.png"
        photo.write_bytes(picture((30, 160, 90)))
        errors: list[str] = []
        page = await open_page(browser, server, errors, clock=True)
        sends = sent_frames(page, "Event.SendMessage")
        await join_as_customer(page, 2, 1200)
        await expect(page.locator("#thread-empty")).to_be_visible()
        status = page.locator("#status")
        server.stop()
        await expect(status).to_have_attribute("data-state", "offline")
        await page.locator("#attach").set_input_files(str(photo))
        failed = page.locator("#message-list .msg.failed")
        await expect(failed.locator(".ticks")).to_contain_text(
            "Not sent: the upload did not reach the server"
        )
        client_msg_id = await failed.get_attribute("data-client")

        server.start()
        await page.clock.fast_forward(15_000)  # past the reconnect's backoff
        await expect(status).to_have_attribute("data-state", "online")
        await failed.get_by_role("button", name="Retry").click()
        own = page.locator("#message-list .msg.own")
        await expect(own.locator(".ticks")).to_have_text("✓")
        await expect(own.locator("img.image")).to_have_js_property("complete", True)
        await expect(page.locator("#message-list .msg")).to_have_count(1)
        assert [s["client_msg_id"] for s in sends] == [client_msg_id]
        assert errors == []
    finally:
        server.stop()


async def test_a_late_copy_of_a_message_never_unreads_it(browser: Any, tmp_path: Path) -> None:
    """After a reconnect the page refetches its thread for read ticks that changed while it
    was away. A copy the server wrote before a read, arriving after that read's
    MessageRead push, used to turn ✓✓ back into ✓: status only grows now."""
    from playwright.async_api import expect

    server = InProcessServer(tmp_path / "late.db", "--dev", "--rate", "0").start()
    try:
        errors: list[str] = []
        page = await open_page(browser, server, errors)
        held: list[str] = []  # the refetch's replies, kept back until the read was shown
        refetches: set[object] = set()
        sockets: list[Any] = []

        def handler(route: Any) -> None:
            upstream = route.connect_to_server()
            sockets.append(route)

            def to_server(data: str | bytes) -> None:
                frame = json.loads(data)
                args = json.loads(frame.get("args") or "{}")
                refetch = not {"after_id", "before_id", "changed_since"} & set(args)
                if frame.get("name") == "Event.GetMessageList" and refetch and len(sockets) > 1:
                    refetches.add(frame.get("id"))
                upstream.send(data)

            def to_page(data: str | bytes) -> None:
                if json.loads(data).get("id") in refetches:
                    held.append(data if isinstance(data, str) else data.decode())
                    return
                route.send(data)

            route.on_message(to_server)
            upstream.on_message(to_page)

        await page.route_web_socket(re.compile(r"/ws\?"), handler)
        await join_as_customer(page, 2, 600)
        await send(page, "is anyone there?")
        ticks = bubble(page, "is anyone there?").locator(".ticks")
        await expect(ticks).to_have_text("✓")
        # The socket drops; the page comes back and refetches its thread (held back here).
        await sockets[0].close(code=1011)
        await eventually(lambda: bool(held), timeout=20, what="the page's refetch answered")
        async with staff(server, 1) as s:
            await s.ok("Event.AddConversation", {"application_id": 600})
            thread = await s.ok("Event.GetMessageList", {"session_channel": "600"})
            newest = thread["Messages"][-1]["id"]
            await s.ok("Event.ReadMessage", {"session_channel": "600", "message_id": newest})
        await expect(ticks).to_have_text("✓✓")
        # Now the copy written before the read reaches the page, and then a message: frames
        # are handled in order, so once that message shows, the copy has been taken in.
        for data in held:
            sockets[-1].send(data)
        async with staff(server, 1) as s:
            await s.ok("Event.SendMessage", {"session_channel": "600", "content": "yes, here"})
        await expect(bubble(page, "yes, here")).to_be_visible()
        await expect(ticks).to_have_text("✓✓")
        assert '"status":0' in "".join(held).replace(" ", "")  # it was a stale copy
        assert errors == []
    finally:
        server.stop()
