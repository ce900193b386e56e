//! PostgreSQL persistence: one transaction per transition.
//!
//! Each transition locks the run row, loads the run, lets [`crate::engine`]
//! decide, and writes the changed rows, the history, the timers and the outbox
//! messages it causes before committing. Results are recorded in the inbox in
//! the same transaction, so a redelivered result is recognised and changes
//! nothing. Messages are published only after the commit (see `relay`).

use std::time::Duration;

use baton_shared::protocol::{Fields, JobKind, MergeEvent, Message, StepError, StepResult};
use baton_shared::signing::Trusted;
use baton_shared::topology::{CONTROL_EXCHANGE, JOBS_EXCHANGE, job_routing_key};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::audit;
use crate::config::QueuePolicy;
use crate::engine::{Applied, Effect, Effects, EngineError, Hold, RunState, RunStatus, Settings, StepState, TimerKind};
use crate::gates::{self, Approval, Decision, Facts};
use crate::planner::Plan;

mod write;

use write::{Batcher, Guarded, Inboxed, NewAttempt, Part, Writes};

/// A JSON object with the gates' facts of run `$1`: open incidents and the run's approvals.
macro_rules! facts_sql {
    () => {
        "json_build_object(
           'incidents', (select coalesce(json_agg(json_build_object('id', id, 'environment', environment,
                                                   'title', title, 'opened_at', opened_at) order by opened_at), '[]')
                           from incidents where resolved_at is null),
           'approvals', (select coalesce(json_agg(json_build_object('step_id', step_id, 'plan_hash', plan_hash,
                                                   'approver', approver, 'decision', decision, 'comment', comment,
                                                   'at', at, 'expires_at', expires_at) order by id), '[]')
                           from approvals where run_id = $1))"
    };
}

/// A run's columns as [`run_from_row`] reads them (`r` is the run's alias), but
/// for `event`, which a statement returning one row per step reads only once.
macro_rules! run_columns {
    () => {
        "r.service, r.environment, r.plan_hash, r.status as run_status, r.hold as run_hold,
         r.completions, r.rollback_reason, r.trace_context, r.started_at as run_started_at,
         r.finished_at as run_finished_at, r.version"
    };
}

/// A step's columns as [`add_steps`] reads them, with the run's audit head and,
/// when `$2`, the gates' facts (`$1` is the run id).
macro_rules! step_columns {
    () => {
        concat!(
            "s.step_id, s.role, s.zone, s.action, s.compensate, s.restore_from_backup, s.restoring, s.review_on_failure,
             s.needs, s.gates,
             s.hold, s.included, s.status, s.attempt, s.attempt_status, s.exec_attempts, s.comp_attempts,
             s.cancel_requested, s.timeout_ms, s.retry, s.params, s.outputs, s.error, s.completion, s.started_at,
             s.finished_at, s.comp_started_at, s.comp_finished_at,
             (select hash from audit where run_id = $1 order by id desc limit 1) as audit_head,
             case when $2 then ",
            facts_sql!(),
            " end as facts"
        )
    };
}

/// The results that go into the inbox: heartbeats are idempotent (they only
/// extend a lease), so they skip it.
fn inboxed(rs: &[StepResult]) -> Vec<&StepResult> {
    rs.iter()
        .filter(|r| r.status != baton_shared::protocol::ResultStatus::Heartbeat)
        .collect()
}

/// Only an outcome can move a run on (and so evaluate a gate); `started` and
/// heartbeats skip reading the gates' facts.
fn moves(rs: &[StepResult]) -> bool {
    rs.iter().any(|r| {
        matches!(
            r.status,
            baton_shared::protocol::ResultStatus::Succeeded | baton_shared::protocol::ResultStatus::Failed
        )
    })
}

/// A run without its steps, from [`run_columns`]; also returns its version.
fn run_from_row(run_id: Uuid, row: &PgRow) -> Result<(RunState, i64), StoreError> {
    let status: String = row.try_get("run_status")?;
    let Json(event): Json<MergeEvent> = row.try_get("event")?;
    let hold: Option<Json<Hold>> = row.try_get("run_hold")?;
    let state = RunState {
        id: run_id,
        service: row.try_get("service")?,
        environment: row.try_get("environment")?,
        event,
        plan_hash: row.try_get("plan_hash")?,
        status: parse(run_id, &status)?,
        hold: hold.map(|Json(h)| h),
        facts: Facts::default(),
        completions: row.try_get("completions")?,
        rollback_reason: row.try_get("rollback_reason")?,
        trace_context: row.try_get("trace_context")?,
        started_at: row.try_get("run_started_at")?,
        finished_at: row.try_get("run_finished_at")?,
        steps: Vec::new(),
        dirty: false,
        audit_head: None,
    };
    Ok((state, row.try_get("version")?))
}

