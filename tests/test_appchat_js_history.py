"""Unit tests of appchat.js's history calls (tests/js/appchat_history_test.js), run in
headless Chromium against the module as the server serves it: editMessage, deleteMessage,
private sends and searchMessages with their arguments, MessageUpdated as an event, and the
catch-up of changes on resume (changed_since from the highest rev held, paged; a server
that refuses or ignores it is not asked again and the catch-up goes on without it)."""

from __future__ import annotations

from pathlib import Path

from .support import Server
from .test_appchat_js import run_js_unit_tests

TESTS = Path(__file__).parent / "js" / "appchat_history_test.js"
EXPECTED = {
    "the history calls' arguments, replies and events",
    "resume asks what changed since the highest rev held, and emits each change once",
    "changed_since is read page after page, by rev",
    "a server that refuses changed_since: caught up without it, never asked again",
    "messages without a rev (an older server): changed_since is never asked",
}


async def test_appchat_js_history_unit_tests(server: Server) -> None:
    await run_js_unit_tests(server, TESTS, "appchatHistoryTests", "runAppchatHistoryTest", EXPECTED)
