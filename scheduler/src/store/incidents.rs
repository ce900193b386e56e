//! Incidents: opened by operators or Alertmanager, resolved, reconciled; they hold runs and steps in their environment.

use super::*;

/// Open incidents and this run's approvals, in one round trip.
/// Which incident to resolve.
#[derive(Debug, Clone, Copy)]
pub enum IncidentKey<'a> {
    Id(Uuid),
    Fingerprint(&'a str),
}

/// An incident as the CLI and API show it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq, sqlx::FromRow)]
pub struct IncidentView {
    pub id: Uuid,
    pub environment: String,
    pub title: String,
    pub source: String,
    pub fingerprint: Option<String>,
    pub opened_by: String,
    pub opened_at: DateTime<Utc>,
    pub resolved_by: Option<String>,
    pub resolved_at: Option<DateTime<Utc>>,
    /// Alerts Alertmanager cut from the group that named this incident.
    #[serde(default)]
    pub truncated_alerts: i32,
}

/// What a firing alert did to its incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    Created,
    AlreadyOpen,
    /// An operator resolved it by hand while the alert fired: not reopened.
    Acknowledged,
}

macro_rules! select_incidents {
    ($rest:literal) => {
        concat!(
            "select id, environment, title, source, fingerprint, opened_by, opened_at, resolved_by, resolved_at,
                    truncated_alerts
             from incidents where ",
            $rest
        )
    };
}

pub(super) async fn incident_by(tx: &mut Tx<'_>, key: IncidentKey<'_>) -> Result<Option<IncidentView>, StoreError> {
    Ok(match key {
        IncidentKey::Id(id) => {
            sqlx::query_as(select_incidents!("id = $1"))
                .bind(id)
                .fetch_optional(&mut **tx)
                .await?
        }
        IncidentKey::Fingerprint(f) => {
            sqlx::query_as(select_incidents!("fingerprint = $1 and resolved_at is null"))
                .bind(f)
                .fetch_optional(&mut **tx)
                .await?
        }
    })
}

/// Incidents, newest first: open ones only unless `all`.
pub async fn list_incidents(pool: &PgPool, all: bool) -> Result<Vec<IncidentView>, StoreError> {
    Ok(sqlx::query_as(select_incidents!(
        "($1 or resolved_at is null) order by opened_at desc limit 500"
    ))
    .bind(all)
    .fetch_all(pool)
    .await?)
}

impl Store {
    /// Opens an incident; with a fingerprint (Alertmanager), an open incident with
    /// the same fingerprint is returned instead of a second one.
    pub async fn open_incident(
        &self,
        environment: &str,
        title: &str,
        source: &str,
        fingerprint: Option<&str>,
        who: &str,
    ) -> Result<(IncidentView, Opened), StoreError> {
        let mut tx = self.pool.begin().await?;
        if let Some(f) = fingerprint {
            let acked: Option<Uuid> = sqlx::query_scalar("select incident from alert_acks where fingerprint = $1")
                .bind(f)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(incident) = acked {
                let view = incident_by(&mut tx, IncidentKey::Id(incident))
                    .await?
                    .ok_or_else(|| StoreError::NoOpenIncident(incident.to_string()))?;
                tx.commit().await?;
                return Ok((view, Opened::Acknowledged));
            }
        }
        let id = Uuid::new_v4();
        let inserted = sqlx::query(
            "insert into incidents (id, environment, title, source, fingerprint, opened_by)
             values ($1, $2, $3, $4, $5, $6) on conflict (fingerprint) where resolved_at is null do nothing",
        )
        .bind(id)
        .bind(environment)
        .bind(title)
        .bind(source)
        .bind(fingerprint)
        .bind(who)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let view = if inserted {
            self.history_as(
                &mut tx,
                who,
                None,
                None,
                "incident_opened",
                json!({"incident": id, "environment": environment, "title": title, "source": source}),
            )
            .await?;
            incident_by(&mut tx, IncidentKey::Id(id)).await?
        } else {
            incident_by(&mut tx, IncidentKey::Fingerprint(fingerprint.unwrap_or_default())).await?
        };
        tx.commit().await?;
        let view = view.ok_or_else(|| StoreError::NoOpenIncident(id.to_string()))?;
        Ok((view, if inserted { Opened::Created } else { Opened::AlreadyOpen }))
    }

