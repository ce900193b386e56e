//! The `baton` command line.
//!
//! Exit codes: 0 success; 1 the run failed, was rolled back, rejected or
//! cancelled, or its rollback failed; 2 bad input or usage (invalid file,
//! unknown run, refused by the API); 3 the broker, database or API could not be
//! reached.
//!
//! `runs`, `watch`, `approve`, `reject`, `cancel`, `rollback`, `incident`, `locks`
//! and `dlq` are clients of the scheduler's HTTP API (`[client]`: url and
//! token), so an operator needs a token, not the database. `audit verify`
//! reads the database itself: an auditor checks the chains without trusting
//! the scheduler.

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
        /// Seconds to wait for the started processes to be ready.
        #[arg(long, default_value_t = 120)]
        ready_timeout: u64,
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
    /// Deploy a run's merge event again as a new run with its own id, linked to
    /// the earlier one and through the same gates (after a rollback or a cancel).
    Redeploy {
        run: Uuid,
        /// Why, for the audit log of both runs.
        #[arg(long)]
        reason: String,
    },
    /// Follow a run until it ends: one line per transition (a live status line on a terminal).
    Watch { run: Uuid },
    /// Approve a step held for human approval; names the plan hash you reviewed.
    Approve {
        run: Uuid,
        #[arg(long)]
        step: String,
        #[arg(long)]
        plan_hash: String,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Reject a held step: it fails and the run rolls back.
    Reject {
        run: Uuid,
        #[arg(long)]
        step: String,
        #[arg(long)]
        plan_hash: String,
        #[arg(long)]
        reason: String,
    },
    /// Cancel a run: stop its steps and compensate what already succeeded.
    Cancel {
        run: Uuid,
        #[arg(long)]
        reason: String,
    },
    /// Incidents hold new runs and steps in their environment while open.
    Incident {
        #[command(subcommand)]
        command: IncidentCommand,
    },
    /// Environment locks and the runs waiting for them.
    Locks {
        #[command(subcommand)]
        command: Option<LocksCommand>,
    },
    /// Dead letters: what was refused or undeliverable, and why.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
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
        /// Only runs in this status (e.g. running, awaiting_approval, failed).
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        environment: Option<String>,
        #[arg(long)]
        service: Option<String>,
    },
    /// One run: steps, attempts, compensations and history.
    Show { run: Uuid },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Newest first; `--all` includes replayed ones.
    List {
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Publish a dead letter again where it was first published.
    Replay { id: i64 },
}

#[derive(Debug, Subcommand)]
enum IncidentCommand {
    Open {
        #[arg(long)]
        environment: String,
        #[arg(long)]
        title: String,
    },
    Resolve {
        id: Uuid,
    },
    /// Open incidents, newest first (`--all` includes resolved ones).
    List {
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
enum LocksCommand {
    /// Release an environment held after a failed rollback, once it has been
    /// put right by hand; its next waiting run starts.
    Release {
        service: String,
        environment: String,
        #[arg(long)]
        reason: String,
    },
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
            eprintln!("error: {}", describe(&f.error));
            ExitCode::from(f.code)
        }
    }
}

