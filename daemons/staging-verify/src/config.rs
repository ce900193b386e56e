//! The daemon's configuration: the common daemon settings plus `[verify]`.
//!
//! ```toml
//! [daemon]
//! zone = "staging"
//!
//! [verify]
//! kubeconfig = "/etc/baton/staging.kubeconfig"
//! namespace = "{service}"
//! base_url = "http://{service}.{namespace}.svc.cluster.local"
//! repos_dir = "/var/cache/baton/repos"
//! work_dir = "/var/lib/baton/staging-verify"
//! ```

use std::path::PathBuf;
use std::time::Duration;

use baton_shared::cluster::{HealthLimits, is_dns_label};
use baton_shared::config::ConfigError;
use serde::{Deserialize, Serialize};

/// `[verify]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerifyConfig {
    /// The staging cluster: a kubeconfig file (its current context).
    pub kubeconfig: PathBuf,
    /// The namespace a service deploys to; `{service}` is replaced.
    pub namespace: String,
    /// Where smoke tests, performance requests and the soak reach the service
    /// (plain HTTP, as inside the cluster); `{service}` and `{namespace}` are
    /// replaced.
    pub base_url: String,
    /// `kubectl`, for `kubectl kustomize`.
    pub kubectl: PathBuf,
    /// Where bare clones of deployed repositories are cached.
    pub repos_dir: PathBuf,
    /// Each job's checkout (removed when the job ends).
    pub work_dir: PathBuf,
    /// How often rollouts, Jobs and the soak are looked at.
    pub poll_ms: u64,
    /// How long a rollout may take before the step fails.
    pub rollout_timeout_secs: u64,
    /// A running pod not ready this long after it started fails its readiness.
    pub readiness_grace_secs: u64,
    /// A container restarted this often is crash-looping.
    pub max_restarts: i32,
    /// Latencies below this count as this much when comparing with the
    /// baseline: a 1 ms endpoint at 1.3 ms is noise, not a 30 % regression.
    pub noise_floor_ms: f64,
    /// One HTTP request's time limit.
    pub request_timeout_secs: u64,
    /// For demos and tests only: the soak in seconds whatever the step says.
    /// Production leaves it unset; the staging-soak gate refuses a soak
    /// shorter than its policy anyway.
    pub soak_seconds: Option<u64>,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        Self {
            kubeconfig: PathBuf::from("/etc/baton/kubeconfig"),
            namespace: "{service}".to_owned(),
            base_url: "http://{service}.{namespace}.svc.cluster.local".to_owned(),
            kubectl: PathBuf::from("kubectl"),
            repos_dir: PathBuf::from("/var/cache/baton/repos"),
            work_dir: PathBuf::from("/var/lib/baton/staging-verify"),
            poll_ms: 1000,
            rollout_timeout_secs: 600,
            readiness_grace_secs: 120,
            max_restarts: 3,
            noise_floor_ms: 10.0,
            request_timeout_secs: 10,
            soak_seconds: None,
        }
    }
}

impl VerifyConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        ConfigError::check_absolute("verify.kubeconfig", &self.kubeconfig)?;
        ConfigError::check_absolute("verify.repos_dir", &self.repos_dir)?;
        ConfigError::check_absolute("verify.work_dir", &self.work_dir)?;
        if !is_dns_label(&self.namespace("shop-api")) {
            return Err(ConfigError::invalid(
                "verify.namespace",
                format!("{:?} does not make a namespace name (a DNS label)", self.namespace),
            ));
        }
        if !self.base_url.starts_with("http://") {
            return Err(ConfigError::invalid(
                "verify.base_url",
                "must be an http:// URL (the service as reached inside the cluster; this daemon speaks no TLS)",
            ));
        }
        for (key, value) in [
            ("verify.poll_ms", self.poll_ms),
            ("verify.rollout_timeout_secs", self.rollout_timeout_secs),
            ("verify.readiness_grace_secs", self.readiness_grace_secs),
            ("verify.request_timeout_secs", self.request_timeout_secs),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        if self.max_restarts < 1 {
            return Err(ConfigError::invalid("verify.max_restarts", "must be at least 1"));
        }
        if !(self.noise_floor_ms.is_finite() && self.noise_floor_ms >= 0.0) {
            return Err(ConfigError::invalid(
                "verify.noise_floor_ms",
                "must be a number of at least 0",
            ));
        }
        Ok(())
    }

    pub fn namespace(&self, service: &str) -> String {
        self.namespace.replace("{service}", service)
    }

    pub fn base_url(&self, service: &str) -> String {
        self.base_url
            .replace("{namespace}", &self.namespace(service))
            .replace("{service}", service)
            .trim_end_matches('/')
            .to_owned()
    }

    pub fn limits(&self) -> HealthLimits {
        HealthLimits {
            max_restarts: self.max_restarts,
            readiness_grace: Duration::from_secs(self.readiness_grace_secs),
        }
    }

    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_key() {
        let c = VerifyConfig::default();
        c.validate().unwrap();
        assert_eq!(c.base_url("shop"), "http://shop.shop.svc.cluster.local");
        let c = VerifyConfig {
            namespace: "Staging_{service}".into(),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("verify.namespace"));
        let c = VerifyConfig {
            base_url: "https://x".into(),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("verify.base_url"));
    }
}
