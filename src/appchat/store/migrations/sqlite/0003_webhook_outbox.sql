-- The webhook outbox: each event of a change (a message, a read, a new conversation) is
-- written here in the change's own transaction, one row per configured URL, and delivered
-- from here (appchat/webhooks.py). Written only while webhooks are configured.
--   next_attempt: when the row is due (microseconds); while a delivery is under way, the
--                 end of its lease; NULL once given up (kept for the operator).
--   data:         the changed object as JSON, shaped for the wire at delivery.
CREATE TABLE webhook_outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT    NOT NULL,
    url          TEXT    NOT NULL,
    type         TEXT    NOT NULL,
    occurred_at  INTEGER NOT NULL,
    data         TEXT    NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt INTEGER,
    last_error   TEXT
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (url, next_attempt, id);
