//! Read models: runs, steps, attempts and history as the API and CLI show them.

use super::*;

/// A run as `baton runs show` presents it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RunView {
    pub id: Uuid,
    pub service: String,
    pub environment: String,
    pub commit_sha: String,
    /// The pull request's title (written by whoever opened it: display it escaped).
    #[serde(default)]
    pub title: String,
    /// The merge event's risk: `standard`, `high` or `critical`.
    #[serde(default)]
    pub risk: String,
    pub status: String,
    pub plan_hash: String,
    /// How long the run should take at most, from the pipeline (`typical_minutes`,
    /// or `critical_minutes` for a critical change).
    #[serde(default)]
    pub budget_minutes: Option<u32>,
    /// The scheduler's usual time from the run's start to its first dispatch,
    /// from the pipeline (`orchestration_minutes`).
    #[serde(default)]
    pub orchestration_minutes: Option<u32>,
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
    /// The step's usual duration in minutes, `[low, high]`, from the pipeline.
    #[serde(default)]
    pub typical_minutes: Option<[u32; 2]>,
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

#[derive(Debug, Clone, Serialize, serde::Deserialize, sqlx::FromRow)]
pub struct HistoryEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub step_id: Option<String>,
    pub attempt: Option<i32>,
    pub actor: String,
    pub kind: String,
    pub detail: Value,
}

