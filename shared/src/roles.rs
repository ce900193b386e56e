//! The registry of roles: each role's name, the actions its daemon executes, the
//! compensations it runs, and the step parameters it takes, with their types.
//!
//! The scheduler validates pipelines against it (an unknown role or parameter, or
//! a parameter of the wrong type, is refused naming the step and key); the
//! gates and the engine find steps by these names; the daemons answer to them.

use serde_json::Value;

use crate::protocol::Fields;

pub const CONTAINER_BUILD: &str = "container-build";
pub const DB_MIGRATION: &str = "db-migration";
pub const INFRASTRUCTURE: &str = "infrastructure";
pub const STAGING_VERIFY: &str = "staging-verify";
pub const PRODUCTION_APPLY: &str = "production-apply";
pub const NETWORK: &str = "network";
pub const CDN: &str = "cdn";
pub const BACKUP: &str = "backup";

/// What a role is and takes.
#[derive(Debug)]
pub struct RoleSpec {
    pub name: &'static str,
    /// Actions of `execute` jobs.
    pub actions: &'static [&'static str],
    /// Actions of `compensate` jobs.
    pub compensations: &'static [&'static str],
    /// Step parameters (`params` in a pipeline), each with its type.
    pub params: &'static [Param],
    /// Whether an execute attempt that fails, times out or is cancelled may
    /// leave part of its effect behind (half a rollout, part of a Terraform
    /// apply, some DNS records). When the run rolls back, such a step is
    /// compensated like a succeeded one; its compensation gets the failed
    /// attempt's outputs, if it reported any, and must find the rest of what
    /// changed in the system it manages (docs/decisions.md, "Partial work").
    pub partial_effects: bool,
}

/// One step parameter a role reads.
#[derive(Debug)]
pub struct Param {
    pub name: &'static str,
    pub kind: Kind,
    pub about: &'static str,
}

/// The JSON type a parameter must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A whole number of at least 0.
    Count,
    /// Any finite number.
    Number,
    Text,
    Bool,
    /// A table (JSON object) the role reads further.
    Table,
    /// A list of strings.
    TextList,
}

impl Kind {
    pub fn accepts(self, v: &Value) -> bool {
        match self {
            Self::Count => v.as_u64().is_some(),
            Self::Number => v.is_number(),
            Self::Text => v.is_string(),
            Self::Bool => v.is_boolean(),
            Self::Table => v.is_object(),
            Self::TextList => v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Count => "a whole number of at least 0",
            Self::Number => "a number",
            Self::Text => "a string",
            Self::Bool => "true or false",
            Self::Table => "a table",
            Self::TextList => "a list of strings",
        }
    }
}

const fn p(name: &'static str, kind: Kind, about: &'static str) -> Param {
    Param { name, kind, about }
}

