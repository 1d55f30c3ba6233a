"""Schema migrations: numbered SQL files per backend, applied with yoyo.

On PostgreSQL several nodes may start at once: a session-level advisory lock lets one
migrate while the others wait, and it is released even when that process dies (yoyo's
own lock row would outlive a killed process, so under the advisory lock a leftover row
is known to be stale and is broken).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources

from yoyo import get_backend, read_migrations

ADVISORY_LOCK_KEY = 0x61707063686174  # "appchat"


def migrations_dir(backend: str) -> str:
    return str(resources.files("appchat.store") / "migrations" / backend)


@contextmanager
def _postgres_exclusive(dsn: str) -> Iterator[None]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))


def _apply(yoyo_url: str, backend: str, *, stale_lock_possible: bool) -> int:
    db = get_backend(yoyo_url)
    try:
        migrations = read_migrations(migrations_dir(backend))
        if stale_lock_possible:
            db.break_lock()
        with db.lock():
            pending = db.to_apply(migrations)
            db.apply_migrations(pending)
            return len(pending)
    finally:
        db.connection.close()


def apply_sqlite_migrations(path: str) -> int:
    """Apply what is pending to the SQLite file at ``path``; returns the count."""
    return _apply(f"sqlite:///{path}", "sqlite", stale_lock_possible=False)


def apply_postgres_migrations(dsn: str) -> int:
    """Apply what is pending; safe when several processes start at once."""
    with _postgres_exclusive(dsn):
        yoyo_url = "postgresql+psycopg://" + dsn.split("://", 1)[1]
        return _apply(yoyo_url, "postgresql", stale_lock_possible=True)
