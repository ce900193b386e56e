//! The state of a run and its steps, as the store loads it and the engine and
//! the gates read it: statuses, holds, and the facts loaded for the gates
//! (open incidents, approvals). The transitions are in `engine`, the gates'
//! rules in `gates`; both read these types and neither imports the other's.

use std::fmt;
use std::str::FromStr;

use baton_shared::protocol::{Fields, JobKind, MergeEvent, StepError};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::pipeline::RetryPolicy;

macro_rules! string_enum {
    ($name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    other => Err(format!("unknown {} {other:?}", stringify!($name))),
                }
            }
        }
    };
}

string_enum!(RunStatus {
    Queued => "queued",
    Running => "running",
    Succeeded => "succeeded",
    Failed => "failed",
    RollingBack => "rolling_back",
    RolledBack => "rolled_back",
    RollbackFailed => "rollback_failed",
    Cancelled => "cancelled",
    Superseded => "superseded",
    Blocked => "blocked",
    AwaitingApproval => "awaiting_approval",
});

impl RunStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded
                | Self::Failed
                | Self::RolledBack
                | Self::RollbackFailed
                | Self::Cancelled
                | Self::Superseded
        )
    }

    /// Moving forward: running, or waiting on a gate or an approval.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Running | Self::Blocked | Self::AwaitingApproval)
    }
}

string_enum!(StepStatus {
    Pending => "pending",
    Ready => "ready",
    Dispatched => "dispatched",
    Running => "running",
    Succeeded => "succeeded",
    Failed => "failed",
    Skipped => "skipped",
    Cancelled => "cancelled",
    Compensating => "compensating",
    Compensated => "compensated",
    CompensationFailed => "compensation_failed",
});

string_enum!(AttemptStatus {
    Dispatched => "dispatched",
    Running => "running",
    Waiting => "waiting",
});

string_enum!(TimerKind {
    Lease => "lease",
    Timeout => "timeout",
    Dispatch => "dispatch",
    Gate => "gate",
    Window => "window",
});

/// Why a step or run waits: the gate that holds it, stored with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Hold {
    pub gate: String,
    pub reason: String,
    /// Ends with a human approval.
    pub approval: bool,
    pub since: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// What an approval approves beyond the run's plan (the saved Terraform
    /// plan's SHA-256 for a blast-radius hold; see `gates::approval_subject`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// An open incident, as the gates see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incident {
    pub id: Uuid,
    pub environment: String,
    pub title: String,
    pub opened_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Approve,
    Reject,
}

/// An approval or rejection of a held step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub step_id: String,
    pub plan_hash: String,
    /// What was approved beyond the run's plan (see `gates::approval_subject`).
    #[serde(default)]
    pub subject: String,
    pub approver: String,
    pub decision: Decision,
    pub comment: String,
    pub at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// What the store loads with a run for its gates.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct Facts {
    pub incidents: Vec<Incident>,
    pub approvals: Vec<Approval>,
}

#[derive(Debug, Clone)]
pub struct StepState {
    pub id: String,
    pub role: String,
    pub zone: String,
    pub action: String,
    pub compensate: Option<String>,
    /// A compensation that reports one of [`RESTORE_WHEN`] falls back to
    /// restoring the pre-deploy backup.
    pub restore_from_backup: bool,
    /// The compensation in flight is that restore, served by the backup role.
    pub restoring: bool,
    /// Failing for good, the step flags the run for rollback review instead of
    /// rolling it back (pipeline `on_failure = "review"`; nothing needs it).
    pub review_on_failure: bool,
    pub needs: Vec<String>,
    pub gates: Vec<String>,
    pub hold: Option<Hold>,
    pub included: bool,
    pub status: StepStatus,
    pub attempt: i32,
    pub attempt_status: Option<AttemptStatus>,
    pub exec_attempts: i32,
    pub comp_attempts: i32,
    pub cancel_requested: bool,
    pub timeout_ms: i64,
    pub retry: RetryPolicy,
    pub params: Fields,
    pub outputs: Fields,
    pub error: Option<StepError>,
    pub completion: Option<i32>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub comp_started_at: Option<DateTime<Utc>>,
    pub comp_finished_at: Option<DateTime<Utc>>,
    pub dirty: bool,
}

impl StepState {
    /// The role serving the step's current job: the backup role while restoring.
    pub fn job_role(&self) -> &str {
        if self.restoring && self.status == StepStatus::Compensating {
            baton_shared::roles::BACKUP
        } else {
            &self.role
        }
    }

    /// Whether this step failed or was cancelled after a daemon started an
    /// execute attempt of a role that may leave part of its work behind: its
    /// compensation undoes that part when the run rolls back (docs/decisions.md,
    /// "Partial work"). An attempt no daemon started (dead-lettered, expired,
    /// refused) did nothing to undo.
    pub fn partial_work(&self) -> bool {
        matches!(self.status, StepStatus::Failed | StepStatus::Cancelled)
            && self.started_at.is_some()
            && baton_shared::roles::spec(&self.role).is_some_and(|r| r.partial_effects)
    }

    pub(crate) fn in_flight(&self) -> bool {
        matches!(
            self.attempt_status,
            Some(AttemptStatus::Dispatched | AttemptStatus::Running)
        )
    }

    /// The kind of job the step is currently working on, if any.
    pub(crate) fn phase(&self) -> Option<JobKind> {
        match self.status {
            StepStatus::Ready | StepStatus::Dispatched | StepStatus::Running => Some(JobKind::Execute),
            StepStatus::Compensating => Some(JobKind::Compensate),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunState {
    pub id: Uuid,
    pub service: String,
    pub environment: String,
    pub event: MergeEvent,
    pub plan_hash: String,
    pub status: RunStatus,
    /// An admission gate holds the whole run (an open incident).
    pub hold: Option<Hold>,
    /// Open incidents and approvals, loaded with the run for its gates.
    pub facts: Facts,
    pub completions: i32,
    pub rollback_reason: Option<String>,
    pub trace_context: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub steps: Vec<StepState>,
    pub dirty: bool,
    /// Storage detail: the head of the run's audit chain, read with the chain
    /// locked when the run was loaded (`None`: not known, read it when appending).
    /// Whoever appends to the chain other than through the store's `persist`
    /// must reset it, or the next append would fork the chain.
    pub audit_head: Option<String>,
}
