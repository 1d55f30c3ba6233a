-- Full-text search over text messages (Event.SearchMessages, GET /api/search): an FTS5
-- index whose content is messages.content itself (external content: the words are stored
-- once, in the index; the text stays in messages). Triggers keep it in the transaction
-- that writes the message, so an acknowledged message is found at once, an edit is found
-- by its new words only and a deleted stub (content '') by none. Only text messages
-- (content_type 1) are indexed: an image's content is an upload reference, not words.
-- unicode61 folds case in every script (Привет = привет) and, for Latin letters,
-- diacritics (über = uber); it does not stem: words are found in the form they are
-- written.
CREATE VIRTUAL TABLE messages_search USING fts5(
    content, content = 'messages', content_rowid = 'id', tokenize = 'unicode61'
);
INSERT INTO messages_search (rowid, content)
    SELECT id, content FROM messages WHERE content_type = 1;
-- Each write transaction adds a small segment to the index, and FTS5 merges segments as
-- they pile up: merging when 8 of a level exist rather than 4 (the default) halves what a
-- SendMessage batch pays for the index (docs/benchmarks.md), for a query that may read a
-- few more segments.
INSERT INTO messages_search (messages_search, rank) VALUES ('automerge', 8);
CREATE TRIGGER messages_search_insert AFTER INSERT ON messages
WHEN new.content_type = 1 BEGIN
    INSERT INTO messages_search (rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER messages_search_update AFTER UPDATE OF content ON messages
WHEN old.content_type = 1 BEGIN
    INSERT INTO messages_search (messages_search, rowid, content)
        VALUES ('delete', old.id, old.content);
    INSERT INTO messages_search (rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER messages_search_delete AFTER DELETE ON messages
WHEN old.content_type = 1 BEGIN
    INSERT INTO messages_search (messages_search, rowid, content)
        VALUES ('delete', old.id, old.content);
END;
