-- Display names: the latest `name` claim of a participant's token, shown as
-- `sender_name` beside their messages. NULL: the token carried none.
ALTER TABLE participants ADD COLUMN name TEXT;
