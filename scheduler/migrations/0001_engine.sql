-- Baton's engine state. PostgreSQL is the source of truth; RabbitMQ is transport.

create table runs (
    id              uuid primary key,
    seq             bigserial not null unique,          -- admission order (FIFO per environment)
    service         text not null,
    environment     text not null,
    commit_sha      text not null,
    status          text not null,
    event           jsonb not null,
    plan            jsonb not null,
    plan_hash       text not null,
    trace_context   text,
    completions     integer not null default 0,         -- completion order counter for steps
    rollback_reason text,
    created_at      timestamptz not null default now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    updated_at      timestamptz not null default now()
);
create index runs_waiting on runs (service, environment, seq) where status = 'queued';

create table steps (
    run_id          uuid not null references runs (id),
    step_id         text not null,
    position        integer not null,
    role            text not null,
    zone            text not null,
    action          text not null,
    compensate      text,
    needs           text[] not null,
    included        boolean not null,
    reason          text not null,
    status          text not null,
    attempt         integer not null default 0,          -- fencing number, shared by execute and compensate
    attempt_status  text,                                 -- dispatched | running | waiting (backoff) | null
    exec_attempts   integer not null default 0,
    comp_attempts   integer not null default 0,
    cancel_requested boolean not null default false,
    timeout_ms      bigint not null,
    retry           jsonb not null,
    params          jsonb not null,
    outputs         jsonb not null default '{}',
    error           jsonb,
    completion      integer,                              -- order in which the step succeeded
    started_at      timestamptz,
    finished_at     timestamptz,
    comp_started_at timestamptz,
    comp_finished_at timestamptz,
    primary key (run_id, step_id)
);

create table attempts (
    run_id          uuid not null,
    step_id         text not null,
    attempt         integer not null,
    kind            text not null,                        -- execute | compensate
    message_id      uuid not null,
    status          text not null,                        -- dispatched | running | succeeded | failed | lost
    daemon          text,
    error           jsonb,
    dispatched_at   timestamptz not null,
    started_at      timestamptz,
    finished_at     timestamptz,
    primary key (run_id, step_id, attempt),
    foreign key (run_id, step_id) references steps (run_id, step_id)
);

-- Messages to publish, written in the same transaction as the transition that causes them.
create table outbox (
    id              bigserial primary key,
    exchange        text not null,
    routing_key     text not null,
    message_id      uuid not null,
    body            bytea not null,
    best_effort     boolean not null default false,
    run_id          uuid,
    step_id         text,
    attempt         integer,
    created_at      timestamptz not null default now(),
    claimed_until   timestamptz not null,
    sent_at         timestamptz,
    error           text
);
create index outbox_unsent on outbox (claimed_until) where sent_at is null;

-- Results applied, by message id: a redelivered result is recognised and changes nothing.
create table inbox (
    message_id      uuid primary key,
    run_id          uuid,
    received_at     timestamptz not null default now()
);

-- Durable timers: lease expiry, step timeouts, retry backoff.
create table timers (
    run_id          uuid not null,
    step_id         text not null,
    kind            text not null,                        -- lease | timeout | dispatch
    attempt         integer not null,
    due_at          timestamptz not null,
    primary key (run_id, step_id, kind)
);
create index timers_due on timers (due_at);

-- At most one run in progress per (service, environment).
create table env_locks (
    service         text not null,
    environment     text not null,
    run_id          uuid not null references runs (id),
    acquired_at     timestamptz not null default now(),
    primary key (service, environment)
);

-- The audit log: every transition, refusal and stale message, append-only and
-- hash-chained. Each run's rows form one chain (the run lock already orders
-- them); rows without a run form the global chain. See scheduler/src/audit.rs.
create table audit (
    id              bigserial primary key,
    run_id          uuid,
    step_id         text,
    attempt         integer,
    at              timestamptz not null,
    actor           text not null,
    kind            text not null,
    detail          jsonb not null default '{}',
    prev_hash       text not null,
    hash            text not null
);
create index audit_run on audit (run_id, id);

create function audit_is_append_only() returns trigger language plpgsql as $$
begin
    raise exception 'the audit log is append-only: % refused', tg_op using errcode = 'insufficient_privilege';
end
$$;
create trigger audit_no_update before update or delete on audit
    for each row execute function audit_is_append_only();
create trigger audit_no_truncate before truncate on audit
    for each statement execute function audit_is_append_only();
