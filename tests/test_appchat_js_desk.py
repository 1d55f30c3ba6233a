"""Unit tests of appchat.js's support-desk calls (tests/js/appchat_desk_test.js), run in
headless Chromium against the module as the server serves it: the inbox subscription made
again after a reconnect and a Resync (and tried again after a timeout, ended by a refusal),
unsubscribing, the calls' arguments, the pushes as events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .support import Server
from .test_browser import CHROMIUM, CHROMIUM_ARGS, chromium_available

TESTS = Path(__file__).parent / "js" / "appchat_desk_test.js"
EXPECTED = {
    "the inbox is subscribed again on every new connection, then an inbox event",
    "a Resync push subscribes again",
    "a subscription that times out is tried again; one the server refuses ends",
    "unsubscribeInbox: no subscription on the next connection",
    "the desk's calls and pushes",
}


async def test_appchat_js_desk_unit_tests(server: Server) -> None:
    chromium_available()
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # The page's CSP allows no inline script: the test module is added past it.
            context = await browser.new_context(bypass_csp=True)
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(server.http("/client-config.json"))
            await page.add_script_tag(content=TESTS.read_text(), type="module")
            await page.wait_for_function("() => window.appchatDeskTests !== undefined")
            names = await page.evaluate("() => Object.keys(window.appchatDeskTests)")
            assert set(names) == EXPECTED
            results: dict[str, Any] = {}
            for name in names:
                results[name] = await page.evaluate("(n) => window.runAppchatDeskTest(n)", name)
            failed = {n: r for n, r in results.items() if r != "ok"}
            assert not failed, "\n\n".join(f"{n}:\n{r}" for n, r in failed.items())
            assert errors == []
        finally:
            await browser.close()
