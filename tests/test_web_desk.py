"""The web client as a support desk, in headless Chromium against real servers: the staff
inbox follows the desk live (Event.SubscribeInbox), with tabs Mine / Unassigned / All;
a conversation is assigned, resolved and reopened by its customer, and a second agent's
page shows each step; the status control; availability and presence; the notification,
title badge and sound of a hidden tab; the inbox after a restart; polling on a server
without the desk.

Screenshots of the staff view (tabs, the assignee picker open) go into the test's tmp
dir; with ``APPCHAT_UPDATE_SCREENSHOTS=1`` also into docs/img/ (the README shows one).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .backends import free_port
from .support import InProcessServer, client, customer, eventually, token
from .test_web import bubble, join_as_customer, open_page, screenshot, send
from .test_web_client import sent_frames, sign_in_with

LIVE_MS = 1_000  # a change reaches every subscribed page within a second


def row(page: Any, channel: int) -> Any:
    return page.locator(f"#conversations li[data-channel='{channel}']")


def tab(page: Any, name: str) -> Any:
    return page.get_by_role("tab", name=re.compile(rf"^{name}\b"))


async def expect_counts(page: Any, mine: int, unassigned: int, every: int) -> None:
    from playwright.async_api import expect

    for name, count in (("mine", mine), ("unassigned", unassigned), ("all", every)):
        await expect(page.locator(f"#inbox-tabs [data-count='{name}']")).to_have_text(str(count))


async def sign_in_agent(page: Any, admin_id: int) -> None:
    """Sign in with a staff token; wait until the inbox is subscribed (the tabs show once
    the server has answered Event.SubscribeInbox)."""
    from playwright.async_api import expect

    await sign_in_with(page, token(admin_id=admin_id))
    await expect(page.locator("#status")).to_have_attribute("data-state", "online")
    await expect(page.locator("#inbox-tools")).to_be_visible()


async def agent_page(
    browser: Any, server: InProcessServer, errors: list[str], admin_id: int
) -> Any:
    page = await open_page(browser, server, errors)
    await sign_in_agent(page, admin_id)
    return page


async def test_the_inbox_follows_assignment_status_and_reopening_live(
    browser: Any, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    server = InProcessServer(tmp_path / "desk.db", "--dev", "--rate", "0").start()
    try:
        errors: list[str] = []
        anna = await open_page(browser, server, errors)
        lists = sent_frames(anna, "Event.GetConversationList")
        await sign_in_agent(anna, 1)
        assert len(lists) == 1  # the first load, once subscribed
        boris = await agent_page(browser, server, errors, 3)
        for page in (anna, boris):
            await expect(page.locator("#list-empty")).to_have_text(
                "No conversations yet. New requests show up here."
            )
            await expect(tab(page, "All")).to_have_attribute("aria-selected", "true")
            await expect_counts(page, 0, 0, 0)

        async with customer(server, 5150, 7) as cust:
            # A customer of an application nobody has seen writes: both inboxes show it
            # within a second, without a reload and without asking for the list again.
            await cust.ok("Event.AddConversation", {"application_id": 5150})
            await cust.ok(
                "Event.SendMessage", {"session_channel": "5150", "content": "My order is lost"}
            )
            for page in (anna, boris):
                await expect(row(page, 5150)).to_be_visible(timeout=LIVE_MS)
                await expect(row(page, 5150).locator(".sub")).to_have_text("My order is lost")
                await expect(row(page, 5150).locator(".status-pill")).to_have_text("Open")
                await expect(row(page, 5150).locator(".assignee")).to_have_text("Unassigned")
                await expect_counts(page, 0, 1, 1)
                # News in a conversation the agent has not joined: the row's badge and
                # the title's count.
                await expect(row(page, 5150).locator(".badge")).to_have_text("1")
                await expect(page).to_have_title("(1) appchat")
            assert len(lists) == 1

            # Anna opens it and takes it.
            await row(anna, 5150).click()
            await expect(bubble(anna, "My order is lost")).to_be_visible()
            await expect(anna).to_have_title("appchat")
            await expect(anna.locator("#conversation-status")).to_have_text("Open")
            await expect(anna.locator("#assignee-name")).to_have_text("Nobody")
            await anna.locator("#assignee-button").click()
            menu = anna.locator("#assignee-menu")
            await expect(menu).to_be_visible()
            await expect(anna.locator("#assignee-button")).to_have_attribute(
                "aria-expanded", "true"
            )
            options = menu.locator(".assignee-option")
            # Me, Boris (another agent the desk knows, online), nobody.
            await expect(options).to_have_count(3)
            await expect(options.nth(0).locator(".name")).to_have_text("Me")
            await expect(options.nth(1)).to_contain_text("Support #3")
            await expect(options.nth(1).locator(".availability")).to_have_text("Online")
            await expect(options.nth(2)).to_have_text("Nobody")
            await expect(options.nth(2)).to_have_attribute("aria-pressed", "true")
            await options.nth(0).click()
            await expect(menu).to_be_hidden()
            await expect(anna.locator("#assignee-name")).to_have_text("You")
            await expect(row(anna, 5150).locator(".assignee")).to_have_text("You")
            await expect_counts(anna, 1, 0, 1)
            await expect(row(boris, 5150).locator(".assignee")).to_have_text(
                "Support #1", timeout=LIVE_MS
            )
            await expect_counts(boris, 0, 0, 1)

            # Anna answers and resolves it: it leaves the open ones on both pages.
            await send(anna, "Found it, it ships today")
            await expect(bubble(anna, "ships today").locator(".ticks")).to_have_text("✓")
            await anna.locator("#desk-controls").get_by_role("button", name="Resolve").click()
            await expect(anna.locator("#conversation-status")).to_have_text("Resolved")
            await expect(
                anna.locator("#desk-controls").get_by_role("button", name="Resolve")
            ).to_be_hidden()
            await expect(row(anna, 5150)).to_have_count(0)
            await expect_counts(anna, 0, 0, 0)
            await expect(row(boris, 5150)).to_have_count(0, timeout=LIVE_MS)
            await expect_counts(boris, 0, 0, 0)
            await boris.get_by_label("Show").select_option("resolved")
            await expect(row(boris, 5150).locator(".status-pill")).to_have_text("Resolved")
            await expect(row(boris, 5150).locator(".sub")).to_have_text("Found it, it ships today")

            # The customer writes again: the conversation is open again, everywhere.
            await cust.ok(
                "Event.SendMessage", {"session_channel": "5150", "content": "It did not ship"}
            )
            await expect(anna.locator("#conversation-status")).to_have_text("Open", timeout=LIVE_MS)
            await expect(bubble(anna, "It did not ship")).to_be_visible()
            await expect(row(anna, 5150).locator(".status-pill")).to_have_text("Open")
            await expect(row(anna, 5150).locator(".assignee")).to_have_text("You")
            await expect_counts(anna, 1, 0, 1)
            await expect(row(boris, 5150)).to_have_count(0, timeout=LIVE_MS)  # not resolved now
            await boris.get_by_label("Show").select_option("active")
            await expect(row(boris, 5150).locator(".status-pill")).to_have_text("Open")
            await expect(row(boris, 5150).locator(".assignee")).to_have_text("Support #1")
            await expect(row(boris, 5150).locator(".sub")).to_have_text("It did not ship")
            await tab(boris, "Unassigned").click()
            await expect(row(boris, 5150)).to_have_count(0)
            await tab(boris, "All").click()
            await expect(row(boris, 5150)).to_be_visible()
        assert len(lists) == 1, lists  # every change came as a push: no list asked for again
        assert errors == []
    finally:
        server.stop()


async def test_the_staff_view_with_its_tabs_and_the_assignee_picker(
    browser: Any, tmp_path: Path
) -> None:
    """A desk with a few requests in several states, seen by Anna with the assignee picker
    open: the README's screenshot."""
    from playwright.async_api import expect

    server = InProcessServer(tmp_path / "view.db", "--dev", "--rate", "0").start()
    try:
        requests = {
            6101: "Hi, my parcel has not arrived yet. Order #4471",
            6102: "Can I change the delivery address?",
            6103: "Where can I download the invoice?",
            6104: "Thanks, all good now!",
            6105: "The app crashes when I upload a photo",
        }
        async with (
            client(server, 3, token(admin_id=3, name="Boris")) as boris,
            client(server, 4, token(admin_id=4, name="Clara")) as clara,
        ):
            await clara.ok("Event.SubscribeInbox", {"filter": "all"})
            await boris.ok("Event.SetAvailability", {"availability": "busy"})
            for application, text in requests.items():
                async with customer(server, application, 20 + application % 100) as cust:
                    await cust.ok("Event.AddConversation", {"application_id": application})
                    await cust.ok(
                        "Event.SendMessage", {"session_channel": str(application), "content": text}
                    )
            await boris.ok(
                "Event.AssignConversation", {"session_channel": "6103", "assignee_id": 3}
            )
            await boris.ok(
                "Event.SendMessage",
                {"session_channel": "6103", "content": "It is under Orders, then Invoices"},
            )
            await boris.ok(
                "Event.SetConversationStatus", {"session_channel": "6103", "status": "pending"}
            )
            await clara.ok(
                "Event.SetConversationStatus", {"session_channel": "6104", "status": "resolved"}
            )
            await clara.ok(
                "Event.AssignConversation", {"session_channel": "6105", "assignee_id": 4}
            )
            await clara.ok(
                "Event.AssignConversation", {"session_channel": "6101", "assignee_id": 1}
            )

            errors: list[str] = []
            anna = await open_page(browser, server, errors)
            await sign_in_with(anna, token(admin_id=1, name="Anna"))
            await expect(anna.locator("#inbox-tools")).to_be_visible()
            await expect_counts(anna, 1, 1, 4)  # the resolved one is not shown
            await row(anna, 6101).click()
            await send(anna, "Sorry about that! Let me check with the courier.")
            await expect(bubble(anna, "courier").locator(".ticks")).to_have_text("✓")
            await expect(row(anna, 6103).locator(".status-pill")).to_have_text("Pending")
            await anna.locator("#assignee-button").click()
            options = anna.locator("#assignee-menu .assignee-option")
            # Me, then those available, then the busy, then nobody.
            await expect(options).to_have_count(4)
            await expect(options.nth(0).locator(".name")).to_have_text("Me")
            await expect(options.nth(1).locator(".availability")).to_have_text("Online")
            await expect(options.nth(2).locator(".availability")).to_have_text("Busy")
            await expect(options.nth(1)).to_have_attribute("data-assign", "4")
            await expect(options.nth(2)).to_have_attribute("data-assign", "3")
            await expect(options.nth(0)).to_have_attribute("aria-pressed", "true")
            await expect(options.nth(3)).to_have_text("Nobody")
            await screenshot(anna, tmp_path, "web-desk-staff.png")
            await anna.keyboard.press("Escape")
            await expect(anna.locator("#assignee-menu")).to_be_hidden()
            # Another agent's message shows as staff's (GetPresence says who is), with
            # their name; the customer's as the customer's.
            await row(anna, 6103).click()
            sender = bubble(anna, "Orders, then Invoices").locator(".sender")
            await expect(sender).to_have_text("Boris (support)")
            await expect(bubble(anna, "invoice?").locator(".sender")).to_have_text("Customer")
            await expect(anna.locator("#assignee-name")).to_have_text("Boris")
            assert errors == []
    finally:
        server.stop()


