-- History an agent works with: private notes (staff only), edits and deletions, and each
-- message's revision (the conversation's revision its creation, or its latest edit or
-- deletion, took), so a client that was away asks for what changed since a revision.
ALTER TABLE messages ADD COLUMN private INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN edited_at INTEGER;
ALTER TABLE messages ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
-- Messages stored before: revisions 1, 2, … in each conversation, in id order (as 0005
-- set the conversations' revisions to their message counts).
UPDATE messages SET rev = r.n FROM (
    SELECT id, row_number() OVER (PARTITION BY conversation_id ORDER BY id) AS n FROM messages
) AS r WHERE messages.id = r.id;
UPDATE conversations SET rev = max(rev, message_count);
CREATE INDEX messages_changes ON messages (conversation_id, rev);
-- Private notes do not count for customers: a customer's unread is
-- (message_count - private_count) - read_count - own_unread, read_count counting only the
-- messages a customer sees.
ALTER TABLE conversations ADD COLUMN private_count INTEGER NOT NULL DEFAULT 0;
