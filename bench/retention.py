"""The worst SendMessage reply while retention purges 100,000 messages.

A fresh SQLite database gets ``--messages`` messages dated 60 days ago, interleaved over
``--conversations`` conversations (a customer and a staff member in each, read positions
and every counter consistent), and a few recent messages in every other conversation (the
others hold only old messages, so the purge empties and deletes them). Then, side by side
in each run, on copies of the same file:

* ``appchat serve --retention-days 30``: its first retention round starts about 5 s after
  start and deletes the old messages 500 per transaction;
* the same server without ``--retention-days`` (the reference).

Against each, ``--clients`` closed-loop clients (customers and staff of conversations of
their own, one request in flight each) send messages from the server's start until
``--after`` seconds past the purge's end (the reference: for as long as the retention
server ran). Each reply's latency is kept with its times. A read-only poll of the
database file finds the purge's start (the old messages' count drops) and end (it reaches
0). Replies are grouped by when they were in flight: before the purge, overlapping it,
after it; the reference's by the same offsets from its start. After each retention run the
database is checked: only the recent messages left, the emptied conversations gone, every
counter equal to a recount.

Servers run pinned to CPU 0 and this script to CPU 1 (when the machine has two). Figures
are medians of ``--runs`` runs. ``--tiny`` is a smoke run (the test suite uses it).

    .venv/bin/python bench/retention.py --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from common import Server, percentile, source_version  # bench/common.py
from suite import Peer, Wire, close_peers, pinned  # bench/suite.py

from appchat.auth.tokens import mint
from appchat.store.migrate import apply_sqlite_migrations

SECRET = "bench-secret-" + uuid.uuid4().hex + uuid.uuid4().hex
DAY_US = 86_400 * 1_000_000
RETENTION_DAYS = 30
PHASES = ("before", "during", "after")
SEEDED_APP = 1_000_000  # seeded conversations: applications 1,000,000 + c
LOAD_APP = 2_000_000  # the load's conversations
STAFF = 3_000_000  # seeded conversations' staff member: 3,000,000 + c


# --- the seeded database ------------------------------------------------------------------------


@dataclass
class Seed:
    old: int
    recent: int
    kept_conversations: int  # those with recent messages (the others are emptied)
    cutoff_us: int  # every old message is older than any cut-off the servers use


def seed(path: Path, messages: int, conversations: int, recent_each: int) -> Seed:
    """Write the schema, then ``messages`` old messages (60 days ago, interleaved over the
    conversations) and ``recent_each`` recent ones (1 day ago) in every even conversation,
    with participants, read positions and counters as the server keeps them."""
    apply_sqlite_migrations(str(path))
    now = time.time_ns() // 1000
    old_start = now - 61 * DAY_US  # old messages spread over the day before 60 days ago
    step = DAY_US // max(1, messages)
    msgs: list[tuple[Any, ...]] = []
    per_conv: dict[int, list[tuple[int, int]]] = {c: [] for c in range(conversations)}
    mid = 0

    def add(c: int, at: int) -> None:
        nonlocal mid
        mid += 1
        sender = SEEDED_APP + c if mid % 2 else STAFF + c
        rev = len(per_conv[c]) + 1
        per_conv[c].append((mid, sender))
        msgs.append((mid, c + 1, sender, f"message {mid} " + "x" * 80, at, at, rev))

    for k in range(messages):
        add(k % conversations, old_start + k * step)
    recent_at = now - DAY_US
    kept = [c for c in range(conversations) if c % 2 == 0]
    for j in range(recent_each):
        for c in kept:
            add(c, recent_at + j * 1000)
    convs, people = [], []
    for c, rows in per_conv.items():
        created = old_start
        last = rows[-1][0] if rows else 0
        convs.append((c + 1, SEEDED_APP + c, created, now, len(rows), len(rows)))
        # The customer read half of the conversation, the staff member all of it.
        for user, staff, position in (
            (SEEDED_APP + c, 0, rows[len(rows) // 2][0] if rows else 0),
            (STAFF + c, 1, last),
        ):
            read = sum(1 for m, _ in rows if m <= position)
            own = sum(1 for m, s in rows if m > position and s == user)
            people.append((c + 1, user, staff, position, created, read, own))
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO conversations (id, application_id, create_at, update_at, "
            "message_count, rev) VALUES (?, ?, ?, ?, ?, ?)",
            convs,
        )
        db.executemany(
            "INSERT INTO participants (conversation_id, user_id, is_staff, read_position, "
            "joined_at, read_count, own_unread) VALUES (?, ?, ?, ?, ?, ?, ?)",
            people,
        )
        db.executemany(
            "INSERT INTO messages (id, conversation_id, sender_id, content, create_at, "
            "update_at, rev) VALUES (?, ?, ?, ?, ?, ?, ?)",
            msgs,
        )
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return Seed(messages, recent_each * len(kept), len(kept), now - 45 * DAY_US)


def copy_database(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    for suffix in ("-wal", "-shm"):
        if Path(f"{src}{suffix}").exists():
            shutil.copyfile(f"{src}{suffix}", f"{dst}{suffix}")


def read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=30)


def check_after_purge(path: Path, s: Seed) -> dict[str, Any]:
    """What is left of the seeded conversations, and whether every counter is exact."""
    db = read_only(path)
    try:
        seeded = f"application_id BETWEEN {SEEDED_APP} AND {LOAD_APP - 1}"
        old = db.execute("SELECT count(*) FROM messages WHERE create_at < ?", (s.cutoff_us,))
        left = db.execute(
            f"SELECT count(*) FROM messages WHERE conversation_id IN "
            f"(SELECT id FROM conversations WHERE {seeded})"
        )
        convs = db.execute(f"SELECT count(*) FROM conversations WHERE {seeded}")
        orphans = db.execute(
            "SELECT count(*) FROM participants WHERE conversation_id NOT IN "
            "(SELECT id FROM conversations)"
        )
        bad_counts = db.execute(
            "SELECT count(*) FROM conversations c WHERE message_count != "
            "(SELECT count(*) FROM messages m WHERE m.conversation_id = c.id)"
        )
        bad_reads = db.execute(
            "SELECT count(*) FROM participants p WHERE read_count != "
            "(SELECT count(*) FROM messages m WHERE m.conversation_id = p.conversation_id "
            " AND m.id <= p.read_position AND (p.is_staff OR NOT m.private)) "
            "OR own_unread != (SELECT count(*) FROM messages m WHERE m.conversation_id = "
            "p.conversation_id AND m.id > p.read_position AND m.sender_id = p.user_id)"
        )
        out = {
            "old_left": old.fetchone()[0],
            "seeded_left": left.fetchone()[0],
            "recent_seeded": s.recent,
            "conversations_left": convs.fetchone()[0],
            "conversations_kept": s.kept_conversations,
            "orphan_participants": orphans.fetchone()[0],
            "wrong_message_counts": bad_counts.fetchone()[0],
            "wrong_read_counters": bad_reads.fetchone()[0],
        }
    finally:
        db.close()
    out["exact"] = (
        out["old_left"] == 0
        and out["seeded_left"] == s.recent
        and out["conversations_left"] == s.kept_conversations
        and out["orphan_participants"] == 0
        and out["wrong_message_counts"] == 0
        and out["wrong_read_counters"] == 0
    )
    return out


# --- the load -----------------------------------------------------------------------------------


@dataclass
class Load:
    """Closed-loop senders; each reply as (sent, replied) in perf_counter seconds."""

    replies: list[tuple[float, float]] = field(default_factory=list)
    errors: int = 0
    stop: bool = False


async def sender(peer: Peer, app: int, load: Load, tag: str) -> None:
    seq = 0
    while not load.stop:
        seq += 1
        args = {"session_channel": str(app), "content": "during retention " + "y" * 60}
        args["client_msg_id"] = f"{tag}-{seq}"
        t = time.perf_counter()
        try:
            await peer.call("Event.SendMessage", args, seq)
        except (RuntimeError, TimeoutError):
            load.errors += 1
            continue
        load.replies.append((t, time.perf_counter()))


async def open_clients(port: int, clients: int) -> list[tuple[Peer, int, str]]:
    """Half customers, half staff members, in conversations the seed did not write."""
    wire = Wire("appchat", port)
    out = []
    for i in range(clients):
        app = LOAD_APP + i // 2
        sid = 10_000 + i if i % 2 == 0 else STAFF + 500_000 + i
        if i % 2 == 0:
            token = mint(SECRET.encode(), request_id=app, sid=sid)
        else:
            token = mint(SECRET.encode(), admin_id=sid)
        peer = await Peer(wire).open(sid, token)
        await peer.call("Event.AddConversation", {"application_id": app}, 10**9)
        out.append((peer, app, f"{uuid.uuid4().hex[:6]}{i}"))
    return out


@contextlib.contextmanager
def appchat(db: Path, extra: list[str]) -> Iterator[Server]:
    cmd = [sys.executable, "-m", "appchat", "serve", "--port", "0", "--rate", "0"]
    cmd += ["--database", f"sqlite:///{db}", "--log-level", "WARNING", *extra]
    srv = Server([], SECRET, name="appchat", command=pinned(0) + cmd).start()
    try:
        yield srv
    finally:
        srv.stop()


@dataclass
class Purge:
    start: float = math.nan  # the last poll that saw every old message (perf_counter)
    first_drop: float = math.nan  # the first poll that saw fewer
    end: float = math.nan  # the first poll that saw none


async def watch(path: Path, s: Seed, purge: Purge, every: float) -> None:
    db = read_only(path)
    try:
        while True:
            t = time.perf_counter()
            (n,) = db.execute(
                "SELECT count(*) FROM messages WHERE create_at < ?", (s.cutoff_us,)
            ).fetchone()
            if n >= s.old:
                purge.start = t
            elif math.isnan(purge.first_drop):
                purge.first_drop = t
            if n == 0:
                purge.end = t
                return
            await asyncio.sleep(every)
    finally:
        db.close()


async def one_server(
    template: Path,
    workdir: Path,
    s: Seed,
    args: argparse.Namespace,
    *,
    retention: bool,
    duration: float | None = None,
) -> dict[str, Any]:
    """Run the load against one server on a copy of the seeded file. With retention:
    until ``--after`` seconds past the purge's end; else for ``duration`` seconds."""
    db = workdir / f"{'retention' if retention else 'reference'}-{uuid.uuid4().hex[:6]}.db"
    copy_database(template, db)
    extra = ["--retention-days", str(RETENTION_DAYS)] if retention else []
    load = Load()
    purge = Purge()
    with appchat(db, extra) as srv:
        t0 = time.perf_counter()
        clients = await open_clients(srv.port, args.clients)
        tasks = [asyncio.create_task(sender(p, app, load, tag)) for p, app, tag in clients]
        try:
            if retention:
                await asyncio.wait_for(watch(db, s, purge, args.poll), args.timeout)
                await asyncio.sleep(args.after)
            else:
                assert duration is not None
                await asyncio.sleep(max(0.0, duration - (time.perf_counter() - t0)))
        finally:
            load.stop = True
            await asyncio.gather(*tasks)
            await close_peers(*(p for p, _a, _t in clients))
        ran = time.perf_counter() - t0
        warnings = srv.warnings
    out: dict[str, Any] = {
        "t0": t0,
        "ran": ran,
        "replies": [(a - t0, b - t0) for a, b in load.replies],
        "errors": load.errors,
        "warnings": warnings,
    }
    if retention:
        out["purge"] = (purge.start - t0, purge.end - t0)
        out["check"] = check_after_purge(db, s)
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            os.unlink(f"{db}{suffix}")
    return out


