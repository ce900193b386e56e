-- An operator's redeploy is a new run of an earlier run's merge event, with its
-- own id (a run's id is otherwise derived from service, environment and commit).
alter table runs add column redeploy_of uuid references runs (id);
create index runs_redeploy_of on runs (redeploy_of) where redeploy_of is not null;
