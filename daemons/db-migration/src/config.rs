//! The daemon's configuration: the common daemon settings plus a `[migration]` section.
//!
//! ```toml
//! [daemon]
//! zone = "production"
//!
//! [migration]
//! repos_dir = "/var/cache/baton/repos"
//! admin_url = "postgres://baton_admin@db-scratch:5432/postgres"
//! lock_timeout_secs = 300
//!
//! [migration.databases]
//! shop-api = "postgres://migrator@db-prod:5432/shop"
//! ```
//!
//! Database URLs are secrets: they print as `[redacted]`. In the environment,
//! `BATON_MIGRATION__DATABASES__SHOP_API=postgres://…` sets the database of service
//! `shop-api`: figment lowercases environment keys and a shell cannot put `-` or `.` in
//! a variable name, so service names are looked up with `-` and `.` read as `_`
//! (`shop-api`, `shop_api` and `shop.api` are the same key, and a file that lists two
//! of them is refused).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use baton_shared::config::ConfigError;
use baton_shared::secret::Secret;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnectOptions;

/// `[migration]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct MigrationConfig {
    /// Where bare clones of deployed repositories are cached.
    pub repos_dir: PathBuf,
    /// A role allowed to create and drop databases, for the scratch databases that
    /// `verify` replays the migrations on. Its database part is only used to connect.
    pub admin_url: Secret<String>,
    /// How long a migration waits for another one on the same database to finish.
    pub lock_timeout_secs: u64,
    /// Service name -> URL of the database its migrations apply to, in this zone.
    pub databases: BTreeMap<String, Secret<String>>,
    /// Zones where a destructive migration needs a verified pre-deploy backup.
    pub backup_required_zones: Vec<String>,
    /// Checks a service's database in this zone must pass before any migration
    /// runs: each query counts offending rows, and must count none (the seed:
    /// staging holds an anonymised snapshot of production's data, so e.g. no
    /// customer e-mail address in production's domain). A table that does not
    /// exist yet has nothing to check.
    pub data_checks: BTreeMap<String, Vec<DataCheck>>,
}

/// One of `data_checks`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataCheck {
    /// What it checks, as reports name it.
    pub name: String,
    /// A read-only query returning one count (e.g. `select count(*) from
    /// customers where email like '%@shop.example'`).
    pub query: String,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            repos_dir: PathBuf::from("/var/cache/baton/repos"),
            admin_url: Secret::new("postgres://postgres@127.0.0.1:5432/postgres".to_owned()),
            lock_timeout_secs: 300,
            databases: BTreeMap::new(),
            backup_required_zones: vec!["production".to_owned()],
            data_checks: BTreeMap::new(),
        }
    }
}

/// The form service names are compared in (see the module docs).
pub fn normalize_service(name: &str) -> String {
    name.to_lowercase().replace(['-', '.'], "_")
}

fn check_url(key: &'static str, what: &str, url: &str) -> Result<(), ConfigError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(ConfigError::invalid(
            key,
            format!("{what}must be a postgres:// or postgresql:// URL"),
        ));
    }
    // The parser's messages do not repeat the URL, so they are safe to show.
    PgConnectOptions::from_str(url)
        .map(|_| ())
        .map_err(|e| ConfigError::invalid(key, format!("{what}is not a valid PostgreSQL URL: {e}")))
}

impl MigrationConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.repos_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid("migration.repos_dir", "must not be empty"));
        }
        if self.repos_dir.is_relative() {
            return Err(ConfigError::invalid(
                "migration.repos_dir",
                format!(
                    "{} is a relative path: give an absolute one (a relative path would depend on the \
                     daemon's working directory)",
                    self.repos_dir.display()
                ),
            ));
        }
        check_url("migration.admin_url", "", self.admin_url.expose())?;
        if self.lock_timeout_secs == 0 {
            return Err(ConfigError::invalid(
                "migration.lock_timeout_secs",
                "must be at least 1",
            ));
        }
        let mut seen = BTreeMap::new();
        for (service, url) in &self.databases {
            if let Some(other) = seen.insert(normalize_service(service), service) {
                return Err(ConfigError::invalid(
                    "migration.databases",
                    format!("lists both {other:?} and {service:?}, which are the same service name"),
                ));
            }
            check_url("migration.databases", &format!("entry {service:?} "), url.expose())?;
        }
        for (service, checks) in &self.data_checks {
            for c in checks {
                if c.name.trim().is_empty() || c.query.trim().is_empty() {
                    return Err(ConfigError::invalid(
                        "migration.data_checks",
                        format!("a check of {service:?} needs a name and a query"),
                    ));
                }
            }
        }
        for zone in &self.backup_required_zones {
            baton_shared::protocol::check_name("config", "migration.backup_required_zones", zone)
                .map_err(|e| ConfigError::invalid("migration.backup_required_zones", e.to_string()))?;
        }
        Ok(())
    }

    /// The data checks of `service` in this zone.
    pub fn data_checks(&self, service: &str) -> &[DataCheck] {
        let want = normalize_service(service);
        self.data_checks
            .iter()
            .find(|(s, _)| normalize_service(s) == want)
            .map_or(&[], |(_, c)| c.as_slice())
    }

    /// The database of `service`, if this zone has one.
    pub fn database(&self, service: &str) -> Option<&Secret<String>> {
        let want = normalize_service(service);
        self.databases
            .iter()
            .find(|(name, _)| normalize_service(name) == want)
            .map(|(_, url)| url)
    }
}

