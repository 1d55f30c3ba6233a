"""Unit tests of appchat.js's support-desk calls (tests/js/appchat_desk_test.js), run in
headless Chromium against the module as the server serves it: the inbox subscription made
again after a reconnect and a Resync (and tried again after a timeout, ended by a refusal),
unsubscribing, the calls' arguments, the pushes as events."""

from __future__ import annotations

from pathlib import Path

from .support import Server
from .test_appchat_js import run_js_unit_tests

TESTS = Path(__file__).parent / "js" / "appchat_desk_test.js"
EXPECTED = {
    "the inbox is subscribed again on every new connection, then an inbox event",
    "a Resync push subscribes again",
    "a subscription that times out is tried again; one the server refuses ends",
    "unsubscribeInbox: no subscription on the next connection",
    "the desk's calls and pushes",
}


async def test_appchat_js_desk_unit_tests(server: Server) -> None:
    await run_js_unit_tests(server, TESTS, "appchatDeskTests", "runAppchatDeskTest", EXPECTED)
