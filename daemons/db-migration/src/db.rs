//! The target database: connecting, the migration lock, drizzle's history table and
//! Baton's log of what each run applied and rolled back.
//!
//! The lock is a session-level PostgreSQL advisory lock on a connection of its own, so
//! it is released when the job ends for any reason: a crashed or cancelled job closes
//! its connection, and PostgreSQL drops the lock and rolls back the open transaction.
//! Waiting for it is bounded by `lock_timeout` (the server's own timer), after which
//! the job fails with the retryable `migration_locked`.

use std::str::FromStr;
use std::time::Duration;

use baton_shared::secret::Secret;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, ConnectOptions, Row};
use uuid::Uuid;

use crate::drizzle::Migration;
use crate::error::{Error, sqlstate};

/// Advisory lock key of "a Baton migration of this database" (the ASCII of `batondbm`).
/// Advisory locks are per database, so one key serves every database.
pub const LOCK_KEY: i64 = 0x6261_746f_6e64_626d;

/// How long connecting may take before the job fails as retryable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

const CREATE_HISTORY: &str = r#"
CREATE SCHEMA IF NOT EXISTS "drizzle";
CREATE TABLE IF NOT EXISTS "drizzle"."__drizzle_migrations" (
    id SERIAL PRIMARY KEY,
    hash text NOT NULL,
    created_at bigint
);
CREATE SCHEMA IF NOT EXISTS baton_migrations;
CREATE TABLE IF NOT EXISTS baton_migrations.log (
    id bigserial PRIMARY KEY,
    tag text NOT NULL,
    hash text NOT NULL,
    created_at bigint NOT NULL,
    direction text NOT NULL CHECK (direction IN ('up', 'down')),
    run_id uuid NOT NULL,
    step_id text NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
"#;

/// Connection options from a URL, named so the connection is recognisable in
/// `pg_stat_activity`.
pub fn options(url: &Secret<String>) -> Result<PgConnectOptions, sqlx::Error> {
    Ok(PgConnectOptions::from_str(url.expose())?.application_name("baton-db-migration"))
}

pub async fn connect_with(opts: &PgConnectOptions) -> Result<PgConnection, sqlx::Error> {
    match tokio::time::timeout(CONNECT_TIMEOUT, opts.connect()).await {
        Ok(res) => {
            if res.is_ok() {
                baton_shared::nodelay::on_every_tcp_socket();
            }
            res
        }
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connecting took longer than {} s", CONNECT_TIMEOUT.as_secs()),
        ))),
    }
}

/// A connection to the database of `service`.
pub async fn connect(url: &Secret<String>, service: &str) -> Result<PgConnection, Error> {
    let err = |source| Error::Connect {
        service: service.to_owned(),
        source,
    };
    let opts = options(url).map_err(err)?;
    connect_with(&opts).await.map_err(err)
}

fn db_err(service: &str, doing: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    let service = service.to_owned();
    move |source| Error::Database { service, doing, source }
}

/// Takes the migration lock, waiting at most `wait`.
pub async fn lock(conn: &mut PgConnection, service: &str, wait: Duration) -> Result<(), Error> {
    sqlx::query("SELECT set_config('lock_timeout', $1, false)")
        .bind(format!("{}ms", wait.as_millis().max(1)))
        .execute(&mut *conn)
        .await
        .map_err(db_err(service, "setting lock_timeout"))?;
    let locked = sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *conn)
        .await;
    match locked {
        Ok(_) => {}
        Err(e) if sqlstate(&e).as_deref() == Some("55P03") => {
            return Err(Error::Locked {
                service: service.to_owned(),
                waited_secs: wait.as_secs(),
            });
        }
        Err(e) => return Err(db_err(service, "taking the migration lock")(e)),
    }
    // The bound is for the lock only; migrations wait for their table locks as
    // configured for the database (the step's deadline still bounds them).
    sqlx::raw_sql("RESET lock_timeout")
        .execute(&mut *conn)
        .await
        .map_err(db_err(service, "resetting lock_timeout"))?;
    tracing::info!(service, "migration lock taken");
    Ok(())
}

/// One row of `drizzle.__drizzle_migrations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRow {
    pub id: i32,
    pub hash: String,
    pub created_at: Option<i64>,
}

/// What drizzle's history says about a database.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// drizzle's "last migration": `created_at` of the first row of
    /// `order by created_at desc limit 1` (NULLs sort first there and count as 0);
    /// None when there is no row.
    pub last: Option<i64>,
    /// Every row, by id.
    pub rows: Vec<HistoryRow>,
}

impl History {
    pub fn contains(&self, hash: &str, created_at: i64) -> bool {
        self.rows
            .iter()
            .any(|r| r.hash == hash && r.created_at == Some(created_at))
    }
}

async fn relation_exists(conn: &mut PgConnection, name: &'static str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(name)
        .fetch_one(conn)
        .await
}

