"""The command line: ``appchat serve | token | migrate | backup | restore``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from .. import __version__
from ..auth.tokens import IdRanges, mint
from ..common.logformat import FORMATS, configure_logging
from ..protocol.errors import AppError, ConfigError
from ..store import apply_migrations, redact_url
from . import backup as backups
from .config import (
    OPTIONS,
    Settings,
    add_flags,
    add_options,
    check_database,
    check_limits,
    settings_from,
)
from .credentials import resolve_secret
from .node import Node
from .supervisor import (
    Supervisor,
    announce_ready,
    check_workers,
    ensure_open_files,
    read_worker_config,
    watch_parent,
    worker_count,
)

SERVE_OPTIONS = list(OPTIONS)
log = logging.getLogger("appchat")

TOKEN_OPTIONS = ["database", "jwt_secret", "jwt_secret_file"]


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appchat", description="WebSocket chat server")
    parser.add_argument("--version", action="version", version=f"appchat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    # A short usage line: an error shows it and one line of its own, not every option.
    serve = sub.add_parser("serve", help="run the server", usage="%(prog)s [options]")
    add_options(serve, SERVE_OPTIONS, env)
    add_flags(serve, ["dev", "trust_query_sid"], env)
    serve.add_argument(
        "--workers",
        default=env.get("APPCHAT_WORKERS", "1"),
        help="processes serving the port (SO_REUSEPORT), each a full node; auto: one per "
        "core; more than 1 needs a shared --broker [default: %(default)s; env APPCHAT_WORKERS]",
    )
    serve.add_argument("--worker-of", type=int, help=argparse.SUPPRESS)

    token = sub.add_parser("token", help="print a signed token for trying the server out")
    who = token.add_mutually_exclusive_group(required=True)
    who.add_argument("--admin-id", type=int, help="a staff token")
    who.add_argument("--request-id", type=int, help="a customer token for this application")
    token.add_argument("--sid", type=int, help="the participant id the token names")
    token.add_argument("--ttl", type=float, default=3600, help="lifetime in seconds [3600]")
    add_options(token, TOKEN_OPTIONS, env)

    migrate = sub.add_parser("migrate", help="apply pending schema migrations and exit")
    add_options(migrate, ["database"], env)

    backup = sub.add_parser(
        "backup",
        help="copy the SQLite database to PATH, safely while the server runs (PostgreSQL: pg_dump)",
    )
    backup.add_argument("path", metavar="PATH", help="the backup file (replaced if it exists)")
    add_options(backup, ["database"], env)

    restore = sub.add_parser(
        "restore",
        help="replace the SQLite database with the backup PATH; every server using it must "
        "be stopped (PostgreSQL: pg_restore)",
    )
    restore.add_argument("path", metavar="PATH", help="a file written by appchat backup")
    add_options(restore, ["database"], env)
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, but an unknown option is reported by the command's own parser
    (its usage, and the option it was probably meant to be), not the top level's."""
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        command = _subcommands(parser)[ns.command]
        hint = ""
        if unknown[0].startswith("--"):
            known = [o for a in command._actions for o in a.option_strings if o.startswith("--")]
            close = difflib.get_close_matches(unknown[0].split("=", 1)[0], known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
        command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return ns


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        ns = parse(build_parser(os.environ), argv)
        if ns.command == "serve":
            return serve(ns)
        if ns.command == "token":
            return token(ns)
        if ns.command == "backup":
            return backup(ns)
        if ns.command == "restore":
            return restore(ns)
        return migrate(ns)
    except ConfigError as exc:
        print(f"appchat: {exc}", file=sys.stderr)
        return 2
    except AppError as exc:
        print(f"appchat: cannot start: {exc.message}", file=sys.stderr)
        return 1


def token(ns: argparse.Namespace) -> int:
    check_database(ns.database)
    secret = resolve_secret(settings_from(ns), use_dev_file=True)
    print(mint(secret, admin_id=ns.admin_id, request_id=ns.request_id, sid=ns.sid, ttl=ns.ttl))
    return 0


def migrate(ns: argparse.Namespace) -> int:
    check_database(ns.database)
    applied = apply_migrations(ns.database)
    print(f"appchat: applied {applied} migration(s); {redact_url(ns.database)} is up to date")
    return 0


def backup(ns: argparse.Namespace) -> int:
    check_database(ns.database)
    copied = backups.backup(ns.database, Path(ns.path))
    print(
        f"appchat: backed up {redact_url(ns.database)} to {copied.path} "
        f"({copied.size} bytes, {copied.messages} messages, integrity ok)"
    )
    return 0


def restore(ns: argparse.Namespace) -> int:
    check_database(ns.database)
    copied, kept = backups.restore(Path(ns.path), ns.database)
    print(
        f"appchat: restored {copied.path} from {ns.path} ({copied.messages} messages, integrity ok)"
    )
    if kept is not None:
        print(f"appchat: the database it replaced is kept as {kept}")
    return 0


def serve(ns: argparse.Namespace) -> int:
    if ns.worker_of is not None:
        return serve_worker(ns.worker_of)
    settings = checked_settings(ns)
    workers = worker_count(ns.workers)
    check_workers(settings, workers)
    _configure_logging(settings)
    secret = serve_secret(settings)
    node = Node(settings, secret)  # checks the secret before anything listens
    if workers > 1:
        apply_migrations(settings.database)  # once, before any worker opens the database

        def announce(port: int) -> None:
            _announce(settings, secret, f"{node.scheme}://{settings.host}:{port}/ws")

        supervisor = Supervisor(settings, secret, workers, announce=announce)
        return supervisor.run(ShutdownSignals())
    ensure_open_files(settings.max_connections)
    _use_uvloop()
    signals = ShutdownSignals()
    asyncio.run(_serve(node, secret, signals))
    return 0


def checked_settings(ns: argparse.Namespace) -> Settings:
    """The settings of ``serve``, refused (ConfigError) where they cannot work together."""
    settings = settings_from(ns)
    check_database(settings.database)
    if settings.dev and settings.host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError("--dev listens on loopback only; drop --host or --dev")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    check_limits(settings)
    if settings.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"--log-level {settings.log_level!r}: use DEBUG, INFO, WARNING or ERROR")
    if settings.log_format not in FORMATS:
        raise ConfigError(f"--log-format {settings.log_format!r}: use text or json")
    return settings


