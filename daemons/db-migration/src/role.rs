//! The `db-migration` role: `migrate`, `verify` and the `rollback` compensation.
//!
//! Every action reads the migrations folder at the job's commit, connects to the
//! service's database for the daemon's zone, and takes the migration lock before it
//! reads the history, so two jobs on one database run one after the other and each
//! sees what the other did.
//!
//! Idempotency per (run, step): `migrate` logs what it applies under the run and step
//! in `baton_migrations.log`, in the same transaction. A re-run finds nothing pending
//! and reports the migrations the first run applied (still applied ones), so a
//! rollback after a crash-and-retry still undoes them. `rollback` only undoes
//! migrations still in drizzle's history, so running it again does nothing.

use baton_shared::facts::{self, MigrationsApplied, Removal};
use baton_shared::kit;
use baton_shared::protocol::{Fields, JobKind, StepJob};
use baton_shared::roles;
use baton_shared::runtime::{BoxFuture, ExecContext, Outcome, Role};
use baton_shared::secret::Secret;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::Connection;
use sqlx::postgres::PgConnection;

use crate::analysis::{self, Finding};
use crate::config::MigrationConfig;
use crate::db::{self, Direction};
use crate::drizzle::{Migration, MigrationSet};
use crate::error::{Error, Problem};
use crate::verify;
use baton_shared::git::{self as source, GitCache};

/// Default `migrations_dir` job parameter.
pub const DEFAULT_MIGRATIONS_DIR: &str = "drizzle/migrations";

/// Default `backup_step` job parameter: the input carrying the pre-deploy backup.
pub const DEFAULT_BACKUP_STEP: &str = "backup.pre";

/// Outputs of `migrate`, the input of `rollback` (as the step's `own_outputs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrateOutputs {
    /// Tags this run applied to the database, in the order applied.
    pub applied: Vec<String>,
    /// SHA-256 of each applied migration, as in `drizzle.__drizzle_migrations`.
    pub hashes: Vec<String>,
    /// What gates read: destructive statements, renames and removals.
    #[serde(flatten)]
    pub facts: MigrationsApplied,
    /// Additive-first rule warnings: renames and removals in this deploy, as text.
    pub warnings: Vec<String>,
    /// The service whose database this is.
    pub database: String,
    /// Newest `created_at` in the database's history afterwards.
    pub last_created_at: Option<i64>,
    /// What the integrity checks did.
    #[serde(default)]
    pub verify: Value,
    /// `.sql` files in the folder that the journal does not name: never
    /// applied (drizzle applies journal entries only), usually a mistake.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unjournaled_sql: Vec<String>,
    /// Journal entries older than the newest applied one that this run
    /// applied, under the merge event's `apply-older-migrations` exception.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied_older: Vec<String>,
    /// Migrations of the history that predates Baton (up to the folder's
    /// `baton.baseline`) this run applied without a down migration or a
    /// recovery procedure.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied_before_adoption: Vec<String>,
    /// The data checks this zone's database passed before anything ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_checks: Vec<String>,
}

/// What `rollback` needs from the `migrate` outputs.
#[derive(Debug, Deserialize)]
struct RollbackInput {
    applied: Vec<String>,
    hashes: Vec<String>,
    #[serde(default)]
    database: Option<String>,
}

/// The destructive statements of some migrations and what they mean for the deploy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assessment {
    /// `(tag, finding)` in migration order.
    pub findings: Vec<(String, Finding)>,
    pub warnings: Vec<String>,
}

impl Assessment {
    pub fn destructive(&self) -> bool {
        !self.findings.is_empty()
    }

    pub fn describe(&self) -> Vec<String> {
        self.findings.iter().map(|(tag, f)| format!("{tag}: {f}")).collect()
    }
}

/// Scans migrations for destructive statements, chunk by chunk as they execute.
pub fn assess<'a>(migrations: impl IntoIterator<Item = &'a Migration>) -> Assessment {
    let mut out = Assessment::default();
    for m in migrations {
        for chunk in m.statements() {
            for f in analysis::analyze(chunk) {
                if f.kind.breaks_additive_first() {
                    out.warnings.push(format!(
                        "{}: {} in the same deploy as the code that goes with it; migrations are additive \
                         first: add the new structure, deploy the code, then rename or remove in a separate \
                         deployment ({})",
                        m.tag, f.kind, f.statement
                    ));
                }
                out.findings.push((m.tag.clone(), f));
            }
        }
    }
    out
}

/// Tags of migrations with neither a down migration nor a recovery procedure.
pub fn without_procedure<'a>(migrations: impl IntoIterator<Item = &'a Migration>) -> Vec<String> {
    migrations
        .into_iter()
        .filter(|m| !m.is_reversible() && m.recovery.is_none())
        .map(|m| m.tag.clone())
        .collect()
}

