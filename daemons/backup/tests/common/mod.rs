//! Test fixtures: a uniquely named source database with a few tables, private
//! storage directories, generated age keys, and jobs as the runtime hands them
//! to the role. Everything is removed on drop (`BATON_KEEP_FAILED=1` keeps what
//! a failing test made).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use age::secrecy::ExposeSecret;
use baton_backup::{BackupRole, BackupSettings, LocationConfig};
use baton_shared::protocol::{Fields, StepError, StepJob};
use baton_shared::runtime::{ExecContext, Role};
use baton_shared::secret::Secret;
use chrono::{Duration, Utc};
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const SERVER: &str = "postgres://postgres@127.0.0.1:5432";
pub const ZONE: &str = "production";
pub const SERVICE: &str = "shop-api";

/// Seed data: two schemas, assorted types (timestamps, numerics, floats,
/// bytea, jsonb, NULLs, an identifier needing quotes).
pub const SEED_SQL: &str = r#"
CREATE TABLE customers (id serial PRIMARY KEY, email text NOT NULL UNIQUE,
    created timestamptz NOT NULL DEFAULT '2026-01-02 03:04:05+01', balance numeric(12,2));
INSERT INTO customers (email, balance)
    SELECT 'customer' || g || '@example.org', g * 1.5 FROM generate_series(1, 200) g;
CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id int REFERENCES customers(id),
    amount float8, note text, payload bytea, data jsonb);
INSERT INTO orders (customer_id, amount, note, payload, data)
    SELECT (g % 200) + 1, g / 7.0, CASE WHEN g % 3 = 0 THEN NULL ELSE 'note ' || g END,
           decode(md5(g::text), 'hex'), jsonb_build_object('g', g)
      FROM generate_series(1, 1000) g;
CREATE SCHEMA billing;
CREATE TABLE billing.invoices (id int PRIMARY KEY, customer_id int, total numeric, issued date,
    period interval, "Odd Name" text);
INSERT INTO billing.invoices
    SELECT g, g, g * 10, date '2026-01-01' + g, make_interval(days => g), 'x"y' FROM generate_series(1, 50) g;
"#;

/// A source database, a storage root and a role configured for them.
pub struct Env {
    pub db_name: String,
    pub db_url: String,
    pub root: PathBuf,
    pub settings: BackupSettings,
    pub role: BackupRole,
    pub identity: age::x25519::Identity,
}

impl Env {
    /// A fresh database filled with [`SEED_SQL`] and a role backing it up.
    pub async fn new() -> Self {
        let env = Self::empty().await;
        env.sql(SEED_SQL).await;
        env
    }

    /// A fresh, empty database.
    pub async fn empty() -> Self {
        let id = Uuid::new_v4().simple().to_string();
        let db_name = format!("baton_test_bk_{}", &id[..16]);
        let mut admin = PgConnection::connect(&format!("{SERVER}/postgres"))
            .await
            .expect("connect to PostgreSQL at 127.0.0.1:5432 as postgres");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{db_name}\"")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        admin.close().await.ok();
        let db_url = format!("{SERVER}/{db_name}");