/// Adds the steps of rows from [`step_columns`], with the audit head and facts.
fn add_steps(state: &mut RunState, rows: &[PgRow]) -> Result<(), StoreError> {
    let run_id = state.id;
    if let Some(r) = rows.first() {
        let head: Option<String> = r.try_get("audit_head")?;
        state.audit_head = Some(head.unwrap_or_else(|| audit::GENESIS.to_owned()));
        if let Some(Json(facts)) = r.try_get::<Option<Json<Facts>>, _>("facts")? {
            state.facts = facts;
        }
    }
    for r in rows {
        let status: String = r.try_get("status")?;
        let attempt_status: Option<String> = r.try_get("attempt_status")?;
        let Json(retry) = r.try_get("retry")?;
        let Json(params) = r.try_get("params")?;
        let Json(outputs) = r.try_get("outputs")?;
        let error: Option<Json<StepError>> = r.try_get("error")?;
        let hold: Option<Json<Hold>> = r.try_get("hold")?;
        state.steps.push(StepState {
            id: r.try_get("step_id")?,
            role: r.try_get("role")?,
            zone: r.try_get("zone")?,
            action: r.try_get("action")?,
            compensate: r.try_get("compensate")?,
            restore_from_backup: r.try_get("restore_from_backup")?,
            restoring: r.try_get("restoring")?,
            review_on_failure: r.try_get("review_on_failure")?,
            needs: r.try_get("needs")?,
            gates: r.try_get("gates")?,
            hold: hold.map(|Json(h)| h),
            included: r.try_get("included")?,
            status: parse(run_id, &status)?,
            attempt: r.try_get("attempt")?,
            attempt_status: attempt_status.map(|s| parse(run_id, &s)).transpose()?,
            exec_attempts: r.try_get("exec_attempts")?,
            comp_attempts: r.try_get("comp_attempts")?,
            cancel_requested: r.try_get("cancel_requested")?,
            timeout_ms: r.try_get("timeout_ms")?,
            retry,
            params,
            outputs,
            error: error.map(|Json(e)| e),
            completion: r.try_get("completion")?,
            started_at: r.try_get("started_at")?,
            finished_at: r.try_get("finished_at")?,
            comp_started_at: r.try_get("comp_started_at")?,
            comp_finished_at: r.try_get("comp_finished_at")?,
            dirty: false,
        });
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(
        "the scheduler has not initialised this database (schema version {applied}, this Baton needs {known}): \
         start `baton scheduler` against it once, or check database.url"
    )]
    NotInitialised { applied: i64, known: i64 },
    #[error("stored run {run} is unreadable: {problem}")]
    Corrupt { run: Uuid, problem: String },
    #[error("run {0} not found")]
    NotFound(Uuid),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Decision(#[from] crate::gates::DecisionError),
    #[error("{0}")]
    MergeGate(String),
    #[error("run {run} of the same commit and environment is {status}; redeploy when it has ended")]
    Unfinished { run: Uuid, status: String },
    #[error("the run's merge event cannot be planned with this pipeline: {0}")]
    Unplannable(String),
    #[error("dead letter {0} not found")]
    NoDeadLetter(i64),
    #[error(
        "dead letter {0} is unverified (the scheduler cannot attribute it to a job it sent or a refusal of its own), \
         so it is not replayed"
    )]
    UnverifiedDeadLetter(i64),
    #[error("dead letter {id} would be refused again ({reason}); it is not replayed")]
    WouldBeRefused { id: i64, reason: String },
    #[error("incident {0} not found or already resolved")]
    NoOpenIncident(String),
    #[error("environment {service}/{environment} is locked by run {holder}; try again when it ends")]
    Locked {
        service: String,
        environment: String,
        holder: Uuid,
    },
    #[error("environment {service}/{environment} is not locked")]
    NotLocked { service: String, environment: String },
    #[error(
        "environment {service}/{environment} is locked by run {holder}, which is {status}, not held after a \
         failed rollback; cancel the run instead (baton cancel)"
    )]
    InUse {
        service: String,
        environment: String,
        holder: Uuid,
        status: String,
    },
}

impl StoreError {
    /// Deadlocks and serialisation failures: the transaction may simply be run again.
    fn is_transient(&self) -> bool {
        match self {
            Self::Db(sqlx::Error::Database(e)) => matches!(e.code().as_deref(), Some("40001" | "40P01")),
            _ => false,
        }
    }

    fn is_unique_violation(&self) -> bool {
        matches!(self, Self::Db(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505"))
    }

    /// PostgreSQL's certificate was not accepted, or the TLS settings in the
    /// database URL cannot be used: waiting will not change that.
    pub fn is_tls_refusal(&self) -> bool {
        match self {
            Self::Db(sqlx::Error::Tls(_)) => true,
            Self::Db(sqlx::Error::Io(io)) => io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|e| {
                    matches!(
                        e,
                        rustls::Error::InvalidCertificate(_)
                            | rustls::Error::NoCertificatesPresented
                            | rustls::Error::UnsupportedNameType
                    )
                }),
            _ => false,
        }
    }

    /// The database is unreachable: wait and try again rather than give up.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Db(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_))
        ) || matches!(self, Self::Db(sqlx::Error::Database(e)) if e.code().as_deref().is_some_and(|c| c.starts_with("57P") || c.starts_with("08")))
    }
}

type Tx<'a> = Transaction<'a, Postgres>;

/// A message the relay must publish, already committed to the outbox.
#[derive(Debug, Clone)]
pub struct OutboxMsg {
    pub id: i64,
    pub exchange: String,
    pub routing_key: String,
    pub message_id: Uuid,
    pub body: Vec<u8>,
    pub best_effort: bool,
    pub run_id: Option<Uuid>,
    pub step_id: Option<String>,
    pub attempt: Option<i32>,
}

/// A run read without its lock, at a version ([`Store::read_run`]), or as this
/// scheduler last wrote it.
pub struct Snapshot {
    state: RunState,
    version: i64,
    /// The facts' epoch when the gates' facts were read with the run; `None`: not read.
    epoch: Option<i64>,
    /// Kept from this scheduler's own last write, not read now.
    cached: bool,
}

/// Why an optimistic transition wrote nothing ([`Store::persist_guarded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unwritten {
    /// The run is no longer at the version (or audit head) it was computed
    /// from, or the write's outcome is unknown.
    Moved,
    /// The transition needs more than one statement; the snapshot may be current.
    NeedsLock,
}

/// Runs as this scheduler last wrote them, so that their next results need no
/// read ([`Store::apply_results`]). Bounded: when full, it starts over.
#[derive(Default)]
struct Cache {
    runs: std::sync::Mutex<std::collections::HashMap<Uuid, Kept>>,
}

enum Kept {
    Run(Box<Snapshot>),
    /// A kept copy of this run was found stale: another replica applies its
    /// results too, so keeping it would mostly waste writes.
    Shared,
}

/// Counts where the run a transition was computed from came from: kept in
/// memory, read, or kept but found stale by the write.
fn count_snapshot(source: &str) {
    baton_shared::metrics::global().inc(
        "baton_scheduler_run_snapshots_total",
        "Runs that result transitions were computed from, by source (kept: this replica's own last write; read; stale: kept but changed since, read again)",
        &[("source", source)],
        1.0,
    );
}

/// The most runs [`Cache`] keeps.
const CACHED_RUNS: usize = 10_000;

impl Cache {
    fn take(&self, run: Uuid) -> Option<Snapshot> {
        let mut runs = self.runs.lock().expect("lock");
        match runs.remove(&run)? {
            Kept::Run(s) => Some(*s),
            Kept::Shared => {
                runs.insert(run, Kept::Shared);
                None
            }
        }
    }

    /// Keeps `snapshot`, unless its run is shared with another replica.
    fn put(&self, snapshot: Snapshot) {
        let mut runs = self.runs.lock().expect("lock");
        if runs.len() >= CACHED_RUNS {
            runs.clear();
        }
        if !matches!(runs.get(&snapshot.state.id), Some(Kept::Shared)) {
            runs.insert(snapshot.state.id, Kept::Run(Box::new(snapshot)));
        }
    }

    fn shared(&self, run: Uuid) {
        let mut runs = self.runs.lock().expect("lock");
        if runs.len() >= CACHED_RUNS {
            runs.clear();
        }
        runs.insert(run, Kept::Shared);
    }

    /// Drops the kept copy of a run changed under its lock (all of it if the
    /// run ended).
    fn changed(&self, run: Uuid, ended: bool) {
        let mut runs = self.runs.lock().expect("lock");
        if ended || matches!(runs.get(&run), Some(Kept::Run(_))) {
            runs.remove(&run);
        }
    }
}

