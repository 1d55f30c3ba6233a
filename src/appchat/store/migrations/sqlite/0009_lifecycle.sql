-- Erasure finds what the webhook outbox still holds of an application or of a sender:
-- both read from the event's data (every event names its application; a message's names
-- its sender), so no writer of the outbox has to set them.
ALTER TABLE webhook_outbox ADD COLUMN application_id INTEGER
    GENERATED ALWAYS AS (json_extract(data, '$.application_id')) VIRTUAL;
ALTER TABLE webhook_outbox ADD COLUMN sender_id INTEGER
    GENERATED ALWAYS AS (json_extract(data, '$.sender_id')) VIRTUAL;
CREATE INDEX webhook_outbox_application ON webhook_outbox (application_id);
CREATE INDEX webhook_outbox_sender ON webhook_outbox (sender_id);
-- (No index for retention or a participant's erasure: each would cost every message
-- stored; retention reads the oldest ids, erasure the participant's conversations.)
