"""``appchat backup`` and ``appchat restore`` for SQLite (PostgreSQL: pg_dump, pg_restore).

A backup is SQLite's online backup API (``sqlite3.Connection.backup``) run in one step:
one read transaction on the live database, which in WAL mode never blocks the server's
writers, so the copy is the database as of one commit, every message acknowledged before
it included. It is written to a temporary file beside the target, checked
(``integrity_check``), made a single self-contained file (rollback journal, not WAL),
flushed to disk and renamed over the target, so a backup file is whole or absent.

A restore refuses to run while anything has the database open (a running server keeps
its connections open: switching the file out of WAL mode then fails), keeps the current
database as ``<database>.before-restore-<time>``, and copies the backup in with the same
API, inside SQLite's own transaction: a restore cut short leaves the database as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from ..protocol.errors import ConfigError
from ..store import sqlite_path

BUSY_TIMEOUT = 10.0  # seconds to wait for a lock of the live database
APPCHAT_TABLES = {"conversations", "messages", "participants"}
PG_DUMP = (
    "appchat backup copies SQLite databases; for PostgreSQL use pg_dump, e.g. "
    'pg_dump --format=custom --file=appchat.dump "$APPCHAT_DATABASE" (docs/deploy.md, '
    '"Backups")'
)
PG_RESTORE = (
    "appchat restore restores SQLite databases; for PostgreSQL use pg_restore, e.g. "
    'pg_restore --clean --if-exists --no-owner --dbname="$APPCHAT_DATABASE" appchat.dump '
    '(docs/deploy.md, "Backups")'
)


@dataclass(frozen=True)
class Copied:
    path: Path
    size: int
    messages: int


def database_file(url: str, *, postgres_hint: str) -> Path:
    """The SQLite file of ``--database``; a PostgreSQL URL is refused with ``postgres_hint``."""
    if url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(postgres_hint)
    path = sqlite_path(url)
    if path == ":memory:":
        raise ConfigError("sqlite:///:memory: keeps nothing to back up or restore")
    return Path(path)


def backup(url: str, target: Path) -> Copied:
    """Copy the live database of ``url`` to ``target`` (replaced whole, or left alone)."""
    source = database_file(url, postgres_hint=PG_DUMP)
    if not source.is_file():
        raise ConfigError(f"{source} does not exist: nothing to back up")
    target = target.absolute()
    if target.exists() and target.samefile(source):
        raise ConfigError("the backup would overwrite the database itself; name another file")
    if target.is_dir():
        raise ConfigError(f"{target} is a directory; name the backup file")
    # never created by this: mode=rw opens an existing file only
    live = sqlite3.connect(
        f"file:{source}?mode=rw", uri=True, isolation_level=None, timeout=BUSY_TIMEOUT
    )
    try:
        return _copy_to(live, target, check_tables=True)
    finally:
        live.close()


def restore(backup_file: Path, url: str, *, now: float | None = None) -> tuple[Copied, Path | None]:
    """Replace the database of ``url`` with ``backup_file``; returns what was copied and
    where the database it replaced was kept (None if there was none)."""
    target = database_file(url, postgres_hint=PG_RESTORE).absolute()
    if not backup_file.is_file():
        raise ConfigError(f"{backup_file} does not exist")
    source = sqlite3.connect(f"file:{backup_file.absolute()}?mode=ro", uri=True)
    try:
        _check(source, str(backup_file), check_tables=True)
        kept: Path | None = None
        if target.exists():
            current = sqlite3.connect(str(target), isolation_level=None, timeout=0.5)
            try:
                _take_alone(current, target)
                # alone and out of WAL mode: the file is the whole database, even a
                # damaged one (which the backup API might refuse to read)
                stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
                kept = target.with_name(f"{target.name}.before-restore-{stamp}")
                shutil.copyfile(target, kept)
                source.backup(current)
                current.execute("PRAGMA journal_mode=WAL")  # as serve keeps it
                _check(current, str(target), check_tables=True)
                copied = Copied(target, target.stat().st_size, _messages(current))
            finally:
                current.close()
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            copied = _copy_to(source, target, check_tables=True)
        return copied, kept
    finally:
        source.close()


def _take_alone(conn: sqlite3.Connection, path: Path) -> None:
    """Make sure nothing else has ``path`` open: leaving WAL mode needs every other
    connection closed (a running ``appchat serve`` keeps its own open)."""
    try:
        mode = conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
    except sqlite3.OperationalError as exc:
        raise ConfigError(
            f"{path} is open in another process ({exc}): stop every appchat serve that "
            "uses it, then restore"
        ) from None
    if str(mode).lower() != "delete":
        raise ConfigError(
            f"{path} is open in another process: stop every appchat serve that uses it, "
            "then restore"
        )


def _copy_to(source: sqlite3.Connection, target: Path, *, check_tables: bool = False) -> Copied:
    """``source`` copied whole into a new file renamed to ``target`` once complete."""
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    for leftover in (temporary, Path(f"{temporary}-journal")):
        leftover.unlink(missing_ok=True)
    try:
        copy = sqlite3.connect(str(temporary), isolation_level=None)
        try:
            source.backup(copy)  # one step: one read transaction, one consistent snapshot
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            _check(copy, "the copy", check_tables=check_tables)
            messages = _messages(copy) if check_tables else 0
        finally:
            copy.close()
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, target)
        _sync_directory(target.parent)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return Copied(target, target.stat().st_size, messages)


def _check(conn: sqlite3.Connection, name: str, *, check_tables: bool) -> None:
    try:
        result = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"{name} is not a SQLite database: {exc}") from None
    if result != ["ok"]:
        raise ConfigError(f"{name} fails SQLite's integrity check: {'; '.join(result[:5])}")
    if check_tables and not tables >= APPCHAT_TABLES:
        raise ConfigError(f"{name} is not an appchat database (no conversations or messages)")


def _messages(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])


def _sync_directory(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
