//! The backup daemon's configuration: the shared daemon settings plus `[backup]`.
//!
//! Loaded with `baton_shared::config::load` (defaults from `#[serde(default)]`,
//! then the TOML file, then `BATON_*` variables). Database URLs and the admin
//! URL are [`Secret`]s; the age identity is read from `identity_file` when the
//! role is built, never stored in the configuration itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use baton_shared::config::DaemonConfig;
use baton_shared::secret::Secret;
use serde::{Deserialize, Serialize};

use crate::error::BackupError;
use crate::region;
use crate::schedule::ScheduleSettings;

/// Everything `baton-backup` reads: the shared daemon sections and `[backup]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// `[amqp]`, `[daemon]`, `[log]` and whatever else every daemon shares;
    /// flattened so this crate follows the shared type as it grows.
    #[serde(flatten)]
    pub common: DaemonConfig,
    pub backup: BackupSettings,
}

impl Config {
    /// Checks every section; the error names the offending key.
    pub fn validate(&self) -> Result<(), BackupError> {
        self.backup.validate()?;
        self.common.validate().map_err(|e| match e {
            baton_shared::config::ConfigError::Invalid { key, problem } => BackupError::config(key, problem),
            other => BackupError::config("daemon", other.to_string()),
        })
    }
}

/// One storage location: a directory on a mounted volume, tagged with its region.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LocationConfig {
    /// Absolute path of the directory backups are written under.
    pub path: PathBuf,
    /// Where the storage physically is; must be an EU region (see `region.rs`).
    pub region: String,
}

/// `[backup]`: where backups go, how they are encrypted, what is backed up.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct BackupSettings {
    /// PostgreSQL URL of a maintenance database (e.g. `postgres`) on the cluster
    /// where scratch databases for restore spot checks are created and dropped.
    pub admin_url: Secret<String>,
    /// age X25519 public keys (`age1...`) every backup is encrypted to.
    pub recipients: Vec<String>,
    /// File with the age identity (`AGE-SECRET-KEY-1...`) used for verify and restore.
    pub identity_file: PathBuf,
    /// The first location (written first, read for restores).
    pub primary: LocationConfig,
    /// The cross-zone copy: another availability zone, also in the EU.
    pub copy: LocationConfig,
    /// Service name -> PostgreSQL URL of that service's database in this zone.
    pub databases: BTreeMap<String, Secret<String>>,
    /// Directory holding `pg_dump`, `pg_restore` and `psql`; empty means `PATH`.
    pub pg_bin_dir: PathBuf,
    /// `prune` never deletes a backup younger than this many hours, whatever the
    /// retention policy says: a run under way may still need to restore it.
    pub keep_recent_hours: u32,
    /// `[backup.schedule]`: the daily backup, prune and monthly restore test.
    pub schedule: ScheduleSettings,
}

impl Default for BackupSettings {
    fn default() -> Self {
        Self {
            admin_url: Secret::new(String::new()),
            recipients: Vec::new(),
            identity_file: PathBuf::new(),
            primary: LocationConfig::default(),
            copy: LocationConfig::default(),
            databases: BTreeMap::new(),
            pg_bin_dir: PathBuf::new(),
            keep_recent_hours: 48,
            schedule: ScheduleSettings::default(),
        }
    }
}

impl BackupSettings {
    /// Checks what can be checked without touching the identity file or a database.
    pub fn validate(&self) -> Result<(), BackupError> {
        check_pg_url("backup.admin_url", self.admin_url.expose())?;
        if self.recipients.is_empty() {
            return Err(BackupError::config(
                "backup.recipients",
                "must list at least one age public key (age1...): backups are encrypted at rest",
            ));
        }
        for (i, r) in self.recipients.iter().enumerate() {
            r.parse::<age::x25519::Recipient>().map_err(|e| {
                BackupError::config(
                    format!("backup.recipients[{i}]"),
                    format!("is {r:?}, not an age X25519 public key: {e}"),
                )
            })?;
        }
        if self.identity_file.as_os_str().is_empty() {
            return Err(BackupError::config(
                "backup.identity_file",
                "is required: verify and restore decrypt backups with it",
            ));
        }
        check_location("backup.primary", &self.primary)?;
        check_location("backup.copy", &self.copy)?;
        let (p, c) = (&self.primary.path, &self.copy.path);
        if p == c || p.starts_with(c) || c.starts_with(p) {
            return Err(BackupError::config(
                "backup.copy.path",
                format!(
                    "is {}, which overlaps backup.primary.path {}; the copy must be a separate location",
                    c.display(),
                    p.display()
                ),
            ));
        }
        if self.primary.region == self.copy.region {
            return Err(BackupError::config(
                "backup.copy.region",
                format!(
                    "is {:?}, the same as backup.primary.region; the copy must be in another availability zone",
                    self.copy.region
                ),
            ));
        }
        if self.databases.is_empty() {
            return Err(BackupError::config(
                "backup.databases",
                "must map at least one service to its database URL",
            ));
        }
        for (service, url) in &self.databases {
            let key = format!("backup.databases.{service}");
            baton_shared::protocol::check_name("config", "service", service)
                .map_err(|e| BackupError::config(key.clone(), e.to_string()))?;
            check_pg_url(&key, url.expose())?;
        }
        self.schedule.validate()
    }

