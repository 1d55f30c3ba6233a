-- Full-text search over text messages (Event.SearchMessages, GET /api/search): a GIN
-- index over the words of messages.content. An expression index is part of the
-- transaction that writes the message, so an acknowledged message is found at once, an
-- edit is found by its new words only and a deleted stub (content '') by none; nothing
-- is added to the table's rows. Only text messages (content_type 1) are indexed: an
-- image's content is an upload reference, not words.
-- The configuration is 'russian': PostgreSQL's own 'russian' stems Cyrillic words with
-- the Russian Snowball stemmer and words of ASCII letters with the English one, so both
-- languages are found by any form of a word (дома finds дом, running finds run); words of
-- other scripts are lowercased. See docs/decisions.md.
-- The query must repeat the expression and the predicate exactly (appchat/store/search.py).
CREATE INDEX messages_search ON messages
    USING gin (to_tsvector('russian'::regconfig, content)) WHERE content_type = 1;
-- A search reads its matches through this index and sorts the newest out (store/search.py);
-- with a million messages the planner starts two parallel workers for that, which costs
-- more (about 30 ms) than the search itself for all but the commonest words. No query of
-- appchat scans messages for long enough to gain from workers.
ALTER TABLE messages SET (parallel_workers = 0);
