//! Pipeline definitions: the TOML file that declares a deployment pipeline's steps, parsed
//! and validated into a [`Pipeline`] the planner turns into plans.
//!
//! # Format
//!
//! ```toml
//! [pipeline]
//! name = "seed"
//! # Environments in promotion order. A deploy to an environment skips the steps of every
//! # environment after it; zones not listed here (e.g. "ci") are not environments and
//! # always take part.
//! promotion = ["staging", "production"]
//! typical_minutes = [30, 60]  # optional: how long a standard run usually takes; the web
//!                             # view and `baton runs show` mark a run over the upper bound
//! critical_minutes = 120      # optional: the budget of a run whose risk is critical
//! orchestration_minutes = 1   # optional: the scheduler's usual time from a run's start to
//!                             # its first dispatch, shown and marked like a step's
//!
//! [defaults]                  # optional; applies to every step that does not say otherwise
//! timeout_secs = 1800         # built-in default 1800
//! retry = { max_attempts = 3, initial_backoff_ms = 1000, max_backoff_ms = 60000, multiplier = 2.0 }
//!
//! [[step]]
//! id = "db.production"        # unique; a-z, 0-9, '-', '_', '.'
//! role = "db-migration"       # a role of baton_shared::roles
//! zone = "production"         # any zone name (a-z, 0-9, '-', '_'); jobs go to baton.<zone>.<role>
//! action = "migrate"          # what the role daemon does
//! needs = ["db.staging", "backup.*"]  # step ids or globs over step ids (never the step itself)
//! when = { paths = ["drizzle/migrations/**"], except = [], flags = ["destructive_migration"] }
//! gates = ["backup-verified"] # step gates, one of KNOWN_GATES
//! timeout_secs = 600          # optional, else [defaults]
//! typical_minutes = [2, 10]   # optional: the step's usual duration, shown against the actual
//!                             # one; a step over the upper bound is marked and counted
//! retry = { max_attempts = 5 } # optional; fields left out come from [defaults]
//! compensate = "rollback"     # optional: the action that undoes the step
//! on_failure = "review"       # optional, default "rollback": if the step fails for good, the run
//!                             # is not rolled back but ends `failed`, flagged for rollback review
//!                             # (only for steps nothing else needs)
//! restore_from_backup = true  # optional: if the compensation reports `irreversible` (no down
//!                             # migration) or `rollback_failed` (the down failed), restore
//!                             # the zone's database from this run's pre-deploy backup (a
//!                             # backup@<same zone> step with action pre-deploy, in `needs`)
//! params = { soak_minutes = 15 }  # optional free-form parameters sent with the job
//! ```
//!
//! `when` is optional: a step without it always runs. Otherwise the step runs if a changed
//! path matches one of `paths` and none of `except`, or if one of `flags` is among the merge
//! event's flags. Globs use `/` as a separator that `*` does not cross (`**` does), so
//! `**/*.tf` matches `main.tf` and `infra/db/main.tf`, while `src/*` does not match
//! `src/a/b.ts`.
//!
//! Every key is checked: a misspelt key is an error naming it, and validation errors name
//! the step and the problem. In a [`Pipeline`], `needs` globs are already expanded to
//! concrete step ids in pipeline order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_shared::protocol::Fields;
use globset::{Glob, GlobBuilder, GlobMatcher};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Gates a step may ask for, checked before the step is dispatched. Run-wide gates (merge
/// approval, previous deployment in progress, active incident) apply to every run and are
/// not listed on steps.
pub const KNOWN_GATES: &[&str] = &[
    "backup-verified",
    "blast-radius",
    "staging-soak",
    "rollback-tested",
    "performance-regression",
    "image-match",
    "maintenance-window",
    "human-approval",
    "additive-first",
];

/// The shipped default pipeline, the seed's.
pub const SEED_TOML: &str = include_str!("../pipelines/seed.toml");

const DEFAULT_TIMEOUT_SECS: u64 = 1800;

/// Why a pipeline definition was refused.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot read pipeline {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pipeline {}: {source}", path.display())]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<PipelineError>,
    },
    #[error("invalid toml at line {line}, column {column}: {message}")]
    Toml {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{at}: {message}")]
    Invalid { at: String, message: String },
    #[error("{at}: unknown key {key:?} (known keys: {})", known.join(", "))]
    UnknownKey {
        at: String,
        key: String,
        known: Vec<&'static str>,
    },
    #[error("pipeline has no steps")]
    Empty,
    #[error("[pipeline]: promotion lists no environments")]
    EmptyPromotion,
    #[error("[pipeline]: environment {environment:?} appears twice in promotion")]
    DuplicateEnvironment { environment: String },
    #[error("{at}: invalid {what} {value:?} (expected {expected})")]
    InvalidName {
        at: String,
        what: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("step {step:?}: duplicate step id")]
    DuplicateStep { step: String },
    #[error("step {step:?}: unknown role {role:?} (known roles: {})", baton_shared::roles::names().collect::<Vec<_>>().join(", "))]
    UnknownRole { step: String, role: String },
    #[error("step {step:?}: unknown gate {gate:?} (known gates: {})", KNOWN_GATES.join(", "))]
    UnknownGate { step: String, gate: String },
    #[error("step {step:?}: unknown need {need:?} (it matches no other step)")]
    UnknownNeed { step: String, need: String },
    #[error("step {step:?}: bad glob {glob:?} in {field}: {message}")]
    BadGlob {
        step: String,
        field: &'static str,
        glob: String,
        message: String,
    },
    #[error("step {step:?}: needs form a cycle: {}", cycle.join(" -> "))]
    Cycle { step: String, cycle: Vec<String> },
    #[error("step {step:?}: when has neither paths nor flags, so the step could never run")]
    EmptyWhen { step: String },
    #[error("{at}: timeout_secs must be positive")]
    ZeroTimeout { at: String },
    #[error("{at}: retry.max_attempts must be at least 1")]
    ZeroAttempts { at: String },
    #[error("{at}: retry {problem}")]
    BadRetry { at: String, problem: String },
    #[error("step {step:?}: params.{key} {problem}")]
    BadParam { step: String, key: String, problem: String },
}

/// How often and how patiently a step is retried after a retryable failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in total, the first included.
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff_ms: 1000,
            max_backoff_ms: 60_000,
            multiplier: 2.0,
        }
    }
}

impl RetryPolicy {
    /// The wait before the next attempt once `failed_attempts` (at least 1) have failed:
    /// `initial * multiplier^(failed_attempts - 1)`, capped at `max_backoff_ms`.
    pub fn backoff(&self, failed_attempts: u32) -> Duration {
        let exponent = i32::try_from(failed_attempts.saturating_sub(1)).unwrap_or(i32::MAX);
        let max = self.max_backoff_ms as f64;
        // f64::min returns the cap for NaN and infinity, so absurd policies cannot overflow.
        let ms = (self.initial_backoff_ms as f64 * self.multiplier.powi(exponent)).min(max);
        Duration::from_millis(ms.max(0.0) as u64)
    }

