//! The backup daemon's configuration: the shared daemon settings plus `[backup]`.
//!
//! Loaded with `baton_shared::config::load` (defaults from `#[serde(default)]`,
//! then the TOML file, then `BATON_*` variables). Database URLs and the admin
//! URL are [`Secret`]s; the age identity is read from `identity_file` when the
//! role is built, never stored in the configuration itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use baton_shared::secret::Secret;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::region;
use crate::retention::Policy;
use chrono::NaiveTime;

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
    /// Service name -> its persistent volumes on this node, backed up with its
    /// database (`[[backup.volumes.<service>]]`).
    pub volumes: BTreeMap<String, Vec<VolumeConfig>>,
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
            volumes: BTreeMap::new(),
            pg_bin_dir: PathBuf::new(),
            keep_recent_hours: 48,
            schedule: ScheduleSettings::default(),
        }
    }
}

impl BackupSettings {
    /// Checks what can be checked without touching the identity file or a database.
    pub fn validate(&self) -> Result<(), Error> {
        check_pg_url("backup.admin_url", self.admin_url.expose())?;
        if self.recipients.is_empty() {
            return Err(Error::config(
                "backup.recipients",
                "must list at least one age public key (age1...): backups are encrypted at rest",
            ));
        }
        for (i, r) in self.recipients.iter().enumerate() {
            r.parse::<age::x25519::Recipient>().map_err(|e| {
                Error::config(
                    format!("backup.recipients[{i}]"),
                    format!("is {r:?}, not an age X25519 public key: {e}"),
                )
            })?;
        }
        if self.identity_file.as_os_str().is_empty() {
            return Err(Error::config(
                "backup.identity_file",
                "is required: verify and restore decrypt backups with it",
            ));
        }
        check_location("backup.primary", &self.primary)?;
        check_location("backup.copy", &self.copy)?;
        let (p, c) = (&self.primary.path, &self.copy.path);
        if p == c || p.starts_with(c) || c.starts_with(p) {
            return Err(Error::config(
                "backup.copy.path",
                format!(
                    "is {}, which overlaps backup.primary.path {}; the copy must be a separate location",
                    c.display(),
                    p.display()
                ),
            ));
        }
        if self.primary.region == self.copy.region {
            return Err(Error::config(
                "backup.copy.region",
                format!(
                    "is {:?}, the same as backup.primary.region; the copy must be in another availability zone",
                    self.copy.region
                ),
            ));
        }
        if self.databases.is_empty() {
            return Err(Error::config(
                "backup.databases",
                "must map at least one service to its database URL",
            ));
        }
        for (service, url) in &self.databases {
            let key = format!("backup.databases.{service}");
            baton_shared::protocol::check_name("config", "service", service)
                .map_err(|e| Error::config(key.clone(), e.to_string()))?;
            check_pg_url(&key, url.expose())?;
        }
        for (service, volumes) in &self.volumes {
            self.check_volumes(service, volumes)?;
        }
        self.schedule.validate()
    }

