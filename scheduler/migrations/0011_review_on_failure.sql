-- A step whose failure flags the run for rollback review instead of rolling
-- it back (pipeline `on_failure = "review"`, e.g. the post-deploy backup).
alter table steps add column review_on_failure boolean not null default false;
