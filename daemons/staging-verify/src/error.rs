//! staging-verify's errors: each a step error code, retryable only for
//! transient causes (the cluster or git unreachable, a write conflict).

use baton_shared::cluster::{ClusterError, RolloutFailure};
use baton_shared::git::GitError;
use baton_shared::protocol::{JobKind, StepError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "unknown {kind} action {action:?}: the staging-verify role executes `verify` and compensates with `redeploy-previous`"
    )]
    UnknownAction { kind: JobKind, action: String },

    #[error("invalid parameter `{name}`: {problem}")]
    InvalidParam { name: String, problem: String },

    #[error(transparent)]
    Source(#[from] GitError),

    #[error("{file}: {problem}")]
    Checks { file: String, problem: String },

    #[error("cannot render {dir} with kubectl kustomize: {detail}")]
    Render { dir: String, detail: String },

    #[error("{0}")]
    Manifests(String),

    #[error("{0}")]
    NoImage(String),

    #[error(transparent)]
    Cluster(#[from] ClusterError),

    #[error("{0}; nothing after the rollout ran")]
    Rollout(RolloutFailure),

    #[error("smoke test failed: {0}")]
    Smoke(String),

    #[error("integration tests failed: {0}")]
    Integration(String),

    #[error("performance check failed: {0}")]
    Performance(String),

    #[error(
        "performance regression: {endpoint} p95 {now_ms:.1} ms against {baseline_ms:.1} ms at {baseline_commit} ({percent:+.1} %, limit {limit} %)"
    )]
    Regression {
        endpoint: String,
        now_ms: f64,
        baseline_ms: f64,
        baseline_commit: String,
        percent: f64,
        limit: f64,
    },

    #[error("soak failed after {after_secs} s of {soak_secs} s: {why}")]
    Soak {
        after_secs: u64,
        soak_secs: u64,
        why: String,
    },

    #[error("rollback rehearsal failed: {0}")]
    Rehearsal(String),

    #[error("{what}: {detail}")]
    Io { what: String, detail: String },
}

impl Error {
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownAction { .. } => "unknown_action",
            Self::InvalidParam { .. } => "invalid_params",
            Self::Source(e) => e.code(),
            Self::Checks { .. } => "checks_invalid",
            Self::Render { .. } => "render_failed",
            Self::Manifests(_) => "invalid_manifests",
            Self::NoImage(_) => "image_missing",
            Self::Cluster(ClusterError::Moved { .. }) => "state_moved",
            Self::Cluster(_) => "cluster_error",
            Self::Rollout(RolloutFailure::Pod(_)) => "pod_unhealthy",
            Self::Rollout(RolloutFailure::Deadline(_)) => "progress_deadline_exceeded",
            Self::Rollout(RolloutFailure::Timeout(_)) => "rollout_timeout",
            Self::Smoke(_) => "smoke_failed",
            Self::Integration(_) => "integration_failed",
            Self::Performance(_) => "performance_check_failed",
            Self::Regression { .. } => "performance_regression",
            Self::Soak { .. } => "soak_failed",
            Self::Rehearsal(_) => "rollback_rehearsal_failed",
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
