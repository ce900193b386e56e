//! Baton's wire protocol: merge events, step jobs, cancels and step results.
//!
//! Every message is JSON, carries `"v": 1`, and is strict: unknown fields are
//! rejected, so a producer speaking a newer or misspelt dialect fails loudly
//! instead of being half-understood. The JSON Schemas under `shared/schemas/`
//! are generated from these types (see `schema::all`).

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// The only protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Error code of a job a stopping daemon gives back unfinished; the scheduler
/// retries it without counting it against the step's attempts.
pub const HANDED_BACK: &str = "daemon_shutdown";

/// Namespace for deterministic run ids (UUIDv5 of service, environment, commit).
const RUN_NAMESPACE: Uuid = Uuid::from_u128(0x6261_746f_6e2d_7275_6e2d_6e73_0000_0001);

/// Free-form key/value data attached to steps (parameters, outputs).
pub type Fields = Map<String, Value>;

/// Why a message was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("malformed {kind}: {source}")]
    Malformed {
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid {kind}: field `{field}` {problem}")]
    Invalid {
        kind: &'static str,
        field: &'static str,
        problem: String,
    },
    /// PostgreSQL stores no NUL character in text or JSON.
    #[error("invalid {kind}: `{path}` contains the NUL character")]
    Nul { kind: &'static str, path: String },
}

/// Where in `v` a string (or key) holds the NUL character, as `a.b[2].c`.
fn nul_path(v: &Value, path: &str) -> Option<String> {
    let here = || {
        if path.is_empty() {
            "(the message)".to_owned()
        } else {
            path.to_owned()
        }
    };
    match v {
        Value::String(s) => s.contains('\0').then(here),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, x)| nul_path(x, &format!("{path}[{i}]"))),
        Value::Object(m) => m.iter().find_map(|(k, x)| {
            let p = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            if k.contains('\0') { Some(p) } else { nul_path(x, &p) }
        }),
        _ => None,
    }
}

impl ProtocolError {
    fn invalid(kind: &'static str, field: &'static str, problem: impl Into<String>) -> Self {
        Self::Invalid {
            kind,
            field,
            problem: problem.into(),
        }
    }

    /// A short machine-readable reason, used as the dead-letter reason code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed { .. } => "malformed",
            Self::Invalid { .. } | Self::Nul { .. } => "invalid",
        }
    }
}

/// A message type that is parsed strictly and then checked for meaning.
pub trait Message: Sized + Serialize + for<'de> Deserialize<'de> {
    /// Human name used in errors ("merge event", "step job", ...).
    const KIND: &'static str;

    /// Semantic checks beyond the JSON shape.
    fn validate(&self) -> Result<(), ProtocolError>;

    /// Parses and validates a message body.
    fn parse(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let msg: Self = serde_json::from_slice(bytes).map_err(|source| ProtocolError::Malformed {
            kind: Self::KIND,
            source,
        })?;
        // A NUL can only arrive escaped; look for where only when it is there.
        if bytes.windows(6).any(|w| w.eq_ignore_ascii_case(b"\\u0000")) {
            let value = serde_json::to_value(&msg).unwrap_or(Value::Null);
            if let Some(path) = nul_path(&value, "") {
                return Err(ProtocolError::Nul { kind: Self::KIND, path });
            }
        }
        msg.validate()?;
        Ok(msg)
    }

    /// Serialises the message; the types here always serialise.
    fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("protocol messages always serialise")
    }
}

fn check_version(kind: &'static str, v: u32) -> Result<(), ProtocolError> {
    if v == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(ProtocolError::invalid(
            kind,
            "v",
            format!("is {v}, this build speaks version {PROTOCOL_VERSION}"),
        ))
    }
}

/// Names of services, environments, zones and roles: lowercase, digits, `-`, `_`, `.`.
pub fn check_name(kind: &'static str, field: &'static str, value: &str) -> Result<(), ProtocolError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
        && value.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::invalid(
            kind,
            field,
            format!(
                "is {value:?}; expected 1-63 characters of a-z, 0-9, '-', '_', '.' starting with a letter or digit"
            ),
        ))
    }
}

