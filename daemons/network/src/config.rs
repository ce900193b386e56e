//! The daemon's configuration: the common daemon settings plus `[network]`.
//!
//! ```toml
//! [daemon]
//! zone = "production"
//!
//! [network]
//! kubeconfig = "/etc/baton/production.kubeconfig"
//! namespaces = ["shop"]                      # where the pipeline deploys: each gets default-deny
//! record_namespace = "baton"                 # where each step's record of what it changed is kept
//! repos_dir = "/var/cache/baton/repos"
//! work_dir = "/var/lib/baton/network"
//!
//! [network.transip]
//! login = "shop-ops"
//! private_key = "file:/run/secrets/transip-key.pem"
//!
//! [network.acme]
//! directory_url = "https://acme-v02.api.letsencrypt.org/directory"
//! contact = ["mailto:ops@shop.example"]
//!
//! [network.load_balancer]
//! http = "203.0.113.10:80"
//! https = "203.0.113.10:443"
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use baton_shared::cluster::is_dns_label;
use baton_shared::config::ConfigError;
use baton_shared::secret::Secret;
use serde::{Deserialize, Serialize};

/// `[network]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// The zone's cluster: a kubeconfig file (its current context).
    pub kubeconfig: PathBuf,
    /// The namespaces the pipeline deploys to in this zone: each must carry
    /// the default-deny policy, and the folder's objects must live in them.
    pub namespaces: Vec<String>,
    /// Where each step's record (DNS entries and objects before) is kept.
    pub record_namespace: String,
    pub repos_dir: PathBuf,
    pub work_dir: PathBuf,
    /// How often propagation and the ACME order are looked at.
    pub poll_ms: u64,
    pub request_timeout_secs: u64,
    /// The ingress class of the zone's ingress controller (none: the cluster's default).
    pub ingress_class: Option<String>,
    /// Annotations every ingress gets: the controller's way of serving only
    /// TLS and redirecting plain HTTP (k3s's Traefik by default).
    pub ingress_annotations: BTreeMap<String, String>,
    pub transip: TransipConfig,
    pub dns: DnsConfig,
    pub acme: AcmeConfig,
    pub load_balancer: LoadBalancerConfig,
}

/// `[network.transip]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransipConfig {
    pub api_url: String,
    pub login: String,
    /// The API key pair's private key (PEM), best as `file:`.
    pub private_key: Secret<String>,
}

/// `[network.dns]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Per domain, the authoritative servers to ask (`address:port`); a domain
    /// not listed is asked of the nameservers TransIP names for it, on port 53.
    pub nameservers: BTreeMap<String, Vec<SocketAddr>>,
}

/// `[network.acme]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AcmeConfig {
    pub directory_url: String,
    pub contact: Vec<String>,
    /// A root to trust for the ACME server instead of the system's (a test CA).
    pub root_ca_file: Option<PathBuf>,
    /// How long a certificate may still be valid when it is renewed.
    pub renew_before_days: u32,
    /// How long one issuance may take.
    pub timeout_secs: u64,
    /// HTTP-01 instead of DNS-01: where the daemon answers challenges while it
    /// issues; the load balancer routes `/.well-known/acme-challenge/` of
    /// every host, on port 80, here. None: DNS-01 through TransIP.
    pub http01_listen: Option<SocketAddr>,
}

/// `[network.load_balancer]`: where hosts are reached for the health check.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoadBalancerConfig {
    /// Plain HTTP: it must only redirect to HTTPS.
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    /// Roots the served certificates must chain to, besides the system's (a
    /// test CA; the ACME server's root).
    pub ca_file: Option<PathBuf>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            kubeconfig: PathBuf::from("/etc/baton/kubeconfig"),
            namespaces: Vec::new(),
            record_namespace: "baton".to_owned(),
            repos_dir: PathBuf::from("/var/cache/baton/repos"),
            work_dir: PathBuf::from("/var/lib/baton/network"),
            poll_ms: 1000,
            request_timeout_secs: 30,
            ingress_class: None,
            ingress_annotations: BTreeMap::from([
                (
                    "traefik.ingress.kubernetes.io/router.entrypoints".to_owned(),
                    "websecure".to_owned(),
                ),
                ("traefik.ingress.kubernetes.io/router.tls".to_owned(), "true".to_owned()),
            ]),
            transip: TransipConfig::default(),
            dns: DnsConfig::default(),
            acme: AcmeConfig::default(),
            load_balancer: LoadBalancerConfig::default(),
        }
    }
}

impl Default for TransipConfig {
    fn default() -> Self {
        Self {
            api_url: "https://api.transip.nl/v6".to_owned(),
            login: String::new(),
            private_key: Secret::new(String::new()),
        }
    }
}

impl Default for AcmeConfig {
    fn default() -> Self {
        Self {
            directory_url: "https://acme-v02.api.letsencrypt.org/directory".to_owned(),
            contact: Vec::new(),
            root_ca_file: None,
            renew_before_days: 30,
            timeout_secs: 300,
            http01_listen: None,
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

impl NetworkConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        ConfigError::check_absolute("network.repos_dir", &self.repos_dir)?;
        ConfigError::check_absolute("network.work_dir", &self.work_dir)?;
        if self.namespaces.is_empty() {
            return Err(ConfigError::invalid(
                "network.namespaces",
                "must list the namespaces the pipeline deploys to (each gets a default-deny policy)",
            ));
        }
        for ns in self.namespaces.iter().chain([&self.record_namespace]) {
            if !is_dns_label(ns) {
                return Err(ConfigError::invalid(
                    "network.namespaces",
                    format!("{ns:?} is not a namespace name"),
                ));
            }
        }
        check_url("network.transip.api_url", &self.transip.api_url)?;
        check_url("network.acme.directory_url", &self.acme.directory_url)?;
        if self.transip.login.is_empty() {
            return Err(ConfigError::invalid(
                "network.transip.login",
                "must be set (the TransIP account)",
            ));
        }
        if self.transip.private_key.expose().is_empty() {
            return Err(ConfigError::invalid(
                "network.transip.private_key",
                "must be set (the API key pair's private key, as file:/path)",
            ));
        }
        for (key, value) in [
            ("network.poll_ms", self.poll_ms),
            ("network.request_timeout_secs", self.request_timeout_secs),
            ("network.acme.timeout_secs", self.acme.timeout_secs),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        if self.load_balancer.https.is_none() {
            return Err(ConfigError::invalid(
                "network.load_balancer.https",
                "must be set: the health check reaches every host through the load balancer",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_their_key_and_the_key_stays_hidden() {
        let mut c = NetworkConfig {
            namespaces: vec!["shop".into()],
            transip: TransipConfig {
                login: "ops".into(),
                private_key: Secret::new("-----BEGIN PRIVATE KEY-----secret".into()),
                ..TransipConfig::default()
            },
            load_balancer: LoadBalancerConfig {
                https: Some("127.0.0.1:443".parse().unwrap()),
                ..LoadBalancerConfig::default()
            },
            ..NetworkConfig::default()
        };
        c.validate().unwrap();
        assert!(!format!("{c:?}").contains("BEGIN PRIVATE KEY"));
        c.namespaces.push("Not_A_Namespace".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("network.namespaces") && e.contains("Not_A_Namespace"), "{e}");
    }
}
