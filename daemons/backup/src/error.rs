//! The backup library's errors, and how each becomes a step failure.
//!
//! Every variant names what went wrong and where: the backup id, the location
//! (primary or copy) and the file, so a failed `verify` tells an operator which
//! backup to look at without reading logs.

use std::path::PathBuf;

use baton_shared::protocol::StepError;

/// Which of the two storage locations a problem was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    Primary,
    Copy,
}

impl Site {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Copy => "copy",
        }
    }
}

impl std::fmt::Display for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: `{key}` {problem}")]
    Config { key: String, problem: String },

    #[error("no database is configured for service {service} (`backup.databases.{service}`)")]
    NoDatabase { service: String },

    #[error("{action}: {problem}")]
    InvalidRequest { action: String, problem: String },

    #[error("restore of backup {backup_id} refused: param `confirm_backup_id` must equal the backup id ({given})")]
    ConfirmationRequired { backup_id: String, given: String },

    #[error("backup {backup_id} not found: {dir} has no manifest ({site} location)")]
    BackupMissing {
        backup_id: String,
        site: Site,
        dir: PathBuf,
    },

    #[error("backup {backup_id}: {file} is missing from the {site} location ({dir})")]
    FileMissing {
        backup_id: String,
        site: Site,
        dir: PathBuf,
        file: String,
    },

    #[error(
        "backup {backup_id}: {file} in the {site} location ({dir}) is corrupted: its sha256 is {actual}, the manifest records {expected}"
    )]
    Corrupted {
        backup_id: String,
        site: Site,
        dir: PathBuf,
        file: String,
        expected: String,
        actual: String,
    },

    #[error("backup {backup_id}: the manifest in the copy location ({dir}) differs from the primary's")]
    CopyDiffers { backup_id: String, dir: PathBuf },

    #[error("backup {backup_id}: manifest in {dir} is unreadable: {problem}")]
    Manifest {
        backup_id: String,
        dir: PathBuf,
        problem: String,
    },

    #[error("backup {backup_id}: cannot decrypt {file}: {problem}")]
    Decrypt {
        backup_id: String,
        file: String,
        problem: String,
    },

    #[error("backup {backup_id}: restored copy does not match the manifest: {problem}")]
    RestoreMismatch { backup_id: String, problem: String },

    #[error("backup {backup_id} belongs to service {backup_service}, not to {service}")]
    WrongService {
        backup_id: String,
        backup_service: String,
        service: String,
    },

    #[error("run {run_id}: no verified pre-deploy backup of service {service} found in {dir}")]
    PreDeployMissing {
        run_id: uuid::Uuid,
        service: String,
        dir: PathBuf,
    },

    #[error("no backup of service {service} in {dir} to test")]
    NothingToTest { service: String, dir: PathBuf },

    #[error("{context}: {source}")]
    Database {
        context: String,
        #[source]
        source: sqlx::Error,
    },

    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: String,
        status: String,
        stderr: String,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("encryption failed: {0}")]
    Encrypt(String),

    #[error("volume {claim}: the quiesce command failed, nothing was copied: {problem}")]
    Quiesce { claim: String, problem: String },

    #[error("volume {claim}: the resume command failed; the service's writes may still be held: {problem}")]
    Resume { claim: String, problem: String },

    #[error(
        "volume {claim} of backup {backup_id}: no such volume is configured for service {service} (`backup.volumes.{service}`)"
    )]
    NoVolume {
        backup_id: String,
        claim: String,
        service: String,
    },

    #[error("volume {claim}: {context}: {source}")]
    Volume {
        claim: String,
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn config(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Config {
            key: key.into(),
            problem: problem.into(),
        }
    }

    pub fn invalid(action: &str, problem: impl Into<String>) -> Self {
        Self::InvalidRequest {
            action: action.to_owned(),
            problem: problem.into(),
        }
    }

    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }

    pub fn volume(claim: &str, context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let (claim, context) = (claim.to_owned(), context.into());
        move |source| Self::Volume { claim, context, source }
    }

    pub fn db(context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Self {
        let context = context.into();
        move |source| Self::Database { context, source }
    }

    /// Stable machine-readable code for the step result.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Config { .. } => "config",
            Self::NoDatabase { .. } => "no_database",
            Self::InvalidRequest { .. } => "invalid_params",
            Self::ConfirmationRequired { .. } => "confirmation_required",
            Self::BackupMissing {
                site: Site::Primary, ..
            } => "backup_missing",
            Self::BackupMissing { site: Site::Copy, .. } => "copy_missing",
            Self::FileMissing {
                site: Site::Primary, ..
            } => "backup_missing",
            Self::FileMissing { site: Site::Copy, .. } => "copy_missing",
            Self::Corrupted {
                site: Site::Primary, ..
            } => "backup_corrupted",
            Self::Corrupted { site: Site::Copy, .. } => "copy_mismatch",
            Self::CopyDiffers { .. } => "copy_mismatch",
            Self::Manifest { .. } => "backup_corrupted",
            Self::Decrypt { .. } => "decrypt_failed",
            Self::RestoreMismatch { .. } => "restore_check_failed",
            Self::WrongService { .. } => "wrong_service",
            Self::PreDeployMissing { .. } => "pre_deploy_backup_missing",
            Self::NothingToTest { .. } => "no_backup",
            Self::Database { .. } => "database",
            Self::Tool { .. } => "tool_failed",
            Self::Io { .. } => "io",
            Self::Encrypt(_) => "encrypt_failed",
            Self::Quiesce { .. } => "quiesce_failed",
            Self::Resume { .. } => "resume_failed",
            Self::NoVolume { .. } => "no_volume",
            Self::Volume { .. } => "volume_io",
        }
    }

    /// Whether another attempt may succeed: outages may pass, a corrupted
    /// backup or a refused request will not.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Database { source, .. } => !matches!(source, sqlx::Error::Database(_)),
            Self::Tool { .. } | Self::Io { .. } | Self::Quiesce { .. } | Self::Volume { .. } => true,
            _ => false,
        }
    }

    /// Whether the backup's own bytes are at fault (as opposed to a database,
    /// a tool or the disk): only then is it set aside for a fresh one.
    pub fn implicates_backup(&self) -> bool {
        matches!(
            self,
            Self::FileMissing {
                site: Site::Primary,
                ..
            } | Self::Corrupted {
                site: Site::Primary,
                ..
            } | Self::Manifest { .. }
                | Self::Decrypt { .. }
                | Self::RestoreMismatch { .. }
        )
    }

    pub fn to_step_error(&self) -> StepError {
        StepError::new(self.code(), self.to_string(), self.retryable())
    }
}

impl From<Error> for StepError {
    fn from(e: Error) -> Self {
        e.to_step_error()
    }
}
