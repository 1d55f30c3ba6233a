-- History an agent works with: private notes (staff only), edits and deletions, and each
-- message's revision (the conversation's revision its creation, or its latest edit or
-- deletion, took), so a client that was away asks for what changed since a revision.
ALTER TABLE messages ADD COLUMN private BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE messages ADD COLUMN rev BIGINT NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN edited_at BIGINT;
ALTER TABLE messages ADD COLUMN deleted BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE messages SET rev = r.n FROM (
    SELECT id, row_number() OVER (PARTITION BY conversation_id ORDER BY id) AS n FROM messages
) AS r WHERE messages.id = r.id;
UPDATE conversations SET rev = GREATEST(rev, message_count);
CREATE INDEX messages_changes ON messages (conversation_id, rev);
ALTER TABLE conversations ADD COLUMN private_count BIGINT NOT NULL DEFAULT 0;

-- appchat_send_batch_v4: appchat_send_batch_v3 (0007) that also stores each message's
-- revision and private flag, counts private notes apart, and returns who gets each
-- message's push (a private note: only the staff participants). The staff rule sees the
-- batch's own earlier messages set-wise (a customer's message is refused when its sender
-- id is a staff participant already, or sent as staff earlier in the batch), so no batch
-- is handed to a per-message function any more. v3 served no release: it is replaced.
DROP FUNCTION appchat_send_batch_v3(BIGINT[], BIGINT[], BOOLEAN[], TEXT[], SMALLINT[],
                                    TEXT[], BIGINT[], BOOLEAN[], TEXT[]);
CREATE FUNCTION appchat_send_batch_v4(
    p_conversation BIGINT[], p_sender BIGINT[], p_staff BOOLEAN[], p_content TEXT[],
    p_content_type SMALLINT[], p_client_msg_id TEXT[], p_now BIGINT[], p_guard BOOLEAN[],
    p_private BOOLEAN[], p_webhooks TEXT[]
) RETURNS TABLE (message_id BIGINT, created BOOLEAN, refused BOOLEAN, participants BIGINT[],
                 message_rev BIGINT, status TEXT, assignee_id BIGINT, snooze_until BIGINT,
                 rev BIGINT, create_at BIGINT, update_at BIGINT, reopened BOOLEAN)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    n INTEGER := coalesce(array_length(p_conversation, 1), 0);
    i INTEGER;
    v_id BIGINT;
    v_rev BIGINT;
    v_ids BIGINT[];
    v_revs BIGINT[];
    v_created BOOLEAN[];
    v_refused BOOLEAN[];
    v_reopened BIGINT[];
