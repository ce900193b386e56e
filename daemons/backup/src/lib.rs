//! Baton's backup role (seed step 9): pre-deploy and post-deploy backups of
//! a zone's PostgreSQL databases and the services' persistent volumes, encrypted at rest with age, stored in an EU
//! location and copied to a second one, verified by restoring into a scratch
//! database, pruned by the 30 daily / 12 monthly / 7 yearly retention rule, and
//! restorable into the live database as the recovery path of an irreversible
//! migration.
//!
//! [`BackupRole`] implements `baton_shared::runtime::Role`; build it with
//! [`BackupRole::from_settings`] from the `[backup]` section ([`BackupSettings`]).
//! [`Daemon`] is the binary, as the daemon kit (`baton_shared::kit`) runs it.

pub mod config;
pub mod crypto;
pub mod error;
pub mod pg;
pub mod region;
pub mod retention;
pub mod role;
pub mod schedule;
pub mod store;
pub mod volume;

pub use config::{BackupSettings, LocationConfig, VolumeConfig};
pub use error::{Error, Site};
pub use retention::Policy;
pub use role::{BackupRole, PruneReport, RestoreReport, RestoreTest, SiteTest};
pub use schedule::ScheduleSettings;
pub use store::BackupKind;

use std::path::PathBuf;
use std::sync::Arc;

use baton_shared::config::ConfigError;
use baton_shared::exit::Exit;
use baton_shared::kit;
use baton_shared::runtime::BoxFuture;
use tokio_util::sync::CancellationToken;

/// `baton-backup`, as the daemon kit runs it.
pub struct Daemon;

/// `baton-backup`'s one-shot modes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Modes {
    /// Write a new age identity to FILE (mode 0600), print its recipient, and exit.
    #[arg(long, value_name = "FILE")]
    pub keygen: Option<PathBuf>,
    /// Do the scheduled work due now once (daily backup, prune, and the
    /// month's restore test if due and not yet passed), print what each task
    /// did as JSON, and exit: 0 if every task succeeded, 1 if one failed.
    /// Needs no broker; for operators after a failure, or for an outside timer.
    #[arg(long)]
    pub scheduled_pass: bool,
}

fn config_error(e: Error) -> ConfigError {
    match e {
        Error::Config { key, problem } => ConfigError::invalid(key, problem),
        other => ConfigError::invalid("backup", other.to_string()),
    }
}

impl kit::Daemon for Daemon {
    const BINARY: &'static str = "baton-backup";
    const ABOUT: &'static str = "Baton's backup daemon: encrypted, verified PostgreSQL backups for one zone";
    const SECTION: &'static str = "backup";
    type Settings = BackupSettings;
    type Role = BackupRole;
    type Modes = Modes;

    fn validate(settings: &BackupSettings) -> Result<(), ConfigError> {
        settings.validate().map_err(config_error)
    }

    fn build(config: &kit::Config<BackupSettings>) -> Result<BackupRole, ConfigError> {
        BackupRole::from_settings(&config.settings).map_err(config_error)
    }

    fn early(modes: &Modes) -> Option<anyhow::Result<String>> {
        modes.keygen.as_deref().map(crypto::keygen)
    }

    fn one_shot<'a>(
        modes: &'a Modes,
        role: &'a BackupRole,
        config: &'a kit::Config<BackupSettings>,
    ) -> Option<BoxFuture<'a, Exit>> {
        modes.scheduled_pass.then(|| -> BoxFuture<'a, Exit> {
            Box::pin(schedule::pass_once(
                role,
                &config.common.daemon.zone,
                &config.settings.schedule,
            ))
        })
    }

    fn background(
        role: &Arc<BackupRole>,
        config: &kit::Config<BackupSettings>,
        stop: CancellationToken,
    ) -> Vec<BoxFuture<'static, ()>> {
        // Scratch databases of daemons killed mid-check go, at start and periodically.
        let sweeping = role.clone();
        let mut tasks: Vec<BoxFuture<'static, ()>> = vec![Box::pin(baton_shared::scratch::sweep_loop(
            move || {
                let role = sweeping.clone();
                async move { role.sweep_scratch().await }
            },
            stop.clone(),
        ))];
        let schedule = config.settings.schedule.clone();
        if schedule.enabled {
            let zone = config.common.daemon.zone.clone();
            tasks.push(Box::pin(schedule::run(role.clone(), zone, schedule, stop)));
        }
        tasks
    }
}
