"""Settings from flags and ``APPCHAT_<NAME>`` environment variables; URLs choose backends."""

from __future__ import annotations

import argparse
import math
import resource
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..auth.tokens import IdRanges
from ..blobs.images import POLICIES as IMAGE_POLICIES
from ..protocol import defaults
from ..protocol.errors import ConfigError
from ..store import redact_url, sqlite_path

# Descriptors a process keeps beside its connections (database, broker, logs, listeners).
RESERVED_FILES = 1000
CONNECTIONS_CAP = 100_000


def default_max_connections() -> int:
    """What one process can hold on this machine: the open-file hard limit less the files
    it needs for everything else (20,000 -> 19,000), at most 100,000."""
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return defaults.MAX_CONNECTIONS
    if hard == resource.RLIM_INFINITY:
        return CONNECTIONS_CAP
    return max(1, min(CONNECTIONS_CAP, max(hard - RESERVED_FILES, hard // 2)))


@dataclass(frozen=True)
class Settings:
    host: str = defaults.HOST
    port: int = defaults.PORT
    database: str = defaults.DATABASE
    broker: str = defaults.BROKER
    jwt_secret: str | None = field(default=None, repr=False)
    jwt_secret_file: str | None = None
    jwt_public_key: tuple[str, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None
    dev: bool = False
    trust_query_sid: bool = False
    max_frame: int = defaults.MAX_FRAME
    max_content: int = defaults.MAX_CONTENT
    send_queue: int = defaults.SEND_QUEUE
    send_buffer: int = defaults.SEND_BUFFER
    heartbeat: float = defaults.HEARTBEAT
    rate: float = defaults.RATE
    burst: float = defaults.BURST
    sqlite_busy_timeout: float = defaults.SQLITE_BUSY_TIMEOUT
    sqlite_synchronous: str = defaults.SQLITE_SYNCHRONOUS
    log_level: str = defaults.LOG_LEVEL
    log_format: str = defaults.LOG_FORMAT
    channel_prefix: str = defaults.CHANNEL_PREFIX
    max_connections: int = field(default_factory=default_max_connections)
    max_connections_per_user: int = defaults.MAX_CONNECTIONS_PER_USER
    allowed_origins: tuple[str, ...] = ()
    handshake_timeout: float = defaults.HANDSHAKE_TIMEOUT
    max_pending_handshakes: int = defaults.MAX_PENDING_HANDSHAKES
    webhook_url: tuple[str, ...] = ()
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_secret_file: str | None = None
    webhook_timeout: float = defaults.WEBHOOK_TIMEOUT
    webhook_retry_min: float = defaults.WEBHOOK_RETRY_MIN
    webhook_retry_max: float = defaults.WEBHOOK_RETRY_MAX
    webhook_give_up: float = defaults.WEBHOOK_GIVE_UP
    notify_after: float = defaults.NOTIFY_AFTER
    max_upload: int = defaults.MAX_UPLOAD
    upload_dir: str | None = None  # None: beside the SQLite file (upload_directory)
    upload_s3: str | None = None
    upload_s3_endpoint: str | None = None
    images: str = defaults.IMAGES
    api_sender_ids: tuple[str, ...] = ()
    api_key: tuple[str, ...] = field(default=(), repr=False)
    api_keys_file: str | None = None
    max_decode_memory: int = defaults.MAX_DECODE_MEMORY
    max_jpeg_scans: int = defaults.MAX_JPEG_SCANS
    max_uploads_per_user: int = defaults.MAX_UPLOADS_PER_USER
    upload_rate: float = defaults.UPLOAD_RATE
    upload_timeout: float = defaults.UPLOAD_TIMEOUT
    presence_grace: float = defaults.PRESENCE_GRACE
    edit_window: float = defaults.EDIT_WINDOW
    retention_days: float = 0
    upload_orphan_ttl: float = 86_400.0
    auto_assign: str = "none"
    max_open_per_agent: int = 0


AUTO_ASSIGN = ("none", "round-robin")

# name -> (type, help); every option also reads APPCHAT_<NAME> from the environment.
OPTIONS: dict[str, tuple[type, str]] = {
    "host": (str, "address to listen on"),
    "port": (int, "port to listen on (0 picks a free one)"),
    "database": (str, "sqlite:///PATH or postgresql://USER@HOST:PORT/DB"),
    "broker": (str, "memory:// (one node), redis://HOST:PORT or nats://HOST:PORT"),
    "jwt_secret": (str, "HS256 secret, at least 32 bytes (shows in ps: prefer the file)"),
    "jwt_secret_file": (str, "file holding the HS256 secret"),
    "jwt_public_key": (
        str,
        "[KID=]PATH of a PEM public key (RSA: RS256, P-256: ES256); repeat for rotation",
    ),
    "tls_cert": (str, "PEM certificate chain: serve wss://"),
    "tls_key": (str, "PEM private key for --tls-cert"),
    "max_frame": (int, "largest incoming frame in bytes (bigger closes with 1009)"),
    "max_content": (int, "longest message content in characters"),
    "send_queue": (int, "frames queued per connection before it is dropped as slow (4008)"),
    "send_buffer": (int, "bytes queued per connection before it is dropped as slow (4008)"),
    "heartbeat": (
        float,
        "seconds of silence before the server pings; no pong within half of it drops "
        "the connection (0: off)",
    ),
    "rate": (float, "events a second per connection before rate_limited (0: no limit)"),
    "burst": (float, "events a connection may send at once above the rate"),
    "sqlite_busy_timeout": (float, "seconds a write waits for a lock held elsewhere"),
    "sqlite_synchronous": (
        str,
        "FULL or EXTRA (an ack survives power loss) or NORMAL (survives a process crash)",
    ),
    "log_level": (str, "DEBUG, INFO, WARNING or ERROR"),
    "log_format": (str, "text, or json: one object per line (time, level, logger, message, …)"),
    "channel_prefix": (str, "prefix of broker channels: nodes that talk share one"),
    "max_connections": (
        int,
        "connections this node (each worker) accepts; more are refused with 503; "
        "the default fits the open-file hard limit (`ulimit -Hn`)",
    ),
    "max_connections_per_user": (
        int,
        "connections one participant may hold on this node; more are refused with 429",
    ),
    "allowed_origins": (str, "browser Origins allowed to connect, repeatable (default: any)"),
    "handshake_timeout": (
        float,
        "seconds a new connection gets to send a complete HTTP request; slower ones are closed",
    ),
    "edit_window": (
        float,
        "seconds after sending during which a message's sender may edit it (0: never)",
    ),
    "retention_days": (
        float,
        "delete messages older than this many days (and uploads only they showed), in small "
        "batches, one node at a time (0: keep everything)",
    ),
    "upload_orphan_ttl": (
        float,
        "seconds an upload may go without a message showing it before it is removed",
    ),
    "auto_assign": (
        str,
        "none, or round-robin: a customer's new or reopened conversation that nobody has goes "
        "to the online staff member with the fewest open conversations",
    ),
    "max_open_per_agent": (
        int,
        "with --auto-assign: an agent with this many open conversations gets no more (0: any)",
    ),
    "presence_grace": (
        float,
        "seconds a staff member still shows their availability after their last connection "
        "closed (a page reload is no flicker to offline); a node that dies is noticed "
        "within 3 heartbeats of presence (a third of this, at most 10 s) on top",
    ),
    "max_pending_handshakes": (
        int,
        "connections still sending their HTTP request; one more closes the oldest of them",
    ),
    "webhook_url": (str, "http(s) URL that receives the webhook events, repeatable"),
    "webhook_secret": (
        str,
        "secret signing webhooks (HMAC-SHA256), at least 32 bytes (shows in ps: prefer the file)",
    ),
    "webhook_secret_file": (str, "file holding the webhook secret"),
    "webhook_timeout": (float, "seconds one webhook delivery may take"),
    "webhook_retry_min": (float, "seconds before a failed webhook is retried, doubled each time"),
    "webhook_retry_max": (float, "seconds between two attempts of a webhook, at most"),
    "webhook_give_up": (
        float,
        "seconds after an event when its webhook is given up (0: retry for ever)",
    ),
    "notify_after": (
        float,
        "with --webhook-url: seconds a participant has had no connection on any node before "
        "their unread messages make a participant.unread webhook (once until they read)",
    ),
    "max_upload": (int, "largest uploaded image in bytes (more is refused with 413)"),
    "upload_dir": (
        str,
        "directory of uploaded images (default: appchat-uploads beside the SQLite file, "
        "else in the working directory)",
    ),
    "upload_s3": (
        str,
        "s3://BUCKET[/PREFIX]: keep uploaded images in S3 instead of --upload-dir "
        "(needs appchat[s3]; credentials and region from the usual AWS_* settings)",
    ),
    "upload_s3_endpoint": (str, "URL of an S3-compatible server for --upload-s3 (MinIO, …)"),
    "images": (
        str,
        "content of an image message (content_type 2): any (an upload's reference, or "
        "anything else stored as sent, as the original server did) or uploads-only",
    ),
    "api_sender_ids": (
        str,
        "N or N-M, repeatable: the ids the server API posts as, which no customer may connect "
        "as (default: the API posts as any id but the conversation's customer)",
    ),
    "api_key": (
        str,
        "[NAME:]KEY of the server API (/api/), repeatable; shows in ps: prefer the file",
    ),
    "api_keys_file": (
        str,
        "file of server API keys, `KEY` or `NAME KEY` a line; edits apply without a restart",
    ),
    "max_decode_memory": (
        int,
        "bytes decoding one uploaded image may take (WebP: 18 a pixel); more is refused with 413",
    ),
    "max_jpeg_scans": (
        int,
        "scans of an uploaded progressive JPEG, each a pass over the image; more: 413",
    ),
    "max_uploads_per_user": (
        int,
        "uploads one participant may have in progress at once on this node; more: 429",
    ),
    "upload_rate": (
        float,
        "uploads one participant may start a minute on this node, as many at once "
        "(0: no limit); more: 429",
    ),
    "upload_timeout": (float, "seconds the whole body of an upload may take to arrive"),
}
# Options that may be given several times; their environment variable is comma-separated.
LISTS = {"jwt_public_key", "allowed_origins", "webhook_url", "api_key", "api_sender_ids"}
FLAGS = {
    "dev": "development mode: generate a secret beside the database, print tokens",
    "trust_query_sid": (
        "take the query sid as given for staff tokens naming no participant (weaker)"
    ),
}


def env_name(name: str) -> str:
    return "APPCHAT_" + name.upper()


# What a number option takes, as its errors say it.
KINDS = {int: "a whole number", float: "a number"}


def parse_value(kind: type, raw: str) -> object:
    """``raw`` as ``kind``; ``ValueError`` saying what was expected (a float must be finite)."""
    if kind is str:
        return raw
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"expected {KINDS[kind]}, got {raw!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {raw!r}")
    return value


def _option_type(kind: type) -> Callable[[str], object]:
    """An argparse ``type``: its errors read ``argument --port: expected a whole number …``."""

    def convert(raw: str) -> object:
        try:
            return parse_value(kind, raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = kind.__name__
    return convert


def _env_value(name: str, kind: type, raw: str) -> object:
    """An option's value from ``APPCHAT_<NAME>``; ``ConfigError`` (one line) if it is bad."""
    try:
        return parse_value(kind, raw)
    except ValueError as exc:
        raise ConfigError(f"{env_name(name)}: {exc} (the value of --{flag_name(name)})") from None


def flag_name(name: str) -> str:
    return name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, names: list[str], env: Mapping[str, str]) -> None:
    """Add ``names`` from ``OPTIONS``; a bad ``APPCHAT_<NAME>`` raises ``ConfigError``."""
    defaults = Settings()
    for name in names:
        kind, text = OPTIONS[name]
        if name in LISTS:
            items = env.get(env_name(name), "")
            parser.add_argument(
                "--" + name.replace("_", "-"),
                dest=name,
                action="append",
                default=[item.strip() for item in items.split(",") if item.strip()],
                help=f"{text} [env {env_name(name)}, comma-separated]",
            )
            continue
        raw = env.get(env_name(name))
        default = getattr(defaults, name) if raw is None else _env_value(name, kind, raw)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=_option_type(kind),
            default=default,
            help=f"{text} [default: %(default)s; env {env_name(name)}]",
        )


def add_flags(parser: argparse.ArgumentParser, names: list[str], env: Mapping[str, str]) -> None:
    for name in names:
        on = env.get(env_name(name), "").lower() in ("1", "true", "yes", "on")
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            action="store_true",
            default=on,
            help=f"{FLAGS[name]} [env {env_name(name)}=1]",
        )


def settings_from(ns: argparse.Namespace) -> Settings:
    known = {k: v for k, v in vars(ns).items() if k in Settings.__dataclass_fields__}
    for name in LISTS & known.keys():
        known[name] = tuple(known[name])
    return Settings(**known)


# Number options and the least each takes (the others are checked below, one by one).
AT_LEAST: dict[str, tuple[float, str]] = {
    "max_frame": (1, "at least 1"),
    "max_content": (1, "at least 1"),
    "send_queue": (1, "at least 1"),
    "send_buffer": (1, "at least 1"),
    "heartbeat": (0, "0 (off) or more"),
    "rate": (0, "0 (no limit) or more"),
    "burst": (1, "at least 1"),
    "sqlite_busy_timeout": (0, "0 or more"),
    "presence_grace": (0.3, "at least 0.3"),
    "notify_after": (1, "at least 1"),
    "max_open_per_agent": (0, "0 (no limit) or more"),
    "edit_window": (0, "0 (no edits) or more"),
    "retention_days": (0, "0 (keep everything) or more"),
    "upload_orphan_ttl": (60, "at least 60"),
    "max_connections": (1, "at least 1"),
    "max_connections_per_user": (1, "at least 1"),
}


def check_limits(settings: Settings) -> None:
    """Refuse values the server could only misread (a port above 65535 wraps around, a
    negative heartbeat)."""
    if not 0 <= settings.port <= 65535:
        raise ConfigError(f"--port {settings.port}: use 0 to 65535 (0 picks a free port)")
    for name, (least, text) in AT_LEAST.items():
        value = getattr(settings, name)
        if not value >= least:  # NaN too
            raise ConfigError(
                f"--{flag_name(name)} {value:g} (or {env_name(name)}): must be {text}"
            )
    if not settings.handshake_timeout > 0:
        raise ConfigError(f"--handshake-timeout {settings.handshake_timeout}: must be above 0")
    if settings.max_upload < 1:
        raise ConfigError(f"--max-upload {settings.max_upload}: must be at least 1")
    if settings.auto_assign not in AUTO_ASSIGN:
        raise ConfigError(f"--auto-assign {settings.auto_assign!r}: use none or round-robin")
    if settings.images not in IMAGE_POLICIES:
        raise ConfigError(f"--images {settings.images!r}: use any or uploads-only")
    if settings.max_pending_handshakes < 1:
        raise ConfigError(
            f"--max-pending-handshakes {settings.max_pending_handshakes}: must be at least 1"
        )
    check_upload_limits(settings)
    check_webhooks(settings)
    IdRanges.parse(settings.api_sender_ids)


def check_webhooks(settings: Settings) -> None:
    for url in settings.webhook_url:
        scheme, sep, rest = url.partition("://")
        if scheme not in ("http", "https") or not sep or not rest.split("/", 1)[0]:
            raise ConfigError(f"--webhook-url {url!r}: expected http://HOST/… or https://HOST/…")
    if not settings.webhook_timeout > 0:
        raise ConfigError(f"--webhook-timeout {settings.webhook_timeout}: must be above 0")
    if not 0 < settings.webhook_retry_min <= settings.webhook_retry_max:
        raise ConfigError(
            "--webhook-retry-min and --webhook-retry-max: need 0 < min <= max "
            f"(got {settings.webhook_retry_min} and {settings.webhook_retry_max})"
        )
    if settings.webhook_give_up < 0:
        raise ConfigError(f"--webhook-give-up {settings.webhook_give_up}: must be 0 or more")


def check_upload_limits(settings: Settings) -> None:
    for name in ("max_decode_memory", "max_jpeg_scans", "max_uploads_per_user"):
        if getattr(settings, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} {getattr(settings, name)}: must be at least 1")
    if not settings.upload_rate >= 0:  # NaN too
        raise ConfigError(f"--upload-rate {settings.upload_rate}: must be 0 or more")
    if not settings.upload_timeout > 0:
        raise ConfigError(f"--upload-timeout {settings.upload_timeout}: must be above 0")


def upload_directory(settings: Settings) -> Path:
    """``--upload-dir``, else ``appchat-uploads`` beside the SQLite file (or in the working
    directory for PostgreSQL)."""
    if settings.upload_dir:
        return Path(settings.upload_dir)
    if settings.database.startswith("sqlite://"):
        return Path(sqlite_path(settings.database)).parent / defaults.UPLOAD_DIR_NAME
    return Path(defaults.UPLOAD_DIR_NAME)


def check_database(url: str) -> None:
    """Refuse a ``--database`` that names no database (``ConfigError`` saying what would)."""
    if url.startswith(("postgresql://", "postgres://")):
        return
    if url.startswith("sqlite://"):
        sqlite_path(url)
        return
    if "://" not in url:
        raise ConfigError(
            f"--database {url!r} is not a database URL: for a SQLite file write "
            f"sqlite:///{url}, for PostgreSQL postgresql://USER@HOST:PORT/DB"
        )
    raise ConfigError(
        f"--database {redact_url(url)!r}: unsupported (expected sqlite:///PATH or "
        "postgresql://USER@HOST:PORT/DB)"
    )