BEGIN
    IF n = 0 THEN
        RETURN;
    END IF;
    -- Locks first, in id order; ids only after (see 0003).
    PERFORM 1 FROM conversations WHERE id = ANY (p_conversation) ORDER BY id FOR UPDATE;
    IF TRUE = ANY (p_guard) THEN
        SELECT array_agg(coalesce(t.gu AND (coalesce(pa.is_staff, FALSE) OR EXISTS (
                   SELECT 1 FROM unnest(p_conversation, p_sender, p_staff)
                       WITH ORDINALITY AS e (c, s, st, k)
                   WHERE e.c = t.c AND e.s = t.s AND e.k < t.k AND e.st)), FALSE)
               ORDER BY t.k) INTO v_refused
        FROM unnest(p_guard, p_conversation, p_sender) WITH ORDINALITY AS t (gu, c, s, k)
        LEFT JOIN participants pa ON pa.conversation_id = t.c AND pa.user_id = t.s;
    ELSE
        v_refused := array_fill(FALSE, ARRAY[n]);
    END IF;
    -- Ids in the batch's order: a connection's messages keep the order it sent them in;
    -- each message the next revision of its conversation, in the same order (a retry's
    -- goes unused: revisions may skip, never repeat).
    v_ids := array_fill(NULL::BIGINT, ARRAY[n]);
    FOR i IN 1 .. n LOOP
        IF NOT v_refused[i] THEN
            v_ids[i] := nextval('message_ids');
        END IF;
    END LOOP;
    SELECT array_agg(CASE WHEN x.id IS NOT NULL THEN x.base + x.nth END ORDER BY x.k)
    INTO v_revs
    FROM (
        SELECT t.k, t.id, c.rev AS base,
               count(t.id) OVER (PARTITION BY t.c ORDER BY t.k) AS nth
        FROM unnest(v_ids, p_conversation) WITH ORDINALITY AS t (id, c, k)
        JOIN conversations c ON c.id = t.c
    ) x;
    -- Inserted in the batch's order, so that of two messages with one client_msg_id the
    -- first is stored and the second is its retry.
    WITH ins AS (
        INSERT INTO messages AS m (id, conversation_id, sender_id, content, content_type,
                                   status, client_msg_id, create_at, update_at, private, rev)
        SELECT t.id, t.c, t.s, t.body, t.ct, 0, t.cm, t.nw, t.nw, t.pv, t.rv
        FROM unnest(v_ids, p_conversation, p_sender, p_content, p_content_type,
                    p_client_msg_id, p_now, p_private, v_revs)
             WITH ORDINALITY AS t (id, c, s, body, ct, cm, nw, pv, rv, k)
        WHERE t.id IS NOT NULL ORDER BY t.k
        ON CONFLICT DO NOTHING
        RETURNING m.id
    )
    SELECT array_agg(ins.id IS NOT NULL ORDER BY g.k) INTO v_created
    FROM unnest(v_ids) WITH ORDINALITY AS g (id, k) LEFT JOIN ins ON ins.id = g.id;
    FOR i IN 1 .. n LOOP
        IF v_ids[i] IS NOT NULL AND NOT v_created[i] THEN  -- a retry: the first one's id
            SELECT m.id, m.rev INTO v_id, v_rev FROM messages m
            WHERE m.conversation_id = p_conversation[i] AND m.sender_id = p_sender[i]
              AND m.client_msg_id = p_client_msg_id[i];
            v_ids[i] := v_id;
            v_revs[i] := v_rev;
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
                               private_count = c.private_count + t.pk,
                               rev = GREATEST(c.rev, t.rv)
    FROM (SELECT u.c, max(u.nw) AS nw, count(*) AS k, count(*) FILTER (WHERE u.pv) AS pk,
                 max(u.rv) AS rv
          FROM unnest(p_conversation, p_now, v_created, p_private, v_revs)
               AS u (c, nw, ok, pv, rv)
          WHERE u.ok GROUP BY u.c) t
    WHERE c.id = t.c;
    IF coalesce(cardinality(p_webhooks), 0) > 0 THEN
        -- MATERIALIZED: one event id per message, shared by its rows for every URL.
        -- The keys of appchat.store.rows.outbox_data (models.Message's fields).
        WITH e AS MATERIALIZED (
            SELECT gen_random_uuid()::text AS event_id, u.nw, u.k, json_build_object(
                'id', u.id, 'application_id', c.application_id, 'sender_id', u.s,
                'content', u.body, 'content_type', u.ct, 'status', 0,
                'create_at', u.nw, 'update_at', u.nw, 'client_msg_id', u.cm,
                'private', u.pv, 'rev', u.rv)::text AS data
            FROM unnest(v_ids, p_conversation, p_sender, p_content, p_content_type,
                        p_client_msg_id, p_now, v_created, p_private, v_revs)
                 WITH ORDINALITY AS u (id, conv, s, body, ct, cm, nw, ok, pv, rv, k)
            JOIN conversations c ON c.id = u.conv
            WHERE u.ok
        )
        INSERT INTO webhook_outbox (event_id, url, type, occurred_at, data, next_attempt)
        SELECT e.event_id, w.url, 'message.created', e.nw, e.data, e.nw
        FROM e CROSS JOIN unnest(p_webhooks) AS w (url)
        ORDER BY e.k, w.url;
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
        SELECT pa.conversation_id AS conv, array_agg(pa.user_id) AS ids,
               array_agg(pa.user_id) FILTER (WHERE pa.is_staff) AS staff_ids
        FROM participants pa
        WHERE pa.conversation_id = ANY (p_conversation) GROUP BY pa.conversation_id
    )
    SELECT v_ids[k], v_created[k], v_refused[k],
           CASE WHEN NOT v_created[k] THEN NULL
                WHEN p_private[k] THEN coalesce(ps.staff_ids, '{}') ELSE ps.ids END,
           v_revs[k], c.status, c.assignee_id, c.snooze_until, c.rev, c.create_at,
           c.update_at,
           coalesce(v_created[k] AND NOT p_staff[k] AND c.id = ANY (v_reopened), FALSE)
    FROM generate_subscripts(p_conversation, 1) AS k
    LEFT JOIN ps ON ps.conv = p_conversation[k]
    JOIN conversations c ON c.id = p_conversation[k]
    ORDER BY k;
END
$$;
