"""What the support desk's inbox costs a message: 0, 10 and 200 subscribers against before.

One SQLite node (``appchat serve`` on a fresh database file, ``--rate 0``), pinned to CPU 0,
the load generator to CPU 1, as in ``suite.py``; the same closed loop as the suite's
throughput (pairs of a customer that sends and a staff member that receives the push).
Each round runs, in turns so that no order favours one:

* appchat as of ``--baseline`` (before the desk), checked out as ``suite.py --baseline`` does;
* appchat of this checkout with no inbox subscriber;
* the same with N staff connections subscribed to the whole inbox (Event.SubscribeInbox
  ``{"filter": "all"}``), for each N of ``--subscribers`` (10 and 200).

The subscribers are lean clients in the generator's process that read every frame and
count the Event.ConversationUpdated pushes that carry a message. After each run the
script checks that every subscriber got exactly one per message stored in the database
(and that one subscriber's pushes name exactly the stored messages' ids): a figure is
only printed for pushes really delivered. Medians of ``--rounds`` rounds, with the ratios
to the baseline of the same round.

    .venv/bin/python bench/desk.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import Server, setup_signals_and_loop, source_version  # bench/common.py
from suite import (  # bench/suite.py
    SECRET,
    Peer,
    Wire,
    checkout_baseline,
    close_peers,
    median,
    pin_generator,
    server,
    throughput,
)
from tqdm import tqdm

from appchat.auth.tokens import mint

BASELINE = "110e219"  # the last commit before the desk (issue 19)
PUSH = b'{"name":"Event.ConversationUpdated"'
NO_MESSAGE = b'"last_message":null'  # a new conversation's push (AddConversation)
MESSAGE_ID = b'"last_message":{"id":'
FIRST_SID = 700_000  # the subscribers' staff ids (the pairs use 100,000+ and 200,000+)


# --- the subscribers ----------------------------------------------------------------------------


@dataclass
class Subscribers:
    """Staff connections subscribed to the whole inbox, each counting the pushes about a
    message it read; the first also keeps those messages' ids."""

    peers: list[Peer] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    ids: set[int] = field(default_factory=set)
    repeated: int = 0  # pushes of the first subscriber naming a message it had already

    def reader(self, index: int) -> Any:
        counts = self.counts

        def count(data: bytes) -> None:
            if data.startswith(PUSH) and NO_MESSAGE not in data:
                counts[index] += 1

        def count_and_keep(data: bytes) -> None:
            if data.startswith(PUSH) and NO_MESSAGE not in data:
                counts[index] += 1
                at = data.find(MESSAGE_ID) + len(MESSAGE_ID)
                message_id = int(data[at : data.index(b",", at)])
                if message_id in self.ids:
                    self.repeated += 1
                self.ids.add(message_id)

        return count_and_keep if index == 0 else count


async def subscribe(port: int, n: int) -> Subscribers:
    wire = Wire("appchat", port)
    subs = Subscribers(counts=[0] * n)
    gate = asyncio.Semaphore(50)

    async def one(i: int) -> Peer:
        sid = FIRST_SID + i
        async with gate:
            peer = await Peer(wire).open(sid, mint(SECRET.encode(), admin_id=sid))
            await peer.call("Event.SubscribeInbox", {"filter": "all"}, 1)
        assert peer.client is not None
        peer.client.on_text = subs.reader(i)  # from now on every frame is only counted
        return peer

    subs.peers = list(await asyncio.gather(*(one(i) for i in range(n))))
    return subs


def stored_messages(srv: Server) -> set[int]:
    """The ids of the messages in the server's database file (read beside the server)."""
    url = srv.cmd[srv.cmd.index("--database") + 1]
    path = url.removeprefix("sqlite:///")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
        return {row[0] for row in db.execute("SELECT id FROM messages")}


async def check_delivery(srv: Server, subs: Subscribers, within: float) -> int:
    """Wait until every subscriber has read one push per stored message, and the stored
    messages stay the same a while (the server finishes what was in flight); raise if that
    does not happen ``within`` seconds. Returns the number of stored messages."""
    deadline = time.monotonic() + within
    steady = 0
    last = -1
    while True:
        stored = stored_messages(srv)
        n = len(stored)
        if all(c == n for c in subs.counts) and n == last:
            steady += 1
            if steady >= 3:
                break
        else:
            steady = 0
        last = n
        if time.monotonic() > deadline:
            closed = sum(p.client is not None and p.client.closed.done() for p in subs.peers)
            raise SystemExit(
                f"the inbox pushes did not all arrive: {n:,} messages stored, subscribers "
                f"read {min(subs.counts):,}..{max(subs.counts):,} pushes about a message; "
                f"{closed} of {len(subs.peers)} subscriber connections closed by the server"
            )
        await asyncio.sleep(0.1)
    if subs.ids != stored or subs.repeated:
        raise SystemExit(
            f"the first subscriber's pushes name {len(subs.ids):,} messages ({subs.repeated} "
            f"twice) where {len(stored):,} are stored ({len(subs.ids - stored)} unknown)"
        )
    return len(stored)


# --- one run ------------------------------------------------------------------------------------


def label(rev: str | None, n: int) -> str:
    return f"appchat@{rev}" if rev else f"appchat, {n} subscribers"


