//! Transitions: load a run (locked, or at a version), let the engine decide, persist the changed rows, history, timers and outbox in the same transaction; results applied pessimistically or optimistically.

use super::*;

/// The results that go into the inbox: heartbeats are idempotent (they only
/// extend a lease), so they skip it.
pub(super) fn inboxed(rs: &[StepResult]) -> Vec<&StepResult> {
    rs.iter()
        .filter(|r| r.status != baton_shared::protocol::ResultStatus::Heartbeat)
        .collect()
}

/// Only an outcome can move a run on (and so evaluate a gate); `started` and
/// heartbeats skip reading the gates' facts.
pub(super) fn moves(rs: &[StepResult]) -> bool {
    rs.iter().any(|r| {
        matches!(
            r.status,
            baton_shared::protocol::ResultStatus::Succeeded | baton_shared::protocol::ResultStatus::Failed
        )
    })
}

/// A transition's effects, folded (see [`Store::fold`]).
pub(super) struct Folded {
    pub(super) now: DateTime<Utc>,
    pub(super) w: Writes,
    /// Updates of attempts created by `w` (a second statement).
    pub(super) late: Writes,
    pub(super) released: bool,
    pub(super) history: Vec<(Option<String>, Option<i32>, &'static str, Value)>,
    pub(super) msgs: Vec<OutboxMsg>,
}

impl Folded {
    /// The audit entries of the transition's history.
    pub(super) fn entries<'a>(&'a self, run_id: Uuid, actor: &'a str) -> Vec<audit::Entry<'a>> {
        self.history
            .iter()
            .map(|(step, attempt, kind, detail)| audit::Entry {
                run_id: Some(run_id),
                step_id: step.as_deref(),
                attempt: *attempt,
                at: self.now,
                actor,
                kind,
                detail,
            })
            .collect()
    }
}

pub(super) fn mark_clean(state: &mut RunState) {
    state.dirty = false;
    for s in &mut state.steps {
        s.dirty = false;
    }
}

impl Store {
    /// Loads a run and locks its row for the rest of the transaction.
    pub(super) async fn load(&self, tx: &mut Tx<'_>, run_id: Uuid) -> Result<Option<RunState>, StoreError> {
        self.load_with(tx, run_id, true).await
    }

    /// Like [`Self::load`]; without `facts` the gates' facts (open incidents,
    /// approvals) are not read, for transitions that cannot evaluate a gate.
    pub(super) async fn load_with(
        &self,
        tx: &mut Tx<'_>,
        run_id: Uuid,
        facts: bool,
    ) -> Result<Option<RunState>, StoreError> {
        Ok(self.load_inboxing(tx, run_id, facts, &[]).await?.0)
    }

    /// [`Self::load_with`], recording `results` in the inbox in the same statement;
    /// also returns the message ids that were new there (all of them count as
    /// recorded when the run is unknown).
    pub(super) async fn load_inboxing(
        &self,
        tx: &mut Tx<'_>,
        run_id: Uuid,
        facts: bool,
        results: &[&StepResult],
    ) -> Result<(Option<RunState>, std::collections::HashSet<Uuid>), StoreError> {
        // The run's audit chain is locked here too (the lock `audit::chain` takes),
        // so its head can be read with the steps, after both locks are held.
        let Some(row) = sqlx::query(concat!(
            r#"with inboxed as (
                 insert into inbox (message_id, run_id, step_id, attempt, status, reported_at)
                 select * from unnest($2::uuid[], $3::uuid[], $4::text[], $5::int[], $6::text[], $7::timestamptz[])
                 on conflict do nothing returning message_id
             )
             select r.event, "#,
            run_columns!(),
            r#",
                    pg_advisory_xact_lock(hashtextextended('audit/' || $1::text, 0))::text,
                    array(select message_id from inboxed) as new_ids
             from runs r where r.id = $1 for update of r"#
        ))
        .bind(run_id)
        .bind(results.iter().map(|r| r.message_id).collect::<Vec<_>>())
        .bind(results.iter().map(|r| r.run_id).collect::<Vec<_>>())
        .bind(results.iter().map(|r| r.step_id.clone()).collect::<Vec<_>>())
        .bind(results.iter().map(|r| r.attempt as i32).collect::<Vec<_>>())
        .bind(results.iter().map(|r| r.status.as_str()).collect::<Vec<_>>())
        .bind(results.iter().map(|r| r.at).collect::<Vec<_>>())
        .fetch_optional(&mut **tx)
        .await?
        else {
            return Ok((None, results.iter().map(|r| r.message_id).collect()));
        };
        let new_ids: Vec<Uuid> = row.try_get("new_ids")?;
        let (mut state, _) = run_from_row(run_id, &row)?;
        // The gates' facts come with the steps when wanted (read after the run's lock).
        let rows = sqlx::query(concat!(
            "select ",
            step_columns!(),
            " from steps s where s.run_id = $1 order by s.position"
        ))
        .bind(run_id)
        .bind(facts && (state.status.is_active() || state.status == RunStatus::Queued))
        .fetch_all(&mut **tx)
        .await?;
        add_steps(&mut state, &rows)?;
        Ok((Some(state), new_ids.into_iter().collect()))
    }

