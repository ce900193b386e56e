//! Configuration loading: defaults, then a TOML file, then `BATON_` environment
//! variables with `__` between nesting levels (`BATON_AMQP__URL`).
//!
//! `Env::split("_")` would cut snake_case keys apart, hence the double underscore.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use crate::config_error::ConfigError;
use crate::secret::Secret;
pub use crate::telemetry::LogConfig;

/// Loads `T` from its defaults, `baton.toml` (or the explicit `file`, which must
/// exist) and the environment.
pub fn load<T>(file: Option<&Path>) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
{
    figment(file)?.extract().map_err(|e| ConfigError::Figment(Box::new(e)))
}

/// The layered sources `load` extracts from: `baton.toml` (or the explicit
/// `file`, which must exist), then `BATON_` variables.
pub fn figment(file: Option<&Path>) -> Result<Figment, ConfigError> {
    // Defaults come from `#[serde(default)]` on the config types, not from a
    // serialised default value: secrets serialise redacted.
    let fig = Figment::new();
    let fig = match file {
        Some(path) => {
            if !path.exists() {
                return Err(ConfigError::MissingFile {
                    path: path.display().to_string(),
                });
            }
            fig.merge(Toml::file_exact(path))
        }
        None => fig.merge(Toml::file("baton.toml")),
    };
    Ok(fig.merge(Env::prefixed("BATON_").split("__")))
}

/// The effective configuration as TOML, secrets redacted by their type.
pub fn render<T: Serialize>(config: &T) -> String {
    toml_string(config)
}

fn toml_string<T: Serialize>(config: &T) -> String {
    // serde_json -> figment's TOML support is not a serializer; go through JSON
    // values and print them as `key = value` lines grouped by table.
    let value = serde_json::to_value(config).unwrap_or_default();
    let mut out = String::new();
    write_table(&mut out, "", &value);
    out
}

fn write_table(out: &mut String, prefix: &str, value: &serde_json::Value) {
    let serde_json::Value::Object(map) = value else {
        return;
    };
    let mut tables = Vec::new();
    if !prefix.is_empty() {
        out.push_str(&format!("[{prefix}]\n"));
    }
    for (k, v) in map {
        if v.is_object() {
            tables.push((k, v));
        } else if !v.is_null() {
            out.push_str(&format!("{k} = {v}\n"));
        }
    }
    for (k, v) in tables {
        let name = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        out.push('\n');
        write_table(out, &name, v);
    }
}

/// How to reach RabbitMQ.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct AmqpConfig {
    /// `amqp://` or `amqps://` URL, including credentials and vhost.
    pub url: Secret<String>,
    /// Deliveries of one message before it is dead-lettered.
    pub delivery_limit: i64,
    /// PEM file with the CA that signed the broker's certificate (`amqps://`).
    pub ca_file: Option<String>,
    /// Consecutive failed reconnects (backoff 0.2 s doubling to 5 s) after which the
    /// process gives up and exits for its supervisor to restart; 0 never gives up.
    pub reconnect_attempts: usize,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
            delivery_limit: crate::topology::DEFAULT_DELIVERY_LIMIT,
            ca_file: None,
            reconnect_attempts: 0,
        }
    }
}

impl AmqpConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = self.url.expose();
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(ConfigError::invalid("amqp.url", "must start with amqp:// or amqps://"));
        }
        if let Some(ca) = &self.ca_file
            && !std::path::Path::new(ca).is_file()
        {
            return Err(ConfigError::invalid(
                "amqp.ca_file",
                format!("{ca} is not a readable file"),
            ));
        }
        if self.delivery_limit < 1 {
            return Err(ConfigError::invalid("amqp.delivery_limit", "must be at least 1"));
        }
        Ok(())
    }
}

/// Message signing: this process's own key and the keys it trusts.
///
/// For the scheduler, `trusted` holds the daemons' public keys (results);
/// for a daemon, the scheduler's (jobs and cancels). Several keys may be
/// trusted at once while keys rotate.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SigningConfig {
    /// File with this process's secret key (`baton keygen` makes one).
    pub key_file: String,
    /// Trusted public keys, `<key id>:<hex>`.
    pub trusted: Vec<String>,
}

impl SigningConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.key_file.is_empty() {
            return Err(ConfigError::invalid(
                "signing.key_file",
                "is required: every job and result is signed (create one with `baton keygen`)",
            ));
        }
        if self.trusted.is_empty() {
            return Err(ConfigError::invalid(
                "signing.trusted",
                "must list at least one public key",
            ));
        }
        crate::signing::Trusted::parse(&self.trusted)
            .map_err(|e| ConfigError::invalid("signing.trusted", e.to_string()))?;
        Ok(())
    }

    /// Loads the key and the trusted set.
    pub fn load(&self) -> Result<(crate::signing::Keypair, crate::signing::Trusted), ConfigError> {
        let key = crate::signing::Keypair::load(std::path::Path::new(&self.key_file))
            .map_err(|e| ConfigError::invalid("signing.key_file", e.to_string()))?;
        let trusted = crate::signing::Trusted::parse(&self.trusted)
            .map_err(|e| ConfigError::invalid("signing.trusted", e.to_string()))?;
        Ok((key, trusted))
    }
}

