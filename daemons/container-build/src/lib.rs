//! Baton's container-build role (zone `ci`, action `build`, no compensation: the
//! image exists or it does not): the seed's step 4 with buildah, containerd and a
//! Trivy-format scanner.
//!
//! # What `build` does, in order
//!
//! 1. **Source.** The repository at the merge commit (`deploy.repository`,
//!    `deploy.commit_sha`), exported from git (the same cache db-migration uses,
//!    `baton_shared::git`) into the job's scratch directory.
//! 2. **Dockerfile rules** ([`dockerfile`]), before anything is built: every image
//!    a stage starts from or copies from is pinned by `@sha256:` (a stage name and
//!    `scratch` need none), no image reference uses `latest`. A refusal names the
//!    line. The image's tag is always the full commit SHA:
//!    `<build.image_prefix>/<service>:<commit>`.
//! 3. **Build** with `buildah bud`: chroot isolation, `--layers` (the cache lives in
//!    the daemon's storage and never ships: only the final stage's layers are in
//!    the image), `--timestamp 0` (the same commit builds the same digest),
//!    `--pull=never` unless configured otherwise. Then `buildah push` to an
//!    `oci-archive`, whose manifest digest is the image's digest everywhere after.
//! 4. **What ships** ([`image`]): the archive's layers applied in order, whiteouts
//!    included. A final file system holding a configured build tool, package
//!    manager or cache (`build.forbidden_paths`) refuses; so does a size (manifest,
//!    config and compressed layers) over `max_image_bytes`.
//! 5. **Scan** ([`scan`]): the configured scanner's Trivy JSON report; CRITICAL or
//!    HIGH findings (`build.scan.blocking`) refuse unless an unexpired allow-list
//!    entry with a reason lets them through, which the step's warnings record.
//!    The SBOM command's output is kept under `work_dir/sbom/`; the Dockerfile
//!    check's findings become warnings.
//! 6. **Import** into containerd as k3s does (`ctr -n k8s.io images import` of the
//!    archive), then read back: containerd must hold the tag at the built digest.
//!
//! Outputs: [`role::BuildOutputs`], whose `image_digest`, `image`, `size_bytes`
//! and `scan` are the facts contract's `ImageBuilt` (what the image-match gate
//! compares).

pub mod config;
pub mod dockerfile;
pub mod error;
pub mod image;
pub mod role;
pub mod scan;
pub mod tools;

pub use config::BuildConfig;
pub use error::Error;
pub use role::{BuildOutputs, ContainerBuild};

use baton_shared::config::ConfigError;
use baton_shared::kit;

/// `baton-container-build`, as the daemon kit runs it.
pub struct Daemon;

impl kit::Daemon for Daemon {
    const BINARY: &'static str = "baton-container-build";
    const ABOUT: &'static str = "Baton's container-build daemon: buildah images, scanned, imported into containerd";
    const SECTION: &'static str = "build";
    type Settings = BuildConfig;
    type Role = ContainerBuild;
    type Modes = kit::NoModes;

    fn validate(settings: &BuildConfig) -> Result<(), ConfigError> {
        settings.validate()
    }

    fn build(config: &kit::Config<BuildConfig>) -> Result<ContainerBuild, ConfigError> {
        ContainerBuild::new(config.settings.clone()).map_err(|e| ConfigError::invalid("build.forbidden_paths", e))
    }
}
