//! Baton's backup role (seed step 9, Otto): pre-deploy and post-deploy backups of
//! a zone's PostgreSQL databases, encrypted at rest with age, stored in an EU
//! location and copied to a second one, verified by restoring into a scratch
//! database, pruned by the 30 daily / 12 monthly / 7 yearly retention rule, and
//! restorable into the live database as the recovery path of an irreversible
//! migration.
//!
//! [`BackupRole`] implements `baton_shared::runtime::Role`; build it with
//! [`BackupRole::from_settings`] from the `[backup]` section of [`Config`].

pub mod config;
pub mod crypto;
pub mod error;
pub mod outputs;
pub mod pg;
pub mod region;
pub mod retention;
pub mod role;
pub mod schedule;
pub mod store;

pub use config::{BackupSettings, Config, LocationConfig};
pub use error::{BackupError, Site};
pub use outputs::{BackupRef, BackupRefError, inputs_as_fields, verified_backup_of_run};
pub use retention::Policy;
pub use role::{BackupRole, PruneReport, RestoreReport, RestoreTest, SiteTest};
pub use schedule::ScheduleSettings;
pub use store::BackupKind;
