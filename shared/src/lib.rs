//! Baton's shared ground: the wire protocol, the broker topology, configuration
//! loading, secrets, logging and the daemon runtime every role daemon is built on.
//!
//! Nothing here knows about the scheduler. What it knows of roles is their
//! contracts: the registry of names and parameters (`roles`) and the facts they
//! report to gates and later steps (`facts`).

pub mod amqp;
#[cfg(feature = "kube")]
pub mod cluster;
pub mod config;
pub mod config_error;
pub mod exit;
pub mod facts;
pub mod failpoint;
#[cfg(feature = "testing")]
pub mod fake_bunny;
#[cfg(all(feature = "testing", feature = "kube"))]
pub mod fake_lb;
#[cfg(feature = "testing")]
pub mod fake_transip;
pub mod git;
#[cfg(feature = "https")]
pub mod https;
pub mod kit;
pub mod ledger;
pub mod metrics;
pub mod nodelay;
#[cfg(feature = "testing")]
pub mod pebble;
pub mod protocol;
pub mod roles;
pub mod runtime;
#[cfg(all(feature = "testing", feature = "kube"))]
pub mod sandbox;
pub mod scratch;
pub mod secret;
pub mod shutdown;
pub mod signing;
pub mod telemetry;
#[cfg(all(feature = "testing", feature = "kube"))]
pub mod test_cluster;
#[cfg(feature = "testing")]
pub mod testing;
pub mod topology;
