//! Baton's db-migration role: Drizzle migrations, applied exactly as drizzle-orm's
//! own migrator would, with the seed's migration rules enforced around them.
//!
//! # The migrations folder
//!
//! The folder is read from the deployed repository at the merge commit
//! (`deploy.repository`, `deploy.commit_sha`), at the job parameter `migrations_dir`
//! (default `drizzle/migrations`). It is drizzle-kit's output:
//!
//! ```text
//! drizzle/migrations/
//!   meta/_journal.json            {"version": "7", "dialect": "postgresql", "entries": [{idx, version, when, tag, breakpoints}]}
//!   0000_create_users.sql         statements separated by `--> statement-breakpoint`
//!   0000_create_users.down.sql    Baton: the down migration, same format
//!   0001_backfill.sql
//!   0001_backfill.recovery.md     Baton: how to recover, for a migration without a down
//! ```
//!
//! Applied migrations are recorded as drizzle-orm does (see [`drizzle`]): a database
//! migrated by Baton is up to date for drizzle's `migrate()` and the other way round.
//!
//! # Rules (seed, step 2)
//!
//! - **Reversible or documented.** A migration without `<tag>.down.sql` is
//!   irreversible; `migrate` applies it only if `<tag>.recovery.md` exists and is not
//!   empty, and otherwise refuses with `irreversible_without_procedure`, naming it,
//!   before writing anything.
//! - **No destructive migration without a backup.** If a pending migration has a
//!   destructive statement (see [`analysis`]) and the job's zone is one of
//!   `migration.backup_required_zones` (default `production`), the job's input
//!   `backup.pre` (parameter `backup_step`) must be a verified backup of this very
//!   run (`verified == true`, `run_id == job.run_id`); otherwise `migrate` refuses
//!   with `backup_not_verified` before writing anything.
//! - **Additive first.** Renames and drops of columns, tables, views or schemas in a
//!   deploy produce warnings in the step outputs.
//! - **Integrity.** After applying, in the same transaction, `verify` runs (see
//!   [`verify`]); if it fails, the transaction rolls back and nothing is applied.
//!
//! # Actions
//!
//! - `migrate` (execute): under the migration lock, applies every pending migration
//!   in one transaction, records them in `drizzle.__drizzle_migrations` and in
//!   `baton_migrations.log`, verifies, commits. Outputs: [`role::MigrateOutputs`].
//! - `verify` (execute): the checks alone; pending migrations also fail it.
//! - `rollback` (compensate): the down migrations of what this step applied
//!   (`own_outputs.applied`), latest first, each in its own transaction that also
//!   deletes its history row and logs a `down` row. A migration without a down fails
//!   with `irreversible`, before anything is rolled back, naming the migration, its
//!   recovery procedure and the backup to restore from.
//!
//! The lock is a PostgreSQL advisory lock; a second job on the same database waits
//! up to `migration.lock_timeout_secs` and then fails with the retryable
//! `migration_locked`.

pub mod analysis;
pub mod config;
pub mod db;
pub mod drizzle;
pub mod error;
pub mod role;
pub mod verify;

pub use config::MigrationConfig;
pub use error::Error;
pub use role::{DbMigration, MigrateOutputs};

use baton_shared::config::ConfigError;
use baton_shared::exit::Exit;
use baton_shared::kit;
use baton_shared::protocol::{Deploy, JobKind, StepJob};
use baton_shared::runtime::BoxFuture;

/// `baton-db-migration`, as the daemon kit runs it.
pub struct Daemon;

impl kit::Daemon for Daemon {
    const BINARY: &'static str = "baton-db-migration";
    const ABOUT: &'static str = "Baton's db-migration daemon: Drizzle migrations for one zone";
    const SECTION: &'static str = "migration";
    type Settings = MigrationConfig;
    type Role = DbMigration;
    type Modes = Modes;