/// The error and those of its causes whose text it does not already contain
/// (many errors repeat their source's text in their own).
fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
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
            crate::service::run(cfg, pipeline, baton_shared::shutdown::signal())
                .await
                .map_err(unavailable)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            examples,
            prefix,
            ready_timeout,
        } => {
            let cfg = load_config(cli.config.as_deref())?;
            let opts = crate::demo::Options {
                examples,
                prefix,
                ready_timeout: std::time::Duration::from_secs(ready_timeout),
            };
            match crate::demo::run(&cfg, &opts).await {
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
            // The configured pipeline, unless one is given: a configuration
            // that does not load is an error, never a silent fall-back to the seed.
            let cfg = if pipeline.is_none() {
                Some(cfgload::load::<Config>(cli.config.as_deref()).map_err(|e| {
                    bad_input(
                        anyhow::Error::new(e)
                            .context("cannot load the configuration to find the pipeline (or pass --pipeline FILE)"),
                    )
                })?)
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
            if let RunsCommand::List { status: Some(st), .. } = &command {
                st.parse::<RunStatus>()
                    .map_err(|e| bad_input(anyhow::anyhow!("--status: {e}")))?;
            }
            let c = api_client(cli.config.as_deref())?;
            match command {
                RunsCommand::List {
                    limit,
                    status,
                    environment,
                    service,
                } => {
                    let mut query = reqwest::Url::parse("http://baton/v1/runs").expect("a valid URL");
                    {
                        let mut q = query.query_pairs_mut();
                        for (key, value) in [("status", status), ("environment", environment), ("service", service)] {
                            if let Some(v) = value {
                                q.append_pair(key, &v);
                            }
                        }
                        q.append_pair("limit", &limit.to_string());
                    }
                    let path = format!("{}?{}", query.path(), query.query().unwrap_or_default());
                    let runs: Vec<store::RunLine> = c.get(&path).await.map_err(api_failure)?;
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
                    let view: RunView = c.get(&format!("/v1/runs/{run}")).await.map_err(api_failure)?;
                    if cli.json {
                        print_json(&view);
                    } else {
                        print!("{}", render_run(&view, std::io::stdout().is_terminal()));
                    }
                    Ok(exit_for(&view))
                }
            }
        }
        Command::Watch { run } => {
            let c = api_client(cli.config.as_deref())?;
            watch(&c, run, cli.json).await
        }
        Command::Approve {
            run,
            step,
            plan_hash,
            comment,
        } => {
            let c = api_client(cli.config.as_deref())?;
            let body = serde_json::json!({"step": step, "plan_hash": plan_hash, "comment": comment});
            let v: serde_json::Value = c
                .post(&format!("/v1/runs/{run}/approve"), &body)
                .await
                .map_err(api_failure)?;
            print_decision(&v, cli.json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Reject {
            run,
            step,
            plan_hash,
            reason,
        } => {
            let c = api_client(cli.config.as_deref())?;
            let body = serde_json::json!({"step": step, "plan_hash": plan_hash, "comment": reason});
            let v: serde_json::Value = c
                .post(&format!("/v1/runs/{run}/reject"), &body)
                .await
                .map_err(api_failure)?;
            print_decision(&v, cli.json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel { run, reason } => {
            let v = post_reason(cli.config.as_deref(), &format!("/v1/runs/{run}/cancel"), &reason).await?;
            if cli.json {
                print_json(&v);
            } else {
                println!("cancel requested for run {run}; `baton watch {run}` follows it");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Incident { command } => {
            let c = api_client(cli.config.as_deref())?;
            let incidents: Vec<store::IncidentView> = match command {
                IncidentCommand::Open { environment, title } => {
                    let body = serde_json::json!({"environment": environment, "title": title});
                    vec![c.post("/v1/incidents", &body).await.map_err(api_failure)?]
                }
                IncidentCommand::Resolve { id } => vec![
                    c.post(&format!("/v1/incidents/{id}/resolve"), &serde_json::json!({}))
                        .await
                        .map_err(api_failure)?,
                ],
                IncidentCommand::List { all } => {
                    c.get(&format!("/v1/incidents?all={all}")).await.map_err(api_failure)?
                }
            };
            if cli.json {
                print_json(&incidents);
            } else {
                for i in &incidents {
                    let state = match (&i.resolved_at, &i.resolved_by) {
                        (Some(at), Some(by)) => format!("resolved {} by {by}", at.format("%Y-%m-%d %H:%M")),
                        _ => format!("open since {}", i.opened_at.format("%Y-%m-%d %H:%M")),
                    };
                    println!("{}  {:<11} {}", i.id, i.environment, state);
                    println!(
                        "{}",
                        truncate(&format!("    {} ({}, by {})", i.title, i.source, i.opened_by), 80)
                    );
                    if i.truncated_alerts > 0 {
                        println!(
                            "    Alertmanager cut {} alert(s) from its group: see Alertmanager for all",
                            i.truncated_alerts
                        );
                    }
                }
                if incidents.is_empty() {
                    println!("no open incidents");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq { command } => {
            let c = api_client(cli.config.as_deref())?;
            match command {
                DlqCommand::List { all, limit } => {
                    let list: Vec<store::DeadLetterView> = c
                        .get(&format!("/v1/dlq?all={all}&limit={limit}"))
                        .await
                        .map_err(api_failure)?;
                    if cli.json {
                        print_json(&list);
                    } else if list.is_empty() {
                        println!("no dead letters");
                    } else {
                        for d in &list {
                            let replayed = d.replayed_at.map(|_| " (replayed)").unwrap_or_default();
                            let unverified = if d.verified { "" } else { " UNVERIFIED" };
                            let times = if d.arrivals > 1 {
                                format!(" ×{}", d.arrivals)
                            } else {
                                String::new()
                            };
                            println!(
                                "{:>6}  {}  {}{unverified}{times}{replayed}",
                                d.id,
                                d.received_at.format("%Y-%m-%d %H:%M:%S"),
                                d.origin
                            );
                            let why = match &d.refused_for {
                                Some(r) => format!("{} ({})", r, d.reason),
                                None => d.reason.clone(),
                            };
                            println!("{}", truncate(&format!("        {why}"), 80));
                        }
                    }
                }
                DlqCommand::Replay { id } => {
                    let v: serde_json::Value = c
                        .post(&format!("/v1/dlq/{id}/replay"), &serde_json::json!({}))
                        .await
                        .map_err(api_failure)?;
                    if cli.json {
                        print_json(&v);
                    } else {
                        println!(
                            "dead letter {id} published again to {} ({})",
                            v["exchange"].as_str().unwrap_or("?"),
                            v["routing_key"].as_str().unwrap_or("?")
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Locks {
            command:
                Some(LocksCommand::Release {
                    service,
                    environment,
                    reason,
                }),
        } => {
            let path = format!("/v1/locks/{service}/{environment}/release");
            let v = post_reason(cli.config.as_deref(), &path, &reason).await?;
            if cli.json {
                print_json(&v);
            } else {
                println!(
                    "{service}/{environment} released (held by run {}); its next waiting run, if any, starts",
                    v["run_id"].as_str().unwrap_or("?")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Locks { command: None } => {
            let c = api_client(cli.config.as_deref())?;
            let locks: Vec<store::LockView> = c.get("/v1/locks").await.map_err(api_failure)?;
            if cli.json {
                print_json(&locks);
            } else if locks.is_empty() {
                println!("no environment is locked");
            } else {
                for l in &locks {
                    println!(
                        "{:<20} {:<11} run {} ({}), {} waiting",
                        truncate(&l.service, 20),
                        l.environment,
                        l.run_id,
                        l.run_status,
                        l.waiting.len()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
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
            store::require_initialised(&pool).await.map_err(unavailable)?;
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
        Command::Redeploy { run, reason } => {
            let v = post_reason(cli.config.as_deref(), &format!("/v1/runs/{run}/redeploy"), &reason).await?;
            if cli.json {
                print_json(&v);
            } else {
                let new = v["run_id"].as_str().unwrap_or("?");
                println!("run {new} deploys the merge event of run {run} again; `baton watch {new}` follows it");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rollback { run, reason } => {
            let v = post_reason(cli.config.as_deref(), &format!("/v1/runs/{run}/rollback"), &reason).await?;
            if cli.json {
                print_json(&v);
            } else {
                println!("rollback of run {run} requested; `baton watch {run}` follows it");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn exit_for(view: &RunView) -> ExitCode {
    exit_for_status(&view.status)
}

fn exit_for_status(status: &str) -> ExitCode {
    match status.parse::<RunStatus>() {
        Ok(
            RunStatus::Failed
            | RunStatus::RolledBack
            | RunStatus::RollbackFailed
            | RunStatus::Cancelled
            | RunStatus::Superseded,
        ) => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    }
}

/// POSTs `{"reason": reason}` to an operator endpoint of the API.
async fn post_reason(config: Option<&Path>, path: &str, reason: &str) -> Result<serde_json::Value, Failure> {
    let c = api_client(config)?;
    c.post(path, &serde_json::json!({"reason": reason}))
        .await
        .map_err(api_failure)
}

fn api_client(config: Option<&Path>) -> Result<crate::client::Client, Failure> {
    let cfg = load_config(config)?;
    crate::client::Client::new(&cfg.client).map_err(api_failure)
}

fn api_failure(e: crate::client::ClientError) -> Failure {
    if e.is_bad_input() { bad_input(e) } else { unavailable(e) }
}

fn print_decision(v: &serde_json::Value, json: bool) {
    if json {
        print_json(v);
    } else {
        println!(
            "{} {} step {} of run {}; run is {}",
            v["by"].as_str().unwrap_or("?"),
            if v["decision"] == "approve" {
                "approved"
            } else {
                "rejected"
            },
            v["step"].as_str().unwrap_or("?"),
            v["run_id"].as_str().unwrap_or("?"),
            v["run_status"].as_str().unwrap_or("?"),
        );
    }
}

/// One line per history entry, as `watch` prints them.
fn history_line(e: &store::HistoryEntry) -> String {
    let step = e.step_id.as_deref().map(|s| format!(" {s}")).unwrap_or_default();
    let d = &e.detail;
    let what = match e.kind.as_str() {
        "run_status" => format!(
            "run {} -> {}",
            d["from"].as_str().unwrap_or("?"),
            d["to"].as_str().unwrap_or("?")
        ),
        "gate" => format!(
            "gate {} {}: {}",
            d["gate"].as_str().unwrap_or("?"),
            d["verdict"].as_str().unwrap_or("?"),
            d["reason"].as_str().unwrap_or("")
        ),
        "step_failed" | "compensation_failed" => {
            format!("{}: {}", e.kind, d["error"]["message"].as_str().unwrap_or(""))
        }
        other => other.replace('_', " "),
    };
    truncate(
        &format!(
            "{} {}{step} {what}",
            e.at.format("%H:%M:%S"),
            e.actor.split('@').next().unwrap_or("")
        ),
        80,
    )
}

/// Follows a run through the API until it ends. On a terminal the last line is a
/// live status line; otherwise (or with `--json`) one line per history entry.
async fn watch(c: &crate::client::Client, run: Uuid, json: bool) -> Outcome {
    use std::io::Write;
    let tty = std::io::stdout().is_terminal() && !json;
    let spinner = ['|', '/', '-', '\\'];
    let mut seen = 0i64;
    let mut tick = 0usize;
    loop {
        let view: RunView = c.get(&format!("/v1/runs/{run}")).await.map_err(api_failure)?;
        let mut out = std::io::stdout().lock();
        if tty {
            let _ = write!(out, "\r\x1b[2K");
        }
        let after = seen;
        for e in view.history.iter().filter(|e| e.id > after) {
            if json {
                let _ = writeln!(out, "{}", serde_json::to_string(e).unwrap_or_default());
            } else {
                let _ = writeln!(out, "{}", history_line(e));
            }
            seen = e.id;
        }
        if view.is_terminal() {
            if !json {
                let _ = writeln!(out, "run {run} {}", view.status);
            }
            return Ok(exit_for(&view));
        }
        if tty {
            let done = view
                .steps
                .iter()
                .filter(|s| matches!(s.status.as_str(), "succeeded" | "skipped" | "compensated"))
                .count();
            let waiting = view
                .steps
                .iter()
                .find_map(|s| s.hold.as_ref().map(|h| format!(" · {} waits on {}", s.id, h.gate)))
                .unwrap_or_default();
            let line = format!(
                "{} {} · {done}/{} steps{waiting}",
                spinner[tick % spinner.len()],
                view.status,
                view.steps.len()
            );
            let _ = write!(out, "{}", truncate(&line, 79));
            let _ = out.flush();
            tick += 1;
        }
        drop(out);
        tokio::time::sleep(Duration::from_millis(500)).await;
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
    let _ = writeln!(s, "  plan {}", view.plan_hash);
    if let Some(t) = &view.trace_id {
        let _ = writeln!(s, "  trace {t}");
    }
    if let Some(h) = &view.hold {
        let _ = writeln!(s, "{}", truncate(&format!("  held by {}: {}", h.gate, h.reason), 80));
    }
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
        if let Some(h) = &st.hold {
            let _ = writeln!(
                s,
                "{}",
                truncate(&format!("      waits on {}: {}", h.gate, h.reason), 80)
            );
        }
        for e in view
            .history
            .iter()
            .filter(|e| e.step_id.as_deref() == Some(st.id.as_str()))
        {
            let verdicts: Vec<&serde_json::Value> = match e.kind.as_str() {
                "gate" => vec![&e.detail],
                "gates_passed" => e.detail["gates"]
                    .as_array()
                    .map(|a| a.iter().collect())
                    .unwrap_or_default(),
                _ => continue,
            };
            for v in verdicts
                .into_iter()
                .filter(|v| v["gate"] != "incident" || v["verdict"] != "pass")
            {
                let line = format!(
                    "      gate {} {}: {}",
                    v["gate"].as_str().unwrap_or("?"),
                    v["verdict"].as_str().unwrap_or("?"),
                    v["reason"].as_str().unwrap_or("")
                );
                let _ = writeln!(s, "{}", truncate(&line, 80));
            }
        }
        let restored = view
            .history
            .iter()
            .any(|e| e.kind == "restore_from_backup" && e.step_id.as_deref() == Some(st.id.as_str()));
        if let (Some(a), Some(b)) = (st.compensation_started_at, st.compensation_finished_at) {
            let line = format!(
                "      {} {} in {:.1}s",
                if restored {
                    "restore of the pre-deploy backup"
                } else {
                    st.compensate.as_deref().unwrap_or("compensation")
                },
                st.status,
                (b - a).num_milliseconds() as f64 / 1000.0
            );
            let _ = writeln!(s, "{}", truncate(&line, 80));
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

#[cfg(test)]
mod tests {
    use super::describe;

    #[derive(Debug, thiserror::Error)]
    #[error("database error: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn an_error_is_described_with_the_causes_it_does_not_repeat() {
        let io = || std::io::Error::other("invalid peer certificate: UnknownIssuer");
        let e = anyhow::Error::new(Repeats(io())).context("certificate not accepted");
        assert_eq!(
            describe(&e),
            "certificate not accepted: database error: invalid peer certificate: UnknownIssuer"
        );
        let e = anyhow::Error::new(io()).context("cannot connect");
        assert_eq!(describe(&e), "cannot connect: invalid peer certificate: UnknownIssuer");
    }
}