    /// The path of `program` (`pg_dump`, ...) as configured.
    pub fn tool(&self, program: &str) -> PathBuf {
        if self.pg_bin_dir.as_os_str().is_empty() {
            PathBuf::from(program)
        } else {
            self.pg_bin_dir.join(program)
        }
    }
}

fn check_location(key: &str, loc: &LocationConfig) -> Result<(), BackupError> {
    if loc.path.as_os_str().is_empty() || !loc.path.is_absolute() {
        return Err(BackupError::config(
            format!("{key}.path"),
            format!(
                "must be an absolute directory path (is {:?})",
                loc.path.display().to_string()
            ),
        ));
    }
    if has_dot_segments(&loc.path) {
        return Err(BackupError::config(
            format!("{key}.path"),
            "must not contain `.` or `..` segments",
        ));
    }
    if region::eu_country(&loc.region).is_none() {
        return Err(BackupError::config(
            format!("{key}.region"),
            format!(
                "is {:?}, which is not an EU region; backups are stored in the EU only. Allowed: {}",
                loc.region,
                region::allowed_description()
            ),
        ));
    }
    Ok(())
}

fn has_dot_segments(p: &Path) -> bool {
    p.components()
        .any(|c| matches!(c, std::path::Component::CurDir | std::path::Component::ParentDir))
}

/// Parses a PostgreSQL URL without ever echoing it (it may hold a password).
fn check_pg_url(key: &str, url: &str) -> Result<(), BackupError> {
    if url.is_empty() {
        return Err(BackupError::config(key, "is required (a postgres:// URL)"));
    }
    crate::pg::PgTarget::parse(url).map_err(|problem| BackupError::config(key, problem))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn valid() -> BackupSettings {
        let id = age::x25519::Identity::generate();
        BackupSettings {
            admin_url: Secret::new("postgres://postgres@127.0.0.1:5432/postgres".into()),
            recipients: vec![id.to_public().to_string()],
            identity_file: "/etc/baton/age.key".into(),
            primary: LocationConfig {
                path: "/srv/backups/a".into(),
                region: "nl-ams1".into(),
            },
            copy: LocationConfig {
                path: "/srv/backups/b".into(),
                region: "nl-ams2".into(),
            },
            databases: [(
                "shop-api".to_owned(),
                Secret::new("postgres://backup:pw@db:5432/shop".to_owned()),
            )]
            .into(),
            ..BackupSettings::default()
        }
    }

    fn key_of(e: BackupError) -> String {
        match e {
            BackupError::Config { key, .. } => key,
            other => panic!("not a config error: {other}"),
        }
    }

    #[test]
    fn a_valid_configuration_passes() {
        valid().validate().unwrap();
    }

    #[test]
    fn non_eu_location_is_refused_naming_key_and_region() {
        let mut s = valid();
        s.copy.region = "us-east-1".into();
        let err = s.validate().unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("`backup.copy.region`") && text.contains("us-east-1"),
            "{text}"
        );
        let mut s = valid();
        s.primary.region = "eu-west-2".into();
        assert_eq!(key_of(s.validate().unwrap_err()), "backup.primary.region");
    }

    #[test]
    fn copy_must_be_a_different_location_and_zone() {
        let mut s = valid();
        s.copy.path = s.primary.path.join("copy");
        assert_eq!(key_of(s.validate().unwrap_err()), "backup.copy.path");
        let mut s = valid();
        s.copy.region = s.primary.region.clone();
        assert_eq!(key_of(s.validate().unwrap_err()), "backup.copy.region");
    }

    #[test]
    fn bad_recipients_and_urls_are_named_without_secrets() {
        let mut s = valid();
        s.recipients.push("age1nope".into());
        assert_eq!(key_of(s.validate().unwrap_err()), "backup.recipients[1]");
        let mut s = valid();
        s.databases
            .insert("shop-api".into(), Secret::new("mysql://u:hunter2@db/x".into()));
        let err = s.validate().unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert_eq!(key_of(err), "backup.databases.shop-api");
        let mut s = valid();
        s.recipients.clear();
        assert_eq!(key_of(s.validate().unwrap_err()), "backup.recipients");
        let mut s = valid();
        s.primary.path = "relative/dir".into();
        assert_eq!(key_of(s.validate().unwrap_err()), "backup.primary.path");
    }

    #[test]
    fn rendered_config_redacts_database_urls() {
        let cfg = Config {
            backup: valid(),
            ..Config::default()
        };
        let text = baton_shared::config::render(&cfg);
        assert!(!text.contains("backup:pw"), "{text}");
        assert!(
            text.contains("[backup.databases]") && text.contains("[redacted]"),
            "{text}"
        );
    }
}
