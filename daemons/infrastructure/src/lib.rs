//! Baton's infrastructure role (zones staging and production): the seed's step 3
//! with the real Terraform CLI (or OpenTofu) and its `pg` state backend.
//!
//! # Actions
//!
//! - `plan` (execute): the repository at the merge commit, `terraform init`
//!   against the zone's state schema, `plan -out` with `-detailed-exitcode`,
//!   `show -json` read into the facts contract's `TerraformPlanned` (each
//!   resource's address and action; the blast radius is their count). A plan
//!   that would replace or delete a resource the step's `protected` globs name
//!   is refused (`unintended_change`). The saved plan is stored in the state
//!   database with its SHA-256, which the outputs carry.
//! - `apply` (execute): applies exactly the saved plan of the plan step among its
//!   inputs (checked by hash). Between the two steps the scheduler's blast-radius
//!   gate holds for an approval when more than `blast_radius_limit` (5) resources
//!   change, showing the addresses, actions and plan hash. If the state changed
//!   in between, Terraform calls the plan stale: the daemon plans again and
//!   applies only if the changes are the approved ones, else fails
//!   (`plan_changed`) naming the difference. Without a plan step, `apply` plans
//!   itself and refuses a change over the limit (`approval_required`).
//! - `reapply-previous` (compensate): re-applies the configuration of the commit
//!   that made the state this step replaced (a plan, then that plan applied; no
//!   blind apply), or destroys what the step created when no earlier apply is
//!   recorded. It refuses if the state moved since the step applied it.
//!
//! # State
//!
//! Remote only: a checkout whose configuration keeps state locally (or in another
//! backend) is refused. The connection reaches Terraform in `PG_CONN_STR`; the
//! schema is `infrastructure.state_schema` per zone and service. The backend
//! keeps only the latest state, so before each apply the daemon records the state
//! it replaces (serial, lineage, SHA-256) and the commit it came from
//! (`baton_terraform.applies`). A state lock held past `lock_timeout_secs` fails
//! the step retryably, naming the session that holds it (from `pg_locks` and
//! `pg_stat_activity`), where Terraform's own message names only the caller.

pub mod config;
pub mod error;
pub mod history;
pub mod role;
pub mod terraform;

pub use config::InfraConfig;
pub use error::Error;
pub use role::{ApplyOutputs, Infrastructure, PlanOutputs, RevertOutputs};

use baton_shared::config::ConfigError;
use baton_shared::kit;

/// `baton-infrastructure`, as the daemon kit runs it.
pub struct Daemon;

impl kit::Daemon for Daemon {
    const BINARY: &'static str = "baton-infrastructure";
    const ABOUT: &'static str = "Baton's infrastructure daemon: Terraform plans and applies with state in PostgreSQL";
    const SECTION: &'static str = "infrastructure";
    type Settings = InfraConfig;
    type Role = Infrastructure;
    type Modes = kit::NoModes;

    fn validate(settings: &InfraConfig) -> Result<(), ConfigError> {
        settings.validate()
    }

    fn build(config: &kit::Config<InfraConfig>) -> Result<Infrastructure, ConfigError> {
        Ok(Infrastructure::new(config.settings.clone()))
    }
}