async def one_run(
    workdir: Path, args: argparse.Namespace, rev: str | None, n: int
) -> dict[str, float]:
    kind = f"appchat@{rev}" if rev else "appchat"
    with server(kind, workdir) as srv:
        subs = await subscribe(srv.port, n) if n else Subscribers()
        result = await throughput("appchat", srv.port, args, srv)
        if n:
            result["stored"] = await check_delivery(srv, subs, within=60)
            await close_peers(*subs.peers)
        else:
            result["stored"] = len(stored_messages(srv))
    if result["errors"]:
        raise SystemExit(f"{label(rev, n)}: {result['errors']:.0f} sends answered with an error")
    return result


def configs(args: argparse.Namespace) -> list[tuple[str | None, int]]:
    """(the baseline's revision, 0), then (None: this checkout, n) for each subscriber count."""
    return [(args.baseline, 0), *((None, n) for n in args.subscribers)]


async def run_all(args: argparse.Namespace, workdir: Path) -> dict[str, list[dict[str, float]]]:
    todo = configs(args)
    results: dict[str, list[dict[str, float]]] = {label(r, n): [] for r, n in todo}
    with tqdm(total=args.rounds * len(todo), desc="desk", unit="run", file=sys.stderr) as bar:
        for round_ in range(args.rounds):
            shift = round_ % len(todo)  # in turns: no configuration always runs first
            for rev, n in todo[shift:] + todo[:shift]:
                bar.set_postfix_str(label(rev, n))
                results[label(rev, n)].append(await one_run(workdir, args, rev, n))
                bar.update()
    return results


# --- the report ---------------------------------------------------------------------------------


def report(args: argparse.Namespace, results: dict[str, list[dict[str, float]]]) -> str:
    base = results[label(args.baseline, 0)]
    lines = [
        f"Command: `{' '.join(['.venv/bin/python', 'bench/desk.py', *sys.argv[1:]])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}; {source_version()}; {time.strftime('%Y-%m-%d')}  ",
        "One SQLite node (`appchat serve`, a fresh database file, `--rate 0`) pinned to CPU 0, "
        "the load generator (pairs and subscribers) to CPU 1; "
        f"{args.pairs} pairs, window {args.window}, {args.content_bytes}-byte messages, "
        f"{args.duration:g} s per run; medians of {args.rounds} rounds, the servers in turns; "
        "ratios to the baseline of the same round.",
        "",
        f"| server | delivered msg/s | server CPU per message | msg/s / {args.baseline} "
        f"| CPU per message / {args.baseline} | CPU per inbox push | server CPU "
        "| generator CPU | messages stored, each pushed to every subscriber |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary: dict[str, dict[str, float]] = {}
    for name, runs in results.items():
        s = {k: median([r[k] for r in runs]) for k in ("msg_s", "cpu_us", "srv_cpu", "gen_cpu")}
        s["stored"] = median([r["stored"] for r in runs])
        s["rate_ratio"] = median([r["msg_s"] / b["msg_s"] for r, b in zip(runs, base, strict=True)])
        s["cpu_ratio"] = median(
            [r["cpu_us"] / b["cpu_us"] for r, b in zip(runs, base, strict=True)]
        )
        summary[name] = s
    zero = summary.get(label(None, 0))
    for (_rev, n), name in zip(configs(args), results, strict=True):
        s = summary[name]
        checked = "yes" if n else "(no subscriber)"
        # what the server spends per push to one subscriber, beyond a message with none
        per_push = f"{(s['cpu_us'] - zero['cpu_us']) / n:.1f} µs" if n and zero else ""
        lines.append(
            f"| {name} | {s['msg_s']:,.0f} | {s['cpu_us']:.1f} µs | {s['rate_ratio']:.2f} "
            f"| {s['cpu_ratio']:.2f} | {per_push} | {s['srv_cpu']:.0f}% | {s['gen_cpu']:.0f}% "
            f"| {s['stored']:,.0f} {checked} |"
        )
    if zero is not None:
        ratio = zero["cpu_ratio"]
        verdict = "within" if ratio <= 1.10 else "NOT within"
        lines += [
            "",
            f"With no subscriber, a message costs {ratio:.2f} times the server CPU of "
            f"{args.baseline}: {verdict} 10 %.",
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", dest="duration", type=float, default=5.0, help="measured per run")
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--baseline", metavar="REV", default=BASELINE, help=f"appchat before [{BASELINE}]"
    )
    p.add_argument(
        "--subscribers", type=int, nargs="+", help="counts of inbox subscribers [0 10 200]"
    )
    p.add_argument("--window", type=int, default=16, help="sends in flight per customer")
    p.add_argument("--content-bytes", type=int, default=100)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--tiny", action="store_true", help="a quick smoke run (the tests use it)")
    args = p.parse_args(argv)
    if args.tiny:
        args.rounds, args.pairs, args.window, args.duration, args.warmup = 1, 4, 2, 0.3, 0.1
    args.subscribers = args.subscribers or ([0, 3, 10] if args.tiny else [0, 10, 200])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checkout_baseline(args.baseline)
    pin_generator()
    setup_signals_and_loop()
    with tempfile.TemporaryDirectory(prefix="appchat-desk-") as tmp:
        results = asyncio.run(run_all(args, Path(tmp)))
    print(report(args, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
