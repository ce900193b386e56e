//! The daemon's configuration: the common daemon settings plus `[apply]`.
//!
//! ```toml
//! [daemon]
//! zone = "production"
//!
//! [apply]
//! kubeconfig = "/etc/baton/production.kubeconfig"
//! namespace = "{service}"
//! repos_dir = "/var/cache/baton/repos"
//! work_dir = "/var/lib/baton/production-apply"
//!
//! [apply.prometheus]
//! url = "http://prometheus.monitoring:9090"
//! error_percent = '100 * sum(rate(http_requests_total{namespace="{namespace}",code=~"5.."}[1m])) / sum(rate(http_requests_total{namespace="{namespace}"}[1m]))'
//! p95_ms = '1000 * histogram_quantile(0.95, sum by (le) (rate(http_request_duration_seconds_bucket{namespace="{namespace}"}[1m])))'
//! ```

use std::path::PathBuf;
use std::time::Duration;

use baton_shared::cluster::{HealthLimits, is_dns_label};
use baton_shared::config::ConfigError;
use serde::{Deserialize, Serialize};

/// `[apply]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApplyConfig {
    /// The production cluster: a kubeconfig file (its current context).
    pub kubeconfig: PathBuf,
    /// The namespace a service deploys to; `{service}` is replaced.
    pub namespace: String,
    /// `kubectl`, for `kubectl kustomize`.
    pub kubectl: PathBuf,
    /// Where bare clones of deployed repositories are cached.
    pub repos_dir: PathBuf,
    /// Each job's checkout (removed when the job ends).
    pub work_dir: PathBuf,
    /// How often rollouts and the monitoring look.
    pub poll_ms: u64,
    /// A running pod not ready this long after it started fails its readiness.
    pub readiness_grace_secs: u64,
    /// A container restarted this often is crash-looping.
    pub max_restarts: i32,
    /// Metrics for the monitoring period; without it only the API's health
    /// (rollout, readiness, restarts) is watched, and the outputs say so.
    pub prometheus: Option<PrometheusConfig>,
    /// For demos and tests only: the monitoring period in seconds whatever
    /// the step says. Production leaves it unset.
    pub monitor_seconds: Option<u64>,
}

/// `[apply.prometheus]`: the query API and two PromQL queries, each with
/// `{namespace}` and `{service}` replaced, answering one number.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrometheusConfig {
    pub url: String,
    /// Failed requests in percent of all.
    pub error_percent: String,
    /// 95th percentile latency in milliseconds.
    pub p95_ms: String,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        Self {
            kubeconfig: PathBuf::from("/etc/baton/kubeconfig"),
            namespace: "{service}".to_owned(),
            kubectl: PathBuf::from("kubectl"),
            repos_dir: PathBuf::from("/var/cache/baton/repos"),
            work_dir: PathBuf::from("/var/lib/baton/production-apply"),
            poll_ms: 1000,
            readiness_grace_secs: 120,
            max_restarts: 3,
            prometheus: None,
            monitor_seconds: None,
        }
    }
}

impl ApplyConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        ConfigError::check_absolute("apply.kubeconfig", &self.kubeconfig)?;
        ConfigError::check_absolute("apply.repos_dir", &self.repos_dir)?;
        ConfigError::check_absolute("apply.work_dir", &self.work_dir)?;
        if !is_dns_label(&self.namespace("shop-api")) {
            return Err(ConfigError::invalid(
                "apply.namespace",
                format!("{:?} does not make a namespace name (a DNS label)", self.namespace),
            ));
        }
        for (key, value) in [
            ("apply.poll_ms", self.poll_ms),
            ("apply.readiness_grace_secs", self.readiness_grace_secs),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        if self.max_restarts < 1 {
            return Err(ConfigError::invalid("apply.max_restarts", "must be at least 1"));
        }
        if let Some(p) = &self.prometheus {
            if !(p.url.starts_with("http://") || p.url.starts_with("https://")) {
                return Err(ConfigError::invalid("apply.prometheus.url", "must be an http:// URL"));
            }
            if p.url.starts_with("https://") {
                return Err(ConfigError::invalid(
                    "apply.prometheus.url",
                    "https is not supported by this daemon: reach Prometheus over http inside the cluster",
                ));
            }
            for (key, q) in [
                ("apply.prometheus.error_percent", &p.error_percent),
                ("apply.prometheus.p95_ms", &p.p95_ms),
            ] {
                if q.trim().is_empty() {
                    return Err(ConfigError::invalid(key, "must be a PromQL query"));
                }
            }
        }
        Ok(())
    }

    pub fn namespace(&self, service: &str) -> String {
        self.namespace.replace("{service}", service)
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
        ApplyConfig::default().validate().unwrap();
        let c = ApplyConfig {
            prometheus: Some(PrometheusConfig {
                url: "prometheus:9090".into(),
                error_percent: "x".into(),
                p95_ms: "y".into(),
            }),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("apply.prometheus.url"));
        let c = ApplyConfig {
            namespace: "{service}_prod".into(),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("apply.namespace"));
    }
}
