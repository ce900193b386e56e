//! The daemon's configuration: the common daemon settings plus `[cdn]`.
//!
//! ```toml
//! [daemon]
//! zone = "production"
//!
//! [cdn]
//! api_key = "file:/run/secrets/bunny-api-key"
//! storage_url = "https://storage.bunnycdn.com"   # the storage zone's primary region (Falkenstein)
//! repos_dir = "/var/cache/baton/repos"
//! work_dir = "/var/lib/baton/cdn"
//!
//! [cdn.services.shop-api]
//! storage_zone = "shop-assets"
//! storage_password = "file:/run/secrets/shop-assets-password"
//! pull_zone_id = 123456
//! edge_url = "https://assets.shop.example"
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use baton_shared::config::ConfigError;
use baton_shared::secret::Secret;
use serde::{Deserialize, Serialize};

/// `[cdn]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CdnConfig {
    /// bunny.net's core API.
    pub api_url: String,
    /// The account's API key (`AccessKey` of the core API).
    pub api_key: Secret<String>,
    /// The Edge Storage endpoint of the storage zones' primary region.
    pub storage_url: String,
    pub repos_dir: PathBuf,
    pub work_dir: PathBuf,
    /// How long to wait for the edge to serve what was purged before calling
    /// the invalidation incomplete.
    pub purge_wait_secs: u64,
    pub request_timeout_secs: u64,
    /// Per service: where its assets go.
    pub services: BTreeMap<String, ServiceZone>,
}

/// `[cdn.services.<service>]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceZone {
    pub storage_zone: String,
    /// The storage zone's password (`AccessKey` of Edge Storage).
    pub storage_password: Secret<String>,
    pub pull_zone_id: u64,
    /// Where the pull zone serves the assets (its hostname), for verification.
    pub edge_url: String,
}

impl Default for CdnConfig {
    fn default() -> Self {
        Self {
            api_url: "https://api.bunny.net".to_owned(),
            api_key: Secret::new(String::new()),
            storage_url: "https://storage.bunnycdn.com".to_owned(),
            repos_dir: PathBuf::from("/var/cache/baton/repos"),
            work_dir: PathBuf::from("/var/lib/baton/cdn"),
            purge_wait_secs: 30,
            request_timeout_secs: 30,
            services: BTreeMap::new(),
        }
    }
}

fn check_url(key: &str, url: &str) -> Result<(), ConfigError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key.to_owned(),
            format!("{url:?} is not an http(s) URL"),
        ))
    }
}

impl CdnConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        ConfigError::check_absolute("cdn.repos_dir", &self.repos_dir)?;
        ConfigError::check_absolute("cdn.work_dir", &self.work_dir)?;
        check_url("cdn.api_url", &self.api_url)?;
        check_url("cdn.storage_url", &self.storage_url)?;
        if self.api_key.expose().is_empty() {
            return Err(ConfigError::invalid(
                "cdn.api_key",
                "must be set (the account's API key)",
            ));
        }
        for (key, value) in [
            ("cdn.purge_wait_secs", self.purge_wait_secs),
            ("cdn.request_timeout_secs", self.request_timeout_secs),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        for (service, z) in &self.services {
            let at = |k: &str| format!("cdn.services.{service}.{k}");
            if z.storage_zone.is_empty() || z.storage_zone.contains('/') {
                return Err(ConfigError::invalid(at("storage_zone"), "must name a storage zone"));
            }
            if z.storage_password.expose().is_empty() {
                return Err(ConfigError::invalid(at("storage_password"), "must be set"));
            }
            check_url(&at("edge_url"), &z.edge_url)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_their_key_and_secrets_stay_hidden() {
        let mut c = CdnConfig {
            api_key: Secret::new("k".into()),
            ..Default::default()
        };
        c.validate().unwrap();
        c.services.insert(
            "shop".into(),
            ServiceZone {
                storage_zone: "shop-assets".into(),
                storage_password: Secret::new("hunter2".into()),
                pull_zone_id: 1,
                edge_url: "assets.shop.example".into(),
            },
        );
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("cdn.services.shop.edge_url"), "{e}");
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
