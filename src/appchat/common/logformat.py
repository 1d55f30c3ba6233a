"""Log lines for people (``--log-format text``) or for log collectors (``json``).

Connection-related lines carry ``extra={"conn_id", "sid", "remote", "event", …}`` (any
subset of :data:`EXTRA_FIELDS`); the JSON format lifts them into fields of their own.
Nothing here adds tokens or message content: callers never pass them.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

FORMATS = ("text", "json")
EXTRA_FIELDS = ("conn_id", "sid", "remote", "event", "status", "code", "duration")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k in EXTRA_FIELDS if (v := getattr(record, k, None)) is not None}


# C0 and C1 controls, DEL and the Unicode line separators: what could end a line or
# rewrite a terminal. Request paths arrive URL-decoded: ``%0A`` would start a new line.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(char: re.Match[str]) -> str:
    c = char.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape(text: str) -> str:
    """``text`` with every control character written out (``\\n``, ``\\x1b``, …): one line."""
    return _CONTROL.sub(_escaped, text)


class TextFormatter(logging.Formatter):
    """The classic line; the messages themselves already name the connection fields.

    Every field of the line is escaped (``escape``), so a line is one record: no value a
    client sent (a path, a header) can start a forged line. A traceback keeps its lines,
    each indented by two spaces and escaped: only a record's first line starts in column 0.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("  " + escape(line) for line in text.split("\n"))


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
