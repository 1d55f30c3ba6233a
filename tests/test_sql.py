"""The statements the SQL stores share, translated for PostgreSQL (``postgres_sql``)."""

from __future__ import annotations

import re

from appchat.store import lifecycle, plan, sqlstore
from appchat.store.plan import FOR_UPDATE, SKIP_LOCKED, postgres_sql


def test_placeholders_are_numbered_in_order() -> None:
    assert postgres_sql("SELECT 1") == "SELECT 1"
    assert postgres_sql("UPDATE t SET a = ? WHERE b = ? AND c IN (?, ?)") == (
        "UPDATE t SET a = $1 WHERE b = $2 AND c IN ($3, $4)"
    )
    assert postgres_sql("VALUES (?)") == "VALUES ($1)"


def test_row_locks_are_comments_sqlite_ignores_and_postgresql_applies() -> None:
    sql = f"SELECT x FROM t WHERE id = ? {FOR_UPDATE}"
    assert postgres_sql(sql) == "SELECT x FROM t WHERE id = $1 FOR UPDATE"
    sql = f"SELECT id FROM t WHERE url = ? LIMIT ? {SKIP_LOCKED}"
    assert postgres_sql(sql) == "SELECT id FROM t WHERE url = $1 LIMIT $2 FOR UPDATE SKIP LOCKED"
    assert postgres_sql("SELECT 1 /* a comment */") == "SELECT 1 /* a comment */"


def test_every_shared_statement_translates_whole() -> None:
    """Each statement of the shared module: as many numbered parameters as placeholders,
    numbered 1..n, no ``?`` and no lock comment left."""
    statements = [
        value
        for module in (plan, sqlstore, lifecycle)
        for name, value in vars(module).items()
        if name.isupper() and isinstance(value, str) and value.lstrip()[:6].isalpha()
    ]
    assert len(statements) > 10, statements
    for sql in statements:
        out = postgres_sql(sql)
        numbers = [int(n) for n in re.findall(r"\$(\d+)", out)]
        assert numbers == list(range(1, sql.count("?") + 1)), sql
        assert "?" not in out and "/*FOR UPDATE" not in out, out
        assert ("FOR UPDATE" in out) == ("/*FOR UPDATE" in sql), sql
