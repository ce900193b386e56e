//! Scheduler configuration (figment: defaults, `baton.toml`, `BATON_*`).

use std::time::Duration;

use baton_shared::config::{AmqpConfig, ConfigError, LogConfig, SigningConfig};
use baton_shared::secret::Secret;
use serde::{Deserialize, Serialize};

use std::net::SocketAddr;

use crate::engine::Settings;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub amqp: AmqpConfig,
    pub database: DatabaseConfig,
    pub scheduler: SchedulerSettings,
    pub signing: SigningConfig,
    pub api: ApiConfig,
    pub gates: crate::gates::GatesConfig,
    /// Where operator commands reach the API.
    pub client: crate::client::ClientConfig,
    pub telemetry: baton_shared::telemetry::TelemetryConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DatabaseConfig {
    /// PostgreSQL URL of the scheduler's database.
    pub url: Secret<String>,
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("postgres://postgres@127.0.0.1:5432/baton".to_owned()),
            max_connections: 16,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerSettings {
    /// Name of this replica in history rows and logs; defaults to host name and pid.
    pub instance: String,
    /// Pipeline definition file; the shipped seed pipeline when unset.
    pub pipeline: Option<String>,
    /// A running attempt without a heartbeat for this long is presumed lost.
    pub lease_ms: u64,
    /// A job nobody started within this long is presumed lost; it also expires.
    pub accept_timeout_ms: u64,
    /// Heartbeat interval asked of daemons (well below `lease_ms`).
    pub heartbeat_ms: u64,
    /// Started attempts of a step that may be lost to dead daemons without
    /// counting against its `max_attempts` (docs/decisions.md).
    pub lost_attempts_limit: u32,
    /// How long a replica owns an outbox row it is publishing before others take over.
    pub claim_ms: u64,
    /// How often durable timers are checked.
    pub timer_poll_ms: u64,
    /// Results applied at once.
    pub result_concurrency: usize,
    /// Unacknowledged deliveries per consumer.
    pub prefetch: u16,
    /// Apply results from an unlocked read with a version-guarded write first
    /// (docs/decisions.md); off: always under the run's row lock.
    pub optimistic_apply: bool,
    /// Optimistic write statements in flight at once.
    pub write_concurrency: usize,
    /// The most runs one optimistic write statement carries (1: each alone).
    pub write_batch: usize,
    /// Which waiting run an environment takes when it frees: `fifo` (every
    /// run, oldest first) or `newest` (older waiting runs end `superseded`).
    pub queue_policy: QueuePolicy,
}

/// Which of an environment's waiting runs deploys next (docs/architecture.md, State machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueuePolicy {
    /// Every run deploys, in the order its merge event arrived.
    #[default]
    Fifo,
    /// Only the newest waiting run deploys: a run queued behind a waiting one
    /// ends that one `superseded` (its commit is in the newer one's history).
    Newest,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        Self {
            instance: String::new(),
            pipeline: None,
            lease_ms: 30_000,
            accept_timeout_ms: 60_000,
            heartbeat_ms: 5_000,
            lost_attempts_limit: 10,
            claim_ms: 5_000,
            timer_poll_ms: 100,
            result_concurrency: 16,
            prefetch: 256,
            optimistic_apply: true,
            write_concurrency: 1,
            write_batch: 64,
            queue_policy: QueuePolicy::Fifo,
        }
    }
}

impl Config {
    /// What `baton scheduler` needs on top of [`Self::validate`]: its signing keys.
    /// (Operator commands never sign anything.)
    pub fn validate_for_serving(&self) -> Result<(), ConfigError> {
        self.validate()?;
        self.signing.validate()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.amqp.validate()?;
        self.api.validate()?;
        self.telemetry.validate()?;
        self.gates.validate()?;
        let url = self.database.url.expose();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError::invalid(
                "database.url",
                "must start with postgres:// or postgresql://",
            ));
        }
        let s = &self.scheduler;
        if s.heartbeat_ms == 0 || s.heartbeat_ms * 2 > s.lease_ms {
            return Err(ConfigError::invalid(
                "scheduler.heartbeat_ms",
                format!(
                    "must be positive and at most half of scheduler.lease_ms ({})",
                    s.lease_ms
                ),
            ));
        }
        if s.accept_timeout_ms == 0 {
            return Err(ConfigError::invalid("scheduler.accept_timeout_ms", "must be positive"));
        }
        if s.claim_ms == 0 || s.timer_poll_ms == 0 {
            return Err(ConfigError::invalid(
                "scheduler.claim_ms",
                "and scheduler.timer_poll_ms must be positive",
            ));
        }
        if s.result_concurrency == 0 || s.prefetch == 0 || self.database.max_connections < 2 {
            return Err(ConfigError::invalid(
                "scheduler.result_concurrency",
                "scheduler.prefetch must be positive and database.max_connections at least 2",
            ));
        }
        if s.write_concurrency == 0 || s.write_batch == 0 {
            return Err(ConfigError::invalid(
                "scheduler.write_concurrency",
                "and scheduler.write_batch must be positive",
            ));
        }
        Ok(())
    }

    pub fn engine_settings(&self) -> Result<Settings, ConfigError> {
        Ok(Settings {
            lease: Duration::from_millis(self.scheduler.lease_ms),
            accept_timeout: Duration::from_millis(self.scheduler.accept_timeout_ms),
            heartbeat: Duration::from_millis(self.scheduler.heartbeat_ms),
            lost_attempts_limit: self.scheduler.lost_attempts_limit,
            gates: std::sync::Arc::new(self.gates.validate()?),
        })
    }

    pub fn instance(&self) -> String {
        if self.scheduler.instance.is_empty() {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            format!("scheduler@{}-{}", host.trim(), std::process::id())
        } else {
            self.scheduler.instance.clone()
        }
    }
}

