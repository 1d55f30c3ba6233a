-- Away notices (the participant.unread webhook), kept here so that every node and every
-- worker decides from the same facts, and a restart forgets nothing.
--   seen:           when each user last had a connection on some node (microseconds, UTC):
--                   each node writes it for the users connected to it, every few seconds
--                   and when a user's first connection opens or last one closes there.
--   unread_notices: the read position a participant's last notice was sent at; a notice
--                   is due again only once that position moved (they read).
-- Written only while webhooks are configured.
CREATE TABLE seen (
    user_id   INTEGER PRIMARY KEY,
    last_seen INTEGER NOT NULL
);
CREATE INDEX seen_last ON seen (last_seen);

CREATE TABLE unread_notices (
    conversation_id INTEGER NOT NULL,
    user_id         INTEGER NOT NULL,
    position        INTEGER NOT NULL,
    noticed_at      INTEGER,
    PRIMARY KEY (conversation_id, user_id)
);
