"""--log-format text|json: the formatters, and a real server writing JSON lines."""

from __future__ import annotations

import json
import logging
import sys
import urllib.error
import urllib.request
from pathlib import Path

from appchat.common.logformat import JsonFormatter, TextFormatter

from .support import ServerProcess, client, token, wait_until
from .test_cli import appchat


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.getLogger("appchat.ws").makeRecord(
        "appchat.ws", logging.WARNING, __file__, 1, msg, args, None, extra=extra
    )
    rec.created = 1_700_000_000.25
    return rec


def test_json_lines_carry_the_connection_fields() -> None:
    line = JsonFormatter().format(
        record("closed %s", "slow", conn_id="ab12-3", sid=2, remote="127.0.0.1", event="close")
    )
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "2023-11-14T22:13:20.250Z",
        "level": "WARNING",
        "logger": "appchat.ws",
        "message": "closed slow",
        "conn_id": "ab12-3",
        "sid": 2,
        "remote": "127.0.0.1",
        "event": "close",
    }
    plain = json.loads(JsonFormatter().format(record("no fields")))
    assert set(plain) == {"time", "level", "logger", "message"}


def test_json_keeps_a_traceback_in_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("failed", conn_id="c1")
        rec.exc_info = sys.exc_info()
    line = JsonFormatter().format(rec)
    doc = json.loads(line)
    assert "\n" not in line and "ValueError: boom" in doc["exc"] and doc["conn_id"] == "c1"


def test_text_lines_are_the_classic_format() -> None:
    line = TextFormatter().format(record("closed %s", "ab12-3", conn_id="ab12-3", sid=2))
    assert line.endswith(" WARNING appchat.ws: closed ab12-3")


async def test_the_server_writes_json_lines(tmp_path: Path) -> None:
    server = ServerProcess(
        tmp_path / "j.db", "--log-format", "json", "--log-level", "DEBUG"
    ).start()
    try:
        async with client(server, 1, token(admin_id=1)) as c:
            await c.ok("Event.GetUnreadInfo", {})
    finally:
        assert server.stop() == 0
    logs = [line for line in server.lines if not line.startswith("appchat ")]  # not the banner
    docs = [json.loads(line) for line in logs]
    assert any(d["message"] == "shutting down" and d["logger"] == "appchat" for d in docs)
    opened = next(
        d for d in docs if d["logger"] == "appchat.connections" and "opened" in d["message"]
    )
    assert opened["sid"] == 1 and opened["remote"] == "127.0.0.1" and opened["conn_id"]
    closed = next(
        d for d in docs if "closed" in d["message"] and d.get("conn_id") == opened["conn_id"]
    )
    assert closed["code"] == 1000 and closed["duration"] >= 0
    assert not any(token(admin_id=1)[:20] in line for line in server.lines)
    assert all({"time", "level", "logger", "message"} <= set(d) for d in docs)


def test_a_bad_log_format_is_a_one_line_error(tmp_path: Path) -> None:
    out = appchat("serve", "--port", "0", "--log-format", "xml", cwd=tmp_path)
    assert out.returncode == 2 and "--log-format" in out.stderr and "Traceback" not in out.stderr


FORGED = "2026-01-01 00:00:00,000 WARNING appchat: forged"


def test_text_lines_escape_control_characters_in_every_field() -> None:
    rec = record("api GET %s -> 404", "/api/x\n" + FORGED + "\r\x1b[2J\u2028end")
    rec.name = "appchat.api\nname"
    line = TextFormatter().format(rec)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert line.endswith(
        " WARNING appchat.api\\nname: api GET /api/x\\n" + FORGED + "\\r\\x1b[2J\\u2028end -> 404"
    )
    from appchat.common.logformat import escape

    assert escape("tab\there\x00\x7f\x85") == "tab\\there\\x00\\x7f\\x85"
    assert escape("plain ascii, ünïcode, /path?q=1") == "plain ascii, ünïcode, /path?q=1"


def test_a_text_traceback_is_indented_under_its_line() -> None:
    try:
        raise ValueError("bad\n" + FORGED)
    except ValueError:
        rec = record("failed")
        rec.exc_info = sys.exc_info()
    first, *rest = TextFormatter().format(rec).split("\n")
    assert first.endswith(" WARNING appchat.ws: failed")
    assert rest and all(line.startswith("  ") for line in rest)
    assert "  Traceback (most recent call last):" in rest
    assert any(line.strip() == FORGED for line in rest)  # its own line, but indented


def test_a_forged_line_in_a_request_path_stays_in_its_line(tmp_path: Path) -> None:
    """The server API logs each request's (URL-decoded) path: %0A was a new log line."""
    key = "k" * 43
    server = ServerProcess(tmp_path / "p.db", "--api-key", f"backend:{key}").start()
    try:
        forged = FORGED.replace(" ", "%20").replace(":", "%3A").replace(",", "%2C")
        request = urllib.request.Request(
            server.http(f"/api/conversations/1%0A{forged}%0D/messages"),
            headers={"Authorization": f"Bearer {key}"},
        )
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except urllib.error.HTTPError as exc:
            assert exc.code == 400  # the path's application_id is no number
        wait_until(lambda: any("api GET /api/conversations/1" in line for line in server.lines))
    finally:
        assert server.stop() == 0
    assert not any(line.startswith(FORGED) for line in server.lines)
    line = next(line for line in server.lines if "api GET /api/conversations/1" in line)
    assert f"/api/conversations/1\\n{FORGED}\\r/messages -> 400" in line
