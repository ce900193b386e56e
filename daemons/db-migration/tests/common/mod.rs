//! Test helpers: a throw-away database per test, temporary git repositories holding
//! Drizzle folders, and step jobs as the scheduler would send them.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use baton_db_migration::{DbMigration, MigrationConfig};
use baton_shared::protocol::{Fields, JobKind, StepError, StepJob};
use baton_shared::runtime::{ExecContext, Role};
use baton_shared::secret::Secret;
use chrono::Utc;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};
use uuid::Uuid;

pub const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const SERVICE: &str = "shop-api";
pub const DIR: &str = "drizzle/migrations";

/// A database of its own, dropped (with force) when the value goes away, also when
/// the test panics.
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    pub async fn create() -> Self {
        let name = format!("baton_dbm_{}", Uuid::new_v4().simple());
        let mut admin = admin().await;
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        admin.close().await.ok();
        Self { name }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:5432/{}", self.name)
    }

    pub async fn connect(&self) -> PgConnection {
        PgConnectOptions::from_str(&self.url())
            .unwrap()
            .connect()
            .await
            .expect("connect to test database")
    }

    /// `(hash, created_at)` rows of drizzle's history, by id.
    pub async fn history(&self) -> Vec<(String, i64)> {
        let mut c = self.connect().await;
        let rows: Vec<(String, i64)> =
            sqlx::query_as(r#"SELECT hash, created_at FROM "drizzle"."__drizzle_migrations" ORDER BY id"#)
                .fetch_all(&mut c)
                .await
                .unwrap_or_default();
        c.close().await.ok();
        rows
    }

    /// `(tag, direction, run_id)` rows of Baton's log, in order.
    pub async fn log(&self) -> Vec<(String, String, Uuid)> {
        let mut c = self.connect().await;
        let rows = sqlx::query_as("SELECT tag, direction, run_id FROM baton_migrations.log ORDER BY id")
            .fetch_all(&mut c)
            .await
            .unwrap_or_default();
        c.close().await.ok();
        rows
    }

    pub async fn columns(&self, table: &str) -> Vec<String> {
        let mut c = self.connect().await;
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT column_name::text FROM information_schema.columns WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
        )
        .bind(table)
        .fetch_all(&mut c)
        .await
        .unwrap();
        c.close().await.ok();
        rows.into_iter().map(|r| r.0).collect()
    }

    pub async fn tables(&self) -> Vec<String> {
        let mut c = self.connect().await;
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
        )
        .fetch_all(&mut c)
        .await
        .unwrap();
        c.close().await.ok();
        rows.into_iter().map(|r| r.0).collect()
    }

    pub async fn exec(&self, sql: &str) {
        let mut c = self.connect().await;
        sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
            .execute(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        c.close().await.ok();
    }

    pub async fn snapshot(&self) -> baton_db_migration::verify::Snapshot {
        let mut c = self.connect().await;
        let s = baton_db_migration::verify::snapshot(&mut c).await.unwrap();
        c.close().await.ok();
        s
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // A runtime of its own: Drop cannot await, and may run while a test unwinds.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut admin = admin().await;
                sqlx::raw_sql(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&mut admin)
                .await
                .expect("drop test database");
            });
        })
        .join();
    }
}

pub async fn admin() -> PgConnection {
    PgConnectOptions::from_str(ADMIN_URL)
        .unwrap()
        .connect()
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth)")
}

/// Scratch databases the role left behind (it must leave none).
pub async fn scratch_databases() -> Vec<String> {
    let mut a = admin().await;
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT datname::text FROM pg_database WHERE datname LIKE 'baton_scratch_%'")
            .fetch_all(&mut a)
            .await
            .unwrap();
    rows.into_iter().map(|r| r.0).collect()
}

/// A directory removed when the value goes away.
pub use baton_shared::testing::{GitRepo, TempDir};

pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/migrations")
}

/// The fixture's tags in journal order.
pub fn fixture_tags() -> Vec<String> {
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture_dir().join("meta/_journal.json")).unwrap()).unwrap();
    j["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["tag"].as_str().unwrap().to_owned())
        .collect()
}

/// Writes the first `n` fixture migrations (with their down and recovery files and
/// a journal listing only them, as drizzle-kit would have written it then) to
/// `drizzle/migrations` of `repo`.
pub fn write_fixture(repo: &GitRepo, n: usize) {
    let mut journal: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture_dir().join("meta/_journal.json")).unwrap()).unwrap();
    journal["entries"].as_array_mut().unwrap().truncate(n);
    repo.write(
        &format!("{DIR}/meta/_journal.json"),
        serde_json::to_string_pretty(&journal).unwrap(),
    );
    for tag in fixture_tags().into_iter().take(n) {
        for suffix in [".sql", ".down.sql", ".recovery.md"] {
            let src = fixture_dir().join(format!("{tag}{suffix}"));
            if src.exists() {
                repo.write(&format!("{DIR}/{tag}{suffix}"), std::fs::read_to_string(src).unwrap());
            }
        }
    }
}

