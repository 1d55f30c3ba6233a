"""The web client at ``/`` in headless Chromium: a customer and a staff member, each in a
browser context of their own, chat through it; the server restarts in the middle.

Screenshots of both views are saved into the test's tmp dir; with
``APPCHAT_UPDATE_SCREENSHOTS=1`` also into docs/img/ (the README shows one).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from .backends import free_port
from .support import Clock, InProcessServer, Server, client, token

DOCS_IMG = Path(__file__).parent.parent / "docs" / "img"
TIMEOUT = 15_000  # ms: the longest any page condition may take (reconnect backoff included)


async def open_page(browser: Any, server: Server, errors: list[str], *, clock: bool = False) -> Any:
    """A page of its own browser context; ``clock``: with Playwright's clock installed (time
    flows as usual until the test moves it on: ``page.clock.fast_forward``)."""
    context = await browser.new_context(viewport={"width": 1180, "height": 720})
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT)
    if clock:
        await page.clock.install()
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(server.http("/"))
    return page


async def join_as_customer(page: Any, user: int, application: int) -> None:
    form = page.locator("#join-customer")
    await form.locator("input[name=user]").fill(str(user))
    await form.locator("input[name=application]").fill(str(application))
    await form.get_by_role("button", name="Join as customer").click()


async def join_as_staff(page: Any, user: int) -> None:
    form = page.locator("#join-staff")
    await form.locator("input[name=user]").fill(str(user))
    await form.get_by_role("button", name="Join as staff").click()


async def send(page: Any, text: str) -> None:
    await page.locator("#input").fill(text)
    await page.locator("#input").press("Enter")


def bubble(page: Any, text: str) -> Any:
    return page.locator("#message-list .msg", has=page.locator(".text", has_text=text))


async def screenshot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    await page.screenshot(path=str(path))
    if os.environ.get("APPCHAT_UPDATE_SCREENSHOTS"):
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_IMG / name)


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    db = tmp_path_factory.mktemp("web") / "appchat.db"
    proc = InProcessServer(db, "--dev", "--rate", "0").start()
    yield proc
    proc.stop()


async def test_customer_and_staff_chat_through_the_web_client(
    dev_server: Server, browser: Any, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    server = dev_server
    # Another request is waiting in the inbox already.
    async with client(server, 3, token(request_id=101, sid=3)) as other:
        await other.ok("Event.AddConversation", {"application_id": 101})
        await other.ok("Event.SendMessage", {"session_channel": "101", "content": "Invoice?"})

    errors: list[str] = []
    customer = await open_page(browser, server, errors, clock=True)
    await join_as_customer(customer, 2, 100)
    await expect(customer.locator("#status")).to_have_attribute("data-state", "online")
    await expect(customer.locator("#thread-empty")).to_be_visible()
    await send(customer, "Hello, my parcel has not arrived")
    await expect(bubble(customer, "my parcel").locator(".ticks")).to_have_text("✓")

    staff = await open_page(browser, server, errors, clock=True)
    await join_as_staff(staff, 1)
    await expect(staff.locator("#status")).to_have_attribute("data-state", "online")
    inbox = staff.locator("#conversations li")
    await expect(inbox).to_have_count(2)
    await inbox.and_(staff.locator("[data-channel='100']")).click()
    await expect(bubble(staff, "my parcel")).to_have_class("msg theirs")
    # Staff opened and read it: the customer's message gets its read ticks.
    await expect(bubble(customer, "my parcel").locator(".ticks")).to_have_text("✓✓")

    # Typing shows on the other side and clears when the message arrives.
    await staff.locator("#input").fill("Let me check")
    await expect(customer.locator("#typing")).to_have_text("Support #1 is typing…")
    await staff.locator("#input").press("Enter")
    await expect(bubble(customer, "Let me check")).to_have_class("msg theirs")
    await expect(customer.locator("#typing")).to_have_text("")
    await expect(bubble(staff, "Let me check").locator(".ticks")).to_have_text("✓✓")

    # Staff looks at another request: a new message makes a badge, opening it clears it.
    await inbox.and_(staff.locator("[data-channel='101']")).click()
    await expect(bubble(staff, "Invoice?")).to_be_visible()
    await send(customer, "It was due on Monday")
    badge = staff.locator("#conversations li[data-channel='100'] .badge")
    await expect(badge).to_have_text("1")
    await expect(bubble(customer, "due on Monday").locator(".ticks")).to_have_text("✓")
    await inbox.and_(staff.locator("[data-channel='100']")).click()
    await expect(badge).to_have_count(0)
    await expect(bubble(customer, "due on Monday").locator(".ticks")).to_have_text("✓✓")

    # Typing without sending: shown, then gone after a few seconds.
    await customer.locator("#input").fill("One more thing")
    await expect(staff.locator("#typing")).to_have_text("Customer is typing…")
    await expect(staff.locator("#conversations li[data-channel='100'] .sub")).to_have_text(
        "typing…"
    )
    # The page stops telling 3 s after the last keystroke and the other hides the notice
    # 5 s after the last news (app.js TYPING_IDLE_MS, TYPING_SHOWN_MS): their clocks move on
    # instead of the test waiting (a notice still under way shows again, for 5 s at most).
    await customer.clock.fast_forward(3_000)
    await staff.clock.fast_forward(5_000)
    await expect(staff.locator("#typing")).to_have_text("", timeout=12_000)
    await customer.locator("#input").fill("")

    await send(staff, "Found it: it arrives tomorrow. Sorry for the wait!")
    await expect(bubble(customer, "arrives tomorrow")).to_be_visible()
    for page in (customer, staff):
        for text in ("my parcel", "Let me check", "due on Monday", "arrives tomorrow"):
            await expect(bubble(page, text)).to_have_count(1)
    await screenshot(customer, tmp_path, "web-client-customer.png")
    await screenshot(staff, tmp_path, "web-client-staff.png")
    assert (tmp_path / "web-client-staff.png").stat().st_size > 10_000
    assert errors == []


async def test_history_pages_in_on_scroll(dev_server: Server, browser: Any, tmp_path: Path) -> None:
    from playwright.async_api import expect

    async with client(dev_server, 1, token(admin_id=1)) as s:
        await s.ok("Event.AddConversation", {"application_id": 300})
        for i in range(1, 76):
            await s.ok("Event.SendMessage", {"session_channel": "300", "content": f"note {i}"})
    errors: list[str] = []
    page = await open_page(browser, dev_server, errors)
    await join_as_customer(page, 4, 300)
    await expect(bubble(page, "note 75")).to_be_visible()
    messages = page.locator("#message-list .msg")
    await expect(messages).to_have_count(30)
    await expect(page.locator("#history-status")).to_have_text("Scroll up for earlier messages")
    for count in (60, 75):
        await page.locator("#messages").evaluate("(box) => { box.scrollTop = 0; }")
        await expect(messages).to_have_count(count)
    await expect(page.locator("#history-status")).to_have_text("Beginning of the conversation")
    texts = await page.locator("#message-list .msg .text").all_text_contents()
    assert texts == [f"note {i}" for i in range(1, 76)]
    assert errors == []


async def test_bad_tokens_are_explained_on_the_sign_in_page(
    dev_server: Server, browser: Any
) -> None:
    from playwright.async_api import expect

    errors: list[str] = []
    page = await open_page(browser, dev_server, errors)
    form = page.locator("#token-form")
    await form.locator("textarea").fill("not a token")
    await form.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#signin-error")).to_contain_text("does not look like")
    await form.locator("textarea").fill(token(admin_id=5, ttl=-10))
    await form.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#signin-error")).to_contain_text("expired")
    # A pasted staff token signs in as its admin id.
    await form.locator("textarea").fill(token(admin_id=5))
    await form.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#status")).to_have_attribute("data-state", "online")
    await expect(page.locator("#who")).to_have_text("Staff member #5")
    assert errors == []


async def test_an_expired_session_says_so(browser: Any, tmp_path: Path) -> None:
    from playwright.async_api import expect

    clock = Clock(time.time)  # the server's: the test moves it past exp
    server = InProcessServer(tmp_path / "expiry.db", "--dev", "--rate", "0", clock=clock).start()
    try:
        errors: list[str] = []
        page = await open_page(browser, server, errors)
        form = page.locator("#token-form")
        await form.locator("textarea").fill(token(request_id=700, sid=9, ttl=4))
        await form.get_by_role("button", name="Sign in").click()
        await expect(page.locator("#who")).to_have_text("Customer #9 · request #700")
        await expect(page.locator("#thread-empty")).to_be_visible()  # joined its conversation
        # The server closes the connection with 4001 at exp; a pasted token cannot be renewed.
        clock.advance(4)
        await expect(page.locator("#status")).to_have_attribute("data-state", "token_expired")
        await expect(page.locator("#banner")).to_contain_text("Your session has expired.")
        await page.locator("#banner").get_by_role("button", name="Sign in again").click()
        await expect(page.locator("#token-form")).to_be_visible()
        assert errors == []
    finally:
        server.stop()


async def test_restart_in_the_middle_loses_and_doubles_nothing(
    browser: Any, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    port = free_port()
    db = tmp_path / "restart.db"
    server = InProcessServer(db, "--dev", "--rate", "0", "--port", str(port)).start()
    try:
        errors: list[str] = []
        customer = await open_page(browser, server, errors, clock=True)
        await join_as_customer(customer, 2, 400)
        await expect(customer.locator("#status")).to_have_attribute("data-state", "online")
        staff = await open_page(browser, server, errors, clock=True)
        await join_as_staff(staff, 1)
        await staff.locator("#conversations li[data-channel='400']").click()
        await expect(staff.locator("#thread-empty")).to_be_visible()
        await send(customer, "before the restart")
        await expect(bubble(staff, "before the restart")).to_be_visible()
        await send(staff, "reply before the restart")
        await expect(bubble(customer, "reply before the restart")).to_be_visible()

        server.stop()
        for page in (customer, staff):
            await expect(page.locator("#status")).to_have_attribute("data-state", "offline")
            await expect(page.locator("#status")).to_contain_text("Offline")
        # Written while offline: waits, then goes out once the connection is back.
        await send(customer, "written while offline")
        await expect(bubble(customer, "written while offline")).to_have_class("msg own pending")

        # While the pages are away, messages arrive through another node on the same data.
        away = InProcessServer(db, "--rate", "0").start()
        try:
            async with client(away, 1, token(admin_id=1)) as s:
                for text in ("sent while away 1", "sent while away 2"):
                    await s.ok("Event.SendMessage", {"session_channel": "400", "content": text})
        finally:
            away.stop()

        server.start()  # the same port again
        # Each page retries on its own backoff, which reaches 15 s at most (appchat.js
        # backoffMax): its clock moves past the retry instead of the test waiting it out.
        for page in (customer, staff):
            await page.clock.fast_forward(15_000)
        for page in (customer, staff):
            await expect(page.locator("#status")).to_have_attribute(
                "data-state", "online", timeout=20_000
            )
        await expect(bubble(customer, "sent while away 2")).to_be_visible()
        await expect(bubble(staff, "sent while away 2")).to_be_visible()
        await expect(bubble(staff, "written while offline")).to_be_visible()
        await expect(bubble(customer, "written while offline").locator(".ticks")).to_have_text("✓✓")
        await send(staff, "after the restart")
        await expect(bubble(customer, "after the restart")).to_be_visible()
        expected = [
            "before the restart",
            "reply before the restart",
            "sent while away 1",
            "sent while away 2",
            "written while offline",
            "after the restart",
        ]
        for page in (customer, staff):
            texts = await page.locator("#message-list .msg .text").all_text_contents()
            assert texts == expected, texts
        assert errors == []
    finally:
        server.stop()


def readme_snippets() -> tuple[str, str]:
    """The README's two browser console snippets: the raw socket, then appchat.js."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = readme.split("```js\n")[1:]
    raw = next(b for b in blocks if "const TOKEN" in b).split("```")[0]
    lib = next(b for b in blocks if 'import("/appchat.js")' in b).split("```")[0]
    return raw, lib


