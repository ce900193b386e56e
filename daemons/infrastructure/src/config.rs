//! The daemon's configuration: the common daemon settings plus `[infrastructure]`.
//!
//! ```toml
//! [daemon]
//! zone = "production"
//!
//! [infrastructure]
//! terraform = "/usr/local/bin/terraform"   # or tofu
//! repos_dir = "/var/cache/baton/repos"
//! work_dir = "/var/lib/baton/infrastructure"
//! state_url = "postgres://terraform@state-db:5432/terraform"
//! lock_timeout_secs = 300
//! ```
//!
//! `state_url` is a secret (printed `[redacted]`): it reaches Terraform through
//! the `PG_CONN_STR` environment variable, never its command line or files.

use std::path::PathBuf;
use std::str::FromStr;

use baton_shared::config::ConfigError;
use baton_shared::secret::Secret;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnectOptions;

/// `[infrastructure]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InfraConfig {
    /// The Terraform (or OpenTofu) binary.
    pub terraform: PathBuf,
    /// Where bare clones of deployed repositories are cached.
    pub repos_dir: PathBuf,
    /// Each job's checkout and Terraform's working files (removed when the job
    /// ends), the daemon's CLI configuration and plugin cache.
    pub work_dir: PathBuf,
    /// The PostgreSQL database of Terraform's `pg` backend; Baton keeps its plan
    /// and state history there too (schema `baton_terraform`).
    pub state_url: Secret<String>,
    /// State schema per service and zone: `{zone}` and `{service}` are replaced
    /// (`-` and `.` read as `_`).
    pub state_schema: String,
    /// How long Terraform waits for a held state lock when the step does not say.
    pub lock_timeout_secs: u64,
    /// A provider mirror directory (`terraform providers mirror`), or none: the
    /// built-in `terraform_data` needs no provider.
    pub provider_mirror: Option<PathBuf>,
}

impl Default for InfraConfig {
    fn default() -> Self {
        Self {
            terraform: PathBuf::from("terraform"),
            repos_dir: PathBuf::from("/var/cache/baton/repos"),
            work_dir: PathBuf::from("/var/lib/baton/infrastructure"),
            state_url: Secret::new("postgres://postgres@127.0.0.1:5432/terraform".to_owned()),
            state_schema: "tf_{zone}_{service}".to_owned(),
            lock_timeout_secs: 300,
            provider_mirror: None,
        }
    }
}

impl InfraConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.terraform.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "infrastructure.terraform",
                "must name the terraform binary",
            ));
        }
        ConfigError::check_absolute("infrastructure.repos_dir", &self.repos_dir)?;
        ConfigError::check_absolute("infrastructure.work_dir", &self.work_dir)?;
        if let Some(m) = &self.provider_mirror {
            ConfigError::check_absolute("infrastructure.provider_mirror", m)?;
        }
        let url = self.state_url.expose();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError::invalid(
                "infrastructure.state_url",
                "must be a postgres:// or postgresql:// URL",
            ));
        }
        PgConnectOptions::from_str(url).map_err(|e| {
            ConfigError::invalid(
                "infrastructure.state_url",
                format!("is not a valid PostgreSQL URL: {e}"),
            )
        })?;
        let probe = self.schema("production", "shop-api");
        let ok = !probe.is_empty()
            && probe.len() <= 63
            && probe.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && probe
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok || !self.state_schema.contains("{service}") {
            return Err(ConfigError::invalid(
                "infrastructure.state_schema",
                format!(
                    "{:?}: expected a lowercase PostgreSQL identifier naming {{service}} (and {{zone}} if zones share a database)",
                    self.state_schema
                ),
            ));
        }
        if self.lock_timeout_secs == 0 {
            return Err(ConfigError::invalid(
                "infrastructure.lock_timeout_secs",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// The state schema of `service` in `zone`.
    pub fn schema(&self, zone: &str, service: &str) -> String {
        let ident = |s: &str| s.to_lowercase().replace(['-', '.'], "_");
        self.state_schema
            .replace("{zone}", &ident(zone))
            .replace("{service}", &ident(service))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_schemas_are_identifiers() {
        let c = InfraConfig::default();
        c.validate().unwrap();
        assert_eq!(c.schema("production", "shop-api"), "tf_production_shop_api");
    }

    #[test]
    fn bad_values_name_their_key() {
        let c = InfraConfig {
            state_schema: "tf-{zone}".into(),
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("infrastructure.state_schema")
        );
        let c = InfraConfig {
            state_url: Secret::new("mysql://u:secret@db/x".into()),
            ..Default::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("infrastructure.state_url") && !e.contains("secret@"), "{e}");
        let c = InfraConfig {
            work_dir: "rel".into(),
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("infrastructure.work_dir")
        );
    }
}
