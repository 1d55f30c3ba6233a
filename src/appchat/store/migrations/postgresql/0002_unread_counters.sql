-- Unread counts in O(1): kept in the same transaction as every message and every read.
-- unread(participant) = message_count - read_count - own_unread
--   message_count: messages in the conversation
--   read_count:    messages with id <= read_position
--   own_unread:    the participant's own messages with id > read_position
ALTER TABLE conversations ADD COLUMN message_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE participants ADD COLUMN read_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE participants ADD COLUMN own_unread BIGINT NOT NULL DEFAULT 0;
UPDATE conversations SET message_count = (
    SELECT count(*) FROM messages m WHERE m.conversation_id = conversations.id
);
UPDATE participants SET
    read_count = (
        SELECT count(*) FROM messages m
        WHERE m.conversation_id = participants.conversation_id
          AND m.id <= participants.read_position
    ),
    own_unread = (
        SELECT count(*) FROM messages m
        WHERE m.conversation_id = participants.conversation_id
          AND m.id > participants.read_position AND m.sender_id = participants.user_id
    );