@pytest.mark.parametrize("who", ["staff 1:", "customer 2 of application 100:"])
async def test_the_readme_browser_snippets_work_with_both_printed_tokens(
    dev_server: Server, browser: Any, who: str
) -> None:
    printed = next(line for line in dev_server.lines if line.strip().startswith(who))
    jwt = printed.split()[-1]
    raw, lib = readme_snippets()
    here = f"127.0.0.1:{dev_server.port}"
    raw = raw.replace("<paste a token>", jwt).replace("127.0.0.1:8888", here)
    raw = raw.replace("console.log(JSON.parse(e.data))", "frames.push(JSON.parse(e.data))")
    lib = lib.replace("127.0.0.1:8888", here)
    errors: list[str] = []
    page = await open_page(browser, dev_server, errors)
    # Both snippets in one scope, as typed one after the other into the console.
    result = await page.evaluate(
        "async () => { const frames = [];\n"
        + raw
        + "\nawait new Promise((ok) => { const t = setInterval(() => frames.length >= 2 "
        "&& (clearInterval(t), ok()), 10); });\n"
        + lib
        + "\nconst page = await chat.history('100'); chat.close(); ws.close();\n"
        "return { frames, last: page.messages.at(-1) }; }"
    )
    frames = result["frames"]
    assert [(f["name"], f["ok"]) for f in frames[:2]] == [
        ("Event.AddConversation", True),
        ("Event.GetConversationList", True),
    ], frames
    assert 100 in [c["application_id"] for c in frames[1]["result"]["conversations"]]
    assert result["last"]["content"] == "Hello from appchat.js"
    assert errors == []