fn check_non_empty(kind: &'static str, field: &'static str, value: &str) -> Result<(), ProtocolError> {
    if value.trim().is_empty() {
        Err(ProtocolError::invalid(kind, field, "must not be empty"))
    } else {
        Ok(())
    }
}

/// How risky a change is; high and critical changes wait for maintenance windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Risk {
    Standard,
    High,
    Critical,
}

/// One approval on the pull request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PrApproval {
    pub by: String,
    pub at: DateTime<Utc>,
}

/// The pull request that was merged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PullRequest {
    pub number: u64,
    pub title: String,
    pub author: String,
    #[serde(default)]
    pub approvals: Vec<PrApproval>,
}

/// What CI sends when code is merged: the input of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeEvent {
    /// Protocol version, always 1.
    pub v: u32,
    pub service: String,
    /// Target environment of the deploy (e.g. `production`).
    pub environment: String,
    /// Repository the commit belongs to, e.g. `git@example.org:shop/api.git`.
    pub repository: String,
    /// Full 40-character hexadecimal commit SHA of the merge commit.
    pub commit_sha: String,
    pub pull_request: PullRequest,
    /// Paths changed by the merge, relative to the repository root.
    pub changed_paths: Vec<String>,
    /// Extra facts for `when` conditions, e.g. `destructive_migration`.
    #[serde(default)]
    pub flags: Vec<String>,
    pub risk: Risk,
    /// Who or what asked for the deploy.
    pub requested_by: String,
    /// Link to the CI run that produced the event.
    pub ci_run_url: String,
    /// Rules this deploy is explicitly excepted from, each with its reason; the
    /// scheduler records them in the audit log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exceptions: Vec<RuleException>,
}

/// An explicit exception to one rule for one deploy (e.g. `additive-first` for a
/// removal whose last user ships in the same deploy and tolerates it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleException {
    /// The rule, e.g. `additive-first`.
    pub rule: String,
    /// Why the exception is safe; required.
    pub reason: String,
}

/// Rule: never rename or remove what the deployed code still uses.
pub const ADDITIVE_FIRST: &str = "additive-first";

/// Rule: journal entries older than the newest applied migration are refused
/// (drizzle-orm would skip them for ever); excepted, the deploy applies them.
pub const APPLY_OLDER_MIGRATIONS: &str = "apply-older-migrations";

/// The rules a merge event may carry an exception to.
pub const EXCEPTABLE_RULES: &[&str] = &[ADDITIVE_FIRST, APPLY_OLDER_MIGRATIONS];

impl MergeEvent {
    /// The run this event becomes: the same (service, environment, commit) is always one run.
    pub fn run_id(&self) -> Uuid {
        let key = format!("{}\0{}\0{}", self.service, self.environment, self.commit_sha);
        Uuid::new_v5(&RUN_NAMESPACE, key.as_bytes())
    }
}

impl Message for MergeEvent {
    const KIND: &'static str = "merge event";

    fn validate(&self) -> Result<(), ProtocolError> {
        let k = Self::KIND;
        check_version(k, self.v)?;
        check_name(k, "service", &self.service)?;
        check_name(k, "environment", &self.environment)?;
        check_non_empty(k, "repository", &self.repository)?;
        if self.commit_sha.len() != 40
            || !self
                .commit_sha
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        {
            return Err(ProtocolError::invalid(
                k,
                "commit_sha",
                format!("is {:?}; expected 40 lowercase hexadecimal characters", self.commit_sha),
            ));
        }
        if self.pull_request.number == 0 {
            return Err(ProtocolError::invalid(k, "pull_request.number", "must be positive"));
        }
        check_non_empty(k, "pull_request.title", &self.pull_request.title)?;
        check_non_empty(k, "pull_request.author", &self.pull_request.author)?;
        for a in &self.pull_request.approvals {
            check_non_empty(k, "pull_request.approvals[].by", &a.by)?;
        }
        for p in &self.changed_paths {
            if p.is_empty() || p.starts_with('/') || p.split('/').any(|seg| seg == "..") {
                return Err(ProtocolError::invalid(
                    k,
                    "changed_paths",
                    format!("contains {p:?}; paths must be relative to the repository root without '..'"),
                ));
            }
        }
        for f in &self.flags {
            check_name(k, "flags", f)?;
        }
        for e in &self.exceptions {
            if e.rule != ADDITIVE_FIRST {
                return Err(ProtocolError::invalid(
                    k,
                    "exceptions[].rule",
                    format!(
                        "is {:?}; the only rule a deploy can be excepted from is {ADDITIVE_FIRST:?}",
                        e.rule
                    ),
                ));
            }
            if e.reason.trim().is_empty() {
                return Err(ProtocolError::invalid(
                    k,
                    "exceptions[].reason",
                    "must say why the exception is safe",
                ));
            }
        }
        check_non_empty(k, "requested_by", &self.requested_by)?;
        check_non_empty(k, "ci_run_url", &self.ci_run_url)?;
        Ok(())
    }
}

