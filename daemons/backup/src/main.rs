//! `baton-backup`: the backup role daemon for one zone.
//!
//! `baton-backup [--config FILE] [--print-config | --keygen FILE | --scheduled-pass]`.
//! Exit codes: 0 after a clean shutdown, 2 for bad configuration (the message
//! names the key), 3 when the broker cannot be reached or the runtime stops;
//! with `--scheduled-pass`, 1 when a task of the pass failed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use baton_backup::schedule::{self, ScheduleSettings};
use baton_backup::{BackupRole, Config};
use baton_shared::runtime::{self, Binding};
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "baton-backup", version, about = "Baton's backup daemon")]
struct Cli {
    /// Configuration file (default: ./baton.toml if present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long)]
    print_config: bool,
    /// Write a new age identity to FILE (mode 0600), print its recipient, and exit.
    #[arg(long, value_name = "FILE")]
    keygen: Option<PathBuf>,
    /// Do the scheduled work due now once (daily backup, prune, and the
    /// month's restore test if due and not yet passed), print what each task
    /// did as JSON, and exit: 0 if every task succeeded, 1 if one failed.
    /// Needs no broker; for operators after a failure, or for an outside timer.
    #[arg(long)]
    scheduled_pass: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Some(path) = &cli.keygen {
        return match keygen(path) {
            Ok(recipient) => {
                println!("{recipient}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let cfg: Config = match baton_shared::config::load(cli.config.as_deref()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.print_config {
        // Printed before validation: seeing what was loaded is how one finds
        // out why it does not validate. Secrets print as [redacted].
        print!("{}", baton_shared::config::render(&cfg));
        return ExitCode::SUCCESS;
    }
    let role = match build(&cfg) {
        Ok(role) => role,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let telemetry = baton_shared::telemetry::init(&cfg.common.log, &cfg.common.telemetry, "baton-backup");
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let zone = cfg.common.daemon.zone.clone();
    if cli.scheduled_pass {
        let code = runtime.block_on(scheduled_pass(&role, &zone, &cfg.backup.schedule));
        telemetry.shutdown();
        return code;
    }
    tracing::info!(zone = %zone, primary_region = %cfg.backup.primary.region, copy_region = %cfg.backup.copy.region, "backup daemon starting");
    let role = Arc::new(role);
    let bindings = vec![Binding {
        zone: zone.clone(),
        role: role.clone(),
    }];
    let schedule = cfg.backup.schedule.clone();
    let result = runtime.block_on(async move {
        let stop = CancellationToken::new();
        // The schedule runs beside the job consumers and stops with them.
        // Scratch databases of daemons killed mid-check go, at start and periodically.
        let sweeping = role.clone();
        let sweeper = tokio::spawn(baton_shared::scratch::sweep_loop(
            move || {
                let role = sweeping.clone();
                async move { role.sweep_scratch().await }
            },
            stop.clone(),
        ));
        let scheduled = schedule
            .enabled
            .then(|| tokio::spawn(baton_backup::schedule::run(role, zone, schedule, stop.clone())));
        let result = runtime::run(cfg.common, bindings, runtime::shutdown_signal()).await;
        stop.cancel();
        let _ = sweeper.await;
        if let Some(task) = scheduled {
            let _ = task.await;
        }
        result
    });
    // Spans still buffered are flushed before the process exits.
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "daemon stopped");
            eprintln!("error: {e}");
            ExitCode::from(3)
        }
    }
}

/// `--scheduled-pass`: one pass of the work due now, reported on stdout.
async fn scheduled_pass(role: &BackupRole, zone: &str, settings: &ScheduleSettings) -> ExitCode {
    let at = match settings.time_of_day() {
        Ok(at) => at,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let date = schedule::due_date(chrono::Utc::now(), at);
    let report = schedule::pass(role, zone, settings, date).await;
    println!(
        "{}",
        serde_json::to_string_pretty(&report).expect("the report serialises")
    );
    if report.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Validates the configuration and builds the role (which reads the age
/// identity file); every failure here is bad configuration.
fn build(cfg: &Config) -> anyhow::Result<BackupRole> {
    cfg.validate()?;
    Ok(BackupRole::from_settings(&cfg.backup)?)
}

/// A fresh age identity in the format `age-keygen` writes; returns its recipient.
fn keygen(path: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    use age::secrecy::ExposeSecret;
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    writeln!(f, "# public key: {recipient}")?;
    writeln!(f, "{}", identity.to_string().expose_secret())?;
    Ok(recipient)
}