    /// Alertmanager cut `truncated` alerts from the group that named these
    /// fingerprints: their open incidents say so.
    pub async fn note_truncated(&self, fingerprints: &[String], truncated: u64) -> Result<(), StoreError> {
        let n = i32::try_from(truncated).unwrap_or(i32::MAX);
        sqlx::query(
            "update incidents set truncated_alerts = greatest(truncated_alerts, $2)
              where resolved_at is null and fingerprint = any($1)",
        )
        .bind(fingerprints)
        .bind(n)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// An alert resolved (Alertmanager said so, or it is gone from Alertmanager
    /// when reconciled): its open incident closes, and an operator's
    /// acknowledgement of it ends. Returns the closed incident, if one was open.
    pub async fn alert_resolved(
        &self,
        fingerprint: &str,
        who: &str,
        kind: &str,
    ) -> Result<(Option<IncidentView>, Vec<OutboxMsg>), StoreError> {
        sqlx::query("delete from alert_acks where fingerprint = $1")
            .bind(fingerprint)
            .execute(&self.pool)
            .await?;
        match self
            .resolve_incident_as(IncidentKey::Fingerprint(fingerprint), who, kind)
            .await
        {
            Ok((view, out)) => Ok((Some(view), out)),
            Err(StoreError::NoOpenIncident(_)) => Ok((None, Vec::new())),
            Err(e) => Err(e),
        }
    }

    /// Alertmanager's incidents (open ones and acknowledged fingerprints) whose
    /// alert Alertmanager no longer has: an alert silenced or inhibited when it
    /// resolved never sends a resolved notification. Returns the closed ones.
    pub async fn reconcile_alerts(
        &self,
        active: &std::collections::BTreeSet<String>,
        who: &str,
    ) -> Result<(Vec<Uuid>, Vec<OutboxMsg>), StoreError> {
        let known: Vec<String> = sqlx::query_scalar(
            "select fingerprint from incidents where source = 'alertmanager' and resolved_at is null
                and fingerprint is not null
             union select fingerprint from alert_acks",
        )
        .fetch_all(&self.pool)
        .await?;
        let (mut closed, mut out) = (Vec::new(), Vec::new());
        for f in known.iter().filter(|f| !active.contains(*f)) {
            let (view, more) = self.alert_resolved(f, who, "incident_reconciled").await?;
            closed.extend(view.map(|v| v.id));
            out.extend(more);
        }
        Ok((closed, out))
    }

    /// Resolves an open incident by id or Alertmanager fingerprint and re-evaluates
    /// the runs it may have held.
    pub async fn resolve_incident(
        &self,
        key: IncidentKey<'_>,
        who: &str,
    ) -> Result<(IncidentView, Vec<OutboxMsg>), StoreError> {
        self.resolve_incident_as(key, who, "incident_resolved").await
    }

    pub(super) async fn resolve_incident_as(
        &self,
        key: IncidentKey<'_>,
        who: &str,
        kind: &str,
    ) -> Result<(IncidentView, Vec<OutboxMsg>), StoreError> {
        let mut tx = self.pool.begin().await?;
        let id: Option<Uuid> = match key {
            IncidentKey::Id(id) => {
                sqlx::query_scalar(
                    "update incidents set resolved_at = now(), resolved_by = $2
                     where resolved_at is null and id = $1 returning id",
                )
                .bind(id)
                .bind(who)
                .fetch_optional(&mut *tx)
                .await?
            }
            IncidentKey::Fingerprint(f) => {
                sqlx::query_scalar(
                    "update incidents set resolved_at = now(), resolved_by = $2
                     where resolved_at is null and fingerprint = $1 returning id",
                )
                .bind(f)
                .bind(who)
                .fetch_optional(&mut *tx)
                .await?
            }
        };
        let Some(id) = id else {
            return Err(StoreError::NoOpenIncident(match key {
                IncidentKey::Id(id) => id.to_string(),
                IncidentKey::Fingerprint(f) => format!("with fingerprint {f}"),
            }));
        };
        let view = incident_by(&mut tx, IncidentKey::Id(id))
            .await?
            .ok_or_else(|| StoreError::NoOpenIncident(id.to_string()))?;
        // Resolved by hand while its alert may still fire: repeats of that
        // alert do not reopen it until the alert resolves.
        let acknowledged = matches!(key, IncidentKey::Id(_)) && view.fingerprint.is_some();
        if let (true, Some(f)) = (acknowledged, &view.fingerprint) {
            sqlx::query(
                "insert into alert_acks (fingerprint, incident, acknowledged_by) values ($1, $2, $3)
                 on conflict (fingerprint) do update set incident = $2, acknowledged_by = $3, acknowledged_at = now()",
            )
            .bind(f)
            .bind(id)
            .bind(who)
            .execute(&mut *tx)
            .await?;
        }
        self.history_as(
            &mut tx,
            who,
            None,
            None,
            kind,
            json!({"incident": id, "environment": view.environment, "acknowledged_alert": acknowledged}),
        )
        .await?;
        tx.commit().await?;
        let mut out = Vec::new();
        for run in self.held_runs().await? {
            out.extend(self.reevaluate(run).await?);
        }
        Ok((view, out))
    }
}