    /// Folds a transition's effects into writes on disjoint rows (the CTEs of
    /// one statement share a snapshot), audit entries and outbox messages.
    pub(super) fn fold(&self, state: &RunState, fx: Effects) -> Folded {
        let now = Utc::now();
        let mut w = Writes::default();
        let mut late = Writes::default();
        w.run = state.dirty;
        w.steps = (0..state.steps.len()).filter(|&i| state.steps[i].dirty).collect();
        let mut released = false;
        let mut history = Vec::new();
        let mut msgs = Vec::new();
        for effect in fx {
            match effect {
                Effect::Dispatch(job) => {
                    w.dispatched.push(NewAttempt {
                        step: job.step_id.clone(),
                        attempt: job.attempt as i32,
                        kind: job.kind.as_str(),
                        message_id: job.message_id,
                        at: job.issued_at,
                        span_id: job
                            .traceparent
                            .as_deref()
                            .and_then(baton_shared::telemetry::parse_traceparent)
                            .map(|sc| sc.span_id().to_string()),
                    });
                    msgs.push(OutboxMsg {
                        id: 0,
                        exchange: JOBS_EXCHANGE.to_owned(),
                        routing_key: job_routing_key(&job.zone, &job.role),
                        message_id: job.message_id,
                        body: job.to_bytes(),
                        best_effort: false,
                        run_id: Some(job.run_id),
                        step_id: Some(job.step_id.clone()),
                        attempt: Some(job.attempt as i32),
                    });
                }
                Effect::Cancel(cancel) => msgs.push(OutboxMsg {
                    id: 0,
                    exchange: CONTROL_EXCHANGE.to_owned(),
                    routing_key: job_routing_key(&cancel.zone, &cancel.role),
                    message_id: cancel.message_id,
                    body: cancel.to_bytes(),
                    best_effort: true,
                    run_id: Some(cancel.run_id),
                    step_id: Some(cancel.step_id.clone()),
                    attempt: Some(cancel.attempt as i32),
                }),
                Effect::SetTimer {
                    step,
                    kind,
                    attempt,
                    due,
                } => {
                    w.timers.retain(|t| !(t.0 == step && t.1 == kind.as_str()));
                    w.timers.push((step, kind.as_str(), attempt, due));
                }
                Effect::ClearTimers { step } => {
                    w.timers.retain(|t| t.0 != step);
                    if !w.cleared.contains(&step) {
                        w.cleared.push(step);
                    }
                }
                Effect::AttemptStarted {
                    step,
                    attempt,
                    daemon,
                    at,
                } => {
                    let u = w.attempt_update(&mut late, step, attempt);
                    u.status = "running";
                    u.daemon = Some(daemon);
                    u.started_at = Some(at);
                }
                Effect::AttemptFinished {
                    step,
                    attempt,
                    status,
                    error,
                    at,
                } => {
                    let u = w.attempt_update(&mut late, step, attempt);
                    u.status = status;
                    u.error = Some(error.as_ref().map(|e| json!(e)));
                    u.finished_at = Some(at);
                }
                Effect::History {
                    step,
                    attempt,
                    kind,
                    detail,
                } => history.push((step, attempt, kind, detail)),
                Effect::ReleaseLock => released = true,
            }
        }
        Folded {
            now,
            w,
            late,
            released,
            history,
            msgs,
        }
    }

