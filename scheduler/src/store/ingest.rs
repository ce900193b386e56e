//! Merge events become runs: ingest, redeploy, and admission to the service's environment lock (docs/decisions.md, "One deploy per service at a time").

use super::*;

/// What links a redeploy to the run it deploys again.
pub(super) struct Redeploy<'a> {
    pub(super) of: Uuid,
    pub(super) of_status: String,
    pub(super) who: &'a str,
    pub(super) reason: &'a str,
}

impl Store {
    /// Records a merge event as a run (once) and admits it if its environment is free.
    pub async fn ingest(&self, event: &MergeEvent, plan: &Plan) -> Result<(Ingested, Vec<OutboxMsg>), StoreError> {
        self.retrying(|| self.try_ingest(event, plan, None)).await
    }

    /// A new run of `earlier`'s merge event, with its own id and through the
    /// same gates: after a rollback and a fix elsewhere, or after a cancel, the
    /// same commit can be deployed again. Refused while `earlier` or another run
    /// of the same commit and environment has not ended. Audited on both runs.
    pub async fn redeploy(
        &self,
        earlier: Uuid,
        who: &str,
        reason: &str,
        pipeline: &crate::pipeline::Pipeline,
    ) -> Result<(Uuid, Vec<OutboxMsg>), StoreError> {
        let row: Option<(Json<MergeEvent>, String)> = sqlx::query_as("select event, status from runs where id = $1")
            .bind(earlier)
            .fetch_optional(&self.pool)
            .await?;
        let Some((Json(event), status)) = row else {
            return Err(StoreError::NotFound(earlier));
        };
        let unfinished: Option<(Uuid, String)> = sqlx::query_as(
            "select id, status from runs
              where service = $1 and environment = $2 and commit_sha = $3
                and status not in ('succeeded', 'failed', 'rolled_back', 'rollback_failed', 'cancelled', 'superseded')
              order by created_at limit 1",
        )
        .bind(&event.service)
        .bind(&event.environment)
        .bind(&event.commit_sha)
        .fetch_optional(&self.pool)
        .await?;
        if let Some((id, status)) = unfinished {
            return Err(StoreError::Unfinished { run: id, status });
        }
        let mut plan = crate::planner::plan(&event, pipeline).map_err(|e| StoreError::Unplannable(e.to_string()))?;
        plan.run_id = Uuid::new_v4();
        plan.hash = plan.computed_hash();
        let link = Redeploy {
            of: earlier,
            of_status: status,
            who,
            reason,
        };
        let (ingested, out) = self.retrying(|| self.try_ingest(&event, &plan, Some(&link))).await?;
        Ok((ingested.run_id(), out))
    }

