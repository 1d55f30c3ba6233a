"""Unit tests of appchat.js's history calls (tests/js/appchat_history_test.js), run in
headless Chromium against the module as the server serves it: editMessage, deleteMessage,
private sends and searchMessages with their arguments, MessageUpdated as an event, and the
catch-up of changes on resume (changed_since from the highest rev held, paged; a server
that refuses or ignores it is not asked again and the catch-up goes on without it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .support import Server
from .test_browser import CHROMIUM, CHROMIUM_ARGS, chromium_available

TESTS = Path(__file__).parent / "js" / "appchat_history_test.js"
EXPECTED = {
    "the history calls' arguments, replies and events",
    "resume asks what changed since the highest rev held, and emits each change once",
    "changed_since is read page after page, by rev",
    "a server that refuses changed_since: caught up without it, never asked again",
    "messages without a rev (an older server): changed_since is never asked",
}


async def test_appchat_js_history_unit_tests(server: Server) -> None:
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
            await page.wait_for_function("() => window.appchatHistoryTests !== undefined")
            names = await page.evaluate("() => Object.keys(window.appchatHistoryTests)")
            assert set(names) == EXPECTED
            results: dict[str, Any] = {}
            for name in names:
                results[name] = await page.evaluate("(n) => window.runAppchatHistoryTest(n)", name)
            failed = {n: r for n, r in results.items() if r != "ok"}
            assert not failed, "\n\n".join(f"{n}:\n{r}" for n, r in failed.items())
            assert errors == []
        finally:
            await browser.close()
