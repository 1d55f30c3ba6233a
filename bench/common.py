"""What the benchmark scripts in this folder share: the server process, a percentile, and so on.

The scripts run as ``.venv/bin/python bench/suite.py`` (or ``bench/soak.py`` …), so this folder
is on ``sys.path`` and they import this module as ``common``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

LISTENING = re.compile(r"listening on (wss?)://([^:/\s]+):(\d+)/")
TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """User plus system CPU seconds of any process of this machine (0 if unreadable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


def source_version() -> str:
    """appchat's version and the git commit of this checkout (``-dirty``: edited files)."""
    from appchat import __version__

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(
            ["git", "-C", root, "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return f"appchat {__version__}, commit {commit}"


def setup_signals_and_loop() -> str:
    """SIGTERM ends the script like Ctrl-C; use uvloop if installed. Returns the loop's name."""

    def terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    loop_name = "asyncio"
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        loop_name = f"uvloop {uvloop.__version__}"  # type: ignore[attr-defined]  # set, not exported
    except ImportError:
        pass
    return loop_name


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``, sorted or not; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# --- server processes ---------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the benchmark dies, so no server outlives it."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    """One ``appchat serve --port 0 --rate 0`` child process; its output is kept and scanned.

    ``args`` are further ``serve`` options; ``secret`` is the JWT secret the server checks
    tokens with; ``name`` labels the process in messages; ``stop_timeout`` is how long
    ``stop()`` waits after SIGTERM, unless told otherwise, before it kills the process;
    ``command`` replaces the whole command line (a reference server, or one under taskset).
    """

    def __init__(
        self,
        args: list[str],
        secret: str,
        *,
        name: str = "the server",
        stop_timeout: float = 20.0,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.stop_timeout = stop_timeout
        self.cmd = command or [
            *[sys.executable, "-m", "appchat", "serve", "--port", "0", "--rate", "0"],
            *args,
        ]
        self.env = {**os.environ, **(env or {}), "APPCHAT_JWT_SECRET": secret}
        self.proc: subprocess.Popen[str] | None = None
        self.pid = 0
        self.port = 0
        self.lines: collections.deque[str] = collections.deque(maxlen=500)
        self.warnings = 0  # log lines at WARNING or above
        self._listening = threading.Event()
        self._pump: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> Server:
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            preexec_fn=_die_with_parent,  # only calls prctl
        )
        self.pid = self.proc.pid
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()
        if not self._listening.wait(timeout):
            self.stop()
            raise RuntimeError(f"{self.name} did not start:\n" + "".join(self.lines))
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if " WARNING " in line or " ERROR " in line or " CRITICAL " in line:
                self.warnings += 1
            m = LISTENING.search(line)
            if m and not self._listening.is_set():
                self.port = int(m.group(3))
                self._listening.set()

    def url(self, sid: int) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?sid={sid}"

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the server process (all its threads)."""
        return 0.0 if self.proc is None else process_cpu(self.proc.pid)

    def status(self) -> dict[str, float]:
        """VmRSS (MiB) and thread count from /proc/PID/status, open fds from /proc/PID/fd."""
        out = {"rss": math.nan, "threads": math.nan, "fds": math.nan}
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        out["rss"] = int(line.split()[1]) / 1024
                    elif line.startswith("Threads:"):
                        out["threads"] = int(line.split()[1])
            out["fds"] = len(os.listdir(f"/proc/{self.pid}/fd"))
        except (OSError, ValueError):
            pass
        return out

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, wait (``timeout``, else ``stop_timeout``), then SIGKILL; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(self.stop_timeout if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        if self._pump is not None:
            self._pump.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None
        return code


@contextlib.contextmanager
def postgres_database(admin_url: str) -> Iterator[tuple[str, str]]:
    """A fresh, uniquely named database, dropped afterwards; yields its URL and name."""
    import psycopg

    name = f"appchat_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name, name
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
