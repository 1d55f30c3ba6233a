"""Test support: real servers (in a child process or in this one), real WebSocket clients,
tokens."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import itertools
import json
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import jwt
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from appchat.app import cli
from appchat.app.node import Node
from appchat.app.supervisor import worker_count
from appchat.auth.tokens import mint

T = TypeVar("T")

SECRET = "test-secret-" + "0123456789abcdef" * 4
# The wire shapes SPEC fixes: RFC 3339 UTC with microseconds; the objects' field names.
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
SEED_CONVERSATION_KEYS = {"id", "session_channel", "application_id", "create_at", "update_at"}
# SPEC, third round: the desk's fields beside the seed's (rev: a conversation's revision)
CONVERSATION_KEYS = SEED_CONVERSATION_KEYS | {
    "status",
    "assignee_id",
    "snooze_until",
    "last_message",
    "rev",
}
SEED_MESSAGE_KEYS = {
    "id",
    "session_channel",
    "content",
    "sender_id",
    "status",
    "create_at",
    "update_at",
    "content_type",
}
# SPEC, third round: a message's revision beside the seed's keys (``private``, ``edited_at``
# and ``deleted`` only when set)
MESSAGE_KEYS = SEED_MESSAGE_KEYS | {"rev"}
LISTENING = re.compile(r"listening on (wss?)://([^:/]+):(\d+)/ws")


def token(
    *,
    admin_id: int | None = None,
    request_id: int | None = None,
    sid: int | None = None,
    ttl: float = 3600,
    secret: str = SECRET,
    name: str | None = None,
) -> str:
    return mint(
        secret.encode(), admin_id=admin_id, request_id=request_id, sid=sid, ttl=ttl, name=name
    )


def raw_token(payload: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(payload, secret, algorithm=algorithm)


class _Serve:
    """What both kinds of test server share: ``appchat serve``'s command line, its
    announcement (``lines``), and the URLs of the port it chose."""

    def __init__(
        self,
        database: Path | str,
        *args: str,
        env: dict[str, str] | None = None,
        secret: str | None = SECRET,
    ) -> None:
        self.database = database if isinstance(database, str) else f"sqlite:///{database}"
        self.args = args
        self.env = {**os.environ, **(env or {})}
        if secret is not None:
            self.env["APPCHAT_JWT_SECRET"] = secret
        self.port = 0
        self.scheme = "ws"
        self.lines: list[str] = []

    def command(self) -> list[str]:
        """``appchat``'s arguments: serve on a port of its own choosing."""
        return ["serve", "--port", "0", "--database", self.database, *self.args]

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def url(self, sid: int | str | None = None, path: str = "/ws") -> str:
        query = "" if sid is None else f"?sid={sid}"
        return f"{self.scheme}://127.0.0.1:{self.port}{path}{query}"

    def http(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class ServerProcess(_Serve):
    """``appchat serve`` in a child process, on a port of its own choosing."""

    proc: subprocess.Popen[str] | None = None
    cwd: Path | None = None  # the working directory it starts in (default: the tests')

    def command(self) -> list[str]:
        return [sys.executable, "-m", "appchat", *super().command()]

    def start(self, timeout: float = 20) -> ServerProcess:
        self.lines = []
        self._listening = threading.Event()
        self.proc = subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,  # its own process group: stop() can reach its children
        )
        self._pump_thread = threading.Thread(target=self._pump, args=(self.proc,), daemon=True)
        self._pump_thread.start()
        if not self._listening.wait(timeout):
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))
        return self

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line)
            m = LISTENING.search(line)
            if m:
                self.scheme, self.port = m.group(1), int(m.group(3))
                self._listening.set()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._pump_thread.join(5)
        if self._pump_thread.is_alive():
            # A child of the server (a worker) outlived it and holds the output pipe open:
            # end the whole group, or the pump (and closing its pipe) would wait forever.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self._pump_thread.join(5)
        if self.proc.stdout is not None and not self._pump_thread.is_alive():
            self.proc.stdout.close()
        self.proc = None
        return code


