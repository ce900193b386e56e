//! A transition's writes: one statement for one run, or for many runs at once.
//!
//! Under load, results of many runs are applied at the same time. Their
//! version-guarded writes ([`super::Store::apply_results`]) are combined: while
//! one statement is in flight, the writes that come meanwhile wait and go
//! together in the next one. PostgreSQL's cost of such a statement is mostly per
//! statement (executor start-up, relation locks, the commit), not per row, so
//! this is what lets one scheduler keep up with many runs. Alone, a write goes
//! at once, so latency is not traded for it.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::types::Json;
use sqlx::{PgPool, Row};
use tokio::sync::{Semaphore, oneshot};
use uuid::Uuid;

use super::{Folded, OutboxMsg, StoreError};
use crate::audit;
use crate::engine::{Hold, RunState, StepState};

/// An attempt row a transition creates.
pub(super) struct NewAttempt {
    pub step: String,
    pub attempt: i32,
    pub kind: &'static str,
    pub message_id: Uuid,
    pub at: DateTime<Utc>,
    pub span_id: Option<String>,
}

/// Changes to an existing attempt row (`None`: unchanged).
#[derive(Default)]
pub(super) struct AttemptUpdate {
    pub step: String,
    pub attempt: i32,
    pub status: &'static str,
    pub daemon: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub error: Option<Option<Value>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A result as the inbox records it.
pub(super) struct Inboxed {
    pub message_id: Uuid,
    pub run_id: Uuid,
    pub step_id: String,
    pub attempt: i32,
    pub status: &'static str,
    pub at: DateTime<Utc>,
}

/// What the write statement reported for one run.
pub(super) struct Executed {
    /// Outbox ids by message id.
    ids: HashMap<Uuid, i64>,
    /// The audit rows linked onto the chain's real head (and were written).
    pub audit_ok: bool,
    /// The run was at the expected version (always, without one): the writes happened.
    pub guard_ok: bool,
}

impl Executed {
    /// The outbox messages with the ids they were written under.
    pub fn outbox(&self, run: Uuid, msgs: Vec<OutboxMsg>) -> Result<Vec<OutboxMsg>, StoreError> {
        msgs.into_iter()
            .map(|mut m| {
                m.id = *self.ids.get(&m.message_id).ok_or_else(|| StoreError::Corrupt {
                    run,
                    problem: format!("the outbox row for message {} was not written", m.message_id),
                })?;
                Ok(m)
            })
            .collect()
    }
}

/// What one transition writes, folded so that no two parts touch the same row.
#[derive(Default)]
pub(super) struct Writes {
    pub run: bool,
    /// Indexes of the run's changed steps.
    pub steps: Vec<usize>,
    /// Steps whose timers are deleted (except those in `timers`).
    pub cleared: Vec<String>,
    /// Timers set, at most one per (step, kind).
    pub timers: Vec<(String, &'static str, i32, DateTime<Utc>)>,
    pub dispatched: Vec<NewAttempt>,
    pub updates: Vec<AttemptUpdate>,
}

impl Writes {
    /// The pending update of an attempt; one created in this transition is
    /// updated by a second statement (`late`), as the CTEs share a snapshot.
    pub fn attempt_update<'w>(&'w mut self, late: &'w mut Writes, step: String, attempt: i32) -> &'w mut AttemptUpdate {
        let target = if self.dispatched.iter().any(|a| a.step == step && a.attempt == attempt) {
            &mut late.updates
        } else {
            &mut self.updates
        };
        match target.iter().position(|u| u.step == step && u.attempt == attempt) {
            Some(i) => &mut target[i],
            None => {
                target.push(AttemptUpdate {
                    step,
                    attempt,
                    ..Default::default()
                });
                target.last_mut().expect("just pushed")
            }
        }
    }

