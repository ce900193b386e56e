//! The daemon kit: everything a role daemon's binary does besides its role, the
//! same for every daemon.
//!
//! A daemon crate writes only its domain: a [`Role`], its settings section
//! (`[migration]`, `[backup]`, …) with a validation that names the bad key, and
//! its error enum. It describes itself with [`Daemon`], and its `main.rs` is
//! `fn main() -> ExitCode { baton_shared::kit::main::<MyDaemon>() }`.
//!
//! The kit gives it:
//! - arguments: `--config FILE` (default `./baton.toml` if present), `--print-config`
//!   (the effective configuration, secrets redacted), and the daemon's own one-shot
//!   modes ([`Daemon::Modes`]);
//! - configuration: defaults, the file, then `BATON_*` variables; the shared sections
//!   (`[amqp]`, `[daemon]`, `[signing]`, `[telemetry]`, `[log]`) and the daemon's
//!   section, both validated before anything starts;
//! - telemetry, the async runtime, the job consumers ([`crate::runtime`]), the
//!   daemon's background tasks, and the shutdown signal ([`crate::shutdown`]);
//! - the exit codes of [`crate::exit`].

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, DaemonConfig};
use crate::exit::Exit;
use crate::runtime::{self, Binding, BoxFuture, Role};

/// A role daemon, described for [`main`].
pub trait Daemon: Sized + 'static {
    /// The binary's name, e.g. `baton-db-migration`.
    const BINARY: &'static str;
    /// One line for `--help`.
    const ABOUT: &'static str;
    /// The name of the settings section in the configuration (`migration` for `[migration]`).
    const SECTION: &'static str;

    /// The settings section.
    type Settings: Serialize + DeserializeOwned + Default + Clone + Debug + Send + Sync + 'static;
    type Role: Role;
    /// One-shot modes beyond `--config` and `--print-config` ([`NoModes`] if none).
    type Modes: clap::Args + Debug;

    /// Checks the settings; the error names the key (`migration.repos_dir`).
    fn validate(settings: &Self::Settings) -> Result<(), ConfigError>;

    /// Builds the role from valid configuration (reading key files and the like).
    fn build(config: &Config<Self::Settings>) -> Result<Self::Role, ConfigError>;

    /// A mode that needs no configuration (e.g. making a key): `Some` ends the
    /// process, printing the text on success.
    fn early(_modes: &Self::Modes) -> Option<anyhow::Result<String>> {
        None
    }

    /// Whether these modes serve jobs from the broker (the default), which needs
    /// `[amqp]` and `[signing]`. A one-shot mode that needs neither says `false`,
    /// and only the daemon's section and `daemon.zone` are checked.
    fn serves(_modes: &Self::Modes) -> bool {
        true
    }

    /// A mode that runs once with the role instead of serving (e.g. a scheduled
    /// pass): `Some` ends the process with the exit code it resolves to.
    fn one_shot<'a>(
        _modes: &'a Self::Modes,
        _role: &'a Self::Role,
        _config: &'a Config<Self::Settings>,
    ) -> Option<BoxFuture<'a, Exit>> {
        None
    }

    /// Tasks that run beside the job consumers (sweeps, schedules) and end when
    /// `stop` fires.
    fn background(
        _role: &Arc<Self::Role>,
        _config: &Config<Self::Settings>,
        _stop: CancellationToken,
    ) -> Vec<BoxFuture<'static, ()>> {
        Vec::new()
    }
}

/// A role's error: its display for logs, and what the scheduler is told.
pub trait JobError: std::fmt::Display {
    fn step_error(&self) -> crate::protocol::StepError;
}

/// A job's result as the runtime's outcome; a failure is logged with the job's
/// ids, its code and whether it may pass on a retry.
pub fn outcome<E: JobError>(
    job: &crate::protocol::StepJob,
    result: Result<crate::protocol::Fields, E>,
) -> runtime::Outcome {
    result.map_err(|e| {
        let error = e.step_error();
        tracing::warn!(
            run_id = %job.run_id,
            step_id = %job.step_id,
            role = %job.role,
            action = %job.action,
            code = %error.code,
            retryable = error.retryable,
            error = %e,
            "job failed"
        );
        error
    })
}

/// No one-shot modes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NoModes {}

/// A daemon's whole configuration: the shared sections and its own.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Config<S> {
    /// `[amqp]`, `[daemon]`, `[signing]`, `[telemetry]`, `[log]`.
    pub common: DaemonConfig,
    /// The daemon's section.
    pub settings: S,
}