    pub(super) async fn try_ingest(
        &self,
        event: &MergeEvent,
        plan: &Plan,
        redeploy: Option<&Redeploy<'_>>,
    ) -> Result<(Ingested, Vec<OutboxMsg>), StoreError> {
        let merge_gate = gates::merge_gate(event, &self.settings.gates.merge).map_err(StoreError::MergeGate)?;
        let mut tx = self.pool.begin().await?;
        let state = RunState::planned(event, plan);
        // All steps in the run's statement (their needs and gates are JSON
        // arrays there, which `jsonb_to_recordset` turns into text arrays);
        // they are inserted only if the run was.
        let steps: Vec<Value> = state
            .steps
            .iter()
            .zip(&plan.steps)
            .enumerate()
            .map(|(pos, (s, p))| {
                json!({
                    "step_id": s.id, "position": pos, "role": s.role, "zone": s.zone, "action": s.action,
                    "compensate": s.compensate, "needs": s.needs, "included": s.included, "reason": p.reason,
                    "status": s.status.as_str(), "timeout_ms": s.timeout_ms, "retry": s.retry, "params": s.params,
                    "gates": s.gates, "restore_from_backup": s.restore_from_backup,
                    "review_on_failure": s.review_on_failure,
                })
            })
            .collect();
        let inserted: bool = sqlx::query_scalar(
            "with run as (
                 insert into runs (id, service, environment, commit_sha, status, event, plan, plan_hash, trace_context,
                                   redeploy_of)
                 values ($1, $2, $3, $4, 'queued', $5, $6, $7, $8, $10) on conflict (id) do nothing
                 returning id
             ), steps as (
                 insert into steps (run_id, step_id, position, role, zone, action, compensate, needs, included, reason,
                                    status, timeout_ms, retry, params, gates, restore_from_backup, review_on_failure)
                 select run.id, step_id, position, role, zone, action, compensate, needs, included, reason,
                        status, timeout_ms, retry, params, gates, restore_from_backup, review_on_failure
                   from run, jsonb_to_recordset($9) as x(step_id text, position int, role text, zone text, action text,
                                                         compensate text, needs text[], included bool, reason text,
                                                         status text, timeout_ms bigint, retry jsonb, params jsonb,
                                                         gates text[], restore_from_backup bool, review_on_failure bool)
             )
             select exists (select 1 from run)",
        )
        .bind(plan.run_id)
        .bind(&event.service)
        .bind(&event.environment)
        .bind(&event.commit_sha)
        .bind(Json(event))
        .bind(Json(plan))
        .bind(&plan.hash)
        .bind(baton_shared::telemetry::traceparent(
            baton_shared::telemetry::new_trace_id(),
            baton_shared::telemetry::new_span_id(),
            rand::random::<f64>() < self.sample_ratio,
        ))
        .bind(Json(&steps))
        .bind(redeploy.map(|r| r.of))
        .fetch_one(&mut *tx)
        .await?;
        if !inserted {
            self.history(
                &mut tx,
                Some(plan.run_id),
                None,
                None,
                "duplicate_merge_event",
                json!({"commit_sha": event.commit_sha}),
            )
            .await?;
            tx.commit().await?;
            return Ok((Ingested::Duplicate(plan.run_id), Vec::new()));
        }
        let mut created = json!({"plan_hash": plan.hash, "requested_by": event.requested_by, "included": plan.included().map(|s| s.id.clone()).collect::<Vec<_>>()});
        if let Some(r) = redeploy {
            created["redeploy_of"] = json!(r.of);
            created["redeployed_by"] = json!(r.who);
            created["reason"] = json!(r.reason);
            self.history_as(
                &mut tx,
                r.who,
                Some(r.of),
                None,
                "redeployed",
                json!({"run_id": plan.run_id, "reason": r.reason, "status": r.of_status}),
            )
            .await?;
        }
        let gate = json!({"gate": "merge", "verdict": "pass", "reason": merge_gate});
        let entry = |kind, detail| audit::Entry {
            run_id: Some(plan.run_id),
            step_id: None,
            attempt: None,
            at: Utc::now(),
            actor: &self.actor,
            kind,
            detail,
        };
        let exceptions: Vec<serde_json::Value> = event
            .exceptions
            .iter()
            .map(|e| json!({"rule": e.rule, "reason": e.reason, "requested_by": event.requested_by}))
            .collect();
        let mut entries = vec![entry("run_created", &created), entry("gate", &gate)];
        entries.extend(exceptions.iter().map(|d| entry("rule_exception", d)));
        // Nobody can have read the run yet: its version need not move.
        audit::append_to_new_run(&mut tx, entries).await?;
        let mut out = Vec::new();
        self.admit(&mut tx, &event.service, &event.environment, &mut out)
            .await?;
        tx.commit().await?;
        Ok((Ingested::Created(plan.run_id), out))
    }

    /// Admits waiting runs of the service, oldest first, while none of its
    /// environments is locked: every run of the seed pipeline that targets
    /// production deploys to staging first, so one service's runs take turns
    /// whatever their target (see "One deploy per service at a time" in
    /// docs/decisions.md). Under [`QueuePolicy::Newest`] the older waiting runs
    /// of `environment` are superseded first, so the newest is the one left.
    pub(super) async fn admit(
        &self,
        tx: &mut Tx<'_>,
        service: &str,
        environment: &str,
        out: &mut Vec<OutboxMsg>,
    ) -> Result<(), StoreError> {
        admission_lock(tx, service).await?;
        if self.queue_policy == QueuePolicy::Newest {
            self.supersede_waiting(tx, service, environment, out).await?;
        }
        loop {
            // The lock goes to the service's oldest queued run if no environment
            // of the service is locked (the advisory lock above keeps this check
            // and insert one step).
            let next: Option<(Uuid, String)> = sqlx::query_as(
                "insert into env_locks (service, environment, run_id)
                 select $1, environment, id from runs
                  where service = $1 and status = 'queued'
                    and not exists (select 1 from env_locks where service = $1)
                  order by seq limit 1
                 returning run_id, environment",
            )
            .bind(service)
            .fetch_optional(&mut **tx)
            .await?;
            let Some((run_id, environment)) = next else {
                return Ok(());
            };
            let mut state = self.load(tx, run_id).await?.ok_or(StoreError::NotFound(run_id))?;
            let mut fx = vec![Effect::History {
                step: None,
                attempt: None,
                kind: "lock_acquired",
                detail: json!({"service": service, "environment": environment}),
            }];
            state.start(Utc::now(), &self.settings, &mut fx);
            let released = self.persist(tx, &mut state, fx, out).await?;
            if !released {
                return Ok(());
            }
            // The run ended at once (every step skipped): admit the next one.
        }
    }

    /// Ends every queued run of the environment but the newest `superseded`.
    /// Called under the environment's admission lock.
    pub(super) async fn supersede_waiting(
        &self,
        tx: &mut Tx<'_>,
        service: &str,
        environment: &str,
        out: &mut Vec<OutboxMsg>,
    ) -> Result<(), StoreError> {
        let queued: Vec<Uuid> = sqlx::query_scalar(
            "select id from runs where service = $1 and environment = $2 and status = 'queued' order by seq",
        )
        .bind(service)
        .bind(environment)
        .fetch_all(&mut **tx)
        .await?;
        let Some((&newest, older)) = queued.split_last() else {
            return Ok(());
        };
        for &run_id in older {
            let mut state = self.load(tx, run_id).await?.ok_or(StoreError::NotFound(run_id))?;
            let mut fx = Vec::new();
            state.supersede(newest, Utc::now(), &mut fx)?;
            // It never held the environment's lock: nothing is released.
            self.persist(tx, &mut state, fx, out).await?;
        }
        Ok(())
    }
}