class InProcessServer(_Serve):
    """``appchat serve`` in this process: the same command line (parsed by the CLI's own
    parser and checks), one ``Node`` on an event loop of its own in a daemon thread, listening
    on a real socket on a port of its own choosing.

    What it does not have is what only a process has: signals, an exit code, a log on stdout,
    ``--workers``. Tests of those use ``ServerProcess``. ``lines`` holds what ``serve`` would
    announce (the ``--dev`` tokens and the "listening on" line).
    """

    def __init__(
        self,
        database: Path | str,
        *args: str,
        env: dict[str, str] | None = None,
        secret: str | None = SECRET,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(database, *args, env=env, secret=secret)
        self.clock, self.monotonic = clock, monotonic  # the Node's (see Node.__init__)
        self.node: Node | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failed: list[BaseException] = []

    def start(self, timeout: float = 20) -> InProcessServer:
        ns = cli.build_parser(self.env).parse_args(self.command())
        settings = cli.checked_settings(ns)
        if worker_count(ns.workers) != 1:
            raise ValueError("--workers needs processes: use ServerProcess")
        secret = cli.serve_secret(settings)
        node = Node(settings, secret, clock=self.clock, monotonic=self.monotonic)
        started = threading.Event()
        failed: list[BaseException] = []

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                await node.start()
            except BaseException as exc:
                failed.append(exc)
                await node.stop()
                raise
            finally:
                started.set()
            await self._stop.wait()
            await node.stop()

        def run() -> None:
            try:
                with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                    runner.run(serve())
            except BaseException as exc:  # handed to start() or stop(), in the test's thread
                if not failed:
                    failed.append(exc)

        self.node, self._failed = node, failed
        self._thread = threading.Thread(target=run, name="appchat-in-process", daemon=True)
        self._thread.start()
        if not started.wait(timeout) or failed:
            self._thread.join(timeout)
            self.node = self._thread = None
            raise RuntimeError("server did not start") from (failed[0] if failed else None)
        self.scheme, self.port = node.scheme, node.port
        url = f"{node.scheme}://{settings.host}:{node.port}/ws"
        self.lines = cli.announcement(settings, secret, url).splitlines(keepends=True)
        return self

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 20) -> T:
        """Run ``coro`` on the server's own event loop (from the test's thread)."""
        assert self._loop is not None, "the server is not running"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, *, timeout: float = 20) -> int:
        """What SIGTERM does to ``serve``: close every WebSocket with 1001, drain, close."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None or loop is None or stop is None:
            return 0
        with contextlib.suppress(RuntimeError):  # the loop closed already
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("the in-process server did not stop")
        self.node = self._thread = self._loop = self._stop = None
        if self._failed:
            raise RuntimeError("the in-process server failed") from self._failed[0]
        return 0


class Clock:
    """A clock the test moves on: ``now`` (time.time, time.monotonic) plus what
    ``advance`` added. For a server's clocks (``InProcessServer(clock=..., monotonic=...)``)."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self._offset = 0.0

    def __call__(self) -> float:
        return self._now() + self._offset

    def advance(self, seconds: float) -> None:
        self._offset += seconds