/// Whether a job does a step's work or undoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Execute,
    Compensate,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Execute => "execute",
            Self::Compensate => "compensate",
        }
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The deploy a job belongs to, as far as a daemon needs to know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Deploy {
    pub service: String,
    pub environment: String,
    pub repository: String,
    pub commit_sha: String,
    pub risk: Risk,
    /// The merge event's exceptions to rules (see [`MergeEvent::exceptions`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exceptions: Vec<RuleException>,
}

impl Deploy {
    /// The exception to `rule` this deploy carries, if any.
    pub fn exception(&self, rule: &str) -> Option<&RuleException> {
        self.exceptions.iter().find(|e| e.rule == rule)
    }
}

/// One attempt at executing or compensating one step, sent to `baton.<zone>.<role>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepJob {
    pub v: u32,
    pub message_id: Uuid,
    pub run_id: Uuid,
    pub step_id: String,
    /// Fencing number: only results naming the step's current attempt count.
    pub attempt: u32,
    pub kind: JobKind,
    pub zone: String,
    pub role: String,
    pub action: String,
    #[serde(default)]
    pub params: Fields,
    /// Outputs of the steps this one needs, by step id.
    #[serde(default)]
    pub inputs: BTreeMap<String, Fields>,
    /// For compensation: the outputs the step produced when it executed.
    #[serde(default)]
    pub own_outputs: Fields,
    pub deploy: Deploy,
    pub issued_at: DateTime<Utc>,
    /// A daemon must not start the job after this instant (it is dead-lettered as expired).
    pub not_after: DateTime<Utc>,
    /// The step's time budget ends here; the daemon cancels its work at this point.
    pub deadline: DateTime<Utc>,
    /// How often the daemon must report a heartbeat while the job runs.
    pub heartbeat_ms: u64,
    /// After this long without a heartbeat the scheduler presumes the attempt lost
    /// and may start another. A daemon that finds itself stalled that long (stopped,
    /// frozen) abandons the job instead of finishing it behind a newer attempt.
    /// 0: not told.
    #[serde(default)]
    pub lease_ms: u64,
    /// W3C trace context of the step span.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Detached signature over the canonical job bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl Message for StepJob {
    const KIND: &'static str = "step job";

    fn validate(&self) -> Result<(), ProtocolError> {
        let k = Self::KIND;
        check_version(k, self.v)?;
        check_non_empty(k, "step_id", &self.step_id)?;
        check_name(k, "zone", &self.zone)?;
        check_name(k, "role", &self.role)?;
        check_non_empty(k, "action", &self.action)?;
        if self.attempt == 0 {
            return Err(ProtocolError::invalid(k, "attempt", "must be at least 1"));
        }
        if self.heartbeat_ms == 0 {
            return Err(ProtocolError::invalid(k, "heartbeat_ms", "must be positive"));
        }
        if self.not_after < self.issued_at || self.deadline < self.issued_at {
            return Err(ProtocolError::invalid(
                k,
                "not_after",
                "and deadline must not precede issued_at",
            ));
        }
        Ok(())
    }
}

/// A job parameter that does not fit the type the role reads it as.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("step {step}: param `{key}`: {problem}")]
pub struct ParamError {
    pub step: String,
    /// The parameter's path (`retention.daily`), or `params` for the whole table.
    pub key: String,
    pub problem: String,
}

