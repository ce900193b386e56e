//! `baton-db-migration [--config FILE] [--print-config]`: the db-migration daemon for
//! one zone. Exit codes: 0 stopped cleanly, 1 the broker connection failed, 2 bad
//! usage or configuration (the message names the key).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use baton_db_migration::{Config, DbMigration};
use baton_shared::runtime::{self, Binding};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "baton-db-migration", about = "Baton's db-migration daemon")]
struct Args {
    /// Configuration file (default: ./baton.toml if it exists).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let cfg: Config = match baton_shared::config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("baton-db-migration: {e}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        print!("{}", baton_shared::config::render(&cfg));
    }
    if let Err(e) = cfg.validate() {
        eprintln!("baton-db-migration: {e}");
        return ExitCode::from(2);
    }
    if args.print_config {
        return ExitCode::SUCCESS;
    }
    match serve(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baton-db-migration: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(cfg: Config) -> anyhow::Result<()> {
    let telemetry = baton_shared::telemetry::init(
        &cfg.daemon_config.log,
        &cfg.daemon_config.telemetry,
        "baton-db-migration",
    );
    let role = Arc::new(DbMigration::new(cfg.migration.clone()));
    let zone = cfg.daemon_config.daemon.zone.clone();
    tracing::info!(
        zone = %zone,
        databases = ?cfg.migration.databases.keys().collect::<Vec<_>>(),
        repos_dir = %cfg.migration.repos_dir.display(),
        "baton-db-migration starting"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let admin_url = cfg.migration.admin_url.clone();
    let result = rt.block_on(async move {
        // Scratch databases of daemons killed mid-verification go, at start and periodically.
        let stop = tokio_util::sync::CancellationToken::new();
        let sweeper = tokio::spawn(baton_shared::scratch::sweep_loop(
            move || {
                let admin_url = admin_url.clone();
                async move { baton_db_migration::verify::sweep_scratch(&admin_url).await }
            },
            stop.clone(),
        ));
        let result = runtime::run(
            cfg.daemon_config,
            vec![Binding { zone, role }],
            runtime::shutdown_signal(),
        )
        .await;
        stop.cancel();
        let _ = sweeper.await;
        result
    });
    // Spans still buffered are flushed before the process exits.
    telemetry.shutdown();
    result.context("daemon runtime")?;
    Ok(())
}