def _loop_factory() -> Any:
    """The event loop ``serve`` runs on: uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


Server: TypeAlias = ServerProcess | InProcessServer


def module_server(*args: str, process: bool = False) -> Any:
    """A module-scoped fixture: one ``appchat serve`` with ``args`` for the module's tests, on
    a fresh SQLite file; in a child process with ``process`` (tests that read its log, send
    it signals or read its memory), else in this one."""

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
        db = tmp_path_factory.mktemp("db") / "appchat.db"
        srv = (ServerProcess if process else InProcessServer)(db, *args).start()
        yield srv
        srv.stop()

    return fixture


class Client:
    """A WebSocket client that pairs replies with requests by ``id`` and keeps pushes aside."""

    _ids = itertools.count(1)

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.pushes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._waiting: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._unmatched: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            await self._read_frames()
        finally:
            for fut in self._waiting.values():  # no reply will come on a closed connection
                if not fut.done():
                    fut.set_exception(ConnectionError("connection closed"))
            self._waiting.clear()

    async def _read_frames(self) -> None:
        with contextlib.suppress(Exception):
            async for raw in self.ws:
                frame = orjson.loads(raw)
                fut = self._waiting.pop(frame.get("id"), None) if "id" in frame else None
                if fut is not None and not fut.done():
                    fut.set_result(frame)
                elif "error" in frame or "id" in frame:
                    self._unmatched.put_nowait(frame)
                else:
                    self.pushes.put_nowait(frame)

    async def call(self, name: str, args: Any = None, *, timeout: float = 10) -> dict[str, Any]:
        """Send ``name`` with ``args`` double-encoded as the original does; await its reply."""
        request_id = f"r{next(self._ids)}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = fut
        frame: dict[str, Any] = {"name": name, "id": request_id}
        if args is not None:
            frame["args"] = json.dumps(args)  # stdlib json: it can write any integer
        try:
            await self.ws.send(json.dumps(frame))
        except BaseException:  # the caller sees the send's failure; nobody awaits the reply
            self._waiting.pop(request_id, None)
            if fut.done():  # the reader ended meanwhile and failed it: counted as seen
                fut.exception()
            else:
                fut.cancel()
            raise
        return await asyncio.wait_for(fut, timeout)

    async def ok(self, name: str, args: Any = None) -> Any:
        reply = await self.call(name, args)
        assert reply["ok"] is True, reply
        assert reply["name"] == name
        return reply["result"]

    async def error(self, name: str, args: Any = None) -> str:
        reply = await self.call(name, args)
        assert reply["ok"] is False, reply
        assert reply["result"] is None
        assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
        code: str = reply["error"]["code"]
        return code

    async def send_raw(self, data: str | bytes, *, text: bool | None = None) -> None:
        await self.ws.send(data, text=text)

    async def unmatched(self, timeout: float = 5) -> dict[str, Any]:
        """The next reply that carried no id of ours (replies to raw frames)."""
        return await asyncio.wait_for(self._unmatched.get(), timeout)

    async def push(self, name: str | None = None, timeout: float = 5) -> dict[str, Any]:
        frame = await asyncio.wait_for(self.pushes.get(), timeout)
        if name is not None:
            assert frame["name"] == name, frame
        assert frame["ok"] is True and "id" not in frame
        return frame

    async def desk_push(self, name: str, timeout: float = 5) -> dict[str, Any]:
        """The next push named ``name``, passing over Event.ReceivePresence (an inbox
        subscriber hears every staff member come and go)."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.push()
                if frame["name"] != "Event.ReceivePresence":
                    assert frame["name"] == name, frame
                    return frame

    async def no_push(self, within: float = 0.3) -> None:
        await asyncio.sleep(within)
        assert self.pushes.empty(), f"unexpected push: {self.pushes.get_nowait()}"

    async def close_code(self, timeout: float = 10) -> int | None:
        """Wait for the server to close the connection; the code it sent."""
        await asyncio.wait_for(self.ws.wait_closed(), timeout)
        return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def subprotocols(tok: str | None, *more: str) -> list[Subprotocol]:
    """What a client offers: ``access_token`` and the token (``None``: no token)."""
    offered = ["access_token"] if tok is None else ["access_token", tok]
    return [Subprotocol(p) for p in [*offered, *more]]


@contextlib.asynccontextmanager
async def client(server: Server, sid: int, tok: str, **kwargs: Any) -> AsyncIterator[Client]:
    ws = await connect(server.url(sid), subprotocols=subprotocols(tok), **kwargs)
    c = Client(ws)
    try:
        yield c
    finally:
        await c.close()


async def status(srv: Server, sid: int, tok: str, **kwargs: Any) -> int:
    """The handshake's HTTP status: 101 when the connection was made and served a request.
    ``kwargs`` go to the client (``local_addr=("127.0.0.N", 0)``: connect from 127.0.0.N)."""
    try:
        async with client(srv, sid, tok, **kwargs) as c:
            await c.ok("Event.GetUnreadInfo", {})
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def staff(server: Server, admin_id: int = 1) -> AbstractAsyncContextManager[Client]:
    """A client of staff member ``admin_id`` (a token naming the admin, sid = admin_id)."""
    return client(server, admin_id, token(admin_id=admin_id))


def customer(server: Server, app: int, sid: int) -> AbstractAsyncContextManager[Client]:
    """A client of the customer of application ``app``, participant ``sid``."""
    return client(server, sid, token(request_id=app, sid=sid))


# Waiting for state another process keeps, that sends no event to wait on: the tests' one
# helper, with a face for coroutines (``eventually``) and one for code that runs outside an
# event loop (``wait_until``: fixtures starting a process). Both raise AssertionError
# naming ``what`` when ``check`` does not hold within ``timeout`` seconds.


async def eventually(
    check: Callable[[], bool | Awaitable[bool]],
    timeout: float = 30,
    interval: float = 0.05,
    what: str = "condition",
) -> None:
    """Poll ``check`` (a function or a coroutine function) until it holds."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                done = check()
                if inspect.isawaitable(done):
                    done = await done
                if done:
                    return
                await asyncio.sleep(interval)
    except TimeoutError:
        raise AssertionError(f"{what} not reached within {timeout:g} s") from None


def wait_until(
    check: Callable[[], bool], timeout: float = 10, interval: float = 0.05, what: str = "condition"
) -> None:
    """``eventually`` for code outside an event loop: blocks this thread while it polls."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:g} s")
        time.sleep(interval)


