from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from .backends import AHEAD
from .support import close_raw_sockets, module_server
from .test_browser import CHROMIUM, CHROMIUM_ARGS, chromium_available


@pytest.fixture(scope="session", autouse=True)
def databases_ahead() -> Iterator[None]:
    """Drop, when the session ends, the PostgreSQL databases made ahead and never used."""
    yield
    AHEAD.close()


# One real ``appchat serve`` node per test module (in this process, on a real socket), on a
# fresh SQLite file.
server = module_server("--rate", "0")


@pytest.fixture(autouse=True)
def raw_sockets_closed() -> Iterator[None]:
    """The raw sockets a test opened (``RawSocket``) are closed after it, whatever it did."""
    yield
    close_raw_sockets()


@pytest.fixture
def root_logging_restored() -> Iterator[None]:
    """For a test that runs ``appchat``'s main in-process: main points the root logger
    at the stderr of that moment (pytest's capture, closed after the test) and sets its
    level; both are put back, so later tests' log lines neither fail nor change level."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


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
