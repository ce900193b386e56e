//! The run state machine, without I/O.
//!
//! The store loads a run (locked), calls one of the transitions here, and then
//! persists the changed rows and the [`Effect`]s in the same transaction. Keeping
//! the decisions pure makes every rule testable without a database or broker.
//!
//! Run:  `queued → running → succeeded | failed`, or on failure or request
//!       `rolling_back → rolled_back | rollback_failed`.
//! Step: `pending → dispatched → running → succeeded | failed | skipped | cancelled`,
//!       `ready` while a retry waits for its backoff, and for compensation
//!       `succeeded → compensating → compensated | compensation_failed`.

use std::collections::BTreeMap;
use std::time::Duration;

use baton_shared::protocol::{
    APPROVAL_AGAIN, CancelJob, Deploy, Fields, HANDED_BACK, JobKind, MergeEvent, PROTOCOL_VERSION, ResultStatus,
    StepError, StepJob, StepResult,
};
use chrono::{DateTime, Utc};
use serde_json::json;
use uuid::Uuid;

use crate::gates::{self, GateVerdict, Policy, Verdict};
use crate::planner::Plan;
use crate::state::Facts;
pub use crate::state::{AttemptStatus, Hold, RunState, RunStatus, StepState, StepStatus, TimerKind};
use crate::window::Overrun;

/// Engine timing knobs, from configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A running attempt with no heartbeat for this long is presumed lost.
    pub lease: Duration,
    /// A dispatched job nobody started within this long is presumed lost (and expires).
    pub accept_timeout: Duration,
    /// Heartbeat interval daemons are asked for.
    pub heartbeat: Duration,
    /// Started attempts of one step that may be lost to dead daemons (their
    /// heartbeats stopped) without counting against the step's own
    /// `max_attempts`; past it, a loss counts like any failure.
    pub lost_attempts_limit: u32,
    /// Gate policy: merge approvers, soak, approvals, maintenance windows.
    pub gates: std::sync::Arc<Policy>,
}

/// What a transition asks the store to do in the same transaction.
#[derive(Debug, Clone)]
pub enum Effect {
    Dispatch(Box<StepJob>),
    Cancel(CancelJob),
    SetTimer {
        step: String,
        kind: TimerKind,
        attempt: i32,
        due: DateTime<Utc>,
    },
    ClearTimers {
        step: String,
    },
    AttemptStarted {
        step: String,
        attempt: i32,
        daemon: String,
        at: DateTime<Utc>,
    },
    AttemptFinished {
        step: String,
        attempt: i32,
        status: &'static str,
        error: Option<StepError>,
        at: DateTime<Utc>,
    },
    History {
        step: Option<String>,
        attempt: Option<i32>,
        kind: &'static str,
        detail: serde_json::Value,
    },
    /// The run ended: release its environment lock and admit the next run.
    ReleaseLock,
}

/// How a result was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Applied,
    /// Recorded but ignored: not for the current attempt, or not expected now.
    Stale(String),
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("run {run} is {status}; {action} is not possible")]
    WrongState {
        run: Uuid,
        status: RunStatus,
        action: &'static str,
    },
}

/// How a cancel's reason starts, so the run ends `cancelled` when nothing was undone.
const CANCELLED_PREFIX: &str = "cancelled by operator: ";

/// Compensation error codes after which a step with `restore_from_backup`
/// restores its pre-deploy backup instead: the change has no down migration
/// (`irreversible`), or its down migration failed (`rollback_failed`, once
/// its retries are spent). The seed pipeline asks for both: "Run the down
/// migration. If the down migration fails, restore from the pre-migration
/// backup". Not `newer_migrations_applied`: restoring would also undo later
/// deploys.
const RESTORE_WHEN: [&str; 2] = ["irreversible", "rollback_failed"];

/// Effects are collected here during one transition.
pub type Effects = Vec<Effect>;

impl RunState {
    /// The state of a freshly planned run: included steps pending, the rest skipped.
    pub fn planned(event: &MergeEvent, plan: &Plan) -> Self {
        let steps = plan
            .steps
            .iter()
            .map(|p| StepState {
                id: p.id.clone(),
                role: p.role.clone(),
                zone: p.zone.clone(),
                action: p.action.clone(),
                compensate: p.compensate.clone(),
                restore_from_backup: p.restore_from_backup,
                review_on_failure: p.review_on_failure,
                restoring: false,
                needs: p.needs.clone(),
                gates: p.gates.clone(),
                hold: None,
                included: p.included,
                status: if p.included {
                    StepStatus::Pending
                } else {
                    StepStatus::Skipped
                },
                attempt: 0,
                attempt_status: None,
                exec_attempts: 0,
                comp_attempts: 0,
                cancel_requested: false,
                timeout_ms: (p.timeout_secs as i64).saturating_mul(1000),
                retry: p.retry.clone(),
                params: p.params.clone(),
                outputs: Fields::new(),
                error: None,
                completion: None,
                started_at: None,
                finished_at: None,
                comp_started_at: None,
                comp_finished_at: None,
                dirty: true,
            })
            .collect();
        Self {
            id: plan.run_id,
            service: event.service.clone(),
            environment: event.environment.clone(),
            event: event.clone(),
            plan_hash: plan.hash.clone(),
            status: RunStatus::Queued,
            hold: None,
            facts: Facts::default(),
            completions: 0,
            rollback_reason: None,
            trace_context: None,
            started_at: None,
            finished_at: None,
            steps,
            dirty: true,
            audit_head: None,
        }
    }