#[cfg(test)]
mod tests {
    use baton_shared::kit;

    use super::*;
    use crate::Daemon;

    /// Writes `text` plus a valid `[signing]` section (validation requires one).
    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("baton-dbm-cfg-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = baton_shared::signing::Keypair::generate();
        let key_file = dir.join("key");
        std::fs::write(&key_file, key.secret_file_contents()).unwrap();
        let signing = format!(
            "[signing]\nkey_file = {:?}\ntrusted = [{:?}]\n",
            key_file.display().to_string(),
            key.public()
        );
        let path = dir.join("baton.toml");
        std::fs::write(&path, format!("{text}\n{signing}")).unwrap();
        path
    }

    #[test]
    fn file_sets_databases_and_secrets_stay_redacted() {
        let path = write(
            "ok",
            "[daemon]\nzone = \"production\"\n[migration]\nlock_timeout_secs = 7\n[migration.databases]\nshop-api = \"postgres://u:hunter2@db/shop\"\n",
        );
        let cfg = kit::load::<Daemon>(Some(&path)).unwrap();
        kit::validate::<Daemon>(&cfg).unwrap();
        assert_eq!(cfg.common.daemon.zone, "production");
        assert_eq!(cfg.settings.lock_timeout_secs, 7);
        assert_eq!(
            cfg.settings.database("shop-api").unwrap().expose(),
            "postgres://u:hunter2@db/shop"
        );
        assert_eq!(cfg.settings.backup_required_zones, ["production"]);
        let printed = kit::render::<Daemon>(&cfg);
        assert!(
            !printed.contains("hunter2") && printed.contains("[migration.databases]"),
            "{printed}"
        );
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn env_style_names_find_dashed_services() {
        let mut cfg = MigrationConfig::default();
        cfg.databases
            .insert("shop_api".into(), Secret::new("postgres://db/shop".into()));
        assert!(cfg.database("shop-api").is_some());
        assert!(cfg.database("shop.api").is_some());
        assert!(cfg.database("billing").is_none());
    }

    #[test]
    fn invalid_values_name_their_key() {
        let mut cfg = MigrationConfig::default();
        cfg.databases
            .insert("shop-api".into(), Secret::new("mysql://u:pw@db/shop".into()));
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("migration.databases") && err.contains("shop-api"), "{err}");
        assert!(!err.contains("pw@"), "{err}");

        let mut cfg = MigrationConfig::default();
        cfg.databases
            .insert("shop-api".into(), Secret::new("postgres://db/a".into()));
        cfg.databases
            .insert("shop_api".into(), Secret::new("postgres://db/b".into()));
        assert!(cfg.validate().unwrap_err().to_string().contains("same service"));

        let cfg = MigrationConfig {
            lock_timeout_secs: 0,
            ..Default::default()
        };
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("migration.lock_timeout_secs")
        );

        let cfg = MigrationConfig {
            admin_url: Secret::new("http://x".into()),
            ..Default::default()
        };
        assert!(cfg.validate().unwrap_err().to_string().contains("migration.admin_url"));
    }

    #[test]
    fn a_wrong_type_in_the_section_names_the_key_from_the_top_of_the_file() {
        let path = write(
            "type",
            "[daemon]\nzone = \"staging\"\n[migration]\nlock_timeout_secs = \"many\"\n",
        );
        let err = kit::load::<Daemon>(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("migration.lock_timeout_secs"), "{err}");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn missing_zone_is_named() {
        let path = write("nozone", "[migration]\nlock_timeout_secs = 5\n");
        let cfg = kit::load::<Daemon>(Some(&path)).unwrap();
        let err = kit::validate::<Daemon>(&cfg).unwrap_err().to_string();
        assert!(err.contains("daemon.zone"), "{err}");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
