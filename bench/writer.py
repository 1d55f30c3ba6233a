"""What the SQLite writer thread spends per message, and what each index of it costs.

No server and no sockets: a ``SqliteStore`` on a fresh file, 100 conversations each with
a customer and a staff participant, and bursts of ``--burst`` SendMessages (each with a
``client_msg_id``, spread over the conversations) handed to the store at once and
awaited, as a busy node's connections hand them over. It reads the writer thread's user
and system CPU time from ``/proc/self/task`` around ``--duration`` seconds of bursts, after
a warm-up, and divides by the messages stored.

Each variant runs on a file of its own; ``--without`` adds variants in which the named
indexes were dropped after the migrations (the store still works: the indexes serve
reads, and the unique one a retried ``client_msg_id``), to show what each costs a write.
Variants alternate within each of ``--rounds`` rounds; medians.

    .venv/bin/python bench/writer.py --without messages_changed messages_client_msg_id
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from common import TICKS  # bench/common.py

from appchat.store.sqlite import SqliteStore

CONVERSATIONS = 100
NOW = 1_700_000_000_000_000


def thread_cpu(native_id: int) -> tuple[float, float]:
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


async def one_run(path: Path, drop: list[str], args: argparse.Namespace) -> dict[str, float]:
    store = SqliteStore(str(path))
    await store.open()
    try:
        if drop:
            with sqlite3.connect(path) as db:
                for index in drop:
                    db.execute(f'DROP INDEX "{index}"')
        conversations = []
        for i in range(CONVERSATIONS):
            conversations.append(
                await store.add_conversation(1000 + i, 100_000 + i, staff=False, now=NOW)
            )
            await store.add_conversation(1000 + i, 200_000 + i, staff=True, now=NOW)
        (writer,) = (t for t in threading.enumerate() if t.name == "appchat-sqlite-writer")
        assert writer.native_id is not None
        sent = 0

        async def burst() -> None:
            nonlocal sent
            futures = []
            for _ in range(args.burst):
                i = sent % CONVERSATIONS
                futures.append(
                    store.add_message(
                        conversations[i],
                        sender_id=100_000 + i,
                        staff=False,
                        content="x" * args.content_bytes,
                        content_type=1,
                        client_msg_id=uuid.uuid4().hex,
                        now=NOW + sent,
                    )
                )
                sent += 1
            await asyncio.gather(*futures)

        warm = time.perf_counter()
        while time.perf_counter() - warm < args.warmup:
            await burst()
        user0, sys0 = thread_cpu(writer.native_id)
        first, started = sent, time.perf_counter()
        while time.perf_counter() - started < args.duration:
            await burst()
        user1, sys1 = thread_cpu(writer.native_id)
        stored = sent - first
        return {
            "msg_s": stored / (time.perf_counter() - started),
            "user": (user1 - user0) / stored * 1e6,
            "sys": (sys1 - sys0) / stored * 1e6,
        }
    finally:
        await store.close()


async def main_async(args: argparse.Namespace) -> None:
    variants: dict[str, list[str]] = {"all indexes": []}
    for index in args.without:
        variants[f"without {index}"] = [index]
    if len(args.without) > 1:
        variants["without all of these"] = list(args.without)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="appchat-writer-") as tmp:
        for n in range(args.rounds):
            for name, drop in variants.items():
                row = await one_run(Path(tmp) / f"{uuid.uuid4().hex[:8]}.db", drop, args)
                runs[name].append(row)
                print(f"round {n + 1} {name}: {row['user'] + row['sys']:.1f} µs", file=sys.stderr)
    print(f"Command: `.venv/bin/python bench/writer.py {' '.join(sys.argv[1:])}`  ")
    print(
        f"Bursts of {args.burst} SendMessages over {CONVERSATIONS} conversations, "
        f"{args.content_bytes}-byte messages, {args.duration:g} s per run; "
        f"medians of {args.rounds} rounds."
    )
    print()
    print("| indexes | msg/s | writer CPU per message | user | system |")
    print("|---|---|---|---|---|")
    for name, rows in runs.items():

        def med(key: str, rows: list[dict[str, float]] = rows) -> float:
            return statistics.median(r[key] for r in rows)

        total = statistics.median(r["user"] + r["sys"] for r in rows)
        print(
            f"| {name} | {med('msg_s'):,.0f} | {total:.1f} µs | "
            f"{med('user'):.1f} µs | {med('sys'):.1f} µs |"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--burst", type=int, default=32)
    p.add_argument("--content-bytes", type=int, default=100)
    p.add_argument("--duration", type=float, default=6)
    p.add_argument("--warmup", type=float, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--without", nargs="*", default=[], help="indexes to drop, one variant each")
    args = p.parse_args()
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {0})  # the writer and its caller on one CPU, as the suite's
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
