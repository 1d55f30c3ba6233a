"""Full-text search at scale (Event.SearchMessages): how long a one-word query takes over a
million messages, and what keeping the index costs each SendMessage, on SQLite and on
PostgreSQL.

For each engine: a fresh database (SQLite: a file in a temporary folder; PostgreSQL: a
uniquely named database made through ``--pg-admin``, dropped afterwards) is migrated, then
``--messages`` messages (default 1,000,000) over ``--conversations`` conversations are
written straight in SQL (executemany / COPY, not through the server) with the search
index's triggers or index dropped; the index is then built over them as migration
0008/0010 builds it over an existing database, and that build is timed. The messages are
4 to 16 words drawn from a Zipf-distributed vocabulary of made-up Latin and Cyrillic
words; planted in them: two common words (``thanks`` and ``спасибо``, each in 10% of the
messages), two of middling frequency (``invoice`` and ``счёт``, each in 1%) and two rare
ones (``zanzibar`` and ``щавель``, in ``--rare`` messages each).

Queries go through the store (``Store.search_messages``, what the event handler calls):
``--queries`` of each kind, one at a time, first pages of 20, newest first: the whole
desk (staff), and one conversation without private notes (a customer). Printed: median
and p99 in milliseconds.

The cost per send: closed-loop ``Store.add_message`` (the send path SendMessage takes,
batching included) with ``--senders`` concurrent senders, ``--sends`` messages, first with
the index, then again after dropping it (SQLite: its triggers, and the writer's runs that
index new messages behind the sends are stopped; PostgreSQL: the GIN index) on the same
database. Printed: sends per second and the median latency of a send.

Run from the project folder (about 12 minutes on 2 cores for both engines)::

    .venv/bin/python bench/search.py
    .venv/bin/python bench/search.py --engines sqlite --messages 200000
    .venv/bin/python bench/search.py --tiny     # the smoke run the tests use
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from common import percentile, postgres_database

from appchat.protocol.models import Conversation
from appchat.store import Store, apply_migrations, open_store

COMMON = ("thanks", "спасибо")
MIDDLING = ("invoice", "счёт")
RARE = ("zanzibar", "щавель")
LATIN = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
CYRILLIC = [c + v for c in "бвгдклмнпрстфх" for v in "аеиоуя"]
T0 = 1_700_000_000_000_000


def vocabulary(rng: random.Random, size: int) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        syllables = LATIN if rng.random() < 0.5 else CYRILLIC
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def contents(n: int, rare: int, seed: int = 7) -> Iterator[str]:
    rng = random.Random(seed)
    vocab = vocabulary(rng, 20_000)
    weights = [1 / (rank + 1) for rank in range(len(vocab))]
    rare_at = {w: set(rng.sample(range(n), rare)) for w in RARE}
    block = 10_000
    for start in range(0, n, block):
        drawn = rng.choices(vocab, weights, k=block * 16)
        for i in range(start, min(n, start + block)):
            k = rng.randint(4, 16)
            words = drawn[(i - start) * 16 : (i - start) * 16 + k]
            for w in COMMON:
                if rng.random() < 0.1:
                    words.insert(rng.randrange(len(words)), w)
            for w in MIDDLING:
                if rng.random() < 0.01:
                    words.insert(rng.randrange(len(words)), w)
            for w in RARE:
                if i in rare_at[w]:
                    words.insert(rng.randrange(len(words)), w.capitalize())
            yield " ".join(words)


def rows(args: argparse.Namespace) -> Iterator[tuple[int, int, int, str, bool, int, int]]:
    """(id, conversation id, sender, content, private, rev, create_at) in id order."""
    convs = args.conversations
    for i, content in enumerate(contents(args.messages, args.rare), 1):
        conv = (i - 1) % convs + 1
        private = i % 20 == 0  # 5% private notes
        yield (
            i,
            conv,
            (1 if private or i % 2 else 100_000 + conv),
            content,
            private,
            ((i - 1) // convs + 1),
            T0 + i,
        )


# --- loading -----------------------------------------------------------------------------------


def load_sqlite(path: str, args: argparse.Namespace) -> float:
    """Write the messages without the index, then build it; returns the build's seconds."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = OFF")
    triggers = [
        r[0]
        for r in db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'messages_search%'"
        )
    ]
    for (name,) in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'messages_search%'"
    ).fetchall():
        db.execute(f"DROP TRIGGER {name}")
    per_conv = args.messages // args.conversations
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO conversations (id, application_id, create_at, update_at, message_count, "
        "rev) VALUES (?, ?, ?, ?, ?, ?)",
        [
            (c, c, T0, T0 + args.messages, per_conv, per_conv)
            for c in range(1, args.conversations + 1)
        ],
    )
    db.executemany(
        "INSERT INTO messages (id, conversation_id, sender_id, content, content_type, status, "
        "create_at, update_at, private, rev) VALUES (?, ?, ?, ?, 1, 0, ?, ?, ?, ?)",
        ((i, c, s, text, t, t, p, r) for i, c, s, text, p, r, t in rows(args)),
    )
    db.execute("COMMIT")
    started = time.perf_counter()
    db.execute("BEGIN")
    db.execute(
        "INSERT INTO messages_search (rowid, content) "
        "SELECT id, content FROM messages WHERE content_type = 1"
    )
    for sql in triggers:
        db.execute(sql)
    # every message is indexed now: the writer's mark (migration sqlite 0010) says so
    db.execute("UPDATE search_progress SET indexed_upto = (SELECT max(id) FROM messages)")
    db.execute("COMMIT")
    built = time.perf_counter() - started
    db.close()
    return built


