//! What Baton keeps beside Terraform's state, in the same database (schema
//! `baton_terraform`): saved plans (what an approval approved is what the apply
//! applies, on whichever daemon instance takes the job) and one row per apply
//! with the state it replaced and the commit that state came from (the `pg`
//! backend keeps only the latest state). Plus the state itself, read, and who
//! holds its lock.

use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection, Row};
use uuid::Uuid;

const SCHEMA: &str = "
CREATE SCHEMA IF NOT EXISTS baton_terraform;
CREATE TABLE IF NOT EXISTS baton_terraform.plans (
    run_id uuid NOT NULL,
    step_id text NOT NULL,
    state_schema text NOT NULL,
    commit_sha text NOT NULL,
    sha256 text NOT NULL,
    plan bytea NOT NULL,
    summary jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, step_id)
);
CREATE TABLE IF NOT EXISTS baton_terraform.applies (
    run_id uuid NOT NULL,
    step_id text NOT NULL,
    state_schema text NOT NULL,
    commit_sha text NOT NULL,
    previous_commit text,
    state_before jsonb,
    state_after jsonb,
    status text NOT NULL CHECK (status IN ('started', 'applied', 'reverted')),
    outputs jsonb,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    PRIMARY KEY (run_id, step_id)
);
CREATE INDEX IF NOT EXISTS applies_by_schema ON baton_terraform.applies (state_schema, finished_at);
";

/// A state version: what identifies it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateVersion {
    pub serial: u64,
    pub lineage: String,
    /// SHA-256 (hex) of the state document.
    pub sha256: String,
}

/// One apply's row.
#[derive(Debug, Clone)]
pub struct Apply {
    pub commit_sha: String,
    pub previous_commit: Option<String>,
    pub state_before: Option<StateVersion>,
    pub state_after: Option<StateVersion>,
    pub status: String,
    pub outputs: Option<Value>,
}

/// A database error, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct DbError {
    pub what: &'static str,
    #[source]
    pub source: sqlx::Error,
}

fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
    move |source| DbError { what, source }
}

/// State databases whose tables this process has made sure of.
static READY: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Connects and makes sure Baton's tables exist (once per process and
/// database; one creator at a time).
pub async fn connect(url: &str) -> Result<PgConnection, DbError> {
    let mut conn = PgConnection::connect(url)
        .await
        .map_err(db("connecting to the state database"))?;
    let key = hex::encode(Sha256::digest(url.as_bytes()));
    if READY.lock().is_ok_and(|r| r.contains(&key)) {
        return Ok(conn);
    }
    let mut tx = conn.begin().await.map_err(db("creating baton_terraform"))?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('baton_terraform.schema'))")
        .execute(&mut *tx)
        .await
        .map_err(db("creating baton_terraform"))?;
    sqlx::raw_sql(SCHEMA)
        .execute(&mut *tx)
        .await
        .map_err(db("creating baton_terraform"))?;
    tx.commit().await.map_err(db("creating baton_terraform"))?;
    if let Ok(mut r) = READY.lock() {
        r.push(key);
    }
    Ok(conn)
}

fn quoted(schema: &str) -> String {
    format!("\"{}\"", schema.replace('"', "\"\""))
}

/// The `default` workspace's current state, if there is one.
pub async fn current_state(conn: &mut PgConnection, schema: &str) -> Result<Option<StateVersion>, DbError> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("{}.states", quoted(schema)))
        .fetch_one(&mut *conn)
        .await
        .map_err(db("reading the state"))?;
    if !exists {
        return Ok(None);
    }
    let data: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT data FROM {}.states WHERE name = 'default'",
        quoted(schema)
    )))
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("reading the state"))?;
    Ok(data.map(|d| version_of(&d)))
}

/// Identifies a state document.
pub fn version_of(data: &str) -> StateVersion {
    let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
    StateVersion {
        serial: v["serial"].as_u64().unwrap_or(0),
        lineage: v["lineage"].as_str().unwrap_or_default().to_owned(),
        sha256: hex::encode(Sha256::digest(data.as_bytes())),
    }
}

/// Who holds the state lock of `schema`'s default workspace (or the backend's
/// workspace-creation lock), as `pid 123 (user u, application a, from host,
/// since t)`.
pub async fn lock_holders(conn: &mut PgConnection, schema: &str) -> Result<Vec<String>, DbError> {
    let mut ids: Vec<i64> = vec![-1];
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("{}.states", quoted(schema)))
        .fetch_one(&mut *conn)
        .await
        .map_err(db("finding the lock holder"))?;
    if exists {
        let id: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT id FROM {}.states WHERE name = 'default'",
            quoted(schema)
        )))
        .fetch_optional(&mut *conn)
        .await
        .map_err(db("finding the lock holder"))?;
        ids.extend(id);
    }
    // A one-key advisory lock on a bigint shows as classid = high 32 bits,
    // objid = low 32 bits, objsubid = 1.
    let rows = sqlx::query(
        "SELECT a.pid, a.usename::text, a.application_name, a.client_addr::text, \
                to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') AS since \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.pid <> pg_backend_pid() \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND EXISTS (SELECT 1 FROM unnest($1::bigint[]) AS k(id) \
                       WHERE l.classid::bigint = (k.id >> 32) & 4294967295 AND l.objid::bigint = k.id & 4294967295) \
         ORDER BY a.backend_start",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("finding the lock holder"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let app: String = r.get::<Option<String>, _>("application_name").unwrap_or_default();
            format!(
                "pid {} (user {}, application {}, from {}, connected since {} UTC)",
                r.get::<i32, _>("pid"),
                r.get::<Option<String>, _>("usename").unwrap_or_default(),
                if app.is_empty() {
                    "unnamed".to_owned()
                } else {
                    format!("{app:?}")
                },
                r.get::<Option<String>, _>("client_addr")
                    .unwrap_or_else(|| "the local socket".into()),
                r.get::<Option<String>, _>("since").unwrap_or_default(),
            )
        })
        .collect())
}

