-- Dead letters, moved from the broker's baton.dead-letters queue into the
-- database by the scheduler, so operators can list and replay them (`baton dlq`)
-- without consuming the queue, and none is lost when one is inspected.
create table dead_letters (
    id              bigserial primary key,
    message_id      text,
    -- The queue the message was refused or expired from, and where it was first published.
    origin          text not null,
    exchange        text not null,
    routing_key     text not null,
    reason          text not null,
    headers         jsonb not null default '{}',
    body            bytea not null,
    run_id          uuid,
    received_at     timestamptz not null default now(),
    replayed_at     timestamptz,
    replayed_by     text
);
-- A dead letter redelivered before its ack is recorded once.
create unique index dead_letters_once on dead_letters (message_id, origin, reason) where message_id is not null;
create index dead_letters_pending on dead_letters (received_at) where replayed_at is null;

-- A step whose compensation reports `irreversible` may fall back to restoring the
-- run's pre-deploy backup (pipeline key restore_from_backup); `restoring` marks
-- that the compensation in flight is that restore.
alter table steps add column restore_from_backup boolean not null default false;
alter table steps add column restoring boolean not null default false;
