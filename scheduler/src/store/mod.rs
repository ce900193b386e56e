//! PostgreSQL persistence: one transaction per transition.
//!
//! Each transition locks the run row, loads the run, lets [`crate::engine`]
//! decide, and writes the changed rows, the history, the timers and the outbox
//! messages it causes before committing. Results are recorded in the inbox in
//! the same transaction, so a redelivered result is recognised and changes
//! nothing. Messages are published only after the commit (see `crate::relay`).
//!
//! By concern: `ingest` (merge events to runs, redeploys, the environment
//! lock's admission), `transitions` (load, decide, persist; optimistic and
//! locked), `write` (the statements a transition writes, batched), `cache`
//! (runs kept between results), `rows` (rows to run state), `timers`,
//! `replicas`, `outbox`, `operator` (rollback, cancel, approvals, releases),
//! `incidents`, `dead_letters`, `views` (what the API and CLI read), `error`.

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

use write::{Batcher, Guarded, Inboxed, NewAttempt, Part, Writes};

pub use cache::Snapshot;
use cache::*;
pub use dead_letters::*;
pub use error::*;
pub use incidents::*;
use rows::*;
use transitions::*;
pub use views::*;

/// A JSON object with the gates' facts of run `$1`: open incidents and the run's approvals.
macro_rules! facts_sql {
    () => {
        "json_build_object(
           'incidents', (select coalesce(json_agg(json_build_object('id', id, 'environment', environment,
                                                   'title', title, 'opened_at', opened_at) order by opened_at), '[]')
                           from incidents where resolved_at is null),
           'approvals', (select coalesce(json_agg(json_build_object('step_id', step_id, 'plan_hash', plan_hash, 'subject', subject,
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

mod cache;
mod dead_letters;
mod error;
mod incidents;
mod ingest;
mod operator;
mod outbox;
mod replicas;
mod rows;
mod timers;
mod transitions;
mod views;
mod write;

type Tx<'a> = Transaction<'a, Postgres>;

/// A message the relay must publish, already committed to the outbox.
#[derive(Debug, Clone, sqlx::FromRow)]
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
}