    pub fn has_writes(&self, msgs: &[OutboxMsg], released: bool, audit: &audit::Rows) -> bool {
        self.run
            || !self.steps.is_empty()
            || !self.timers.is_empty()
            || !self.cleared.is_empty()
            || !self.dispatched.is_empty()
            || !self.updates.is_empty()
            || !msgs.is_empty()
            || released
            || !audit.is_empty()
    }
}

/// One run's part of a write statement.
pub(super) struct Part<'a> {
    pub state: &'a RunState,
    pub w: &'a Writes,
    /// The run releases its environment's lock.
    pub release: bool,
    pub msgs: &'a [OutboxMsg],
    pub audit: &'a audit::Rows,
    /// For a transition computed without the run's lock; without it, the
    /// caller holds the run's lock.
    pub guard: Option<Guard<'a>>,
}

/// What a transition computed without the run's lock was computed from.
pub(super) struct Guard<'a> {
    /// The run's version it read.
    pub version: i64,
    /// The facts' epoch it read with the gates' facts, if it read them.
    pub epoch: Option<i64>,
    /// The results it records in the inbox.
    pub inbox: &'a [Inboxed],
}

/// The statement's parameters: every part's rows, concatenated, each tagged
/// with its run.
#[derive(Default)]
struct Params<'a> {
    run_id: Vec<Uuid>,
    run_dirty: Vec<bool>,
    run_status: Vec<&'static str>,
    run_completions: Vec<i32>,
    run_rollback_reason: Vec<Option<&'a str>>,
    run_started_at: Vec<Option<DateTime<Utc>>>,
    run_finished_at: Vec<Option<DateTime<Utc>>>,
    run_hold: Vec<Option<Json<&'a Hold>>>,
    run_version: Vec<Option<i64>>,
    run_epoch: Vec<Option<i64>>,
    run_first_prev: Vec<Option<&'a str>>,
    run_release: Vec<bool>,
    run_service: Vec<&'a str>,
    run_environment: Vec<&'a str>,
    step_run: Vec<Uuid>,
    steps: Vec<&'a StepState>,
    cleared_run: Vec<Uuid>,
    cleared_step: Vec<&'a str>,
    timer_run: Vec<Uuid>,
    timers: Vec<&'a (String, &'static str, i32, DateTime<Utc>)>,
    new_run: Vec<Uuid>,
    dispatched: Vec<&'a NewAttempt>,
    update_run: Vec<Uuid>,
    updates: Vec<&'a AttemptUpdate>,
    msg_run: Vec<Uuid>,
    msgs: Vec<&'a OutboxMsg>,
    audit: audit::Rows,
    audit_run: Vec<Uuid>,
    inbox: Vec<&'a Inboxed>,
}

impl<'a> Params<'a> {
    fn push(&mut self, p: &Part<'a>) {
        let s = p.state;
        self.run_id.push(s.id);
        self.run_dirty.push(p.w.run);
        self.run_status.push(s.status.as_str());
        self.run_completions.push(s.completions);
        self.run_rollback_reason.push(s.rollback_reason.as_deref());
        self.run_started_at.push(s.started_at);
        self.run_finished_at.push(s.finished_at);
        self.run_hold.push(s.hold.as_ref().map(Json));
        self.run_version.push(p.guard.as_ref().map(|g| g.version));
        self.run_epoch.push(p.guard.as_ref().and_then(|g| g.epoch));
        self.run_first_prev.push(p.audit.prevs.first().map(String::as_str));
        self.run_release.push(p.release);
        self.run_service.push(&s.service);
        self.run_environment.push(&s.environment);
        for &i in &p.w.steps {
            self.step_run.push(s.id);
            self.steps.push(&s.steps[i]);
        }
        for step in &p.w.cleared {
            self.cleared_run.push(s.id);
            self.cleared_step.push(step);
        }
        for t in &p.w.timers {
            self.timer_run.push(s.id);
            self.timers.push(t);
        }
        for a in &p.w.dispatched {
            self.new_run.push(s.id);
            self.dispatched.push(a);
        }
        for u in &p.w.updates {
            self.update_run.push(s.id);
            self.updates.push(u);
        }
        for m in p.msgs {
            self.msg_run.push(s.id);
            self.msgs.push(m);
        }
        self.audit.extend(p.audit);
        self.audit_run.extend(std::iter::repeat_n(s.id, p.audit.hashes.len()));
        if let Some(g) = &p.guard {
            self.inbox.extend(g.inbox);
        }
    }
}

