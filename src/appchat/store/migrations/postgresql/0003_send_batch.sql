-- Many messages of many connections in one round trip (PostgresStore's send batches).
-- The conversations' rows are locked first, in id order (no deadlock between nodes),
-- and only then are ids drawn: a conversation's ids become visible in increasing order.
-- Per message: refused (a customer acting as a staff participant), a retry (the first
-- message with that client_msg_id is returned, nothing written), or stored with the
-- sender made a participant and the counters kept.
CREATE FUNCTION appchat_send_batch(
    p_conversation BIGINT[], p_sender BIGINT[], p_staff BOOLEAN[], p_content TEXT[],
    p_content_type SMALLINT[], p_client_msg_id TEXT[], p_now BIGINT[], p_guard BOOLEAN[]
) RETURNS TABLE (message_id BIGINT, created BOOLEAN, refused BOOLEAN, participants BIGINT[])
LANGUAGE plpgsql AS $$
DECLARE
    i INTEGER;
BEGIN
    PERFORM 1 FROM conversations WHERE id = ANY (p_conversation) ORDER BY id FOR UPDATE;
    FOR i IN 1 .. coalesce(array_length(p_conversation, 1), 0) LOOP
        message_id := NULL; created := FALSE; refused := FALSE; participants := NULL;
        IF p_guard[i] AND EXISTS (
            SELECT 1 FROM participants pa WHERE pa.conversation_id = p_conversation[i]
            AND pa.user_id = p_sender[i] AND pa.is_staff
        ) THEN
            refused := TRUE;
            RETURN NEXT;
            CONTINUE;
        END IF;
        INSERT INTO messages AS m (conversation_id, sender_id, content, content_type, status,
                                   client_msg_id, create_at, update_at)
        VALUES (p_conversation[i], p_sender[i], p_content[i], p_content_type[i], 0,
                p_client_msg_id[i], p_now[i], p_now[i])
        ON CONFLICT DO NOTHING
        RETURNING m.id INTO message_id;
        IF message_id IS NULL THEN
            SELECT m.id INTO message_id FROM messages m
            WHERE m.conversation_id = p_conversation[i] AND m.sender_id = p_sender[i]
              AND m.client_msg_id = p_client_msg_id[i];
            RETURN NEXT;
            CONTINUE;
        END IF;
        created := TRUE;
        INSERT INTO participants AS pa (conversation_id, user_id, is_staff, read_position,
                                        joined_at, own_unread)
        VALUES (p_conversation[i], p_sender[i], p_staff[i], 0, p_now[i], 1)
        ON CONFLICT (conversation_id, user_id) DO UPDATE
            SET is_staff = pa.is_staff OR EXCLUDED.is_staff, own_unread = pa.own_unread + 1;
        UPDATE conversations c SET update_at = GREATEST(c.update_at, p_now[i]),
                                   message_count = c.message_count + 1
        WHERE c.id = p_conversation[i];
        SELECT array_agg(pa.user_id) INTO participants FROM participants pa
        WHERE pa.conversation_id = p_conversation[i];
        RETURN NEXT;
    END LOOP;
END
$$;
