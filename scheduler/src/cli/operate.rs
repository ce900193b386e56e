//! Commands about the environment, through the API: incidents, environment locks, dead letters.

use super::*;

#[derive(Debug, Subcommand)]
pub(super) enum OperateCommand {
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
}

#[derive(Debug, Subcommand)]
pub(super) enum DlqCommand {
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
pub(super) enum IncidentCommand {
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
pub(super) enum LocksCommand {
    /// Release an environment held after a failed rollback, once it has been
    /// put right by hand; its next waiting run starts.
    Release {
        service: String,
        environment: String,
        #[arg(long)]
        reason: String,
    },
}

pub(super) async fn run(cli: &Ctx, command: OperateCommand) -> Outcome {
    match command {
        OperateCommand::Incident { command } => {
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
        OperateCommand::Dlq { command } => {
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
        OperateCommand::Locks {
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
        OperateCommand::Locks { command: None } => {
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
    }
}
