"""What an idle connection holds, by the source line that allocated it.

Starts ``appchat serve`` (one SQLite node) under ``tracemalloc``, opens ``--base`` idle
staff connections, takes a snapshot, opens ``--connections`` more, takes another, and
prints the difference per connection: by file (what each library and each appchat
module keeps) and the top source lines. The server's RSS per connection is printed too,
but tracing makes every allocation larger: read RSS from ``make bench`` (the memory part
of bench/suite.py), the split from here.

    .venv/bin/python bench/idle_memory.py [--connections 2000] [--lines 25]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent


def traced_serve(folder: str, argv: list[str]) -> int:
    """Run ``appchat`` with ``argv`` under tracemalloc; a file ``ask<N>`` in ``folder``
    makes it write snapshot ``snap<N>`` there (then ``ask<N>`` becomes ``done<N>``)."""
    from appchat.app import cli

    tracemalloc.start(4)
    where = Path(folder)

    def answer() -> None:
        n = 0
        while True:
            ask = where / f"ask{n}"
            if ask.exists():
                gc.collect()
                tracemalloc.take_snapshot().dump(str(where / f"snap{n}"))
                ask.rename(where / f"done{n}")
                n += 1
            time.sleep(0.05)

    threading.Thread(target=answer, daemon=True).start()
    return cli.main(argv)


def snapshot(folder: Path, n: int) -> tracemalloc.Snapshot:
    """Ask the traced server for snapshot ``n`` and load it (blocking: in a thread)."""
    (folder / f"ask{n}").touch()
    deadline = time.monotonic() + 120
    while not (folder / f"done{n}").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the traced server wrote no snapshot {n} (did it exit?)")
        time.sleep(0.05)
    return tracemalloc.Snapshot.load(str(folder / f"snap{n}"))


async def drive(args: argparse.Namespace, workdir: Path) -> None:
    sys.path.insert(0, str(HERE))
    from common import Server
    from suite import SECRET, Peer, Wire, close_peers

    from appchat.auth.tokens import mint

    cmd = [sys.executable, str(HERE / "idle_memory.py"), "--traced", str(workdir), "serve"]
    cmd += ["--port", "0", "--rate", "0", "--database", f"sqlite:///{workdir / 'idle.db'}"]
    cmd += ["--log-level", "WARNING"]
    srv = Server([], SECRET, name="traced", command=cmd).start()
    gate = asyncio.Semaphore(100)
    wire = Wire("appchat", srv.port)

    async def one(n: int) -> Peer:
        async with gate:
            return await Peer(wire).open(n, mint(SECRET.encode(), admin_id=n, ttl=3600))

    held: list[Peer] = []
    try:
        held += await asyncio.gather(*(one(300_000 + n) for n in range(args.base)))
        await asyncio.sleep(args.settle)
        before, rss_before = await asyncio.to_thread(snapshot, workdir, 0), srv.status()["rss"]
        top = args.base + args.connections
        held += await asyncio.gather(*(one(300_000 + n) for n in range(args.base, top)))
        await asyncio.sleep(args.settle)
        after, rss_after = await asyncio.to_thread(snapshot, workdir, 1), srv.status()["rss"]
    finally:
        await close_peers(*held)
        srv.stop()
    n = args.connections
    by_file = after.compare_to(before, "filename")
    traced = sum(s.size_diff for s in by_file) / n
    print(f"Command: `.venv/bin/python bench/idle_memory.py {' '.join(sys.argv[1:])}`  ")
    print(
        f"{n:,} idle staff connections after {args.base:,}: {traced / 1024:.1f} KiB per "
        f"connection traced (RSS under tracing {(rss_after - rss_before) * 1024 / n:.1f} KiB)"
    )
    stdlib = str(Path(argparse.__file__).parent) + "/"

    def short(name: str) -> str:
        for mark in ("site-packages/", "/src/", stdlib):
            if mark in name:
                return name.split(mark, 1)[1]
        return name

    def row(where: str, s: tracemalloc.StatisticDiff) -> None:
        print(f"| {where} | {s.size_diff / n:,.0f} | {s.count_diff / n:.1f} |")

    print("\n| file | bytes per connection | objects per connection |\n|---|---|---|")
    for s in by_file[: args.lines]:
        if s.size_diff / n >= 16:
            row(short(s.traceback[0].filename), s)
    print("\n| line | bytes per connection | objects per connection |\n|---|---|---|")
    for s in after.compare_to(before, "lineno")[: args.lines]:
        frame = s.traceback[0]
        row(f"{short(frame.filename)}:{frame.lineno}", s)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--traced":
        return traced_serve(sys.argv[2], sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--connections", type=int, default=2000, help="idle connections measured")
    p.add_argument("--base", type=int, default=200, help="connections open before the first look")
    p.add_argument("--settle", type=float, default=2.0, help="seconds before each look")
    p.add_argument("--lines", type=int, default=25, help="rows of each table")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="appchat-idle-") as tmp:
        asyncio.run(drive(args, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
