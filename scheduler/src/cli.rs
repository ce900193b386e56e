//! The `baton` command line.
//!
//! Exit codes: 0 success; 1 the run failed, was rolled back or its rollback
//! failed; 2 bad input or usage (invalid file, unknown run); 3 the broker or
//! database could not be reached.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use baton_shared::amqp::{AmqpError, Broker, Outgoing};
use baton_shared::config::{self as cfgload};
use baton_shared::protocol::{MergeEvent, Message};
use baton_shared::telemetry;
use baton_shared::topology::{EVENTS_EXCHANGE, MERGE_EVENTS_KEY};
use clap::{Parser, Subcommand};
use uuid::Uuid;

use crate::config::Config;
use crate::engine::RunStatus;
use crate::pipeline::Pipeline;
use crate::planner;
use crate::store::{self, RunView};

#[derive(Debug, Parser)]
#[command(name = "baton", version, about = "Baton: a deployment pipeline engine")]
pub struct Cli {
    /// Configuration file (default: ./baton.toml if present).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long, global = true)]
    print_config: bool,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve: consume merge events and results, dispatch jobs, fire timers.
    Scheduler,
    /// Run the db-migration and backup roles end to end on this machine.
    Demo {
        /// Folder with the demo repository's commits and pipeline.
        #[arg(long)]
        examples: Option<PathBuf>,
        /// Prefix for the demo's database names (tests use one to stay isolated).
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Publish a merge event (what CI calls); prints the run id.
    Enqueue {
        #[arg(long)]
        event: PathBuf,
    },
    /// Explain the plan for a merge event without running anything.
    Plan {
        #[arg(long)]
        event: PathBuf,
        #[arg(long)]
        pipeline: Option<PathBuf>,
    },
    /// Runs: list and show.
    Runs {
        #[command(subcommand)]
        command: RunsCommand,
    },
    /// Ask for a run to be rolled back (compensations in reverse order).
    Rollback {
        run: Uuid,
        #[arg(long, default_value = "requested from the command line")]
        reason: String,
    },
    /// Create an Ed25519 signing key: writes the secret to FILE, prints the public key.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Pipeline definitions.
    Pipeline {
        #[command(subcommand)]
        command: PipelineCommand,
    },
}

#[derive(Debug, Subcommand)]
enum RunsCommand {
    /// Newest runs first.
    List {
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// One run: steps, attempts, compensations and history.
    Show { run: Uuid },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a new bearer token: prints it once, and the `api.tokens` entry that admits it.
    New {
        #[arg(long)]
        name: String,
        /// viewer, operator or approver.
        #[arg(long)]
        role: String,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check every hash chain; exit 1 naming the first broken row.
    Verify,
}

#[derive(Debug, Subcommand)]
enum PipelineCommand {
    /// Check a pipeline file and print its steps.
    Validate { file: PathBuf },
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

fn bad_input(e: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 2,
        error: e.into(),
    }
}

fn unavailable(e: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 3,
        error: e.into(),
    }
}

type Outcome = Result<ExitCode, Failure>;

pub fn main() -> ExitCode {
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("error: {}", f.error);
            ExitCode::from(f.code)
        }
    }
}

fn load_config(path: Option<&Path>) -> Result<Config, Failure> {
    let cfg: Config = cfgload::load(path).map_err(bad_input)?;
    cfg.validate().map_err(bad_input)?;
    Ok(cfg)
}

fn load_pipeline(path: Option<&Path>, cfg: Option<&Config>) -> Result<Pipeline, Failure> {
    let configured = cfg.and_then(|c| c.scheduler.pipeline.as_deref()).map(Path::new);
    match path.or(configured) {
        Some(p) => Pipeline::load(p).map_err(bad_input),
        None => Ok(Pipeline::seed()),
    }
}

fn read_event(path: &Path) -> Result<MergeEvent, Failure> {
    let bytes = std::fs::read(path).map_err(|e| bad_input(anyhow::anyhow!("cannot read {}: {e}", path.display())))?;
    MergeEvent::parse(&bytes).map_err(|e| bad_input(anyhow::anyhow!("{}: {e}", path.display())))
}

fn print_json<T: serde::Serialize>(value: &T) {
    println!("{}", serde_json::to_string_pretty(value).expect("serialisable"));
}