    fn validate(settings: &MigrationConfig) -> Result<(), ConfigError> {
        settings.validate()
    }

    fn build(config: &kit::Config<MigrationConfig>) -> Result<DbMigration, ConfigError> {
        Ok(DbMigration::new(config.settings.clone()))
    }

    fn serves(modes: &Modes) -> bool {
        modes.once.is_none()
    }

    fn one_shot<'a>(
        modes: &'a Modes,
        role: &'a DbMigration,
        config: &'a kit::Config<MigrationConfig>,
    ) -> Option<BoxFuture<'a, baton_shared::exit::Exit>> {
        let once = modes.once.as_ref()?;
        Some(Box::pin(once.run(role, &config.common.daemon.zone)))
    }

    fn background(
        _role: &std::sync::Arc<DbMigration>,
        config: &kit::Config<MigrationConfig>,
        stop: tokio_util::sync::CancellationToken,
    ) -> Vec<BoxFuture<'static, ()>> {
        // Scratch databases of daemons killed mid-verification go, at start and periodically.
        let admin_url = config.settings.admin_url.clone();
        vec![Box::pin(baton_shared::scratch::sweep_loop(
            move || {
                let admin_url = admin_url.clone();
                async move { verify::sweep_scratch(&admin_url).await }
            },
            stop,
        ))]
    }
}

/// `baton-db-migration`'s one-shot modes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Modes {
    #[command(subcommand)]
    pub once: Option<Once>,
}

/// Run the code a job runs, once, without a broker, and print its outcome as
/// JSON: to check a repository before its first deploy, or to adopt an
/// existing database.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Once {
    /// Say what `apply` would do, migration by migration; change nothing.
    Check(Target),
    /// Apply what is pending, exactly as a `migrate` job does.
    Apply(Target),
    /// Run the integrity checks, as a `verify` job does.
    Verify(Target),
}

/// The deploy a one-shot mode works on.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The service, whose database `migration.databases` names.
    #[arg(long)]
    pub service: String,
    /// The repository (an absolute path or a URL git can fetch).
    #[arg(long)]
    pub repository: String,
    /// The full commit SHA.
    #[arg(long)]
    pub commit: String,
    /// The migrations folder in the repository.
    #[arg(long, default_value = role::DEFAULT_MIGRATIONS_DIR)]
    pub migrations_dir: String,
}

impl Once {
    /// Runs the mode and prints its outcome; the exit code follows the kit's table.
    pub async fn run(&self, role: &DbMigration, zone: &str) -> Exit {
        let (target, action) = match self {
            Self::Check(t) => (t, "check"),
            Self::Apply(t) => (t, "migrate"),
            Self::Verify(t) => (t, "verify"),
        };
        let mut job = StepJob::example(zone, baton_shared::roles::DB_MIGRATION, action)
            .with_param("migrations_dir", target.migrations_dir.clone());
        job.kind = JobKind::Execute;
        job.step_id = format!("one-shot.{action}");
        job.deploy = Deploy {
            service: target.service.clone(),
            environment: zone.to_owned(),
            repository: target.repository.clone(),
            commit_sha: target.commit.clone(),
            risk: baton_shared::protocol::Risk::Standard,
            exceptions: Vec::new(),
        };
        let outcome = match self {
            Self::Check(_) => role.check(&job).await.and_then(|report| {
                baton_shared::protocol::to_fields(&report).map_err(|e| Error::InvalidJob { problem: e.message })
            }),
            _ => role.run(&job).await,
        };
        match outcome {
            Ok(out) => {
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
                let refused = out.get("would").and_then(|w| w.as_str()) == Some("refuse");
                if refused { Exit::Failed } else { Exit::Success }
            }
            Err(e) => {
                let error = e.to_step_error();
                println!("{}", serde_json::json!({"error": error}));
                eprintln!("baton-db-migration: {e}");
                Exit::Failed
            }
        }
    }
}