/// The longest `daemon.report_started_after_ms` accepted.
pub const MAX_REPORT_STARTED_AFTER_MS: u64 = 1_000;

/// Everything a role daemon needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DaemonConfig {
    pub amqp: AmqpConfig,
    pub daemon: DaemonSettings,
    pub signing: SigningConfig,
    pub telemetry: crate::telemetry::TelemetryConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DaemonSettings {
    /// The zone this daemon serves (`staging`, `production`, ...).
    pub zone: String,
    /// Name of this instance in results and logs; defaults to host name and pid.
    pub instance: String,
    /// Jobs executed at once.
    pub concurrency: usize,
    /// Unacknowledged deliveries the broker may push ahead (quorum queues want >= 10).
    pub prefetch: u16,
    /// Seconds granted to running jobs after SIGTERM before they are handed back.
    pub shutdown_grace_secs: u64,
    /// Declare the zone/role queue on start (off when ops definitions own topology).
    pub declare_queue: bool,
    /// Address for `/healthz`, `/readyz` and `/metrics`; empty disables them.
    pub http_listen: String,
    /// A job that ends within this many milliseconds reports only its outcome
    /// (the job's delivery stays unacknowledged until its work is done); a longer one
    /// reports `started` at this point. 0 reports `started` before the work
    /// begins.
    pub report_started_after_ms: u64,
    /// PostgreSQL database the zone's daemons share to refuse a replayed job
    /// in every replica and after restarts (`shared/src/ledger.rs`); unset,
    /// each process remembers only what it received itself.
    pub ledger_url: Option<Secret<String>>,
}

impl Default for DaemonSettings {
    fn default() -> Self {
        Self {
            zone: String::new(),
            instance: String::new(),
            concurrency: 8,
            prefetch: 16,
            shutdown_grace_secs: 30,
            declare_queue: true,
            http_listen: String::new(),
            report_started_after_ms: 10,
            ledger_url: None,
        }
    }
}

impl DaemonConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.amqp.validate()?;
        self.signing.validate()?;
        self.telemetry.validate()?;
        self.validate_zone()?;
        if self.daemon.concurrency == 0 {
            return Err(ConfigError::invalid("daemon.concurrency", "must be at least 1"));
        }
        if self.daemon.prefetch == 0 {
            return Err(ConfigError::invalid("daemon.prefetch", "must be at least 1"));
        }
        if let Some(url) = &self.daemon.ledger_url {
            let u = url.expose();
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                return Err(ConfigError::invalid(
                    "daemon.ledger_url",
                    "must be a postgres:// URL (the zone's replay ledger)",
                ));
            }
        }
        if self.daemon.report_started_after_ms > MAX_REPORT_STARTED_AFTER_MS {
            return Err(ConfigError::invalid(
                "daemon.report_started_after_ms",
                format!(
                    "must be at most {MAX_REPORT_STARTED_AFTER_MS} (every longer job reports `started` this late, and its delivery stays unacknowledged until then)"
                ),
            ));
        }
        Ok(())
    }

    /// `daemon.zone`: set, and a name a queue can carry. All a daemon's
    /// one-shot modes need of the shared sections.
    pub fn validate_zone(&self) -> Result<(), ConfigError> {
        if self.daemon.zone.is_empty() {
            return Err(ConfigError::invalid(
                "daemon.zone",
                "is required (e.g. BATON_DAEMON__ZONE=staging)",
            ));
        }
        crate::protocol::check_name("config", "daemon.zone", &self.daemon.zone)
            .map_err(|e| ConfigError::invalid("daemon.zone", e.to_string()))
    }

    /// The instance name, filled in from host and pid when not configured.
    pub fn instance(&self) -> String {
        if self.daemon.instance.is_empty() {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        } else {
            self.daemon.instance.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_missing_file_is_an_error() {
        let err = load::<DaemonConfig>(Some(Path::new("/nonexistent/baton.toml"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/baton.toml"));
    }

    #[test]
    fn file_values_override_defaults_and_are_typed() {
        let dir = std::env::temp_dir().join(format!("baton-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.toml");
        std::fs::write(&path, "[daemon]\nzone = \"staging\"\nconcurrency = \"many\"\n").unwrap();
        let err = load::<DaemonConfig>(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("concurrency"), "{err}");
        let key = crate::signing::Keypair::generate();
        std::fs::write(dir.join("key"), key.secret_file_contents()).unwrap();
        let text = format!(
            "[daemon]\nzone = \"staging\"\nconcurrency = 3\n[signing]\nkey_file = {:?}\ntrusted = [{:?}]\n",
            dir.join("key").display().to_string(),
            key.public()
        );
        std::fs::write(&path, text).unwrap();
        let cfg = load::<DaemonConfig>(Some(&path)).unwrap();
        assert_eq!((cfg.daemon.zone.as_str(), cfg.daemon.concurrency), ("staging", 3));
        cfg.validate().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rendered_config_redacts_the_broker_url() {
        let text = render(&DaemonConfig::default());
        assert!(text.contains("[amqp]") && text.contains("[redacted]"), "{text}");
        assert!(!text.contains("guest:guest"), "{text}");
    }
}