def serve_secret(settings: Settings) -> bytes | None:
    """The HS256 secret ``serve`` verifies tokens with (``--dev`` makes one beside the
    database); ``None`` when public keys alone verify them."""
    try:
        return resolve_secret(settings, use_dev_file=settings.dev, create_dev_file=settings.dev)
    except ConfigError:
        if not settings.jwt_public_key:
            raise
        return None


def serve_worker(parent: int) -> int:
    """One of the processes of ``serve --workers``: its settings arrive on stdin."""
    signals = ShutdownSignals()  # SIGTERM stays blocked (inherited) until this thread takes it
    config = read_worker_config(sys.stdin.buffer)
    _configure_logging(config.settings)
    watch_parent(sys.stdin.buffer, parent)
    ensure_open_files(config.settings.max_connections)
    node = Node(config.settings, config.secret, worker=config.index)
    _use_uvloop()
    asyncio.run(_serve(node, config.secret, signals, worker=True))
    return 0


def _configure_logging(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format)


def _use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class ShutdownSignals:
    """SIGTERM and SIGINT, taken by one thread with ``sigwait`` instead of a handler.

    Both are blocked in every thread before any thread starts, so no signal ever meets its
    default action: the first asks for shutdown, later ones (an impatient supervisor, a
    second Ctrl-C) are logged and ignored, even after the event loop has closed. A handler
    installed by the loop would be reset to the default when the loop closes, and a second
    SIGTERM landing in that window killed the process while it was exiting cleanly.
    """

    SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})

    def __init__(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._received = 0
        threading.Thread(target=self._wait, name="appchat-signals", daemon=True).start()

    def attach(self, stop: asyncio.Event) -> None:
        """Set ``stop`` (from the running loop) on the first signal."""
        self._loop = asyncio.get_running_loop()
        self._stop = stop
        if self._received:
            stop.set()

    def _wait(self) -> None:
        while True:
            sig = signal.sigwait(self.SIGNALS)
            self._received += 1
            if self._received > 1:
                log.info("%s while shutting down: ignored", signal.Signals(sig).name)
                continue
            loop, stop = self._loop, self._stop
            if loop is not None and stop is not None:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(stop.set)


async def _serve(
    node: Node, secret: bytes | None, signals: ShutdownSignals, *, worker: bool = False
) -> None:
    stop = asyncio.Event()
    signals.attach(stop)
    try:
        await node.start()
    except OSError as exc:
        await node.stop()
        raise ConfigError(
            f"cannot listen on {node.settings.host}:{node.settings.port}: {exc.strerror or exc}"
        ) from exc
    # What was made to start up lives as long as the process: keep it out of the
    # collector's way.
    gc.freeze()
    if worker:
        announce_ready(sys.stdout)
    else:
        _announce(node.settings, secret, f"{node.scheme}://{node.settings.host}:{node.port}/ws")
    await stop.wait()
    log.info("shutting down")
    await node.stop()


def _announce(settings: Settings, secret: bytes | None, url: str) -> None:
    print(announcement(settings, secret, url), flush=True)


def announcement(settings: Settings, secret: bytes | None, url: str) -> str:
    """What ``serve`` prints once it listens on ``url``: with ``--dev``, tokens to try it;
    then whether the server API and webhooks are on."""
    listening = f"appchat {__version__} listening on {url}\n" + _surfaces(settings, url)
    if settings.dev and secret is not None:
        return _dev_tokens(secret, url) + "\n" + listening
    return listening


def _surfaces(settings: Settings, url: str) -> str:
    """Two lines: the server API and the webhooks, on (where) or off (what turns them on).
    Each starts with ``appchat `` like the line before: text, even among JSON log lines."""
    if settings.api_key or settings.api_keys_file:
        api = f"on at {_http_base(url)}/api/ (OpenAPI: {_http_base(url)}/api/openapi.json)"
        if settings.api_sender_ids:
            api += f", posting only as {IdRanges.parse(settings.api_sender_ids)}"
    else:
        api = "off (turn it on with --api-keys-file or --api-key)"
    hooks = settings.webhook_url
    if hooks:
        # Hosts only: a receiver's path or query may hold its token.
        where = ", ".join(sorted({urlsplit(u).hostname or "?" for u in hooks}))
        webhooks = f"on, to {len(hooks)} URL{'s' if len(hooks) > 1 else ''} ({where})"
    else:
        webhooks = "off (turn them on with --webhook-url)"
    return f"appchat server API: {api}\nappchat webhooks: {webhooks}"


def _http_base(url: str) -> str:
    """``ws://host:port/ws`` -> ``http://host:port`` (``wss`` -> ``https``)."""
    return url.replace("ws", "http", 1).removesuffix("/ws")


def _dev_tokens(secret: bytes, url: str) -> str:
    staff = mint(secret, admin_id=1, ttl=86400)
    customer = mint(secret, request_id=100, sid=2, ttl=86400)
    web = _http_base(url) + "/"
    return (
        f"\n--dev: open the web client at {web} and join with one click\n"
        "\n--dev: tokens valid for 24 hours (more with `appchat token`):\n"
        f"  staff 1:                      {staff}\n"
        f"    connect: {url}?sid=1  subprotocols ['access_token', '<token>']\n"
        f"  customer 2 of application 100: {customer}\n"
        f"    connect: {url}?sid=2  subprotocols ['access_token', '<token>']\n"
        '    join: Event.AddConversation {"application_id": 100} (pushes start once joined)\n'
    )


if __name__ == "__main__":
    sys.exit(main())
