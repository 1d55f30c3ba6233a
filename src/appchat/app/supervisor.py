"""``appchat serve --workers N``: N worker processes on one port, restarted when they die.

The parent applies migrations once, reserves the port (a bound, never listening socket with
``SO_REUSEPORT``, kept for its whole life so the port stays ours across restarts), then
starts each worker as ``python -P -m appchat serve --worker-of PARENT_PID``. ``-P`` leaves
the working directory off ``sys.path``: a module lying there (a ``uvloop.py``, an
``appchat/``) is never imported in place of the installed one. The environment, and so
``PYTHONPATH``, is kept: the workers import what the parent imported. A worker reads its
settings and secret as one JSON line on stdin, binds the same port with ``SO_REUSEPORT`` (the
kernel spreads new connections over the workers), and answers ``ready PID`` on stdout. Its
stdin stays open: when the parent goes away, even killed, the worker sees end of file and
drains. Workers log to the parent's stderr.

A worker that dies is started again after a delay that doubles while workers keep dying
(0.5 s up to 30 s), so a crash loop does not spin. SIGTERM or SIGINT to the parent is
passed to every worker, each closes its WebSockets with 1001 and exits; the parent exits 0
once all of them exited 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Protocol

from ..protocol.errors import ConfigError
from .config import LISTS, Settings

log = logging.getLogger("appchat.supervisor")

# Seconds before a dead worker is started again: doubles while workers keep dying.
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
# A worker that served this long before dying resets the delay.
HEALTHY_AFTER = 10.0
# How long a worker may take to start, and to drain after SIGTERM, before it is killed.
START_TIMEOUT = 60.0
DRAIN_TIMEOUT = 30.0
# File descriptors a process needs beside its connections (database, broker, logs, ...).
SPARE_FILES = 256


class Signals(Protocol):
    def attach(self, stop: asyncio.Event) -> None: ...


# --- choosing the count --------------------------------------------------------------------------


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    count = getattr(os, "process_cpu_count", None)  # Python 3.13+
    if count is not None:
        return max(1, count() or 1)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def worker_count(value: str) -> int:
    """``--workers``: a positive number, or ``auto`` for every available core."""
    if value.strip().lower() == "auto":
        return available_cores()
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(f"--workers {value!r}: use a positive number or auto")
    return count


def check_workers(settings: Settings, workers: int) -> None:
    """Refuse settings several workers cannot share."""
    if workers > 1 and settings.broker.startswith("memory:"):
        raise ConfigError(
            f"--workers {workers} needs a shared broker: pass --broker redis://HOST:PORT or "
            "nats://HOST:PORT (memory:// cannot carry pushes between processes)"
        )
    if workers > 1 and settings.database.rstrip("/").endswith(":memory:"):
        raise ConfigError(f"--workers {workers} needs a database file, not :memory:")


# --- open files ----------------------------------------------------------------------------------


def ensure_open_files(max_connections: int) -> None:
    """Raise the soft open-file limit toward what ``max_connections`` needs; warn if short."""
    needed = max_connections + SPARE_FILES
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    if soft < needed:
        log.warning(
            "open-file limit %d (hard limit %s) is below the %d that --max-connections %d "
            "needs: connections beyond about %d will fail; raise `ulimit -n` (see docs/deploy.md)",
            soft,
            "unlimited" if hard == resource.RLIM_INFINITY else hard,
            needed,
            max_connections,
            max(0, soft - SPARE_FILES),
        )


# --- the port ------------------------------------------------------------------------------------


def reserve_port(host: str, port: int) -> list[socket.socket]:
    """Bind (never listen on) ``host:port`` with SO_REUSEPORT; ``port`` 0 picks a free one.

    The sockets are kept open so the port stays this deployment's while workers come and go;
    not listening, they never receive a connection.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[Any, ...]] = set()
    try:
        for family, kind, proto, _name, address in infos:
            if (family, address[0]) in seen:
                continue
            seen.add((family, address[0]))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address[0], port, *address[2:]))
            port = sock.getsockname()[1]
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sockets


# --- what the parent tells a worker --------------------------------------------------------------


@dataclass(frozen=True)
class WorkerConfig:
    settings: Settings
    secret: bytes | None
    index: int

    def to_line(self) -> bytes:
        data = {
            "settings": dataclasses.asdict(self.settings),
            "secret": None if self.secret is None else self.secret.hex(),
            "index": self.index,
        }
        return json.dumps(data).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> WorkerConfig:
        data = json.loads(line)
        fields = data["settings"]
        for name in LISTS:
            fields[name] = tuple(fields[name])
        secret = data["secret"]
        return cls(
            Settings(**fields), None if secret is None else bytes.fromhex(secret), data["index"]
        )


def read_worker_config(stdin: IO[bytes]) -> WorkerConfig:
    line = stdin.readline()
    if not line:
        raise ConfigError("--worker-of: no settings on stdin (started by `serve --workers`)")
    return WorkerConfig.from_line(line)


def watch_parent(stdin: IO[bytes], parent: int) -> None:
    """In a worker: drain (as on SIGTERM) when the parent's end of stdin closes."""

    fd = stdin.fileno()

    def wait() -> None:
        # os.read, not the buffered reader: a daemon thread blocked inside a buffered read
        # holds its lock, and the interpreter aborts when it finds it held at exit.
        with contextlib.suppress(OSError):
            while os.read(fd, 4096):
                pass
        log.warning("supervisor (pid %d) went away: shutting down", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="appchat-parent-watch", daemon=True).start()