impl StepJob {
    /// A name for the job's (run, step), usable in Kubernetes object names
    /// and file names: `<run id>.<step id>`, lowercase, any character other
    /// than letters, digits, `.` and `-` as `-`.
    pub fn key(&self) -> String {
        let step: String = self
            .step_id
            .to_lowercase()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        format!("{}.{step}", self.run_id)
    }

    /// The job's parameters as the role's typed parameter struct. Give `T`
    /// `#[serde(deny_unknown_fields)]` so a misspelt parameter is refused, and
    /// `#[serde(default)]` for the optional ones. The error names the step and key.
    pub fn params<T: serde::de::DeserializeOwned>(&self) -> Result<T, ParamError> {
        let value = Value::Object(self.params.clone());
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            ParamError {
                step: self.step_id.clone(),
                key: if path == "." { "params".to_owned() } else { path },
                problem: e.into_inner().to_string(),
            }
        })
    }

    /// A valid job for tests and tools: execute `action` of `role` in `zone`
    /// for a fresh run of `shop-api`, due now with a ten-minute budget. Change
    /// any field afterwards.
    pub fn example(zone: &str, role: &str, action: &str) -> Self {
        let now = Utc::now();
        Self {
            v: PROTOCOL_VERSION,
            message_id: Uuid::new_v4(),
            run_id: Uuid::new_v4(),
            step_id: format!("{role}.{zone}"),
            attempt: 1,
            kind: JobKind::Execute,
            zone: zone.to_owned(),
            role: role.to_owned(),
            action: action.to_owned(),
            params: Fields::new(),
            inputs: BTreeMap::new(),
            own_outputs: Fields::new(),
            deploy: Deploy {
                service: "shop-api".to_owned(),
                environment: zone.to_owned(),
                repository: String::new(),
                commit_sha: "0123456789abcdef0123456789abcdef01234567".to_owned(),
                risk: Risk::Standard,
                exceptions: Vec::new(),
            },
            issued_at: now,
            not_after: now + chrono::Duration::minutes(10),
            deadline: now + chrono::Duration::minutes(10),
            heartbeat_ms: 1000,
            lease_ms: 0,
            traceparent: None,
            signature: None,
        }
    }

    /// With parameter `key` set to `value`.
    pub fn with_param(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.params.insert(key.to_owned(), value.into());
        self
    }

    /// With the outputs of input step `step`.
    pub fn with_input(mut self, step: &str, outputs: Fields) -> Self {
        self.inputs.insert(step.to_owned(), outputs);
        self
    }
}

/// A serialisable value (a role's typed outputs or report) as step outputs.
///
/// # Errors
/// When `value` does not serialise to a JSON object.
pub fn to_fields<T: Serialize + ?Sized>(value: &T) -> Result<Fields, StepError> {
    match serde_json::to_value(value) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(StepError::fatal(
            "internal",
            format!("step outputs must be a JSON object, not {other}"),
        )),
        Err(e) => Err(StepError::fatal(
            "internal",
            format!("step outputs do not serialise: {e}"),
        )),
    }
}

/// Asks the daemons of one zone and role to stop an attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelJob {
    pub v: u32,
    pub message_id: Uuid,
    pub run_id: Uuid,
    pub step_id: String,
    pub attempt: u32,
    pub zone: String,
    pub role: String,
    pub reason: String,
    pub issued_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl Message for CancelJob {
    const KIND: &'static str = "cancel";

    fn validate(&self) -> Result<(), ProtocolError> {
        check_version(Self::KIND, self.v)?;
        check_name(Self::KIND, "zone", &self.zone)?;
        check_name(Self::KIND, "role", &self.role)
    }
}

/// A daemon's report that it refused a message (rejected it to the broker's
/// dead-lettering, executed nothing). Signed, it is the scheduler's only word
/// of why: the dead letter itself carries no claim of a daemon's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    pub v: u32,
    pub message_id: Uuid,
    pub daemon: String,
    pub zone: String,
    pub role: String,
    /// The queue the refused message came from.
    pub queue: String,
    pub reason: String,
    /// The refused message's own id, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_message_id: Option<String>,
    /// The refused message's bytes in hex, up to [`Refusal::MAX_BODY`]: the
    /// scheduler ends an attempt on a refusal only when these are the job it
    /// signed itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_body: Option<String>,
    pub at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl Refusal {
    /// Largest refused body a notice carries (step jobs are a few KiB).
    pub const MAX_BODY: usize = 64 * 1024;

    /// The refused bytes, if the notice carries them.
    pub fn refused_bytes(&self) -> Option<Vec<u8>> {
        self.refused_body.as_deref().and_then(|h| hex::decode(h).ok())
    }
}