        let root = std::env::temp_dir().join(format!("baton-backup-test-{id}"));
        std::fs::create_dir_all(&root).unwrap();
        let identity = age::x25519::Identity::generate();
        let identity_file = root.join("identity.txt");
        std::fs::write(
            &identity_file,
            format!(
                "# created: test\n# public key: {}\n{}\n",
                identity.to_public(),
                identity.to_string().expose_secret()
            ),
        )
        .unwrap();
        let settings = BackupSettings {
            admin_url: Secret::new(format!("{SERVER}/postgres")),
            recipients: vec![identity.to_public().to_string()],
            identity_file,
            primary: LocationConfig {
                path: root.join("primary"),
                region: "nl-ams1".into(),
            },
            copy: LocationConfig {
                path: root.join("copy"),
                region: "de-fra1".into(),
            },
            databases: BTreeMap::from([(SERVICE.to_owned(), Secret::new(db_url.clone()))]),
            ..BackupSettings::default()
        };
        let role = BackupRole::from_settings(&settings).expect("valid settings");
        Self {
            db_name,
            db_url,
            root,
            settings,
            role,
            identity,
        }
    }

    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.db_url)
            .await
            .expect("connect to test database")
    }

    /// Runs SQL in the source database.
    pub async fn sql(&self, sql: &str) {
        let mut conn = self.connect().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        conn.close().await.ok();
    }

    /// Row counts and checksums of the source database's tables, as the daemon computes them.
    pub async fn stats(&self) -> Vec<baton_backup::pg::TableStats> {
        let target = baton_backup::pg::PgTarget::parse(&self.db_url).unwrap();
        let mut conn = target.connect().await.unwrap();
        let tables = baton_backup::pg::list_tables(&mut conn).await.unwrap();
        baton_backup::pg::table_stats(&mut conn, &tables).await.unwrap()
    }

    /// Runs one job through the role as the runtime would.
    pub async fn run(&self, job: &StepJob) -> Result<Fields, StepError> {
        let ctx = ExecContext {
            cancel: CancellationToken::new(),
            daemon: "test".into(),
        };
        self.role.execute(job, &ctx).await
    }

    /// Runs one compensation job through the role as the runtime would.
    pub async fn compensate(&self, job: &StepJob) -> Result<Fields, StepError> {
        let ctx = ExecContext {
            cancel: CancellationToken::new(),
            daemon: "test".into(),
        };
        self.role.compensate(job, &ctx).await
    }

    /// Rebuilds the role from `settings` after a test changed them.
    pub fn reconfigure(&mut self) {
        self.role = BackupRole::from_settings(&self.settings).expect("valid settings");
    }

    pub fn primary_dir(&self, backup_id: &str) -> PathBuf {
        self.settings.primary.path.join(ZONE).join(backup_id)
    }

    pub fn copy_dir(&self, backup_id: &str) -> PathBuf {
        self.settings.copy.path.join(ZONE).join(backup_id)
    }

    /// Names of the backups present in a zone directory.
    pub fn backups_in(&self, location: &Path) -> Vec<String> {
        let mut names: Vec<String> = match std::fs::read_dir(location.join(ZONE)) {
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("BATON_KEEP_FAILED").is_some() {
            eprintln!("kept database {} and directory {}", self.db_name, self.root.display());
            return;
        }
        // Synchronous on purpose: drop runs outside any runtime guarantee.
        let _ = std::process::Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qAtc"])
            .arg(format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.db_name))
            .status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A job for the backup role in the production zone, as the scheduler sends it.
pub fn job(action: &str, step_id: &str, run_id: Uuid, params: serde_json::Value) -> StepJob {
    let mut job = StepJob::example(ZONE, baton_shared::roles::BACKUP, action);
    job.run_id = run_id;
    job.step_id = step_id.to_owned();
    job.params = match params {
        serde_json::Value::Object(m) => m,
        serde_json::Value::Null => Fields::new(),
        other => panic!("params must be an object, not {other}"),
    };
    job.deploy.service = SERVICE.to_owned();
    job.deploy.environment = "production".to_owned();
    job.deploy.repository = "git@example.org:shop/api.git".to_owned();
    job.deadline = Utc::now() + Duration::minutes(30);
    job
}

/// The seed pipeline's params of `backup.pre` / `backup.post`.
pub fn seed_params() -> serde_json::Value {
    serde_json::json!({"retention": {"daily": 30, "monthly": 12, "yearly": 7}})
}

/// Scratch databases left behind for `backup_id` (there must be none).
pub async fn scratch_databases(backup_id: &str) -> Vec<String> {
    let mut admin = PgConnection::connect(&format!("{SERVER}/postgres")).await.unwrap();
    let prefix = baton_backup::role::scratch_prefix(backup_id);
    let rows: Vec<String> = sqlx::query_scalar("SELECT datname::text FROM pg_database WHERE starts_with(datname, $1)")
        .bind(prefix)
        .fetch_all(&mut admin)
        .await
        .unwrap();
    admin.close().await.ok();
    rows
}

/// Flips one bit of the byte in the middle of a file.
pub fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

/// The outputs' `backup_id`.
pub fn backup_id_of(out: &Fields) -> String {
    out["backup_id"].as_str().expect("backup_id is a string").to_owned()
}

/// A `baton-backup` configuration for `env`, its schedule due at midnight UTC
/// so that whenever a test runs, today's work is due; with the volumes of
/// `env.settings` (claim and path).
pub fn write_config(env: &Env) -> PathBuf {
    let scheduler_key = baton_shared::signing::Keypair::generate();
    let daemon_key = baton_shared::signing::Keypair::generate();
    let key_file = env.root.join("daemon.key");
    std::fs::write(&key_file, daemon_key.secret_file_contents()).unwrap();
    let config: PathBuf = env.root.join("backup.toml");
    let s = &env.settings;
    std::fs::write(
        &config,
        format!(
            "[daemon]\nzone = {ZONE:?}\ninstance = \"backup-1\"\n\n\
             [signing]\nkey_file = {key:?}\ntrusted = [{trusted:?}]\n\n\
             [backup]\nadmin_url = {admin:?}\nrecipients = [{recipient:?}]\nidentity_file = {identity:?}\n\n\
             [backup.primary]\npath = {primary:?}\nregion = \"nl-ams1\"\n\n\
             [backup.copy]\npath = {copy:?}\nregion = \"de-fra1\"\n\n\
             [backup.databases]\n{SERVICE} = {db:?}\n\n\
             [backup.schedule]\ndaily_at = \"00:00\"\nrestore_test_day = 1\n\n{volumes}",
            key = key_file.display().to_string(),
            trusted = scheduler_key.public(),
            admin = s.admin_url.expose(),
            recipient = s.recipients[0],
            identity = s.identity_file.display().to_string(),
            primary = s.primary.path.display().to_string(),
            copy = s.copy.path.display().to_string(),
            db = env.db_url,
            volumes = env
                .settings
                .volumes
                .get(SERVICE)
                .into_iter()
                .flatten()
                .map(|v| format!(
                    "[[backup.volumes.{SERVICE}]]\nclaim = {:?}\npath = {:?}\n",
                    v.claim,
                    v.path.display().to_string()
                ))
                .collect::<String>(),
        ),
    )
    .unwrap();
    config
}