/// Writes the parts in one statement that commits with the caller's
/// transaction (or on its own); returns what happened to each part, in order.
/// A run appears in at most one part.
pub(super) async fn execute(
    conn: &mut sqlx::PgConnection,
    parts: &[Part<'_>],
    claimed_until: DateTime<Utc>,
) -> Result<Vec<Executed>, StoreError> {
    // Rows are locked in run order, so two statements wait rather than deadlock.
    let mut sorted: Vec<&Part<'_>> = parts.iter().collect();
    sorted.sort_by_key(|p| p.state.id);
    let mut p = Params::default();
    for part in sorted {
        p.push(part);
    }
    let steps = &p.steps;
    let rows = sqlx::query(PERSIST_SQL)
        .bind(&p.run_id)
        .bind(&p.run_dirty)
        .bind(&p.run_status)
        .bind(&p.run_completions)
        .bind(&p.run_rollback_reason)
        .bind(&p.run_started_at)
        .bind(&p.run_finished_at)
        .bind(&p.run_hold)
        .bind(&p.run_version)
        .bind(&p.run_first_prev)
        .bind(&p.run_release)
        .bind(&p.run_service)
        .bind(&p.run_environment)
        .bind(&p.step_run)
        .bind(steps.iter().map(|s| s.id.as_str()).collect::<Vec<_>>())
        .bind(steps.iter().map(|s| s.status.as_str()).collect::<Vec<_>>())
        .bind(steps.iter().map(|s| s.attempt).collect::<Vec<_>>())
        .bind(
            steps
                .iter()
                .map(|s| s.attempt_status.map(|a| a.as_str()))
                .collect::<Vec<_>>(),
        )
        .bind(steps.iter().map(|s| s.exec_attempts).collect::<Vec<_>>())
        .bind(steps.iter().map(|s| s.comp_attempts).collect::<Vec<_>>())
        .bind(steps.iter().map(|s| s.cancel_requested).collect::<Vec<_>>())
        .bind(steps.iter().map(|s| Json(json!(s.outputs))).collect::<Vec<_>>())
        .bind(
            steps
                .iter()
                .map(|s| s.error.as_ref().map(|e| Json(json!(e))))
                .collect::<Vec<_>>(),
        )
        .bind(steps.iter().map(|s| s.completion).collect::<Vec<_>>())
        .bind(steps.iter().map(|s| s.started_at).collect::<Vec<_>>())
        .bind(steps.iter().map(|s| s.finished_at).collect::<Vec<_>>())
        .bind(steps.iter().map(|s| s.comp_started_at).collect::<Vec<_>>())
        .bind(steps.iter().map(|s| s.comp_finished_at).collect::<Vec<_>>())
        .bind(
            steps
                .iter()
                .map(|s| s.hold.as_ref().map(|h| Json(json!(h))))
                .collect::<Vec<_>>(),
        )
        .bind(steps.iter().map(|s| s.restoring).collect::<Vec<_>>())
        .bind(&p.cleared_run)
        .bind(&p.cleared_step)
        .bind(&p.timer_run)
        .bind(p.timers.iter().map(|t| t.0.as_str()).collect::<Vec<_>>())
        .bind(p.timers.iter().map(|t| t.1).collect::<Vec<_>>())
        .bind(p.timers.iter().map(|t| t.2).collect::<Vec<_>>())
        .bind(p.timers.iter().map(|t| t.3).collect::<Vec<_>>())
        .bind(&p.new_run)
        .bind(p.dispatched.iter().map(|a| a.step.as_str()).collect::<Vec<_>>())
        .bind(p.dispatched.iter().map(|a| a.attempt).collect::<Vec<_>>())
        .bind(p.dispatched.iter().map(|a| a.kind).collect::<Vec<_>>())
        .bind(p.dispatched.iter().map(|a| a.message_id).collect::<Vec<_>>())
        .bind(p.dispatched.iter().map(|a| a.at).collect::<Vec<_>>())
        .bind(p.dispatched.iter().map(|a| a.span_id.as_deref()).collect::<Vec<_>>())
        .bind(&p.update_run)
        .bind(p.updates.iter().map(|u| u.step.as_str()).collect::<Vec<_>>())
        .bind(p.updates.iter().map(|u| u.attempt).collect::<Vec<_>>())
        .bind(p.updates.iter().map(|u| u.status).collect::<Vec<_>>())
        .bind(p.updates.iter().map(|u| u.daemon.as_deref()).collect::<Vec<_>>())
        .bind(p.updates.iter().map(|u| u.started_at).collect::<Vec<_>>())
        .bind(p.updates.iter().map(|u| u.error.is_some()).collect::<Vec<_>>())
        .bind(
            p.updates
                .iter()
                .map(|u| u.error.clone().flatten().map(Json))
                .collect::<Vec<_>>(),
        )
        .bind(p.updates.iter().map(|u| u.finished_at).collect::<Vec<_>>())
        .bind(&p.msg_run)
        .bind(p.msgs.iter().map(|m| m.exchange.as_str()).collect::<Vec<_>>())
        .bind(p.msgs.iter().map(|m| m.routing_key.as_str()).collect::<Vec<_>>())
        .bind(p.msgs.iter().map(|m| m.message_id).collect::<Vec<_>>())
        .bind(p.msgs.iter().map(|m| m.body.as_slice()).collect::<Vec<_>>())
        .bind(p.msgs.iter().map(|m| m.best_effort).collect::<Vec<_>>())
        .bind(p.msgs.iter().map(|m| m.run_id).collect::<Vec<_>>())
        .bind(p.msgs.iter().map(|m| m.step_id.as_deref()).collect::<Vec<_>>())
        .bind(p.msgs.iter().map(|m| m.attempt).collect::<Vec<_>>())
        .bind(claimed_until)
        .bind(&p.audit_run)
        .bind(&p.audit.steps)
        .bind(&p.audit.attempts)
        .bind(&p.audit.ats)
        .bind(&p.audit.actors)
        .bind(&p.audit.kinds)
        .bind(&p.audit.details)
        .bind(&p.audit.prevs)
        .bind(&p.audit.hashes)
        .bind(audit::GENESIS)
        .bind(p.inbox.iter().map(|r| r.message_id).collect::<Vec<_>>())
        .bind(p.inbox.iter().map(|r| r.run_id).collect::<Vec<_>>())
        .bind(p.inbox.iter().map(|r| r.step_id.as_str()).collect::<Vec<_>>())
        .bind(p.inbox.iter().map(|r| r.attempt).collect::<Vec<_>>())
        .bind(p.inbox.iter().map(|r| r.status).collect::<Vec<_>>())
        .bind(p.inbox.iter().map(|r| r.at).collect::<Vec<_>>())
        .bind(&p.run_epoch)
        .fetch_all(&mut *conn)
        .await?;
    let mut ids = HashMap::new();
    let mut runs = HashMap::new();
    for r in &rows {
        match r.try_get::<Option<Uuid>, _>("run_id")? {
            Some(run) => {
                runs.insert(
                    run,
                    (r.try_get::<bool, _>("audit_ok")?, r.try_get::<bool, _>("guard_ok")?),
                );
            }
            None => {
                ids.insert(r.try_get::<Uuid, _>("message_id")?, r.try_get::<i64, _>("id")?);
            }
        }
    }
    parts
        .iter()
        .map(|part| {
            let run = part.state.id;
            let (audit_ok, guard_ok) = *runs.get(&run).ok_or_else(|| StoreError::Corrupt {
                run,
                problem: "the write statement did not report on the run".to_owned(),
            })?;
            Ok(Executed {
                ids: part
                    .msgs
                    .iter()
                    .filter_map(|m| ids.get(&m.message_id).map(|&id| (m.message_id, id)))
                    .collect(),
                audit_ok,
                guard_ok,
            })
        })
        .collect()
}

/// A version-guarded write waiting for its statement ([`Batcher::submit`]).
pub(super) struct Guarded {
    pub state: RunState,
    pub folded: Folded,
    pub audit: audit::Rows,
    pub version: i64,
    pub epoch: Option<i64>,
    pub inbox: Vec<Inboxed>,
}

/// `Some`: written, with its outbox messages and the run as written; `None`:
/// the run (or the facts) had moved on and nothing was written.
type Outcome = Result<Option<(Vec<OutboxMsg>, RunState)>, StoreError>;

struct Queued {
    write: Guarded,
    done: oneshot::Sender<Outcome>,
}

/// Combines version-guarded writes of different runs into one statement.
///
/// A write is queued; whoever holds one of the `writers` permits takes what is
/// queued (up to `max_runs` runs, one write per run) and writes it in one
/// statement. So a write never waits for a timer: alone it goes at once, and
/// under load the queue fills while the statements before it run.
pub(super) struct Batcher {
    queue: Mutex<Vec<Queued>>,
    writers: Semaphore,
    max_runs: usize,
}

impl Batcher {
    pub fn new(writers: usize, max_runs: usize) -> Self {
        Self {
            queue: Mutex::new(Vec::new()),
            writers: Semaphore::new(writers.max(1)),
            max_runs: max_runs.max(1),
        }
    }

    /// Writes `write`, alone or with others queued meanwhile.
    pub async fn submit(&self, pool: &PgPool, claim: std::time::Duration, write: Guarded) -> Outcome {
        let (tx, mut rx) = oneshot::channel();
        {
            let mut queue = self.queue.lock().expect("lock");
            queue.push(Queued { write, done: tx });
            report_queue(queue.len());
        }
        loop {
            let permit = tokio::select! {
                biased;
                done = &mut rx => return done.unwrap_or(Ok(None)),
                permit = self.writers.acquire() => permit.expect("the semaphore is never closed"),
            };
            let batch = self.take();
            if batch.is_empty() {
                // Another writer took this write; it answers.
                drop(permit);
                // A writer that vanished before answering may or may not have
                // committed: `None` sends the results the locked way, where the
                // inbox recognises any that were recorded.
                return rx.await.unwrap_or(Ok(None));
            }
            flush(pool, claim, batch).await;
        }
    }

    /// Up to `max_runs` queued writes, oldest first, at most one per run.
    fn take(&self) -> Vec<Queued> {
        let mut queue = self.queue.lock().expect("lock");
        let mut runs = HashSet::new();
        let mut batch = Vec::new();
        let mut i = 0;
        while i < queue.len() && batch.len() < self.max_runs {
            if runs.insert(queue[i].write.state.id) {
                batch.push(queue.remove(i));
            } else {
                i += 1;
            }
        }
        report_queue(queue.len());
        batch
    }
}

/// Writes a batch and answers each write. If the statement fails, each write
/// is tried alone, so one run's conflict or duplicate costs the others nothing.
async fn flush(pool: &PgPool, claim: std::time::Duration, batch: Vec<Queued>) {
    if batch.len() > 1 {
        match write(pool, claim, &batch).await {
            Ok(done) => {
                for (q, d) in batch.into_iter().zip(done) {
                    let _ = q.done.send(outcome(q.write, d));
                }
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, runs = batch.len(), "combined write failed; writing its runs one by one");
            }
        }
    }
    for q in batch {
        let done = write(pool, claim, std::slice::from_ref(&q)).await;
        let out = done.and_then(|mut d| outcome(q.write, d.remove(0)));
        let _ = q.done.send(out);
    }
}

