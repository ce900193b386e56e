-- Span bookkeeping: the run span's context is runs.trace_context (W3C
-- traceparent); each attempt has its own span id, and spans are exported from
-- these rows once finished, so a scheduler restart loses none of them.
alter table attempts add column span_id text;
alter table attempts add column span_exported boolean not null default false;
alter table runs add column span_exported boolean not null default false;
create index attempts_unexported on attempts (finished_at) where not span_exported;
create index runs_unexported on runs (finished_at) where not span_exported;