async def test_a_row_drawn_anew_while_pressed_still_opens(dev_server: Server, browser: Any) -> None:
    """The list is drawn anew with every piece of news, many times a second on a busy
    desk. A row drawn anew between the press and the release gets no click from the
    browser: the release opens the conversation it was pressed on (the click used to be
    lost, and the agent's conversation did not open)."""
    from playwright.async_api import expect

    server = dev_server
    async with client(server, 5, token(request_id=150, sid=5)) as other:
        await other.ok("Event.AddConversation", {"application_id": 150})
        await other.ok("Event.SendMessage", {"session_channel": "150", "content": "Refund?"})
    errors: list[str] = []
    staff = await open_page(browser, server, errors)
    await join_as_staff(staff, 1)
    row = staff.locator("#conversations li[data-channel='150']")
    await expect(row).to_be_visible()
    # A redraw in the instant of the press, as render.js does it: a new element per row.
    await staff.evaluate(
        """() => document.getElementById("conversations").addEventListener("mousedown",
            (event) => {
                const li = event.target.closest("li[data-channel]");
                li.replaceWith(li.cloneNode(true));
            }, { once: true })"""
    )
    await row.click()
    await expect(bubble(staff, "Refund?")).to_be_visible()
    await expect(row).to_have_attribute("aria-current", "true")
    assert errors == []
