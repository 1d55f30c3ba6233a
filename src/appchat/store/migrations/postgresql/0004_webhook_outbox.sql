-- The webhook outbox: each event of a change (a message, a read, a new conversation) is
-- written here in the change's own transaction, one row per configured URL, and delivered
-- from here (appchat/webhooks.py). Written only while webhooks are configured.
--   next_attempt: when the row is due (microseconds); while a delivery is under way, the
--                 end of its lease; NULL once given up (kept for the operator).
--   data:         the changed object as JSON, shaped for the wire at delivery.
CREATE TABLE webhook_outbox (
    id           BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     TEXT    NOT NULL,
    url          TEXT    NOT NULL,
    type         TEXT    NOT NULL,
    occurred_at  BIGINT  NOT NULL,
    data         TEXT    NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt BIGINT,
    last_error   TEXT
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (url, next_attempt, id);

-- appchat_send_batch (0003) with one more argument: the webhook URLs (NULL or empty: none).
-- Each stored message also gets a 'message.created' row per URL, in the same transaction.
-- The eight-argument version stays for nodes of the previous release during an upgrade.
CREATE FUNCTION appchat_send_batch(
    p_conversation BIGINT[], p_sender BIGINT[], p_staff BOOLEAN[], p_content TEXT[],
    p_content_type SMALLINT[], p_client_msg_id TEXT[], p_now BIGINT[], p_guard BOOLEAN[],
    p_webhooks TEXT[]
) RETURNS TABLE (message_id BIGINT, created BOOLEAN, refused BOOLEAN, participants BIGINT[])
LANGUAGE plpgsql AS $$
DECLARE
    i INTEGER;
    v_application BIGINT;
    v_hooks BOOLEAN := coalesce(cardinality(p_webhooks), 0) > 0;
    v_event TEXT;
    v_data TEXT;
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
        WHERE c.id = p_conversation[i]
        RETURNING c.application_id INTO v_application;
        SELECT array_agg(pa.user_id) INTO participants FROM participants pa
        WHERE pa.conversation_id = p_conversation[i];
        IF v_hooks THEN
            -- One event id for every URL: drawn once here, not per row of a query plan.
            v_event := gen_random_uuid()::text;
            -- the keys of appchat.store.rows.outbox_message (models.Message's fields)
            v_data := json_build_object(
                'id', message_id, 'application_id', v_application,
                'sender_id', p_sender[i], 'content', p_content[i],
                'content_type', p_content_type[i], 'status', 0,
                'create_at', p_now[i], 'update_at', p_now[i],
                'client_msg_id', p_client_msg_id[i])::text;
            INSERT INTO webhook_outbox (event_id, url, type, occurred_at, data, next_attempt)
            SELECT v_event, u.url, 'message.created', p_now[i], v_data, p_now[i]
            FROM unnest(p_webhooks) AS u (url);
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;
