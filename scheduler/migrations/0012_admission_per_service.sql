-- A service's runs take turns whatever environment they target: admission
-- looks for the service's oldest queued run (docs/decisions.md, "One deploy
-- per service at a time").
create index runs_waiting_by_service on runs (service, seq) where status = 'queued';
