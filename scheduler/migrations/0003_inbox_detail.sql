-- What each applied result said and when its daemon sent it: for diagnosis and
-- for measuring the scheduler's own overhead between steps (baton-bench).
alter table inbox add column step_id text;
alter table inbox add column attempt integer;
alter table inbox add column status text;
alter table inbox add column reported_at timestamptz;
