"""The web client in headless Chromium: a customer attaches an image, both sides see it."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from .support import InProcessServer, Server, customer, staff
from .test_web import join_as_customer, join_as_staff, open_page, screenshot


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    db = tmp_path_factory.mktemp("web-images") / "appchat.db"
    proc = InProcessServer(db, "--dev", "--rate", "0").start()
    yield proc
    proc.stop()


async def natural_size(image: Any) -> list[int]:
    size: list[int] = await image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    return size


async def test_a_customer_attaches_an_image_and_staff_sees_it(
    dev_server: Server, browser: Any, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    picture = tmp_path / "receipt.png"
    Image.new("RGB", (800, 600), (250, 180, 20)).save(picture)
    pretender = tmp_path / "fake.png"
    pretender.write_bytes(b"\x89PNG\r\n\x1a\n<html><script>alert(1)</script></html>")

    errors: list[str] = []
    customer = await open_page(browser, dev_server, errors)
    await join_as_customer(customer, 2, 300)
    await expect(customer.locator("#status")).to_have_attribute("data-state", "online")
    staff = await open_page(browser, dev_server, errors)
    await join_as_staff(staff, 1)
    await expect(staff.locator("#status")).to_have_attribute("data-state", "online")
    await staff.locator("#conversations li[data-channel='300']").click()
    await expect(staff.locator("#thread-empty")).to_be_visible()

    await customer.locator("#attach").set_input_files(str(picture))
    # The customer's own bubble: stored (ticks), showing the thumbnail through a blob: URL.
    own = customer.locator("#message-list .msg.own")
    await expect(own.locator(".ticks")).to_have_text("✓✓")  # staff has it open: read
    own_image = own.locator("img.image")
    await expect(own_image).to_have_attribute("src", _blob())
    assert await natural_size(own_image) == [320, 240]

    # Staff got it as a push and shows it the same way.
    theirs = staff.locator("#message-list .msg.theirs img.image")
    await expect(theirs).to_have_attribute("src", _blob())
    assert await natural_size(theirs) == [320, 240]
    await screenshot(staff, tmp_path, "web-image.png")

    # A file that only pretends to be a PNG is refused, and the page says so.
    await customer.locator("#attach").set_input_files(str(pretender))
    failed = customer.locator("#message-list .msg.failed .ticks")
    await expect(failed).to_contain_text("Not sent: the file is not a PNG, JPEG, WebP or GIF")
    assert errors == []


# Image messages as a client of the original server sends them: whatever its own backend
# serves, or a file name; and a reference-shaped path of another conversation.
FOREIGN = [
    "https://tracker.example/pixel.gif?user=2",
    "http://insecure.example/photo.png",
    "IMG_0042.jpg",
    "javascript:alert(1)",
    "/files/999/0123456789abcdef0123456789abcdef",
]


def store_as_sent(server: InProcessServer, application_id: int, contents: list[str]) -> None:
    """Store image messages straight into the node's store: for content SendMessage
    refuses today (a reference to another conversation's upload) that a page may still
    meet in a database written before the rule."""
    node = server.node
    assert node is not None

    async def add() -> None:
        conversation = await node.store.get_conversation(application_id)
        assert conversation is not None
        for content in contents:
            await node.store.add_message(
                conversation,
                sender_id=7,
                staff=False,
                content=content,
                content_type=2,
                client_msg_id=None,
                now=time.time_ns() // 1000,
            )

    server.run(add())


async def test_foreign_image_content_is_a_link_the_page_never_fetches(
    dev_server: InProcessServer, browser: Any
) -> None:
    from playwright.async_api import expect

    async with staff(dev_server) as s, customer(dev_server, 500, 7) as c:
        await s.ok("Event.AddConversation", {"application_id": 500})
        await c.ok("Event.AddConversation", {"application_id": 500})
        # What a client of the original server sends, stored as sent (SPEC, "Seed
        # compatibility")...
        for content in FOREIGN[:-1]:
            args = {"session_channel": "500", "content": content, "content_type": 2}
            await c.ok("Event.SendMessage", args)
    # ... and a reference to another conversation's upload, which SendMessage refuses.
    store_as_sent(dev_server, 500, FOREIGN[-1:])
    errors: list[str] = []
    page = await open_page(browser, dev_server, errors)
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    await join_as_staff(page, 1)
    await page.locator("#conversations li[data-channel='500']").click()
    bubbles = page.locator("#message-list .msg.theirs")
    await expect(bubbles).to_have_count(len(FOREIGN))
    for index, content in enumerate(FOREIGN):
        await expect(bubbles.nth(index).locator(".text")).to_have_text(content)
    await expect(page.locator("#message-list img")).to_have_count(0)
    links = page.locator("#message-list a.image-url")
    await expect(links).to_have_count(2)
    for index, content in enumerate(FOREIGN[:2]):
        link = links.nth(index)
        await expect(link).to_have_attribute("href", content)
        await expect(link).to_have_attribute("target", "_blank")
        await expect(link).to_have_attribute("rel", "noopener noreferrer nofollow")
    # Everything shown: the page asked for nothing of them.
    await expect(page.locator("#history-status")).to_have_text("Beginning of the conversation")
    assert not [u for u in requested if "example" in u or "/files/" in u], requested
    assert errors == []


def _blob() -> re.Pattern[str]:
    return re.compile(r"^blob:http://127\.0\.0\.1:\d+/")
