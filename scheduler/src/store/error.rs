//! What can go wrong reading or writing the scheduler's database.

use super::*;

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
    pub(super) fn is_transient(&self) -> bool {
        match self {
            Self::Db(sqlx::Error::Database(e)) => matches!(e.code().as_deref(), Some("40001" | "40P01")),
            _ => false,
        }
    }

    pub(super) fn is_unique_violation(&self) -> bool {
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