/// Reads the history without creating anything.
pub async fn history(conn: &mut PgConnection, service: &str) -> Result<History, Error> {
    let err = db_err(service, "reading drizzle.__drizzle_migrations");
    let inner = async {
        if !relation_exists(conn, "drizzle.__drizzle_migrations").await? {
            return Ok(History::default());
        }
        let last: Option<Option<i64>> = sqlx::query_scalar(
            r#"SELECT created_at FROM "drizzle"."__drizzle_migrations" ORDER BY created_at DESC LIMIT 1"#,
        )
        .fetch_optional(&mut *conn)
        .await?;
        let rows = sqlx::query(r#"SELECT id, hash, created_at FROM "drizzle"."__drizzle_migrations" ORDER BY id"#)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|r| {
                Ok(HistoryRow {
                    id: r.try_get("id")?,
                    hash: r.try_get("hash")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(History {
            last: last.map(|c| c.unwrap_or(0)),
            rows,
        })
    };
    inner.await.map_err(err)
}

/// A migration this (run, step) applied, from Baton's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub tag: String,
    pub hash: String,
    pub created_at: i64,
}

/// The migrations this (run, step) applied that are still in drizzle's history, in
/// the order applied. A re-run after a crash reports these, so the rollback of the
/// step still undoes them.
pub async fn applied_by(
    conn: &mut PgConnection,
    service: &str,
    run_id: Uuid,
    step_id: &str,
    history: &History,
) -> Result<Vec<Applied>, Error> {
    let err = db_err(service, "reading baton_migrations.log");
    let inner = async {
        if !relation_exists(conn, "baton_migrations.log").await? {
            return Ok(Vec::new());
        }
        sqlx::query(
            "SELECT tag, hash, created_at FROM baton_migrations.log \
             WHERE run_id = $1 AND step_id = $2 AND direction = 'up' ORDER BY id",
        )
        .bind(run_id)
        .bind(step_id)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| {
            Ok(Applied {
                tag: r.try_get("tag")?,
                hash: r.try_get("hash")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
    };
    let mut out: Vec<Applied> = Vec::new();
    for a in inner.await.map_err(err)? {
        if history.contains(&a.hash, a.created_at) && !out.contains(&a) {
            out.push(a);
        }
    }
    Ok(out)
}

/// Creates drizzle's history table (as drizzle-orm does) and Baton's log.
pub async fn ensure_tables(conn: &mut PgConnection, service: &str) -> Result<(), Error> {
    sqlx::raw_sql(CREATE_HISTORY)
        .execute(conn)
        .await
        .map(|_| ())
        .map_err(db_err(service, "creating the migration history tables"))
}

/// Runs one migration's statements and records it exactly as drizzle-orm does.
pub async fn apply(conn: &mut PgConnection, m: &Migration) -> Result<(), Error> {
    let statements = m.statements();
    let total = statements.len();
    for (i, stmt) in statements.into_iter().enumerate() {
        // Migration files are the SQL this role exists to run; they come from the
        // reviewed, merged commit.
        sqlx::raw_sql(AssertSqlSafe(stmt.to_owned()))
            .execute(&mut *conn)
            .await
            .map_err(|source| Error::MigrationFailed {
                tag: m.tag.clone(),
                statement: i + 1,
                total,
                on_scratch: false,
                source,
            })?;
    }
    sqlx::query(r#"insert into "drizzle"."__drizzle_migrations" ("hash", "created_at") values($1, $2)"#)
        .bind(&m.hash)
        .bind(m.when)
        .execute(&mut *conn)
        .await
        .map_err(|source| Error::MigrationFailed {
            tag: m.tag.clone(),
            statement: total,
            total,
            on_scratch: false,
            source,
        })?;
    Ok(())
}

/// Which way a logged migration went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Up,
    Down,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

/// Appends to `baton_migrations.log`.
pub async fn log(
    conn: &mut PgConnection,
    service: &str,
    m: &Migration,
    direction: Direction,
    run_id: Uuid,
    step_id: &str,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO baton_migrations.log (tag, hash, created_at, direction, run_id, step_id) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&m.tag)
    .bind(&m.hash)
    .bind(m.when)
    .bind(direction.as_str())
    .bind(run_id)
    .bind(step_id)
    .execute(conn)
    .await
    .map(|_| ())
    .map_err(db_err(service, "writing baton_migrations.log"))
}

/// Runs a down migration and removes its history row, in the caller's transaction.
/// `restore` says what to do if it fails (named in the error).
pub async fn unapply(conn: &mut PgConnection, m: &Migration, restore: &str) -> Result<(), Error> {
    let statements = m.down_statements().unwrap_or_default();
    let failed = |at: String| {
        let tag = m.tag.clone();
        let restore = restore.to_owned();
        move |source| Error::RollbackFailed {
            tag,
            at,
            restore,
            source,
        }
    };
    for (i, stmt) in statements.iter().enumerate() {
        sqlx::raw_sql(AssertSqlSafe((*stmt).to_owned()))
            .execute(&mut *conn)
            .await
            .map_err(failed(format!("statement {} of {}", i + 1, statements.len())))?;
    }
    sqlx::query(
        r#"DELETE FROM "drizzle"."__drizzle_migrations" WHERE id = (
             SELECT id FROM "drizzle"."__drizzle_migrations" WHERE hash = $1 AND created_at = $2
             ORDER BY id DESC LIMIT 1)"#,
    )
    .bind(&m.hash)
    .bind(m.when)
    .execute(&mut *conn)
    .await
    .map_err(failed("its history row".to_owned()))?;
    Ok(())
}