class TcpProxy:
    """A TCP proxy on loopback whose plug the test can pull (and put back, same port)."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Refuse new connections and cut every open one."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


# The server's log (a ServerProcess's output). Tests that read it connect from addresses of
# their own (127.0.0.N): the server's budget of log lines is per remote address.


def lines_with(srv: Server, *parts: str) -> list[str]:
    return [line for line in list(srv.lines) if all(p in line for p in parts)]


def logged(srv: Server, *parts: str, timeout: float = 10) -> str:
    """The first log line holding every part (waits for the output pipe)."""
    wait_until(lambda: bool(lines_with(srv, *parts)), timeout)
    return lines_with(srv, *parts)[0]


def closed_lines(caplog: pytest.LogCaptureFixture, sid: int) -> list[str]:
    """The connection log's "closed" lines of participant ``sid`` (a server in this
    process, its ``appchat.connections`` records captured at INFO)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "appchat.connections" and f" closed: sid {sid} " in r.getMessage()
    ]


# What the server counts at /metrics.


def metrics_text(srv: Server) -> str:
    with urllib.request.urlopen(srv.http("/metrics"), timeout=10) as r:
        body: bytes = r.read()
    return body.decode()


def metric(srv: Server, name: str) -> float:
    for line in metrics_text(srv).splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def connections(srv: Server) -> int:
    return int(metric(srv, "appchat_connections"))


def rss_mb(srv: ServerProcess, field: str = "VmRSS") -> float:
    """The server process's memory in MB: resident now (VmRSS), or at its peak (VmHWM)."""
    assert srv.proc is not None
    for line in Path(f"/proc/{srv.proc.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


# Clients no client library would be: raw sockets.


async def open_raw(srv: Server, source: str) -> tuple[asyncio.StreamReader, Any]:
    """A plain TCP connection to the server from ``source`` (an address 127.0.0.N)."""
    return await asyncio.open_connection("127.0.0.1", srv.port, local_addr=(source, 0))


_RAW_SOCKETS: list[socket.socket] = []  # every RawSocket's socket, closed after each test


def close_raw_sockets() -> None:
    """Close what a test's RawSockets left open (conftest calls it after every test)."""
    while _RAW_SOCKETS:
        _RAW_SOCKETS.pop().close()


class RawSocket:
    """A WebSocket client on a plain socket: it writes frames and reads only when told.

    The attackers speak WebSocket over it: they choose their receive buffer, never read,
    and end with a TCP reset, as no polite client library would.
    """

    def __init__(self, srv: Server, sid: int, tok: str, *, rcvbuf: int = 4096) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        _RAW_SOCKETS.append(self.sock)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", srv.port))
        self.sock.sendall(self.handshake(sid, tok))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            head += chunk
        self.status = int(head.split(b" ", 2)[1])

    @staticmethod
    def handshake(sid: int, tok: str) -> bytes:
        """The upgrade request of participant ``sid`` with ``tok``."""
        key = base64.b64encode(os.urandom(16)).decode()
        return (
            f"GET /ws?sid={sid} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: access_token, {tok}\r\n\r\n"
        ).encode()

    @staticmethod
    def frame(payload: bytes, opcode: int = 0x1) -> bytes:
        """A client frame, masked with the key 0 (legal, and the payload stays as is)."""
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        return head + b"\0\0\0\0" + payload

    def request(self, name: str, args: dict[str, object], request_id: str) -> bytes:
        doc = {"name": name, "id": request_id, "args": json.dumps(args)}
        return self.frame(json.dumps(doc).encode())

    def pipeline(self, data: bytes, *, until_blocked: float = 1.0, most: int = 10_000) -> int:
        """Send ``data`` again and again until the server stops taking it; how many went."""
        self.sock.settimeout(until_blocked)
        sent = 0
        try:
            for _ in range(most):
                self.sock.sendall(data)
                sent += 1
        except TimeoutError:
            pass
        return sent

    def reset(self) -> None:
        """End with a TCP reset (SO_LINGER 0), whatever is still buffered."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def run_checked(command: list[str], timeout: float = 280) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (a bench script, ``make bench``) from the project folder, unbuffered;
    a non-zero exit fails the test with the end of its output."""
    out = subprocess.run(
        command,
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def new_api_key() -> str:
    """A fresh API key. Never with a leading "-": given as `--api-key KEY`, argparse
    would take it for an option (token_urlsafe starts with one once in 64 keys; it failed
    a run of the suite)."""
    return "k" + secrets.token_urlsafe(32)