impl HistoryEntry {
    /// The gate verdicts this entry records (`{gate, verdict, reason}`): one
    /// for `gate`, each of `gates_passed`, none otherwise. The incident gate's
    /// passes, recorded before every step, are left out.
    pub fn verdicts(&self) -> Vec<&Value> {
        let all: Vec<&Value> = match self.kind.as_str() {
            "gate" => vec![&self.detail],
            "gates_passed" => self.detail["gates"]
                .as_array()
                .map(|a| a.iter().collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        all.into_iter()
            .filter(|v| v["gate"] != "incident" || v["verdict"] != "pass")
            .collect()
    }
}

impl RunView {
    pub fn step(&self, id: &str) -> Option<&StepView> {
        self.steps.iter().find(|s| s.id == id)
    }

    pub fn is_terminal(&self) -> bool {
        self.status.parse::<RunStatus>().is_ok_and(RunStatus::is_terminal)
    }

    /// Fills in what the pipeline says about timing: each step's typical
    /// duration and the run's budget.
    pub fn with_timing(mut self, pipeline: &crate::pipeline::Pipeline) -> Self {
        for st in &mut self.steps {
            st.typical_minutes = pipeline.step(&st.id).and_then(|d| d.typical_minutes);
        }
        self.budget_minutes = pipeline.budget_minutes(&self.risk);
        self.orchestration_minutes = pipeline.orchestration_minutes;
        self
    }
}

/// The `runs` columns [`run_view`] reads.
#[derive(sqlx::FromRow)]
struct RunRow {
    service: String,
    environment: String,
    commit_sha: String,
    title: Option<String>,
    risk: Option<String>,
    status: String,
    plan_hash: String,
    rollback_reason: Option<String>,
    redeploy_of: Option<Uuid>,
    hold: Option<Json<Hold>>,
    trace_context: Option<String>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

/// The `steps` columns [`run_view`] reads.
#[derive(sqlx::FromRow)]
struct StepRow {
    step_id: String,
    role: String,
    zone: String,
    action: String,
    compensate: Option<String>,
    included: bool,
    reason: String,
    needs: Vec<String>,
    gates: Vec<String>,
    hold: Option<Json<Hold>>,
    status: String,
    completion: Option<i32>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    comp_started_at: Option<DateTime<Utc>>,
    comp_finished_at: Option<DateTime<Utc>>,
    outputs: Json<Fields>,
    error: Option<Json<StepError>>,
}

/// The `attempts` columns [`run_view`] reads.
#[derive(sqlx::FromRow)]
struct AttemptRow {
    step_id: String,
    attempt: i32,
    kind: String,
    status: String,
    daemon: Option<String>,
    message_id: Uuid,
    dispatched_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    error: Option<Json<StepError>>,
}

/// Reads a whole run for display.
pub async fn run_view(pool: &PgPool, run_id: Uuid) -> Result<Option<RunView>, StoreError> {
    let Some(r) = sqlx::query_as::<_, RunRow>(
        "select service, environment, commit_sha, event->'pull_request'->>'title' as title, event->>'risk' as risk,
                status, plan_hash, rollback_reason, hold, trace_context, created_at, started_at, finished_at, redeploy_of
         from runs where id = $1",
    )
    .bind(run_id)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let attempts = sqlx::query_as::<_, AttemptRow>(
        "select step_id, attempt, kind, status, daemon, message_id, dispatched_at, started_at, finished_at, error
         from attempts where run_id = $1 order by step_id, attempt",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await?;
    let mut by_step: std::collections::HashMap<String, Vec<AttemptView>> = Default::default();
    for a in attempts {
        by_step.entry(a.step_id).or_default().push(AttemptView {
            attempt: a.attempt,
            kind: if a.kind == "compensate" {
                JobKind::Compensate
            } else {
                JobKind::Execute
            },
            status: a.status,
            daemon: a.daemon,
            message_id: a.message_id,
            dispatched_at: a.dispatched_at,
            started_at: a.started_at,
            finished_at: a.finished_at,
            error: a.error.map(|Json(e)| e),
        });
    }
    let steps = sqlx::query_as::<_, StepRow>(
        "select step_id, role, zone, action, compensate, included, reason, needs, gates, hold, status, completion,
                started_at, finished_at, comp_started_at, comp_finished_at, outputs, error
         from steps where run_id = $1 order by position",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|s| StepView {
        attempts: by_step.remove(&s.step_id).unwrap_or_default(),
        id: s.step_id,
        role: s.role,
        zone: s.zone,
        action: s.action,
        compensate: s.compensate,
        included: s.included,
        reason: s.reason,
        needs: s.needs,
        gates: s.gates,
        typical_minutes: None,
        hold: s.hold.map(|Json(h)| h),
        status: s.status,
        completion: s.completion,
        started_at: s.started_at,
        finished_at: s.finished_at,
        compensation_started_at: s.comp_started_at,
        compensation_finished_at: s.comp_finished_at,
        outputs: s.outputs.0,
        error: s.error.map(|Json(e)| e),
    })
    .collect();
    let history = history_since(pool, run_id, 0).await?;
    Ok(Some(RunView {
        id: run_id,
        service: r.service,
        environment: r.environment,
        commit_sha: r.commit_sha,
        title: r.title.unwrap_or_default(),
        risk: r.risk.unwrap_or_default(),
        status: r.status,
        plan_hash: r.plan_hash,
        budget_minutes: None,
        orchestration_minutes: None,
        rollback_reason: r.rollback_reason,
        redeploy_of: r.redeploy_of,
        hold: r.hold.map(|Json(h)| h),
        trace_id: r
            .trace_context
            .as_deref()
            .and_then(|t| t.split('-').nth(1).map(str::to_owned)),
        created_at: r.created_at,
        started_at: r.started_at,
        finished_at: r.finished_at,
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
    /// Only runs created since (the web view's time filter).
    #[serde(skip)]
    pub since: Option<DateTime<Utc>>,
    /// Runs to skip, newest first (the web view's pages).
    #[serde(skip)]
    pub offset: i64,
}

pub(super) fn default_limit() -> i64 {
    50
}

/// One line per run for `baton runs list`, newest first.
#[derive(Debug, Clone, Serialize, serde::Deserialize, sqlx::FromRow)]
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
    let rows = sqlx::query_as(
        "select id, service, environment, commit_sha, status, created_at, finished_at from runs
          where ($2::text is null or status = $2) and ($3::text is null or environment = $3)
            and ($4::text is null or service = $4) and ($5::timestamptz is null or created_at >= $5)
          order by seq desc limit $1 offset $6",
    )
    .bind(filter.limit.clamp(1, 1000))
    .bind(&filter.status)
    .bind(&filter.environment)
    .bind(&filter.service)
    .bind(filter.since)
    .bind(filter.offset.max(0))
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// An environment lock and who waits for it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq, sqlx::FromRow)]
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
    Ok(sqlx::query_as(
        "select l.service, l.environment, l.run_id, r.status as run_status, l.acquired_at,
                coalesce((select array_agg(q.id order by q.seq) from runs q
                          where q.service = l.service and q.status = 'queued'),
                         '{}') as waiting
         from env_locks l join runs r on r.id = l.run_id
         order by l.service, l.environment",
    )
    .fetch_all(pool)
    .await?)
}

/// A run's history entries after audit row `after`, oldest first.
pub async fn history_since(pool: &PgPool, run_id: Uuid, after: i64) -> Result<Vec<HistoryEntry>, StoreError> {
    Ok(sqlx::query_as(
        "select id, at, step_id, attempt, actor, kind, detail from audit where run_id = $1 and id > $2 order by id",
    )
    .bind(run_id)
    .bind(after)
    .fetch_all(pool)
    .await?)
}

/// A run's status, if it exists.
pub async fn run_status(pool: &PgPool, run_id: Uuid) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar("select status from runs where id = $1")
        .bind(run_id)
        .fetch_optional(pool)
        .await?)
}