def announce_ready(stdout: IO[str]) -> None:
    """In a worker: tell the parent this worker listens."""
    stdout.write(f"ready {os.getpid()}\n")
    stdout.flush()


# --- the parent ----------------------------------------------------------------------------------


class WorkerFailed(Exception):
    """A worker exited before it was ready."""

    def __init__(self, index: int, code: int) -> None:
        super().__init__(f"worker {index} exited with {describe_exit(code)} while starting")
        self.code = code


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"code {code}"


class Worker:
    """One slot: the process currently filling it, started again when it dies."""

    def __init__(self, index: int, config: WorkerConfig) -> None:
        self.index = index
        self.config = config
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    async def start(self) -> None:
        """Start the process and wait until it listens; ``WorkerFailed`` if it dies first."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",  # safe path: not the working directory's modules (a uvloop.py there)
            "-m",
            "appchat",
            "serve",
            "--worker-of",
            str(os.getpid()),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,
        )
        self.started_at = time.monotonic()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(self.config.to_line())
        with contextlib.suppress(ConnectionError):
            await self.proc.stdin.drain()
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while line := await self.proc.stdout.readline():
                    if line.startswith(b"ready "):
                        break
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()
                else:
                    raise WorkerFailed(self.index, await self.proc.wait())
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise WorkerFailed(self.index, -signal.SIGKILL) from None
        log.info("worker %d (pid %d) started", self.index, self.proc.pid)

    async def wait(self) -> int:
        assert self.proc is not None and self.proc.stdout is not None
        # Pass on anything else it prints, then its exit code.
        while line := await self.proc.stdout.readline():
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
        return await self.proc.wait()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        secret: bytes | None,
        workers: int,
        *,
        announce: Callable[[int], None],
    ) -> None:
        self.settings = settings
        self.secret = secret
        self.count = workers
        self.announce = announce
        self.workers: list[Worker] = []
        self._failures = 0

    def run(self, signals: Signals) -> int:
        """Reserve the port, start the workers, keep them running until a signal; exit code."""
        reserved = reserve_port(self.settings.host, self.settings.port)
        port = reserved[0].getsockname()[1]
        settings = dataclasses.replace(self.settings, port=port)
        self.workers = [
            Worker(i, WorkerConfig(settings, self.secret, i)) for i in range(1, self.count + 1)
        ]
        try:
            return asyncio.run(self._run(signals, port))
        finally:
            for sock in reserved:
                sock.close()

    async def _run(self, signals: Signals, port: int) -> int:
        stop = asyncio.Event()
        signals.attach(stop)
        starting: asyncio.Future[list[Any]] = asyncio.gather(
            *(w.start() for w in self.workers), return_exceptions=True
        )
        stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # a signal while starting
            return await self._drain(starting)
        stopped.cancel()
        failures = [r for r in starting.result() if isinstance(r, BaseException)]
        if failures:
            for failure in failures:
                log.error("%s", failure)
            await self._drain(None)
            return 1
        self.announce(port)
        watchers = {asyncio.create_task(self._keep(w)) for w in self.workers}
        await stop.wait()
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        return await self._drain(None)

    async def _keep(self, worker: Worker) -> None:
        """Start ``worker`` again whenever it dies, waiting longer while deaths repeat."""
        while True:
            code = await worker.wait()
            if time.monotonic() - worker.started_at >= HEALTHY_AFTER:
                self._failures = 0
            delay = min(RESTART_DELAY_MAX, RESTART_DELAY * 2**self._failures)
            self._failures += 1
            log.warning(
                "worker %d (pid %d) exited with %s; starting a new one in %.1f s",
                worker.index,
                worker.pid,
                describe_exit(code),
                delay,
            )
            worker.proc = None
            await asyncio.sleep(delay)
            with contextlib.suppress(WorkerFailed):  # the next turn logs how it ended
                await worker.start()

    async def _drain(self, starting: asyncio.Future[Any] | None) -> int:
        """SIGTERM to every worker; wait; kill what is left. 0 when all exited 0."""
        log.info("stopping %d worker(s)", sum(w.proc is not None for w in self.workers))
        for w in self.workers:
            w.signal(signal.SIGTERM)
        if starting is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(starting, DRAIN_TIMEOUT)
            for w in self.workers:  # started meanwhile
                w.signal(signal.SIGTERM)
        codes = await asyncio.gather(*(self._reap(w) for w in self.workers))
        return 0 if all(code == 0 for code in codes) else 1

    async def _reap(self, worker: Worker) -> int:
        if worker.proc is None:
            return 0
        try:
            code = await asyncio.wait_for(worker.wait(), DRAIN_TIMEOUT)
        except TimeoutError:
            log.error("worker %d (pid %d) did not stop: killed", worker.index, worker.pid)
            worker.signal(signal.SIGKILL)
            await worker.proc.wait()
            return 1
        if code != 0:
            log.warning(
                "worker %d (pid %d) exited with %s", worker.index, worker.pid, describe_exit(code)
            )
        return code
