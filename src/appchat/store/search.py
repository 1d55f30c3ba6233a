"""Full-text search over messages (Event.SearchMessages, ``GET /api/search``): the plan
both SQL stores run, in each engine's terms.

PostgreSQL keeps its index (a GIN expression index, migration 0010) in the transaction
that writes a message. SQLite's FTS5 index over ``messages.content`` (migration 0008)
follows a moment behind (migration 0010): the writer indexes the messages above
``search_progress.indexed_upto`` in runs of hundreds (``SqliteStore``), because FTS5
writes a segment per transaction and a small batch paid one of its own. A search reads
the index up to the mark and matches the few messages above it through a temporary FTS5
table of its reading connection (same tokenizer), so on both engines a message is found
as soon as it is acknowledged, an edit by its new words, a deleted stub by none.

The words come already split by the protocol (``events.search_words``: letters and
digits only), and neither engine is handed the user's text as query syntax: SQLite gets
each word as a quoted FTS5 string (implicitly AND-ed), PostgreSQL gets the words through
``plainto_tsquery`` (AND of the words, stemmed like the index, stop words dropped).

How each engine finds a page (docs/decisions.md, "Full-text search"):

* SQLite, every conversation: FTS5 walks the words' matches newest first and stops at
  the page's end, however common the word.
* SQLite, one conversation: the conversation's messages are walked newest first and kept
  if they are among the words' matches (read once from the index): driving from the
  index would walk every other conversation's matches first.
* PostgreSQL: every match below the cursor is read from the GIN index and the newest are
  kept (a bitmap scan), so the cost follows how many messages hold the words. The order
  by ``m.id + 0`` keeps the planner from walking the primary key backwards instead and
  computing each message's words on the way: its estimate of a word's frequency is a
  guess, and for a rare word that walk reads the whole table (seconds at a million
  messages). The page's columns are read after, for its ids only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from ..protocol.models import MessagePage
from .plan import Plan, Step
from .rows import MESSAGE_COLUMNS, NEWEST, SENDER_NAME, page_of

Dialect = Literal["sqlite", "postgresql"]

# PostgreSQL: the expression and predicate of the index ``messages_search`` (0010),
# repeated exactly so that the planner can use it.
PG_CONFIG = "'russian'::regconfig"
PG_MATCH = f"to_tsvector({PG_CONFIG}, m.content) @@ plainto_tsquery({PG_CONFIG}, ?)"

FROM_MESSAGES = (
    f"SELECT {MESSAGE_COLUMNS} FROM messages m JOIN conversations c ON c.id = m.conversation_id "
    + SENDER_NAME
)
SQLITE_EVERYWHERE = (
    f"SELECT {MESSAGE_COLUMNS} FROM messages_search s JOIN messages m ON m.id = s.rowid "
    "JOIN conversations c ON c.id = m.conversation_id "
    + SENDER_NAME
    + "WHERE messages_search MATCH ? AND s.rowid < ? AND s.rowid <= ? AND NOT m.deleted"
)
SQLITE_ONE_CONVERSATION = (
    FROM_MESSAGES + "WHERE m.id IN (SELECT rowid FROM messages_search WHERE messages_search "
    "MATCH ?) AND m.id < ? AND m.id <= ? AND NOT m.deleted AND m.conversation_id = ?"
)
# The messages above the mark: indexed by the search itself, in its connection's own
# temporary table (emptied before and after), and kept only while their content is
# still what was indexed (an edit meanwhile is found by the next search).
SQLITE_INDEXED_UPTO = "SELECT indexed_upto FROM search_progress"
SQLITE_PENDING_TABLE = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.messages_pending "
    "USING fts5(content, tokenize = 'unicode61')"
)
SQLITE_PENDING_CLEAR = "DELETE FROM temp.messages_pending"
SQLITE_PENDING_FILL = (
    "INSERT INTO temp.messages_pending (rowid, content) SELECT id, content FROM messages "
    "WHERE id > ? AND id < ? AND content_type = 1 AND NOT deleted"
)
SQLITE_PENDING = (
    f"SELECT {MESSAGE_COLUMNS} FROM temp.messages_pending p JOIN messages m ON m.id = p.rowid "
    "AND m.content = p.content JOIN conversations c ON c.id = m.conversation_id "
    + SENDER_NAME
    + "WHERE messages_pending MATCH ?"
)
# The page's ids first (a fence: the planner sees the index alone), then their columns.
# ``m.id + 0``: no walk of the primary key (see above), for the order nor for the cursor.
POSTGRES_HITS = (
    f"SELECT m.id FROM messages m WHERE {PG_MATCH} AND m.content_type = 1 AND m.id + 0 < ? "
    "AND NOT m.deleted"
)
POSTGRES_PAGE = (
    f"SELECT {MESSAGE_COLUMNS} FROM hits h JOIN messages m ON m.id = h.id "
    "JOIN conversations c ON c.id = m.conversation_id " + SENDER_NAME + "ORDER BY m.id DESC"
)


def fts5_query(words: Sequence[str]) -> str:
    """The words as an FTS5 query: each a string (never syntax), all of them required."""
    return " ".join('"' + w.replace('"', '""') + '"' for w in words)


def search_messages(
    dialect: Dialect,
    words: Sequence[str],
    conversation_id: int | None,
    public: bool,
    before_id: int | None,
    limit: int,
) -> Plan[MessagePage]:
    """Messages holding every one of ``words``, newest first, below ``before_id``; only
    those of ``conversation_id`` if given; ``public``: no private notes (a customer)."""
    cursor = NEWEST if before_id is None else before_id
    if dialect == "postgresql":
        sql = POSTGRES_HITS
        params: list[object] = [" ".join(words), cursor]
        if conversation_id is not None:
            sql += " AND m.conversation_id = ?"
            params.append(conversation_id)
        if public:
            sql += " AND NOT m.private"
        params.append(limit + 1)
        sql = f"WITH hits AS MATERIALIZED ({sql} ORDER BY m.id + 0 DESC LIMIT ?) {POSTGRES_PAGE}"
        rows = yield Step("rows", sql, params)
        return page_of(list(rows), limit, newest_first=False)  # kept newest first
    query = fts5_query(words)
    upto = (yield Step("value", SQLITE_INDEXED_UPTO, ())) or 0
    rows = []
    if cursor - 1 > upto:  # the newest first: the messages the index does not hold yet
        yield Step("count", SQLITE_PENDING_TABLE, ())
        yield Step("count", SQLITE_PENDING_CLEAR, ())
        fill, fill_params = SQLITE_PENDING_FILL, [upto, cursor]
        if conversation_id is not None:
            fill += " AND conversation_id = ?"
            fill_params.append(conversation_id)
        yield Step("count", fill, fill_params)
        sql = SQLITE_PENDING + (" AND NOT m.private" if public else "")
        rows = list((yield Step("rows", sql + " ORDER BY m.id DESC LIMIT ?", [query, limit + 1])))
        yield Step("count", SQLITE_PENDING_CLEAR, ())
    if len(rows) <= limit:
        if conversation_id is None:
            sql, order = SQLITE_EVERYWHERE, "s.rowid"
            params = [query, cursor, upto]
        else:
            sql, order = SQLITE_ONE_CONVERSATION, "m.id"
            params = [query, cursor, upto, conversation_id]
        if public:
            sql += " AND NOT m.private"
        sql += f" ORDER BY {order} DESC LIMIT ?"
        params.append(limit + 1 - len(rows))
        rows += yield Step("rows", sql, params)
    return page_of(rows, limit, newest_first=False)  # kept newest first