def load_postgres(url: str, args: argparse.Namespace) -> float:
    import psycopg

    per_conv = args.messages // args.conversations
    with psycopg.connect(url, autocommit=True) as db:
        index = db.execute("SELECT pg_get_indexdef('messages_search'::regclass)").fetchone()
        assert index is not None
        db.execute("DROP INDEX messages_search")
        with db.cursor().copy(
            "COPY conversations (id, application_id, create_at, update_at, message_count, rev) "
            "FROM STDIN"
        ) as copy:
            for c in range(1, args.conversations + 1):
                copy.write_row((c, c, T0, T0 + args.messages, per_conv, per_conv))
        with db.cursor().copy(
            "COPY messages (id, conversation_id, sender_id, content, content_type, status, "
            "create_at, update_at, private, rev) FROM STDIN"
        ) as copy:
            for i, c, s, text, p, r, t in rows(args):
                copy.write_row((i, c, s, text, 1, 0, t, t, p, r))
        db.execute("SELECT setval('message_ids', %s)", (args.messages,))
        db.execute(
            "SELECT setval(pg_get_serial_sequence('conversations', 'id'), %s)",
            (args.conversations,),
        )
        db.execute("VACUUM ANALYZE messages")
        started = time.perf_counter()
        db.execute("SET maintenance_work_mem = '256MB'")
        db.execute(index[0])
        built = time.perf_counter() - started
        db.execute("ANALYZE messages")
        size = db.execute("SELECT pg_relation_size('messages_search')").fetchone()
        table = db.execute("SELECT pg_relation_size('messages')").fetchone()
        assert size is not None and table is not None
        mib = size[0] / 2**20, table[0] / 2**20
        print(f"  index {mib[0]:.0f} MiB, messages table {mib[1]:.0f} MiB", file=sys.stderr)
    return built


# --- measuring ---------------------------------------------------------------------------------


