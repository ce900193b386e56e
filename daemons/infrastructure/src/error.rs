//! infrastructure's errors: each a step error code, retryable only for
//! transient causes (a held state lock, git or the database unreachable).

use baton_shared::git::GitError;
use baton_shared::protocol::{JobKind, StepError};

use crate::history::DbError;
use crate::terraform::Failure;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "unknown {kind} action {action:?}: the infrastructure role executes `plan` and `apply` and compensates with `reapply-previous`"
    )]
    UnknownAction { kind: JobKind, action: String },

    #[error("invalid parameter `{name}`: {problem}")]
    InvalidParam { name: String, problem: String },

    #[error(transparent)]
    Source(#[from] GitError),

    #[error(
        "{dir} at commit {commit} keeps its state {found}; in {zone} Terraform state must be remote: declare `terraform {{ backend \"pg\" {{}} }}` (the daemon supplies the connection)"
    )]
    Backend {
        dir: String,
        commit: String,
        zone: String,
        found: String,
    },

    #[error("the state of {schema} is locked by {holders}; waited {waited_secs} s (lock_timeout_secs): {detail}")]
    Locked {
        schema: String,
        holders: String,
        waited_secs: u64,
        detail: String,
    },

    #[error(
        "unintended change: the plan would {} protected resource(s) ({}); nothing was applied",
        "replace or delete",
        changes.join(", ")
    )]
    Unintended { changes: Vec<String> },

    #[error(
        "{why}, and no plan step of this run was approved for it: give the apply a `plan` step to need \
         (the scheduler asks for approval between them); nothing was applied"
    )]
    NeedsApproval { why: String },

    #[error("no saved plan from {step}: {problem}")]
    PlanMissing { step: String, problem: String },

    #[error(
        "the approved plan went stale (the state changed since) and was re-planned: {why}; nothing was applied, and the new plan (saved plan sha256:{sha}) goes back to the step's gates for approval"
    )]
    ApprovalAgain {
        why: String,
        sha: String,
        /// The new plan's facts, reported with the failure for the gates.
        facts: Box<baton_shared::facts::TerraformPlanned>,
    },

    #[error(
        "the state of {schema} moved since this step applied it (serial {applied} then, {now} now): re-applying commit {previous} would undo someone else's change; reconcile by hand"
    )]
    StateMoved {
        schema: String,
        applied: u64,
        now: u64,
        previous: String,
    },

    #[error(
        "no earlier apply by Baton is recorded for {schema}, and the state it replaced (serial {serial}) was made outside Baton: \
         there is no configuration to re-apply and Baton never destroys what it did not make; reconcile by hand"
    )]
    NoPreviousConfiguration { schema: String, serial: u64 },

    #[error("{0}")]
    Terraform(Failure),

    #[error(transparent)]
    Db(#[from] DbError),

    #[error("{what}: {detail}")]
    Io { what: String, detail: String },
}

impl Error {
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownAction { .. } => "unknown_action",
            Self::InvalidParam { .. } => "invalid_params",
            Self::Source(e) => e.code(),
            Self::Backend { .. } => "local_backend",
            Self::Locked { .. } => "state_locked",
            Self::Unintended { .. } => "unintended_change",
            Self::NeedsApproval { .. } => "approval_required",
            Self::PlanMissing { .. } => "plan_missing",
            Self::ApprovalAgain { .. } => baton_shared::protocol::APPROVAL_AGAIN,
            Self::StateMoved { .. } => "state_moved",
            Self::NoPreviousConfiguration { .. } => "no_previous_configuration",
            Self::Terraform(Failure::NotStarted(_)) => "terraform_unavailable",
            Self::Terraform(_) => "terraform_failed",
            Self::Db(_) => "state_database_error",
            Self::Io { .. } => "io_error",
        }
    }

    pub fn retryable(&self) -> bool {
        match self {
            Self::Source(e) => e.retryable(),
            Self::Locked { .. } => true,
            Self::Db(e) => matches!(
                e.source,
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_)
            ),
            _ => false,
        }
    }

    pub fn to_step_error(&self) -> StepError {
        let e = StepError::new(self.code(), self.to_string(), self.retryable());
        match self {
            Self::ApprovalAgain { facts, .. } => {
                e.with_outputs(baton_shared::facts::FactSet::to_fields(facts.as_ref()))
            }
            _ => e,
        }
    }
}

impl baton_shared::kit::JobError for Error {
    fn step_error(&self) -> StepError {
        self.to_step_error()
    }
}