/// What ingesting a merge event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingested {
    Created(Uuid),
    /// The same (service, environment, commit) was ingested before: one run.
    Duplicate(Uuid),
}

impl Ingested {
    pub fn run_id(&self) -> Uuid {
        match self {
            Self::Created(id) | Self::Duplicate(id) => *id,
        }
    }
}

/// What applying a result did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultApplied {
    Applied,
    Duplicate,
    Stale(String),
    UnknownRun,
}

/// A timer that came due.
#[derive(Debug, Clone)]
pub struct DueTimer {
    pub run_id: Uuid,
    pub step_id: String,
    pub kind: TimerKind,
    pub attempt: i32,
    pub due_at: DateTime<Utc>,
}

/// Optimistic write statements in flight at once, and runs one of them
/// carries, unless configured ([`Store::with_writes`]).
const DEFAULT_WRITES: (usize, usize) = (1, 64);

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    settings: Settings,
    claim: Duration,
    actor: String,
    /// Share of new runs whose trace is sampled.
    sample_ratio: f64,
    /// Results are applied optimistically first (see [`Store::apply_results`]).
    optimistic: bool,
    /// Combines the optimistic writes of different runs.
    batcher: std::sync::Arc<Batcher>,
    cache: std::sync::Arc<Cache>,
    /// Which waiting run an environment admits next.
    queue_policy: QueuePolicy,
}

/// The notification channel on which replicas announce joining and leaving.
pub const REPLICAS_CHANNEL: &str = "baton_replicas";

/// Opens a pool; `url` is a PostgreSQL URL.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, StoreError> {
    let opts: PgConnectOptions = url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(|_, _| {
            Box::pin(async {
                baton_shared::nodelay::on_every_tcp_socket();
                Ok(())
            })
        })
        .connect_with(opts)
        .await?;
    Ok(pool)
}

/// Serialises a dead letter and the refusal notice of the same message: each
/// looks for the other, and neither may miss the other by committing alongside.
async fn refusal_lock(tx: &mut Tx<'_>, message_id: &str) -> Result<(), StoreError> {
    sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("refusal/{message_id}"))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Serialises admission to one service's environments across scheduler
/// replicas (and an operator's release or rollback), until the transaction
/// ends; taken again by the same transaction, it is already held.
async fn admission_lock(tx: &mut Tx<'_>, service: &str) -> Result<(), StoreError> {
    sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("admission/{service}"))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::migrate!("./migrations").run(pool).await?;
    Ok(())
}

/// Checks that a scheduler of this version has initialised the database
/// (applied every migration this build knows), for commands that read the
/// scheduler's tables without being a scheduler: a database nobody migrated
/// gets an error saying so instead of a missing relation.
pub async fn require_initialised(pool: &PgPool) -> Result<(), StoreError> {
    let known = sqlx::migrate!("./migrations")
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0);
    let has_table: bool = sqlx::query_scalar("select to_regclass('_sqlx_migrations') is not null")
        .fetch_one(pool)
        .await?;
    let applied: Option<i64> = if has_table {
        sqlx::query_scalar("select max(version) from _sqlx_migrations where success")
            .fetch_one(pool)
            .await?
    } else {
        None
    };
    match applied {
        Some(v) if v >= known => Ok(()),
        applied => Err(StoreError::NotInitialised {
            applied: applied.unwrap_or(0),
            known,
        }),
    }
}

fn parse<T: std::str::FromStr<Err = String>>(run: Uuid, s: &str) -> Result<T, StoreError> {
    s.parse().map_err(|problem| StoreError::Corrupt { run, problem })
}

impl Store {
    pub fn new(pool: PgPool, settings: Settings, claim: Duration, actor: impl Into<String>) -> Self {
        Self {
            pool,
            settings,
            claim,
            actor: actor.into(),
            sample_ratio: 1.0,
            optimistic: true,
            batcher: std::sync::Arc::new(Batcher::new(DEFAULT_WRITES.0, DEFAULT_WRITES.1)),
            cache: std::sync::Arc::default(),
            queue_policy: QueuePolicy::Fifo,
        }
    }

    /// Which waiting run an environment admits next (FIFO by default).
    pub fn with_queue_policy(mut self, policy: QueuePolicy) -> Self {
        self.queue_policy = policy;
        self
    }

    /// Sets the share of runs whose traces are sampled.
    pub fn with_sample_ratio(mut self, ratio: f64) -> Self {
        self.sample_ratio = ratio;
        self
    }

    /// Whether results are applied optimistically first (the default).
    pub fn with_optimistic_apply(mut self, on: bool) -> Self {
        self.optimistic = on;
        self
    }