    fn check(&self, at: &str) -> Result<(), PipelineError> {
        let bad = |problem: &str| PipelineError::BadRetry {
            at: at.to_owned(),
            problem: problem.to_owned(),
        };
        if self.max_attempts == 0 {
            return Err(PipelineError::ZeroAttempts { at: at.to_owned() });
        }
        if !self.multiplier.is_finite() || self.multiplier < 1.0 {
            return Err(bad("multiplier must be a finite number of at least 1.0"));
        }
        if self.initial_backoff_ms > self.max_backoff_ms {
            return Err(bad("initial_backoff_ms must not exceed max_backoff_ms"));
        }
        Ok(())
    }
}

/// When a step takes part in a plan; see the module docs for the semantics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct When {
    pub paths: Vec<String>,
    pub except: Vec<String>,
    pub flags: Vec<String>,
}

/// One step of a pipeline, with defaults applied and `needs` expanded to step ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepDef {
    pub id: String,
    pub role: String,
    pub zone: String,
    pub action: String,
    pub needs: Vec<String>,
    pub when: Option<When>,
    pub gates: Vec<String>,
    pub timeout_secs: u64,
    pub retry: RetryPolicy,
    pub compensate: Option<String>,
    #[serde(default)]
    pub restore_from_backup: bool,
    /// A failure of this step flags the run for rollback review instead of rolling it back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub review_on_failure: bool,
    pub params: Fields,
    /// The step's usual duration in minutes, `[low, high]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typical_minutes: Option<[u32; 2]>,
}

/// A validated pipeline definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    pub name: String,
    /// Environments in promotion order.
    pub promotion: Vec<String>,
    pub steps: Vec<StepDef>,
    /// How long a standard run usually takes, in minutes, `[low, high]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typical_minutes: Option<[u32; 2]>,
    /// The budget of a run whose risk is critical, in minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical_minutes: Option<u32>,
    /// The scheduler's usual time from a run's start to its first dispatch, in minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orchestration_minutes: Option<u32>,
}

impl Pipeline {
    /// Parses and validates a pipeline definition.
    pub fn from_toml(text: &str) -> Result<Pipeline, PipelineError> {
        let table: toml::Table = text.parse().map_err(|e| toml_error(text, &e))?;
        check_keys(&table)?;
        let pipeline = RawPipeline::from_table(table)?.into_pipeline()?;
        pipeline.validate()?;
        Ok(pipeline)
    }

    /// Reads, parses and validates a pipeline file; errors name the file.
    pub fn load(path: &Path) -> Result<Pipeline, PipelineError> {
        let text = std::fs::read_to_string(path).map_err(|source| PipelineError::Read {
            path: path.to_owned(),
            source,
        })?;
        Pipeline::from_toml(&text).map_err(|e| PipelineError::InFile {
            path: path.to_owned(),
            source: Box::new(e),
        })
    }

    /// The shipped default pipeline (`pipelines/seed.toml`).
    ///
    /// Panics only if the shipped file is invalid, which the unit tests rule out.
    pub fn seed() -> Pipeline {
        Pipeline::from_toml(SEED_TOML).unwrap_or_else(|e| panic!("shipped pipelines/seed.toml is invalid: {e}"))
    }

    pub fn step(&self, id: &str) -> Option<&StepDef> {
        self.steps.iter().find(|s| s.id == id)
    }

    /// How long a run of this risk should take at most: `critical_minutes` for a
    /// critical change (else the standard bound), the upper `typical_minutes` otherwise.
    pub fn budget_minutes(&self, risk: &str) -> Option<u32> {
        let standard = self.typical_minutes.map(|[_, high]| high);
        if risk == "critical" {
            self.critical_minutes.or(standard)
        } else {
            standard
        }
    }

    /// Every `(zone, role)` pair a run of this pipeline may send jobs to; each needs a queue
    /// and a daemon.
    pub fn zone_roles(&self) -> BTreeSet<(String, String)> {
        self.steps.iter().map(|s| (s.zone.clone(), s.role.clone())).collect()
    }

    /// SHA-256 (hex) of the canonical JSON of the definition, so a plan records exactly
    /// which definition produced it.
    pub fn hash(&self) -> String {
        canonical_sha256(self)
    }

    /// Checks everything that can be checked on the value itself. [`Pipeline::from_toml`]
    /// calls it; the planner calls it too, so a pipeline built in code cannot loop the
    /// planner or reach unknown steps.
    pub fn validate(&self) -> Result<(), PipelineError> {
        check_name("[pipeline]", "pipeline name", &self.name, NameKind::Dotted)?;
        if self.promotion.is_empty() {
            return Err(PipelineError::EmptyPromotion);
        }
        let mut environments = BTreeSet::new();
        for env in &self.promotion {
            check_name("[pipeline]", "environment", env, NameKind::Plain)?;
            if !environments.insert(env.as_str()) {
                return Err(PipelineError::DuplicateEnvironment {
                    environment: env.clone(),
                });
            }
        }
        check_typical("[pipeline]", self.typical_minutes)?;
        for (key, value) in [
            ("critical_minutes", self.critical_minutes),
            ("orchestration_minutes", self.orchestration_minutes),
        ] {
            if value == Some(0) {
                return Err(PipelineError::Invalid {
                    at: "[pipeline]".to_owned(),
                    message: format!("{key} must be at least 1"),
                });
            }
        }
        if self.steps.is_empty() {
            return Err(PipelineError::Empty);
        }
        let mut ids = BTreeSet::new();
        for step in &self.steps {
            step.validate()?;
            if !ids.insert(step.id.as_str()) {
                return Err(PipelineError::DuplicateStep { step: step.id.clone() });
            }
        }
        for step in &self.steps {
            for need in &step.needs {
                if need == &step.id {
                    return Err(PipelineError::Cycle {
                        step: step.id.clone(),
                        cycle: vec![step.id.clone(), step.id.clone()],
                    });
                }
                if !ids.contains(need.as_str()) {
                    return Err(PipelineError::UnknownNeed {
                        step: step.id.clone(),
                        need: need.clone(),
                    });
                }
            }
            if step.review_on_failure
                && let Some(dependent) = self.steps.iter().find(|d| d.needs.contains(&step.id))
            {
                return Err(PipelineError::Invalid {
                    at: step_at(&step.id),
                    message: format!(
                        "on_failure = \"review\" is only for steps nothing needs, and step {} needs it",
                        dependent.id
                    ),
                });
            }
            if step.restore_from_backup
                && !self.steps.iter().any(|b| {
                    b.role == baton_shared::roles::BACKUP
                        && b.action == "pre-deploy"
                        && b.zone == step.zone
                        && step.needs.contains(&b.id)
                })
            {
                return Err(PipelineError::Invalid {
                    at: step_at(&step.id),
                    message: format!(
                        "restore_from_backup needs a pre-deploy backup of zone {} (role backup, action pre-deploy) among its needs",
                        step.zone
                    ),
                });
            }
        }
        self.check_acyclic()
    }

