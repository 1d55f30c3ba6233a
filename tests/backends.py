"""Real backing services for tests: a fresh PostgreSQL database per use, Redis, NATS.

Under ``CI`` a service that cannot be reached fails the test; elsewhere the test is
skipped with a loud reason.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import psycopg
import pytest

from appchat.store import Store, open_store

from .support import wait_until

PG_ADMIN = os.environ.get("APPCHAT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("APPCHAT_TEST_REDIS", "redis://127.0.0.1:6379/0")
NATS_URL = os.environ.get("APPCHAT_TEST_NATS", "nats://127.0.0.1:4222")


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require(service: str, host: str, port: int) -> None:
    if reachable(host, port):
        return
    message = f"{service} is not reachable at {host}:{port}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI requires it)")
    pytest.skip(f"SKIPPED LOUDLY: {message}; start it to run these tests")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DatabasesAhead:
    """Fresh, empty databases made a few at a time before they are asked for.

    CREATE DATABASE takes about 0.3 s here, mostly waiting for the disk, and several at
    once take hardly longer than one: two threads keep up to ``AHEAD`` of them ready.
    Each database is still used once, by one test, and dropped afterwards.
    """

    AHEAD = 3
    MAKERS = 2

    def __init__(self) -> None:
        self._ready: queue.Queue[str | BaseException] = queue.Queue()
        self._room = threading.Semaphore(self.AHEAD)
        self._lock = threading.Lock()
        self._started = False
        self._closed = False

    def take(self) -> str:
        """The name of a database of its own (waits for one when none is ready)."""
        with self._lock:
            if not self._started:
                self._started = True
                for _ in range(self.MAKERS):
                    threading.Thread(target=self._make, name="pg-ahead", daemon=True).start()
        item = self._ready.get(timeout=60)
        self._room.release()
        if isinstance(item, BaseException):
            raise item
        return item

    def _make(self) -> None:
        while True:
            self._room.acquire()
            name = f"appchat_test_{uuid.uuid4().hex[:12]}"
            try:
                with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
                    admin.execute(f'CREATE DATABASE "{name}"')
            except BaseException as exc:
                self._ready.put(exc)
                continue
            with self._lock:
                if not self._closed:
                    self._ready.put(name)
                    continue
            drop_database(name)  # made while the session ended

    def close(self) -> None:
        """Drop the databases made and never taken (at the end of the session)."""
        with self._lock:
            self._closed = True
        while True:
            try:
                item = self._ready.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, str):
                drop_database(item)


AHEAD = DatabasesAhead()


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def postgres_database() -> Iterator[str]:
    """A uniquely named, fresh database, dropped afterwards; yields its URL."""
    require("PostgreSQL", "127.0.0.1", 5432)
    name = AHEAD.take()
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    finally:
        drop_database(name)


ENGINES = ["sqlite", "postgres"]


@asynccontextmanager
async def opened_store(engine: str, tmp_path: Path) -> AsyncIterator[Store]:
    """An open store on ``engine`` ("sqlite": a file in ``tmp_path``; "postgres": a fresh
    database), closed (and dropped) afterwards."""
    if engine == "sqlite":
        s = open_store(f"sqlite:///{tmp_path / 'chat.db'}")
        await s.open()
        try:
            yield s
        finally:
            await s.close()
        return
    with postgres_database() as url:
        s = open_store(url)
        await s.open()
        try:
            yield s
        finally:
            await s.close()


def unique_prefix() -> str:
    """Broker channels of their own, so runs sharing one Redis or NATS never cross."""
    return f"appchat-test-{uuid.uuid4().hex[:10]}"


class PrivateRedis:
    """A redis-server of the test's own, on a port of its own, that the test may kill."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is needed for the Redis fault test"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: reachable("127.0.0.1", self.port), what="the private redis-server")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
