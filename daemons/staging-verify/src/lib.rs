//! Baton's staging-verify role (zone staging): the seed's step 5 on the
//! Kubernetes API.
//!
//! # `verify` (execute)
//!
//! 1. **Deploy**: the repository at the merge commit, `kubectl kustomize
//!    <manifests_dir>` (default `deploy/staging`), every container running the
//!    built image's repository set to the digest container-build reported
//!    (`image_digest` of an input step), applied to the service's namespace
//!    with server-side apply (field manager `baton`). Each object's state
//!    before is recorded first, in a ConfigMap of the namespace
//!    (`baton-verify.<run>.<step>`), so a redelivered job keeps the first
//!    record and `redeploy-previous` can restore it.
//! 2. **Health**: each Deployment's rollout must complete; a pod of the new
//!    revision that crash-loops or stays unready past the grace period fails
//!    the step at once, naming pod, container and reason.
//! 3. **Smoke tests** from the repository's checks file (`deploy/verify.toml`).
//! 4. **Integration tests**: the checks file's command as a Kubernetes Job;
//!    its outcome is the verdict, with the tail of its log.
//! 5. **Performance**: a fixed number of requests per endpoint, p50 and p95,
//!    compared with the baseline of the service's last successful verification
//!    (ConfigMap `baton-baseline.<service>`, with its commit); slower than
//!    `max_regression_percent` (20) fails.
//! 6. **Differences** from what ran before: configuration keys, resources and
//!    network policies that changed are reported.
//! 7. **Soak** for `soak_minutes` (15; `critical_soak_minutes`, 60, for a
//!    critical change): restarts, readiness and the error rate of the first
//!    smoke check are watched; a degradation fails the step.
//! 8. **Rollback rehearsal**: each Deployment is rolled back to its previous
//!    revision and forward again, both timed (`rollback_tested`).
//!
//! The outputs carry the facts contract's `StagingVerified` (image digest,
//! regression, soak, rollback rehearsal) for the production gates.
//!
//! # `redeploy-previous` (compensate)
//!
//! Re-applies every recorded object as it was (deleting those the step
//! created) and waits for the rollouts; it refuses when another run has
//! deployed over the step's objects since.

pub mod checks;
pub mod config;
pub mod error;
pub mod role;

pub use config::VerifyConfig;
pub use error::Error;
pub use role::{StagingVerify, VerifyOutputs};

use baton_shared::config::ConfigError;
use baton_shared::kit;

/// `baton-staging-verify`, as the daemon kit runs it.
pub struct Daemon;

impl kit::Daemon for Daemon {
    const BINARY: &'static str = "baton-staging-verify";
    const ABOUT: &'static str =
        "Baton's staging-verify daemon: deploys to staging, checks, soaks and rehearses the rollback";
    const SECTION: &'static str = "verify";
    type Settings = VerifyConfig;
    type Role = StagingVerify;
    type Modes = kit::NoModes;

    fn validate(settings: &VerifyConfig) -> Result<(), ConfigError> {
        settings.validate()
    }

    fn build(config: &kit::Config<VerifyConfig>) -> Result<StagingVerify, ConfigError> {
        Ok(StagingVerify::new(config.settings.clone()))
    }
}