async def test_the_status_control_and_the_tabs_keyboard(browser: Any, tmp_path: Path) -> None:
    from playwright.async_api import expect

    server = InProcessServer(tmp_path / "status.db", "--dev", "--rate", "0").start()
    try:
        async with customer(server, 5200, 7) as cust:
            await cust.ok("Event.AddConversation", {"application_id": 5200})
            await cust.ok("Event.SendMessage", {"session_channel": "5200", "content": "Hi"})
        errors: list[str] = []
        page = await open_page(browser, server, errors)
        statuses = sent_frames(page, "Event.SetConversationStatus")
        await sign_in_agent(page, 1)
        await row(page, 5200).click()
        status = page.locator("#conversation-status")
        controls = page.locator("#desk-controls")
        await expect(status).to_have_text("Open")
        await expect(controls.get_by_role("button", name="Reopen")).to_be_hidden()

        await controls.get_by_role("button", name="Pending").click()
        await expect(status).to_have_text("Pending")
        await expect(row(page, 5200).locator(".status-pill")).to_have_text("Pending")

        # Snooze until a time the agent picks (a datetime-local input, in local time).
        await controls.get_by_role("button", name="Snooze until…").click()
        until = page.get_by_label("Snooze until")
        await expect(until).to_be_focused()
        when = await page.evaluate(
            "() => { const d = new Date(Date.now() + 2 * 86400000); d.setHours(9, 30, 0, 0);"
            " return [new Date(d - d.getTimezoneOffset() * 60000).toISOString().slice(0, 16),"
            " d.toISOString()]; }"
        )
        await until.fill(when[0])
        await page.locator("#snooze-form").get_by_role("button", name="Snooze").click()
        await expect(status).to_contain_text("Snoozed until")
        assert [s["status"] for s in statuses] == ["pending", "snoozed"]
        assert statuses[1]["snooze_until"].startswith(when[1][:16]), (statuses, when)
        await expect(row(page, 5200)).to_have_count(0)  # not among the open ones
        await page.get_by_label("Show").select_option("snoozed")
        await expect(row(page, 5200).locator(".status-pill")).to_contain_text("Snoozed until")

        await controls.get_by_role("button", name="Reopen").click()
        await expect(status).to_have_text("Open")
        await page.get_by_label("Show").select_option("any")
        await expect(row(page, 5200).locator(".status-pill")).to_have_text("Open")

        # The tabs are a tab list: arrows move between them, the selected one is the
        # only one Tab reaches.
        await tab(page, "All").focus()
        await page.keyboard.press("ArrowLeft")
        await expect(tab(page, "Unassigned")).to_be_focused()
        await expect(tab(page, "Unassigned")).to_have_attribute("aria-selected", "true")
        await expect(tab(page, "All")).to_have_attribute("aria-selected", "false")
        await page.keyboard.press("Home")
        await expect(tab(page, "Mine")).to_have_attribute("aria-selected", "true")
        await expect(row(page, 5200)).to_have_count(0)
        await expect(page.locator("#list-empty")).to_contain_text("Nothing here")
        await expect(page.locator("#inbox-panel")).to_have_attribute("aria-labelledby", "tab-mine")
        assert await page.locator("#inbox-tabs [tabindex='0']").count() == 1

        # The assignee picker takes any staff id too; Escape closes it.
        await page.locator("#assignee-button").click()
        await page.locator("#assign-id").get_by_label("Staff id").fill("42")
        await page.locator("#assign-id").get_by_role("button", name="Assign").click()
        await expect(page.locator("#assignee-name")).to_have_text("Support #42")
        await page.locator("#assignee-button").click()
        await expect(page.locator("#assignee-menu .assignee-option")).to_have_count(3)
        await page.keyboard.press("Escape")
        await expect(page.locator("#assignee-menu")).to_be_hidden()
        await expect(page.locator("#assignee-button")).to_be_focused()
        await page.locator("#assignee-button").click()
        await page.locator("#assignee-menu").get_by_role("button", name="Nobody").click()
        await expect(page.locator("#assignee-name")).to_have_text("Nobody")
        assert errors == []
    finally:
        server.stop()


