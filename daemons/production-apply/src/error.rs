//! production-apply's errors: each a step error code, retryable only for
//! transient causes (the cluster or git unreachable, a write conflict).

use baton_shared::cluster::{ClusterError, RolloutFailure};
use baton_shared::git::GitError;
use baton_shared::protocol::{JobKind, StepError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "unknown {kind} action {action:?}: the production-apply role executes `apply` and compensates with `rollback-replicaset`"
    )]
    UnknownAction { kind: JobKind, action: String },

    #[error("invalid parameter `{name}`: {problem}")]
    InvalidParam { name: String, problem: String },

    #[error(transparent)]
    Source(#[from] GitError),

    #[error("cannot render {dir} with kubectl kustomize: {detail}")]
    Render { dir: String, detail: String },

    #[error("{0}")]
    Manifests(String),

    #[error("{0}")]
    NoImage(String),

    #[error("image mismatch: {0}")]
    ImageMismatch(String),

    #[error(transparent)]
    Cluster(#[from] ClusterError),

    #[error("{failure}; {rollback}")]
    Rollout { failure: RolloutFailure, rollback: String },

    #[error("monitoring breach after {after_secs} s: {why}; {rollback}")]
    Monitoring {
        after_secs: u64,
        why: String,
        rollback: String,
    },

    #[error("rollback failed: {0}")]
    Rollback(String),

    #[error("{what}: {detail}")]
    Io { what: String, detail: String },
}

impl Error {
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownAction { .. } => "unknown_action",
            Self::InvalidParam { .. } => "invalid_params",
            Self::Source(e) => e.code(),
            Self::Render { .. } => "render_failed",
            Self::Manifests(_) => "invalid_manifests",
            Self::NoImage(_) => "image_missing",
            Self::ImageMismatch(_) => "image_mismatch",
            Self::Cluster(ClusterError::Moved { .. }) => "state_moved",
            Self::Cluster(_) => "cluster_error",
            Self::Rollout {
                failure: RolloutFailure::Pod(_),
                ..
            } => "pod_unhealthy",
            Self::Rollout {
                failure: RolloutFailure::Deadline(_),
                ..
            } => "progress_deadline_exceeded",
            Self::Rollout {
                failure: RolloutFailure::Timeout(_),
                ..
            } => "rollout_timeout",
            Self::Monitoring { .. } => "monitoring_breach",
            Self::Rollback(_) => "rollback_failed",
            Self::Io { .. } => "io_error",
        }
    }

    pub fn retryable(&self) -> bool {
        match self {
            Self::Source(e) => e.retryable(),
            Self::Cluster(e) => e.retryable(),
            _ => false,
        }
    }
}

impl baton_shared::kit::JobError for Error {
    fn step_error(&self) -> StepError {
        StepError::new(self.code(), self.to_string(), self.retryable())
    }
}
