"""Schema migrations: numbered SQL files per backend, applied with yoyo under its lock."""

from __future__ import annotations

from importlib import resources

from yoyo import get_backend, read_migrations


def migrations_dir(backend: str) -> str:
    return str(resources.files("appchat.store") / "migrations" / backend)


def apply_migrations(yoyo_url: str, backend: str) -> int:
    """Apply what is pending; safe when several processes start at once. Returns the count."""
    db = get_backend(yoyo_url)
    try:
        migrations = read_migrations(migrations_dir(backend))
        with db.lock():
            pending = db.to_apply(migrations)
            db.apply_migrations(pending)
            return len(pending)
    finally:
        db.connection.close()