/// The verified pre-deploy backup of this run in `inputs[input]`, or why there is
/// none (the facts contract's one rule, `baton_shared::facts::verified_backup_of_run`).
pub fn verified_backup(job: &StepJob, input: &str) -> Result<String, String> {
    let outputs = facts::input(&job.inputs, input).map_err(|e| e.to_string())?;
    facts::verified_backup_of_run(input, outputs, job.run_id)
        .map(|b| b.backup_id)
        .map_err(|e| e.to_string())
}

/// What `apply` (a `migrate` job) would do, migration by migration; made by
/// `check`, which changes nothing.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub service: String,
    pub commit: String,
    /// `apply` (everything passes), `nothing` (nothing pending) or `refuse`.
    pub would: &'static str,
    /// Why `apply` would refuse, exactly as the job would fail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<baton_shared::protocol::StepError>,
    pub migrations: Vec<CheckedMigration>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unjournaled_sql: Vec<String>,
}

/// One journal entry as `check` sees it.
#[derive(Debug, Clone, Serialize)]
pub struct CheckedMigration {
    pub tag: String,
    /// `applied`, `pending`, `older than applied` or `changed after applied`.
    pub state: &'static str,
    /// `down`, `recovery procedure`, `none` or `none, before adoption`.
    pub undo: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destructive: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_transactional: Vec<String>,
}

/// A job's folder and database, opened by `DbMigration::open`.
struct Opened {
    params: Params,
    set: MigrationSet,
    conn: PgConnection,
    history: db::History,
}

/// What `migrate` decided before writing anything.
/// The folder's expected schema replayed on a scratch database (the cache
/// does not hold it); a pending migration that fails there is a failed
/// migration, found before the target was touched.
async fn replay_expected(
    admin_url: &baton_shared::secret::Secret<String>,
    set: &MigrationSet,
    pending: &[&Migration],
) -> Result<verify::Expected, Error> {
    verify::replayed(admin_url, set).await.map_err(|e| match e {
        Error::ScratchMigration { tag, statement, source } if pending.iter().any(|m| m.tag == tag) => {
            let total = set.get(&tag).map_or(statement, |m| m.statements().len());
            Error::MigrationFailed {
                tag,
                statement,
                total,
                on_scratch: true,
                source,
            }
        }
        other => other,
    })
}

struct Decided<'s> {
    /// To apply now, in journal order.
    pending: Vec<&'s Migration>,
    /// Pending migrations up to the baseline: applied without companions.
    adopted: Vec<&'s Migration>,
    /// Entries older than the newest applied one, applied under the deploy's exception.
    applied_older: Vec<String>,
    /// Everything this run applied, earlier attempts included.
    run_migrations: Vec<&'s Migration>,
    removals: Vec<Removal>,
}

/// Job parameters (`baton_shared::roles`: db-migration).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Params {
    migrations_dir: String,
    backup_step: String,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            migrations_dir: DEFAULT_MIGRATIONS_DIR.to_owned(),
            backup_step: DEFAULT_BACKUP_STEP.to_owned(),
        }
    }
}

impl Params {
    fn from_job(job: &StepJob) -> Result<Self, Error> {
        let mut p: Self = job.params().map_err(|e| Error::InvalidParam {
            name: e.key,
            problem: e.problem,
        })?;
        p.migrations_dir = source::check_folder("migrations_dir", &p.migrations_dir)?;
        Ok(p)
    }
}

/// The db-migration role, built from the daemon's `[migration]` configuration.
#[derive(Debug, Clone)]
pub struct DbMigration {
    config: MigrationConfig,
    git: GitCache,
}

impl DbMigration {
    pub fn new(config: MigrationConfig) -> Self {
        let git = GitCache::new(config.repos_dir.clone());
        Self { config, git }
    }

    /// Runs a job to its outputs; the `Role` methods wrap this.
    pub async fn run(&self, job: &StepJob) -> Result<Fields, Error> {
        match (job.kind, job.action.as_str()) {
            (JobKind::Execute, "migrate") => self.migrate(job).await,
            (JobKind::Execute, "verify") => self.verify(job).await,
            (JobKind::Compensate, "rollback") => self.rollback(job).await,
            (kind, action) => Err(Error::UnknownAction {
                kind,
                action: action.to_owned(),
            }),
        }
    }

    fn database(&self, job: &StepJob) -> Result<&Secret<String>, Error> {
        self.config
            .database(&job.deploy.service)
            .ok_or_else(|| Error::NoDatabase {
                service: job.deploy.service.clone(),
                zone: job.zone.clone(),
            })
    }

    async fn migrations(&self, job: &StepJob, params: &Params) -> Result<MigrationSet, Error> {
        let files = self
            .git
            .read_folder(&job.deploy.repository, &job.deploy.commit_sha, &params.migrations_dir)
            .await?;
        let set = MigrationSet::from_files(
            format!("{} at {}", params.migrations_dir, job.deploy.commit_sha),
            &files,
        )?;
        tracing::info!(
            run_id = %job.run_id,
            step_id = %job.step_id,
            commit = %job.deploy.commit_sha,
            dir = %params.migrations_dir,
            migrations = set.migrations.len(),
            "migrations read"
        );
        if !set.unjournaled.is_empty() {
            tracing::warn!(
                run_id = %job.run_id,
                step_id = %job.step_id,
                files = ?set.unjournaled,
                "sql files the journal does not name are never applied"
            );
        }
        Ok(set)
    }

