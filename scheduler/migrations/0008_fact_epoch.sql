-- The gates' global facts (open incidents) change rarely, and every change bumps
-- this epoch, whoever makes it (a trigger, so an operator's manual fix counts too).
-- A result transition computed from a run state the scheduler kept in memory, with
-- the facts it read then, writes only if the epoch is still the one it read
-- (store.rs, optimistic apply); a run's own facts (approvals) change only in a
-- transition of the run, which bumps the run's version.
create table fact_epoch (
    only_row boolean primary key default true check (only_row),
    epoch bigint not null
);
insert into fact_epoch (epoch) values (0);

create function bump_fact_epoch() returns trigger language plpgsql as $$
begin
    update fact_epoch set epoch = epoch + 1;
    return null;
end $$;

create trigger incidents_bump_fact_epoch
    after insert or update or delete or truncate on incidents
    for each statement execute function bump_fact_epoch();
