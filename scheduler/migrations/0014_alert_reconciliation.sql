-- Alertmanager incidents: how many alerts Alertmanager cut from the group that
-- opened or repeated an incident (`truncatedAlerts`), and fingerprints an
-- operator resolved by hand while the alert still fired: a repeat of such an
-- alert does not open a new incident until the alert resolves (README,
-- "Incidents from Alertmanager").
alter table incidents add column truncated_alerts integer not null default 0;

create table alert_acks (
    fingerprint      text primary key,
    incident         uuid not null references incidents (id),
    acknowledged_by  text not null,
    acknowledged_at  timestamptz not null default now()
);
