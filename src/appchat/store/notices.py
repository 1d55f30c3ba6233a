"""Away notices in the database: who was seen when, and which unread participants were told.

The ``participant.unread`` webhook goes to a participant who has had no connection on any
node for ``--notify-after`` and has unread messages, once per participant and conversation
until they read. Everything that decides it is in the database, so every node (and every
worker) decides alike and a restart forgets nothing:

* ``seen``: when each user last had a connection somewhere. Each node writes it for its
  connected users every few seconds (a node that dies stops, and its users become away
  ``--notify-after`` later) and when a user's first connection opens or last one closes
  on it.
* ``unread_notices``: the read position the last notice of a participant was sent at. A
  participant away with unread messages is due a notice when that row is missing or holds
  another position (they read since). The row is written by an upsert that changes
  something only when the position differs: of two nodes recording the same notice one
  writes it and the other changes nothing, and only the writer records the event, in the
  same transaction.

Users never seen (no ``seen`` row: ids a backend posts as, or users of a deployment from
before webhooks were configured who have not connected since) get no notice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import orjson

from ..protocol.models import Message
from .plan import Plan, Step
from .rows import SELECT_MESSAGES, UNREAD, message_of, outbox_rows
from .sqlstore import record

PARTICIPANT_UNREAD = "participant.unread"

SEEN_BATCH = 5_000  # users whose ``seen`` one transaction writes

# A time only moves forward: two nodes writing one user keep the later one.
MARK_SEEN = (
    "INSERT INTO seen (user_id, last_seen) VALUES (?, ?) ON CONFLICT (user_id) DO UPDATE "
    "SET last_seen = excluded.last_seen WHERE seen.last_seen < excluded.last_seen"
)

# A participant with unread messages whose notice was not sent at their read position.
DUE = (
    f"{UNREAD} > 0 AND NOT EXISTS (SELECT 1 FROM unread_notices n "
    "WHERE n.conversation_id = p.conversation_id AND n.user_id = p.user_id "
    "AND n.position = p.read_position)"
)
CANDIDATE = "p.conversation_id, p.user_id, p.read_position"
# Away now (``last_seen`` before the first ``?``), of any time: the full look.
AWAY_UNREAD = (
    f"SELECT {CANDIDATE} FROM seen s JOIN participants p ON p.user_id = s.user_id "
    "JOIN conversations c ON c.id = p.conversation_id "
    f"WHERE s.last_seen < ? AND {DUE} ORDER BY p.conversation_id, p.user_id LIMIT ?"
)
# Away since a while: ``last_seen`` between the two ``?`` (the index on last_seen).
BECAME_AWAY = (
    f"SELECT {CANDIDATE} FROM seen s JOIN participants p ON p.user_id = s.user_id "
    "JOIN conversations c ON c.id = p.conversation_id "
    f"WHERE s.last_seen >= ? AND s.last_seen < ? AND {DUE} "
    "ORDER BY p.conversation_id, p.user_id LIMIT ?"
)
# Away, in a conversation with activity since the first ``?`` (a message came).
ACTIVE_AWAY = (
    f"SELECT {CANDIDATE} FROM conversations c JOIN participants p ON p.conversation_id = c.id "
    "JOIN seen s ON s.user_id = p.user_id "
    f"WHERE c.update_at >= ? AND s.last_seen < ? AND {DUE} "
    "ORDER BY p.conversation_id, p.user_id LIMIT ?"
)
# Recorded only if, in this transaction, the participant is still at that read position
# and still away, and the notice was not recorded at it already (by another node): the
# upsert changes no row then, and returns none.
RECORD_NOTICE = (
    "INSERT INTO unread_notices (conversation_id, user_id, position, noticed_at) "
    "SELECT p.conversation_id, p.user_id, p.read_position, ? FROM participants p "
    "JOIN seen s ON s.user_id = p.user_id "
    "WHERE p.conversation_id = ? AND p.user_id = ? AND p.read_position = ? AND s.last_seen < ? "
    "ON CONFLICT (conversation_id, user_id) DO UPDATE "
    "SET position = excluded.position, noticed_at = excluded.noticed_at "
    "WHERE unread_notices.position <> excluded.position "
    "RETURNING position"
)
NOTICE_DETAIL = (
    f"SELECT c.application_id, {UNREAD} FROM participants p "
    "JOIN conversations c ON c.id = p.conversation_id "
    "WHERE p.conversation_id = ? AND p.user_id = ?"
)
# The newest message someone else sent: with unread messages, the newest of them.
# (A private note only for a staff participant: a customer's notice never carries one.)
LAST_UNREAD = (
    SELECT_MESSAGES + "WHERE m.id = (SELECT max(lm.id) FROM messages lm "
    "WHERE lm.conversation_id = ? AND lm.sender_id <> ? AND (NOT lm.private OR EXISTS ("
    "SELECT 1 FROM participants sp2 WHERE sp2.conversation_id = lm.conversation_id "
    "AND sp2.user_id = ? AND sp2.is_staff)))"
)


class Candidate(NamedTuple):
    """A participant found away with unread messages, at this read position."""

    conversation_id: int
    user_id: int
    position: int


class UnreadNotice(NamedTuple):
    """A ``participant.unread`` event recorded (``data`` of the webhook)."""

    application_id: int
    user_id: int
    unread: int
    last_message: Message | None


class NoticeRound(NamedTuple):
    """One look: how many candidates it found, and the notices this node recorded."""

    found: int
    recorded: list[UnreadNotice]


def mark_seen(user_ids: Sequence[int], now: int) -> Plan[None]:
    """``now`` as the last time each of ``user_ids`` had a connection (ids in order, so
    that two nodes writing the same users lock them in the same order)."""
    yield Step("many", MARK_SEEN, [(uid, now) for uid in sorted(set(user_ids))])


def away_unread(now: int, away_before: int, since: int | None, limit: int) -> Plan[list[Candidate]]:
    """Participants away (seen before ``away_before``) with unread messages and no notice
    at their read position. ``since`` (``None``: every one) narrows the look to those who
    became away (``away_before`` passed their last time seen), or whose conversation had
    activity, at or after ``since``: what can have changed since an earlier look that
    started after ``since``."""
    if since is None:
        rows = yield Step("rows", AWAY_UNREAD, (away_before, limit))
        return [Candidate(*r) for r in rows]
    became_away = since - (now - away_before)  # seen then: away from ``since`` on
    found: dict[tuple[int, int], Candidate] = {}
    for sql, params in (
        (BECAME_AWAY, (became_away, away_before, limit)),
        (ACTIVE_AWAY, (since, away_before, limit)),
    ):
        for r in (yield Step("rows", sql, params)):
            found[(r[0], r[1])] = Candidate(*r)
    return [found[k] for k in sorted(found)][:limit]


def record_notices(
    candidates: Sequence[Candidate], away_before: int, now: int, hooks: tuple[str, ...]
) -> Plan[list[UnreadNotice]]:
    """Record a notice for each candidate still due, with its ``participant.unread`` event
    for ``hooks``; the notices this transaction recorded (another node's are not)."""
    notices = []
    for c in sorted(candidates):
        won = yield Step(
            "row",
            RECORD_NOTICE,
            (now, c.conversation_id, c.user_id, c.position, away_before),
        )
        if won is None:
            continue
        application_id, unread = yield Step("row", NOTICE_DETAIL, (c.conversation_id, c.user_id))
        row = yield Step("row", LAST_UNREAD, (c.conversation_id, c.user_id, c.user_id))
        notice = UnreadNotice(application_id, c.user_id, unread, message_of(row) if row else None)
        notices.append(notice)
        yield record(outbox_rows(hooks, PARTICIPANT_UNREAD, now, notice_data(notice)))
    return notices


def notice_data(notice: UnreadNotice) -> str:
    """The outbox data of a notice: its fields by name, the message with its own (as
    ``rows.outbox_data`` writes one)."""
    return orjson.dumps(notice._asdict()).decode()
