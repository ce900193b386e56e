//! The `baton` command line.
//!
//! Exit codes are every Baton binary's (`baton_shared::exit`): 0 success; 1 the
//! run failed, was rolled back, rejected or cancelled, or its rollback failed;
//! 2 bad input or usage (invalid file, unknown run, refused by the API); 3 the
//! broker, database or API could not be reached.
//!
//! The commands are grouped by what they work on: `local` (this machine, the
//! database, the broker), `runs` and `operate` (clients of the API), `demo`.
//! `runs`, `watch`, `approve`, `reject`, `cancel`, `rollback`, `redeploy`,
//! `incident`, `locks` and `dlq` are clients of the scheduler's HTTP API (`[client]`: url and
//! token), so an operator needs a token, not the database. `audit verify`
//! reads the database itself: an auditor checks the chains without trusting
//! the scheduler.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use baton_shared::amqp::{AmqpError, Broker, Outgoing};
use baton_shared::config::{self as cfgload};
use baton_shared::exit::Exit;
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

mod demo;
mod demo_seed;
mod local;
mod operate;
mod runs;

/// What every command may read: the configuration file and the output format.
struct Ctx {
    config: Option<PathBuf>,
    json: bool,
}

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
    #[command(flatten)]
    Local(local::LocalCommand),
    #[command(flatten)]
    Runs(runs::RunCommand),
    #[command(flatten)]
    Operate(operate::OperateCommand),
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

fn bad_input(e: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: Exit::BadInput.code(),
        error: e.into(),
    }
}

fn unavailable(e: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: Exit::Unavailable.code(),
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
                ExitCode::from(Exit::BadInput)
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
    let ctx = Ctx {
        config: cli.config,
        json: cli.json,
    };
    match command {
        Command::Local(c) => local::run(&ctx, c).await,
        Command::Runs(c) => runs::run(&ctx, c).await,
        Command::Operate(c) => operate::run(&ctx, c).await,
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
        ) => ExitCode::from(Exit::Failed),
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
    // As wide as the longest step id, so columns stay aligned.
    let w = view
        .steps
        .iter()
        .map(|st| st.id.chars().count())
        .max()
        .unwrap_or(0)
        .max(17);
    let _ = writeln!(
        s,
        "\n  {:<w$} {:<28} {:>8} {:>8}  status",
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
            "  {:<w$} {:<28} {:>8} {:>8}  {}",
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
            if let Some(subject) = &h.subject {
                let _ = writeln!(s, "      approves saved plan {subject}");
            }
        }
        for e in view
            .history
            .iter()
            .filter(|e| e.step_id.as_deref() == Some(st.id.as_str()))
        {
            for v in e.verdicts() {
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
    s.push_str(&render_timing(view, chrono::Utc::now()));
    s
}

/// The timing table: each step's typical duration from the pipeline against
/// its actual one, the steps it ran beside, and the run against its budget.
pub fn render_timing(view: &RunView, now: chrono::DateTime<chrono::Utc>) -> String {
    use std::fmt::Write;
    let t = crate::timing::of(view, now);
    let mut s = String::new();
    let w = t
        .steps
        .iter()
        .map(|st| st.step.chars().count())
        .max()
        .unwrap_or(0)
        .max(4);
    let _ = writeln!(
        s,
        "\n  {:<w$} {:<16} {:>11} {:>9} {:<4}  parallel with",
        "step", "role", "typical", "actual", ""
    );
    for st in &t.steps {
        let actual = match st.actual_secs {
            Some(a) if st.running => format!("{}…", crate::timing::duration_text(a)),
            Some(a) => crate::timing::duration_text(a),
            None => "—".to_owned(),
        };
        let line = format!(
            "  {:<w$} {:<16} {:>11} {:>9} {:<4}  {}",
            st.step,
            st.role,
            crate::timing::typical_text(st.typical_minutes),
            actual,
            if st.over { "OVER" } else { "" },
            if st.parallel.is_empty() {
                "—".to_owned()
            } else {
                st.parallel.join(", ")
            },
        );
        // The list of parallel steps is cut to the terminal's 80 columns.
        let _ = writeln!(s, "{}", truncate(line.trim_end(), 80.max(w + 50)));
    }
    if let Some(a) = t.actual_secs {
        let budget = t
            .budget_minutes
            .map(|b| format!(" of a {b} min budget{}", if t.over { ": OVER" } else { "" }))
            .unwrap_or_default();
        let _ = writeln!(s, "  run {}{budget}", crate::timing::duration_text(a));
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
