from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .backends import AHEAD
from .support import InProcessServer
from .test_browser import CHROMIUM, CHROMIUM_ARGS, chromium_available


@pytest.fixture(scope="session", autouse=True)
def databases_ahead() -> Iterator[None]:
    """Drop, when the session ends, the PostgreSQL databases made ahead and never used."""
    yield
    AHEAD.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    """One real ``appchat serve`` node per test module (in this process, on a real socket),
    on a fresh SQLite file."""
    db: Path = tmp_path_factory.mktemp("db") / "appchat.db"
    proc = InProcessServer(db, "--rate", "0").start()
    yield proc
    proc.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Headless Chromium (Debian's, never a download) for one test."""
    chromium_available()
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client session for one test."""
    async with aiohttp.ClientSession() as session:
        yield session