    /// Writes what a transition changed; returns whether the run released its lock.
    ///
    /// Everything goes to PostgreSQL in one statement (data-modifying CTEs over
    /// arrays), after the audit chain's lock and head: a transition costs a
    /// handful of round trips whatever it touched.
    pub(super) async fn persist(
        &self,
        tx: &mut Tx<'_>,
        state: &mut RunState,
        fx: Effects,
        out: &mut Vec<OutboxMsg>,
    ) -> Result<bool, StoreError> {
        let f = self.fold(state, fx);
        let entries = || f.entries(state.id, &self.actor);
        let audit_rows = if f.history.is_empty() {
            audit::Rows::default()
        } else {
            let known = state.audit_head.take().map(|h| (state.id, h));
            audit::chain(tx, entries(), known).await?
        };
        if let Some(last) = audit_rows.hashes.last() {
            state.audit_head = Some(last.clone());
        }
        if f.w.has_writes(&f.msgs, f.released, &audit_rows) {
            let part = Part {
                state,
                w: &f.w,
                release: f.released,
                msgs: &f.msgs,
                audit: &audit_rows,
                guard: None,
            };
            let done = write::execute(tx, &[part], f.now + self.claim).await?.remove(0);
            if !done.audit_ok {
                // Something appended to the run's chain since it was loaded without
                // resetting the head: link the entries onto the real head instead.
                tracing::warn!(run_id = %state.id, "audit chain head moved during a transition; relinking its entries");
                audit::append_many(tx, entries()).await?;
                state.audit_head = None;
            }
            out.extend(done.outbox(state.id, f.msgs)?);
        }
        if !f.late.updates.is_empty() {
            let part = Part {
                state,
                w: &f.late,
                release: false,
                msgs: &[],
                audit: &audit::Rows::default(),
                guard: None,
            };
            write::execute(tx, &[part], f.now).await?;
        }
        mark_clean(state);
        self.cache.changed(state.id, state.status.is_terminal());
        Ok(f.released)
    }

    /// [`Self::persist`] for a run read without its lock at `version`, in one
    /// statement that commits on its own: it writes only if the run is still at
    /// that version (and its audit head where it was), and records `inboxed` in
    /// the inbox. [`Unwritten`]: the run moved on, or the transition needs more
    /// than one statement (it ends the run, or updates an attempt it creates);
    /// nothing was written and the caller applies it under the run's lock instead.
    pub(super) async fn persist_guarded(
        &self,
        mut state: RunState,
        fx: Effects,
        version: i64,
        epoch: Option<i64>,
        inbox: Vec<Inboxed>,
    ) -> Result<Result<Vec<OutboxMsg>, Unwritten>, StoreError> {
        let folded = self.fold(&state, fx);
        if folded.released || !folded.late.updates.is_empty() {
            return Ok(Err(Unwritten::NeedsLock));
        }
        let head = state.audit_head.take().unwrap_or_else(|| audit::GENESIS.to_owned());
        let audit = audit::link(head.clone(), folded.entries(state.id, &self.actor));
        let new_head = audit.hashes.last().cloned().unwrap_or(head);
        let write = Guarded {
            state,
            folded,
            audit,
            version,
            epoch,
            inbox,
        };
        let Some((out, mut state)) = self.batcher.submit(&self.pool, self.claim, write).await? else {
            return Ok(Err(Unwritten::Moved));
        };
        // Kept as written, for the run's next results.
        if !state.status.is_terminal() {
            state.audit_head = Some(new_head);
            mark_clean(&mut state);
            self.cache.put(Snapshot {
                state,
                version: version + 1,
                epoch,
                cached: true,
            });
        }
        Ok(Ok(out))
    }

    pub(super) async fn history(
        &self,
        tx: &mut Tx<'_>,
        run_id: Option<Uuid>,
        step: Option<&str>,
        attempt: Option<i32>,
        kind: &str,
        detail: Value,
    ) -> Result<(), StoreError> {
        let entry = audit::Entry {
            run_id,
            step_id: step,
            attempt,
            at: Utc::now(),
            actor: &self.actor,
            kind,
            detail: &detail,
        };
        Ok(audit::append(tx, entry).await?)
    }

    /// Records something that happened outside any transition (a refused message).
    pub async fn record(&self, run_id: Option<Uuid>, kind: &str, detail: Value) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        self.history(&mut tx, run_id, None, None, kind, detail).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Runs `f` on a locked run and persists what it did, admitting the next run if it ended.
    pub(super) async fn transition<T>(
        &self,
        tx: &mut Tx<'_>,
        run_id: Uuid,
        out: &mut Vec<OutboxMsg>,
        f: impl FnOnce(&mut RunState, &mut Effects) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        self.transition_with(tx, run_id, true, out, f).await
    }

    /// [`Self::transition`], reading the gates' facts only if `facts`.
    pub(super) async fn transition_with<T>(
        &self,
        tx: &mut Tx<'_>,
        run_id: Uuid,
        facts: bool,
        out: &mut Vec<OutboxMsg>,
        f: impl FnOnce(&mut RunState, &mut Effects) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let Some(mut state) = self.load_with(tx, run_id, facts).await? else {
            return Ok(None);
        };
        let mut fx = Vec::new();
        let value = f(&mut state, &mut fx)?;
        if self.persist(tx, &mut state, fx, out).await? {
            self.admit(tx, &state.service, &state.environment, out).await?;
        }
        Ok(Some(value))
    }

