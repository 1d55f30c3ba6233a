-- The search index follows the messages a moment behind instead of in each send's own
-- transaction: FTS5 writes a new segment per transaction, and a SendMessage batch of a
-- few messages paid a segment of its own (about a third of the writer's time per
-- message at 3,000 msg/s, docs/benchmarks.md). The writer now indexes the messages
-- above `indexed_upto` in runs of hundreds (at most a second behind); a search reads the
-- index up to `indexed_upto` and the few messages above it through a temporary index of
-- its own (store/search.py), so an acknowledged message is still found at once.
CREATE TABLE search_progress (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    indexed_upto INTEGER NOT NULL  -- every text message with an id up to this is indexed
);
INSERT INTO search_progress (id, indexed_upto)
    SELECT 1, coalesce(max(id), 0) FROM messages;
DROP TRIGGER messages_search_insert;
-- An edit, a deletion stub or a removal changes the index only for a message in it; one
-- above the mark is indexed later with the content it has then.
DROP TRIGGER messages_search_update;
CREATE TRIGGER messages_search_update AFTER UPDATE OF content ON messages
WHEN old.content_type = 1 AND old.id <= (SELECT indexed_upto FROM search_progress) BEGIN
    INSERT INTO messages_search (messages_search, rowid, content)
        VALUES ('delete', old.id, old.content);
    INSERT INTO messages_search (rowid, content) VALUES (new.id, new.content);
END;
DROP TRIGGER messages_search_delete;
CREATE TRIGGER messages_search_delete AFTER DELETE ON messages
WHEN old.content_type = 1 AND old.id <= (SELECT indexed_upto FROM search_progress) BEGIN
    INSERT INTO messages_search (messages_search, rowid, content)
        VALUES ('delete', old.id, old.content);
END;
