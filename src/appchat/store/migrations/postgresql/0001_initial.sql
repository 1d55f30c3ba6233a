-- Conversations, participants with read positions, messages.
-- Timestamps are microseconds since the epoch, UTC.
CREATE TABLE conversations (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    application_id BIGINT NOT NULL UNIQUE,
    create_at      BIGINT NOT NULL,
    update_at      BIGINT NOT NULL
);
CREATE INDEX conversations_activity ON conversations (update_at DESC, id DESC);

CREATE TABLE participants (
    conversation_id BIGINT  NOT NULL REFERENCES conversations (id),
    user_id         BIGINT  NOT NULL,
    is_staff        BOOLEAN NOT NULL DEFAULT FALSE,
    read_position   BIGINT  NOT NULL DEFAULT 0,
    joined_at       BIGINT  NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
);
CREATE INDEX participants_user ON participants (user_id);

-- Ids come from one sequence, drawn while the conversation's row is locked (see
-- postgres.py), so within a conversation they become visible in increasing order.
CREATE SEQUENCE message_ids;
CREATE TABLE messages (
    id              BIGINT   PRIMARY KEY DEFAULT nextval('message_ids'),
    conversation_id BIGINT   NOT NULL REFERENCES conversations (id),
    sender_id       BIGINT   NOT NULL,
    content         TEXT     NOT NULL,
    content_type    SMALLINT NOT NULL DEFAULT 1,
    status          SMALLINT NOT NULL DEFAULT 0,
    client_msg_id   TEXT,
    create_at       BIGINT   NOT NULL,
    update_at       BIGINT   NOT NULL
);
ALTER SEQUENCE message_ids OWNED BY messages.id;
CREATE INDEX messages_conversation ON messages (conversation_id, id);
CREATE UNIQUE INDEX messages_client_msg_id
    ON messages (conversation_id, sender_id, client_msg_id) WHERE client_msg_id IS NOT NULL;