async fn dispatch(cli: Cli) -> Outcome {
    let Some(command) = cli.command else {
        if cli.print_config {
            let cfg = load_config(cli.config.as_deref())?;
            print!("{}", cfgload::render(&cfg));
            return Ok(ExitCode::SUCCESS);
        }
        return Err(bad_input(anyhow::anyhow!("no command given; see `baton --help`")));
    };
    if cli.print_config {
        let cfg = load_config(cli.config.as_deref())?;
        print!("{}", cfgload::render(&cfg));
        return Ok(ExitCode::SUCCESS);
    }
    match command {
        Command::Scheduler => {
            let cfg = load_config(cli.config.as_deref())?;
            cfg.validate_for_serving().map_err(bad_input)?;
            telemetry::init_logging(&cfg.log);
            let pipeline = load_pipeline(None, Some(&cfg))?;
            crate::service::run(cfg, pipeline, baton_shared::runtime::shutdown_signal())
                .await
                .map_err(unavailable)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { examples, prefix } => {
            let cfg = load_config(cli.config.as_deref())?;
            match crate::demo::run(&cfg, examples, &prefix).await {
                Ok(true) => Ok(ExitCode::SUCCESS),
                Ok(false) => Ok(ExitCode::from(1)),
                Err(e) => Err(unavailable(e)),
            }
        }
        Command::Enqueue { event } => {
            let ev = read_event(&event)?;
            let cfg = load_config(cli.config.as_deref())?;
            let broker = Broker::connect_config(&cfg.amqp, "baton enqueue")
                .await
                .map_err(unavailable)?;
            let out = Outgoing {
                message_id: Some(ev.run_id()),
                ..Default::default()
            };
            let res = broker
                .publish(EVENTS_EXCHANGE, MERGE_EVENTS_KEY, &ev.to_bytes(), &out)
                .await;
            broker.close().await;
            match res {
                Ok(()) => {}
                Err(e @ AmqpError::Unroutable { .. }) => {
                    return Err(unavailable(anyhow::anyhow!(
                        "{e}; has a scheduler declared the topology yet?"
                    )));
                }
                Err(e) => return Err(unavailable(e)),
            }
            if cli.json {
                print_json(
                    &serde_json::json!({"run_id": ev.run_id(), "service": ev.service, "environment": ev.environment, "commit_sha": ev.commit_sha}),
                );
            } else {
                println!("{}", ev.run_id());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan { event, pipeline } => {
            let ev = read_event(&event)?;
            let cfg = if pipeline.is_none() {
                cfgload::load::<Config>(cli.config.as_deref()).ok()
            } else {
                None
            };
            let pipeline = load_pipeline(pipeline.as_deref(), cfg.as_ref())?;
            let plan = planner::plan(&ev, &pipeline).map_err(bad_input)?;
            if cli.json {
                print_json(&plan);
            } else {
                print!("{}", plan.render_text());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Pipeline {
            command: PipelineCommand::Validate { file },
        } => {
            let p = Pipeline::load(&file).map_err(bad_input)?;
            if cli.json {
                print_json(
                    &serde_json::json!({"valid": true, "name": p.name, "hash": p.hash(), "steps": p.steps.iter().map(|s| &s.id).collect::<Vec<_>>()}),
                );
            } else {
                println!(
                    "{}: valid pipeline {:?} with {} steps",
                    file.display(),
                    p.name,
                    p.steps.len()
                );
                for s in &p.steps {
                    println!("  {:<18} {}@{}  needs: {}", s.id, s.role, s.zone, s.needs.join(", "));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Runs { command } => {
            let cfg = load_config(cli.config.as_deref())?;
            let pool = store::connect(cfg.database.url.expose(), 2)
                .await
                .map_err(unavailable)?;
            match command {
                RunsCommand::List { limit } => {
                    let runs = store::list_runs(&pool, limit).await.map_err(unavailable)?;
                    if cli.json {
                        print_json(&runs);
                    } else {
                        for r in runs {
                            println!(
                                "{}  {:<16} {:<11} {:<16} {}  {}",
                                r.id,
                                r.status,
                                r.environment,
                                r.service,
                                &r.commit_sha[..12.min(r.commit_sha.len())],
                                r.created_at.format("%Y-%m-%d %H:%M:%S")
                            );
                        }
                    }
                    Ok(ExitCode::SUCCESS)
                }
                RunsCommand::Show { run } => {
                    let view = store::run_view(&pool, run)
                        .await
                        .map_err(unavailable)?
                        .ok_or_else(|| bad_input(anyhow::anyhow!("run {run} not found")))?;
                    if cli.json {
                        print_json(&view);
                    } else {
                        print!("{}", render_run(&view, std::io::stdout().is_terminal()));
                    }
                    Ok(exit_for(&view))
                }
            }
        }
        Command::Token {
            command: TokenCommand::New { name, role },
        } => {
            let role: crate::api::Role = serde_json::from_value(serde_json::json!(role))
                .map_err(|_| bad_input(anyhow::anyhow!("--role must be viewer, operator or approver")))?;
            let (token, entry) = crate::api::new_token(&name, role);
            if cli.json {
                print_json(&serde_json::json!({"token": token, "entry": entry}));
            } else {
                println!("token (shown once): {token}");
                println!("config entry:");
                println!(
                    "[[api.tokens]]\nname = {:?}\nrole = {:?}\nsha256 = {:?}",
                    entry.name,
                    role_name(role),
                    entry.sha256
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen { out } => {
            if out.exists() {
                return Err(bad_input(anyhow::anyhow!(
                    "{} exists; refusing to overwrite a key",
                    out.display()
                )));
            }
            let key = baton_shared::signing::Keypair::generate();
            write_secret_file(&out, &key.secret_file_contents())
                .map_err(|e| bad_input(anyhow::anyhow!("cannot write {}: {e}", out.display())))?;
            if cli.json {
                print_json(&serde_json::json!({"key_id": key.id(), "public": key.public(), "secret_file": out}));
            } else {
                println!("{}", key.public());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            command: AuditCommand::Verify,
        } => {
            let cfg = load_config(cli.config.as_deref())?;
            let pool = store::connect(cfg.database.url.expose(), 2)
                .await
                .map_err(unavailable)?;
            let report = crate::audit::verify(&pool).await.map_err(unavailable)?;
            if cli.json {
                print_json(&report);
            } else if let Some(b) = &report.first_broken {
                println!("audit chain BROKEN at row {}: {}", b.id, b.problem);
            } else {
                println!("audit chain intact: {} rows in {} chains", report.rows, report.chains);
            }
            Ok(if report.first_broken.is_some() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Rollback { run, reason } => {
            let cfg = load_config(cli.config.as_deref())?;
            let pool = store::connect(cfg.database.url.expose(), 2)
                .await
                .map_err(unavailable)?;
            // Claim of zero: the scheduler's sweeper publishes what this causes.
            let st = store::Store::new(
                pool,
                cfg.engine_settings().map_err(bad_input)?,
                Duration::ZERO,
                format!("cli:{}", whoami()),
            );
            match st.request_rollback(run, &reason).await {
                Ok(_) => {
                    if cli.json {
                        print_json(&serde_json::json!({"run_id": run, "rollback": "requested"}));
                    } else {
                        println!("rollback of run {run} requested");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(
                    e @ (store::StoreError::NotFound(_)
                    | store::StoreError::Engine(_)
                    | store::StoreError::Locked { .. }),
                ) => Err(bad_input(e)),
                Err(e) => Err(unavailable(e)),
            }
        }
    }
}

fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned())
}

fn exit_for(view: &RunView) -> ExitCode {
    match view.status.parse::<RunStatus>() {
        Ok(RunStatus::Failed | RunStatus::RolledBack | RunStatus::RollbackFailed) => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    }
}

/// A step timeline that fits 80 columns.
pub fn render_run(view: &RunView, colour: bool) -> String {
    use std::fmt::Write;
    let paint = |status: &str| -> String {
        if !colour {
            return status.to_owned();
        }
        let code = match status {
            "succeeded" | "compensated" => "32",
            "failed" | "compensation_failed" | "rollback_failed" => "31",
            "running" | "dispatched" | "compensating" | "rolling_back" => "33",
            _ => "2",
        };
        format!("\x1b[{code}m{status}\x1b[0m")
    };
    let mut s = String::new();
    let _ = writeln!(s, "run {}  {}", view.id, paint(&view.status));
    let _ = writeln!(
        s,
        "  {} -> {}  commit {}",
        view.service,
        view.environment,
        &view.commit_sha[..12.min(view.commit_sha.len())]
    );
    let _ = writeln!(s, "  plan {}", &view.plan_hash[..16.min(view.plan_hash.len())]);
    if let Some(r) = &view.rollback_reason {
        let _ = writeln!(s, "{}", truncate(&format!("  rollback: {r}"), 80));
    }
    let t0 = view.started_at.unwrap_or(view.created_at);
    let _ = writeln!(
        s,
        "\n  {:<17} {:<28} {:>8} {:>8}  status",
        "step", "role@zone", "start", "took"
    );
    for st in &view.steps {
        let start = st
            .started_at
            .map(|t| format!("+{:.1}s", (t - t0).num_milliseconds() as f64 / 1000.0))
            .unwrap_or_default();
        let took = match (st.started_at, st.finished_at) {
            (Some(a), Some(b)) => format!("{:.1}s", (b - a).num_milliseconds() as f64 / 1000.0),
            _ => String::new(),
        };
        let role = format!("{}@{}", st.role, st.zone);
        let _ = writeln!(
            s,
            "  {:<17} {:<28} {:>8} {:>8}  {}",
            st.id,
            role,
            start,
            took,
            paint(&st.status)
        );
        if !st.included {
            let _ = writeln!(s, "      skipped: {}", st.reason);
        }
        for a in st.attempts.iter().filter(|a| a.status != "succeeded" || a.attempt > 1) {
            let err = a
                .error
                .as_ref()
                .map(|e| format!(" {}: {}", e.code, e.message))
                .unwrap_or_default();
            let line = format!("      attempt {} {} {}{}", a.attempt, a.kind, a.status, err);
            let _ = writeln!(s, "{}", truncate(&line, 80));
        }
    }
    s
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

/// Writes a file only its owner can read.
fn write_secret_file(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())
}

fn role_name(role: crate::api::Role) -> String {
    serde_json::to_value(role)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}