/// Reports how many writes wait for a statement (called with the queue locked).
fn report_queue(len: usize) {
    baton_shared::metrics::global().set(
        "baton_scheduler_write_queue",
        "Version-guarded writes waiting for a write statement on this scheduler replica",
        &[],
        len as f64,
    );
}

/// Counts this replica's write statements and the runs they carried (their
/// ratio is the mean batch size).
fn count_write(runs: usize) {
    let m = baton_shared::metrics::global();
    m.inc(
        "baton_scheduler_write_statements_total",
        "Optimistic write statements this scheduler replica sent",
        &[],
        1.0,
    );
    m.inc(
        "baton_scheduler_written_runs_total",
        "Runs' transitions carried by this replica's optimistic write statements",
        &[],
        runs as f64,
    );
}

async fn write(pool: &PgPool, claim: std::time::Duration, batch: &[Queued]) -> Result<Vec<Executed>, StoreError> {
    let parts: Vec<Part<'_>> = batch
        .iter()
        .map(|q| Part {
            state: &q.write.state,
            w: &q.write.folded.w,
            release: false,
            msgs: &q.write.folded.msgs,
            audit: &q.write.audit,
            guard: Some(Guard {
                version: q.write.version,
                epoch: q.write.epoch,
                inbox: &q.write.inbox,
            }),
        })
        .collect();
    let mut conn = pool.acquire().await?;
    count_write(parts.len());
    execute(&mut conn, &parts, Utc::now() + claim).await
}

