//! cdn's errors: each a step error code, retryable only for transient causes
//! (bunny.net or git unreachable, bunny.net failing).

use baton_shared::git::GitError;
use baton_shared::protocol::{JobKind, StepError};

use crate::bunny::BunnyError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown {kind} action {action:?}: the cdn role executes `deploy` and compensates with `restore-previous`")]
    UnknownAction { kind: JobKind, action: String },

    #[error("invalid parameter `{name}`: {problem}")]
    InvalidParam { name: String, problem: String },

    #[error("no [cdn.services.{0}] in this daemon's configuration: where its assets go is not known")]
    NoZone(String),

    #[error(transparent)]
    Source(#[from] GitError),

    #[error("asset verification failed before upload: {}", .0.join("; "))]
    AssetNames(Vec<String>),

    #[error("edge rules syntax error: {}; nothing was changed", .0.join("; "))]
    EdgeRules(Vec<String>),

    #[error("pull zone {pull_zone}: {}; nothing was changed (set the step's fix_zone_settings to let Baton correct them)", problems.join("; "))]
    ZoneSettings { pull_zone: u64, problems: Vec<String> },

    #[error("immutable assets would be overwritten with other content: {}; nothing was uploaded", .0.join(", "))]
    Overwrite(Vec<String>),

    #[error("asset verification failed: {0}")]
    Verification(String),

    #[error("cache invalidation incomplete: {0}")]
    Invalidation(String),

    #[error(
        "{0} was changed since this step deployed it: restoring the earlier version would undo that; reconcile by hand"
    )]
    Moved(String),

    #[error(transparent)]
    Bunny(#[from] BunnyError),

    #[error("{what}: {detail}")]
    Io { what: String, detail: String },
}

impl Error {
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownAction { .. } => "unknown_action",
            Self::InvalidParam { .. } => "invalid_params",
            Self::NoZone(_) => "no_zone_configured",
            Self::Source(e) => e.code(),
            Self::AssetNames(_) => "asset_verification_failed",
            Self::EdgeRules(_) => "edge_rules_invalid",
            Self::ZoneSettings { .. } => "zone_settings",
            Self::Overwrite(_) => "immutable_overwrite",
            Self::Verification(_) => "asset_verification_failed",
            Self::Invalidation(_) => "cache_invalidation_incomplete",
            Self::Moved(_) => "state_moved",
            Self::Bunny(BunnyError::Status { status: 400, .. }) => "bunny_refused",
            Self::Bunny(_) => "bunny_error",
            Self::Io { .. } => "io_error",
        }
    }

    pub fn retryable(&self) -> bool {
        match self {
            Self::Source(e) => e.retryable(),
            Self::Bunny(e) => e.retryable(),
            _ => false,
        }
    }
}

impl baton_shared::kit::JobError for Error {
    fn step_error(&self) -> StepError {
        StepError::new(self.code(), self.to_string(), self.retryable())
    }
}