impl Message for Refusal {
    const KIND: &'static str = "refusal";

    fn validate(&self) -> Result<(), ProtocolError> {
        check_version(Self::KIND, self.v)?;
        check_non_empty(Self::KIND, "reason", &self.reason)
    }
}

/// What a result reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ResultStatus {
    /// The daemon holds the job but has not started it yet.
    Accepted,
    /// Work began; the lease runs from here.
    Started,
    /// Still working; extends the lease.
    Heartbeat,
    Succeeded,
    Failed,
}

impl ResultStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Started => "started",
            Self::Heartbeat => "heartbeat",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }
}

/// Why a step failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepError {
    /// Stable machine-readable code, e.g. `migration_failed`, `cancelled`, `lease_expired`.
    pub code: String,
    pub message: String,
    /// Whether trying again may succeed; only retryable errors are retried.
    pub retryable: bool,
    /// What a failed attempt reports all the same (the plan it made and that
    /// now waits for approval): the daemon runtime sends it as the result's
    /// `outputs`, never inside the error.
    #[serde(skip)]
    #[schemars(skip)]
    pub outputs: Fields,
}

/// The code of a failed attempt that made something new to approve (a stale
/// Terraform plan re-planned): the scheduler gives its step back to its gates
/// with the attempt's outputs instead of failing it.
pub const APPROVAL_AGAIN: &str = "approval_required_again";

impl StepError {
    pub fn new(code: impl Into<String>, message: impl Into<String>, retryable: bool) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            retryable,
            outputs: Fields::new(),
        }
    }

    /// This error, reporting `outputs` with it.
    pub fn with_outputs(mut self, outputs: Fields) -> Self {
        self.outputs = outputs;
        self
    }

    pub fn fatal(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(code, message, false)
    }

    pub fn retryable(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(code, message, true)
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for StepError {}

/// A daemon's report about one attempt, sent to `baton.results`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepResult {
    pub v: u32,
    pub message_id: Uuid,
    pub run_id: Uuid,
    pub step_id: String,
    pub attempt: u32,
    pub kind: JobKind,
    pub zone: String,
    pub role: String,
    /// Which daemon instance reports.
    pub daemon: String,
    pub status: ResultStatus,
    pub at: DateTime<Utc>,
    #[serde(default)]
    pub outputs: Fields,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<StepError>,
    /// On an outcome: when the attempt started, in case `started` arrives late.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl Message for StepResult {
    const KIND: &'static str = "step result";

    fn validate(&self) -> Result<(), ProtocolError> {
        let k = Self::KIND;
        check_version(k, self.v)?;
        check_non_empty(k, "step_id", &self.step_id)?;
        check_name(k, "zone", &self.zone)?;
        check_name(k, "role", &self.role)?;
        match (self.status, &self.error) {
            (ResultStatus::Failed, None) => {
                Err(ProtocolError::invalid(k, "error", "is required when status is failed"))
            }
            (ResultStatus::Failed, Some(_)) => Ok(()),
            (_, Some(_)) => Err(ProtocolError::invalid(
                k,
                "error",
                "is only allowed when status is failed",
            )),
            (_, None) => Ok(()),
        }
    }
}

impl StepResult {
    /// A result for `job` with the given status, stamped now.
    pub fn for_job(job: &StepJob, daemon: &str, status: ResultStatus) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            message_id: Uuid::new_v4(),
            run_id: job.run_id,
            step_id: job.step_id.clone(),
            attempt: job.attempt,
            kind: job.kind,
            zone: job.zone.clone(),
            role: job.role.clone(),
            daemon: daemon.to_owned(),
            status,
            at: Utc::now(),
            outputs: Fields::new(),
            error: None,
            started_at: None,
            signature: None,
        }
    }
}