/// One migration for [`write_migrations`].
pub struct Mig<'a> {
    pub tag: &'a str,
    pub sql: &'a str,
    pub down: Option<&'a str>,
    pub recovery: Option<&'a str>,
}

impl<'a> Mig<'a> {
    /// A migration with a down migration.
    pub fn reversible(tag: &'a str, sql: &'a str, down: &'a str) -> Self {
        Self {
            tag,
            sql,
            down: Some(down),
            recovery: None,
        }
    }

    /// A migration with neither a down migration nor a recovery procedure.
    pub fn bare(tag: &'a str, sql: &'a str) -> Self {
        Self {
            tag,
            sql,
            down: None,
            recovery: None,
        }
    }
}

/// Writes a Drizzle folder with these migrations (`when` one minute apart).
pub fn write_migrations(repo: &GitRepo, migs: &[Mig<'_>]) {
    let entries: Vec<serde_json::Value> = migs
        .iter()
        .enumerate()
        .map(|(i, m)| {
            serde_json::json!({"idx": i, "version": "7", "when": 1_764_000_000_000_i64 + i as i64 * 60_000,
                "tag": m.tag, "breakpoints": true})
        })
        .collect();
    let journal = serde_json::json!({"version": "7", "dialect": "postgresql", "entries": entries});
    repo.write(
        &format!("{DIR}/meta/_journal.json"),
        serde_json::to_string_pretty(&journal).unwrap(),
    );
    for m in migs {
        repo.write(&format!("{DIR}/{}.sql", m.tag), m.sql);
        if let Some(d) = m.down {
            repo.write(&format!("{DIR}/{}.down.sql", m.tag), d);
        }
        if let Some(r) = m.recovery {
            repo.write(&format!("{DIR}/{}.recovery.md", m.tag), r);
        }
    }
}

/// The role, configured for one test database and a private repository cache.
pub fn role(db: &TestDb, cache: &TempDir) -> DbMigration {
    DbMigration::new(config(db, cache))
}

pub fn config(db: &TestDb, cache: &TempDir) -> MigrationConfig {
    MigrationConfig {
        repos_dir: cache.0.clone(),
        admin_url: Secret::new(ADMIN_URL.to_owned()),
        lock_timeout_secs: 60,
        databases: BTreeMap::from([(SERVICE.to_owned(), Secret::new(db.url()))]),
        backup_required_zones: vec!["production".to_owned()],
        data_checks: BTreeMap::new(),
    }
}

/// A job as the scheduler sends it.
pub fn job(kind: JobKind, action: &str, zone: &str, repo: &GitRepo, sha: &str, run_id: Uuid) -> StepJob {
    let mut job = StepJob::example(zone, baton_shared::roles::DB_MIGRATION, action);
    job.run_id = run_id;
    job.step_id = format!("db.{zone}");
    job.kind = kind;
    job.deploy.service = SERVICE.to_owned();
    job.deploy.repository = repo.url();
    job.deploy.commit_sha = sha.to_owned();
    job.deadline = Utc::now() + chrono::Duration::minutes(30);
    job
}

pub fn migrate_job(zone: &str, repo: &GitRepo, sha: &str, run_id: Uuid) -> StepJob {
    job(JobKind::Execute, "migrate", zone, repo, sha, run_id)
}

/// The compensation of `migrate`, carrying its outputs.
pub fn rollback_job(zone: &str, repo: &GitRepo, sha: &str, run_id: Uuid, outputs: &Fields) -> StepJob {
    let mut j = job(JobKind::Compensate, "rollback", zone, repo, sha, run_id);
    j.own_outputs = outputs.clone();
    j
}

/// A `backup.pre` output as the backup daemon reports it.
pub fn backup_input(run_id: Uuid, verified: bool) -> Fields {
    let b = baton_shared::facts::BackupRef {
        backup_id: "bk-2026-11-26-0001".into(),
        run_id,
        verified,
        sha256: "ab".repeat(32),
        location: "/srv/backups/production/bk-2026-11-26-0001".into(),
        copy_location: "/srv/backups-copy/production/bk-2026-11-26-0001".into(),
        region: "nl-ams1".into(),
        copy_region: "nl-ams2".into(),
        tables: 2,
        bytes: 4096,
        volumes: Vec::new(),
    };
    baton_shared::facts::FactSet::to_fields(&b)
}

/// Runs a job through the `Role` trait, as the daemon runtime does.
pub async fn run(role: &DbMigration, job: &StepJob) -> Result<Fields, StepError> {
    let ctx = ExecContext {
        cancel: tokio_util::sync::CancellationToken::new(),
        daemon: "test".to_owned(),
    };
    match job.kind {
        JobKind::Execute => role.execute(job, &ctx).await,
        JobKind::Compensate => role.compensate(job, &ctx).await,
    }
}

pub fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}
