-- The support desk: a conversation's status, assignee and snooze time, and its revision
-- (grows with every message and every change of status or assignee, so that a client
-- keeps the newest of two copies of a conversation pushed by two nodes).
-- (No CHECK on status: SQLite checks existing rows with a query whose empty result the
-- migration tool would print; the server writes only the four statuses.)
ALTER TABLE conversations ADD COLUMN status TEXT NOT NULL DEFAULT 'open';
ALTER TABLE conversations ADD COLUMN assignee_id INTEGER;
ALTER TABLE conversations ADD COLUMN snooze_until INTEGER;
ALTER TABLE conversations ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
UPDATE conversations SET rev = message_count;
-- The wake-up of snoozed conversations looks for the ones due.
CREATE INDEX conversations_snoozed ON conversations (snooze_until) WHERE status = 'snoozed';
-- (Not with update_at: an index holding it would change with every message.)
CREATE INDEX conversations_assignee ON conversations (assignee_id);
