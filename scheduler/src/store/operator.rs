//! Operators' actions on runs: rollback, cancel, approvals and rejections, releasing a held environment.

use super::*;

impl Store {
    /// An operator asks to roll a run back.
    pub async fn request_rollback(&self, run_id: Uuid, who: &str, reason: &str) -> Result<Vec<OutboxMsg>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::new();
        let Some(mut state) = self.load(&mut tx, run_id).await? else {
            return Err(StoreError::NotFound(run_id));
        };
        // Its own entry, naming who asked, as a cancel has (refused, it is not kept).
        self.history_as(
            &mut tx,
            who,
            Some(run_id),
            None,
            "rollback_requested",
            json!({"reason": reason}),
        )
        .await?;
        state.audit_head = None;
        if matches!(state.status, RunStatus::Succeeded | RunStatus::Failed) {
            // A finished run must hold its service's lock again to be undone.
            admission_lock(&mut tx, &state.service).await?;
            let holder: Option<(Uuid, String)> =
                sqlx::query_as("select run_id, environment from env_locks where service = $1 and run_id <> $2")
                    .bind(&state.service)
                    .bind(run_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some((holder, environment)) = holder {
                return Err(StoreError::Locked {
                    service: state.service,
                    environment,
                    holder,
                });
            }
            sqlx::query(
                "insert into env_locks (service, environment, run_id) values ($1, $2, $3) on conflict do nothing",
            )
            .bind(&state.service)
            .bind(&state.environment)
            .bind(run_id)
            .execute(&mut *tx)
            .await?;
        }
        let mut fx = Vec::new();
        state.request_rollback(reason, Utc::now(), &self.settings, &mut fx)?;
        if self.persist(&mut tx, &mut state, fx, &mut out).await? {
            self.admit(&mut tx, &state.service, &state.environment, &mut out)
                .await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Re-evaluates a run's gates now; a no-op for runs that are not active.
    pub async fn reevaluate(&self, run_id: Uuid) -> Result<Vec<OutboxMsg>, StoreError> {
        self.retrying(|| async {
            let mut tx = self.pool.begin().await?;
            let mut out = Vec::new();
            let now = Utc::now();
            let settings = self.settings.clone();
            self.transition(&mut tx, run_id, &mut out, |state, fx| {
                state.advance(now, &settings, fx);
                Ok(())
            })
            .await?;
            tx.commit().await?;
            Ok(out)
        })
        .await
    }

    /// Records an approval or rejection of a held step by `who`, after the
    /// four-eyes and plan-hash checks, and re-evaluates the run.
    pub async fn decide(&self, run_id: Uuid, ask: gates::Ask<'_>, comment: &str) -> Result<Vec<OutboxMsg>, StoreError> {
        let gates::Ask {
            step,
            plan_hash,
            who,
            decision,
            ..
        } = ask;
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::new();
        let Some(mut state) = self.load(&mut tx, run_id).await? else {
            return Err(StoreError::NotFound(run_id));
        };
        if !state.status.is_active() {
            return Err(EngineError::WrongState {
                run: run_id,
                status: state.status,
                action: if decision == Decision::Approve {
                    "approve"
                } else {
                    "reject"
                },
            }
            .into());
        }
        let now = Utc::now();
        let policy = &self.settings.gates;
        gates::check_decision(&state, ask, &state.facts, policy, now)?;
        // What exactly is approved: checked above to be what the step waits for.
        let subject = state
            .steps
            .iter()
            .find(|s| s.id == step)
            .map(|s| gates::approval_subject(&state, s))
            .unwrap_or_default();
        let expires_at = now + chrono::Duration::seconds(policy.approval.ttl_secs as i64);
        sqlx::query(
            "insert into approvals (run_id, step_id, plan_hash, subject, approver, decision, comment, at, expires_at)
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(run_id)
        .bind(step)
        .bind(plan_hash)
        .bind(&subject)
        .bind(who)
        .bind(if decision == Decision::Approve {
            "approve"
        } else {
            "reject"
        })
        .bind(comment)
        .bind(now)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        let kind = if decision == Decision::Approve {
            "approved"
        } else {
            "rejected"
        };
        self.history_as(
            &mut tx,
            who,
            Some(run_id),
            Some(step),
            kind,
            json!({"plan_hash": plan_hash, "subject": subject, "comment": comment, "expires_at": expires_at}),
        )
        .await?;
        state.audit_head = None;
        state.facts.approvals.push(Approval {
            step_id: step.to_owned(),
            plan_hash: plan_hash.to_owned(),
            subject,
            approver: who.to_owned(),
            decision,
            comment: comment.to_owned(),
            at: now,
            expires_at,
        });
        let mut fx = Vec::new();
        state.advance(now, &self.settings, &mut fx);
        if self.persist(&mut tx, &mut state, fx, &mut out).await? {
            self.admit(&mut tx, &state.service, &state.environment, &mut out)
                .await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// An operator cancels a run (see [`RunState::cancel`]).
    pub async fn cancel(&self, run_id: Uuid, who: &str, reason: &str) -> Result<Vec<OutboxMsg>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::new();
        let Some(mut state) = self.load(&mut tx, run_id).await? else {
            return Err(StoreError::NotFound(run_id));
        };
        self.history_as(
            &mut tx,
            who,
            Some(run_id),
            None,
            "cancel_requested",
            json!({"reason": reason}),
        )
        .await?;
        state.audit_head = None;
        let mut fx = Vec::new();
        state.cancel(&format!("{who}: {reason}"), Utc::now(), &self.settings, &mut fx)?;
        if self.persist(&mut tx, &mut state, fx, &mut out).await? {
            self.admit(&mut tx, &state.service, &state.environment, &mut out)
                .await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Releases an environment held by a run whose rollback failed, once an
    /// operator has put it right, and admits the next waiting run. The release
    /// is in the held run's history with who did it and why. An environment
    /// locked by a run still under way is refused: that is `cancel`'s job.
    pub async fn release_environment(
        &self,
        service: &str,
        environment: &str,
        who: &str,
        reason: &str,
    ) -> Result<(Uuid, Vec<OutboxMsg>), StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::new();
        // Admission's lock first, as `admit` takes it.
        admission_lock(&mut tx, service).await?;
        let held: Option<(Uuid, String)> = sqlx::query_as(
            "select l.run_id, r.status from env_locks l join runs r on r.id = l.run_id
              where l.service = $1 and l.environment = $2",
        )
        .bind(service)
        .bind(environment)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((holder, status)) = held else {
            return Err(StoreError::NotLocked {
                service: service.to_owned(),
                environment: environment.to_owned(),
            });
        };
        if status != RunStatus::RollbackFailed.as_str() {
            return Err(StoreError::InUse {
                service: service.to_owned(),
                environment: environment.to_owned(),
                holder,
                status,
            });
        }
        sqlx::query("delete from env_locks where service = $1 and environment = $2 and run_id = $3")
            .bind(service)
            .bind(environment)
            .bind(holder)
            .execute(&mut *tx)
            .await?;
        self.history_as(
            &mut tx,
            who,
            Some(holder),
            None,
            "environment_released",
            json!({"service": service, "environment": environment, "reason": reason}),
        )
        .await?;
        self.admit(&mut tx, service, environment, &mut out).await?;
        tx.commit().await?;
        Ok((holder, out))
    }

    /// Runs waiting on a gate: what an incident's end or a lapsed timer may release.
    pub async fn held_runs(&self) -> Result<Vec<Uuid>, StoreError> {
        Ok(sqlx::query_scalar(
            "select id from runs where status in ('blocked', 'awaiting_approval', 'running')
               and (hold is not null or exists (select 1 from steps where run_id = runs.id and hold is not null))
             order by seq",
        )
        .fetch_all(&self.pool)
        .await?)
    }
}