    /// Applies results of one run, in order, each exactly once, in one transaction:
    /// a run's `started` and outcome that arrive together cost one transition.
    ///
    /// First optimistically: the run is read without a lock and the transition
    /// written by one statement that commits only if the run is still at the
    /// version read (two round trips instead of five). If the run moved on, or
    /// the transition cannot be written that way, it is applied under the
    /// run's row lock.
    ///
    /// `snapshot`: the run as read earlier by [`Self::read_run`] (while waiting
    /// for more results); if the run changed since, the write notices.
    pub async fn apply_results(
        &self,
        rs: &[StepResult],
        snapshot: Option<Snapshot>,
    ) -> Result<(Vec<ResultApplied>, Vec<OutboxMsg>), StoreError> {
        if !self.optimistic {
            return self.retrying(|| self.try_apply_results(rs)).await;
        }
        match self.apply_results_optimistically(rs, snapshot).await {
            Ok(Some(done)) => return Ok(done),
            Ok(None) => {}
            // A result recorded concurrently (unique inbox key) or a conflict: the
            // locked path sorts it out.
            Err(e) if e.is_transient() || e.is_unique_violation() => {}
            Err(e) => return Err(e),
        }
        self.retrying(|| self.try_apply_results(rs)).await
    }

    /// The run as this scheduler last wrote it, if it kept it (and with the
    /// gates' facts if `facts`); otherwise read now ([`Self::read_run`]).
    pub async fn snapshot(&self, run_id: Uuid, facts: bool) -> Result<Option<Snapshot>, StoreError> {
        let kept = self.cache.take(run_id).filter(|s| s.epoch.is_some() || !facts);
        count_snapshot(if kept.is_some() { "kept" } else { "read" });
        match kept {
            Some(s) => Ok(Some(s)),
            None => self.read_run(run_id, facts).await,
        }
    }

    /// Reads a run without locking it, for [`Self::apply_results`]: the run, its
    /// steps, audit head and, if `facts`, the gates' facts, in one snapshot.
    /// `None` if there is no such run, or results are always applied under the lock.
    pub async fn read_run(&self, run_id: Uuid, facts: bool) -> Result<Option<Snapshot>, StoreError> {
        if !self.optimistic {
            return Ok(None);
        }
        let rows = sqlx::query(concat!(
            "select case when row_number() over (order by s.position) = 1 then r.event end as event, ",
            run_columns!(),
            ", ",
            step_columns!(),
            ", case when $2 then (select epoch from fact_epoch) end as fact_epoch
             from runs r join steps s on s.run_id = r.id where r.id = $1 order by s.position"
        ))
        .bind(run_id)
        .bind(facts)
        .fetch_all(&self.pool)
        .await?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let (mut state, version) = run_from_row(run_id, first)?;
        let epoch = first.try_get("fact_epoch")?;
        add_steps(&mut state, &rows)?;
        Ok(Some(Snapshot {
            state,
            version,
            epoch,
            cached: false,
        }))
    }

    /// `None`: the results could not be applied this way (see [`Self::apply_results`]).
    pub(super) async fn apply_results_optimistically(
        &self,
        rs: &[StepResult],
        snapshot: Option<Snapshot>,
    ) -> Result<Option<(Vec<ResultApplied>, Vec<OutboxMsg>)>, StoreError> {
        let Some(run_id) = rs.first().map(|r| r.run_id) else {
            return Ok(Some((Vec::new(), Vec::new())));
        };
        // A snapshot without the facts an outcome's gates need is read again.
        let facts = moves(rs);
        let mut snapshot = match snapshot {
            Some(s) if s.state.id == run_id && (s.epoch.is_some() || !facts) => Some(s),
            _ => self.snapshot(run_id, facts).await?,
        };
        loop {
            let Some(s) = snapshot else {
                return Ok(None);
            };
            let cached = s.cached;
            match self.apply_to_snapshot(rs, s).await? {
                Ok(done) => return Ok(Some(done)),
                // The run changed since this scheduler wrote it (another replica,
                // a timer, an operator): once more from what it is now.
                Err(Unwritten::Moved) if cached => {
                    count_snapshot("stale");
                    self.cache.shared(run_id);
                    snapshot = self.read_run(run_id, facts).await?;
                }
                // The transition is one for the run's lock (it ends the run, say):
                // the snapshot was fine, and reading it again would not help.
                Err(Unwritten::Moved | Unwritten::NeedsLock) => return Ok(None),
            }
        }
    }

