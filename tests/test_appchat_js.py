"""Unit tests of appchat.js (tests/js/appchat_test.js), run in headless Chromium against the
module as the server serves it: request/reply by id, timeouts, reconnect, resume, tokens."""

from __future__ import annotations

import asyncio
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
    await run_js_unit_tests(server, TESTS, "appchatTests", "runAppchatTest", EXPECTED)


async def run_js_unit_tests(
    server: Server, tests: Path, table: str, runner: str, expected: set[str]
) -> None:
    """Load the test module ``tests`` into a page of ``server``, check it defines exactly
    the tests ``expected`` (in ``window[table]``) and that each passes (``window[runner]``
    answers "ok")."""
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
            source = await asyncio.to_thread(tests.read_text)
            await page.add_script_tag(content=source, type="module")
            await page.wait_for_function(f"() => window.{table} !== undefined")
            names = await page.evaluate(f"() => Object.keys(window.{table})")
            assert set(names) == expected
            results: dict[str, Any] = {}
            for name in names:
                results[name] = await page.evaluate(f"(n) => window.{runner}(n)", name)
            failed = {n: r for n, r in results.items() if r != "ok"}
            assert not failed, "\n\n".join(f"{n}:\n{r}" for n, r in failed.items())
            assert errors == []
        finally:
            await browser.close()
