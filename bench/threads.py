"""Where a server's CPU per message goes, by thread, at a fixed offered rate.

The suite's open-loop latency load (``suite.py --parts latency``: pairs of a customer that
sends and a staff member that receives the push, ``--rate`` messages a second spread over
the pairs) against each server in turns, pinned like ``make bench``; around the measured
window it reads the user and system CPU time of each of the server's threads from
``/proc/PID/task`` and divides by the pushes delivered. Threads are not named on Linux,
so they are grouped by role: the event loop (the main thread), the busiest other thread
(in appchat and the durable relay: the SQLite writer) and all the rest. Medians of
``--rounds`` rounds.

    .venv/bin/python bench/threads.py --rate 3000 --baseline REV --servers appchat durable
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import TICKS, setup_signals_and_loop  # bench/common.py
from suite import checkout_baseline, latency, pin_generator, server  # bench/suite.py

Snapshot = dict[int, tuple[float, float]]  # tid -> (user, system) CPU seconds
GROUPS = ("event loop", "busiest other thread", "other threads")


def threads_cpu(pid: int) -> Snapshot:
    """User and system CPU seconds of each thread of ``pid``."""
    out: Snapshot = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (int(fields[11]) / TICKS, int(fields[12]) / TICKS)
    return out


def by_role(pid: int, before: Snapshot, after: Snapshot) -> dict[str, tuple[float, float]]:
    """The CPU each role's threads spent between two snapshots (user, system seconds)."""
    spent = {
        tid: (u - before.get(tid, (0.0, 0.0))[0], s - before.get(tid, (0.0, 0.0))[1])
        for tid, (u, s) in after.items()
    }
    main = spent.pop(pid, (0.0, 0.0))
    others = sorted(spent.values(), key=sum, reverse=True)
    busiest = others[0] if others else (0.0, 0.0)
    rest = (sum(u for u, _ in others[1:]), sum(s for _, s in others[1:]))
    return {GROUPS[0]: main, GROUPS[1]: busiest, GROUPS[2]: rest}


async def one_run(kind: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One server, one measured window: delivered msg/s, p99 and CPU per message by role."""
    with server(kind, workdir) as srv:
        snaps: list[Snapshot] = []
        whole = srv.cpu_seconds

        def cpu_seconds() -> float:  # latency() reads it exactly at the window's edges
            snaps.append(threads_cpu(srv.pid))
            return whole()

        srv.cpu_seconds = cpu_seconds  # type: ignore[method-assign]
        out: dict[str, Any] = dict(await latency(kind, srv.port, args, args.rate, srv))
        pushed = out["offered"] * args.duration - out["lost"]
        roles = by_role(srv.pid, snaps[0], snaps[-1])
        out["roles"] = {k: (u / pushed * 1e6, s / pushed * 1e6) for k, (u, s) in roles.items()}
        return out


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        f"Command: `.venv/bin/python bench/threads.py {' '.join(sys.argv[1:])}`  ",
        f"{args.rate:,.0f} msg/s offered for {args.duration:g} s, {args.pairs} pairs; "
        f"medians of {args.rounds} rounds, the servers in turns; µs of CPU per message "
        "delivered, user + system.",
        "",
        "| server | p99 ms | CPU per message | "
        + " | ".join(f"{g} (user + sys)" for g in GROUPS)
        + " |",
        "|---" * (3 + len(GROUPS)) + "|",
    ]
    for kind, rows in runs.items():

        def med(f: Any, rows: list[dict[str, Any]] = rows) -> float:
            return float(statistics.median(f(r) for r in rows))

        cells = [
            f"{med(lambda r, g=g: sum(r['roles'][g])):.1f} "
            f"({med(lambda r, g=g: r['roles'][g][0]):.1f} + "
            f"{med(lambda r, g=g: r['roles'][g][1]):.1f})"
            for g in GROUPS
        ]
        lines.append(
            f"| {kind} | {med(lambda r: r['p99_ms']):.2f} | {med(lambda r: r['cpu_us']):.1f} µs | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    kinds = [f"appchat@{rev}" for rev in args.baseline] + args.servers
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="appchat-threads-") as tmp:
        for n in range(args.rounds):
            for kind in kinds:
                runs[kind].append(await one_run(kind, Path(tmp), args))
                row = runs[kind][-1]
                print(f"round {n + 1} {kind}: {row['cpu_us']:.1f} µs/msg", file=sys.stderr)
    print(report(args, runs))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rate", type=float, default=3000)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--content-bytes", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", nargs="*", default=[], help="also appchat as of each git REV")
    p.add_argument("--servers", nargs="+", default=["appchat", "durable"])
    args = p.parse_args()
    for rev in args.baseline:
        checkout_baseline(rev)
    setup_signals_and_loop()
    pin_generator()
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
