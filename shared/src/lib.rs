//! Baton's shared ground: the wire protocol, the broker topology, configuration
//! loading, secrets, logging and the daemon runtime every role daemon is built on.
//!
//! Nothing here knows about the scheduler or about any particular role.

pub mod amqp;
pub mod config;
pub mod failpoint;
pub mod ledger;
pub mod metrics;
pub mod nodelay;
pub mod protocol;
pub mod runtime;
pub mod scratch;
pub mod secret;
pub mod signing;
pub mod telemetry;
pub mod topology;