/// Every role Baton knows, in the seed's step order.
pub const ALL: &[RoleSpec] = &[
    RoleSpec {
        name: CONTAINER_BUILD,
        actions: &["build"],
        compensations: &[],
        params: &[
            p("dockerfile", Kind::Text, "path of the Dockerfile in the repository"),
            p("context", Kind::Text, "build context directory in the repository"),
            p("max_image_bytes", Kind::Count, "size limit of the built image"),
        ],
        partial_effects: false,
    },
    RoleSpec {
        name: DB_MIGRATION,
        actions: &["migrate", "verify"],
        compensations: &["rollback"],
        params: &[
            p(
                "migrations_dir",
                Kind::Text,
                "drizzle-kit's output folder in the repository",
            ),
            p(
                "backup_step",
                Kind::Text,
                "the input step carrying the pre-deploy backup",
            ),
        ],
        partial_effects: false,
    },
    RoleSpec {
        name: INFRASTRUCTURE,
        actions: &["plan", "apply"],
        compensations: &["reapply-previous"],
        params: &[
            p(
                "blast_radius_limit",
                Kind::Count,
                "resources a change may touch without approval",
            ),
            p("dir", Kind::Text, "Terraform root module in the repository"),
            p(
                "protected",
                Kind::TextList,
                "resource addresses (globs) a plan must not replace or delete",
            ),
            p(
                "lock_timeout_secs",
                Kind::Count,
                "how long to wait for a held state lock",
            ),
            p(
                "plan_step",
                Kind::Text,
                "apply: the plan step whose saved plan it applies",
            ),
        ],
        partial_effects: true,
    },
    RoleSpec {
        name: STAGING_VERIFY,
        actions: &["verify"],
        compensations: &["redeploy-previous"],
        params: &[
            p(
                "max_regression_percent",
                Kind::Number,
                "how much slower than the baseline fails",
            ),
            p("manifests_dir", Kind::Text, "kustomize directory in the repository"),
            p(
                "production_manifests_dir",
                Kind::Text,
                "production's kustomize directory, which staging must mirror (empty: not compared)",
            ),
            p(
                "checks_file",
                Kind::Text,
                "smoke, integration and performance checks in the repository",
            ),
            p(
                "soak_minutes",
                Kind::Count,
                "how long staging is watched after the checks",
            ),
            p(
                "critical_soak_minutes",
                Kind::Count,
                "the soak of a critical-risk change",
            ),
            p(
                "soak_seconds",
                Kind::Count,
                "the soak in seconds (overrides the minutes: short demos and tests)",
            ),
            p(
                "max_error_percent",
                Kind::Number,
                "failed requests during the soak that fail it",
            ),
        ],
        partial_effects: true,
    },
    RoleSpec {
        name: PRODUCTION_APPLY,
        actions: &["apply"],
        compensations: &["rollback-replicaset"],
        params: &[
            p("max_surge", Kind::Count, "rolling update: pods above the desired count"),
            p(
                "max_unavailable",
                Kind::Count,
                "rolling update: pods below the desired count",
            ),
            p(
                "min_ready_seconds",
                Kind::Count,
                "a new pod counts as available after this long ready",
            ),
            p(
                "progress_deadline_seconds",
                Kind::Count,
                "a rollout without progress this long fails",
            ),
            p(
                "monitor_minutes",
                Kind::Count,
                "watching after the rollout before the step succeeds",
            ),
            p(
                "rollback_max_seconds",
                Kind::Count,
                "the rollback to the previous ReplicaSet's budget",
            ),
            p("manifests_dir", Kind::Text, "kustomize directory in the repository"),
            p(
                "monitor_seconds",
                Kind::Count,
                "the monitoring in seconds (overrides the minutes: short demos and tests)",
            ),
            p(
                "max_error_percent",
                Kind::Number,
                "failed requests while monitoring that roll back",
            ),
            p(
                "max_p95_ms",
                Kind::Number,
                "p95 latency while monitoring above which it rolls back",
            ),
        ],
        partial_effects: true,
    },
    RoleSpec {
        name: NETWORK,
        actions: &["apply"],
        compensations: &["revert"],
        params: &[
            p("config_dir", Kind::Text, "the network folder in the repository"),
            p(
                "propagation_deadline_secs",
                Kind::Count,
                "how long every nameserver may take to answer",
            ),
            p(
                "renew_before_days",
                Kind::Count,
                "renew a certificate with fewer days left than this",
            ),
        ],
        partial_effects: true,
    },
    RoleSpec {
        name: CDN,
        actions: &["deploy"],
        compensations: &["restore-previous"],
        params: &[
            p("assets_dir", Kind::Text, "static assets folder in the repository"),
            p(
                "entry_documents",
                Kind::TextList,
                "files that are not content-hashed and may change (globs)",
            ),
            p("edge_rules_file", Kind::Text, "edge rules in the repository"),
            p(
                "fix_zone_settings",
                Kind::Bool,
                "correct the pull zone's routing and shield instead of refusing",
            ),
            p("shield_zone", Kind::Text, "the origin shield location"),
        ],
        partial_effects: true,
    },
    RoleSpec {
        name: BACKUP,
        actions: &["pre-deploy", "post-deploy", "verify", "prune"],
        // `restore`: a migration's compensation restores the database;
        // `restore-volumes`: a backup step's own, the service's volumes.
        compensations: &["restore", "restore-volumes"],
        params: &[
            p("retention", Kind::Table, "{daily, monthly, yearly} counts to keep"),
            p(
                "require_pre_deploy",
                Kind::Bool,
                "post-deploy: the run must have a pre-deploy backup",
            ),
            p("backup_id", Kind::Text, "verify, restore: the backup"),
            p(
                "backup_step",
                Kind::Text,
                "verify, restore: the input step naming the backup",
            ),
            p("confirm_backup_id", Kind::Text, "restore: must repeat the backup id"),
        ],
        partial_effects: false,
    },
];

/// The role named `name`.
pub fn spec(name: &str) -> Option<&'static RoleSpec> {
    ALL.iter().find(|r| r.name == name)
}

/// The names of every role.
pub fn names() -> impl Iterator<Item = &'static str> {
    ALL.iter().map(|r| r.name)
}

/// Why a step's parameters do not fit its role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamProblem {
    #[error("unknown role {role:?} (known: {})", names().collect::<Vec<_>>().join(", "))]
    UnknownRole { role: String },
    #[error("params.{key}: role {role} takes no such parameter (it takes: {known})")]
    Unknown {
        role: &'static str,
        key: String,
        known: String,
    },
    #[error("params.{key} must be {expected}, not {found}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
}

impl RoleSpec {
    /// Checks a step's parameters: each is one this role takes, of its type.
    pub fn check_params(&self, params: &Fields) -> Result<(), ParamProblem> {
        for (key, value) in params {
            let Some(param) = self.params.iter().find(|p| p.name == key) else {
                let known = if self.params.is_empty() {
                    "none".to_owned()
                } else {
                    self.params.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
                };
                return Err(ParamProblem::Unknown {
                    role: self.name,
                    key: key.clone(),
                    known,
                });
            };
            if !param.kind.accepts(value) {
                return Err(ParamProblem::WrongType {
                    key: key.clone(),
                    expected: param.kind.describe(),
                    found: value.to_string(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(v: Value) -> Fields {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn names_are_unique_and_found() {
        let mut names: Vec<_> = names().collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        assert_eq!(spec("cdn").unwrap().name, CDN);
        assert!(spec("deployer").is_none());
    }

    #[test]
    fn params_are_checked_by_name_and_type() {
        let apply = spec(PRODUCTION_APPLY).unwrap();
        apply
            .check_params(&fields(json!({"max_surge": 1, "monitor_minutes": 15})))
            .unwrap();
        let e = apply.check_params(&fields(json!({"max_surges": 1}))).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("params.max_surges: role production-apply takes no such"),
            "{e}"
        );
        let e = apply.check_params(&fields(json!({"max_surge": "1"}))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "params.max_surge must be a whole number of at least 0, not \"1\""
        );
        let e = apply.check_params(&fields(json!({"max_surge": -1}))).unwrap_err();
        assert!(e.to_string().contains("not -1"), "{e}");
    }
}