fn outcome(write: Guarded, done: Executed) -> Outcome {
    if !done.guard_ok {
        return Ok(None);
    }
    let out = done.outbox(write.state.id, write.folded.msgs)?;
    Ok(Some((out, write.state)))
}

/// The write statement (see [`execute`]). Parameters, one element per run or
/// row, each row tagged with its run:
/// - runs ($1–$13): id, dirty, status, completions, rollback reason, started,
///   finished, hold, the version a guarded write read (null: the caller holds
///   the lock), the `prev_hash` of its first audit row, whether it releases its
///   environment's lock, service, environment;
/// - changed steps ($14–$30);
/// - timers cleared ($31–$32) and set ($33–$37);
/// - attempts dispatched ($38–$44) and updated ($45–$53);
/// - outbox rows ($54–$62), claimed until $63;
/// - audit rows ($64–$72), the genesis hash $73;
/// - results recorded in the inbox ($74–$79);
/// - for each run, the facts' epoch a guarded write read ($80; null: none).
///
/// Each run's row is always updated, bumping its version: that update takes
/// the row lock, and when a version is given, it matches only if nothing
/// changed the run since it was read, its audit head is where it was and, if
/// it read the gates' facts, their epoch is the one it read (PostgreSQL
/// re-checks the row after waiting for a concurrent writer). Every
/// other part of a run writes only if its run's update did.
const PERSIST_SQL: &str = "
with input as (
    select * from unnest($1::uuid[], $2::bool[], $3::text[], $4::int[], $5::text[], $6::timestamptz[],
                         $7::timestamptz[], $8::jsonb[], $9::bigint[], $10::text[], $11::bool[], $12::text[],
                         $13::text[], $80::bigint[])
        as i(id, dirty, status, completions, rollback_reason, started_at, finished_at, hold, version, first_prev,
             release, service, environment, epoch)
), audit_head as (
    -- A run's rows link onto the head the store assumed; if its chain moved on, none is written here.
    select i.id, coalesce(i.first_prev = coalesce((select a.hash from audit a where a.run_id = i.id
                                                    order by a.id desc limit 1), $73), true) as ok
      from input i
), run_update as (
    update runs r set version = r.version + 1,
                      status = case when i.dirty then i.status else r.status end,
                      completions = case when i.dirty then i.completions else r.completions end,
                      rollback_reason = case when i.dirty then i.rollback_reason else r.rollback_reason end,
                      started_at = case when i.dirty then i.started_at else r.started_at end,
                      finished_at = case when i.dirty then i.finished_at else r.finished_at end,
                      hold = case when i.dirty then i.hold else r.hold end,
                      updated_at = case when i.dirty then now() else r.updated_at end
      from input i join audit_head h on h.id = i.id
     -- `any($1)` lets the planner look the runs up by key, whatever it thinks of the table's size.
     where r.id = any($1) and r.id = i.id
       and (i.version is null or (r.version = i.version and h.ok
                                  and (i.epoch is null or i.epoch = (select epoch from fact_epoch))))
    returning r.id
), inbox_insert as (
    insert into inbox (message_id, run_id, step_id, attempt, status, reported_at)
    select x.* from unnest($74::uuid[], $75::uuid[], $76::text[], $77::int[], $78::text[], $79::timestamptz[])
                    as x(message_id, run_id, step_id, attempt, status, reported_at)
     where x.run_id in (select id from run_update)
), step_update as (
    update steps t set status = u.status, attempt = u.attempt, attempt_status = u.attempt_status,
           exec_attempts = u.exec_attempts, comp_attempts = u.comp_attempts, cancel_requested = u.cancel_requested,
           outputs = u.outputs, error = u.error, completion = u.completion, started_at = u.started_at,
           finished_at = u.finished_at, comp_started_at = u.comp_started_at, comp_finished_at = u.comp_finished_at,
           hold = u.hold, restoring = u.restoring
      from unnest($14::uuid[], $15::text[], $16::text[], $17::int[], $18::text[], $19::int[], $20::int[],
                  $21::bool[], $22::jsonb[], $23::jsonb[], $24::int[], $25::timestamptz[], $26::timestamptz[],
                  $27::timestamptz[], $28::timestamptz[], $29::jsonb[], $30::bool[])
           as u(run_id, step_id, status, attempt, attempt_status, exec_attempts, comp_attempts, cancel_requested,
                outputs, error, completion, started_at, finished_at, comp_started_at, comp_finished_at, hold,
                restoring)
     where t.run_id = u.run_id and t.step_id = u.step_id and u.run_id in (select id from run_update)
), timer_clear as (
    delete from timers t
     using unnest($31::uuid[], $32::text[]) as c(run_id, step_id)
     where t.run_id = c.run_id and t.step_id = c.step_id and c.run_id in (select id from run_update)
       and not exists (select 1 from unnest($33::uuid[], $34::text[], $35::text[]) as k(run_id, step_id, kind)
                        where k.run_id = t.run_id and k.step_id = t.step_id and k.kind = t.kind)
), timer_set as (
    insert into timers (run_id, step_id, kind, attempt, due_at)
    select k.run_id, k.step_id, k.kind, k.attempt, k.due_at
      from unnest($33::uuid[], $34::text[], $35::text[], $36::int[], $37::timestamptz[])
           as k(run_id, step_id, kind, attempt, due_at)
     where k.run_id in (select id from run_update)
    on conflict (run_id, step_id, kind) do update set attempt = excluded.attempt, due_at = excluded.due_at,
                                                      renewed = false
), attempt_insert as (
    insert into attempts (run_id, step_id, attempt, kind, message_id, status, dispatched_at, span_id)
    select a.run_id, a.step_id, a.attempt, a.kind, a.message_id, 'dispatched', a.dispatched_at, a.span_id
      from unnest($38::uuid[], $39::text[], $40::int[], $41::text[], $42::uuid[], $43::timestamptz[], $44::text[])
           as a(run_id, step_id, attempt, kind, message_id, dispatched_at, span_id)
     where a.run_id in (select id from run_update)
), attempt_update as (
    update attempts t set status = u.status, daemon = coalesce(u.daemon, t.daemon),
           started_at = coalesce(u.started_at, t.started_at),
           error = case when u.set_error then u.error else t.error end,
           finished_at = coalesce(u.finished_at, t.finished_at)
      from unnest($45::uuid[], $46::text[], $47::int[], $48::text[], $49::text[], $50::timestamptz[], $51::bool[],
                  $52::jsonb[], $53::timestamptz[])
           as u(run_id, step_id, attempt, status, daemon, started_at, set_error, error, finished_at)
     where t.run_id = u.run_id and t.step_id = u.step_id and t.attempt = u.attempt
       and u.run_id in (select id from run_update)
), lock_release as (
    delete from env_locks l
     using input i
     where i.release and l.service = i.service and l.environment = i.environment and l.run_id = i.id
       and i.id in (select id from run_update)
), audit_insert as (
    insert into audit (run_id, step_id, attempt, at, actor, kind, detail, prev_hash, hash)
    select e.run_id, e.step_id, e.attempt, e.at, e.actor, e.kind, e.detail, e.prev_hash, e.hash
      from unnest($64::uuid[], $65::text[], $66::int[], $67::timestamptz[], $68::text[], $69::text[],
                  $70::jsonb[], $71::text[], $72::text[]) with ordinality
           as e(run_id, step_id, attempt, at, actor, kind, detail, prev_hash, hash, n)
     where e.run_id in (select id from audit_head where ok) and e.run_id in (select id from run_update)
     order by e.n
), outbox_insert as (
    insert into outbox (exchange, routing_key, message_id, body, best_effort, run_id, step_id, attempt, claimed_until)
    select o.exchange, o.routing_key, o.message_id, o.body, o.best_effort, o.run_id, o.step_id, o.attempt, $63
      from unnest($54::uuid[], $55::text[], $56::text[], $57::uuid[], $58::bytea[], $59::bool[], $60::uuid[],
                  $61::text[], $62::int[]) with ordinality
           as o(owner, exchange, routing_key, message_id, body, best_effort, run_id, step_id, attempt, n)
     where o.owner in (select id from run_update)
     order by o.n
    returning id, message_id
)
select h.id as run_id, h.ok as audit_ok, h.id in (select id from run_update) as guard_ok,
       null::bigint as id, null::uuid as message_id
  from audit_head h
union all
select null, null, null, o.id, o.message_id from outbox_insert o";
