//! Gates: the checks that decide whether a run may start and whether a step may
//! be dispatched (docs/architecture.md, Gates). Pure: the engine passes the run, the facts the
//! store loaded (open incidents, approvals) and `now`.
//!
//! Every gate answers with a verdict: pass, warn (recorded, does not block),
//! hold (wait: for a time, an approval or an incident to end) or fail (the step
//! fails and the run rolls back). Verdicts name the rule and the facts.
//!
//! Facts reported by other steps are read from their outputs, found by role:
//! the pre-deploy backup (`backup`, action `pre-deploy`: `backup_id`, `run_id`,
//! `verified`), the image build (`container-build`: `image_digest`), staging
//! verification (`staging-verify`: `image_digest`, `regression_percent`), the
//! migrations (`db-migration`: `destructive`, `warnings`) and Terraform plans
//! (`resources_changed`). A missing fact fails the gate that needs it, except the
//! blast radius, which is known only once Terraform has planned (see [`blast_radius`]).

use std::collections::BTreeMap;
use std::time::Duration;

use baton_shared::facts::{self, FactSet, ImageBuilt, MigrationsApplied, StagingVerified, TerraformPlanned};
use baton_shared::protocol::{ADDITIVE_FIRST, MergeEvent, Risk};
use baton_shared::roles::{BACKUP, CONTAINER_BUILD, DB_MIGRATION, PRODUCTION_APPLY, STAGING_VERIFY};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

pub use crate::state::{Approval, Decision, Facts, Incident};
use crate::state::{RunState, StepState, StepStatus};
use crate::window::{Overrun, Schedule, ScheduleConfig, WindowState};

/// Gate configuration (`[gates]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatesConfig {
    pub merge: MergeConfig,
    /// Minimum time staging runs a change before production apply, in seconds.
    pub staging_soak_secs: u64,
    /// The same for critical changes, which the seed verifies on staging for
    /// longer; never shorter than `staging_soak_secs`.
    pub critical_staging_soak_secs: u64,
    pub approval: ApprovalConfig,
    /// Maintenance windows by environment (zone name).
    pub maintenance_windows: BTreeMap<String, ScheduleConfig>,
}