/// JSON Schemas of every message, as `(file name, schema)`.
pub mod schema {
    use super::*;

    pub fn all() -> Vec<(&'static str, Value)> {
        vec![
            (
                "merge-event.v1.json",
                serde_json::to_value(schemars::schema_for!(MergeEvent)).expect("schema"),
            ),
            (
                "step-job.v1.json",
                serde_json::to_value(schemars::schema_for!(StepJob)).expect("schema"),
            ),
            (
                "cancel.v1.json",
                serde_json::to_value(schemars::schema_for!(CancelJob)).expect("schema"),
            ),
            (
                "step-result.v1.json",
                serde_json::to_value(schemars::schema_for!(StepResult)).expect("schema"),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample_event() -> Value {
        serde_json::json!({
            "v": 1,
            "service": "shop-api",
            "environment": "production",
            "repository": "git@example.org:shop/api.git",
            "commit_sha": "0123456789abcdef0123456789abcdef01234567",
            "pull_request": {"number": 42, "title": "Add orders", "author": "dev",
                "approvals": [{"by": "marta", "at": "2026-11-26T09:00:00Z"}]},
            "changed_paths": ["src/main.ts"],
            "risk": "standard",
            "requested_by": "ci",
            "ci_run_url": "https://ci.example.org/runs/1"
        })
    }

    #[test]
    fn merge_event_round_trips_and_has_a_stable_run_id() {
        let bytes = serde_json::to_vec(&sample_event()).unwrap();
        let ev = MergeEvent::parse(&bytes).unwrap();
        assert_eq!(ev.run_id(), MergeEvent::parse(&ev.to_bytes()).unwrap().run_id());
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        let mut v = sample_event();
        v["colour"] = "blue".into();
        let err = MergeEvent::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn a_nul_character_anywhere_is_refused_by_its_path() {
        let mut v = sample_event();
        v["pull_request"]["title"] = "drop\u{0}tables".into();
        let err = MergeEvent::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid merge event: `pull_request.title` contains the NUL character"
        );
        let mut v = sample_event();
        v["changed_paths"] = serde_json::json!(["src/a.ts", "a\u{0}"]);
        let err = MergeEvent::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.to_string().contains("`changed_paths[1]`"), "{err}");
        // An escaped backslash followed by "u0000" is no NUL.
        let mut v = sample_event();
        v["pull_request"]["title"] = "C:\\u0000".into();
        assert!(MergeEvent::parse(&serde_json::to_vec(&v).unwrap()).is_ok());
    }

    #[test]
    fn short_commit_sha_is_named() {
        let mut v = sample_event();
        v["commit_sha"] = "abc123".into();
        let err = MergeEvent::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.to_string().contains("commit_sha"), "{err}");
    }

    #[test]
    fn wrong_version_is_refused() {
        let mut v = sample_event();
        v["v"] = 2.into();
        let err = MergeEvent::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.to_string().contains("version 1"), "{err}");
    }

    #[test]
    fn failed_result_requires_an_error() {
        let r = serde_json::json!({
            "v": 1, "message_id": Uuid::new_v4(), "run_id": Uuid::new_v4(), "step_id": "build",
            "attempt": 1, "kind": "execute", "zone": "ci", "role": "container-build", "daemon": "d1",
            "status": "failed", "at": "2026-11-26T09:00:00Z"
        });
        let err = StepResult::parse(&serde_json::to_vec(&r).unwrap()).unwrap_err();
        assert!(err.to_string().contains("error"), "{err}");
    }

    /// The checked-in schemas are exactly what the types generate.
    /// Regenerate with `BATON_BLESS=1 cargo test -p baton-shared schemas`.
    #[test]
    fn schemas_are_up_to_date() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let bless = std::env::var_os("BATON_BLESS").is_some();
        for (name, schema) in schema::all() {
            let text = serde_json::to_string_pretty(&schema).unwrap() + "\n";
            let path = dir.join(name);
            if bless {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &text).unwrap();
            }
            let on_disk = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{} missing ({e}); run with BATON_BLESS=1", path.display()));
            assert_eq!(on_disk, text, "{name} is stale; run with BATON_BLESS=1");
        }
    }
}
