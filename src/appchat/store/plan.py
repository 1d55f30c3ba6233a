"""What a plan is made of (see sqlstore.py): steps, the statements every plan shares, and
the translation of a statement into PostgreSQL's terms."""

from __future__ import annotations

import re
from collections.abc import Generator, Sequence
from functools import lru_cache
from typing import Any, Literal, NamedTuple, TypeVar

from .rows import CONVERSATION_COLUMNS

T = TypeVar("T")

FOR_UPDATE = "/*FOR UPDATE*/"  # PostgreSQL locks the row; SQLite's writer is alone anyway
SKIP_LOCKED = "/*FOR UPDATE SKIP LOCKED*/"

GET_CONVERSATION = f"SELECT {CONVERSATION_COLUMNS} FROM conversations c WHERE c.application_id = ?"
PARTICIPANTS = "SELECT user_id FROM participants WHERE conversation_id = ?"
# Joining changes a row only to make a participant staff, or to count a message they sent
# as their own unread one (a row rewritten for nothing is a dead tuple in PostgreSQL).
JOIN = (
    "INSERT INTO participants (conversation_id, user_id, is_staff, read_position, joined_at, "
    "own_unread) VALUES (?, ?, ?, 0, ?, ?) ON CONFLICT (conversation_id, user_id) DO UPDATE SET "
    "is_staff = participants.is_staff OR excluded.is_staff, "
    "own_unread = participants.own_unread + excluded.own_unread "
    "WHERE (excluded.is_staff AND NOT participants.is_staff) OR excluded.own_unread > 0"
)
RECORD_EVENT = (
    "INSERT INTO webhook_outbox (event_id, url, type, occurred_at, data, next_attempt) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)


@lru_cache(maxsize=256)
def postgres_sql(sql: str) -> str:
    """A statement in PostgreSQL's terms: ``?`` numbered ``$1``, ``$2`` …, row locks on."""
    parts = sql.split("?")
    out = [parts[0]]
    for n, part in enumerate(parts[1:], 1):
        out.append(f"${n}{part}")
    return re.sub(r"/\*(FOR UPDATE[A-Z ]*)\*/", r"\1", "".join(out))


Kind = Literal[
    "rows", "row", "value", "column", "count", "many", "join", "members", "changed", "exclusive"
]


class Step(NamedTuple):
    """One statement of a plan, and what it wants back: ``rows`` (every row), ``row`` (the
    first or ``None``), ``value`` (its first column or ``None``), ``column`` (the first
    column of every row), ``count`` (rows changed), ``many`` (``params`` is a list of
    parameter tuples; nothing back). ``join`` and ``members`` (``params`` only) are
    :func:`join` and :func:`participants`, which a store may answer from memory;
    ``changed`` (:func:`changed`) says a conversation's row or participants were written,
    for a store that remembers them; ``exclusive`` (:func:`exclusive`) asks for a lock
    only one transaction of the deployment holds at a time (true or false back)."""

    kind: Kind
    sql: str
    params: Sequence[Any]


Plan = Generator[Step, Any, T]


def expand(step: Step) -> Step:
    """``join`` and ``members`` as the statements they stand for."""
    if step.kind == "join":
        conversation_id, user_id, staff, now = step.params
        return Step("count", JOIN, (conversation_id, user_id, staff, now, 0))
    if step.kind == "members":
        return Step("column", PARTICIPANTS, step.params)
    return step


def join(conversation_id: int, user_id: int, staff: bool, now: int) -> Step:
    """Make ``user_id`` a participant (staff if ``staff``)."""
    return Step("join", "", (conversation_id, user_id, staff, now))


def participants(conversation_id: int) -> Step:
    """Every participant of the conversation (a list of ids)."""
    return Step("members", "", (conversation_id,))


def exclusive(key: int) -> Step:
    """True if this transaction holds the lock ``key`` (none other of the deployment
    does until it ends; PostgreSQL's advisory lock); SQLite's one writer always does."""
    return Step("exclusive", "", (key,))


def marks(values: Sequence[Any]) -> str:
    """``?, ?, …``: one placeholder per value, for ``IN (…)``."""
    return ", ".join("?" * len(values))


def changed(conversation_id: int) -> Step:
    """The plan wrote the conversation's row (its status, assignee or counters)."""
    return Step("changed", "", (conversation_id,))
