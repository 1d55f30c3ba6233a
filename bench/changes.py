"""What a read of the changes since a revision costs (GetMessageList's ``changed_since``).

SQLite indexes by revision only the messages that were edited or deleted (migration
0011); the unchanged ones after a revision are found by id after a bisection
(``sqlstore.changed_since``), where a full index of every message's revision answered
with one range before. This measures the read against one history: a conversation of
``--messages`` messages sent 100 at a time (one write batch), one earlier message edited
after every batch; then, for several positions of ``since`` (nothing new, the last 100
revisions, the middle, the start), the median time of ``--calls`` reads of a page of
``--limit`` through the store (as the service reads it: on a reader thread).

Each measurement runs in a process of its own on a fresh file: this checkout, and with
``--baseline REV`` appchat as of REV (checked out as ``suite.py --baseline`` does),
alternating within each of ``--rounds`` rounds; medians.

    .venv/bin/python bench/changes.py --baseline 4dcc82c
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

APP, CUSTOMER, STAFF = 100, 1, 2
NOW = 1_700_000_000_000_000
ROOT = Path(__file__).resolve().parent.parent


async def measure(args: argparse.Namespace) -> dict[str, float]:
    """In this process: build the history, then time the reads (ms, medians)."""
    from appchat.store.sqlite import SqliteStore

    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="appchat-changes-") as tmp:
        store = SqliteStore(str(Path(tmp) / "changes.db"))
        await store.open()
        try:
            await store.add_conversation(APP, CUSTOMER, staff=False, now=NOW)
            conv = await store.add_conversation(APP, STAFF, staff=True, now=NOW)
            ids: list[int] = []
            for start in range(0, args.messages, 100):
                outcomes = await asyncio.gather(
                    *(
                        store.add_message(
                            conv,
                            sender_id=CUSTOMER,
                            staff=False,
                            content="x" * 100,
                            content_type=1,
                            client_msg_id=None,
                            now=NOW + start + k,
                        )
                        for k in range(min(100, args.messages - start))
                    )
                )
                ids += [o.message.id for o in outcomes]
                await store.edit_message(conv, rng.choice(ids), "edited", now=NOW + start)
            current = await store.get_conversation(APP)
            assert current is not None
            positions = {
                "nothing new": current.rev,
                "the last 100 revisions": current.rev - 100,
                "from the middle": current.rev // 2,
                "from the start": 0,
            }
            out: dict[str, float] = {}
            for name, since in positions.items():
                times = []
                for _ in range(args.calls):
                    started = time.perf_counter()
                    page = await store.changed_messages(conv, since=since, limit=args.limit)
                    times.append(time.perf_counter() - started)
                assert all(m.rev > since for m in page.messages), name
                out[name] = statistics.median(times) * 1000
            return out
        finally:
            await store.close()


def run_child(args: argparse.Namespace, rev: str | None) -> dict[str, float]:
    """One measurement in a process of its own (appchat as of ``rev``, else this one)."""
    env = dict(os.environ)
    if rev is not None:
        from suite import BASELINE_TREE  # bench/suite.py

        env["PYTHONPATH"] = str(BASELINE_TREE / rev / "src")
    child = [sys.executable, str(Path(__file__)), "--child"]
    child += ["--messages", str(args.messages), "--calls", str(args.calls)]
    child += ["--limit", str(args.limit)]
    out = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", help="also appchat as of this git REV")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(asyncio.run(measure(args))))
        return 0
    sys.path.insert(0, str(ROOT / "bench"))
    versions: list[str | None] = [None]
    if args.baseline:
        from suite import checkout_baseline

        checkout_baseline(args.baseline)
        versions.insert(0, args.baseline)
    runs: dict[str | None, list[dict[str, float]]] = {v: [] for v in versions}
    for n in range(args.rounds):
        for version in versions:
            runs[version].append(run_child(args, version))
            print(f"round {n + 1}, {version or 'this checkout'}: done", file=sys.stderr)
    print(f"Command: `.venv/bin/python bench/changes.py {' '.join(sys.argv[1:])}`  ")
    print(
        f"One conversation of {args.messages:,} messages (batches of 100, one earlier message "
        f"edited after each); a page of {args.limit}; median of {args.calls} reads, "
        f"medians of {args.rounds} rounds."
    )
    print()
    names = list(runs[None][0])
    print("| appchat | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for version, rows in runs.items():
        cells: list[Any] = [statistics.median(r[name] for r in rows) for name in names]
        label = f"as of {version}" if version else "this checkout"
        print(f"| {label} | " + " | ".join(f"{c:.3f} ms" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
