-- Every message stored wrote an entry of messages_changes, on a page of its own per
-- conversation of a commit. A message never edited nor deleted keeps the revision its
-- creation took, and those grow with the ids of a conversation (the writer numbers both
-- in one order): such messages are found by id (sqlstore.changed_since), and only the
-- changed ones by revision here. The WHERE is the one the reads write, word for word.
DROP INDEX messages_changes;
CREATE INDEX messages_changed ON messages (conversation_id, rev)
    WHERE edited_at IS NOT NULL OR deleted;