    async fn locked_connection(&self, url: &Secret<String>, service: &str) -> Result<PgConnection, Error> {
        let mut conn = db::connect(url, service).await?;
        db::lock(
            &mut conn,
            service,
            std::time::Duration::from_secs(self.config.lock_timeout_secs),
        )
        .await?;
        Ok(conn)
    }

    async fn migrate(&self, job: &StepJob) -> Result<Fields, Error> {
        let service = job.deploy.service.as_str();
        let Opened {
            params,
            set,
            mut conn,
            history,
        } = self.open(job).await?;
        let data_checks = self.data_checks(service, &mut conn).await?;
        let Decided {
            pending,
            adopted,
            applied_older,
            run_migrations,
            removals,
        } = self.decide(job, &params, &set, &mut conn, &history).await?;

        // The expected schema: derived from the target when the schema of the
        // migrations it already has is known and it matches it (checked below,
        // in the migration's transaction, before anything is applied); else
        // built before the target's transaction opens, so the target's tables
        // are locked only while its own migrations run.
        let applied_count = set.migrations.len() - pending.len();
        let pending_are_the_rest = !pending.is_empty()
            && pending
                .iter()
                .zip(&set.migrations[applied_count..])
                .all(|(p, m)| p.tag == m.tag);
        let known = verify::known(
            &self.config.admin_url,
            &set,
            pending_are_the_rest.then_some((applied_count, &mut conn)),
        )
        .await?;
        let (mut expected, prefix) = match known {
            verify::Known::Cached(e) => (Some(e), None),
            verify::Known::Prefix(p) => (None, Some(p)),
            verify::Known::Neither => (
                Some(replay_expected(&self.config.admin_url, &set, &pending).await?),
                None,
            ),
        };
        let db_err = |doing| {
            let service = service.to_owned();
            move |source| Error::Database { service, doing, source }
        };
        let mut tx = conn
            .begin()
            .await
            .map_err(db_err("starting the migration transaction"))?;
        let mut derived = false;
        if let Some(prefix) = &prefix {
            let before = verify::snapshot(&mut tx)
                .await
                .map_err(db_err("reading the schema before applying"))?;
            if &before == prefix {
                derived = true;
            } else {
                // It differs from what its migrations made: the replay's
                // comparison after applying names how.
                tracing::info!(run_id = %job.run_id, step_id = %job.step_id, service,
                    "the database differs from its applied migrations' schema; replaying the folder to compare");
                expected = Some(replay_expected(&self.config.admin_url, &set, &pending).await?);
            }
        }
        if !pending.is_empty() {
            db::ensure_tables(&mut tx, service).await?;
            for m in &pending {
                tracing::info!(run_id = %job.run_id, step_id = %job.step_id, service, tag = %m.tag, "applying migration");
                db::apply(&mut tx, m).await?;
                db::log(&mut tx, service, m, Direction::Up, job.run_id, &job.step_id).await?;
            }
        }
        let expected = match expected {
            Some(e) => e,
            None => verify::Expected {
                schema: verify::snapshot(&mut tx)
                    .await
                    .map_err(db_err("reading the schema the migrations produced"))?,
                cached: false,
                derived,
            },
        };
        let report = verify::check(&mut tx, service, &expected).await?;
        if !report.ok() {
            tx.rollback().await.map_err(db_err("rolling back"))?;
            return Err(Error::VerifyFailed {
                service: service.to_owned(),
                problems: report.problems,
                applied_nothing: true,
            });
        }
        tx.commit().await.map_err(db_err("committing the migrations"))?;
        if expected.derived {
            // For the next zone and replica; a failure here costs them a replay, not this deploy.
            if let Err(e) = verify::remember_derived(&self.config.admin_url, &set, &expected.schema).await {
                tracing::warn!(run_id = %job.run_id, step_id = %job.step_id, service, error = %e,
                    "could not cache the derived expected schema");
            }
        }
        let after = db::history(&mut conn, service).await?;
        let _ = conn.close().await;

        let applied = run_migrations;
        let applied_before_adoption: Vec<String> = adopted
            .iter()
            .filter(|m| !m.is_reversible() && m.recovery.is_none())
            .map(|m| m.tag.clone())
            .collect();
        if !applied_before_adoption.is_empty() {
            tracing::info!(
                run_id = %job.run_id,
                step_id = %job.step_id,
                service,
                migrations = applied_before_adoption.len(),
                baseline = ?set.baseline,
                "history that predates Baton applied without down migrations or recovery procedures"
            );
        }
        let risk = assess(applied.iter().copied());
        for w in &risk.warnings {
            tracing::warn!(run_id = %job.run_id, step_id = %job.step_id, service, warning = %w, "additive-first rule");
        }
        tracing::info!(
            run_id = %job.run_id,
            step_id = %job.step_id,
            service,
            applied_now = pending.len(),
            applied_by_run = applied.len(),
            "migrate done"
        );
        let mut warnings = risk.warnings.clone();
        warnings.extend(set.unjournaled.iter().map(|f| {
            format!(
                "{}/{f} is not in meta/_journal.json, so it is never applied (drizzle-kit writes the journal entry \
                 with the file; a file added by hand needs one)",
                params.migrations_dir
            )
        }));
        warnings.extend(applied_before_adoption.iter().map(|t| {
            format!("{t} was applied without a down migration or recovery procedure: it predates the repository's baton.baseline")
        }));
        let out = MigrateOutputs {
            applied: applied.iter().map(|m| m.tag.clone()).collect(),
            hashes: applied.iter().map(|m| m.hash.clone()).collect(),
            facts: MigrationsApplied {
                destructive: risk.destructive(),
                removals,
            },
            warnings,
            database: service.to_owned(),
            last_created_at: after.last,
            verify: report.to_json(),
            unjournaled_sql: set.unjournaled.clone(),
            applied_older,
            applied_before_adoption,
            data_checks,
        };
        baton_shared::protocol::to_fields(&out).map_err(|e| Error::InvalidJob { problem: e.message })
    }