    fn check_volumes(&self, service: &str, volumes: &[VolumeConfig]) -> Result<(), Error> {
        let key = format!("backup.volumes.{service}");
        if !self.databases.contains_key(service) {
            return Err(Error::config(
                key,
                format!(
                    "names service {service:?}, which has no database in backup.databases; a service's volumes are backed up with its database"
                ),
            ));
        }
        for (i, v) in volumes.iter().enumerate() {
            let key = format!("{key}[{i}]");
            if !crate::volume::valid_claim(&v.claim) {
                return Err(Error::config(
                    format!("{key}.claim"),
                    format!(
                        "is {:?}, not a PersistentVolumeClaim name (lowercase letters, digits, `-` and `.`)",
                        v.claim
                    ),
                ));
            }
            if volumes[..i].iter().any(|o| o.claim == v.claim) {
                return Err(Error::config(
                    format!("{key}.claim"),
                    format!("{:?} is listed twice", v.claim),
                ));
            }
            if !v.path.is_absolute() || has_dot_segments(&v.path) || v.path.parent().is_none() {
                return Err(Error::config(
                    format!("{key}.path"),
                    format!(
                        "must be an absolute directory path without `.` or `..` segments, not the root (is {:?})",
                        v.path.display().to_string()
                    ),
                ));
            }
            for (loc_key, loc) in [
                ("backup.primary.path", &self.primary.path),
                ("backup.copy.path", &self.copy.path),
            ] {
                if loc.starts_with(&v.path) || v.path.starts_with(loc) {
                    return Err(Error::config(
                        format!("{key}.path"),
                        format!("{} overlaps {loc_key} {}", v.path.display(), loc.display()),
                    ));
                }
            }
            if v.quiesce.is_empty() != v.resume.is_empty() {
                return Err(Error::config(
                    format!("{key}.{}", if v.quiesce.is_empty() { "quiesce" } else { "resume" }),
                    "is required with the other: a service whose writes are held must be let go again",
                ));
            }
            if v.quiesce.first().is_some_and(String::is_empty) || v.resume.first().is_some_and(String::is_empty) {
                return Err(Error::config(key, "quiesce and resume must start with a program"));
            }
        }
        Ok(())
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

fn check_location(key: &str, loc: &LocationConfig) -> Result<(), Error> {
    if loc.path.as_os_str().is_empty() || !loc.path.is_absolute() {
        return Err(Error::config(
            format!("{key}.path"),
            format!(
                "must be an absolute directory path (is {:?})",
                loc.path.display().to_string()
            ),
        ));
    }
    if has_dot_segments(&loc.path) {
        return Err(Error::config(
            format!("{key}.path"),
            "must not contain `.` or `..` segments",
        ));
    }
    if region::eu_country(&loc.region).is_none() {
        return Err(Error::config(
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
fn check_pg_url(key: &str, url: &str) -> Result<(), Error> {
    if url.is_empty() {
        return Err(Error::config(key, "is required (a postgres:// URL)"));
    }
    crate::pg::PgTarget::parse(url).map_err(|problem| Error::config(key, problem))?;
    Ok(())
}

/// One persistent volume of a service: `[[backup.volumes.<service>]]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VolumeConfig {
    /// The PersistentVolumeClaim's name; the backup records the volume under it.
    pub claim: String,
    /// The volume's directory on this node (for k3s's local-path provisioner,
    /// `/var/lib/rancher/k3s/storage/<volume>_<namespace>_<claim>`).
    pub path: PathBuf,
    /// A command (program and arguments) that holds the service's writes, run
    /// before the copy; empty when the service offers none (the copy is then
    /// made live, and the backup says so).
    pub quiesce: Vec<String>,
    /// The command that lets the writes go again, run after the copy whatever happened.
    pub resume: Vec<String>,
}

/// `[backup.schedule]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleSettings {
    /// Whether the daemon does the daily backup, prune and monthly restore
    /// test itself. Turn it off where the zone takes no routine backups (the
    /// seed's dev zone) or another daemon of the zone already does them.
    pub enabled: bool,
    /// Time of day, UTC, `HH:MM`, at which the daily work falls due.
    pub daily_at: String,
    /// Day of the month (1-28) from which the month's restore test is due.
    pub restore_test_day: u32,
    /// After a pass with a failed task, wait this long before trying again.
    pub retry_secs: u64,
    /// The policy the daily prune applies.
    pub retention: Policy,
}

impl Default for ScheduleSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            daily_at: "02:00".into(),
            restore_test_day: 1,
            retry_secs: 900,
            retention: Policy::default(),
        }
    }
}

impl ScheduleSettings {
    /// Checks the settings; the error names the key.
    pub fn validate(&self) -> Result<(), Error> {
        self.time_of_day()?;
        if !(1..=28).contains(&self.restore_test_day) {
            return Err(Error::config(
                "backup.schedule.restore_test_day",
                format!(
                    "is {}; it must be a day of the month from 1 to 28, which every month has",
                    self.restore_test_day
                ),
            ));
        }
        if self.retry_secs == 0 {
            return Err(Error::config("backup.schedule.retry_secs", "must be positive"));
        }
        Ok(())
    }

    /// `daily_at` as a time of day.
    pub fn time_of_day(&self) -> Result<NaiveTime, Error> {
        let bad = || {
            Error::config(
                "backup.schedule.daily_at",
                format!(
                    "is {:?}; expected a UTC time of day as HH:MM, e.g. \"02:00\"",
                    self.daily_at
                ),
            )
        };
        if self.daily_at.len() != 5 {
            return Err(bad());
        }
        NaiveTime::parse_from_str(&self.daily_at, "%H:%M").map_err(|_| bad())
    }
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

    fn key_of(e: Error) -> String {
        match e {
            Error::Config { key, .. } => key,
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
        let cfg = baton_shared::kit::Config {
            common: Default::default(),
            settings: valid(),
        };
        let text = baton_shared::kit::render::<crate::Daemon>(&cfg);
        assert!(!text.contains("backup:pw"), "{text}");
        assert!(
            text.contains("[backup.databases]") && text.contains("[redacted]"),
            "{text}"
        );
    }
}
