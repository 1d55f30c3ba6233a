"""Unit tests of appchat.js (tests/js/appchat_test.js), run in headless Chromium against the
module as the server serves it: request/reply by id, timeouts, reconnect, resume, tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .support import Server
from .test_browser import CHROMIUM, CHROMIUM_ARGS, chromium_available

TESTS = Path(__file__).parent / "js" / "appchat_test.js"
EXPECTED = {
    "replies are matched to requests by id",
    "a reply that never comes times out and the connection goes on",
    "calls while offline fail at once, pending ones fail on disconnect",
    "reconnects with backoff and walks through the states",
    "resume after a reconnect: every message once, paged with after_id",
    "a Resync push fetches what was missed, once",
    "a catch-up that times out is tried again, with backoff",
    "a send whose reply is lost is retried with the same client_msg_id",
    "a message written offline is sent once the client is online",
    "the token is renewed through getToken before it expires",
    "close 4001 asks for a new token and reconnects with it",
    "close 4001 without a way to renew ends in token_expired",
    "close 4009 (disconnected by the server API) does not reconnect",
    "the token goes only to this server's upload and file paths",
}


async def test_appchat_js_unit_tests(server: Server) -> None:
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
            await page.wait_for_function("() => window.appchatTests !== undefined")
            names = await page.evaluate("() => Object.keys(window.appchatTests)")
            assert set(names) == EXPECTED
            results: dict[str, Any] = {}
            for name in names:
                results[name] = await page.evaluate("(n) => window.runAppchatTest(n)", name)
            failed = {n: r for n, r in results.items() if r != "ok"}
            assert not failed, "\n\n".join(f"{n}:\n{r}" for n, r in failed.items())
            assert errors == []
        finally:
            await browser.close()