    /// Runs `service`'s data checks in a read-only transaction: the names of
    /// those passed, or every failure.
    async fn data_checks(&self, service: &str, conn: &mut sqlx::PgConnection) -> Result<Vec<String>, Error> {
        let checks = self.config.data_checks(service);
        if checks.is_empty() {
            return Ok(Vec::new());
        }
        let db_err = |doing| {
            let service = service.to_owned();
            move |source| Error::Database { service, doing, source }
        };
        let mut tx = conn.begin().await.map_err(db_err("starting the data checks"))?;
        sqlx::query("set transaction read only")
            .execute(&mut *tx)
            .await
            .map_err(db_err("making the data checks read-only"))?;
        let (mut passed, mut failures) = (Vec::new(), Vec::new());
        for c in checks {
            sqlx::query("savepoint data_check")
                .execute(&mut *tx)
                .await
                .map_err(db_err("a data check"))?;
            match sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(c.query.clone()))
                .fetch_one(&mut *tx)
                .await
            {
                Ok(0) => passed.push(c.name.clone()),
                Ok(n) => failures.push(format!("{}: {n} rows", c.name)),
                // A table the migrations have not created yet holds no data.
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => passed.push(c.name.clone()),
                Err(e) => failures.push(format!("{} could not run: {e}", c.name)),
            }
            sqlx::query("rollback to savepoint data_check")
                .execute(&mut *tx)
                .await
                .map_err(db_err("a data check"))?;
        }
        tx.rollback().await.map_err(db_err("ending the data checks"))?;
        if failures.is_empty() {
            Ok(passed)
        } else {
            Err(Error::DataChecks {
                service: service.to_owned(),
                failures,
            })
        }
    }

    /// The job's migrations folder at its commit and its database, under the
    /// migration lock, with drizzle's history as it is now.
    async fn open(&self, job: &StepJob) -> Result<Opened, Error> {
        let service = job.deploy.service.as_str();
        let url = self.database(job)?;
        let params = Params::from_job(job)?;
        let set = self.migrations(job, &params).await?;
        let mut conn = self.locked_connection(url, service).await?;
        let history = db::history(&mut conn, service).await?;
        Ok(Opened {
            params,
            set,
            conn,
            history,
        })
    }

    /// What a `migrate` job would do at this commit, changing nothing: every
    /// journal entry's state and undo, and the verdict of the same checks.
    pub async fn check(&self, job: &StepJob) -> Result<CheckReport, Error> {
        let service = job.deploy.service.as_str();
        let Opened {
            params,
            set,
            mut conn,
            history,
        } = self.open(job).await?;
        let decided = self.decide(job, &params, &set, &mut conn, &history).await;
        let _ = conn.close().await;
        let pending: Vec<&str> = set.pending(history.last).iter().map(|m| m.tag.as_str()).collect();
        let older: Vec<&str> = set
            .older_than_applied(&history)
            .iter()
            .map(|(m, _)| m.tag.as_str())
            .collect();
        let changed: Vec<&str> = set
            .changed_after_applied(&history)
            .iter()
            .map(|m| m.tag.as_str())
            .collect();
        let migrations = set
            .migrations
            .iter()
            .map(|m| {
                let tag = m.tag.as_str();
                let state = if changed.contains(&tag) {
                    "changed after applied"
                } else if older.contains(&tag) {
                    "older than applied"
                } else if pending.contains(&tag) {
                    "pending"
                } else {
                    "applied"
                };
                let undo = if m.is_reversible() {
                    "down"
                } else if m.recovery.is_some() {
                    "recovery procedure"
                } else if set.predates_adoption(m) {
                    "none, before adoption"
                } else {
                    "none"
                };
                let chunks = m.statements();
                CheckedMigration {
                    tag: m.tag.clone(),
                    state,
                    undo,
                    destructive: chunks
                        .iter()
                        .flat_map(|c| analysis::analyze(c))
                        .map(|f| f.to_string())
                        .collect(),
                    not_transactional: chunks
                        .iter()
                        .flat_map(|c| analysis::not_transactional(c))
                        .map(|n| format!("{} ({})", n.statement, n.why))
                        .collect(),
                }
            })
            .collect();
        let (would, refusal) = match decided {
            Ok(d) if d.pending.is_empty() => ("nothing", None),
            Ok(_) => ("apply", None),
            Err(e) => ("refuse", Some(e.to_step_error())),
        };
        Ok(CheckReport {
            service: service.to_owned(),
            commit: job.deploy.commit_sha.clone(),
            would,
            refusal,
            migrations,
            unjournaled_sql: set.unjournaled.clone(),
        })
    }

    /// Everything `migrate` decides before it writes anything: what is pending
    /// (and why), and each refusal, in the order they are checked. `check` runs
    /// exactly this and reports it instead of applying.
    async fn decide<'s>(
        &self,
        job: &StepJob,
        params: &Params,
        set: &'s MigrationSet,
        conn: &mut PgConnection,
        history: &db::History,
    ) -> Result<Decided<'s>, Error> {
        let service = job.deploy.service.as_str();
        let earlier = db::applied_by(&mut *conn, service, job.run_id, &job.step_id, history).await?;
        let mut pending = set.pending(history.last);
        let changed = set.changed_after_applied(history);
        if !changed.is_empty() {
            return Err(Error::ChangedAfterApplied {
                migrations: changed.iter().map(|m| m.tag.clone()).collect(),
                dir: params.migrations_dir.clone(),
            });
        }
        let older = set.older_than_applied(history);
        let mut applied_older = Vec::new();
        if !older.is_empty() {
            let entries: Vec<String> = older
                .iter()
                .map(|(m, newest)| format!("{} (when {}, older than the applied {newest})", m.tag, m.when))
                .collect();
            let Some(exception) = job.deploy.exception(baton_shared::protocol::APPLY_OLDER_MIGRATIONS) else {
                return Err(Error::OlderThanApplied { entries });
            };
            tracing::warn!(
                run_id = %job.run_id,
                step_id = %job.step_id,
                service,
                entries = ?entries,
                reason = %exception.reason,
                "applying journal entries older than the newest applied one, as the deploy's exception asks"
            );
            applied_older = older.iter().map(|(m, _)| m.tag.clone()).collect();
            pending.extend(older.into_iter().map(|(m, _)| m));
            pending.sort_by_key(|m| m.idx);
        }

        // Refusals come before anything is written. History that predates the
        // repository's adoption of Baton needs no companions.
        let (adopted, changes): (Vec<&Migration>, Vec<&Migration>) =
            pending.iter().copied().partition(|m| set.predates_adoption(m));
        let missing = without_procedure(changes.iter().copied());
        if !missing.is_empty() {
            return Err(Error::IrreversibleWithoutProcedure {
                migrations: missing,
                dir: params.migrations_dir.clone(),
            });
        }
        self.transactional(&mut *conn, service, &pending, params).await?;
        let risk = assess(pending.iter().copied());
        let mut run_migrations: Vec<&Migration> = earlier.iter().filter_map(|a| set.get(&a.tag)).collect();
        for m in &pending {
            if !run_migrations.iter().any(|a| a.tag == m.tag) {
                run_migrations.push(m);
            }
        }
        let removals = self.removals(job, params, &run_migrations).await?;
        self.additive_first(job, &pending, &removals)?;
        if risk.destructive() && self.config.backup_required_zones.contains(&job.zone) {
            match verified_backup(job, &params.backup_step) {
                Ok(backup) => {
                    tracing::info!(run_id = %job.run_id, backup_id = %backup, "destructive migration covered by a verified backup")
                }
                Err(problem) => {
                    return Err(Error::BackupNotVerified {
                        zone: job.zone.clone(),
                        input: params.backup_step.clone(),
                        problem,
                        findings: risk.describe(),
                    });
                }
            }
        }
        Ok(Decided {
            pending,
            adopted,
            applied_older,
            run_migrations,
            removals,
        })
    }

    /// Refuses pending migrations with statements that cannot run inside the
    /// one migration transaction on this server, before anything is applied:
    /// the report "nothing was applied" after a failure must stay true.
    async fn transactional(
        &self,
        conn: &mut PgConnection,
        service: &str,
        pending: &[&Migration],
        params: &Params,
    ) -> Result<(), Error> {
        let server: i32 = sqlx::query_scalar::<_, String>("show server_version_num")
            .fetch_one(&mut *conn)
            .await
            .map_err(|source| Error::Database {
                service: service.to_owned(),
                doing: "reading the server version",
                source,
            })?
            .parse()
            .unwrap_or(0);
        let statements: Vec<String> = pending
            .iter()
            .flat_map(|m| {
                m.statements()
                    .into_iter()
                    .flat_map(analysis::not_transactional)
                    .filter(|n| n.allowed_from.is_none_or(|from| server < from))
                    .map(|n| {
                        format!(
                            "{}/{}.sql has `{}` ({})",
                            params.migrations_dir, m.tag, n.statement, n.why
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        if statements.is_empty() {
            Ok(())
        } else {
            Err(Error::NotTransactional { statements })
        }
    }

    /// Renames and removals of `migrations`, each with the files of the deployed
    /// commit's code (outside the migrations folder) that still name it.
    async fn removals(&self, job: &StepJob, params: &Params, migrations: &[&Migration]) -> Result<Vec<Removal>, Error> {
        let mut out = Vec::new();
        for m in migrations {
            for chunk in m.statements() {
                for f in analysis::analyze(chunk) {
                    let Some(name) = f.kind.removed_name() else { continue };
                    let used_by = self
                        .git
                        .files_naming(
                            &job.deploy.repository,
                            &job.deploy.commit_sha,
                            &name,
                            &[params.migrations_dir.as_str()],
                        )
                        .await?;
                    out.push(Removal {
                        tag: m.tag.clone(),
                        change: f.kind.to_string(),
                        name,
                        used_by,
                    });
                }
            }
        }
        Ok(out)
    }

    /// The seed's "never rename or remove and deploy simultaneously": a pending
    /// migration may not rename or remove what the commit's code still names,
    /// unless the merge event carries an `additive-first` exception with a reason.
    fn additive_first(&self, job: &StepJob, pending: &[&Migration], removals: &[Removal]) -> Result<(), Error> {
        let in_use: Vec<&Removal> = removals
            .iter()
            .filter(|r| !r.used_by.is_empty() && pending.iter().any(|m| m.tag == r.tag))
            .collect();
        if in_use.is_empty() {
            return Ok(());
        }
        if let Some(e) = job.deploy.exception(baton_shared::protocol::ADDITIVE_FIRST) {
            tracing::warn!(
                run_id = %job.run_id,
                step_id = %job.step_id,
                reason = %e.reason,
                removals = in_use.len(),
                "renames or removals still named by the code, applied under the deploy's additive-first exception"
            );
            return Ok(());
        }
        Err(Error::AdditiveFirst {
            removals: in_use
                .iter()
                .map(|r| format!("{}: {} (still named in {})", r.tag, r.change, r.used_by.join(", ")))
                .collect(),
        })
    }

    async fn verify(&self, job: &StepJob) -> Result<Fields, Error> {
        let service = job.deploy.service.as_str();
        let Opened {
            params: _,
            set,
            mut conn,
            history,
        } = self.open(job).await?;
        // Entries drizzle skips (older than the newest applied) are pending too.
        let mut pending: Vec<String> = set.pending(history.last).iter().map(|m| m.tag.clone()).collect();
        pending.extend(set.older_than_applied(&history).into_iter().map(|(m, newest)| {
            format!(
                "{} (older than the applied {newest}: drizzle-orm never applies it)",
                m.tag
            )
        }));
        let expected = verify::expected_snapshot(&self.config.admin_url, &set).await?;
        let db_err = |doing| {
            let service = service.to_owned();
            move |source| Error::Database { service, doing, source }
        };
        let mut tx = conn.begin().await.map_err(db_err("starting the verification"))?;
        let mut report = verify::check(&mut tx, service, &expected).await?;
        // Constraints that validated stay validated even if something else failed.
        tx.commit().await.map_err(db_err("committing validated constraints"))?;
        let _ = conn.close().await;
        if !pending.is_empty() {
            report.problems.push(Problem::Pending(pending));
        }
        if !report.ok() {
            return Err(Error::VerifyFailed {
                service: service.to_owned(),
                problems: report.problems,
                applied_nothing: false,
            });
        }
        let mut out = match report.to_json() {
            Value::Object(m) => m,
            _ => Fields::new(),
        };
        out.insert("database".into(), service.into());
        out.insert("last_created_at".into(), history.last.into());
        Ok(out)
    }

    async fn rollback(&self, job: &StepJob) -> Result<Fields, Error> {
        let service = job.deploy.service.as_str();
        let own: RollbackInput = serde_json::from_value(Value::Object(job.own_outputs.clone()))
            .map_err(|e| Error::InvalidOwnOutputs { problem: e.to_string() })?;
        if own.applied.len() != own.hashes.len() {
            return Err(Error::InvalidOwnOutputs {
                problem: format!("{} applied tags but {} hashes", own.applied.len(), own.hashes.len()),
            });
        }
        if let Some(db) = own.database.as_deref()
            && db != service
        {
            return Err(Error::InvalidOwnOutputs {
                problem: format!("they are for the database of {db}, this job is for {service}"),
            });
        }
        let mut out = Fields::new();
        out.insert("database".into(), service.into());
        if own.applied.is_empty() {
            out.insert("rolled_back".into(), Value::Array(Vec::new()));
            out.insert("not_applied".into(), Value::Array(Vec::new()));
            return Ok(out);
        }
        let url = self.database(job)?;
        let params = Params::from_job(job)?;
        let set = self.migrations(job, &params).await?;
        let mut ours: Vec<&Migration> = Vec::new();
        for (tag, hash) in own.applied.iter().zip(&own.hashes) {
            let m = set.get(tag).ok_or_else(|| Error::InvalidOwnOutputs {
                problem: format!("migration {tag} is not in {}", set.origin),
            })?;
            if &m.hash != hash {
                return Err(Error::InvalidOwnOutputs {
                    problem: format!("{tag} has hash {} at this commit, the step recorded {hash}", m.hash),
                });
            }
            ours.push(m);
        }

        let mut conn = self.locked_connection(url, service).await?;
        let history = db::history(&mut conn, service).await?;
        let (still, gone): (Vec<&Migration>, Vec<&Migration>) =
            ours.iter().partition(|m| history.contains(&m.hash, m.when));
        let backup = match job.inputs.get(&params.backup_step).and_then(|f| f.get("backup_id")) {
            Some(Value::String(id)) => format!("pre-deploy backup {id}"),
            _ => format!(
                "the latest verified backup (this job has no `{}` input naming one)",
                params.backup_step
            ),
        };
        if let Some(oldest) = still.iter().map(|m| m.when).min() {
            let newer: Vec<String> = history
                .rows
                .iter()
                .filter(|r| r.created_at.is_some_and(|c| c > oldest))
                .filter(|r| !ours.iter().any(|m| m.hash == r.hash && Some(m.when) == r.created_at))
                .map(|r| {
                    set.migrations.iter().find(|m| m.hash == r.hash).map_or_else(
                        || {
                            format!(
                                "a migration not in this commit (hash {}, created_at {:?})",
                                r.hash, r.created_at
                            )
                        },
                        |m| m.tag.clone(),
                    )
                })
                .collect();
            if !newer.is_empty() {
                return Err(Error::NewerMigrations { tags: newer });
            }
        }
        // All or nothing: an irreversible migration means restoring the backup, which
        // undoes every migration of the run anyway, so nothing is rolled back first.
        if let Some(m) = still.iter().rev().find(|m| !m.is_reversible()) {
            return Err(Error::Irreversible {
                tag: m.tag.clone(),
                down_file: format!("{}/{}", params.migrations_dir, m.down_file()),
                service: service.to_owned(),
                backup,
                procedure: procedure(m, &params),
            });
        }
        let mut rolled_back = Vec::new();
        for m in still.iter().rev() {
            let restore = format!(
                "restore {service} from {backup}; recovery procedure: {}",
                procedure(m, &params)
            );
            let mut tx = conn.begin().await.map_err(|source| Error::Database {
                service: service.to_owned(),
                doing: "starting a rollback transaction",
                source,
            })?;
            tracing::info!(run_id = %job.run_id, step_id = %job.step_id, service, tag = %m.tag, "rolling back migration");
            db::unapply(&mut tx, m, &restore).await?;
            db::ensure_tables(&mut tx, service).await?;
            db::log(&mut tx, service, m, Direction::Down, job.run_id, &job.step_id).await?;
            tx.commit().await.map_err(|source| Error::RollbackFailed {
                tag: m.tag.clone(),
                at: "commit".to_owned(),
                restore: restore.clone(),
                source,
            })?;
            rolled_back.push(m.tag.clone());
        }
        let _ = conn.close().await;
        tracing::info!(run_id = %job.run_id, step_id = %job.step_id, service, rolled_back = ?rolled_back, "rollback done");
        out.insert("rolled_back".into(), rolled_back.into());
        out.insert(
            "not_applied".into(),
            gone.iter().map(|m| m.tag.clone()).collect::<Vec<_>>().into(),
        );
        Ok(out)
    }
}

fn procedure(m: &Migration, params: &Params) -> String {
    if m.recovery.is_some() {
        format!("{}/{}", params.migrations_dir, m.recovery_file())
    } else {
        "none documented".to_owned()
    }
}

impl Role for DbMigration {
    fn name(&self) -> &str {
        roles::DB_MIGRATION
    }

    fn execute<'a>(&'a self, job: &'a StepJob, _ctx: &'a ExecContext) -> BoxFuture<'a, Outcome> {
        Box::pin(async move { kit::outcome(job, self.run(job).await) })
    }

    fn compensate<'a>(&'a self, job: &'a StepJob, _ctx: &'a ExecContext) -> BoxFuture<'a, Outcome> {
        // Cancellation drops this future: the connection closes, PostgreSQL rolls the
        // open transaction back and releases the lock, and git children are killed.
        Box::pin(async move { kit::outcome(job, self.run(job).await) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_shared::protocol::{Deploy, PROTOCOL_VERSION, Risk};

    fn job() -> StepJob {
        let now = chrono::Utc::now();
        StepJob {
            v: PROTOCOL_VERSION,
            message_id: uuid::Uuid::new_v4(),
            run_id: uuid::Uuid::new_v4(),
            step_id: "db.production".into(),
            attempt: 1,
            kind: JobKind::Execute,
            zone: "production".into(),
            role: roles::DB_MIGRATION.into(),
            action: "migrate".into(),
            params: Fields::new(),
            inputs: Default::default(),
            own_outputs: Fields::new(),
            deploy: Deploy {
                service: "shop-api".into(),
                environment: "production".into(),
                repository: "/srv/shop".into(),
                commit_sha: "0123456789abcdef0123456789abcdef01234567".into(),
                risk: Risk::Standard,
                exceptions: Vec::new(),
            },
            issued_at: now,
            not_after: now,
            deadline: now,
            heartbeat_ms: 1000,
            lease_ms: 0,
            traceparent: None,
            signature: None,
        }
    }

    fn backup(job: &mut StepJob, run_id: uuid::Uuid, verified: bool) {
        let b = baton_shared::facts::BackupRef {
            backup_id: "b1".into(),
            run_id,
            verified,
            sha256: "0".repeat(64),
            location: "/srv/a/b1".into(),
            copy_location: "/srv/b/b1".into(),
            region: "nl-ams1".into(),
            copy_region: "nl-ams2".into(),
            tables: 1,
            bytes: 1,
            volumes: Vec::new(),
        };
        job.inputs
            .insert("backup.pre".into(), baton_shared::facts::FactSet::to_fields(&b));
    }

    #[test]
    fn only_a_verified_backup_of_this_run_counts() {
        let mut j = job();
        let e = verified_backup(&j, "backup.pre").unwrap_err();
        assert!(e.contains("no outputs of step backup.pre"), "{e}");
        let run = j.run_id;
        backup(&mut j, run, false);
        let e = verified_backup(&j, "backup.pre").unwrap_err();
        assert!(e.contains("b1 from backup.pre is not verified"), "{e}");
        backup(&mut j, uuid::Uuid::nil(), true);
        let e = verified_backup(&j, "backup.pre").unwrap_err();
        assert!(e.contains("not of this run"), "{e}");
        j.inputs.get_mut("backup.pre").unwrap().remove("sha256");
        let e = verified_backup(&j, "backup.pre").unwrap_err();
        assert!(e.contains("reported no sha256"), "{e}");
        backup(&mut j, run, true);
        assert_eq!(verified_backup(&j, "backup.pre").unwrap(), "b1");
    }

    fn migration(tag: &str, sql: &str, down: bool, recovery: bool) -> Migration {
        Migration {
            idx: 0,
            tag: tag.into(),
            when: 1,
            sql: sql.into(),
            hash: crate::drizzle::hash(sql),
            down: down.then(|| "select 1".to_owned()),
            recovery: recovery.then(|| "restore it".to_owned()),
        }
    }

    #[test]
    fn irreversible_migrations_need_a_procedure() {
        let ms = [
            migration("0000_a", "select 1", true, false),
            migration("0001_b", "select 1", false, true),
            migration("0002_c", "select 1", false, false),
        ];
        assert_eq!(without_procedure(&ms), ["0002_c"]);
    }

    #[test]
    fn assessment_reports_destructive_statements_per_migration_and_warns_on_removals() {
        let ms = [
            migration("0000_add", "ALTER TABLE \"users\" ADD COLUMN \"x\" text;", true, false),
            migration(
                "0001_rename",
                "ALTER TABLE \"users\" RENAME COLUMN \"name\" TO \"full_name\";--> statement-breakpoint\nDROP INDEX \"i\";",
                true,
                false,
            ),
        ];
        let a = assess(&ms);
        assert!(a.destructive());
        assert_eq!(a.findings.len(), 2);
        assert!(a.findings.iter().all(|(tag, _)| tag == "0001_rename"));
        assert_eq!(a.warnings.len(), 1, "{:?}", a.warnings);
        assert!(a.warnings[0].starts_with("0001_rename: renames column name of users"));
        assert!(!assess(&ms[..1]).destructive());
    }

    #[test]
    fn params_default_and_are_checked() {
        let mut j = job();
        let p = Params::from_job(&j).unwrap();
        assert_eq!(
            (p.migrations_dir.as_str(), p.backup_step.as_str()),
            (DEFAULT_MIGRATIONS_DIR, DEFAULT_BACKUP_STEP)
        );
        j.params.insert("migrations_dir".into(), 5.into());
        assert!(matches!(
            Params::from_job(&j),
            Err(Error::InvalidParam { name, .. }) if name == "migrations_dir"
        ));
        j.params.remove("migrations_dir");
        j.params.insert("migration_dir".into(), "x".into());
        let e = Params::from_job(&j).unwrap_err().to_string();
        assert!(e.contains("unknown field `migration_dir`"), "{e}");
    }
}
