//! Baton's network role (zones staging and production): the seed's step 7.
//!
//! # `apply` (execute)
//!
//! What the merge declares in the repository's `network/` folder (the format:
//! [`spec`]) is brought about, then verified:
//!
//! 1. **Checked before anything changes**: the folder, each mistake naming
//!    file and line; every object in a namespace the pipeline deploys to
//!    (`network.namespaces`); allow rules explicit (peers and ports named);
//!    the declared flows against the policy set the change would leave
//!    ("network policy blocks required traffic", naming flow and policies).
//! 2. **A record** (Secret `baton-network.<run>.<step>` in
//!    `network.record_namespace`): each declared DNS set before and after,
//!    each object before. A redelivered job keeps the first record.
//! 3. **DNS through TransIP's API v6** (key-pair login): missing entries added,
//!    undeclared ones of a declared set removed, TTLs as declared; then every
//!    authoritative nameserver is asked directly until each answers the new
//!    values, within `propagation_deadline_secs` ("DNS propagation failure"
//!    names the servers that lag and what they answer).
//! 4. **Certificates from Let's Encrypt (ACME, DNS-01 through TransIP)** for
//!    each ingress's hosts, when the certificate in place does not cover them
//!    or expires within `renew_before_days`; stored as a `kubernetes.io/tls`
//!    Secret ("certificate issuance failure" names the CA's reason).
//! 5. **Objects by server-side apply** (field manager `baton-network`): the
//!    default-deny policy of every pipeline namespace (`baton-default-deny`),
//!    allow rules, load-balancer pools (Services), ingresses (TLS for every
//!    host; the controller's annotations for TLS-only entry points).
//! 6. **Health check through the load balancer**: each host's health path
//!    over TLS (the certificate must verify) answers 2xx; plain HTTP only
//!    redirects to HTTPS ("load balancer health check failure").
//!
//! # `revert` (compensate)
//!
//! Objects go back as recorded (those the step created are deleted), then the
//! DNS sets; the report says how long caches may still hold the reverted
//! values (their TTL). Certificates stay: the old one remains valid and the
//! new one may be referenced. A DNS set or object changed since by someone
//! else is refused (`state_moved`) before anything changes.

pub mod acme;
pub mod config;
pub mod dns;
pub mod error;
pub mod health;
pub mod policy;
pub mod role;
pub mod spec;
pub mod transip;

pub use config::NetworkConfig;
pub use error::Error;
pub use role::{ApplyOutputs, Network, RevertOutputs};

use baton_shared::config::ConfigError;
use baton_shared::kit;

/// The name of the default-deny policy the daemon keeps in every pipeline
/// namespace.
pub const DEFAULT_DENY: &str = "baton-default-deny";

/// `baton-network`, as the daemon kit runs it.
pub struct Daemon;

impl kit::Daemon for Daemon {
    const BINARY: &'static str = "baton-network";
    const ABOUT: &'static str =
        "Baton's network daemon: DNS at TransIP, certificates by ACME, ingress and default-deny policies";
    const SECTION: &'static str = "network";
    type Settings = NetworkConfig;
    type Role = Network;
    type Modes = kit::NoModes;

    fn validate(settings: &NetworkConfig) -> Result<(), ConfigError> {
        settings.validate()
    }

    fn build(config: &kit::Config<NetworkConfig>) -> Result<Network, ConfigError> {
        Network::new(config.settings.clone()).map_err(|e| ConfigError::invalid("network", e.to_string()))
    }
}