async def test_availability_and_whether_a_customer_sees_an_agent(
    browser: Any, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    server = InProcessServer(tmp_path / "presence.db", "--dev", "--rate", "0").start()
    try:
        errors: list[str] = []
        shopper = await open_page(browser, server, errors, clock=True)
        await join_as_customer(shopper, 2, 5300)
        availability = shopper.locator("#agent-availability")
        await expect(availability).to_be_visible()
        await expect(availability).to_have_text(
            "No agent is available right now: leave a message and we answer as soon as we can"
        )
        anna = await agent_page(browser, server, errors, 1)
        boris = await agent_page(browser, server, errors, 3)
        await expect(anna.get_by_label("Your availability")).to_have_value("online")
        # The customer's page asks again every 30 s.
        await shopper.clock.fast_forward(30_000)
        await expect(availability).to_have_text("An agent is available")

        # Anna is busy, Boris offline: no agent is "online" any more.
        await row(boris, 5300).click()
        await boris.locator("#assignee-button").click()
        anna_option = boris.locator("#assignee-menu .assignee-option[data-assign='1']")
        await expect(anna_option.locator(".availability")).to_have_text("Online")
        await anna.get_by_label("Your availability").select_option("busy")
        # A presence push: Boris's open picker shows it at once.
        await expect(anna_option.locator(".availability")).to_have_text("Busy", timeout=LIVE_MS)
        await boris.get_by_label("Your availability").select_option("offline")
        await shopper.clock.fast_forward(30_000)
        await expect(availability).to_have_text(
            "No agent is available right now: leave a message and we answer as soon as we can"
        )

        # The choice is kept on this browser: after a reload the page says it again.
        await anna.reload()
        await expect(anna.locator("#inbox-tools")).to_be_visible()
        await expect(anna.get_by_label("Your availability")).to_have_value("busy")
        await boris.locator("#assignee-button").click()  # closed by the click: open again
        await boris.locator("#assignee-button").click()
        await expect(anna_option.locator(".availability")).to_have_text("Busy")
        await anna.get_by_label("Your availability").select_option("online")
        await expect(anna_option.locator(".availability")).to_have_text("Online", timeout=LIVE_MS)
        await shopper.clock.fast_forward(30_000)
        await expect(availability).to_have_text("An agent is available")

        # A page that says no agent is there asks again as soon as an agent writes, not
        # only every 30 s (the shopper's clock stands still from here).
        await anna.get_by_label("Your availability").select_option("busy")
        await expect(anna_option.locator(".availability")).to_have_text("Busy", timeout=LIVE_MS)
        await shopper.clock.fast_forward(30_000)
        await expect(availability).to_have_text(
            "No agent is available right now: leave a message and we answer as soon as we can"
        )
        await anna.get_by_label("Your availability").select_option("online")
        await expect(anna_option.locator(".availability")).to_have_text("Online", timeout=LIVE_MS)
        await row(anna, 5300).click()
        await send(anna, "Hello, I am here")
        await expect(bubble(shopper, "I am here")).to_be_visible()
        await expect(availability).to_have_text("An agent is available")
        assert errors == []
    finally:
        server.stop()


# Spies (installed before the page's own scripts): the notifications the page shows, its
# permission requests and the tones it plays. Each calls through to the browser's own.
SPIES = """
(() => {
  window.__notes = [];
  window.__asked = 0;
  window.__tones = 0;
  const Real = window.Notification;
  class Spy extends Real {
    constructor(title, options) {
      super(title, options);
      window.__notes.push({ title, body: options && options.body, note: this });
    }
  }
  Spy.requestPermission = (...args) => {
    window.__asked += 1;
    return Real.requestPermission(...args);
  };
  Object.defineProperty(Spy, "permission", { get: () => Real.permission });
  window.Notification = Spy;
  const oscillator = AudioContext.prototype.createOscillator;
  AudioContext.prototype.createOscillator = function () {
    window.__tones += 1;
    return oscillator.call(this);
  };
})();
"""

# The tab goes to the background (or comes back): what a browser says when another tab is
# chosen, which a headless page never sees by itself.
HIDE = """(hidden) => {
  const state = hidden ? "hidden" : "visible";
  Object.defineProperty(document, "visibilityState", { configurable: true, get: () => state });
  Object.defineProperty(document, "hidden", { configurable: true, get: () => hidden });
  document.dispatchEvent(new Event("visibilitychange"));
}"""


async def test_a_hidden_tab_is_told_when_a_customer_writes(browser: Any, tmp_path: Path) -> None:
    from playwright.async_api import expect

    server = InProcessServer(tmp_path / "notify.db", "--dev", "--rate", "0").start()
    try:
        errors: list[str] = []
        context = await browser.new_context(viewport={"width": 1180, "height": 720})
        await context.add_init_script(SPIES)
        page = await context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        await page.goto(server.http("/"))
        await sign_in_with(page, token(admin_id=1))
        await expect(page.locator("#inbox-tools")).to_be_visible()
        # Never asked on load: only a click on the button asks.
        enable = page.get_by_role("button", name="Enable notifications")
        await expect(enable).to_be_visible()
        assert await page.evaluate("window.__asked") == 0
        await context.grant_permissions(["notifications"], origin=server.http(""))
        await enable.click()
        await expect(enable).to_be_hidden()
        assert await page.evaluate("window.__asked") == 1
        # The sound: off until turned on (a beep says so), kept across a reload.
        sound = page.get_by_label("Sound")
        await expect(sound).not_to_be_checked()
        await sound.check()
        await eventually(lambda: page.evaluate("window.__tones === 1"))
        await page.reload()
        await expect(page.locator("#inbox-tools")).to_be_visible()
        await expect(sound).to_be_checked()
        assert await page.evaluate("window.__asked + window.__tones + window.__notes.length") == 0

        async with customer(server, 5400, 9) as cust:
            # Visible: the list shows it, nothing else.
            await cust.ok("Event.AddConversation", {"application_id": 5400})
            await cust.ok("Event.SendMessage", {"session_channel": "5400", "content": "Visible?"})
            await expect(row(page, 5400)).to_be_visible(timeout=LIVE_MS)
            await page.evaluate(HIDE, True)
            await cust.ok(
                "Event.SendMessage", {"session_channel": "5400", "content": "Anyone there?"}
            )
            await expect(page).to_have_title("(2) appchat", timeout=LIVE_MS)
            await eventually(lambda: page.evaluate("window.__notes.length === 1"))
            note = await page.evaluate("() => ({ title: __notes[0].title, body: __notes[0].body })")
            assert note == {"title": "Request #5400", "body": "Anyone there?"}, note
            assert await page.evaluate("window.__tones") == 1
            # An agent's own reply, or one from staff, is no news.
            async with client(server, 1, token(admin_id=1)) as me:
                await me.ok("Event.SendMessage", {"session_channel": "5400", "content": "Yes"})
            await expect(row(page, 5400).locator(".sub")).to_have_text("You: Yes")
            # Clicking the notification brings the conversation up.
            await page.evaluate(HIDE, False)
            await page.evaluate("window.__notes[0].note.onclick()")
            await expect(page.locator("#thread-title")).to_have_text("Request #5400")
            await expect(bubble(page, "Anyone there?")).to_be_visible()
            await expect(page).to_have_title("appchat")
            assert await page.evaluate("window.__notes.length") == 1
            assert await page.evaluate("window.__tones") == 1
        assert errors == []
    finally:
        server.stop()


async def test_the_inbox_subscribes_again_after_a_restart(browser: Any, tmp_path: Path) -> None:
    from playwright.async_api import expect

    port = free_port()
    db = tmp_path / "again.db"
    server = InProcessServer(db, "--dev", "--rate", "0", "--port", str(port)).start()
    try:
        errors: list[str] = []
        page = await open_page(browser, server, errors, clock=True)
        subscribes = sent_frames(page, "Event.SubscribeInbox")
        await sign_in_with(page, token(admin_id=1))
        await expect(page.locator("#inbox-tools")).to_be_visible()
        server.stop()
        await expect(page.locator("#status")).to_have_attribute("data-state", "offline")
        # While the page is away, a customer writes through another node on the same data.
        away = InProcessServer(db, "--rate", "0").start()
        try:
            async with customer(away, 5500, 2) as cust:
                await cust.ok("Event.AddConversation", {"application_id": 5500})
                await cust.ok("Event.SendMessage", {"session_channel": "5500", "content": "Hi"})
        finally:
            away.stop()
        server.start()
        await page.clock.fast_forward(15_000)  # past the reconnect's backoff
        await expect(page.locator("#status")).to_have_attribute("data-state", "online")
        # Subscribed again, then the list loaded again: what was missed shows.
        await expect(row(page, 5500)).to_be_visible()
        assert subscribes == [{"filter": "all"}, {"filter": "all"}], subscribes
        # And the pushes flow again.
        async with customer(server, 5501, 3) as cust:
            await cust.ok("Event.AddConversation", {"application_id": 5501})
            await cust.ok("Event.SendMessage", {"session_channel": "5501", "content": "Me too"})
        await expect(row(page, 5501)).to_be_visible(timeout=LIVE_MS)
        assert errors == []
    finally:
        server.stop()


async def pass_through(page: Any, to_page: Any, to_server: Any) -> None:
    """Between the page and the server: each frame goes on through ``to_page(route, data)``
    or ``to_server(route, server, data)``, which forward it, change it or answer it."""

    def handler(route: Any) -> None:
        server = route.connect_to_server()
        route.on_message(lambda data: to_server(route, server, data))
        server.on_message(lambda data: to_page(route, data))

    await page.route_web_socket(re.compile(r"/ws\?"), handler)


async def test_an_older_copy_of_a_conversation_never_wins(browser: Any, tmp_path: Path) -> None:
    """Pushes through different nodes may arrive out of order: the page keeps the copy
    with the highest ``rev``. A stale ConversationUpdated is played to the page after a
    newer state; the page stays with the newer one."""
    from playwright.async_api import expect

    server = InProcessServer(tmp_path / "rev.db", "--dev", "--rate", "0").start()
    try:
        updates: list[dict[str, Any]] = []
        routes: list[Any] = []

        def to_page(route: Any, data: str | bytes) -> None:
            frame = json.loads(data)
            if frame.get("name") == "Event.ConversationUpdated":
                updates.append(frame)
            routes[:] = [route]
            route.send(data)

        errors: list[str] = []
        page = await open_page(browser, server, errors)
        await pass_through(page, to_page, lambda route, server, data: server.send(data))
        await sign_in_with(page, token(admin_id=1))
        await expect(page.locator("#inbox-tools")).to_be_visible()
        async with customer(server, 5600, 2) as cust:
            await cust.ok("Event.AddConversation", {"application_id": 5600})
            await cust.ok("Event.SendMessage", {"session_channel": "5600", "content": "First"})
            await expect(row(page, 5600)).to_be_visible(timeout=LIVE_MS)
            await eventually(lambda: len(updates) > 0)
            stale = updates[-1]
            await row(page, 5600).click()
            await page.locator("#desk-controls").get_by_role("button", name="Pending").click()
            await expect(row(page, 5600).locator(".status-pill")).to_have_text("Pending")
            assert stale["result"]["conversation"]["status"] == "open"
            routes[0].send(json.dumps(stale))
            # A push that comes after it on the same socket shows: the stale copy was read
            # before, and left alone.
            await cust.ok("Event.Typing", {"session_channel": "5600"})
            await expect(row(page, 5600).locator(".sub")).to_have_text("typing…")
            await expect(row(page, 5600).locator(".status-pill")).to_have_text("Pending")
            await expect(page.locator("#conversation-status")).to_have_text("Pending")
        assert errors == []
    finally:
        server.stop()


async def test_a_server_without_the_desk_is_polled(browser: Any, tmp_path: Path) -> None:
    """A server without the desk (its events answered with unknown_event, its conversation
    fields left out): no tabs, no desk controls, and the list is asked for again every
    30 s."""
    from playwright.async_api import expect

    server = InProcessServer(tmp_path / "old.db", "--dev", "--rate", "0").start()
    try:
        lists: list[dict[str, Any]] = []

        def to_server(route: Any, server: Any, data: str | bytes) -> None:
            frame = json.loads(data)
            if frame.get("name") == "Event.GetConversationList":
                lists.append(frame)
            if frame.get("name") not in (
                "Event.SubscribeInbox",
                "Event.GetPresence",
                "Event.SetAvailability",
            ):
                server.send(data)
                return
            error = {"code": "unknown_event", "message": f"unknown event {frame['name']}"}
            reply = {"name": frame["name"], "ok": False, "id": frame["id"], "result": None}
            route.send(json.dumps({**reply, "error": error}))

        def to_page(route: Any, data: str | bytes) -> None:
            frame = json.loads(data)
            if frame.get("name") == "Event.GetConversationList" and frame["ok"]:
                seed = ("id", "session_channel", "application_id", "create_at", "update_at")
                for c in frame["result"]["conversations"]:
                    for key in set(c) - set(seed):
                        del c[key]
            route.send(json.dumps(frame))

        errors: list[str] = []
        page = await open_page(browser, server, errors, clock=True)
        await pass_through(page, to_page, to_server)
        await sign_in_with(page, token(admin_id=1))
        await expect(page.locator("#status")).to_have_attribute("data-state", "online")
        await eventually(lambda: len(lists) == 1)
        async with customer(server, 5700, 2) as cust:
            await cust.ok("Event.AddConversation", {"application_id": 5700})
            await cust.ok("Event.SendMessage", {"session_channel": "5700", "content": "Hello"})
        await page.clock.fast_forward(30_000)
        await expect(row(page, 5700)).to_be_visible()
        assert len(lists) == 2
        await expect(page.locator("#inbox-tools")).to_be_hidden()
        await expect(page.get_by_label("Your availability")).to_be_hidden()
        await row(page, 5700).click()
        await expect(bubble(page, "Hello")).to_be_visible()
        await expect(page.locator("#desk-controls")).to_be_hidden()
        assert errors == []
    finally:
        server.stop()
