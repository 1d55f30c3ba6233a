"""``appchat backup`` and ``appchat restore`` (SQLite), and the PostgreSQL commands
docs/deploy.md gives instead: a backup taken while messages are being sent holds every
message acknowledged before it started, is a valid database, and a server starts on what
is restored from it."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from .backends import postgres_database
from .support import Client, InProcessServer, Server, ServerProcess, eventually, staff

DEPLOY_DOC = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"
APP = 600
SENDERS = 4


def appchat(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("APPCHAT_")}
    return subprocess.run(
        [sys.executable, "-m", "appchat", *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


async def run(*command: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """A command in a child process while this event loop goes on (the senders keep sending)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("APPCHAT_")}
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        env={**clean, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


class Senders:
    """``SENDERS`` tasks sending messages one after another, each acknowledged; ``acked``
    holds the ids in the order their acknowledgements arrived."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.acked: list[int] = []
        self._stop = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._send(n)) for n in range(SENDERS)]

    async def _send(self, n: int) -> None:
        i = 0
        while not self._stop:
            reply = await self.client.ok(
                "Event.SendMessage", {"session_channel": str(APP), "content": f"{n}-{i}"}
            )
            self.acked.append(int(reply["message"]["id"]))
            i += 1

    async def until(self, count: int) -> None:
        def reached() -> bool:
            for task in self._tasks:
                if task.done():
                    task.result()  # a sender failed: say why
            return len(self.acked) >= count

        await eventually(reached, timeout=60, what=f"{count} messages acknowledged")

    async def stop(self) -> None:
        self._stop = True
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in self._tasks:
            task.result()


async def all_ids(client: Client) -> list[int]:
    ids: list[int] = []
    cursor = 0
    while True:
        page = await client.ok(
            "Event.GetMessageList", {"session_channel": str(APP), "after_id": cursor, "limit": 500}
        )
        ids += [int(m["id"]) for m in page["Messages"]]
        if not page["has_more"]:
            return ids
        cursor = ids[-1]


async def backup_while_sending(
    srv: Server, take_backup: Callable[[], Awaitable[None]]
) -> tuple[set[int], set[int]]:
    """Send messages continuously, take a backup meanwhile; returns the ids acknowledged
    before the backup started and every id acknowledged by the end."""
    async with staff(srv, 1) as s:
        await s.ok("Event.AddConversation", {"application_id": APP})
        senders = Senders(s)
        senders.start()
        try:
            await senders.until(2000)  # a database of some size, still growing
            before = set(senders.acked)
            await take_backup()
            during = len(senders.acked) - len(before)
            await senders.until(len(senders.acked) + 200)  # and the server went on
        finally:
            await senders.stop()
    assert during > 0, "no message was acknowledged while the backup ran"
    return before, set(senders.acked)


def integrity(path: Path) -> str:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


async def messages_on_a_new_server(database: Path | str) -> set[int]:
    srv = await asyncio.to_thread(InProcessServer(database).start)
    try:
        async with staff(srv, 1) as s:
            return set(await all_ids(s))
    finally:
        await asyncio.to_thread(srv.stop)


# --- SQLite: appchat backup, appchat restore -----------------------------------------------


async def test_backup_while_sending_restores_every_acknowledged_message(tmp_path: Path) -> None:
    live = tmp_path / "live" / "appchat.db"
    live.parent.mkdir()
    backup = tmp_path / "backups" / "appchat-backup.db"
    backup.parent.mkdir()
    srv = await asyncio.to_thread(ServerProcess(live, "--rate", "0").start)
    outputs: list[str] = []

    async def take_backup() -> None:
        code, out = await run(
            sys.executable,
            "-m",
            "appchat",
            "backup",
            str(backup),
            cwd=tmp_path,
            env={"APPCHAT_DATABASE": f"sqlite:///{live}"},  # read as serve reads it
        )
        assert code == 0, out
        outputs.append(out)

    try:
        before, acked = await backup_while_sending(srv, take_backup)
        # restore refuses while the server has the database open, and changes nothing
        refused = await asyncio.to_thread(
            appchat, "restore", str(backup), "--database", f"sqlite:///{live}", cwd=tmp_path
        )
        assert refused.returncode == 2
        assert "is open in another process" in refused.stderr
        assert "stop every appchat serve" in refused.stderr
    finally:
        assert await asyncio.to_thread(srv.stop) == 0
    assert "integrity ok" in outputs[0] and str(backup) in outputs[0]
    # one self-contained file, nothing left beside it
    assert sorted(p.name for p in backup.parent.iterdir()) == [backup.name]
    assert integrity(backup) == "ok"
    with sqlite3.connect(backup) as db:
        in_backup = {int(r[0]) for r in db.execute("SELECT id FROM messages")}
    assert before <= in_backup  # every message acknowledged before the backup started
    assert in_backup < acked  # and not those sent after it

    # restore over the stopped server's database: the backup's messages, the later ones gone
    out = await asyncio.to_thread(
        appchat, "restore", str(backup), "--database", f"sqlite:///{live}", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert f"{len(in_backup)} messages" in out.stdout and "integrity ok" in out.stdout
    kept = [p for p in live.parent.iterdir() if p.name.startswith("appchat.db.before-restore-")]
    assert len(kept) == 1 and f"kept as {kept[0]}" in out.stdout
    assert integrity(live) == "ok"
    assert await messages_on_a_new_server(live) == in_backup
    # the database it replaced is whole: everything acknowledged by the end
    assert await messages_on_a_new_server(kept[0]) == acked

    # restore into a database that does not exist yet
    fresh = tmp_path / "fresh" / "appchat.db"
    out = await asyncio.to_thread(
        appchat,
        "restore",
        str(backup),
        env={"APPCHAT_DATABASE": f"sqlite:///{fresh}"},
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "kept as" not in out.stdout
    assert await messages_on_a_new_server(fresh) == in_backup


def test_backup_and_restore_refuse_what_they_cannot_do(tmp_path: Path) -> None:
    url = "postgresql://appchat@db.internal:5432/appchat"
    out = appchat("backup", "x.db", "--database", url, cwd=tmp_path)
    assert out.returncode == 2
    assert "pg_dump --format=custom" in out.stderr and "docs/deploy.md" in out.stderr
    out = appchat("restore", "x.db", env={"APPCHAT_DATABASE": url}, cwd=tmp_path)
    assert out.returncode == 2
    assert "pg_restore --clean --if-exists --no-owner" in out.stderr

    # nothing to back up: no database is created by trying
    out = appchat("backup", "x.db", "--database", f"sqlite:///{tmp_path}/none.db", cwd=tmp_path)
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert not (tmp_path / "none.db").exists() and not (tmp_path / "x.db").exists()

    assert (
        appchat("migrate", "--database", f"sqlite:///{tmp_path}/a.db", cwd=tmp_path).returncode == 0
    )
    out = appchat("backup", "a.db", "--database", f"sqlite:///{tmp_path}/a.db", cwd=tmp_path)
    assert out.returncode == 2 and "overwrite the database itself" in out.stderr

    # a file that is not an appchat backup is refused, the database left as it was
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    before = (tmp_path / "a.db").read_bytes()
    out = appchat("restore", str(garbage), "--database", f"sqlite:///{tmp_path}/a.db", cwd=tmp_path)
    assert out.returncode == 2 and "not a SQLite database" in out.stderr
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    out = appchat("restore", str(other), "--database", f"sqlite:///{tmp_path}/a.db", cwd=tmp_path)
    assert out.returncode == 2 and "not an appchat database" in out.stderr
    assert (tmp_path / "a.db").read_bytes() == before
    assert not list(tmp_path.glob("a.db.before-restore-*"))


# --- PostgreSQL: the pg_dump and pg_restore commands of docs/deploy.md ---------------------


def pg_tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed (Debian's postgresql-client)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}: CI requires it")
    pytest.skip(f"SKIPPED LOUDLY: {message}")


async def test_pg_dump_while_sending_and_pg_restore_as_documented(tmp_path: Path) -> None:
    docs = DEPLOY_DOC.read_text()
    dump_cmd = 'pg_dump --format=custom --file=appchat.dump "$APPCHAT_DATABASE"'
    restore_cmd = (
        'pg_restore --clean --if-exists --no-owner --dbname="$APPCHAT_DATABASE" appchat.dump'
    )
    assert dump_cmd in docs and restore_cmd in docs
    shell: dict[str, Any] = {"cwd": tmp_path}
    pg_tool("pg_dump")
    pg_tool("pg_restore")
    with postgres_database() as live, postgres_database() as restored:
        srv = await asyncio.to_thread(InProcessServer(live, "--rate", "0").start)

        async def take_backup() -> None:
            code, out = await run("sh", "-c", dump_cmd, env={"APPCHAT_DATABASE": live}, **shell)
            assert code == 0, out

        try:
            before, acked = await backup_while_sending(srv, take_backup)
        finally:
            await asyncio.to_thread(srv.stop)
        code, out = await run("sh", "-c", restore_cmd, env={"APPCHAT_DATABASE": restored}, **shell)
        assert code == 0, out
        in_backup = await messages_on_a_new_server(restored)
        assert before <= in_backup < acked