/// Saves a plan for (run, step), replacing an earlier attempt's.
pub async fn save_plan(
    conn: &mut PgConnection,
    run_id: Uuid,
    step_id: &str,
    schema: &str,
    commit: &str,
    plan: &[u8],
    summary: &Value,
) -> Result<String, DbError> {
    let sha = hex::encode(Sha256::digest(plan));
    sqlx::query(
        "INSERT INTO baton_terraform.plans (run_id, step_id, state_schema, commit_sha, sha256, plan, summary) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (run_id, step_id) DO UPDATE SET state_schema = $3, commit_sha = $4, sha256 = $5, plan = $6, \
             summary = $7, created_at = now()",
    )
    .bind(run_id)
    .bind(step_id)
    .bind(schema)
    .bind(commit)
    .bind(&sha)
    .bind(plan)
    .bind(summary)
    .execute(&mut *conn)
    .await
    .map_err(db("saving the plan"))?;
    Ok(sha)
}

/// A saved plan and what it was made from.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SavedPlan {
    pub plan: Vec<u8>,
    pub sha256: String,
    pub state_schema: String,
    pub commit_sha: String,
}

/// The saved plan of (run, step).
pub async fn load_plan(conn: &mut PgConnection, run_id: Uuid, step_id: &str) -> Result<Option<SavedPlan>, DbError> {
    sqlx::query_as(
        "SELECT plan, sha256, state_schema, commit_sha FROM baton_terraform.plans WHERE run_id = $1 AND step_id = $2",
    )
    .bind(run_id)
    .bind(step_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("loading the plan"))
}

/// Forgets (run, step)'s record if it is only `started`: the attempt applied nothing.
pub async fn forget_started(conn: &mut PgConnection, run_id: Uuid, step_id: &str) -> Result<(), DbError> {
    sqlx::query("DELETE FROM baton_terraform.applies WHERE run_id = $1 AND step_id = $2 AND status = 'started'")
        .bind(run_id)
        .bind(step_id)
        .execute(&mut *conn)
        .await
        .map_err(db("recording the apply"))?;
    Ok(())
}

/// The apply row of (run, step).
pub async fn apply_row(conn: &mut PgConnection, run_id: Uuid, step_id: &str) -> Result<Option<Apply>, DbError> {
    let row = sqlx::query(
        "SELECT commit_sha, previous_commit, state_before, state_after, status, outputs \
         FROM baton_terraform.applies WHERE run_id = $1 AND step_id = $2",
    )
    .bind(run_id)
    .bind(step_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("reading the apply history"))?;
    Ok(row.map(|r| Apply {
        commit_sha: r.get("commit_sha"),
        previous_commit: r.get("previous_commit"),
        state_before: r
            .get::<Option<Value>, _>("state_before")
            .and_then(|v| serde_json::from_value(v).ok()),
        state_after: r
            .get::<Option<Value>, _>("state_after")
            .and_then(|v| serde_json::from_value(v).ok()),
        status: r.get("status"),
        outputs: r.get("outputs"),
    }))
}

/// The commit of the latest finished apply to `schema` other than (run, step).
pub async fn previous_commit(
    conn: &mut PgConnection,
    schema: &str,
    run_id: Uuid,
    step_id: &str,
) -> Result<Option<String>, DbError> {
    sqlx::query_scalar(
        "SELECT commit_sha FROM baton_terraform.applies \
         WHERE state_schema = $1 AND status = 'applied' AND NOT (run_id = $2 AND step_id = $3) \
         ORDER BY finished_at DESC LIMIT 1",
    )
    .bind(schema)
    .bind(run_id)
    .bind(step_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("reading the apply history"))
}

/// Records that (run, step) starts applying `commit` over `before`; false if
/// an earlier attempt's record is there (kept: it may have applied part).
pub async fn start_apply(
    conn: &mut PgConnection,
    run_id: Uuid,
    step_id: &str,
    schema: &str,
    commit: &str,
    previous_commit: Option<&str>,
    before: Option<&StateVersion>,
) -> Result<bool, DbError> {
    let done = sqlx::query(
        "INSERT INTO baton_terraform.applies (run_id, step_id, state_schema, commit_sha, previous_commit, state_before, status) \
         VALUES ($1, $2, $3, $4, $5, $6, 'started') \
         ON CONFLICT (run_id, step_id) DO NOTHING",
    )
    .bind(run_id)
    .bind(step_id)
    .bind(schema)
    .bind(commit)
    .bind(previous_commit)
    .bind(before.map(|b| serde_json::to_value(b).unwrap_or(Value::Null)))
    .execute(&mut *conn)
    .await
    .map_err(db("recording the apply"))?;
    Ok(done.rows_affected() == 1)
}

/// Records how (run, step) ended: `applied` or `reverted`, the state after, the outputs.
pub async fn finish(
    conn: &mut PgConnection,
    run_id: Uuid,
    step_id: &str,
    status: &str,
    after: Option<&StateVersion>,
    outputs: &Value,
) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE baton_terraform.applies SET status = $3, state_after = $4, outputs = $5, finished_at = now() \
         WHERE run_id = $1 AND step_id = $2",
    )
    .bind(run_id)
    .bind(step_id)
    .bind(status)
    .bind(after.map(|a| serde_json::to_value(a).unwrap_or(Value::Null)))
    .bind(outputs)
    .execute(&mut *conn)
    .await
    .map_err(db("recording the apply"))?;
    Ok(())
}
