"""Log lines for people (``--log-format text``) or for log collectors (``json``).

Connection-related lines carry ``extra={"conn_id", "sid", "remote", "event", …}`` (any
subset of :data:`EXTRA_FIELDS`); the JSON format lifts them into fields of their own.
Nothing here adds tokens or message content: callers never pass them.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

FORMATS = ("text", "json")
EXTRA_FIELDS = ("conn_id", "sid", "remote", "event", "status", "code", "duration")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k in EXTRA_FIELDS if (v := getattr(record, k, None)) is not None}


class TextFormatter(logging.Formatter):
    """The classic line; the messages themselves already name the connection fields."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(doc, default=str).decode()


def configure_logging(level: str, fmt: str) -> None:
    """Send every log line to stderr at ``level`` in format ``fmt`` (``text`` or ``json``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("yoyo").setLevel(logging.WARNING)
