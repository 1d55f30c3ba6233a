-- The support desk: a conversation's status, assignee and snooze time, and its revision
-- (grows with every message and every change of status or assignee, so that a client
-- keeps the newest of two copies of a conversation pushed by two nodes).
ALTER TABLE conversations ADD COLUMN status TEXT NOT NULL DEFAULT 'open'
    CHECK (status IN ('open', 'pending', 'resolved', 'snoozed'));
ALTER TABLE conversations ADD COLUMN assignee_id BIGINT;
ALTER TABLE conversations ADD COLUMN snooze_until BIGINT;
ALTER TABLE conversations ADD COLUMN rev BIGINT NOT NULL DEFAULT 0;
UPDATE conversations SET rev = message_count;
-- The wake-up of snoozed conversations looks for the ones due.
CREATE INDEX conversations_snoozed ON conversations (snooze_until) WHERE status = 'snoozed';
-- (Not with update_at: an index holding it would change with every message.)
CREATE INDEX conversations_assignee ON conversations (assignee_id);

-- appchat_send_batch_v3: appchat_send_batch_v2 (0005) that also keeps the desk's state:
-- each message takes the next revision of its conversation, a customer's message makes a
-- resolved or snoozed conversation open again (recording conversation.updated for the
-- webhooks), and every row of the result carries its conversation as the batch left it.
-- 0005's functions stay for nodes of the previous release.
CREATE FUNCTION appchat_send_batch_v3(
    p_conversation BIGINT[], p_sender BIGINT[], p_staff BOOLEAN[], p_content TEXT[],
    p_content_type SMALLINT[], p_client_msg_id TEXT[], p_now BIGINT[], p_guard BOOLEAN[],
    p_webhooks TEXT[]
) RETURNS TABLE (message_id BIGINT, created BOOLEAN, refused BOOLEAN, participants BIGINT[],
               status TEXT, assignee_id BIGINT, snooze_until BIGINT, rev BIGINT,
               create_at BIGINT, update_at BIGINT, reopened BOOLEAN)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    n INTEGER := coalesce(array_length(p_conversation, 1), 0);
    i INTEGER;
    v_id BIGINT;
    v_ids BIGINT[];
    v_created BOOLEAN[];
    v_refused BOOLEAN[];
    v_reopened BIGINT[];
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    IF TRUE = ANY (p_guard) AND TRUE = ANY (p_staff) AND EXISTS (
        SELECT 1 FROM unnest(p_conversation, p_sender, p_staff, p_guard)
            WITH ORDINALITY AS g (c, s, st, gu, k)
        JOIN unnest(p_conversation, p_sender, p_staff)
            WITH ORDINALITY AS e (c, s, st, k) ON e.c = g.c AND e.s = g.s AND e.k < g.k
        WHERE g.gu AND e.st
    ) THEN
        -- 0004's function checks the rule message by message; the desk's part follows.
        SELECT array_agg(b.message_id ORDER BY b.k), array_agg(b.created ORDER BY b.k),
               array_agg(b.refused ORDER BY b.k)
        INTO v_ids, v_created, v_refused
        FROM appchat_send_batch(
            p_conversation, p_sender, p_staff, p_content, p_content_type, p_client_msg_id,
            p_now, p_guard, p_webhooks) WITH ORDINALITY AS b (message_id, created, refused,
                                                              participants, k);
        UPDATE conversations c SET rev = c.rev + t.k
        FROM (SELECT u.c, count(*) AS k FROM unnest(p_conversation, v_created) AS u (c, ok)
              WHERE u.ok GROUP BY u.c) t
        WHERE c.id = t.c;
    ELSE
        -- Locks first, in id order; ids only after (see 0003).
        PERFORM 1 FROM conversations WHERE id = ANY (p_conversation) ORDER BY id FOR UPDATE;
        IF TRUE = ANY (p_guard) THEN
            SELECT array_agg(coalesce(t.gu AND pa.is_staff, FALSE) ORDER BY t.k) INTO v_refused
            FROM unnest(p_guard, p_conversation, p_sender) WITH ORDINALITY AS t (gu, c, s, k)
            LEFT JOIN participants pa ON pa.conversation_id = t.c AND pa.user_id = t.s;
        ELSE
            v_refused := array_fill(FALSE, ARRAY[n]);
        END IF;
        -- Ids in the batch's order: a connection's messages keep the order it sent them in.
        v_ids := array_fill(NULL::BIGINT, ARRAY[n]);
        FOR i IN 1 .. n LOOP
            IF NOT v_refused[i] THEN
                v_ids[i] := nextval('message_ids');
            END IF;
        END LOOP;
        -- Inserted in the batch's order, so that of two messages with one client_msg_id the
        -- first is stored and the second is its retry.
        WITH ins AS (
            INSERT INTO messages AS m (id, conversation_id, sender_id, content, content_type,
                                       status, client_msg_id, create_at, update_at)
            SELECT t.id, t.c, t.s, t.body, t.ct, 0, t.cm, t.nw, t.nw
            FROM unnest(v_ids, p_conversation, p_sender, p_content, p_content_type,
                        p_client_msg_id, p_now) WITH ORDINALITY AS t (id, c, s, body, ct, cm, nw, k)
            WHERE t.id IS NOT NULL ORDER BY t.k
            ON CONFLICT DO NOTHING
            RETURNING m.id
        )
        SELECT array_agg(ins.id IS NOT NULL ORDER BY g.k) INTO v_created
        FROM unnest(v_ids) WITH ORDINALITY AS g (id, k) LEFT JOIN ins ON ins.id = g.id;
        FOR i IN 1 .. n LOOP
            IF v_ids[i] IS NOT NULL AND NOT v_created[i] THEN  -- a retry: the first one's id
                SELECT m.id INTO v_id FROM messages m
                WHERE m.conversation_id = p_conversation[i] AND m.sender_id = p_sender[i]
                  AND m.client_msg_id = p_client_msg_id[i];
                v_ids[i] := v_id;
            END IF;
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
                                   message_count = c.message_count + t.k,
                                   rev = c.rev + t.k
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
    END IF;
    -- A customer's message reopens a resolved or snoozed conversation (in the messages'
    -- revision: the status is part of the change they made).
    WITH r AS (
        UPDATE conversations c SET status = 'open', snooze_until = NULL
        WHERE c.id IN (SELECT u.c FROM unnest(p_conversation, p_staff, v_created)
                       AS u (c, st, ok) WHERE u.ok AND NOT u.st)
          AND c.status IN ('resolved', 'snoozed')
        RETURNING c.id
    )
    SELECT array_agg(r.id) INTO v_reopened FROM r;
    IF v_reopened IS NOT NULL AND coalesce(cardinality(p_webhooks), 0) > 0 THEN
        -- The keys of appchat.store.rows.outbox_data (models.Conversation's stored fields).
        WITH e AS MATERIALIZED (
            SELECT gen_random_uuid()::text AS event_id, c.update_at AS nw, c.id,
                json_build_object('id', c.id, 'application_id', c.application_id,
                    'create_at', c.create_at, 'update_at', c.update_at, 'status', c.status,
                    'assignee_id', c.assignee_id, 'snooze_until', c.snooze_until,
                    'rev', c.rev)::text AS data
            FROM conversations c WHERE c.id = ANY (v_reopened)
        )
        INSERT INTO webhook_outbox (event_id, url, type, occurred_at, data, next_attempt)
        SELECT e.event_id, w.url, 'conversation.updated', e.nw, e.data, e.nw
        FROM e CROSS JOIN unnest(p_webhooks) AS w (url)
        ORDER BY e.id, w.url;
    END IF;
    RETURN QUERY
    WITH ps AS (
        SELECT pa.conversation_id AS conv, array_agg(pa.user_id) AS ids FROM participants pa
        WHERE pa.conversation_id = ANY (p_conversation) GROUP BY pa.conversation_id
    )
    SELECT v_ids[k], v_created[k], v_refused[k], CASE WHEN v_created[k] THEN ps.ids END,
           c.status, c.assignee_id, c.snooze_until, c.rev, c.create_at, c.update_at,
           coalesce(v_created[k] AND NOT p_staff[k] AND c.id = ANY (v_reopened), FALSE)
    FROM generate_subscripts(p_conversation, 1) AS k
    LEFT JOIN ps ON ps.conv = p_conversation[k]
    JOIN conversations c ON c.id = p_conversation[k]
    ORDER BY k;
END
$$;