/// Loads daemon `D`'s configuration (not yet validated).
pub fn load<D: Daemon>(file: Option<&Path>) -> Result<Config<D::Settings>, ConfigError> {
    let fig = crate::config::figment(file)?;
    let common: DaemonConfig = fig.extract().map_err(|e| ConfigError::Figment(Box::new(e)))?;
    let settings = fig.focus(D::SECTION).extract().map_err(|mut e: figment::Error| {
        // Errors inside the section name the key from the top of the file.
        e.path.insert(0, D::SECTION.to_owned());
        ConfigError::Figment(Box::new(e))
    })?;
    Ok(Config { common, settings })
}

/// Checks daemon `D`'s configuration, its own section first.
pub fn validate<D: Daemon>(config: &Config<D::Settings>) -> Result<(), ConfigError> {
    D::validate(&config.settings)?;
    config.common.validate()
}

/// The effective configuration as TOML, as `--print-config` shows it.
pub fn render<D: Daemon>(config: &Config<D::Settings>) -> String {
    let mut value = serde_json::to_value(&config.common).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert(
            D::SECTION.to_owned(),
            serde_json::to_value(&config.settings).unwrap_or_default(),
        );
    }
    crate::config::render(&value)
}

#[derive(Debug, clap::Parser)]
struct Cli<M: clap::Args> {
    /// Configuration file (default: ./baton.toml if it exists).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the effective configuration (secrets redacted), check it, and exit.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    modes: M,
}

/// Runs daemon `D` as its binary's `main`; see the module documentation.
pub fn main<D: Daemon>() -> ExitCode {
    let command = Cli::<D::Modes>::command()
        .name(D::BINARY)
        .bin_name(D::BINARY)
        .about(D::ABOUT)
        .version(env!("CARGO_PKG_VERSION"));
    let cli = match command
        .try_get_matches()
        .and_then(|m| Cli::<D::Modes>::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { Exit::BadInput } else { Exit::Success }.into();
        }
    };
    let fail = |code: Exit, e: &dyn std::fmt::Display| {
        eprintln!("{}: {e}", D::BINARY);
        ExitCode::from(code)
    };
    if let Some(result) = D::early(&cli.modes) {
        return match result {
            Ok(text) => {
                println!("{text}");
                Exit::Success.into()
            }
            Err(e) => fail(Exit::BadInput, &format!("{e:#}")),
        };
    }
    let config = match load::<D>(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(Exit::BadInput, &e),
    };
    if cli.print_config {
        // Printed before validation: seeing what was loaded is how one finds out
        // why it does not validate.
        print!("{}", render::<D>(&config));
    }
    let valid = if D::serves(&cli.modes) {
        validate::<D>(&config)
    } else {
        D::validate(&config.settings).and_then(|()| config.common.validate_zone())
    };
    if let Err(e) = valid {
        return fail(Exit::BadInput, &e);
    }
    if cli.print_config {
        return Exit::Success.into();
    }
    let role = match D::build(&config) {
        Ok(r) => r,
        Err(e) => return fail(Exit::BadInput, &e),
    };
    let telemetry = crate::telemetry::init(&config.common.log, &config.common.telemetry, D::BINARY);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(Exit::Unavailable, &format!("cannot start the async runtime: {e}")),
    };
    if let Some(task) = D::one_shot(&cli.modes, &role, &config) {
        let code = rt.block_on(task);
        telemetry.shutdown();
        return code.into();
    }
    let zone = config.common.daemon.zone.clone();
    tracing::info!(binary = D::BINARY, zone = %zone, role = role.name(), "daemon starting");
    let role = Arc::new(role);
    let result = rt.block_on(async {
        let stop = CancellationToken::new();
        let tasks: Vec<_> = D::background(&role, &config, stop.clone())
            .into_iter()
            .map(tokio::spawn)
            .collect();
        let bindings = vec![Binding {
            zone,
            role: role.clone(),
        }];
        let result = runtime::run(config.common.clone(), bindings, crate::shutdown::signal()).await;
        stop.cancel();
        for task in tasks {
            let _ = task.await;
        }
        result
    });
    // Spans still buffered are flushed before the process exits.
    telemetry.shutdown();
    match result {
        Ok(()) => Exit::Success.into(),
        Err(e) => {
            tracing::error!(error = %e, "daemon stopped");
            fail(Exit::Unavailable, &e)
        }
    }
}
