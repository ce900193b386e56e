//! Baton's production-apply role (zone production): the seed's step 6 on the
//! Kubernetes API.
//!
//! # `apply` (execute)
//!
//! 1. **Image match**: production deploys the image staging verified — the
//!    `image` and `image_digest` of the staging-verify input step — and
//!    nothing else: every container running that image's repository is set to
//!    the verified digest, and the live Deployment is read back and compared
//!    after the apply.
//! 2. **Rolling update as the seed sets it**: `maxSurge` 1, `maxUnavailable`
//!    0, `minReadySeconds` 30, `progressDeadlineSeconds` 300 from the step's
//!    params. A manifest that says otherwise is set to the pipeline's values
//!    and the step warns, naming the manifest's value (the rollout strategy is
//!    the pipeline's, not each service's).
//! 3. Everything is applied with server-side apply (field manager `baton`)
//!    after each object's state before is recorded (ConfigMap
//!    `baton-apply.<run>.<step>`) and each Deployment is annotated with the
//!    revision it replaces.
//! 4. **Rollout**: a crash-looping or unready pod, or the controller's
//!    `ProgressDeadlineExceeded`, fails the step — after the daemon has rolled
//!    its own partial rollout back.
//! 5. **Monitoring** for `monitor_minutes` (15): rollout, readiness and
//!    restarts from the API, and, with `[apply.prometheus]`, the error rate
//!    and p95 latency from the Prometheus query API against the step's
//!    `max_error_percent` and `max_p95_ms`. A breach rolls back and fails.
//!
//! # `rollback-replicaset` (compensate)
//!
//! Returns each Deployment to the ReplicaSet of the revision it replaced
//! (`kubectl rollout undo` semantics), with a rollout strategy of its own so
//! that it meets `rollback_max_seconds` (60): all replicas of the known-good
//! revision at once (`maxSurge` 100 %, `maxUnavailable` 0, no
//! `minReadySeconds`), the pipeline's strategy restored afterwards (see
//! docs/decisions.md, "Production rollback within its budget"). Other objects
//! go back as recorded. The time is measured and reported; a rollback over
//! budget says so.

pub mod config;
pub mod error;
pub mod monitor;
pub mod role;

pub use config::ApplyConfig;
pub use error::Error;
pub use role::{ApplyOutputs, ProductionApply, RollbackOutputs};

use baton_shared::config::ConfigError;
use baton_shared::kit;

/// `baton-production-apply`, as the daemon kit runs it.
pub struct Daemon;

impl kit::Daemon for Daemon {
    const BINARY: &'static str = "baton-production-apply";
    const ABOUT: &'static str =
        "Baton's production-apply daemon: rolling updates, monitoring and rollback to the previous ReplicaSet";
    const SECTION: &'static str = "apply";
    type Settings = ApplyConfig;
    type Role = ProductionApply;
    type Modes = kit::NoModes;

    fn validate(settings: &ApplyConfig) -> Result<(), ConfigError> {
        settings.validate()
    }

    fn build(config: &kit::Config<ApplyConfig>) -> Result<ProductionApply, ConfigError> {
        Ok(ProductionApply::new(config.settings.clone()))
    }
}