    /// Depth-first search in pipeline order, so the reported cycle is deterministic.
    fn check_acyclic(&self) -> Result<(), PipelineError> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            OnPath,
            Done,
        }
        let index: HashMap<&str, usize> = self.steps.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
        let mut marks = vec![Mark::New; self.steps.len()];
        for root in 0..self.steps.len() {
            if marks[root] != Mark::New {
                continue;
            }
            // Explicit stack of (step, next need to visit) instead of recursion.
            let mut path: Vec<(usize, usize)> = vec![(root, 0)];
            marks[root] = Mark::OnPath;
            while let Some(&mut (node, ref mut next)) = path.last_mut() {
                let needs = &self.steps[node].needs;
                if *next == needs.len() {
                    marks[node] = Mark::Done;
                    path.pop();
                    continue;
                }
                let need = index[needs[*next].as_str()];
                *next += 1;
                match marks[need] {
                    Mark::Done => {}
                    Mark::New => {
                        marks[need] = Mark::OnPath;
                        path.push((need, 0));
                    }
                    Mark::OnPath => {
                        let start = path.iter().position(|&(n, _)| n == need).unwrap_or(0);
                        let mut cycle: Vec<String> =
                            path[start..].iter().map(|&(n, _)| self.steps[n].id.clone()).collect();
                        cycle.push(self.steps[need].id.clone());
                        return Err(PipelineError::Cycle {
                            step: self.steps[need].id.clone(),
                            cycle,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

impl StepDef {
    fn validate(&self) -> Result<(), PipelineError> {
        let at = step_at(&self.id);
        check_name(&at, "step id", &self.id, NameKind::Dotted)?;
        check_typical(&at, self.typical_minutes)?;
        let Some(role) = baton_shared::roles::spec(&self.role) else {
            return Err(PipelineError::UnknownRole {
                step: self.id.clone(),
                role: self.role.clone(),
            });
        };
        role.check_params(&self.params).map_err(|e| PipelineError::Invalid {
            at: at.clone(),
            message: e.to_string(),
        })?;
        // Zones and roles form the routing key `<zone>.<role>`, so they must not contain '.'.
        check_name(&at, "zone", &self.zone, NameKind::Plain)?;
        check_name(&at, "action", &self.action, NameKind::Plain)?;
        if !role.actions.contains(&self.action.as_str()) {
            return Err(PipelineError::Invalid {
                at,
                message: format!(
                    "role {} has no action {:?} (its actions: {})",
                    role.name,
                    self.action,
                    role.actions.join(", ")
                ),
            });
        }
        if let Some(compensate) = &self.compensate {
            check_name(&at, "compensate action", compensate, NameKind::Plain)?;
            if compensate == "restore-volumes" && !matches!(self.action.as_str(), "pre-deploy" | "post-deploy") {
                return Err(PipelineError::Invalid {
                    at,
                    message: format!(
                        "compensation \"restore-volumes\" restores the backup the step takes: only a pre-deploy or \
                         post-deploy backup step has one (this step's action is {:?})",
                        self.action
                    ),
                });
            }
            if !role.compensations.contains(&compensate.as_str()) {
                return Err(PipelineError::Invalid {
                    at,
                    message: format!(
                        "role {} has no compensation {compensate:?} ({})",
                        role.name,
                        if role.compensations.is_empty() {
                            "it has none".to_owned()
                        } else {
                            format!("its compensations: {}", role.compensations.join(", "))
                        }
                    ),
                });
            }
        }
        if self.restore_from_backup && self.compensate.is_none() {
            return Err(PipelineError::Invalid {
                at,
                message: "restore_from_backup needs a `compensate` action to fall back from".into(),
            });
        }
        for gate in &self.gates {
            if gate == "migration-reversible" {
                return Err(PipelineError::Invalid {
                    at,
                    message: "gate \"migration-reversible\" is not a gate: the db-migration daemon enforces the \
                              rule itself, before it applies anything (a migration without a down file needs a \
                              recovery procedure, or `migrate` fails with irreversible_without_procedure); remove it"
                        .into(),
                });
            }
            if !KNOWN_GATES.contains(&gate.as_str()) {
                return Err(PipelineError::UnknownGate {
                    step: self.id.clone(),
                    gate: gate.clone(),
                });
            }
        }
        if let Some(when) = &self.when {
            if when.paths.is_empty() && when.flags.is_empty() {
                return Err(PipelineError::EmptyWhen { step: self.id.clone() });
            }
            for (field, globs) in [("when.paths", &when.paths), ("when.except", &when.except)] {
                for glob in globs {
                    path_glob(glob).map_err(|e| PipelineError::BadGlob {
                        step: self.id.clone(),
                        field,
                        glob: glob.clone(),
                        message: e.kind().to_string(),
                    })?;
                }
            }
            for flag in &when.flags {
                check_name(&at, "flag", flag, NameKind::Dotted)?;
            }
        }
        if self.timeout_secs == 0 {
            return Err(PipelineError::ZeroTimeout { at });
        }
        self.retry.check(&at)
    }
}

/// Compiles a `when` glob: `*` stays within one path segment, `**` crosses segments.
///
/// Compiling builds a regex automaton, which cost the scheduler about a tenth of
/// its CPU when done for every merge event; a pipeline has few patterns, so
/// compiled ones are kept (up to [`GLOB_CACHE_LIMIT`]).
pub fn path_glob(glob: &str) -> Result<GlobMatcher, globset::Error> {
    static CACHE: std::sync::OnceLock<std::sync::Mutex<HashMap<String, GlobMatcher>>> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(m) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(glob) {
        return Ok(m.clone());
    }
    let matcher = GlobBuilder::new(glob)
        .literal_separator(true)
        .build()?
        .compile_matcher();
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() < GLOB_CACHE_LIMIT {
        cache.insert(glob.to_owned(), matcher.clone());
    }
    Ok(matcher)
}

/// Compiled `when` globs kept at most (pipelines are reloaded, patterns change).
pub const GLOB_CACHE_LIMIT: usize = 4096;

/// SHA-256 (hex) of a value's canonical JSON: object keys sorted, no whitespace. Plans
/// and pipelines are hashed this way so the hash never depends on map ordering.
pub fn canonical_sha256<T: Serialize>(value: &T) -> String {
    let text = match serde_json::to_value(value) {
        Ok(value) => {
            let mut out = String::new();
            write_canonical(&value, &mut out);
            out
        }
        // Unreachable for the plain data hashed here (every map key is a string); hashing
        // the error keeps this total without a panic path.
        Err(e) => format!("unserialisable: {e}"),
    };
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let sorted: BTreeMap<&String, &Value> = map.iter().collect();
            out.push('{');
            for (i, (key, item)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

fn step_at(id: &str) -> String {
    format!("step {id:?}")
}

#[derive(Clone, Copy)]
enum NameKind {
    /// Zones, roles, environments, actions: no '.', which separates routing key parts.
    Plain,
    /// Step ids, flags, pipeline names: '.' allowed for namespacing (`db.staging`).
    Dotted,
}

/// The rules of `baton_shared::protocol::check_name`, with '.' only where it is safe.
fn check_name(at: &str, what: &'static str, value: &str, kind: NameKind) -> Result<(), PipelineError> {
    let dot_ok = matches!(kind, NameKind::Dotted);
    let ok = !value.is_empty()
        && value.len() <= 63
        && value.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' || (dot_ok && c == '.'));
    if ok {
        return Ok(());
    }
    Err(PipelineError::InvalidName {
        at: at.to_owned(),
        what,
        value: value.to_owned(),
        expected: if dot_ok {
            "1-63 characters of a-z, 0-9, '-', '_', '.' starting with a letter or digit"
        } else {
            "1-63 characters of a-z, 0-9, '-', '_' starting with a letter or digit"
        },
    })
}

fn toml_error(text: &str, error: &toml::de::Error) -> PipelineError {
    let offset = error.span().map_or(0, |span| span.start.min(text.len()));
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    PipelineError::Toml {
        line,
        column,
        message: error.message().trim().to_owned(),
    }
}

/// Deserialises one section, naming it and the offending key in the error.
fn typed<T: serde::de::DeserializeOwned>(
    at: &str,
    value: impl serde::Deserializer<'static, Error = toml::de::Error>,
) -> Result<T, PipelineError> {
    T::deserialize(value).map_err(|e| {
        // toml reports the key path on a trailing "in `key`" line.
        let text = e.to_string();
        let (problem, key) = match text.trim_end().rsplit_once("\nin `") {
            Some((problem, key)) => (problem, Some(key.trim_end_matches('`'))),
            None => (text.trim_end(), None),
        };
        let problem = problem.replace('\n', "; ");
        PipelineError::Invalid {
            at: at.to_owned(),
            message: match key {
                Some(key) => format!("{key}: {problem}"),
                None => problem,
            },
        }
    })
}

fn step_at_raw(step: &toml::Value, index: usize) -> String {
    match step.get("id").and_then(toml::Value::as_str) {
        Some(id) => step_at(id),
        None => format!("step #{}", index + 1),
    }
}

// Key lists for `check_keys`. The raw structs below carry `deny_unknown_fields` as well, so
// if a list and its struct ever disagree the key is refused loudly, never ignored.
const TOP_KEYS: &[&str] = &["pipeline", "defaults", "step"];
const PIPELINE_KEYS: &[&str] = &[
    "name",
    "promotion",
    "typical_minutes",
    "critical_minutes",
    "orchestration_minutes",
];
const DEFAULTS_KEYS: &[&str] = &["timeout_secs", "retry"];
const RETRY_KEYS: &[&str] = &["max_attempts", "initial_backoff_ms", "max_backoff_ms", "multiplier"];
const STEP_KEYS: &[&str] = &[
    "id",
    "role",
    "zone",
    "action",
    "needs",
    "when",
    "gates",
    "timeout_secs",
    "retry",
    "compensate",
    "restore_from_backup",
    "on_failure",
    "params",
    "typical_minutes",
];
const WHEN_KEYS: &[&str] = &["paths", "except", "flags"];

/// Finds misspelt keys before typed parsing so the error can name the step they are in.
/// Values of the wrong type are left for the typed pass to report.
fn check_keys(top: &toml::Table) -> Result<(), PipelineError> {
    fn check(at: &str, prefix: &str, table: &toml::Table, known: &[&'static str]) -> Result<(), PipelineError> {
        match table.keys().find(|k| !known.contains(&k.as_str())) {
            Some(key) => Err(PipelineError::UnknownKey {
                at: at.to_owned(),
                key: format!("{prefix}{key}"),
                known: known.to_vec(),
            }),
            None => Ok(()),
        }
    }
    check("top level", "", top, TOP_KEYS)?;
    if let Some(toml::Value::Table(t)) = top.get("pipeline") {
        check("[pipeline]", "", t, PIPELINE_KEYS)?;
    }
    if let Some(toml::Value::Table(t)) = top.get("defaults") {
        check("[defaults]", "", t, DEFAULTS_KEYS)?;
        if let Some(toml::Value::Table(r)) = t.get("retry") {
            check("[defaults]", "retry.", r, RETRY_KEYS)?;
        }
    }
    if let Some(toml::Value::Array(steps)) = top.get("step") {
        for (i, step) in steps.iter().enumerate() {
            let Some(t) = step.as_table() else { continue };
            let at = step_at_raw(step, i);
            check(&at, "", t, STEP_KEYS)?;
            if let Some(toml::Value::Table(w)) = t.get("when") {
                check(&at, "when.", w, WHEN_KEYS)?;
            }
            if let Some(toml::Value::Table(r)) = t.get("retry") {
                check(&at, "retry.", r, RETRY_KEYS)?;
            }
        }
    }
    Ok(())
}

/// The file's top level, with each section still untyped so that type errors can be
/// reported against the section (and step) they occur in.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    pipeline: toml::Value,
    defaults: Option<toml::Value>,
    #[serde(default)]
    step: Vec<toml::Value>,
}

struct RawPipeline {
    pipeline: RawHeader,
    defaults: RawDefaults,
    step: Vec<RawStep>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    name: String,
    #[serde(default)]
    promotion: Vec<String>,
    typical_minutes: Option<[u32; 2]>,
    critical_minutes: Option<u32>,
    orchestration_minutes: Option<u32>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    timeout_secs: Option<u64>,
    #[serde(default)]
    retry: RawRetry,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<u32>,
    initial_backoff_ms: Option<u64>,
    max_backoff_ms: Option<u64>,
    multiplier: Option<f64>,
}

impl RawRetry {
    fn over(&self, base: &RetryPolicy) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts.unwrap_or(base.max_attempts),
            initial_backoff_ms: self.initial_backoff_ms.unwrap_or(base.initial_backoff_ms),
            max_backoff_ms: self.max_backoff_ms.unwrap_or(base.max_backoff_ms),
            multiplier: self.multiplier.unwrap_or(base.multiplier),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    id: String,
    role: String,
    zone: String,
    action: String,
    #[serde(default)]
    needs: Vec<String>,
    when: Option<RawWhen>,
    #[serde(default)]
    gates: Vec<String>,
    timeout_secs: Option<u64>,
    #[serde(default)]
    retry: RawRetry,
    compensate: Option<String>,
    #[serde(default)]
    restore_from_backup: bool,
    on_failure: Option<String>,
    #[serde(default)]
    params: toml::Table,
    typical_minutes: Option<[u32; 2]>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWhen {
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    except: Vec<String>,
    #[serde(default)]
    flags: Vec<String>,
}

impl RawPipeline {
    fn from_table(table: toml::Table) -> Result<Self, PipelineError> {
        let file: RawFile = typed("top level", table)?;
        let pipeline = typed("[pipeline]", file.pipeline)?;
        let defaults = match file.defaults {
            Some(d) => typed("[defaults]", d)?,
            None => RawDefaults::default(),
        };
        let step = file
            .step
            .into_iter()
            .enumerate()
            .map(|(i, raw)| typed(&step_at_raw(&raw, i), raw))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            pipeline,
            defaults,
            step,
        })
    }

    fn into_pipeline(self) -> Result<Pipeline, PipelineError> {
        let timeout_secs = self.defaults.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS);
        if timeout_secs == 0 {
            return Err(PipelineError::ZeroTimeout {
                at: "[defaults]".to_owned(),
            });
        }
        let retry = self.defaults.retry.over(&RetryPolicy::default());
        retry.check("[defaults]")?;

        let ids: Vec<String> = self.step.iter().map(|s| s.id.clone()).collect();
        let steps = self
            .step
            .into_iter()
            .map(|raw| {
                let needs = expand_needs(&raw.id, &raw.needs, &ids)?;
                let params = params_to_fields(&raw.id, raw.params)?;
                let review = match raw.on_failure.as_deref() {
                    None | Some("rollback") => false,
                    Some("review") => true,
                    Some(other) => {
                        return Err(PipelineError::Invalid {
                            at: step_at(&raw.id),
                            message: format!("on_failure is \"rollback\" or \"review\", not {other:?}"),
                        });
                    }
                };
                Ok(StepDef {
                    needs,
                    params,
                    timeout_secs: raw.timeout_secs.unwrap_or(timeout_secs),
                    retry: raw.retry.over(&retry),
                    when: raw.when.map(|w| When {
                        paths: w.paths,
                        except: w.except,
                        flags: w.flags,
                    }),
                    id: raw.id,
                    role: raw.role,
                    zone: raw.zone,
                    action: raw.action,
                    gates: raw.gates,
                    compensate: raw.compensate,
                    restore_from_backup: raw.restore_from_backup,
                    review_on_failure: review,
                    typical_minutes: raw.typical_minutes,
                })
            })
            .collect::<Result<Vec<_>, PipelineError>>()?;
        Ok(Pipeline {
            name: self.pipeline.name,
            promotion: self.pipeline.promotion,
            steps,
            typical_minutes: self.pipeline.typical_minutes,
            critical_minutes: self.pipeline.critical_minutes,
            orchestration_minutes: self.pipeline.orchestration_minutes,
        })
    }
}

/// A `typical_minutes = [low, high]`: high at least 1 and not below low.
fn check_typical(at: &str, typical: Option<[u32; 2]>) -> Result<(), PipelineError> {
    match typical {
        Some([low, high]) if high == 0 || low > high => Err(PipelineError::Invalid {
            at: at.to_owned(),
            message: format!("typical_minutes [{low}, {high}] must be [low, high] with 0 <= low <= high and high >= 1"),
        }),
        _ => Ok(()),
    }
}

/// Resolves `needs` entries to step ids in pipeline order. An exact entry is kept as is
/// (validation reports it if it names no step, or the step itself); a glob expands to every
/// other step it matches and must match at least one.
fn expand_needs(step: &str, needs: &[String], ids: &[String]) -> Result<Vec<String>, PipelineError> {
    let mut wanted: BTreeSet<&str> = BTreeSet::new();
    let mut exact_unknown = Vec::new();
    for need in needs {
        if !need.contains(['*', '?', '[', '{']) {
            if ids.contains(need) {
                wanted.insert(need);
            } else {
                exact_unknown.push(need.clone());
            }
            continue;
        }
        let matcher = Glob::new(need)
            .map_err(|e| PipelineError::BadGlob {
                step: step.to_owned(),
                field: "needs",
                glob: need.clone(),
                message: e.kind().to_string(),
            })?
            .compile_matcher();
        let hits: Vec<&String> = ids
            .iter()
            .filter(|id| id.as_str() != step && matcher.is_match(id.as_str()))
            .collect();
        if hits.is_empty() {
            return Err(PipelineError::UnknownNeed {
                step: step.to_owned(),
                need: need.clone(),
            });
        }
        wanted.extend(hits.into_iter().map(String::as_str));
    }
    let mut expanded: Vec<String> = Vec::new();
    for id in ids {
        if wanted.contains(id.as_str()) && !expanded.contains(id) {
            expanded.push(id.clone());
        }
    }
    // Unknown exact ids stay in so `Pipeline::validate` reports them with the others.
    expanded.extend(exact_unknown);
    Ok(expanded)
}

fn params_to_fields(step: &str, table: toml::Table) -> Result<Fields, PipelineError> {
    let mut fields = Fields::new();
    for (key, value) in table {
        let json = toml_to_json(value).map_err(|problem| PipelineError::BadParam {
            step: step.to_owned(),
            key: key.clone(),
            problem,
        })?;
        fields.insert(key, json);
    }
    Ok(fields)
}

fn toml_to_json(value: toml::Value) -> Result<Value, String> {
    Ok(match value {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| format!("is {f}; JSON has no such number"))?,
        toml::Value::Boolean(b) => Value::Bool(b),
        // Jobs are JSON, which has no date type; RFC 3339 text is what daemons parse.
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(items.into_iter().map(toml_to_json).collect::<Result<_, _>>()?),
        toml::Value::Table(t) => Value::Object(
            t.into_iter()
                .map(|(k, v)| Ok((k, toml_to_json(v)?)))
                .collect::<Result<_, String>>()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "[pipeline]\nname = \"t\"\npromotion = [\"staging\", \"production\"]\n";

    fn parse(steps: &str) -> Result<Pipeline, PipelineError> {
        Pipeline::from_toml(&format!("{HEADER}{steps}"))
    }

    fn error(steps: &str) -> String {
        parse(steps).expect_err("pipeline should be refused").to_string()
    }

    fn step(id: &str, extra: &str) -> String {
        format!(
            "[[step]]\nid = \"{id}\"\nrole = \"backup\"\nzone = \"production\"\n\
             action = \"pre-deploy\"\n{extra}\n"
        )
    }

    #[test]
    fn typical_durations_and_budgets() {
        let p = parse(&step("a", "typical_minutes = [2, 10]")).unwrap();
        assert_eq!(p.steps[0].typical_minutes, Some([2, 10]));
        assert_eq!(
            p.budget_minutes("standard"),
            None,
            "no run budget unless the pipeline says"
        );
        let e = error(&step("a", "typical_minutes = [10, 2]"));
        assert!(e.contains("step \"a\"") && e.contains("typical_minutes [10, 2]"), "{e}");
        assert!(error(&step("a", "typical_minutes = [0, 0]")).contains("typical_minutes"));
        assert!(error(&step("a", "typical_minutes = [1, 2, 3]")).contains("typical_minutes"));
        let p = Pipeline::from_toml(&format!(
            "[pipeline]\nname = \"t\"\npromotion = [\"production\"]\ntypical_minutes = [30, 60]\n\
             critical_minutes = 120\n{}",
            step("a", "")
        ))
        .unwrap();
        assert_eq!(p.budget_minutes("standard"), Some(60));
        assert_eq!(p.budget_minutes("high"), Some(60));
        assert_eq!(p.budget_minutes("critical"), Some(120));
        // The seed's timing table, as shipped.
        let seed = Pipeline::seed();
        assert_eq!(seed.budget_minutes("critical"), Some(120));
        assert_eq!(seed.orchestration_minutes, Some(1));
        assert_eq!(seed.step("verify.staging").unwrap().typical_minutes, Some([15, 30]));
        assert!(seed.steps.iter().all(|s| s.typical_minutes.is_some()));
    }

    #[test]
    fn seed_pipeline_is_valid() {
        let p = Pipeline::seed();
        assert_eq!(p.name, "seed");
        assert_eq!(p.promotion, ["staging", "production"]);
        let ids: Vec<&str> = p.steps.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "build",
                "backup.pre",
                "db.staging",
                "db.production",
                "infra.staging.plan",
                "infra.staging",
                "infra.production.plan",
                "infra.production",
                "verify.staging",
                "apply.production",
                "network",
                "cdn",
                "backup.post"
            ]
        );
        let needs = |id: &str| p.step(id).unwrap().needs.clone();
        assert!(needs("build").is_empty());
        assert!(needs("backup.pre").is_empty());
        assert!(needs("db.staging").is_empty());
        assert_eq!(needs("db.production"), ["backup.pre", "db.staging"]);
        assert_eq!(needs("infra.staging.plan"), ["db.production"]);
        assert_eq!(needs("infra.staging"), ["infra.staging.plan"]);
        assert_eq!(needs("infra.production.plan"), ["infra.staging"]);
        assert_eq!(needs("infra.production"), ["infra.production.plan"]);
        assert_eq!(
            needs("verify.staging"),
            [
                "build",
                "db.staging",
                "db.production",
                "infra.staging.plan",
                "infra.staging",
                "infra.production.plan",
                "infra.production"
            ]
        );
        assert_eq!(needs("apply.production"), ["backup.pre", "verify.staging"]);
        assert_eq!(needs("network"), ["verify.staging"]);
        assert_eq!(needs("cdn"), ["verify.staging"]);
        assert_eq!(needs("backup.post"), ["apply.production"]);
    }

    #[test]
    fn seed_steps_run_as_the_seed_roles_in_their_zones() {
        let p = Pipeline::seed();
        let at = |id: &str| {
            let s = p.step(id).unwrap();
            format!("{}@{}", s.role, s.zone)
        };
        assert_eq!(at("build"), "container-build@ci");
        assert_eq!(at("backup.pre"), "backup@production");
        assert_eq!(at("db.staging"), "db-migration@staging");
        assert_eq!(at("db.production"), "db-migration@production");
        assert_eq!(at("infra.staging.plan"), "infrastructure@staging");
        assert_eq!(at("infra.staging"), "infrastructure@staging");
        assert_eq!(at("infra.production"), "infrastructure@production");
        assert_eq!(at("verify.staging"), "staging-verify@staging");
        assert_eq!(at("apply.production"), "production-apply@production");
        assert_eq!(at("network"), "network@production");
        assert_eq!(at("cdn"), "cdn@production");
        assert_eq!(at("backup.post"), "backup@production");
        // backup.pre and backup.post share one queue.
        assert_eq!(p.zone_roles().len(), 10);
    }

    #[test]
    fn seed_compensations_follow_the_seed_rollbacks() {
        let p = Pipeline::seed();
        let comp = |id: &str| p.step(id).unwrap().compensate.clone();
        assert_eq!(comp("build"), None, "seed: not applicable, the image exists or not");
        assert_eq!(
            comp("backup.pre"),
            None,
            "seed: the backup role verifies, it deploys nothing"
        );
        assert_eq!(comp("backup.post"), None);
        assert_eq!(comp("db.staging").as_deref(), Some("rollback"));
        assert_eq!(comp("db.production").as_deref(), Some("rollback"));
        assert_eq!(comp("infra.staging.plan"), None, "a plan changes nothing");
        assert_eq!(comp("infra.staging").as_deref(), Some("reapply-previous"));
        assert_eq!(comp("infra.production").as_deref(), Some("reapply-previous"));
        assert_eq!(comp("verify.staging").as_deref(), Some("redeploy-previous"));
        assert_eq!(comp("apply.production").as_deref(), Some("rollback-replicaset"));
        assert_eq!(comp("network").as_deref(), Some("revert"));
        assert_eq!(comp("cdn").as_deref(), Some("restore-previous"));
    }

    #[test]
    fn seed_numbers_are_step_params() {
        let p = Pipeline::seed();
        let param = |id: &str, key: &str| p.step(id).unwrap().params.get(key).cloned();
        // staging-verify soaks; the staging-soak gate checks the soak covered
        // gates.staging_soak_secs (critical: critical_staging_soak_secs).
        assert_eq!(param("verify.staging", "soak_minutes"), Some(15.into()));
        assert_eq!(param("verify.staging", "critical_soak_minutes"), Some(60.into()));
        assert_eq!(param("verify.staging", "max_regression_percent"), Some(20.into()));
        for (key, value) in [
            ("max_surge", 1),
            ("max_unavailable", 0),
            ("min_ready_seconds", 30),
            ("progress_deadline_seconds", 300),
            ("monitor_minutes", 15),
            ("rollback_max_seconds", 60),
        ] {
            assert_eq!(param("apply.production", key), Some(value.into()), "{key}");
        }
        assert_eq!(param("infra.staging", "blast_radius_limit"), Some(5.into()));
        assert_eq!(param("infra.production", "blast_radius_limit"), Some(5.into()));
        let retention = serde_json::json!({"daily": 30, "monthly": 12, "yearly": 7});
        assert_eq!(param("backup.pre", "retention"), Some(retention.clone()));
        assert_eq!(param("backup.post", "retention"), Some(retention));
        // Critical changes soak for up to two hours on staging.
        assert!(p.step("verify.staging").unwrap().timeout_secs >= 7200);
    }

    #[test]
    fn defaults_apply_and_step_retry_overrides_field_by_field() {
        let p = Pipeline::from_toml(&format!(
            "{HEADER}[defaults]\ntimeout_secs = 60\n\
             retry = {{ max_attempts = 4, multiplier = 3.0 }}\n{}{}",
            step("a", ""),
            step("b", "timeout_secs = 5\nretry = { max_attempts = 1 }")
        ))
        .unwrap();
        let a = p.step("a").unwrap();
        assert_eq!(a.timeout_secs, 60);
        assert_eq!(
            a.retry,
            RetryPolicy {
                max_attempts: 4,
                initial_backoff_ms: 1000,
                max_backoff_ms: 60_000,
                multiplier: 3.0
            }
        );
        let b = p.step("b").unwrap();
        assert_eq!(b.timeout_secs, 5);
        assert_eq!(b.retry.max_attempts, 1);
        assert_eq!(b.retry.multiplier, 3.0);
    }

    #[test]
    fn without_defaults_the_built_in_ones_apply() {
        let p = parse(&step("a", "")).unwrap();
        let a = p.step("a").unwrap();
        assert_eq!(a.timeout_secs, 1800);
        assert_eq!(a.retry, RetryPolicy::default());
        assert!(a.when.is_none() && a.needs.is_empty() && a.gates.is_empty());
    }

    #[test]
    fn backoff_grows_exponentially_and_is_capped() {
        let r = RetryPolicy::default();
        assert_eq!(r.backoff(1), Duration::from_secs(1));
        assert_eq!(r.backoff(2), Duration::from_secs(2));
        assert_eq!(r.backoff(3), Duration::from_secs(4));
        assert_eq!(r.backoff(6), Duration::from_secs(32));
        assert_eq!(r.backoff(7), Duration::from_secs(60));
        assert_eq!(r.backoff(1000), Duration::from_secs(60));
        assert_eq!(r.backoff(u32::MAX), Duration::from_secs(60));
        // Zero failures is treated as the first retry rather than shrinking the wait.
        assert_eq!(r.backoff(0), Duration::from_secs(1));
    }

    #[test]
    fn unknown_role_is_named_with_the_known_roles() {
        let e = error(&step("cdn", "").replace("role = \"backup\"", "role = \"cnd\""));
        assert!(
            e.starts_with(r#"step "cdn": unknown role "cnd" (known roles: container-build, "#),
            "{e}"
        );
        assert!(e.contains("backup)"), "{e}");
    }

    #[test]
    fn cycle_names_the_steps_in_it() {
        let e = error(&format!(
            "{}{}{}",
            step("a", "needs = [\"c\"]"),
            step("b", "needs = [\"a\"]"),
            step("c", "needs = [\"b\"]")
        ));
        assert_eq!(e, r#"step "a": needs form a cycle: a -> c -> b -> a"#);
    }

    #[test]
    fn a_step_needing_itself_is_a_cycle() {
        let e = error(&step("a", "needs = [\"a\"]"));
        assert_eq!(e, r#"step "a": needs form a cycle: a -> a"#);
    }

    #[test]
    fn unknown_need_is_named() {
        let e = error(&step("a", "needs = [\"buid\"]"));
        assert_eq!(e, r#"step "a": unknown need "buid" (it matches no other step)"#);
    }

    #[test]
    fn need_glob_matching_no_other_step_is_unknown() {
        let e = error(&step("db.a", "needs = [\"db.*\"]"));
        assert_eq!(e, r#"step "db.a": unknown need "db.*" (it matches no other step)"#);
    }

    #[test]
    fn need_globs_expand_to_every_other_matching_step_in_pipeline_order() {
        let p = parse(&format!(
            "{}{}{}{}",
            step("db.b", ""),
            step("db.a", ""),
            step("x", "needs = [\"db.*\", \"db.a\"]"),
            step("db.c", "needs = [\"db.*\"]")
        ))
        .unwrap();
        assert_eq!(p.step("x").unwrap().needs, ["db.b", "db.a", "db.c"]);
        assert_eq!(p.step("db.c").unwrap().needs, ["db.b", "db.a"]);
    }

    #[test]
    fn duplicate_step_id_is_refused() {
        let e = error(&format!("{}{}", step("a", ""), step("a", "")));
        assert_eq!(e, r#"step "a": duplicate step id"#);
    }

    #[test]
    fn bad_glob_in_when_paths_is_named() {
        let e = error(&step("a", "when = { paths = [\"src/[a\"] }"));
        assert!(e.starts_with(r#"step "a": bad glob "src/[a" in when.paths: "#), "{e}");
    }

    #[test]
    fn bad_glob_in_when_except_is_named() {
        let e = error(&step("a", "when = { paths = [\"**\"], except = [\"{a\"] }"));
        assert!(e.starts_with(r#"step "a": bad glob "{a" in when.except: "#), "{e}");
    }

    #[test]
    fn bad_glob_in_needs_is_named() {
        let e = error(&step("a", "needs = [\"db.[\"]"));
        assert!(e.starts_with(r#"step "a": bad glob "db.[" in needs: "#), "{e}");
    }

    #[test]
    fn invalid_step_id_is_refused() {
        let e = error(&step("Build", ""));
        assert!(
            e.starts_with(r#"step "Build": invalid step id "Build" (expected 1-63"#),
            "{e}"
        );
    }

    #[test]
    fn zone_with_a_dot_is_refused_because_it_splits_the_routing_key() {
        let e = error(&step("a", "").replace("zone = \"production\"", "zone = \"eu.production\""));
        assert!(e.starts_with(r#"step "a": invalid zone "eu.production""#), "{e}");
    }

    #[test]
    fn zero_timeout_is_refused() {
        let e = error(&step("a", "timeout_secs = 0"));
        assert_eq!(e, r#"step "a": timeout_secs must be positive"#);
        let e = error(&format!("[defaults]\ntimeout_secs = 0\n{}", step("a", "")));
        assert_eq!(e, "[defaults]: timeout_secs must be positive");
    }

    #[test]
    fn on_failure_is_rollback_or_review_and_review_only_for_steps_nothing_needs() {
        let p = parse(&format!(
            "{}{}",
            step("a", ""),
            step("b", "needs = [\"a\"]\non_failure = \"review\"")
        ))
        .unwrap();
        assert!(!p.step("a").unwrap().review_on_failure);
        assert!(p.step("b").unwrap().review_on_failure);
        let p = parse(&step("a", "on_failure = \"rollback\"")).unwrap();
        assert!(!p.step("a").unwrap().review_on_failure);
        let e = error(&step("a", "on_failure = \"ignore\""));
        assert_eq!(e, r#"step "a": on_failure is "rollback" or "review", not "ignore""#);
        let e = error(&format!(
            "{}{}",
            step("a", "on_failure = \"review\""),
            step("b", "needs = [\"a\"]")
        ));
        assert_eq!(
            e,
            r#"step "a": on_failure = "review" is only for steps nothing needs, and step b needs it"#
        );
        let seed = Pipeline::seed();
        assert!(seed.step("backup.post").unwrap().review_on_failure);
        assert!(seed.steps.iter().filter(|s| s.review_on_failure).count() == 1);
    }

    #[test]
    fn zero_max_attempts_is_refused() {
        let e = error(&step("a", "retry = { max_attempts = 0 }"));
        assert_eq!(e, r#"step "a": retry.max_attempts must be at least 1"#);
    }

    #[test]
    fn shrinking_backoff_is_refused() {
        let e = error(&step("a", "retry = { multiplier = 0.5 }"));
        assert!(e.starts_with(r#"step "a": retry multiplier must be"#), "{e}");
    }

    #[test]
    fn empty_pipeline_is_refused() {
        assert_eq!(error(""), "pipeline has no steps");
    }

    #[test]
    fn empty_promotion_is_refused() {
        let e = Pipeline::from_toml(&format!("[pipeline]\nname = \"t\"\n{}", step("a", "")))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "[pipeline]: promotion lists no environments");
    }

    #[test]
    fn environment_listed_twice_is_refused() {
        let text = format!(
            "[pipeline]\nname = \"t\"\npromotion = [\"staging\", \"staging\"]\n{}",
            step("a", "")
        );
        let e = Pipeline::from_toml(&text).unwrap_err().to_string();
        assert_eq!(e, r#"[pipeline]: environment "staging" appears twice in promotion"#);
    }

    #[test]
    fn restore_from_backup_needs_a_compensation_and_a_backup_of_its_zone() {
        let e = error(&step("a", "restore_from_backup = true"));
        assert!(e.contains("needs a `compensate` action"), "{e}");
        let e = error(&step("a", "compensate = \"restore\"\nrestore_from_backup = true"));
        assert!(e.contains("needs a pre-deploy backup of zone"), "{e}");
    }

    #[test]
    fn actions_and_compensations_must_be_the_role_s() {
        let text = format!("{HEADER}{}", step("a", "").replace("pre-deploy", "backup"));
        let e = Pipeline::from_toml(&text).unwrap_err().to_string();
        assert!(
            e.contains(r#"role backup has no action "backup""#) && e.contains("pre-deploy, post-deploy"),
            "{e}"
        );
        let e = error(&step("a", "compensate = \"restore-volume\""));
        assert!(
            e.contains(r#"no compensation "restore-volume""#) && e.contains("restore, restore-volumes"),
            "{e}"
        );
        assert!(parse(&step("a", "compensate = \"restore-volumes\"")).is_ok());
        let text = format!(
            "{HEADER}{}",
            step("a", "compensate = \"restore-volumes\"").replace("pre-deploy", "verify")
        );
        let e = Pipeline::from_toml(&text).unwrap_err().to_string();
        assert!(e.contains("only a pre-deploy or post-deploy backup step"), "{e}");
    }

    #[test]
    fn unknown_gate_is_named_with_the_known_gates() {
        let e = error(&step("a", "gates = [\"soak\"]"));
        assert!(e.starts_with(r#"step "a": unknown gate "soak" (known gates: "#), "{e}");
    }

    #[test]
    fn when_without_paths_or_flags_is_refused() {
        let e = error(&step("a", "when = { except = [\"docs/**\"] }"));
        assert_eq!(
            e,
            r#"step "a": when has neither paths nor flags, so the step could never run"#
        );
    }

    #[test]
    fn unknown_step_key_is_named() {
        let e = error(&step("a", "timeout = 5"));
        assert!(
            e.starts_with(r#"step "a": unknown key "timeout" (known keys: id, role,"#),
            "{e}"
        );
    }

    #[test]
    fn unknown_when_key_is_named() {
        let e = error(&step("a", "when = { path = [\"src/**\"] }"));
        assert!(
            e.starts_with(r#"step "a": unknown key "when.path" (known keys: paths, except, flags)"#),
            "{e}"
        );
    }

    #[test]
    fn unknown_top_level_key_is_named() {
        let e = error(&format!("colour = \"blue\"\n{}", step("a", "")));
        assert!(e.starts_with(r#"[pipeline]: unknown key "colour""#), "{e}");
        let e = Pipeline::from_toml("stage = []\n[pipeline]\nname = \"t\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(r#"top level: unknown key "stage""#), "{e}");
    }

    #[test]
    fn wrong_type_names_the_step_and_key() {
        let e = error(&step("a", "timeout_secs = \"ten\""));
        assert_eq!(e, r#"step "a": timeout_secs: invalid type: string "ten", expected u64"#);
        let e = error(&step("a", "retry = { max_attempts = -1 }"));
        assert!(e.starts_with(r#"step "a": retry.max_attempts: invalid value"#), "{e}");
    }

    #[test]
    fn missing_key_names_the_step() {
        let e = error("[[step]]\nid = \"a\"\nrole = \"cdn\"\nzone = \"production\"\n");
        assert_eq!(e, r#"step "a": missing field `action`"#);
        let e = error("[[step]]\nrole = \"cdn\"\n");
        assert!(e.starts_with("step #1: missing field `id`"), "{e}");
    }

    #[test]
    fn syntax_error_is_reported_with_its_line() {
        let e = error("[[step]\n");
        assert!(e.starts_with("invalid toml at line 4, column "), "{e}");
    }

    #[test]
    fn non_finite_param_is_refused() {
        let e = error(&step("a", "params = { ratio = nan }"));
        assert!(e.starts_with(r#"step "a": params.ratio is NaN"#), "{e}");
    }

    #[test]
    fn params_keep_nested_values_and_dates_become_text() {
        let p = parse(&step(
            "a",
            "params = { retention = { daily = 30 }, backup_id = 2026-01-02T03:04:05Z, require_pre_deploy = true }",
        ))
        .unwrap();
        let params = &p.step("a").unwrap().params;
        assert_eq!(params["retention"], serde_json::json!({"daily": 30}));
        assert_eq!(params["backup_id"], "2026-01-02T03:04:05Z");
        assert_eq!(params["require_pre_deploy"], true);
    }

    #[test]
    fn params_are_those_the_role_takes_with_their_types() {
        let e = error(&step("a", "params = { keep = 3 }"));
        assert!(
            e.starts_with(r#"step "a": params.keep: role backup takes no such parameter (it takes: retention,"#),
            "{e}"
        );
        let e = error(&step("a", "params = { require_pre_deploy = \"yes\" }"));
        assert_eq!(
            e,
            r#"step "a": params.require_pre_deploy must be true or false, not "yes""#
        );
        let seed = SEED_TOML.replace("params.max_surge = 1", "params.max_surge = 1\nparams.max_surges = 2");
        let e = Pipeline::from_toml(&seed).unwrap_err().to_string();
        assert!(
            e.contains("params.max_surges: role production-apply takes no such parameter"),
            "{e}"
        );
    }

    #[test]
    fn migration_reversible_is_refused_naming_where_the_rule_lives() {
        let e = error(&step("a", "gates = [\"migration-reversible\"]"));
        assert!(e.contains("the db-migration daemon enforces the rule itself"), "{e}");
    }

    #[test]
    fn a_zone_outside_promotion_is_not_an_environment_but_is_fine() {
        let p = parse(&step("a", "").replace("\"production\"", "\"ci\"")).unwrap();
        assert_eq!(p.step("a").unwrap().zone, "ci");
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("baton-pipeline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, format!("{HEADER}{}", step("a", "needs = [\"b\"]"))).unwrap();
        let e = Pipeline::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("bad.toml") && e.contains(r#"step "a": unknown need "b""#),
            "{e}"
        );
        let missing = Pipeline::load(&dir.join("missing.toml")).unwrap_err().to_string();
        assert!(
            missing.starts_with("cannot read pipeline ") && missing.contains("missing.toml"),
            "{missing}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hash_is_stable_and_changes_with_the_definition() {
        let seed = Pipeline::seed();
        assert_eq!(seed.hash(), Pipeline::seed().hash());
        assert_eq!(seed.hash().len(), 64);
        let mut changed = seed.clone();
        changed.steps[0].timeout_secs += 1;
        assert_ne!(seed.hash(), changed.hash());
    }

    #[test]
    fn canonical_hash_ignores_map_order() {
        let mut a = Fields::new();
        a.insert("x".into(), 1.into());
        a.insert("y".into(), 2.into());
        let mut b = Fields::new();
        b.insert("y".into(), 2.into());
        b.insert("x".into(), 1.into());
        assert_eq!(canonical_sha256(&a), canonical_sha256(&b));
    }

    #[test]
    fn when_globs_keep_star_within_a_segment() {
        let tf = path_glob("**/*.tf").unwrap();
        assert!(tf.is_match("main.tf") && tf.is_match("infra/db/main.tf"));
        let src = path_glob("src/*").unwrap();
        assert!(src.is_match("src/a.ts") && !src.is_match("src/a/b.ts"));
    }

    #[test]
    fn validate_catches_hand_built_cycles() {
        let mut p = Pipeline::seed();
        p.steps[0].needs.push("backup.post".into());
        // A step with a review policy may not be needed at all; the cycle is the point here.
        p.steps.iter_mut().for_each(|s| s.review_on_failure = false);
        let e = p.validate().unwrap_err().to_string();
        assert!(
            e.contains("needs form a cycle: build -> backup.post -> apply.production"),
            "{e}"
        );
    }
}
