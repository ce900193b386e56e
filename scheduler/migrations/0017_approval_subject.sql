-- What an approval approves beyond the run's plan: for a step held by the
-- blast-radius gate, the SHA-256 of the saved Terraform plan it will apply.
-- A plan that goes stale and is re-planned is a new subject and needs its own
-- approval (docs/decisions.md, "A stale plan asks again"). Empty for approvals
-- of steps without one (human-approval).
alter table approvals add column subject text not null default '';
