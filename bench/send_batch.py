"""PostgreSQL's own cost of a batch of SendMessages: ``appchat_send_batch`` (migration 0004,
one INSERT per message) against ``appchat_send_batch_v2`` (migration 0005, set-based).

Creates a uniquely named database through ``--pg-admin`` (dropped afterwards), migrates it,
makes ``--conversations`` conversations of a customer and a staff member each, then calls
each function with batches of ``--sizes`` messages (customers' messages spread over the
conversations, as a node's batch is), the two functions taking turns, ``--runs`` times.
Printed per function and batch size: the CPU of the database's server process per message
(from /proc, so the database must run on this machine) and the wall time per message, the
median of the runs. Run from the project folder::

    .venv/bin/python bench/send_batch.py
    .venv/bin/python bench/send_batch.py --sizes 1 10 50 200 --runs 7
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid

import asyncpg
from common import postgres_database, process_cpu

from appchat.store.migrate import apply_postgres_migrations

FUNCTIONS = ("appchat_send_batch", "appchat_send_batch_v2")


async def measure(url: str, args: argparse.Namespace) -> dict[tuple[str, int], list[float]]:
    conn = await asyncpg.connect(url)
    try:
        convs = []
        for app in range(1, args.conversations + 1):
            cid = await conn.fetchval(
                "INSERT INTO conversations (application_id, create_at, update_at) "
                "VALUES ($1, 0, 0) RETURNING id",
                app,
            )
            await conn.execute(
                "INSERT INTO participants (conversation_id, user_id, is_staff, joined_at) "
                "VALUES ($1, $2, FALSE, 0), ($1, 1, TRUE, 0)",
                cid,
                100_000 + app,
            )
            convs.append(cid)
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        turn = 0

        async def call(function: str, size: int) -> None:
            nonlocal turn
            batch = [convs[(turn + k) % len(convs)] for k in range(size)]
            turn += size
            now = time.time_ns() // 1000
            rows = await conn.fetch(
                f"SELECT created FROM {function}($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                batch,
                [100_000 + c for c in batch],  # each conversation's customer
                [False] * size,
                ["x" * args.content_bytes] * size,
                [1] * size,
                [uuid.uuid4().hex for _ in range(size)],
                [now] * size,
                [False] * size,
                None,
            )
            if not all(r["created"] for r in rows):
                raise SystemExit(f"{function}: a message was not stored")

        results: dict[tuple[str, int], list[float]] = {}
        for run in range(args.runs):
            for size in args.sizes:
                order = FUNCTIONS if run % 2 == 0 else FUNCTIONS[::-1]
                for function in order:
                    calls = max(20, args.messages // size)
                    for _ in range(10):  # warm: plans cached, pages in memory
                        await call(function, size)
                    cpu0, t0 = process_cpu(pid), time.perf_counter()
                    for _ in range(calls):
                        await call(function, size)
                    cpu1, t1 = process_cpu(pid), time.perf_counter()
                    per = calls * size
                    results.setdefault((function, size), []).append((cpu1 - cpu0) / per * 1e6)
                    results.setdefault((function + " wall", size), []).append((t1 - t0) / per * 1e6)
            print(f"send_batch: run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)
        return results
    finally:
        await conn.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--messages", type=int, default=5000, help="messages per measurement")
    p.add_argument("--conversations", type=int, default=100)
    p.add_argument("--content-bytes", type=int, default=100)
    args = p.parse_args()
    with postgres_database(args.pg_admin) as (url, _):
        apply_postgres_migrations(url)
        results = asyncio.run(measure(url, args))
    print(f"medians of {args.runs} runs, {args.conversations} conversations")
    print("| batch | function | PostgreSQL CPU per message | wall time per message |")
    print("|---|---|---|---|")
    for size in args.sizes:
        for function in FUNCTIONS:
            cpu = statistics.median(results[(function, size)])
            wall = statistics.median(results[(function + " wall", size)])
            print(f"| {size} | `{function}` | {cpu:.1f} µs | {wall:.1f} µs |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
