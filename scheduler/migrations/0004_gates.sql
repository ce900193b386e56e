-- Gates (DESIGN §6): what holds a step or a run, incidents and human approvals.

alter table steps add column gates text[] not null default '{}';
-- The gate holding a pending step: {gate, reason, approval, since, until}.
alter table steps add column hold jsonb;
-- An admission gate holding the whole run (an open incident).
alter table runs add column hold jsonb;

create index runs_active on runs (environment) where status in ('running', 'blocked', 'awaiting_approval');

-- Incidents hold new runs and production steps in their environment while open.
create table incidents (
    id              uuid primary key,
    environment     text not null,
    title           text not null,
    source          text not null,                        -- operator | alertmanager
    -- Alertmanager's alert fingerprint: a resolved notification closes the same incident.
    fingerprint     text,
    opened_by       text not null,
    opened_at       timestamptz not null default now(),
    resolved_by     text,
    resolved_at     timestamptz
);
create index incidents_open on incidents (environment) where resolved_at is null;
create unique index incidents_open_fingerprint on incidents (fingerprint) where resolved_at is null;

-- Human approvals and rejections of held steps, bound to the plan hash.
create table approvals (
    id              bigserial primary key,
    run_id          uuid not null references runs (id),
    step_id         text not null,
    plan_hash       text not null,
    approver        text not null,
    decision        text not null,                        -- approve | reject
    comment         text not null default '',
    at              timestamptz not null default now(),
    expires_at      timestamptz not null,
    foreign key (run_id, step_id) references steps (run_id, step_id)
);
create index approvals_run on approvals (run_id);
