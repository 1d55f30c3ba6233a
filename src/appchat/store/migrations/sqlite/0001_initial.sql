-- Conversations, participants with read positions, messages.
-- Timestamps are microseconds since the epoch, UTC.
CREATE TABLE conversations (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    application_id INTEGER NOT NULL UNIQUE,
    create_at      INTEGER NOT NULL,
    update_at      INTEGER NOT NULL
);
CREATE INDEX conversations_activity ON conversations (update_at DESC, id DESC);

CREATE TABLE participants (
    conversation_id INTEGER NOT NULL REFERENCES conversations (id),
    user_id         INTEGER NOT NULL,
    is_staff        INTEGER NOT NULL DEFAULT 0,
    read_position   INTEGER NOT NULL DEFAULT 0,
    joined_at       INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
);
CREATE INDEX participants_user ON participants (user_id);

CREATE TABLE messages (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations (id),
    sender_id       INTEGER NOT NULL,
    content         TEXT    NOT NULL,
    content_type    INTEGER NOT NULL DEFAULT 1,
    status          INTEGER NOT NULL DEFAULT 0,
    client_msg_id   TEXT,
    create_at       INTEGER NOT NULL,
    update_at       INTEGER NOT NULL
);
CREATE INDEX messages_conversation ON messages (conversation_id, id);
CREATE UNIQUE INDEX messages_client_msg_id
    ON messages (conversation_id, sender_id, client_msg_id) WHERE client_msg_id IS NOT NULL;
