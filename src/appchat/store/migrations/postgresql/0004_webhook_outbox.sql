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
--
-- Set-based where it can be: the loop only checks the staff rule and inserts each message
-- (its id, or the first one of a retried client_msg_id); then one statement per table
-- for the whole batch: the senders' participant rows (grouped by conversation and
-- sender), the conversations' counters and activity time, the outbox, and the
-- participants returned for each stored message (as they are at the end of the batch).
CREATE FUNCTION appchat_send_batch(
    p_conversation BIGINT[], p_sender BIGINT[], p_staff BOOLEAN[], p_content TEXT[],
    p_content_type SMALLINT[], p_client_msg_id TEXT[], p_now BIGINT[], p_guard BOOLEAN[],
    p_webhooks TEXT[]
) RETURNS TABLE (message_id BIGINT, created BOOLEAN, refused BOOLEAN, participants BIGINT[])
LANGUAGE plpgsql AS $$
DECLARE
    n INTEGER := coalesce(array_length(p_conversation, 1), 0);
    i INTEGER;
    v_id BIGINT;
    v_ids BIGINT[];
    v_created BOOLEAN[];
    v_refused BOOLEAN[];
    -- 'conversation:sender' made staff by an earlier message of this batch: the staff rule
    -- sees it as the one-by-one function did.
    v_made_staff TEXT[] := '{}';
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    v_ids := array_fill(NULL::BIGINT, ARRAY[n]);
    v_created := array_fill(FALSE, ARRAY[n]);
    v_refused := array_fill(FALSE, ARRAY[n]);
    PERFORM 1 FROM conversations WHERE id = ANY (p_conversation) ORDER BY id FOR UPDATE;
    FOR i IN 1 .. n LOOP
        IF p_guard[i] AND (
            (p_conversation[i] || ':' || p_sender[i]) = ANY (v_made_staff) OR EXISTS (
                SELECT 1 FROM participants pa WHERE pa.conversation_id = p_conversation[i]
                AND pa.user_id = p_sender[i] AND pa.is_staff)
        ) THEN
            v_refused[i] := TRUE;
            CONTINUE;
        END IF;
        v_id := NULL;
        INSERT INTO messages AS m (conversation_id, sender_id, content, content_type, status,
                                   client_msg_id, create_at, update_at)
        VALUES (p_conversation[i], p_sender[i], p_content[i], p_content_type[i], 0,
                p_client_msg_id[i], p_now[i], p_now[i])
        ON CONFLICT DO NOTHING
        RETURNING m.id INTO v_id;
        IF v_id IS NULL THEN  -- a retry: answered with the first, not stored again
            SELECT m.id INTO v_id FROM messages m
            WHERE m.conversation_id = p_conversation[i] AND m.sender_id = p_sender[i]
              AND m.client_msg_id = p_client_msg_id[i];
        ELSE
            v_created[i] := TRUE;
            IF p_staff[i] THEN
                v_made_staff := v_made_staff || (p_conversation[i] || ':' || p_sender[i]);
            END IF;
        END IF;
        v_ids[i] := v_id;
    END LOOP;
    INSERT INTO participants AS pa (conversation_id, user_id, is_staff, read_position,
                                    joined_at, own_unread)
    SELECT t.c, t.s, bool_or(t.st), 0, min(t.nw), count(*)
    FROM unnest(p_conversation, p_sender, p_staff, p_now, v_created) AS t (c, s, st, nw, ok)
    WHERE t.ok GROUP BY t.c, t.s ORDER BY t.c, t.s
    ON CONFLICT (conversation_id, user_id) DO UPDATE
        SET is_staff = pa.is_staff OR EXCLUDED.is_staff,
            own_unread = pa.own_unread + EXCLUDED.own_unread;
    UPDATE conversations c SET update_at = GREATEST(c.update_at, t.nw),
                               message_count = c.message_count + t.k
    FROM (SELECT u.c, max(u.nw) AS nw, count(*) AS k
          FROM unnest(p_conversation, p_now, v_created) AS u (c, nw, ok)
          WHERE u.ok GROUP BY u.c) t
    WHERE c.id = t.c;
    IF coalesce(cardinality(p_webhooks), 0) > 0 THEN
        -- MATERIALIZED: one event id per message, shared by its rows for every URL.
        -- The keys of appchat.store.rows.outbox_data (models.Message's fields).
        WITH e AS MATERIALIZED (
            SELECT gen_random_uuid()::text AS event_id, u.nw, u.k, json_build_object(
                'id', u.id, 'application_id', c.application_id, 'sender_id', u.s,
                'content', u.body, 'content_type', u.ct, 'status', 0,
                'create_at', u.nw, 'update_at', u.nw, 'client_msg_id', u.cm)::text AS data
            FROM unnest(v_ids, p_conversation, p_sender, p_content, p_content_type,
                        p_client_msg_id, p_now, v_created)
                 WITH ORDINALITY AS u (id, conv, s, body, ct, cm, nw, ok, k)
            JOIN conversations c ON c.id = u.conv
            WHERE u.ok
        )
        INSERT INTO webhook_outbox (event_id, url, type, occurred_at, data, next_attempt)
        SELECT e.event_id, w.url, 'message.created', e.nw, e.data, e.nw
        FROM e CROSS JOIN unnest(p_webhooks) AS w (url)
        ORDER BY e.k, w.url;
    END IF;
    RETURN QUERY
    WITH ps AS (
        SELECT pa.conversation_id AS conv, array_agg(pa.user_id) AS ids FROM participants pa
        WHERE pa.conversation_id = ANY (p_conversation) GROUP BY pa.conversation_id
    )
    SELECT v_ids[k], v_created[k], v_refused[k], CASE WHEN v_created[k] THEN ps.ids END
    FROM generate_subscripts(p_conversation, 1) AS k
    LEFT JOIN ps ON ps.conv = p_conversation[k]
    ORDER BY k;
END
$$;
