"""The web client's rough edges, in headless Chromium against real servers: tokens the
server refuses, messages that could not be sent, a resume that times out, who is who,
keyboard and screen readers, a phone-sized screen, a thread holding images."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .backends import free_port
from .support import Clock, InProcessServer, Server, token
from .test_web import open_page

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