impl Default for GatesConfig {
    fn default() -> Self {
        Self {
            merge: MergeConfig::default(),
            staging_soak_secs: 15 * 60,
            critical_staging_soak_secs: 60 * 60,
            approval: ApprovalConfig::default(),
            maintenance_windows: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MergeConfig {
    /// People whose approval of the pull request lets it deploy (default: the seed's approvers, `marta` and `iwona`).
    pub required_approvers: Vec<String>,
    /// How many of them must have approved. The pull request's author never counts.
    pub min_approvals: usize,
}

impl Default for MergeConfig {
    fn default() -> Self {
        Self {
            required_approvers: vec!["marta".into(), "iwona".into()],
            min_approvals: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApprovalConfig {
    /// Distinct approvers a human-approval hold needs.
    pub required: usize,
    /// The run's requester may not approve it.
    pub four_eyes: bool,
    /// An approval counts for this long after it was given.
    pub ttl_secs: u64,
}

impl Default for ApprovalConfig {
    fn default() -> Self {
        Self {
            required: 1,
            four_eyes: true,
            ttl_secs: 4 * 3600,
        }
    }
}

/// Validated gate policy, shared by every transition.
#[derive(Debug, Clone)]
pub struct Policy {
    pub merge: MergeConfig,
    pub staging_soak: Duration,
    pub critical_staging_soak: Duration,
    pub approval: ApprovalConfig,
    pub windows: BTreeMap<String, Schedule>,
}

impl Default for Policy {
    fn default() -> Self {
        GatesConfig::default().validate().expect("default gates are valid")
    }
}

impl Policy {
    /// How long staging must run a change of this risk before production apply.
    pub fn staging_soak_for(&self, risk: Risk) -> Duration {
        match risk {
            Risk::Critical => self.critical_staging_soak,
            Risk::Standard | Risk::High => self.staging_soak,
        }
    }
}

impl GatesConfig {
    pub fn validate(&self) -> Result<Policy, baton_shared::config::ConfigError> {
        use baton_shared::config::ConfigError;
        if self.merge.min_approvals > self.merge.required_approvers.len() {
            return Err(ConfigError::invalid(
                "gates.merge.min_approvals",
                format!(
                    "is {} but only {} required approvers are listed",
                    self.merge.min_approvals,
                    self.merge.required_approvers.len()
                ),
            ));
        }
        if self.approval.required == 0 {
            return Err(ConfigError::invalid("gates.approval.required", "must be at least 1"));
        }
        if self.approval.ttl_secs == 0 {
            return Err(ConfigError::invalid("gates.approval.ttl_secs", "must be positive"));
        }
        let mut windows = BTreeMap::new();
        for (env, w) in &self.maintenance_windows {
            let s = w
                .validate(&format!("gates.maintenance_windows.{env}"))
                .map_err(|e| ConfigError::invalid(e.at, e.message))?;
            windows.insert(env.clone(), s);
        }
        Ok(Policy {
            merge: self.merge.clone(),
            staging_soak: Duration::from_secs(self.staging_soak_secs),
            critical_staging_soak: Duration::from_secs(self.critical_staging_soak_secs.max(self.staging_soak_secs)),
            approval: self.approval.clone(),
            windows,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    Pass {
        reason: String,
    },
    Warn {
        reason: String,
    },
    Hold {
        reason: String,
        /// Re-evaluate then (a window opens, a soak ends); `None` waits for an event.
        #[serde(skip_serializing_if = "Option::is_none")]
        until: Option<DateTime<Utc>>,
        /// The hold ends with a human approval.
        approval: bool,
    },
    Fail {
        reason: String,
    },
}

impl Verdict {
    fn pass(reason: impl Into<String>) -> Self {
        Self::Pass { reason: reason.into() }
    }
    fn fail(reason: impl Into<String>) -> Self {
        Self::Fail { reason: reason.into() }
    }
    fn hold(reason: impl Into<String>, until: Option<DateTime<Utc>>) -> Self {
        Self::Hold {
            reason: reason.into(),
            until,
            approval: false,
        }
    }
    fn approval(reason: impl Into<String>) -> Self {
        Self::Hold {
            reason: reason.into(),
            until: None,
            approval: true,
        }
    }
    pub fn reason(&self) -> &str {
        match self {
            Self::Pass { reason } | Self::Warn { reason } | Self::Hold { reason, .. } | Self::Fail { reason } => reason,
        }
    }
}

/// One gate's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GateVerdict {
    pub gate: String,
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// A step's gates together: the first fail wins, then the first hold.
#[derive(Debug, Clone)]
pub struct StepVerdicts {
    pub all: Vec<GateVerdict>,
    /// When the step dispatches inside a maintenance window: its end and policy.
    pub window: Option<(DateTime<Utc>, Overrun)>,
}

impl StepVerdicts {
    pub fn blocking(&self) -> Option<&GateVerdict> {
        self.all
            .iter()
            .find(|v| matches!(v.verdict, Verdict::Fail { .. }))
            .or_else(|| self.all.iter().find(|v| matches!(v.verdict, Verdict::Hold { .. })))
    }
}

/// Four-eyes: whether `who` requested the run or wrote its change (the pull
/// request's author), and so may not approve it. Names are compared without
/// case, as the merge gate compares them.
fn own_change(run: &RunState, who: &str) -> Option<&'static str> {
    let who = who.to_lowercase();
    if who == run.event.requested_by.to_lowercase() {
        Some("requested this run")
    } else if who == run.event.pull_request.author.to_lowercase() {
        Some("wrote this change")
    } else {
        None
    }
}

/// The merge gate, at ingest: enough of the required approvers approved the pull
/// request, not counting its author. The error names who is missing.
pub fn merge_gate(event: &MergeEvent, policy: &MergeConfig) -> Result<String, String> {
    if policy.min_approvals == 0 {
        return Ok("no merge approvals required".into());
    }
    let author = event.pull_request.author.to_lowercase();
    let approved: Vec<&String> = policy
        .required_approvers
        .iter()
        .filter(|r| {
            let r = r.to_lowercase();
            r != author && event.pull_request.approvals.iter().any(|a| a.by.to_lowercase() == r)
        })
        .collect();
    if approved.len() >= policy.min_approvals {
        return Ok(format!(
            "pull request #{} approved by {}",
            event.pull_request.number,
            join(approved.iter().map(|s| s.as_str()))
        ));
    }
    let missing: Vec<&str> = policy
        .required_approvers
        .iter()
        .filter(|r| !approved.contains(r))
        .map(String::as_str)
        .collect();
    let author_note = if policy.required_approvers.iter().any(|r| r.to_lowercase() == author) {
        format!(" ({} is the author and does not count)", event.pull_request.author)
    } else {
        String::new()
    };
    Err(format!(
        "merge gate: pull request #{} needs approval by {} of {}; missing: {}{author_note}",
        event.pull_request.number,
        policy.min_approvals,
        join(policy.required_approvers.iter().map(String::as_str)),
        join(missing.into_iter()),
    ))
}

fn join<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names.collect::<Vec<_>>().join(", ")
}

/// Admission: an open incident in the run's environment holds the run.
pub fn admission(run: &RunState, facts: &Facts) -> GateVerdict {
    GateVerdict {
        gate: "incident".into(),
        verdict: incident_verdict(&run.environment, facts),
    }
}

fn incident_verdict(environment: &str, facts: &Facts) -> Verdict {
    match facts.incidents.iter().find(|i| i.environment == environment) {
        Some(i) => Verdict::hold(
            format!(
                "incident {} open in {environment} since {}: {}",
                i.id,
                i.opened_at.format("%Y-%m-%d %H:%M UTC"),
                i.title
            ),
            None,
        ),
        None => Verdict::pass(format!("no open incident in {environment}")),
    }
}

/// Every gate of step `i`: the implicit incident gate for its zone, then its own.
pub fn evaluate_step(run: &RunState, i: usize, facts: &Facts, policy: &Policy, now: DateTime<Utc>) -> StepVerdicts {
    let step = &run.steps[i];
    let mut all = vec![GateVerdict {
        gate: "incident".into(),
        verdict: incident_verdict(&step.zone, facts),
    }];
    let mut window = None;
    for gate in &step.gates {
        let verdict = match gate.as_str() {
            "backup-verified" => backup_verified(run, step),
            "blast-radius" => blast_radius(run, step, facts, policy, now),
            "staging-soak" => staging_soak(run, policy),
            "rollback-tested" => rollback_tested(run),
            "performance-regression" => performance_regression(run),
            "image-match" => image_match(run),
            "maintenance-window" => {
                let (v, w) = maintenance_window(run, step, policy, now);
                window = w;
                v
            }
            "human-approval" => approval(run, step, facts, policy, now, "human approval required by the pipeline"),
            "additive-first" => additive_first(run),
            other => Verdict::fail(format!("unknown gate {other:?}")),
        };
        all.push(GateVerdict {
            gate: gate.clone(),
            verdict,
        });
    }
    StepVerdicts { all, window }
}

fn succeeded(run: &RunState, pred: impl Fn(&StepState) -> bool) -> impl Iterator<Item = &StepState> {
    run.steps
        .iter()
        .filter(move |s| matches!(s.status, StepStatus::Succeeded) && pred(s))
}

/// Whether this run applies a destructive migration: the event says so, or a
/// migration step that already ran reported one.
fn destructive(run: &RunState) -> bool {
    run.event.flags.iter().any(|f| f == "destructive_migration")
        || succeeded(run, |s| s.role == DB_MIGRATION)
            .any(|s| MigrationsApplied::read(&s.id, &s.outputs).is_ok_and(|m| m.destructive))
}

fn backup_verified(run: &RunState, step: &StepState) -> Verdict {
    if step.role == DB_MIGRATION && !destructive(run) {
        return Verdict::pass("no destructive migration in this run");
    }
    let Some(b) = run
        .steps
        .iter()
        .find(|s| s.role == BACKUP && s.action == "pre-deploy" && s.included)
    else {
        return Verdict::fail("the plan has no pre-deploy backup step");
    };
    if b.status != StepStatus::Succeeded {
        return Verdict::fail(format!("pre-deploy backup {} is {}, not succeeded", b.id, b.status));
    }
    match facts::verified_backup_of_run(&b.id, &b.outputs, run.id) {
        Ok(backup) => Verdict::pass(format!("backup {} from {} is verified", backup.backup_id, b.id)),
        Err(e) => Verdict::fail(e.to_string()),
    }
}

fn blast_radius(run: &RunState, step: &StepState, facts: &Facts, policy: &Policy, now: DateTime<Utc>) -> Verdict {
    let limit = step
        .params
        .get("blast_radius_limit")
        .and_then(Value::as_u64)
        .unwrap_or(5);
    match plan_facts(run, step) {
        // Changes in modules the merge did not touch need an approval whatever
        // their number (the seed: "plan shows unintended changes").
        Some((from, p)) if !p.unintended.is_empty() => approval(
            run,
            step,
            facts,
            policy,
            now,
            &format!(
                "the plan changes {} resource(s) in modules this merge did not touch ({}); {} resources change in all{}",
                p.unintended.len(),
                p.unintended
                    .iter()
                    .map(|c| format!("{} ({})", c.address, c.action))
                    .collect::<Vec<_>>()
                    .join(", "),
                p.resources_changed,
                plan_of(from, &p)
            ),
        ),
        Some((from, p)) if p.resources_changed <= limit => Verdict::pass(format!(
            "{} resources change (limit {limit}){}",
            p.resources_changed,
            plan_of(from, &p)
        )),
        // What an approver approves: the addresses and actions of the saved plan
        // and its hash; the apply applies exactly that plan.
        Some((from, p)) => approval(
            run,
            step,
            facts,
            policy,
            now,
            &format!(
                "{} resources change, above the blast radius limit of {limit}{}",
                p.resources_changed,
                plan_of(from, &p)
            ),
        ),
        // Before the first plan of the run nobody knows the change's size: the
        // infrastructure daemon plans, checks the same limit and refuses a larger
        // change without approval itself. Recorded so every run's history says so.
        None => Verdict::Warn {
            reason: format!(
                "no Terraform plan facts before this step; the infrastructure daemon must refuse a plan \
                 changing more than {limit} resources without approval"
            ),
        },
    }
}

/// The Terraform plan a blast-radius gate decides on: the step's own, when an
/// apply re-planned a stale plan and was sent back to its gates (its failed
/// attempt reported the new plan), else the plan of the step it needs.
fn plan_facts<'a>(run: &'a RunState, step: &'a StepState) -> Option<(&'a str, TerraformPlanned)> {
    std::iter::once(step)
        .chain(succeeded(run, |s| step.needs.contains(&s.id)))
        .find_map(|s| {
            TerraformPlanned::read(&s.id, &s.outputs)
                .ok()
                .map(|p| (s.id.as_str(), p))
        })
}

/// What an approval of `step` approves beyond the run's plan: for a step
/// with a blast-radius gate, the SHA-256 of the saved Terraform plan it will
/// apply (empty before there is one, and for other steps). An approval counts
/// only for the subject it was given for, so a re-planned stale plan asks again.
pub fn approval_subject(run: &RunState, step: &StepState) -> String {
    if !step.gates.iter().any(|g| g == "blast-radius") {
        return String::new();
    }
    plan_facts(run, step)
        .and_then(|(_, p)| p.plan_sha256)
        .unwrap_or_default()
}

/// `: <changes> (plan <hash> from <step>)`, the changes shortened past 20.
fn plan_of(step: &str, p: &TerraformPlanned) -> String {
    const SHOWN: usize = 20;
    let mut changes: Vec<String> = p
        .changes
        .iter()
        .take(SHOWN)
        .map(|c| format!("{} ({})", c.address, c.action))
        .collect();
    if p.changes.len() > SHOWN {
        changes.push(format!("and {} more", p.changes.len() - SHOWN));
    }
    let hash = p
        .plan_sha256
        .as_deref()
        .map(|h| format!("saved plan sha256:{} of {step}", &h[..h.len().min(16)]))
        .unwrap_or_else(|| format!("plan of {step}"));
    if changes.is_empty() {
        format!(" ({hash})")
    } else {
        format!(": {} ({hash})", changes.join(", "))
    }
}

fn staging_soak(run: &RunState, policy: &Policy) -> Verdict {
    let Some(v) = succeeded(run, |s| s.role == STAGING_VERIFY).next() else {
        return Verdict::fail("no staging verification succeeded in this run");
    };
    let minimum = policy.staging_soak_for(run.event.risk);
    let minutes = minimum.as_secs_f64() / 60.0;
    let critical = if run.event.risk == Risk::Critical {
        ", critical risk"
    } else {
        ""
    };
    // The soak is what staging-verify watched and reports, not time that
    // passed: a change nobody watched has not soaked.
    match StagingVerified::read(&v.id, &v.outputs) {
        Ok(f) if f.soak_seconds >= minimum.as_secs() => Verdict::pass(format!(
            "{} watched staging run this change for {} s without it degrading (minimum {minutes} min{critical})",
            v.id, f.soak_seconds
        )),
        Ok(f) => Verdict::fail(format!(
            "{} watched staging run this change for {} s; the minimum is {minutes} min{critical} \
             (the step's soak must cover gates.staging_soak_secs)",
            v.id, f.soak_seconds
        )),
        Err(e) => Verdict::fail(e.to_string()),
    }
}

/// "No rollback procedure documented": staging rolled the change back and
/// forward again, or there is nothing earlier to roll back to.
fn rollback_tested(run: &RunState) -> Verdict {
    let Some(v) = succeeded(run, |s| s.role == STAGING_VERIFY).next() else {
        return Verdict::fail("no staging verification succeeded in this run");
    };
    match StagingVerified::read(&v.id, &v.outputs) {
        Ok(f) if f.rollback_tested => Verdict::pass(match f.rollback_seconds {
            Some(secs) => format!(
                "{} rolled staging back to the previous revision in {secs} s and forward again",
                v.id
            ),
            None => format!(
                "{} rolled staging back to the previous revision and forward again",
                v.id
            ),
        }),
        Ok(f) if f.first_deployment => Verdict::pass(format!(
            "the service's first deployment: {} had no earlier revision to roll back to (undoing it removes it)",
            v.id
        )),
        Ok(_) => Verdict::fail(format!(
            "{} did not rehearse the rollback on staging: production apply needs a tested rollback",
            v.id
        )),
        Err(e) => Verdict::fail(e.to_string()),
    }
}

fn performance_regression(run: &RunState) -> Verdict {
    let Some(v) = succeeded(run, |s| s.role == STAGING_VERIFY).next() else {
        return Verdict::fail("no staging verification succeeded in this run");
    };
    let limit = v
        .params
        .get("max_regression_percent")
        .and_then(Value::as_f64)
        .unwrap_or(20.0);
    match StagingVerified::read(&v.id, &v.outputs) {
        Ok(f) if f.regression_percent <= limit => Verdict::pass(format!(
            "{} % slower than the baseline (limit {limit} %)",
            f.regression_percent
        )),
        Ok(f) => Verdict::fail(format!(
            "{} % slower than the baseline, above the limit of {limit} %",
            f.regression_percent
        )),
        Err(e) => Verdict::fail(e.to_string()),
    }
}

fn image_match(run: &RunState) -> Verdict {
    let Some(build) = succeeded(run, |s| s.role == CONTAINER_BUILD).next() else {
        return Verdict::fail("no image was built in this run");
    };
    let Some(verify) = succeeded(run, |s| s.role == STAGING_VERIFY).next() else {
        return Verdict::fail("no staging verification succeeded in this run");
    };
    let built = match ImageBuilt::read(&build.id, &build.outputs) {
        Ok(f) => f.image_digest,
        Err(e) => return Verdict::fail(e.to_string()),
    };
    match StagingVerified::read(&verify.id, &verify.outputs) {
        Ok(v) if v.image_digest == built => {
            Verdict::pass(format!("production gets {built}, the image verified on staging"))
        }
        Ok(v) => Verdict::fail(format!(
            "{} built {built} but staging verified {}",
            build.id, v.image_digest
        )),
        Err(e) => Verdict::fail(e.to_string()),
    }
}

fn maintenance_window(
    run: &RunState,
    step: &StepState,
    policy: &Policy,
    now: DateTime<Utc>,
) -> (Verdict, Option<(DateTime<Utc>, Overrun)>) {
    let high_risk = matches!(run.event.risk, Risk::High | Risk::Critical);
    let destructive = step.role == DB_MIGRATION && destructive(run);
    if !high_risk && !destructive {
        return (
            Verdict::pass("standard risk and no destructive migration: no window needed"),
            None,
        );
    }
    let why = if high_risk {
        format!("{:?} risk", run.event.risk).to_lowercase()
    } else {
        "destructive migration".to_owned()
    };
    let Some(s) = policy.windows.get(&step.zone) else {
        return (
            Verdict::fail(format!(
                "{why} needs a maintenance window but none is configured for {} (gates.maintenance_windows.{})",
                step.zone, step.zone
            )),
            None,
        );
    };
    match s.state(now) {
        WindowState::Open { closes, .. } => (
            Verdict::pass(format!("{why}: maintenance window open until {}", s.local(closes))),
            Some((closes, s.overrun)),
        ),
        WindowState::Closed { opens: Some(opens) } => (
            Verdict::hold(
                format!("{why}: outside the maintenance window; next opens {}", s.local(opens)),
                Some(opens),
            ),
            None,
        ),
        WindowState::Closed { opens: None } => (
            Verdict::fail(format!(
                "{why}: outside the maintenance window and no window is scheduled in the next two weeks"
            )),
            None,
        ),
    }
}

/// Human approval: enough distinct, unexpired approvals for this step and plan
/// hash; a rejection fails the gate.
fn approval(
    run: &RunState,
    step: &StepState,
    facts: &Facts,
    policy: &Policy,
    now: DateTime<Utc>,
    why: &str,
) -> Verdict {
    let subject = approval_subject(run, step);
    let mine: Vec<&Approval> = facts
        .approvals
        .iter()
        .filter(|a| a.step_id == step.id && a.plan_hash == run.plan_hash && a.subject == subject)
        .collect();
    if let Some(r) = mine.iter().find(|a| a.decision == Decision::Reject) {
        let comment = if r.comment.is_empty() {
            String::new()
        } else {
            format!(": {}", r.comment)
        };
        return Verdict::fail(format!("{REJECTED_BY}{}{comment}", r.approver));
    }
    let mut valid: Vec<&str> = Vec::new();
    let mut expired: Vec<&str> = Vec::new();
    for a in mine.iter().filter(|a| a.decision == Decision::Approve) {
        if policy.approval.four_eyes && own_change(run, &a.approver).is_some() {
            continue;
        }
        if a.expires_at <= now {
            expired.push(&a.approver);
        } else if !valid.contains(&a.approver.as_str()) {
            valid.push(&a.approver);
        }
    }
    let need = policy.approval.required;
    if valid.len() >= need {
        return Verdict::pass(format!("{why}; approved by {}", valid.join(", ")));
    }
    let mut reason = format!(
        "{why}: needs {need} approval{} of plan {}{}, has {}",
        if need == 1 { "" } else { "s" },
        short(&run.plan_hash),
        if policy.approval.four_eyes {
            format!(" (four-eyes: not {})", run.event.requested_by)
        } else {
            String::new()
        },
        if valid.is_empty() {
            "none".to_owned()
        } else {
            valid.join(", ")
        }
    );
    if !expired.is_empty() {
        reason.push_str(&format!("; expired: {}", expired.join(", ")));
    }
    Verdict::approval(reason)
}

/// The seed's "never rename/remove and deploy simultaneously", on the facts the
/// migrations of this run reported: a rename or removal that the deployed
/// commit's code still names fails the run, unless the merge event carries an
/// `additive-first` exception (its reason is in the run's audit log). The
/// db-migration daemon refuses such a migration before applying it; this gate
/// holds the later steps to the same rule whatever the daemon did.
fn additive_first(run: &RunState) -> Verdict {
    let code_ships = run
        .steps
        .iter()
        .any(|s| s.included && (s.role == CONTAINER_BUILD || s.role == PRODUCTION_APPLY));
    let mut in_use = Vec::new();
    let mut removals = 0;
    for s in succeeded(run, |s| s.role == DB_MIGRATION) {
        match MigrationsApplied::read(&s.id, &s.outputs) {
            Ok(m) => {
                removals += m.removals.len();
                in_use.extend(
                    m.in_use()
                        .map(|r| format!("{}: {} (still named in {})", r.tag, r.change, r.used_by.join(", "))),
                );
            }
            Err(e) => return Verdict::fail(e.to_string()),
        }
    }
    let exception = run.event.exceptions.iter().find(|e| e.rule == ADDITIVE_FIRST);
    match (in_use.is_empty(), code_ships, exception) {
        (true, _, _) if removals == 0 => Verdict::pass("no renames or removals in this run's migrations"),
        (true, _, _) => Verdict::pass(format!(
            "{removals} rename(s) or removal(s), none named by the deployed code"
        )),
        (false, false, _) => Verdict::pass(format!(
            "renames or removals still named in code ({}) but no application code ships in this run",
            in_use.join("; ")
        )),
        (false, true, Some(e)) => Verdict::Warn {
            reason: format!(
                "additive-first exception for this deploy ({}): {}",
                e.reason,
                in_use.join("; ")
            ),
        },
        (false, true, None) => Verdict::fail(format!(
            "additive-first: this run renames or removes what the deployed code still names ({}); ship the \
             additive change first and the removal in a later deploy, or give the merge event an \
             additive-first exception with a reason",
            in_use.join("; ")
        )),
    }
}

/// Whether a failed verdict is a human rejection (the step fails with `rejected`).
pub fn is_rejection(v: &GateVerdict) -> bool {
    matches!(&v.verdict, Verdict::Fail { reason } if reason.starts_with(REJECTED_BY))
}

const REJECTED_BY: &str = "rejected by ";

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// Why an approval or rejection is refused before it is recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecisionError {
    #[error("run {run} has no step {step:?}")]
    NoSuchStep { run: Uuid, step: String },
    #[error("step {step:?} is {status} and not awaiting approval")]
    NotAwaiting { step: String, status: String },
    #[error("the approval names plan {given} but the run's plan is {actual}")]
    PlanHash { given: String, actual: String },
    #[error(
        "the approval names saved plan {given}, but step {step:?} now waits for saved plan {actual} (the earlier one went stale and was re-planned)"
    )]
    Subject {
        step: String,
        given: String,
        actual: String,
    },
    #[error(
        "step {step:?} applies saved plan {actual}: an approval must name it (`subject`) to show it is the plan reviewed"
    )]
    SubjectMissing { step: String, actual: String },
    #[error("four-eyes: {who} {relation} and cannot approve it")]
    SelfApproval { who: String, relation: &'static str },
    #[error("{who} already approved step {step:?}; a second approver is needed")]
    AlreadyApproved { who: String, step: String },
}

/// Checks an approval or rejection against the run before it is recorded.
/// An approval or rejection as asked for.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub step: &'a str,
    pub plan_hash: &'a str,
    /// The saved plan the approver looked at, if the request names one; it
    /// must be the one the step waits for.
    pub subject: Option<&'a str>,
    pub who: &'a str,
    pub decision: Decision,
}

pub fn check_decision(
    run: &RunState,
    ask: Ask<'_>,
    facts: &Facts,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Result<(), DecisionError> {
    let Ask {
        step,
        plan_hash,
        subject,
        who,
        decision,
    } = ask;
    let Some(s) = run.steps.iter().find(|s| s.id == step) else {
        return Err(DecisionError::NoSuchStep {
            run: run.id,
            step: step.to_owned(),
        });
    };
    if !s.hold.as_ref().is_some_and(|h| h.approval) {
        return Err(DecisionError::NotAwaiting {
            step: step.to_owned(),
            status: s.status.to_string(),
        });
    }
    if plan_hash != run.plan_hash {
        return Err(DecisionError::PlanHash {
            given: plan_hash.to_owned(),
            actual: run.plan_hash.clone(),
        });
    }
    let actual = approval_subject(run, s);
    match subject {
        Some(given) if given != actual => {
            return Err(DecisionError::Subject {
                step: step.to_owned(),
                given: given.to_owned(),
                actual,
            });
        }
        // An approval names what it approves, so it cannot pass a plan that
        // replaced the one the approver looked at.
        None if decision == Decision::Approve && !actual.is_empty() => {
            return Err(DecisionError::SubjectMissing {
                step: step.to_owned(),
                actual,
            });
        }
        _ => {}
    }
    if decision == Decision::Approve {
        if policy.approval.four_eyes
            && let Some(relation) = own_change(run, who)
        {
            return Err(DecisionError::SelfApproval {
                who: who.to_owned(),
                relation,
            });
        }
        if facts.approvals.iter().any(|a| {
            a.step_id == step
                && a.subject == actual
                && a.approver == who
                && a.decision == Decision::Approve
                && a.expires_at > now
        }) {
            return Err(DecisionError::AlreadyApproved {
                who: who.to_owned(),
                step: step.to_owned(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
