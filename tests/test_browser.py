"""A real browser (headless Chromium) speaks the protocol exactly as the original shows:
``new WebSocket(url, ["access_token", jwt])``."""

from __future__ import annotations

import asyncio
import functools
import http.server
import os
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from .support import InProcessServer, Server, client, token

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGE = """<!doctype html><meta charset="utf-8"><title>appchat browser test</title>
<script>
// Open a socket the way the original protocol document does, run requests, collect frames.
window.chat = (url, jwt, requests, waitFor) => new Promise((resolve) => {
  const frames = [];
  window.seen = frames;  // what came so far, for a test to wait on
  const ws = new WebSocket(url, ["access_token", jwt]);
  const done = (why) => resolve({why, protocol: ws.protocol, frames});
  ws.onerror = () => done("error");
  ws.onclose = (e) => done("closed " + e.code);
  ws.onopen = () => requests.forEach((r) => ws.send(JSON.stringify(
    {name: r.name, args: JSON.stringify(r.args), id: r.id})));
  ws.onmessage = (e) => {
    frames.push(JSON.parse(e.data));
    if (frames.length >= waitFor) { ws.close(); done("ok"); }
  };
});
</script>"""


def chromium_available() -> None:
    if shutil.which(CHROMIUM):
        return
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing (CI requires it: apt-get install chromium)")
    pytest.skip(f"SKIPPED LOUDLY: {CHROMIUM} is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def page_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The test page, served over HTTP on loopback (Chromium won't reach loopback from
    about:blank)."""
    root = tmp_path_factory.mktemp("page")
    (root / "index.html").write_text(PAGE)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
async def browser_page(page_origin: str) -> AsyncIterator[Any]:
    chromium_available()
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(page_origin + "/index.html")
            yield page
        finally:
            await browser.close()


async def chat(page: Any, url: str, jwt: str, requests: list[dict[str, Any]], wait_for: int) -> Any:
    return await page.evaluate(
        "([url, jwt, requests, waitFor]) => window.chat(url, jwt, requests, waitFor)",
        [url, jwt, requests, wait_for],
    )


async def test_browser_customer_chats_with_staff(server: Server, browser_page: Any) -> None:
    async with client(server, 1, token(admin_id=1)) as staff:
        await staff.ok("Event.AddConversation", {"application_id": 100})
        requests = [
            {
                "name": "Event.AddConversation",
                "args": {"user_id": 2, "application_id": 100},
                "id": 1,
            },
            {
                "name": "Event.SendMessage",
                "args": {"session_channel": "100", "sender_id": 2, "content": "Привет из браузера"},
                "id": 2,
            },
        ]
        result = await chat(
            browser_page, server.url(2), token(request_id=100, sid=2), requests, wait_for=2
        )
        assert result["why"] == "ok", result
        assert result["protocol"] == "access_token"
        replies = {f["id"]: f for f in result["frames"]}
        assert replies[1]["ok"] and replies[1]["result"]["session_channel"] == "100"
        sent = replies[2]["result"]["message"]
        assert sent["content"] == "Привет из браузера" and sent["sender_id"] == 2
        pushed = await staff.push("Event.ReceiveMessage")
        assert pushed["result"]["message"] == sent


async def test_browser_receives_pushes(server: Server, browser_page: Any) -> None:
    async with client(server, 1, token(admin_id=1)) as staff:
        await staff.ok("Event.AddConversation", {"application_id": 101})
        await staff.ok("Event.AddConversation", {"application_id": 101, "user_id": 3})
        pending = chat(
            browser_page,
            server.url(3),
            token(request_id=101, sid=3),
            [{"name": "Event.GetUnreadInfo", "args": {}, "id": "u"}],
            wait_for=2,
        )
        task = asyncio.ensure_future(pending)
        # The browser is connected once it has its reply.
        await browser_page.wait_for_function("() => (window.seen || []).length >= 1")
        sent = await staff.ok("Event.SendMessage", {"session_channel": "101", "content": "hi"})
        result = await asyncio.wait_for(task, 15)
        assert result["why"] == "ok", result
        push = next(f for f in result["frames"] if f["name"] == "Event.ReceiveMessage")
        assert push["result"] == sent and "id" not in push


async def test_browser_with_a_bad_token_never_opens(server: Server, browser_page: Any) -> None:
    result = await chat(browser_page, server.url(1), "not-a-jwt", [], wait_for=1)
    assert result["why"] in ("error", "closed 1006"), result
    assert result["frames"] == []


async def test_origin_allow_list_in_the_browser(
    tmp_path: Path, page_origin: str, browser_page: Any
) -> None:
    allowed = InProcessServer(tmp_path / "a.db", "--allowed-origins", page_origin).start()
    other = InProcessServer(tmp_path / "b.db", "--allowed-origins", "https://app.example").start()
    try:
        tok = token(admin_id=1)
        req = [{"name": "Event.GetUnreadInfo", "args": {}, "id": 1}]
        ok = await chat(browser_page, allowed.url(1), tok, req, wait_for=1)
        assert ok["why"] == "ok" and ok["frames"][0]["ok"] is True
        refused = await chat(browser_page, other.url(1), tok, req, wait_for=1)
        assert refused["why"] in ("error", "closed 1006") and refused["frames"] == []
    finally:
        allowed.stop()
        other.stop()
