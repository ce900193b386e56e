//! Baton's cdn role (zone production): the seed's step 8 on bunny.net.
//!
//! # `deploy` (execute)
//!
//! The static assets of the merge commit (`assets/` unless `assets_dir` says
//! otherwise) go to the service's bunny.net storage zone, and the pull zone
//! serves them:
//!
//! 1. **Checked before anything changes**: every content-hashed name
//!    (`app.3f2a9c1b.js`) against its content's SHA-256; a file without a hash
//!    must be an entry document (`entry_documents`: `index.html`,
//!    `asset-manifest.json`, …); the edge rules file (`cdn/edge-rules.toml`)
//!    by name, each mistake named ("edge rules syntax error"); the pull zone
//!    routes only to the EU and has an origin shield in the EU (`FR`) — else
//!    refused, or corrected with `fix_zone_settings` (and reported); and no
//!    hashed path already holds other content ("immutable": refused, naming
//!    it). Identical content is skipped.
//! 2. **A record** on the storage zone (`.baton/runs/<run>-<step>.json`): each
//!    entry document's previous version (kept by content under
//!    `.baton/entries/<sha256>`), each edge rule's previous version, the zone
//!    settings before. A redelivered job keeps the first record.
//! 3. Upload (Edge Storage, `Checksum` checked by bunny.net), entry documents,
//!    edge rules (`addOrUpdate`, identified by description), purge of the
//!    entry documents (and of every asset when rules changed their headers).
//! 4. **Verification through the edge**: every asset byte-compared, with its
//!    content type; a hashed asset must come with `Cache-Control` `immutable`
//!    and a max-age of a year; an entry document still serving an older
//!    version `purge_wait_secs` after the purge is "cache invalidation
//!    incomplete".
//!
//! # `restore-previous` (compensate)
//!
//! "Deploy previous asset version": the hashed files of the previous version
//! were never overwritten or deleted, so the entry documents are put back to
//! their recorded versions (or deleted if the step created them), purged and
//! verified; edge rules and zone settings go back as recorded. An entry
//! document changed since by someone else is refused (`state_moved`).

pub mod assets;
pub mod bunny;
pub mod config;
pub mod error;
pub mod role;
pub mod rules;

pub use config::{CdnConfig, ServiceZone};
pub use error::Error;
pub use role::{Cdn, DeployOutputs, RestoreOutputs};

use baton_shared::config::ConfigError;
use baton_shared::kit;

/// `baton-cdn`, as the daemon kit runs it.
pub struct Daemon;

impl kit::Daemon for Daemon {
    const BINARY: &'static str = "baton-cdn";
    const ABOUT: &'static str = "Baton's cdn daemon: immutable assets, edge rules and purges on bunny.net";
    const SECTION: &'static str = "cdn";
    type Settings = CdnConfig;
    type Role = Cdn;
    type Modes = kit::NoModes;

    fn validate(settings: &CdnConfig) -> Result<(), ConfigError> {
        settings.validate()
    }

    fn build(config: &kit::Config<CdnConfig>) -> Result<Cdn, ConfigError> {
        Cdn::new(config.settings.clone()).map_err(|e| ConfigError::invalid("cdn", e.to_string()))
    }
}