/// API settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ApiConfig {
    /// Address to listen on; empty disables the API.
    pub listen: String,
    /// Bearer tokens, by SHA-256 (`baton token new` prints an entry).
    pub tokens: Vec<TokenEntry>,
    /// Shared secret for the CI webhook's HMAC-SHA256 signature (by reference: `file:` or `env:`).
    pub webhook_secret: Option<Secret<String>>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Environment of an Alertmanager alert without an `environment` label.
    pub alertmanager_environment: String,
    /// Largest body of the Alertmanager webhook: one notification carries a
    /// whole group (300 alerts are about 270 KB).
    pub alertmanager_max_body_bytes: usize,
    /// Alertmanager's base URL (e.g. `http://alertmanager:9093`); set, the
    /// scheduler reads its active alerts every `alertmanager_reconcile_secs`
    /// and closes incidents whose alert is gone. Empty: off.
    pub alertmanager_url: String,
    pub alertmanager_reconcile_secs: u64,
    /// The web view's link to a run's trace: a URL with `{trace_id}` (e.g.
    /// Jaeger's `http://jaeger:16686/trace/{trace_id}`). Empty: no link.
    pub trace_url: String,
    /// Mark the web view's session cookie `Secure` (sent over HTTPS only): set it
    /// whenever the API is reached through TLS.
    pub secure_cookies: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".to_owned(),
            tokens: Vec::new(),
            webhook_secret: None,
            max_body_bytes: 256 * 1024,
            alertmanager_environment: "production".to_owned(),
            alertmanager_max_body_bytes: 8 * 1024 * 1024,
            alertmanager_url: String::new(),
            alertmanager_reconcile_secs: 60,
            trace_url: String::new(),
            secure_cookies: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Who holds the token, for the audit log.
    pub name: String,
    pub role: Role,
    /// Hex SHA-256 of the token.
    pub sha256: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Approver,
}

impl Role {
    pub(crate) fn allows(self, needed: Role) -> bool {
        self == needed || needed == Role::Viewer
    }
}

impl ApiConfig {
    pub fn validate(&self) -> Result<(), baton_shared::config::ConfigError> {
        use baton_shared::config::ConfigError;
        if !self.listen.is_empty() && self.listen.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::invalid(
                "api.listen",
                format!("{:?} is not host:port", self.listen),
            ));
        }
        if !self.trace_url.is_empty()
            && (!self.trace_url.contains("{trace_id}")
                || !(self.trace_url.starts_with("http://") || self.trace_url.starts_with("https://")))
        {
            return Err(ConfigError::invalid(
                "api.trace_url",
                format!("{:?} must be an http(s) URL with {{trace_id}} in it", self.trace_url),
            ));
        }
        for t in &self.tokens {
            if t.sha256.len() != 64 || hex::decode(&t.sha256).is_err() {
                return Err(ConfigError::invalid(
                    "api.tokens",
                    format!("token {:?}: sha256 must be 64 hex characters", t.name),
                ));
            }
        }
        if self.max_body_bytes < 1024 {
            return Err(ConfigError::invalid("api.max_body_bytes", "must be at least 1024"));
        }
        if self.alertmanager_max_body_bytes < 1024 {
            return Err(ConfigError::invalid(
                "api.alertmanager_max_body_bytes",
                "must be at least 1024",
            ));
        }
        if !(self.alertmanager_url.is_empty()
            || self.alertmanager_url.starts_with("http://")
            || self.alertmanager_url.starts_with("https://"))
        {
            return Err(ConfigError::invalid(
                "api.alertmanager_url",
                format!("{:?} is not an http(s) URL", self.alertmanager_url),
            ));
        }
        if self.alertmanager_reconcile_secs == 0 {
            return Err(ConfigError::invalid(
                "api.alertmanager_reconcile_secs",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_toml(name: &str, toml: &str) -> Result<Config, ConfigError> {
        let path = std::env::temp_dir().join(format!("baton-config-{name}-{}.toml", std::process::id()));
        std::fs::write(&path, toml).unwrap();
        let loaded = baton_shared::config::load::<Config>(Some(&path));
        let _ = std::fs::remove_file(&path);
        loaded
    }

    #[test]
    fn the_queue_policy_is_fifo_or_newest_and_anything_else_is_named() {
        assert_eq!(Config::default().scheduler.queue_policy, QueuePolicy::Fifo);
        let newest = load_toml("newest", "[scheduler]\nqueue_policy = \"newest\"\n").unwrap();
        assert_eq!(newest.scheduler.queue_policy, QueuePolicy::Newest);
        let err = load_toml("latest", "[scheduler]\nqueue_policy = \"latest\"\n")
            .unwrap_err()
            .to_string();
        for needle in ["queue_policy", "latest", "fifo", "newest"] {
            assert!(err.contains(needle), "the error names {needle:?}: {err}");
        }
    }
}
