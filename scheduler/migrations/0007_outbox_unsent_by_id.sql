-- The relay's sweeper takes unsent rows in id order: index them in that order,
-- so the scan visits only unsent rows rather than the whole outbox by key.
drop index if exists outbox_unsent;
create index outbox_unsent on outbox (id) where sent_at is null;
