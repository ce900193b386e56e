-- Dead letters are attributed before they may decide anything (docs/decisions.md,
-- "Only attributable refusals end an attempt"):
--   verified     the scheduler could attribute it: its own refusal, or a job it
--                signed itself that the broker dead-lettered from that job's queue;
--                only these are linked to a run;
--   arrivals     every arrival counts (a redelivery of the same delivery does not);
--   refused_for  the reason a daemon gave in its signed refusal notice.
alter table dead_letters add column verified boolean not null default false;
alter table dead_letters add column arrivals integer not null default 1;
alter table dead_letters add column last_arrived_at timestamptz not null default now();
alter table dead_letters add column refused_for text;
-- Earlier rows were linked to runs on their body's word alone.
update dead_letters set run_id = null;

-- Daemons' signed refusal notices, so a dead letter arriving after its notice
-- still learns why it was refused.
create table refusals (
    id                  bigserial primary key,
    refused_message_id  text,
    zone                text not null,
    role                text not null,
    daemon              text not null,
    reason              text not null,
    received_at         timestamptz not null default now()
);
create index refusals_message on refusals (refused_message_id);

-- A refusal names the job by its message id.
create index attempts_message on attempts (message_id);
