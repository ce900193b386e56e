//! Everything that can stop a db-migration job, and how each maps to a step error
//! code and to retryable or not.

use std::fmt;

use baton_shared::git::GitError;
use baton_shared::protocol::{JobKind, StepError};

/// A problem `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// `ALTER TABLE … VALIDATE CONSTRAINT` failed: existing rows violate it.
    ConstraintInvalid {
        table: String,
        constraint: String,
        message: String,
    },
    /// Rows reference parent rows that do not exist.
    ForeignKeyViolation {
        table: String,
        constraint: String,
        rows: i64,
    },
    /// The schema differs from what the migrations produce on an empty database.
    SchemaDifference(String),
    /// Migrations of the folder that the database has not applied.
    Pending(Vec<String>),
}

impl Problem {
    pub fn code(&self) -> &'static str {
        match self {
            Self::ConstraintInvalid { .. } => "constraint_invalid",
            Self::ForeignKeyViolation { .. } => "foreign_key_violation",
            Self::SchemaDifference(_) => "schema_mismatch",
            Self::Pending(_) => "migrations_pending",
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConstraintInvalid {
                table,
                constraint,
                message,
            } => write!(f, "constraint {constraint} on {table} does not hold: {message}"),
            Self::ForeignKeyViolation {
                table,
                constraint,
                rows,
            } => write!(
                f,
                "foreign key {constraint} on {table} does not hold: {rows} row(s) reference missing rows"
            ),
            Self::SchemaDifference(d) => write!(f, "schema differs from the migrations: {d}"),
            Self::Pending(tags) => write!(f, "migrations not applied: {}", tags.join(", ")),
        }
    }
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "unknown {kind} action {action:?}: the db-migration role executes `migrate` and `verify` and compensates with `rollback`"
    )]
    UnknownAction { kind: JobKind, action: String },

    #[error("the {service} database in this zone fails its data checks: {}; no migration was applied", failures.join("; "))]
    DataChecks { service: String, failures: Vec<String> },

    #[error(
        "no database configured for service {service:?} in zone {zone}: add it under [migration.databases] of this daemon's configuration"
    )]
    NoDatabase { service: String, zone: String },

    #[error("invalid parameter `{name}`: {problem}")]
    InvalidParam { name: String, problem: String },

    #[error("invalid job: {problem}")]
    InvalidJob { problem: String },

    #[error("git {operation} of {repository} failed: {detail}")]
    Git {
        operation: &'static str,
        repository: String,
        detail: String,
    },

    #[error("commit {commit} does not exist in {repository}")]
    UnknownCommit { commit: String, repository: String },

    #[error("migrations folder {dir} does not exist at commit {commit}")]
    MigrationsNotFound { dir: String, commit: String },

    #[error("invalid drizzle migrations in {origin}: {problem}")]
    InvalidJournal { origin: String, problem: String },

    #[error(
        "irreversible migration(s) without a documented recovery procedure: {}; add <tag>.down.sql or a non-empty <tag>.recovery.md in {dir}; nothing was applied. (A history written before the repository adopted Baton is applied without them: name its newest migration in {dir}/baton.baseline)",
        migrations.join(", ")
    )]
    IrreversibleWithoutProcedure { migrations: Vec<String>, dir: String },

    #[error(
        "{}; a deploy's migrations are applied in one transaction so that a failure leaves nothing applied, \
         and these statements would break that; nothing was applied. Remove the transaction control \
         (drizzle-kit's migrations need none), or run such a statement outside the deploy",
        statements.join("; ")
    )]
    NotTransactional { statements: Vec<String> },

    #[error(
        "journal entries older than the newest applied migration are not applied and drizzle-orm never would: {}; \
         nothing was applied. Give the entry a `when` newer than the applied ones, or let this deploy apply it \
         with the merge event's `apply-older-migrations` exception and a reason",
        entries.join(", ")
    )]
    OlderThanApplied { entries: Vec<String> },

    #[error(
        "migration(s) changed after they were applied: {} in {dir} differ from what the database recorded \
         (same `when`, another hash); nothing was applied. Restore the applied text and put the change in a \
         new migration",
        migrations.join(", ")
    )]
    ChangedAfterApplied { migrations: Vec<String>, dir: String },

    #[error(
        "additive-first: {} in the same deploy as code that still names it; nothing was applied. Add the new \
         structure and deploy the code that stops using the old first, then remove it in a later deploy \
         (or give the merge event an `additive-first` exception with a reason)",
        removals.join("; ")
    )]
    AdditiveFirst { removals: Vec<String> },

    #[error(
        "destructive migration(s) in zone {zone} need a verified pre-deploy backup of this run in input `{input}`: {problem}; nothing was applied; destructive: {}",
        list(findings)
    )]
    BackupNotVerified {
        zone: String,
        input: String,
        problem: String,
        findings: Vec<String>,
    },

    #[error("cannot connect to the database of {service}: {source}")]
    Connect {
        service: String,
        #[source]
        source: sqlx::Error,
    },

    #[error("another migration holds the lock on the database of {service}; gave up waiting after {waited_secs} s")]
    Locked { service: String, waited_secs: u64 },

    #[error(
        "migration {tag} failed at statement {statement} of {total}{}: {source}; nothing was applied",
        if *on_scratch { " (replayed on an empty scratch database before touching the target)" } else { "" }
    )]
    MigrationFailed {
        tag: String,
        statement: usize,
        total: usize,
        /// Whether it failed while replaying on the scratch database.
        on_scratch: bool,
        #[source]
        source: sqlx::Error,
    },

    #[error("database of {service}: {doing}: {source}")]
    Database {
        service: String,
        doing: &'static str,
        #[source]
        source: sqlx::Error,
    },

    #[error("verification of the database of {service} failed: {}{}", list(problems), if *applied_nothing { "; nothing was applied" } else { "" })]
    VerifyFailed {
        service: String,
        problems: Vec<Problem>,
        /// Whether the failure rolled back the migrations of this job.
        applied_nothing: bool,
    },

    #[error("scratch database: {doing}: {source}")]
    Scratch {
        doing: String,
        #[source]
        source: sqlx::Error,
    },

    #[error(
        "migration {tag} does not apply to an empty database (statement {statement}), so the expected schema is unknown: {source}"
    )]
    ScratchMigration {
        tag: String,
        statement: usize,
        #[source]
        source: sqlx::Error,
    },

    #[error("invalid outputs of the migrate step to roll back: {problem}")]
    InvalidOwnOutputs { problem: String },

    #[error(
        "cannot roll back {tag}: it has no down migration ({down_file}); nothing was rolled back; restore {service} from {backup}; recovery procedure: {procedure}"
    )]
    Irreversible {
        tag: String,
        down_file: String,
        service: String,
        backup: String,
        procedure: String,
    },

    #[error(
        "cannot roll back: migration(s) applied after this run's are still in place: {}; roll those back first",
        tags.join(", ")
    )]
    NewerMigrations { tags: Vec<String> },

    #[error("down migration of {tag} failed at {at}: {source}; {tag} is still applied; {restore}")]
    RollbackFailed {
        tag: String,
        /// `statement N of M`, `its history row` or `commit`.
        at: String,
        restore: String,
        #[source]
        source: sqlx::Error,
    },
}