    fn idx(&self, step: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.id == step)
    }

    fn history(
        fx: &mut Effects,
        step: Option<&str>,
        attempt: Option<i32>,
        kind: &'static str,
        detail: serde_json::Value,
    ) {
        fx.push(Effect::History {
            step: step.map(str::to_owned),
            attempt,
            kind,
            detail,
        });
    }

    fn set_status(&mut self, status: RunStatus, now: DateTime<Utc>, fx: &mut Effects) {
        Self::history(fx, None, None, "run_status", json!({"from": self.status, "to": status}));
        self.status = status;
        self.dirty = true;
        if status.is_terminal() {
            self.finished_at = Some(now);
            if status == RunStatus::RollbackFailed {
                // Left half undone, the environment takes no other deploy until
                // an operator has looked at it (`baton locks release`).
                Self::history(
                    fx,
                    None,
                    None,
                    "environment_held",
                    json!({"service": self.service, "environment": self.environment,
                           "release": "baton locks release <service> <environment> --reason <why>"}),
                );
            } else {
                fx.push(Effect::ReleaseLock);
            }
        }
    }

    /// Admission: the run holds its environment lock and starts.
    pub fn start(&mut self, now: DateTime<Utc>, cfg: &Settings, fx: &mut Effects) {
        if self.status != RunStatus::Queued {
            return;
        }
        self.started_at = Some(now);
        let verdict = gates::admission(self, &self.facts);
        Self::history(fx, None, None, "gate", json!(verdict));
        match verdict.verdict {
            Verdict::Hold { reason, .. } => {
                self.hold = Some(Hold {
                    gate: verdict.gate,
                    reason,
                    approval: false,
                    since: now,
                    until: None,
                    subject: None,
                });
                self.set_status(RunStatus::Blocked, now, fx);
            }
            _ => {
                self.set_status(RunStatus::Running, now, fx);
                self.advance(now, cfg, fx);
            }
        }
    }

    /// Applies a daemon's report; only the step's current attempt changes anything.
    pub fn apply_result(&mut self, r: &StepResult, now: DateTime<Utc>, cfg: &Settings, fx: &mut Effects) -> Applied {
        let Some(i) = self.idx(&r.step_id) else {
            return Applied::Stale(format!("run has no step {:?}", r.step_id));
        };
        let s = &self.steps[i];
        if r.attempt as i32 != s.attempt {
            return Applied::Stale(format!(
                "attempt {} is not the current attempt {}",
                r.attempt, s.attempt
            ));
        }
        if s.phase() != Some(r.kind) || !s.in_flight() {
            return Applied::Stale(format!("step is {} and not awaiting a {} result", s.status, r.kind));
        }
        if r.zone != s.zone || r.role != s.job_role() {
            return Applied::Stale(format!(
                "result from {}.{} for a step served by {}.{}",
                r.zone,
                r.role,
                s.zone,
                s.job_role()
            ));
        }
        // Results are applied concurrently, so an outcome can overtake its
        // attempt's `started`: the outcome then carries the start time itself.
        let final_result = matches!(r.status, ResultStatus::Succeeded | ResultStatus::Failed);
        if self.steps[i].attempt_status == Some(AttemptStatus::Dispatched)
            && (final_result || matches!(r.status, ResultStatus::Accepted | ResultStatus::Started))
        {
            let at = r.started_at.unwrap_or(r.at).min(now);
            let s = &mut self.steps[i];
            s.attempt_status = Some(AttemptStatus::Running);
            s.dirty = true;
            if s.status == StepStatus::Dispatched {
                s.status = StepStatus::Running;
                s.started_at.get_or_insert(at);
            }
            fx.push(Effect::AttemptStarted {
                step: s.id.clone(),
                attempt: s.attempt,
                daemon: r.daemon.clone(),
                at,
            });
            Self::history(
                fx,
                Some(&s.id),
                Some(s.attempt),
                "attempt_started",
                json!({"kind": r.kind, "daemon": r.daemon}),
            );
        }
        match r.status {
            ResultStatus::Accepted | ResultStatus::Started => self.extend_lease(i, now, cfg, fx),
            ResultStatus::Heartbeat => self.extend_lease(i, now, cfg, fx),
            ResultStatus::Succeeded => self.attempt_succeeded(i, r.outputs.clone(), now, cfg, fx),
            ResultStatus::Failed => {
                let err = r
                    .error
                    .clone()
                    .unwrap_or_else(|| StepError::fatal("unknown", "failed without an error"));
                if r.kind == JobKind::Execute && err.code == APPROVAL_AGAIN && self.may_ask_again(i, &r.outputs) {
                    self.ask_again(i, err, r.outputs.clone(), now, cfg, fx);
                    return Applied::Applied;
                }
                // What a failed attempt says it did is kept for its compensation.
                if r.kind == JobKind::Execute && !r.outputs.is_empty() {
                    self.steps[i].outputs = r.outputs.clone();
                }
                self.attempt_failed(i, err, "failed", now, cfg, fx);
            }
        }
        Applied::Applied
    }

    /// Whether step `i` can go back to its gates with a failed attempt's new
    /// subject to approve: the run goes on, nobody cancelled the step, it has
    /// the blast-radius gate (whose approvals are bound to the saved plan, so
    /// an approval of the old plan does not pass the new one), and the
    /// attempt reported the new plan.
    fn may_ask_again(&self, i: usize, outputs: &Fields) -> bool {
        let s = &self.steps[i];
        self.status.is_active()
            && !s.cancel_requested
            && !outputs.is_empty()
            && s.gates.iter().any(|g| g == "blast-radius")
    }

    /// The attempt made something new to approve (an apply whose approved
    /// Terraform plan went stale re-planned it and saved the new plan): the
    /// step goes back to its gates with the new plan as its outputs, which
    /// the blast-radius gate then decides on, and approvals of the old plan
    /// no longer count (docs/decisions.md, "A stale plan asks again"). The
    /// attempt does not count against the step's retries.
    fn ask_again(
        &mut self,
        i: usize,
        err: StepError,
        outputs: Fields,
        now: DateTime<Utc>,
        cfg: &Settings,
        fx: &mut Effects,
    ) {
        let s = &mut self.steps[i];
        fx.push(Effect::ClearTimers { step: s.id.clone() });
        fx.push(Effect::AttemptFinished {
            step: s.id.clone(),
            attempt: s.attempt,
            status: "failed",
            error: Some(err.clone()),
            at: now,
        });
        s.attempt_status = None;
        s.exec_attempts -= 1;
        s.status = StepStatus::Pending;
        // Nothing was applied: the step starts again when it is dispatched
        // again (and is not partial work to compensate meanwhile).
        s.started_at = None;
        s.outputs = outputs;
        s.error = Some(err.clone());
        s.dirty = true;
        Self::history(
            fx,
            Some(&s.id),
            Some(s.attempt),
            "approval_asked_again",
            json!({"error": err}),
        );
        self.advance(now, cfg, fx);
    }

    fn extend_lease(&mut self, i: usize, now: DateTime<Utc>, cfg: &Settings, fx: &mut Effects) {
        let s = &self.steps[i];
        fx.push(Effect::SetTimer {
            step: s.id.clone(),
            kind: TimerKind::Lease,
            attempt: s.attempt,
            due: now + cfg.lease,
        });
    }

    fn attempt_succeeded(&mut self, i: usize, outputs: Fields, now: DateTime<Utc>, cfg: &Settings, fx: &mut Effects) {
        self.completions += 1;
        self.dirty = true;
        let completion = self.completions;
        let s = &mut self.steps[i];
        let kind = s.phase().unwrap_or(JobKind::Execute);
        fx.push(Effect::ClearTimers { step: s.id.clone() });
        fx.push(Effect::AttemptFinished {
            step: s.id.clone(),
            attempt: s.attempt,
            status: "succeeded",
            error: None,
            at: now,
        });
        s.attempt_status = None;
        s.dirty = true;
        match kind {
            JobKind::Execute => {
                // What the daemon warns about (its outputs' `warnings`) is kept
                // in the run's history too, where operators read it.
                let mut detail = json!({"completion": completion});
                if let Some(w) = outputs
                    .get("warnings")
                    .filter(|w| w.as_array().is_some_and(|a| !a.is_empty()))
                {
                    detail["warnings"] = w.clone();
                }
                s.status = StepStatus::Succeeded;
                s.outputs = outputs;
                s.finished_at = Some(now);
                s.completion = Some(completion);
                s.error = None;
                Self::history(fx, Some(&s.id), Some(s.attempt), "step_succeeded", detail);
            }
            JobKind::Compensate => {
                s.status = StepStatus::Compensated;
                s.comp_finished_at = Some(now);
                Self::history(fx, Some(&s.id), Some(s.attempt), "step_compensated", json!({}));
            }
        }
        self.advance(now, cfg, fx);
    }

    fn attempt_failed(
        &mut self,
        i: usize,
        err: StepError,
        attempt_status: &'static str,
        now: DateTime<Utc>,
        cfg: &Settings,
        fx: &mut Effects,
    ) {
        let run_running = self.status.is_active();
        let s = &mut self.steps[i];
        let kind = s.phase().unwrap_or(JobKind::Execute);
        // Started, then silent until its lease expired: its daemon died (or was
        // cut off). That is not the step's failure (docs/decisions.md,
        // "Attempts lost to dead daemons").
        let lost = attempt_status == "lost" && s.attempt_status == Some(AttemptStatus::Running);
        fx.push(Effect::ClearTimers { step: s.id.clone() });
        fx.push(Effect::AttemptFinished {
            step: s.id.clone(),
            attempt: s.attempt,
            status: attempt_status,
            error: Some(err.clone()),
            at: now,
        });
        s.dirty = true;
        s.attempt_status = None;
        // A started attempt lost to a dead daemon is not the step's failure:
        // within the limit it is given back to the step's budget (the number
        // given back is the dispatches the budgets do not count).
        let given_back = s.attempt - s.exec_attempts - s.comp_attempts;
        let give_back = lost && given_back < cfg.lost_attempts_limit as i32;
        if give_back {
            match kind {
                JobKind::Execute => s.exec_attempts -= 1,
                JobKind::Compensate => s.comp_attempts -= 1,
            }
        }
        let tries = match kind {
            JobKind::Execute => s.exec_attempts,
            JobKind::Compensate => s.comp_attempts,
        };
        // A daemon that hands a job back on shutdown did not fail it: that retry
        // does not count against the step's attempts.
        let handed_back = err.code == HANDED_BACK;
        let may_retry = err.retryable
            && (tries < s.retry.max_attempts as i32 || handed_back || give_back)
            && !s.cancel_requested
            && (kind == JobKind::Compensate || run_running);
        if may_retry {
            let delay = s.retry.backoff(tries.max(1) as u32);
            s.attempt_status = Some(AttemptStatus::Waiting);
            if kind == JobKind::Execute {
                s.status = StepStatus::Ready;
            }
            fx.push(Effect::SetTimer {
                step: s.id.clone(),
                kind: TimerKind::Dispatch,
                attempt: s.attempt,
                due: now + delay,
            });
            Self::history(
                fx,
                Some(&s.id),
                Some(s.attempt),
                "retry_scheduled",
                json!({"kind": kind, "error": err, "backoff_ms": delay.as_millis() as u64, "attempts": tries,
                       "max_attempts": s.retry.max_attempts,
                       "lost_to_dead_daemons": given_back + i32::from(give_back),
                       "lost_attempts_limit": cfg.lost_attempts_limit,
                       "counted": !give_back && !handed_back}),
            );
            return;
        }
        s.error = Some(err.clone());
        match kind {
            JobKind::Execute => {
                s.finished_at = Some(now);
                s.status = if s.cancel_requested && err.code == "cancelled" {
                    StepStatus::Cancelled
                } else {
                    StepStatus::Failed
                };
                let kind = if s.status == StepStatus::Cancelled {
                    "step_cancelled"
                } else {
                    "step_failed"
                };
                Self::history(
                    fx,
                    Some(&s.id),
                    Some(s.attempt),
                    kind,
                    json!({"error": err, "attempts": tries}),
                );
            }
            JobKind::Compensate
                if s.restore_from_backup && !s.restoring && RESTORE_WHEN.contains(&err.code.as_str()) =>
            {
                match self.pre_deploy_backup(i) {
                    Ok(backup_id) => {
                        let s = &mut self.steps[i];
                        s.restoring = true;
                        Self::history(
                            fx,
                            Some(&s.id),
                            Some(s.attempt),
                            "restore_from_backup",
                            json!({"backup_id": backup_id, "because": err}),
                        );
                        self.dispatch(i, JobKind::Compensate, now, cfg, fx);
                        return;
                    }
                    Err(why) => {
                        let s = &mut self.steps[i];
                        let err = StepError::fatal(
                            err.code.clone(),
                            format!("{}; and the pre-deploy backup cannot be restored: {why}", err.message),
                        );
                        s.error = Some(err.clone());
                        Self::compensation_failed(s, &err, tries, now, fx);
                    }
                }
            }
            JobKind::Compensate => Self::compensation_failed(s, &err, tries, now, fx),
        }
        self.advance(now, cfg, fx);
    }

    /// A compensation failed for good: the run will end `rollback_failed`.
    fn compensation_failed(s: &mut StepState, err: &StepError, tries: i32, now: DateTime<Utc>, fx: &mut Effects) {
        s.comp_finished_at = Some(now);
        s.status = StepStatus::CompensationFailed;
        Self::history(
            fx,
            Some(&s.id),
            Some(s.attempt),
            "compensation_failed",
            json!({"error": err, "attempts": tries}),
        );
    }

    /// A durable timer came due; stale timers (older attempts) change nothing.
    pub fn fire_timer(
        &mut self,
        step: &str,
        kind: TimerKind,
        attempt: i32,
        now: DateTime<Utc>,
        cfg: &Settings,
        fx: &mut Effects,
    ) {
        let Some(i) = self.idx(step) else { return };
        let s = &self.steps[i];
        if s.attempt != attempt {
            return;
        }
        match kind {
            TimerKind::Gate => {
                if s.status == StepStatus::Pending {
                    self.advance(now, cfg, fx);
                }
            }
            TimerKind::Window => {
                if !s.in_flight() || s.phase() != Some(JobKind::Execute) {
                    return;
                }
                let policy = cfg.gates.windows.get(&s.zone).map(|w| w.overrun).unwrap_or_default();
                let detail = json!({"gate": "maintenance-window", "policy": policy,
                    "reason": "the maintenance window closed while the step was running"});
                Self::history(fx, Some(&s.id), Some(s.attempt), "window_overrun", detail);
                if policy == Overrun::Cancel {
                    let err = StepError::fatal(
                        "window_closed",
                        "the maintenance window closed while the step was running",
                    );
                    self.send_cancel(i, &err.message, now, fx);
                    self.attempt_failed(i, err, "cancelled", now, cfg, fx);
                }
            }
            TimerKind::Dispatch => {
                if s.attempt_status == Some(AttemptStatus::Waiting)
                    && let Some(phase) = s.phase()
                {
                    self.dispatch(i, phase, now, cfg, fx);
                }
            }
            TimerKind::Lease | TimerKind::Timeout => {
                if !s.in_flight() {
                    return;
                }
                let err = if kind == TimerKind::Lease {
                    let waited = if s.attempt_status == Some(AttemptStatus::Dispatched) {
                        format!("no daemon started the job within {} ms", cfg.accept_timeout.as_millis())
                    } else {
                        format!("no heartbeat for {} ms", cfg.lease.as_millis())
                    };
                    StepError::retryable("lease_expired", format!("attempt {attempt} presumed lost: {waited}"))
                } else {
                    StepError::fatal("timeout", format!("step exceeded its timeout of {} ms", s.timeout_ms))
                };
                // Tell a zombie executor to stop, without marking the step as cancelled:
                // the retry policy still decides what happens next.
                let s = &self.steps[i];
                fx.push(Effect::Cancel(self.cancel_job(s, &err.message, now)));
                let status = if kind == TimerKind::Lease { "lost" } else { "timed_out" };
                self.attempt_failed(i, err, status, now, cfg, fx);
            }
        }
    }

    /// The relay could not route a job: nobody serves that zone and role.
    pub fn job_unroutable(
        &mut self,
        step: &str,
        attempt: i32,
        message: String,
        now: DateTime<Utc>,
        cfg: &Settings,
        fx: &mut Effects,
    ) {
        let Some(i) = self.idx(step) else { return };
        if self.steps[i].attempt != attempt || !self.steps[i].in_flight() {
            return;
        }
        self.attempt_failed(i, StepError::fatal("unroutable", message), "failed", now, cfg, fx);
    }

    /// A job of the current attempt ended in the dead-letter queue before any daemon
    /// started it (refused as expired or invalid, or past the delivery limit): the
    /// attempt fails with that reason and no retry (the same job would end there again).
    pub fn job_dead_lettered(
        &mut self,
        step: &str,
        attempt: i32,
        reason: &str,
        now: DateTime<Utc>,
        cfg: &Settings,
        fx: &mut Effects,
    ) -> bool {
        let Some(i) = self.idx(step) else { return false };
        let s = &self.steps[i];
        if s.attempt != attempt || s.attempt_status != Some(AttemptStatus::Dispatched) {
            return false;
        }
        let err = StepError::fatal("dead_lettered", format!("the job was dead-lettered: {reason}"));
        self.attempt_failed(i, err, "failed", now, cfg, fx);
        true
    }

    /// An operator asks to undo the run.
    pub fn request_rollback(
        &mut self,
        reason: &str,
        now: DateTime<Utc>,
        cfg: &Settings,
        fx: &mut Effects,
    ) -> Result<(), EngineError> {
        match self.status {
            RunStatus::Running | RunStatus::Blocked | RunStatus::AwaitingApproval => {
                self.begin_rollback(format!("operator requested rollback: {reason}"), now, cfg, fx);
                Ok(())
            }
            RunStatus::Succeeded | RunStatus::Failed => {
                self.finished_at = None;
                self.rollback_reason = Some(format!("operator requested rollback: {reason}"));
                self.set_status(RunStatus::RollingBack, now, fx);
                self.continue_rollback(now, cfg, fx);
                Ok(())
            }
            status => Err(EngineError::WrongState {
                run: self.id,
                status,
                action: "rollback",
            }),
        }
    }

    fn cancel_job(&self, s: &StepState, reason: &str, now: DateTime<Utc>) -> CancelJob {
        CancelJob {
            v: PROTOCOL_VERSION,
            message_id: Uuid::new_v4(),
            run_id: self.id,
            step_id: s.id.clone(),
            attempt: s.attempt as u32,
            zone: s.zone.clone(),
            role: s.job_role().to_owned(),
            reason: reason.to_owned(),
            issued_at: now,
            signature: None,
        }
    }

    /// Cancels the step's in-flight attempt for good: no retry follows.
    fn send_cancel(&mut self, i: usize, reason: &str, now: DateTime<Utc>, fx: &mut Effects) {
        let cancel = self.cancel_job(&self.steps[i], reason, now);
        let s = &mut self.steps[i];
        s.cancel_requested = true;
        s.dirty = true;
        fx.push(Effect::Cancel(cancel));
    }

    /// Moves the run forward as far as its state allows: re-evaluates the gates of
    /// steps whose needs are met, dispatches those that pass, and settles the run's
    /// status (running, blocked, awaiting approval, or finished).
    pub fn advance(&mut self, now: DateTime<Utc>, cfg: &Settings, fx: &mut Effects) {
        if self.status == RunStatus::RollingBack {
            self.continue_rollback(now, cfg, fx);
            return;
        }
        if !self.status.is_active() {
            return;
        }
        if let Some(failed) = self
            .steps
            .iter()
            .find(|s| s.status == StepStatus::Failed && !s.review_on_failure)
        {
            let reason = format!(
                "step {} failed: {}",
                failed.id,
                failed.error.as_ref().map(ToString::to_string).unwrap_or_default()
            );
            self.begin_rollback(reason, now, cfg, fx);
            return;
        }
        if self.hold.is_some() {
            let verdict = gates::admission(self, &self.facts);
            if let Verdict::Hold { .. } = verdict.verdict {
                self.hold_run(verdict, now, fx);
                return;
            }
            Self::history(fx, None, None, "gate", json!(verdict));
            self.hold = None;
            self.dirty = true;
        }
        let done = |id: &String, steps: &[StepState]| {
            steps
                .iter()
                .find(|s| &s.id == id)
                .is_some_and(|s| matches!(s.status, StepStatus::Succeeded | StepStatus::Skipped))
        };
        let ready: Vec<usize> = (0..self.steps.len())
            .filter(|&i| {
                let s = &self.steps[i];
                s.status == StepStatus::Pending && s.needs.iter().all(|n| done(n, &self.steps))
            })
            .collect();
        // Every ready step's gates first: if one fails in a way that rolls the
        // run back, nothing else of this pass is dispatched (it would only be
        // sent and cancelled at once, and a daemon that has not registered the
        // attempt yet would drop the cancel).
        let evaluated: Vec<(usize, gates::StepVerdicts)> = ready
            .into_iter()
            .map(|i| (i, gates::evaluate_step(self, i, &self.facts, &cfg.gates, now)))
            .collect();
        let rollback_begins = evaluated.iter().any(|(i, v)| {
            matches!(
                v.blocking(),
                Some(GateVerdict {
                    verdict: Verdict::Fail { .. },
                    ..
                })
            ) && !self.steps[*i].review_on_failure
        });
        let mut gate_failed = false;
        for (i, verdicts) in evaluated {
            if rollback_begins
                && !matches!(
                    verdicts.blocking(),
                    Some(GateVerdict {
                        verdict: Verdict::Fail { .. },
                        ..
                    })
                )
            {
                continue;
            }
            match verdicts.blocking() {
                Some(
                    v @ GateVerdict {
                        verdict: Verdict::Fail { reason },
                        ..
                    },
                ) => {
                    let code = if gates::is_rejection(v) {
                        "rejected"
                    } else {
                        "gate_failed"
                    };
                    let err = StepError::fatal(code, format!("gate {}: {reason}", v.gate));
                    Self::history(fx, Some(&self.steps[i].id), None, "gate", json!(v));
                    let s = &mut self.steps[i];
                    s.hold = None;
                    s.status = StepStatus::Failed;
                    s.error = Some(err.clone());
                    s.finished_at = Some(now);
                    s.dirty = true;
                    fx.push(Effect::ClearTimers { step: s.id.clone() });
                    Self::history(
                        fx,
                        Some(&s.id),
                        None,
                        "step_failed",
                        json!({"error": err, "attempts": 0}),
                    );
                    gate_failed = true;
                }
                Some(v) => {
                    let v = v.clone();
                    self.hold_step(i, v, now, fx);
                }
                None => {
                    let s = &mut self.steps[i];
                    if s.hold.take().is_some() {
                        s.dirty = true;
                    }
                    Self::history(fx, Some(&s.id), None, "gates_passed", json!({"gates": verdicts.all}));
                    self.dispatch(i, JobKind::Execute, now, cfg, fx);
                    if let Some((closes, _)) = verdicts.window {
                        let s = &self.steps[i];
                        fx.push(Effect::SetTimer {
                            step: s.id.clone(),
                            kind: TimerKind::Window,
                            attempt: s.attempt,
                            due: closes,
                        });
                    }
                }
            }
        }
        if gate_failed {
            self.advance(now, cfg, fx);
            return;
        }
        let flagged: Vec<&str> = self
            .steps
            .iter()
            .filter(|s| s.status == StepStatus::Failed)
            .map(|s| s.id.as_str())
            .collect();
        if self.steps.iter().all(|s| {
            matches!(s.status, StepStatus::Succeeded | StepStatus::Skipped)
                || (s.status == StepStatus::Failed && s.review_on_failure)
        }) {
            if flagged.is_empty() {
                self.set_status(RunStatus::Succeeded, now, fx);
            } else {
                // The deploy stays; a person decides whether to undo it.
                Self::history(
                    fx,
                    None,
                    None,
                    "flagged_for_rollback_review",
                    json!({"steps": flagged, "rollback": "baton rollback <run> --reason <why>"}),
                );
                self.set_status(RunStatus::Failed, now, fx);
            }
            return;
        }
        self.settle(now, fx);
    }

    /// Holds the whole run on an admission gate, recording the verdict when it changed.
    fn hold_run(&mut self, v: GateVerdict, now: DateTime<Utc>, fx: &mut Effects) {
        if self.hold.as_ref().is_some_and(|h| h.reason == v.verdict.reason()) {
            return;
        }
        Self::history(fx, None, None, "gate", json!(v));
        self.hold = Some(Hold {
            gate: v.gate.clone(),
            reason: v.verdict.reason().to_owned(),
            approval: false,
            since: self.hold.as_ref().map_or(now, |h| h.since),
            until: None,
            subject: None,
        });
        self.dirty = true;
    }

    /// Holds a step on a gate; the verdict is recorded (and a wake-up timer set) only
    /// when it changed, so re-evaluations do not flood the history.
    fn hold_step(&mut self, i: usize, v: GateVerdict, now: DateTime<Utc>, fx: &mut Effects) {
        let Verdict::Hold {
            reason,
            until,
            approval,
        } = &v.verdict
        else {
            return;
        };
        let subject = if *approval {
            Some(gates::approval_subject(self, &self.steps[i])).filter(|s| !s.is_empty())
        } else {
            None
        };
        let s = &mut self.steps[i];
        if s.hold.as_ref().is_some_and(|h| h.gate == v.gate && &h.reason == reason) {
            return;
        }
        Self::history(fx, Some(&s.id), None, "gate", json!(v));
        let since = match &s.hold {
            Some(h) if h.gate == v.gate => h.since,
            _ => now,
        };
        s.hold = Some(Hold {
            gate: v.gate.clone(),
            reason: reason.clone(),
            approval: *approval,
            since,
            until: *until,
            subject,
        });
        s.dirty = true;
        if let Some(due) = until {
            fx.push(Effect::SetTimer {
                step: s.id.clone(),
                kind: TimerKind::Gate,
                attempt: s.attempt,
                due: *due,
            });
        }
    }

    /// An active run is `running` while work is in flight; with nothing in flight
    /// and a step held, it is `awaiting_approval` or `blocked`.
    fn settle(&mut self, now: DateTime<Utc>, fx: &mut Effects) {
        if !self.status.is_active() {
            return;
        }
        let busy = self
            .steps
            .iter()
            .any(|s| s.in_flight() || s.attempt_status == Some(AttemptStatus::Waiting));
        let holds: Vec<&Hold> = self.steps.iter().filter_map(|s| s.hold.as_ref()).collect();
        let status = if self.hold.is_some() {
            RunStatus::Blocked
        } else if busy || holds.is_empty() {
            RunStatus::Running
        } else if holds.iter().any(|h| h.approval) {
            RunStatus::AwaitingApproval
        } else {
            RunStatus::Blocked
        };
        if status != self.status {
            self.set_status(status, now, fx);
        }
    }

    /// An operator cancels the run: a run not yet admitted ends at once; an active
    /// one stops its steps and compensates what already succeeded (a half-applied
    /// deploy is not a state to leave an environment in). It ends `cancelled` when
    /// there was nothing to undo, otherwise `rolled_back`.
    pub fn cancel(
        &mut self,
        reason: &str,
        now: DateTime<Utc>,
        cfg: &Settings,
        fx: &mut Effects,
    ) -> Result<(), EngineError> {
        match self.status {
            RunStatus::Queued => {
                for s in self.steps.iter_mut().filter(|s| s.status == StepStatus::Pending) {
                    s.status = StepStatus::Cancelled;
                    s.dirty = true;
                }
                self.rollback_reason = Some(format!("{CANCELLED_PREFIX}{reason}"));
                self.set_status(RunStatus::Cancelled, now, fx);
                Ok(())
            }
            s if s.is_active() => {
                self.begin_rollback(format!("{CANCELLED_PREFIX}{reason}"), now, cfg, fx);
                Ok(())
            }
            status => Err(EngineError::WrongState {
                run: self.id,
                status,
                action: "cancel",
            }),
        }
    }

    /// A newer run of the same environment queued behind this one, and the
    /// environment deploys only its newest waiting run: this one ends without
    /// starting. Only a run not yet admitted can be superseded.
    pub fn supersede(&mut self, by: Uuid, now: DateTime<Utc>, fx: &mut Effects) -> Result<(), EngineError> {
        if self.status != RunStatus::Queued {
            return Err(EngineError::WrongState {
                run: self.id,
                status: self.status,
                action: "supersede",
            });
        }
        for s in self.steps.iter_mut().filter(|s| s.status == StepStatus::Pending) {
            s.status = StepStatus::Cancelled;
            s.dirty = true;
        }
        self.rollback_reason = Some(format!("superseded by run {by}"));
        Self::history(fx, None, None, "superseded", json!({"by": by}));
        self.set_status(RunStatus::Superseded, now, fx);
        Ok(())
    }

    fn begin_rollback(&mut self, reason: String, now: DateTime<Utc>, cfg: &Settings, fx: &mut Effects) {
        self.rollback_reason = Some(reason.clone());
        self.set_status(RunStatus::RollingBack, now, fx);
        for i in 0..self.steps.len() {
            let s = &mut self.steps[i];
            match s.status {
                StepStatus::Pending => {
                    s.status = StepStatus::Cancelled;
                    s.dirty = true;
                    if s.hold.take().is_some() {
                        fx.push(Effect::ClearTimers { step: s.id.clone() });
                    }
                    Self::history(
                        fx,
                        Some(&s.id),
                        None,
                        "step_cancelled",
                        json!({"reason": "run is rolling back; never started"}),
                    );
                }
                StepStatus::Ready if s.attempt_status == Some(AttemptStatus::Waiting) => {
                    s.status = StepStatus::Cancelled;
                    s.attempt_status = None;
                    s.finished_at = Some(now);
                    s.dirty = true;
                    fx.push(Effect::ClearTimers { step: s.id.clone() });
                    Self::history(
                        fx,
                        Some(&s.id),
                        Some(s.attempt),
                        "step_cancelled",
                        json!({"reason": "run is rolling back; retry dropped"}),
                    );
                }
                StepStatus::Dispatched | StepStatus::Running if !s.cancel_requested => {
                    Self::history(
                        fx,
                        Some(&s.id),
                        Some(s.attempt),
                        "cancel_sent",
                        json!({"reason": reason}),
                    );
                    self.send_cancel(i, &reason, now, fx);
                }
                _ => {}
            }
        }
        self.continue_rollback(now, cfg, fx);
    }

    /// Compensates succeeded steps one at a time, latest completion first, and
    /// before them the failed or cancelled steps whose role may leave partial
    /// work behind and that were attempted (see [`StepState::partial_work`]).
    ///
    /// Strict reverse completion order also satisfies the dependency rule: a
    /// step always completes after everything it needs, so its compensation
    /// runs before theirs; a step that was attempted and did not succeed ran
    /// after everything it needs succeeded, so it goes first.
    fn continue_rollback(&mut self, now: DateTime<Utc>, cfg: &Settings, fx: &mut Effects) {
        if self
            .steps
            .iter()
            .any(|s| s.in_flight() || s.status == StepStatus::Compensating)
        {
            return;
        }
        if self.steps.iter().any(|s| s.status == StepStatus::CompensationFailed) {
            self.set_status(RunStatus::RollbackFailed, now, fx);
            return;
        }
        let next = self
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.compensate.is_some())
            .filter_map(|(i, s)| {
                if s.status == StepStatus::Succeeded {
                    Some(((0, i64::from(s.completion.unwrap_or_default())), i))
                } else if s.partial_work() {
                    Some(((1, s.finished_at.map_or(0, |t| t.timestamp_millis())), i))
                } else {
                    None
                }
            })
            .max_by_key(|(key, _)| *key)
            .map(|(_, i)| i);
        match next {
            Some(i) => self.dispatch(i, JobKind::Compensate, now, cfg, fx),
            None => {
                let undone = self.steps.iter().any(|s| s.status == StepStatus::Compensated);
                let reason = self.rollback_reason.as_deref().unwrap_or_default();
                let end = if undone {
                    RunStatus::RolledBack
                } else if reason.starts_with(CANCELLED_PREFIX) {
                    RunStatus::Cancelled
                } else if reason.starts_with("operator requested") {
                    RunStatus::RolledBack
                } else {
                    RunStatus::Failed
                };
                self.set_status(end, now, fx);
            }
        }
    }

    /// The verified pre-deploy backup of this run in step `i`'s zone, among its needs.
    fn pre_deploy_backup(&self, i: usize) -> Result<String, String> {
        let step = &self.steps[i];
        let b = self
            .steps
            .iter()
            .find(|b| {
                b.role == baton_shared::roles::BACKUP
                    && b.action == "pre-deploy"
                    && b.zone == step.zone
                    && step.needs.contains(&b.id)
            })
            .ok_or_else(|| {
                format!(
                    "no pre-deploy backup of zone {} among the needs of {}",
                    step.zone, step.id
                )
            })?;
        if b.status != StepStatus::Succeeded {
            return Err(format!("{} has no verified backup of this run ({})", b.id, b.status));
        }
        baton_shared::facts::verified_backup_of_run(&b.id, &b.outputs, self.id)
            .map(|backup| backup.backup_id)
            .map_err(|e| e.to_string())
    }

    fn dispatch(&mut self, i: usize, kind: JobKind, now: DateTime<Utc>, cfg: &Settings, fx: &mut Effects) {
        let restore_id = if kind == JobKind::Compensate && self.steps[i].restoring {
            self.pre_deploy_backup(i).ok()
        } else {
            None
        };
        let mut inputs: BTreeMap<String, Fields> = self.steps[i]
            .needs
            .iter()
            .filter_map(|n| self.steps.iter().find(|s| &s.id == n))
            .filter(|s| s.status == StepStatus::Succeeded || s.status == StepStatus::Compensating)
            .map(|s| (s.id.clone(), s.outputs.clone()))
            .collect();
        // A step that asked again gets what its last attempt reported (the
        // re-made plan that was then approved) among its inputs, under its own id.
        let own = &self.steps[i];
        if kind == JobKind::Execute && own.error.as_ref().is_some_and(|e| e.code == APPROVAL_AGAIN) {
            inputs.insert(own.id.clone(), own.outputs.clone());
        }
        let deploy = Deploy {
            service: self.event.service.clone(),
            environment: self.event.environment.clone(),
            repository: self.event.repository.clone(),
            commit_sha: self.event.commit_sha.clone(),
            risk: self.event.risk,
            exceptions: self.event.exceptions.clone(),
        };
        let s = &mut self.steps[i];
        s.attempt += 1;
        s.attempt_status = Some(AttemptStatus::Dispatched);
        s.cancel_requested = false;
        s.dirty = true;
        let action = match kind {
            JobKind::Execute => {
                s.exec_attempts += 1;
                s.status = StepStatus::Dispatched;
                s.action.clone()
            }
            JobKind::Compensate => {
                s.comp_attempts += 1;
                s.status = StepStatus::Compensating;
                s.comp_started_at.get_or_insert(now);
                if s.restoring {
                    "restore".to_owned()
                } else {
                    s.compensate.clone().unwrap_or_default()
                }
            }
        };
        let mut params = s.params.clone();
        if kind == JobKind::Compensate && s.restoring {
            // The backup role's restore asks for the id twice: the second is the confirmation.
            let id = restore_id.unwrap_or_default();
            params = Fields::new();
            params.insert("backup_id".into(), id.clone().into());
            params.insert("confirm_backup_id".into(), id.into());
        }
        let timeout = Duration::from_millis(s.timeout_ms.max(1) as u64);
        let job = StepJob {
            v: PROTOCOL_VERSION,
            message_id: Uuid::new_v4(),
            run_id: self.id,
            step_id: s.id.clone(),
            attempt: s.attempt as u32,
            kind,
            zone: s.zone.clone(),
            role: s.job_role().to_owned(),
            action,
            params,
            inputs,
            own_outputs: if kind == JobKind::Compensate {
                s.outputs.clone()
            } else {
                Fields::new()
            },
            deploy,
            issued_at: now,
            not_after: now + cfg.accept_timeout,
            deadline: now + timeout,
            heartbeat_ms: cfg.heartbeat.as_millis().max(1) as u64,
            lease_ms: cfg.lease.as_millis() as u64,
            // A child of the run span: the attempt's own span, which the daemon's span joins.
            traceparent: self
                .trace_context
                .as_deref()
                .and_then(baton_shared::telemetry::parse_traceparent)
                .map(|run| {
                    baton_shared::telemetry::traceparent(
                        run.trace_id(),
                        baton_shared::telemetry::new_span_id(),
                        run.is_sampled(),
                    )
                }),
            signature: None,
        };
        Self::history(
            fx,
            Some(&s.id),
            Some(s.attempt),
            "dispatched",
            json!({"kind": kind, "message_id": job.message_id}),
        );
        fx.push(Effect::SetTimer {
            step: s.id.clone(),
            kind: TimerKind::Lease,
            attempt: s.attempt,
            due: now + cfg.accept_timeout,
        });
        fx.push(Effect::SetTimer {
            step: s.id.clone(),
            kind: TimerKind::Timeout,
            attempt: s.attempt,
            due: now + timeout,
        });
        fx.push(Effect::Dispatch(Box::new(job)));
    }
}

#[cfg(test)]
mod tests;