async def query_times(
    store: Store, words: list[str], args: argparse.Namespace, **scope: object
) -> tuple[float, float, int]:
    """Median and p99 in ms of first pages of 20, and how many results the last one had."""
    times = []
    found = 0
    for _ in range(max(3, args.queries // 10)):  # warm: plans and pages
        await store.search_messages(words, limit=20, **scope)  # type: ignore[arg-type]
    for _ in range(args.queries):
        started = time.perf_counter()
        page = await store.search_messages(words, limit=20, **scope)  # type: ignore[arg-type]
        times.append((time.perf_counter() - started) * 1000)
        found = len(page.messages)
    return statistics.median(times), percentile(times, 99), found


async def sends(
    store: Store, convs: list[Conversation], args: argparse.Namespace
) -> tuple[float, float]:
    """Closed loop: ``--senders`` senders, ``--sends`` messages in all; (msg/s, median ms)."""
    texts = list(contents(args.sends + args.sends // 10, 0, seed=11))
    latencies: list[float] = []
    counter = iter(range(args.sends // 10, args.sends + args.sends // 10))
    rng = random.Random(3)

    async def sender(counter: Iterator[int]) -> None:
        for i in counter:
            conv = convs[rng.randrange(len(convs))]
            started = time.perf_counter()
            await store.add_message(
                conv,
                sender_id=100_000 + conv.application_id,
                staff=False,
                content=texts[i],
                content_type=1,
                client_msg_id=None,
                now=T0 + args.messages + 1_000 + i,
            )
            latencies.append((time.perf_counter() - started) * 1000)

    warm = iter(range(args.sends // 10))  # warm: plans cached, pages in memory
    await asyncio.gather(*(sender(warm) for _ in range(args.senders)))
    latencies.clear()
    started = time.perf_counter()
    await asyncio.gather(*(sender(counter) for _ in range(args.senders)))
    elapsed = time.perf_counter() - started
    return args.sends / elapsed, statistics.median(latencies)


async def measure(url: str, engine: str, built: float, args: argparse.Namespace) -> list[str]:
    store = open_store(url)
    await store.open()
    lines = [f"index built over {args.messages:,} messages: {built:.1f} s"]
    try:
        sample = [c for c in range(1, args.conversations + 1, max(1, args.conversations // 50))]
        convs = [c for c in [await store.get_conversation(a) for a in sample] if c is not None]
        rows_ = []
        for word in (*COMMON, *MIDDLING, *RARE):
            p50, p99, n = await query_times(store, [word], args)
            rows_.append((word, "whole desk (staff)", p50, p99, n))
        conv = convs[len(convs) // 2]
        for word in (*COMMON, *MIDDLING):
            p50, p99, n = await query_times(
                store, [word], args, conversation_id=conv.id, public=True
            )
            rows_.append((word, "one conversation (customer)", p50, p99, n))
        p50, p99, n = await query_times(store, ["invoice", "счёт"], args)
        rows_.append(("invoice счёт", "whole desk (staff)", p50, p99, n))
        lines.append("| query | scope | median ms | p99 ms | results |")
        lines.append("|---|---|---:|---:|---:|")
        lines += [f"| {w} | {s} | {a:.2f} | {b:.2f} | {n} |" for w, s, a, b, n in rows_]
        with_index = await sends(store, convs, args)
    finally:
        await store.close()
    drop_index(url, engine)
    store = open_store(url)
    await store.open()
    try:
        without = await sends(store, convs, args)
    finally:
        await store.close()
    lines.append("")
    lines.append(f"| closed-loop add_message, {args.senders} senders | msg/s | median ms |")
    lines.append("|---|---:|---:|")
    lines.append(f"| with the index | {with_index[0]:.0f} | {with_index[1]:.2f} |")
    lines.append(f"| index dropped | {without[0]:.0f} | {without[1]:.2f} |")
    return lines


def drop_index(url: str, engine: str) -> None:
    if engine == "sqlite":
        # Since migration 0010 the writer indexes new messages in runs behind the sends:
        # a mark beyond every id leaves it nothing to index (the triggers only follow
        # edits and deletions of indexed messages).
        db = sqlite3.connect(url.removeprefix("sqlite:///"))
        for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'messages_search%'"
        ).fetchall():
            db.execute(f"DROP TRIGGER {name}")
        db.execute("UPDATE search_progress SET indexed_upto = 9223372036854775807")
        db.commit()
        db.close()
    else:
        import psycopg

        with psycopg.connect(url, autocommit=True) as pg:
            pg.execute("DROP INDEX messages_search")


@contextlib.contextmanager
def database(engine: str, args: argparse.Namespace) -> Iterator[str]:
    if engine == "sqlite":
        with tempfile.TemporaryDirectory(prefix="appchat-search-") as folder:
            yield f"sqlite:///{Path(folder) / 'appchat.db'}"
    else:
        with postgres_database(args.pg_admin) as (url, _name):
            yield url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--rare", type=int, default=10, help="messages holding each rare word")
    parser.add_argument("--queries", type=int, default=200, help="of each kind")
    parser.add_argument("--sends", type=int, default=3000)
    parser.add_argument("--senders", type=int, default=16)
    parser.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--tiny", action="store_true", help="a smoke run: a few thousand rows")
    args = parser.parse_args()
    if args.tiny:
        args.messages, args.conversations, args.rare = 3000, 30, 3
        args.queries, args.sends, args.senders = 10, 60, 4
    for engine in args.engines:
        print(f"{engine}: loading {args.messages:,} messages", file=sys.stderr)
        with database(engine, args) as url:
            apply_migrations(url)
            started = time.perf_counter()
            if engine == "sqlite":
                built = load_sqlite(url.removeprefix("sqlite:///"), args)
            else:
                built = load_postgres(url, args)
            print(f"  loaded in {time.perf_counter() - started:.0f} s", file=sys.stderr)
            lines = asyncio.run(measure(url, engine, built, args))
        print(f"\n### {engine}\n")
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