impl From<GitError> for Error {
    fn from(e: GitError) -> Self {
        match e {
            GitError::InvalidJob { problem } => Self::InvalidJob { problem },
            GitError::InvalidParam { name, problem } => Self::InvalidParam { name, problem },
            GitError::Git {
                operation,
                repository,
                detail,
            } => Self::Git {
                operation,
                repository,
                detail,
            },
            GitError::UnknownCommit { commit, repository } => Self::UnknownCommit { commit, repository },
            GitError::FolderNotFound { dir, commit } => Self::MigrationsNotFound { dir, commit },
        }
    }
}

impl Error {
    /// The step error code the scheduler and operators see.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownAction { .. } => "unknown_action",
            Self::DataChecks { .. } => "data_checks_failed",
            Self::NoDatabase { .. } => "no_database",
            Self::InvalidParam { .. } => "invalid_params",
            Self::InvalidJob { .. } => "invalid_job",
            Self::Git { .. } => "source_unavailable",
            Self::UnknownCommit { .. } => "unknown_commit",
            Self::MigrationsNotFound { .. } => "migrations_not_found",
            Self::InvalidJournal { .. } => "invalid_migrations",
            Self::IrreversibleWithoutProcedure { .. } => "irreversible_without_procedure",
            Self::BackupNotVerified { .. } => "backup_not_verified",
            Self::AdditiveFirst { .. } => "additive_first",
            Self::NotTransactional { .. } => "not_transactional",
            Self::OlderThanApplied { .. } => "older_than_applied",
            Self::ChangedAfterApplied { .. } => "changed_after_applied",
            Self::Connect { .. } => "database_unavailable",
            Self::Locked { .. } => "migration_locked",
            Self::MigrationFailed { .. } => "migration_failed",
            Self::Database { .. } => "database_error",
            Self::VerifyFailed { problems, .. } => problems.first().map_or("verify_failed", Problem::code),
            Self::Scratch { .. } => "scratch_database_failed",
            Self::ScratchMigration { .. } => "migration_not_replayable",
            Self::InvalidOwnOutputs { .. } => "invalid_outputs",
            Self::Irreversible { .. } => "irreversible",
            Self::NewerMigrations { .. } => "newer_migrations_applied",
            Self::RollbackFailed { .. } => "rollback_failed",
        }
    }

    /// Whether trying again may succeed: transport trouble and lock waits, not
    /// refusals or SQL that is wrong.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Git { .. } | Self::Connect { .. } | Self::Locked { .. } => true,
            Self::MigrationFailed { source, .. }
            | Self::Database { source, .. }
            | Self::Scratch { source, .. }
            | Self::RollbackFailed { source, .. } => is_transient(source),
            _ => false,
        }
    }

    pub fn to_step_error(&self) -> StepError {
        StepError::new(self.code(), self.to_string(), self.retryable())
    }
}

/// Errors that say nothing about the SQL: the connection broke, the server is going
/// down, or a concurrent transaction got in the way.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            // 40001 serialization failure, 40P01 deadlock, 55P03 lock not available,
            // 57P01-57P03 shutdown and cannot-connect-now, 08xxx connection exceptions.
            matches!(&*c, "40001" | "40P01" | "55P03" | "57P01" | "57P02" | "57P03") || c.starts_with("08")
        }),
        _ => false,
    }
}

/// The SQLSTATE of a database error, if it is one.
pub fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

impl baton_shared::kit::JobError for Error {
    fn step_error(&self) -> StepError {
        self.to_step_error()
    }
}