    pub(super) async fn apply_to_snapshot(
        &self,
        rs: &[StepResult],
        snapshot: Snapshot,
    ) -> Result<Result<(Vec<ResultApplied>, Vec<OutboxMsg>), Unwritten>, StoreError> {
        let Snapshot {
            mut state,
            version,
            epoch,
            ..
        } = snapshot;
        // Taken as new: a result the inbox already has makes the write fail on
        // the inbox's key, and the locked path records it as a duplicate. Each
        // message id is recorded once, even if it came twice in this batch.
        let mut new_ids = std::collections::HashSet::new();
        let record: Vec<&StepResult> = inboxed(rs)
            .into_iter()
            .filter(|r| new_ids.insert(r.message_id))
            .collect();
        let (outcomes, fx) = self.apply_to(&mut state, rs, &mut new_ids);
        let inbox = record
            .iter()
            .map(|r| Inboxed {
                message_id: r.message_id,
                run_id: r.run_id,
                step_id: r.step_id.clone(),
                attempt: r.attempt as i32,
                status: r.status.as_str(),
                at: r.at,
            })
            .collect();
        Ok(self
            .persist_guarded(state, fx, version, epoch, inbox)
            .await?
            .map(|out| (outcomes, out)))
    }

    pub(super) async fn try_apply_results(
        &self,
        rs: &[StepResult],
    ) -> Result<(Vec<ResultApplied>, Vec<OutboxMsg>), StoreError> {
        let Some(run_id) = rs.first().map(|r| r.run_id) else {
            return Ok((Vec::new(), Vec::new()));
        };
        debug_assert!(rs.iter().all(|r| r.run_id == run_id), "one run per batch");
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::new();
        let (state, mut new_ids) = self.load_inboxing(&mut tx, run_id, moves(rs), &inboxed(rs)).await?;
        let outcomes = match state {
            None => {
                for r in rs {
                    self.history(
                        &mut tx,
                        None,
                        Some(&r.step_id),
                        Some(r.attempt as i32),
                        "result_for_unknown_run",
                        json!({"run_id": r.run_id, "message_id": r.message_id}),
                    )
                    .await?;
                }
                vec![ResultApplied::UnknownRun; rs.len()]
            }
            Some(mut state) => {
                let (outcomes, fx) = self.apply_to(&mut state, rs, &mut new_ids);
                if self.persist(&mut tx, &mut state, fx, &mut out).await? {
                    self.admit(&mut tx, &state.service, &state.environment, &mut out)
                        .await?;
                }
                outcomes
            }
        };
        tx.commit().await?;
        Ok((outcomes, out))
    }

    /// Applies results to a run in order; `new_ids` are the message ids not seen
    /// before (each counts once: it is removed when applied).
    pub(super) fn apply_to(
        &self,
        state: &mut RunState,
        rs: &[StepResult],
        new_ids: &mut std::collections::HashSet<Uuid>,
    ) -> (Vec<ResultApplied>, Effects) {
        let detail = |r: &StepResult| json!({"message_id": r.message_id, "status": r.status.as_str(), "kind": r.kind, "daemon": r.daemon});
        let now = Utc::now();
        let mut fx = Vec::new();
        let mut outcomes = Vec::with_capacity(rs.len());
        for r in rs {
            let step = Some(r.step_id.clone());
            let attempt = Some(r.attempt as i32);
            if r.status != baton_shared::protocol::ResultStatus::Heartbeat && !new_ids.remove(&r.message_id) {
                fx.push(Effect::History {
                    step,
                    attempt,
                    kind: "duplicate_result",
                    detail: detail(r),
                });
                outcomes.push(ResultApplied::Duplicate);
                continue;
            }
            outcomes.push(match state.apply_result(r, now, &self.settings, &mut fx) {
                Applied::Applied => ResultApplied::Applied,
                Applied::Stale(why) => {
                    let mut d = detail(r);
                    d["why"] = json!(why);
                    fx.push(Effect::History {
                        step,
                        attempt,
                        kind: "stale_result",
                        detail: d,
                    });
                    ResultApplied::Stale(why)
                }
            });
        }
        (outcomes, fx)
    }

    pub(super) async fn history_as(
        &self,
        tx: &mut Tx<'_>,
        actor: &str,
        run_id: Option<Uuid>,
        step: Option<&str>,
        kind: &str,
        detail: Value,
    ) -> Result<(), StoreError> {
        let entry = audit::Entry {
            run_id,
            step_id: step,
            attempt: None,
            at: Utc::now(),
            actor,
            kind,
            detail: &detail,
        };
        Ok(audit::append(tx, entry).await?)
    }
}
