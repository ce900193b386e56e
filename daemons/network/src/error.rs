//! network's errors: each a step error code, retryable only for transient
//! causes (TransIP, the ACME server, the cluster or git unreachable or failing).

use baton_shared::cluster::ClusterError;
use baton_shared::git::GitError;
use baton_shared::protocol::{JobKind, StepError};

use crate::acme::AcmeError;
use crate::spec::SpecError;
use crate::transip::TransipError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown {kind} action {action:?}: the network role executes `apply` and compensates with `revert`")]
    UnknownAction { kind: JobKind, action: String },

    #[error("invalid parameter `{name}`: {problem}")]
    InvalidParam { name: String, problem: String },

    #[error(transparent)]
    Source(#[from] GitError),

    #[error("the network folder: {0}; nothing was changed")]
    Spec(#[from] SpecError),

    #[error("{0}; nothing was changed")]
    Refused(String),

    #[error("network policy blocks required traffic: {}; nothing was changed", .0.join("; "))]
    FlowBlocked(Vec<String>),

    #[error("DNS propagation failure: not every authoritative nameserver answers within {deadline_secs} s: {}", lagging.join("; "))]
    Propagation { deadline_secs: u64, lagging: Vec<String> },

    #[error("{0}")]
    Acme(#[from] AcmeError),

    #[error("load balancer health check failure: {}", failures.join("; "))]
    Health { failures: Vec<String> },

    #[error("{0} was changed since this step applied it: reverting would undo that; reconcile by hand")]
    Moved(String),

    #[error(transparent)]
    Transip(#[from] TransipError),

    #[error(transparent)]
    Cluster(#[from] ClusterError),

    #[error("{what}: {detail}")]
    Io { what: String, detail: String },
}

impl Error {
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownAction { .. } => "unknown_action",
            Self::InvalidParam { .. } => "invalid_params",
            Self::Source(e) => e.code(),
            Self::Spec(_) => "network_spec_invalid",
            Self::Refused(_) => "network_rules",
            Self::FlowBlocked(_) => "policy_blocks_traffic",
            Self::Propagation { .. } => "dns_propagation_failed",
            Self::Acme(AcmeError::Issuance { .. }) => "certificate_issuance_failed",
            Self::Acme(AcmeError::Transport(_)) => "acme_unreachable",
            Self::Health { .. } => "load_balancer_unhealthy",
            Self::Moved(_) => "state_moved",
            Self::Transip(TransipError::Status { status: 401 | 403, .. }) => "transip_denied",
            Self::Transip(_) => "transip_error",
            Self::Cluster(ClusterError::Moved { .. }) => "state_moved",
            Self::Cluster(_) => "cluster_error",
            Self::Io { .. } => "io_error",
        }
    }

    pub fn retryable(&self) -> bool {
        match self {
            Self::Source(e) => e.retryable(),
            Self::Transip(e) => e.retryable(),
            Self::Acme(e) => e.retryable(),
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