    /// How many optimistic write statements may be in flight at once, and how
    /// many runs' writes one of them may carry.
    pub fn with_writes(mut self, concurrency: usize, batch: usize) -> Self {
        self.batcher = std::sync::Arc::new(Batcher::new(concurrency, batch));
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs a transition again when PostgreSQL reports a deadlock or serialisation failure.
    async fn retrying<T, F, Fut>(&self, mut f: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut tries = 0;
        loop {
            tries += 1;
            match f().await {
                Err(e) if e.is_transient() && tries < 10 => {
                    tracing::debug!(error = %e, "transient database conflict; retrying transition");
                    tokio::time::sleep(Duration::from_millis(5 * tries)).await;
                }
                other => return other,
            }
        }
    }

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

    async fn try_ingest(
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
    async fn admit(
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
    async fn supersede_waiting(
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

    /// Loads a run and locks its row for the rest of the transaction.
    async fn load(&self, tx: &mut Tx<'_>, run_id: Uuid) -> Result<Option<RunState>, StoreError> {
        self.load_with(tx, run_id, true).await
    }

    /// Like [`Self::load`]; without `facts` the gates' facts (open incidents,
    /// approvals) are not read, for transitions that cannot evaluate a gate.
    async fn load_with(&self, tx: &mut Tx<'_>, run_id: Uuid, facts: bool) -> Result<Option<RunState>, StoreError> {
        Ok(self.load_inboxing(tx, run_id, facts, &[]).await?.0)
    }

    /// [`Self::load_with`], recording `results` in the inbox in the same statement;
    /// also returns the message ids that were new there (all of them count as
    /// recorded when the run is unknown).
    async fn load_inboxing(
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
    fn fold(&self, state: &RunState, fx: Effects) -> Folded {
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
    async fn persist(
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
    async fn persist_guarded(
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

    async fn history(
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
    async fn transition<T>(
        &self,
        tx: &mut Tx<'_>,
        run_id: Uuid,
        out: &mut Vec<OutboxMsg>,
        f: impl FnOnce(&mut RunState, &mut Effects) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        self.transition_with(tx, run_id, true, out, f).await
    }

    /// [`Self::transition`], reading the gates' facts only if `facts`.
    async fn transition_with<T>(
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
    async fn apply_results_optimistically(
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

    async fn apply_to_snapshot(
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

    async fn try_apply_results(&self, rs: &[StepResult]) -> Result<(Vec<ResultApplied>, Vec<OutboxMsg>), StoreError> {
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
    fn apply_to(
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

    /// Timers due now, oldest first (candidates; each is re-checked under the run lock).
    pub async fn due_timers(&self, limit: i64) -> Result<Vec<DueTimer>, StoreError> {
        let rows = sqlx::query(
            "select run_id, step_id, kind, attempt, due_at from timers where due_at <= now() order by due_at limit $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                let run_id: Uuid = r.try_get("run_id")?;
                let kind: String = r.try_get("kind")?;
                Ok(DueTimer {
                    run_id,
                    step_id: r.try_get("step_id")?,
                    kind: parse(run_id, &kind)?,
                    attempt: r.try_get("attempt")?,
                    due_at: r.try_get("due_at")?,
                })
            })
            .collect()
    }

    /// When the next timer is due, if any.
    pub async fn next_timer_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(sqlx::query_scalar("select min(due_at) from timers")
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn fire_timer(&self, t: &DueTimer) -> Result<Vec<OutboxMsg>, StoreError> {
        self.retrying(|| self.try_fire_timer(t)).await
    }

    async fn try_fire_timer(&self, t: &DueTimer) -> Result<Vec<OutboxMsg>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::new();
        // Lock order is always run row first, then timers: every timer write happens
        // under the run lock, so after taking it the timer row can be trusted.
        let locked: Option<Uuid> = sqlx::query_scalar("select id from runs where id = $1 for update")
            .bind(t.run_id)
            .fetch_optional(&mut *tx)
            .await?;
        if locked.is_none() {
            return Ok(out);
        }
        let still_due = sqlx::query(
            "delete from timers where run_id = $1 and step_id = $2 and kind = $3 and attempt = $4 and due_at <= now()",
        )
        .bind(t.run_id)
        .bind(&t.step_id)
        .bind(t.kind.as_str())
        .bind(t.attempt)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if still_due {
            let now = Utc::now();
            let settings = self.settings.clone();
            self.transition(&mut tx, t.run_id, &mut out, |state, fx| {
                state.fire_timer(&t.step_id, t.kind, t.attempt, now, &settings, fx);
                Ok(())
            })
            .await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// After a restart, running attempts get one more lease period: their heartbeats
    /// may be waiting unread in `baton.results` while no scheduler was consuming.
    /// Each lease is renewed at most once between two of its attempt's
    /// heartbeats, so replicas restarting in a loop cannot keep a dead
    /// daemon's attempt alive (docs/decisions.md, "Leases after a scheduler restart").
    pub async fn renew_leases(&self) -> Result<u64, StoreError> {
        let lease = self.settings.lease.as_millis() as f64 / 1000.0;
        Ok(sqlx::query(
            "update timers set due_at = greatest(due_at, now() + make_interval(secs => $1)), renewed = true
              where kind = 'lease' and not renewed",
        )
        .bind(lease)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Makes every gate hold that waits for a time (a maintenance window, the
    /// staging soak) due now, so its gates are evaluated again under this
    /// process's configuration: a window added or a soak shortened before a
    /// restart applies to runs already waiting. Returns how many were due later.
    pub async fn recheck_timed_holds(&self) -> Result<u64, StoreError> {
        Ok(
            sqlx::query("update timers set due_at = now() where kind = 'gate' and due_at > now()")
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }

    /// Whether another scheduler replica was alive a moment ago (its
    /// membership heartbeat is at most `within` old): it was consuming
    /// results, so no heartbeat waited unread and no lease needs renewing.
    pub async fn another_replica_alive(&self, within: Duration) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(
            "select exists (select 1 from scheduler_replicas
                             where seen_at > now() - $1 * interval '1 millisecond')",
        )
        .bind(within.as_millis() as i64)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Records that replica `id` is alive and returns the replicas seen within
    /// `live_for`, in id order (always including `id`). Rows silent for ten
    /// times as long are removed.
    pub async fn replica_heartbeat(&self, id: Uuid, live_for: Duration) -> Result<Vec<Uuid>, StoreError> {
        let live_ms = live_for.as_millis() as i64;
        Ok(sqlx::query_scalar(
            "with beat as (
                 insert into scheduler_replicas (id, instance) values ($1, $3)
                 on conflict (id) do update set seen_at = now()
             ), gone as (
                 delete from scheduler_replicas
                  where id <> $1 and seen_at < now() - $2 * 10 * interval '1 millisecond'
             )
             select id from scheduler_replicas where id <> $1 and seen_at > now() - $2 * interval '1 millisecond'
             union select $1
             order by 1",
        )
        .bind(id)
        .bind(live_ms)
        .bind(&self.actor)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Removes replica `id` (a clean shutdown), and tells the others.
    pub async fn replica_leave(&self, id: Uuid) -> Result<(), StoreError> {
        sqlx::query("delete from scheduler_replicas where id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        self.replicas_changed().await
    }

    /// Wakes every replica's membership loop (`LISTEN` on [`REPLICAS_CHANNEL`]),
    /// so a replica joining or leaving is noticed at once, not at the next beat.
    pub async fn replicas_changed(&self) -> Result<(), StoreError> {
        sqlx::query("select pg_notify($1, '')")
            .bind(REPLICAS_CHANNEL)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Marks published outbox rows as sent.
    ///
    /// Committed without waiting for the WAL flush: a mark lost in a database
    /// crash only makes the sweeper publish the row again, which receivers
    /// absorb (message ids, attempt fencing). One round trip: the setting is
    /// made by the statement itself and lasts for its own transaction.
    pub async fn mark_sent(&self, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "update outbox set sent_at = now()
              where id = any($1) and set_config('synchronous_commit', 'off', true) = 'off'",
        )
        .bind(ids)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A job came back unroutable: mark it and fail its attempt.
    pub async fn job_unroutable(&self, msg: &OutboxMsg, message: &str) -> Result<Vec<OutboxMsg>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::new();
        sqlx::query("update outbox set sent_at = now(), error = $2 where id = $1")
            .bind(msg.id)
            .bind(message)
            .execute(&mut *tx)
            .await?;
        if let (Some(run), Some(step), Some(attempt)) = (msg.run_id, &msg.step_id, msg.attempt) {
            let now = Utc::now();
            let settings = self.settings.clone();
            self.transition(&mut tx, run, &mut out, |state, fx| {
                state.job_unroutable(step, attempt, message.to_owned(), now, &settings, fx);
                Ok(())
            })
            .await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Takes over unsent outbox rows whose claim lapsed (their publisher died or failed).
    pub async fn claim_unsent(&self, limit: i64) -> Result<Vec<OutboxMsg>, StoreError> {
        let claim = self.claim.as_millis() as f64 / 1000.0;
        let rows = sqlx::query(
            "update outbox set claimed_until = now() + make_interval(secs => $2)
             where id in (select id from outbox where sent_at is null and claimed_until < now()
                          order by id limit $1 for update skip locked)
             returning id, exchange, routing_key, message_id, body, best_effort, run_id, step_id, attempt",
        )
        .bind(limit)
        .bind(claim)
        .fetch_all(&self.pool)
        .await?;
        let mut msgs = rows
            .into_iter()
            .map(|r| {
                Ok(OutboxMsg {
                    id: r.try_get("id")?,
                    exchange: r.try_get("exchange")?,
                    routing_key: r.try_get("routing_key")?,
                    message_id: r.try_get("message_id")?,
                    body: r.try_get("body")?,
                    best_effort: r.try_get("best_effort")?,
                    run_id: r.try_get("run_id")?,
                    step_id: r.try_get("step_id")?,
                    attempt: r.try_get("attempt")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        msgs.sort_by_key(|m| m.id);
        Ok(msgs)
    }

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
    pub async fn decide(
        &self,
        run_id: Uuid,
        step: &str,
        plan_hash: &str,
        who: &str,
        decision: Decision,
        comment: &str,
    ) -> Result<Vec<OutboxMsg>, StoreError> {
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
        let ask = gates::Ask {
            step,
            plan_hash,
            who,
            decision,
        };
        gates::check_decision(&state, ask, &state.facts, policy, now)?;
        let expires_at = now + chrono::Duration::seconds(policy.approval.ttl_secs as i64);
        sqlx::query(
            "insert into approvals (run_id, step_id, plan_hash, approver, decision, comment, at, expires_at)
             values ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(run_id)
        .bind(step)
        .bind(plan_hash)
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
            json!({"plan_hash": plan_hash, "comment": comment, "expires_at": expires_at}),
        )
        .await?;
        state.audit_head = None;
        state.facts.approvals.push(Approval {
            step_id: step.to_owned(),
            plan_hash: plan_hash.to_owned(),
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

    async fn resolve_incident_as(
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

    /// Records a dead letter's arrival (every arrival counts; a redelivery of
    /// the same delivery does not). Only an attributable one ([`NewDeadLetter::job`]:
    /// a job this scheduler signed, dead-lettered by the broker from its own
    /// queue) is linked to its run, and only one the broker gave up on after its
    /// delivery limit, whose attempt no daemon started, fails that attempt: a
    /// poison message that crashed every daemon it reached. Anything else is
    /// kept apart from run history, in the global audit chain, and changes no
    /// run (docs/decisions.md, "Only attributable refusals end an attempt").
    pub async fn record_dead_letter(&self, dl: &NewDeadLetter) -> Result<(Option<i64>, Vec<OutboxMsg>), StoreError> {
        // Retried on a deadlock, as [`Self::mark_replayed`] explains.
        self.retrying(|| self.try_record_dead_letter(dl)).await
    }

    async fn try_record_dead_letter(&self, dl: &NewDeadLetter) -> Result<(Option<i64>, Vec<OutboxMsg>), StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::new();
        if let Some(mid) = &dl.message_id {
            refusal_lock(&mut tx, mid).await?;
        }
        let job = dl.job.as_ref();
        let (id, arrivals, inserted): (i64, i32, bool) = sqlx::query_as(
            "insert into dead_letters (message_id, origin, exchange, routing_key, reason, headers, body, run_id, verified, refused_for)
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9,
                     (select reason from refusals where refused_message_id = $1 order by id limit 1))
             on conflict (message_id, origin, reason) where message_id is not null
             do update set arrivals = dead_letters.arrivals + $10, last_arrived_at = now()
             returning id, arrivals, xmax = 0",
        )
        .bind(&dl.message_id)
        .bind(&dl.origin)
        .bind(&dl.exchange)
        .bind(&dl.routing_key)
        .bind(&dl.reason)
        .bind(Json(&dl.headers))
        .bind(&dl.body)
        .bind(job.map(|j| j.run_id))
        .bind(dl.verified)
        .bind(if dl.redelivered { 0 } else { 1 })
        .fetch_one(&mut *tx)
        .await?;
        if !inserted && dl.redelivered {
            // The same delivery again (not acknowledged before): already recorded.
            tx.commit().await?;
            return Ok((Some(id), out));
        }
        let detail = json!({"dead_letter": id, "arrival": arrivals, "origin": dl.origin,
                            "reason": dl.reason, "message_id": dl.message_id});
        if let Some(j) = job {
            self.history(
                &mut tx,
                Some(j.run_id),
                Some(j.step_id.as_str()),
                Some(j.attempt as i32),
                "dead_lettered",
                detail,
            )
            .await?;
        } else if dl.verified {
            self.history(&mut tx, None, None, None, "dead_lettered", detail).await?;
        } else {
            self.history(&mut tx, None, None, None, "dead_letter_unverified", detail)
                .await?;
        }
        if let Some(j) = job.filter(|_| dl.delivery_limit) {
            let reason = dl.reason.clone();
            self.fail_dispatched(&mut tx, j, &reason, &mut out).await?;
        }
        tx.commit().await?;
        Ok((Some(id), out))
    }

    /// Fails `job`'s attempt if it is still the current, dispatched and not yet
    /// started one: every copy of those bytes would end alike.
    async fn fail_dispatched(
        &self,
        tx: &mut Tx<'_>,
        j: &baton_shared::protocol::StepJob,
        reason: &str,
        out: &mut Vec<OutboxMsg>,
    ) -> Result<(), StoreError> {
        let current: bool = sqlx::query_scalar(
            "select exists (select 1 from attempts where run_id = $1 and step_id = $2 and attempt = $3
                               and message_id = $4 and status = 'dispatched')",
        )
        .bind(j.run_id)
        .bind(&j.step_id)
        .bind(j.attempt as i32)
        .bind(j.message_id)
        .fetch_one(&mut **tx)
        .await?;
        if current {
            let now = Utc::now();
            let settings = self.settings.clone();
            self.transition(tx, j.run_id, out, |state, fx| {
                state.job_dead_lettered(&j.step_id, j.attempt as i32, reason, now, &settings, fx);
                Ok(())
            })
            .await?;
        }
        Ok(())
    }

    /// Records a daemon's signed refusal notice (its signature and its key's
    /// scope for the notice's zone and role already checked). The refused job's
    /// attempt fails when the refusal is for what the job *is* (unauthentic or
    /// malformed) and the refused bytes are a job this scheduler signed
    /// (`own`) for that zone and role, still dispatched and not started: then
    /// every copy would be refused alike. A refusal of bytes that are not the
    /// dispatched job (a forgery that borrowed its message id), of a copy or a
    /// moment (a replay, an expired copy) changes no run.
    pub async fn record_refusal(
        &self,
        notice: &baton_shared::protocol::Refusal,
        own: &Trusted,
    ) -> Result<Vec<OutboxMsg>, StoreError> {
        self.retrying(|| self.try_record_refusal(notice, own)).await
    }

    async fn try_record_refusal(
        &self,
        notice: &baton_shared::protocol::Refusal,
        own: &Trusted,
    ) -> Result<Vec<OutboxMsg>, StoreError> {
        use baton_shared::protocol::StepJob;
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::new();
        if let Some(mid) = &notice.refused_message_id {
            refusal_lock(&mut tx, mid).await?;
        }
        sqlx::query(
            "insert into refusals (refused_message_id, zone, role, daemon, reason) values ($1, $2, $3, $4, $5)",
        )
        .bind(&notice.refused_message_id)
        .bind(&notice.zone)
        .bind(&notice.role)
        .bind(&notice.daemon)
        .bind(&notice.reason)
        .execute(&mut *tx)
        .await?;
        if let Some(mid) = &notice.refused_message_id {
            sqlx::query("update dead_letters set refused_for = $2 where message_id = $1 and refused_for is null")
                .bind(mid)
                .bind(&notice.reason)
                .execute(&mut *tx)
                .await?;
        }
        let mut detail = serde_json::to_value(notice).unwrap_or_default();
        if let Some(body) = notice.refused_bytes()
            && let Some(d) = detail.as_object_mut()
        {
            d.remove("refused_body");
            d.insert("refused_bytes".into(), json!(body.len()));
            d.insert(
                "refused_sha256".into(),
                json!(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body))),
            );
        }
        self.history(&mut tx, None, None, None, "message_refused", detail)
            .await?;
        let intrinsic = ["unauthentic", "malformed"]
            .iter()
            .any(|p| notice.reason.starts_with(p));
        let job = notice
            .refused_bytes()
            .filter(|_| intrinsic)
            .and_then(|b| StepJob::parse(&b).ok())
            .filter(|j| own.verify(j).is_ok())
            .filter(|j| j.zone == notice.zone && j.role == notice.role)
            .filter(|j| notice.refused_message_id.as_deref() == Some(j.message_id.to_string().as_str()));
        if let Some(j) = job {
            let reason = format!("{} (refused by {})", notice.reason, notice.daemon);
            self.fail_dispatched(&mut tx, &j, &reason, &mut out).await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Marks a dead letter replayed (after it was republished).
    pub async fn mark_replayed(&self, id: i64, who: &str) -> Result<(), StoreError> {
        // Appending to a run's chain takes the chain's lock and then the run's row
        // (to bump its version), while a firing timer takes them the other way
        // round: a deadlock between the two is retried.
        self.retrying(|| self.try_mark_replayed(id, who)).await
    }

    async fn try_mark_replayed(&self, id: i64, who: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let run_id: Option<Option<Uuid>> = sqlx::query_scalar(
            "update dead_letters set replayed_at = now(), replayed_by = $2 where id = $1 returning run_id",
        )
        .bind(id)
        .bind(who)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(run_id) = run_id else {
            return Err(StoreError::NoDeadLetter(id));
        };
        self.history_as(
            &mut tx,
            who,
            run_id,
            None,
            "dead_letter_replayed",
            json!({"dead_letter": id}),
        )
        .await?;
        tx.commit().await?;
        Ok(())
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

    async fn history_as(
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

/// What links a redeploy to the run it deploys again.
struct Redeploy<'a> {
    of: Uuid,
    of_status: String,
    who: &'a str,
    reason: &'a str,
}

/// A run as `baton runs show` presents it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RunView {
    pub id: Uuid,
    pub service: String,
    pub environment: String,
    pub commit_sha: String,
    pub status: String,
    pub plan_hash: String,
    pub rollback_reason: Option<String>,
    /// The run this one deploys again (`baton redeploy`), if it is a redeploy.
    #[serde(default)]
    pub redeploy_of: Option<Uuid>,
    /// The admission gate holding the run, if any.
    pub hold: Option<Hold>,
    /// The run's trace (W3C trace id), when tracing is on for it.
    pub trace_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub steps: Vec<StepView>,
    pub history: Vec<HistoryEntry>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StepView {
    pub id: String,
    pub role: String,
    pub zone: String,
    pub action: String,
    pub compensate: Option<String>,
    pub included: bool,
    pub reason: String,
    pub needs: Vec<String>,
    pub gates: Vec<String>,
    /// The gate holding the step, while it waits.
    pub hold: Option<Hold>,
    pub status: String,
    pub completion: Option<i32>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub compensation_started_at: Option<DateTime<Utc>>,
    pub compensation_finished_at: Option<DateTime<Utc>>,
    pub outputs: Fields,
    pub error: Option<StepError>,
    pub attempts: Vec<AttemptView>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AttemptView {
    pub attempt: i32,
    pub kind: JobKind,
    pub status: String,
    pub daemon: Option<String>,
    pub message_id: Uuid,
    pub dispatched_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<StepError>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct HistoryEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub step_id: Option<String>,
    pub attempt: Option<i32>,
    pub actor: String,
    pub kind: String,
    pub detail: Value,
}

impl RunView {
    pub fn step(&self, id: &str) -> Option<&StepView> {
        self.steps.iter().find(|s| s.id == id)
    }

    pub fn is_terminal(&self) -> bool {
        self.status.parse::<RunStatus>().is_ok_and(RunStatus::is_terminal)
    }
}

/// A transition's effects, folded (see [`Store::fold`]).
struct Folded {
    now: DateTime<Utc>,
    w: Writes,
    /// Updates of attempts created by `w` (a second statement).
    late: Writes,
    released: bool,
    history: Vec<(Option<String>, Option<i32>, &'static str, Value)>,
    msgs: Vec<OutboxMsg>,
}

impl Folded {
    /// The audit entries of the transition's history.
    fn entries<'a>(&'a self, run_id: Uuid, actor: &'a str) -> Vec<audit::Entry<'a>> {
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

fn mark_clean(state: &mut RunState) {
    state.dirty = false;
    for s in &mut state.steps {
        s.dirty = false;
    }
}

/// Reads a whole run for display.
pub async fn run_view(pool: &PgPool, run_id: Uuid) -> Result<Option<RunView>, StoreError> {
    let Some(r) = sqlx::query(
        "select service, environment, commit_sha, status, plan_hash, rollback_reason, hold, trace_context, created_at,
                started_at, finished_at, redeploy_of
         from runs where id = $1",
    )
    .bind(run_id)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let attempts = sqlx::query(
        "select step_id, attempt, kind, status, daemon, message_id, dispatched_at, started_at, finished_at, error
         from attempts where run_id = $1 order by step_id, attempt",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await?;
    let mut by_step: std::collections::HashMap<String, Vec<AttemptView>> = Default::default();
    for a in attempts {
        let kind: String = a.try_get("kind")?;
        let error: Option<Json<StepError>> = a.try_get("error")?;
        by_step.entry(a.try_get("step_id")?).or_default().push(AttemptView {
            attempt: a.try_get("attempt")?,
            kind: if kind == "compensate" {
                JobKind::Compensate
            } else {
                JobKind::Execute
            },
            status: a.try_get("status")?,
            daemon: a.try_get("daemon")?,
            message_id: a.try_get("message_id")?,
            dispatched_at: a.try_get("dispatched_at")?,
            started_at: a.try_get("started_at")?,
            finished_at: a.try_get("finished_at")?,
            error: error.map(|Json(e)| e),
        });
    }
    let steps = sqlx::query(
        "select step_id, role, zone, action, compensate, included, reason, needs, gates, hold, status, completion,
                started_at, finished_at, comp_started_at, comp_finished_at, outputs, error
         from steps where run_id = $1 order by position",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|s| {
        let id: String = s.try_get("step_id")?;
        let Json(outputs) = s.try_get("outputs")?;
        let error: Option<Json<StepError>> = s.try_get("error")?;
        let hold: Option<Json<Hold>> = s.try_get("hold")?;
        Ok(StepView {
            attempts: by_step.remove(&id).unwrap_or_default(),
            id,
            role: s.try_get("role")?,
            zone: s.try_get("zone")?,
            action: s.try_get("action")?,
            compensate: s.try_get("compensate")?,
            included: s.try_get("included")?,
            reason: s.try_get("reason")?,
            needs: s.try_get("needs")?,
            gates: s.try_get("gates")?,
            hold: hold.map(|Json(h)| h),
            status: s.try_get("status")?,
            completion: s.try_get("completion")?,
            started_at: s.try_get("started_at")?,
            finished_at: s.try_get("finished_at")?,
            compensation_started_at: s.try_get("comp_started_at")?,
            compensation_finished_at: s.try_get("comp_finished_at")?,
            outputs,
            error: error.map(|Json(e)| e),
        })
    })
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let history = history_since(pool, run_id, 0).await?;
    Ok(Some(RunView {
        id: run_id,
        service: r.try_get("service")?,
        environment: r.try_get("environment")?,
        commit_sha: r.try_get("commit_sha")?,
        status: r.try_get("status")?,
        plan_hash: r.try_get("plan_hash")?,
        rollback_reason: r.try_get("rollback_reason")?,
        redeploy_of: r.try_get("redeploy_of")?,
        hold: r.try_get::<Option<Json<Hold>>, _>("hold")?.map(|Json(h)| h),
        trace_id: r
            .try_get::<Option<String>, _>("trace_context")?
            .as_deref()
            .and_then(|t| t.split('-').nth(1).map(str::to_owned)),
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        steps,
        history,
    }))
}

/// Which runs `baton runs list` shows.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct RunFilter {
    pub status: Option<String>,
    pub environment: Option<String>,
    pub service: Option<String>,
    #[serde(default = "default_limit")]
    pub limit: i64,
}

fn default_limit() -> i64 {
    50
}

/// One line per run for `baton runs list`, newest first.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RunLine {
    pub id: Uuid,
    pub service: String,
    pub environment: String,
    pub commit_sha: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

pub async fn list_runs(pool: &PgPool, filter: &RunFilter) -> Result<Vec<RunLine>, StoreError> {
    let rows = sqlx::query(
        "select id, service, environment, commit_sha, status, created_at, finished_at from runs
          where ($2::text is null or status = $2) and ($3::text is null or environment = $3)
            and ($4::text is null or service = $4)
          order by seq desc limit $1",
    )
    .bind(filter.limit.clamp(1, 1000))
    .bind(&filter.status)
    .bind(&filter.environment)
    .bind(&filter.service)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(RunLine {
                id: r.try_get("id")?,
                service: r.try_get("service")?,
                environment: r.try_get("environment")?,
                commit_sha: r.try_get("commit_sha")?,
                status: r.try_get("status")?,
                created_at: r.try_get("created_at")?,
                finished_at: r.try_get("finished_at")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// Open incidents and this run's approvals, in one round trip.
/// Which incident to resolve.
#[derive(Debug, Clone, Copy)]
pub enum IncidentKey<'a> {
    Id(Uuid),
    Fingerprint(&'a str),
}

/// An incident as the CLI and API show it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
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

fn incident_row(r: &PgRow) -> Result<IncidentView, sqlx::Error> {
    Ok(IncidentView {
        id: r.try_get("id")?,
        environment: r.try_get("environment")?,
        title: r.try_get("title")?,
        source: r.try_get("source")?,
        fingerprint: r.try_get("fingerprint")?,
        opened_by: r.try_get("opened_by")?,
        opened_at: r.try_get("opened_at")?,
        resolved_by: r.try_get("resolved_by")?,
        resolved_at: r.try_get("resolved_at")?,
        truncated_alerts: r.try_get("truncated_alerts")?,
    })
}

async fn incident_by(tx: &mut Tx<'_>, key: IncidentKey<'_>) -> Result<Option<IncidentView>, StoreError> {
    let row = match key {
        IncidentKey::Id(id) => {
            sqlx::query(select_incidents!("id = $1"))
                .bind(id)
                .fetch_optional(&mut **tx)
                .await?
        }
        IncidentKey::Fingerprint(f) => {
            sqlx::query(select_incidents!("fingerprint = $1 and resolved_at is null"))
                .bind(f)
                .fetch_optional(&mut **tx)
                .await?
        }
    };
    Ok(row.as_ref().map(incident_row).transpose()?)
}

/// Incidents, newest first: open ones only unless `all`.
pub async fn list_incidents(pool: &PgPool, all: bool) -> Result<Vec<IncidentView>, StoreError> {
    let rows = sqlx::query(select_incidents!(
        "($1 or resolved_at is null) order by opened_at desc limit 500"
    ))
    .bind(all)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(incident_row).collect::<Result<_, _>>()?)
}

/// An environment lock and who waits for it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct LockView {
    pub service: String,
    pub environment: String,
    pub run_id: Uuid,
    pub run_status: String,
    pub acquired_at: DateTime<Utc>,
    /// The service's runs queued behind the holder, whatever environment they
    /// target, oldest first.
    pub waiting: Vec<Uuid>,
}

/// Every held environment lock, with the runs queued behind it.
pub async fn list_locks(pool: &PgPool) -> Result<Vec<LockView>, StoreError> {
    let rows = sqlx::query(
        "select l.service, l.environment, l.run_id, r.status, l.acquired_at,
                coalesce((select array_agg(q.id order by q.seq) from runs q
                          where q.service = l.service and q.status = 'queued'),
                         '{}') as waiting
         from env_locks l join runs r on r.id = l.run_id
         order by l.service, l.environment",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(LockView {
                service: r.try_get("service")?,
                environment: r.try_get("environment")?,
                run_id: r.try_get("run_id")?,
                run_status: r.try_get("status")?,
                acquired_at: r.try_get("acquired_at")?,
                waiting: r.try_get("waiting")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
}

/// A run's history entries after audit row `after`, oldest first.
pub async fn history_since(pool: &PgPool, run_id: Uuid, after: i64) -> Result<Vec<HistoryEntry>, StoreError> {
    sqlx::query(
        "select id, at, step_id, attempt, actor, kind, detail from audit where run_id = $1 and id > $2 order by id",
    )
    .bind(run_id)
    .bind(after)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|h| {
        let Json(detail) = h.try_get("detail")?;
        Ok(HistoryEntry {
            id: h.try_get("id")?,
            at: h.try_get("at")?,
            step_id: h.try_get("step_id")?,
            attempt: h.try_get("attempt")?,
            actor: h.try_get("actor")?,
            kind: h.try_get("kind")?,
            detail,
        })
    })
    .collect::<Result<Vec<_>, sqlx::Error>>()
    .map_err(Into::into)
}

/// A run's status, if it exists.
pub async fn run_status(pool: &PgPool, run_id: Uuid) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar("select status from runs where id = $1")
        .bind(run_id)
        .fetch_optional(pool)
        .await?)
}

/// A dead letter as the scheduler takes it off the queue.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    pub message_id: Option<String>,
    pub origin: String,
    pub exchange: String,
    pub routing_key: String,
    pub reason: String,
    pub headers: Value,
    pub body: Vec<u8>,
    /// The scheduler can attribute it (its own refusal, or [`Self::job`]).
    pub verified: bool,
    /// A job this scheduler signed, dead-lettered by the broker from that
    /// job's own queue: the only kind linked to a run.
    pub job: Option<baton_shared::protocol::StepJob>,
    /// The broker gave up on it after its delivery limit.
    pub delivery_limit: bool,
    /// The broker delivered it before (not acknowledged then).
    pub redelivered: bool,
}

/// A dead letter as `baton dlq list` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct DeadLetterView {
    pub id: i64,
    pub message_id: Option<String>,
    pub origin: String,
    pub exchange: String,
    pub routing_key: String,
    pub reason: String,
    /// The reason in the refusing daemon's signed notice, when one came.
    pub refused_for: Option<String>,
    /// Whether the scheduler could attribute it; an unverified one is listed
    /// but linked to no run and never replayed.
    pub verified: bool,
    /// How many times it arrived.
    pub arrivals: i32,
    pub run_id: Option<Uuid>,
    pub received_at: DateTime<Utc>,
    pub last_arrived_at: DateTime<Utc>,
    pub replayed_at: Option<DateTime<Utc>>,
    pub replayed_by: Option<String>,
    /// The body as text (lossy), cut at 2 KiB.
    pub body: String,
    pub bytes: usize,
}

/// Dead letters, newest first: not yet replayed unless `all`.
pub async fn list_dead_letters(pool: &PgPool, all: bool, limit: i64) -> Result<Vec<DeadLetterView>, StoreError> {
    let rows = sqlx::query(
        "select id, message_id, origin, exchange, routing_key, reason, refused_for, verified, arrivals, run_id,
                received_at, last_arrived_at, replayed_at, replayed_by, body
           from dead_letters where $1 or replayed_at is null order by id desc limit $2",
    )
    .bind(all)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let body: Vec<u8> = r.try_get("body")?;
            Ok(DeadLetterView {
                id: r.try_get("id")?,
                message_id: r.try_get("message_id")?,
                origin: r.try_get("origin")?,
                exchange: r.try_get("exchange")?,
                routing_key: r.try_get("routing_key")?,
                reason: r.try_get("reason")?,
                refused_for: r.try_get("refused_for")?,
                verified: r.try_get("verified")?,
                arrivals: r.try_get("arrivals")?,
                run_id: r.try_get("run_id")?,
                received_at: r.try_get("received_at")?,
                last_arrived_at: r.try_get("last_arrived_at")?,
                replayed_at: r.try_get("replayed_at")?,
                replayed_by: r.try_get("replayed_by")?,
                body: String::from_utf8_lossy(&body[..body.len().min(2048)]).into_owned(),
                bytes: body.len(),
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
}

/// What replaying dead letter `id` publishes: exchange, routing key, message id and body.
pub async fn dead_letter_for_replay(
    pool: &PgPool,
    id: i64,
) -> Result<(String, String, Option<String>, Vec<u8>), StoreError> {
    let r = sqlx::query(
        "select exchange, routing_key, message_id, body, verified, coalesce(refused_for, reason) as why
           from dead_letters where id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?
    .ok_or(StoreError::NoDeadLetter(id))?;
    if !r.try_get::<bool, _>("verified")? {
        return Err(StoreError::UnverifiedDeadLetter(id));
    }
    // Refused for what its bytes are: the same bytes would be refused again.
    let why: String = r.try_get("why")?;
    if ["malformed", "unauthentic", "invalid"]
        .iter()
        .any(|p| why.starts_with(p))
    {
        return Err(StoreError::WouldBeRefused { id, reason: why });
    }
    Ok((
        r.try_get("exchange")?,
        r.try_get("routing_key")?,
        r.try_get("message_id")?,
        r.try_get("body")?,
    ))
}

/// Retries a store operation while the database is unreachable.
pub async fn patiently<T, F, Fut>(
    what: &str,
    stop: &tokio_util::sync::CancellationToken,
    mut f: F,
) -> Option<Result<T, StoreError>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match f().await {
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, what, retry_in_ms = delay.as_millis() as u64, "database unavailable; waiting");
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            other => return Some(other),
        }
    }
}