def phases(replies: list[tuple[float, float]], start: float, end: float) -> dict[str, Any]:
    """Latencies (ms) of the replies in flight before ``start``, overlapping
    [start, end], and sent after ``end``."""
    out: dict[str, list[float]] = {p: [] for p in PHASES}
    for sent, got in replies:
        phase = "before" if got < start else "after" if sent > end else "during"
        out[phase].append((got - sent) * 1000)
    return {
        p: {
            "n": len(v),
            "p50": percentile(v, 50),
            "p99": percentile(v, 99),
            "max": max(v) if v else math.nan,
        }
        for p, v in out.items()
    }


async def run_all(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    runs = []
    for r in range(args.runs):
        template = workdir / f"seed-{r}.db"
        t = time.perf_counter()
        s = seed(template, args.messages, args.conversations, args.recent)
        seeded_in = time.perf_counter() - t
        print(
            f"run {r + 1}: seeded {s.old:,} old + {s.recent:,} recent messages "
            f"in {seeded_in:.1f} s",
            file=sys.stderr,
        )
        ret = await one_server(template, workdir, s, args, retention=True)
        start, end = ret["purge"]
        print(
            f"run {r + 1}: purge {start:.1f} s .. {end:.1f} s after start, "
            f"{len(ret['replies']):,} replies; check {ret['check']}",
            file=sys.stderr,
        )
        ref = await one_server(template, workdir, s, args, retention=False, duration=ret["ran"])
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.unlink(f"{template}{suffix}")
        runs.append(
            {
                "seeded_in": seeded_in,
                "purge_s": end - start,
                "deleted_per_s": s.old / (end - start),
                "check": ret["check"],
                "errors": ret["errors"] + ref["errors"],
                "warnings": ret["warnings"] + ref["warnings"],
                "retention": phases(ret["replies"], start, end),
                "reference": phases(ref["replies"], start, end),
                "sends_per_s": {
                    "retention": len(ret["replies"]) / ret["ran"],
                    "reference": len(ref["replies"]) / ref["ran"],
                },
            }
        )
    return runs


def median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    s: dict[str, Any] = {
        k: median([r[k] for r in runs]) for k in ("purge_s", "deleted_per_s", "seeded_in")
    }
    for server in ("retention", "reference"):
        s[server] = {
            p: {k: median([r[server][p][k] for r in runs]) for k in ("n", "p50", "p99", "max")}
            for p in PHASES
        }
        s[server]["worst"] = max(r[server][p]["max"] for r in runs for p in PHASES)
        s[server]["sends_per_s"] = median([r["sends_per_s"][server] for r in runs])
    s["worst_during"] = max(r["retention"]["during"]["max"] for r in runs)
    s["ref_worst_during"] = max(r["reference"]["during"]["max"] for r in runs)
    s["exact"] = all(r["check"]["exact"] for r in runs)
    s["errors"] = sum(r["errors"] for r in runs)
    s["warnings"] = sum(r["warnings"] for r in runs)
    return s


def report(args: argparse.Namespace, s: dict[str, Any]) -> str:
    lines = [
        f"{source_version()}; Python {sys.version.split()[0]}; "
        f"{os.cpu_count()} CPUs; server pinned to CPU 0, this script to CPU 1; "
        f"medians of {args.runs} runs.",
        "",
        f"Seeded: {args.messages:,} messages 60 days old over {args.conversations} "
        f"conversations (interleaved, so a batch of 500 touches up to "
        f"{min(500, args.conversations)} of them), {args.recent} recent ones in every other "
        f"conversation; {args.clients} closed-loop SendMessage clients (half customers, "
        "half staff, one request in flight each) in conversations of their own.",
        "",
        f"Purge (`--retention-days {RETENTION_DAYS}`): **{s['purge_s']:.1f} s**, "
        f"**{s['deleted_per_s']:,.0f} messages/s** deleted; afterwards only the recent "
        f"messages were left and every counter matched a recount: "
        f"**{'yes' if s['exact'] else 'NO'}** (every run).",
        "",
        "SendMessage reply (ms): the replies in flight before the purge, overlapping it, "
        "after it; the reference is the same server without `--retention-days` on a copy of "
        "the same file, its replies grouped by the same offsets from its start.",
        "",
        "| server | phase | replies | p50 | p99 | max |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for server in ("retention", "reference"):
        label = f"--retention-days {RETENTION_DAYS}" if server == "retention" else "reference"
        for p in PHASES:
            f = s[server][p]
            lines.append(
                f"| {label} | {p} | {f['n']:,.0f} | {f['p50']:.2f} | {f['p99']:.2f} | "
                f"{f['max']:.1f} |"
            )
    lines += [
        "",
        f"Worst reply overlapping the purge in any run: **{s['worst_during']:.1f} ms** "
        f"(the reference over the same span: {s['ref_worst_during']:.1f} ms). "
        f"Sends/s over the whole run: {s['retention']['sends_per_s']:,.0f} with retention, "
        f"{s['reference']['sends_per_s']:,.0f} without. Error replies: {s['errors']}; "
        f"server warnings: {s['warnings']}.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--messages", type=int, default=100_000, help="old messages to purge")
    p.add_argument("--conversations", type=int, default=200)
    p.add_argument("--recent", type=int, default=10, help="recent messages per kept conversation")
    p.add_argument("--clients", type=int, default=8, help="closed-loop SendMessage clients")
    p.add_argument("--after", type=float, default=5.0, help="seconds of load after the purge")
    p.add_argument("--poll", type=float, default=0.02, help="seconds between database polls")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds the purge may take")
    p.add_argument("--json", type=Path, help="also write the runs and the summary here")
    p.add_argument("--tiny", action="store_true", help="a smoke run (small numbers)")
    args = p.parse_args(argv)
    if args.tiny:
        args.runs, args.messages, args.conversations, args.recent = 1, 3000, 20, 3
        args.clients, args.after, args.timeout = 4, 1.0, 60.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.suppress(OSError):
        if (os.cpu_count() or 1) >= 2:
            os.sched_setaffinity(0, {1})
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    with tempfile.TemporaryDirectory(prefix="appchat-retention-") as tmp:
        runs = asyncio.run(run_all(args, Path(tmp)))
    s = summarise(runs)
    print(report(args, s))
    if args.json is not None:
        args.json.write_bytes(
            orjson.dumps({"runs": runs, "summary": s}, option=orjson.OPT_INDENT_2)
        )
    return 0 if s["exact"] and not s["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
