//! Commands about runs, through the API: list, show, follow, approve or reject, cancel, roll back, redeploy.

use super::*;

#[derive(Debug, Subcommand)]
pub(super) enum RunCommand {
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
        /// The saved Terraform plan you reviewed (`approves saved plan …` in
        /// `baton runs show`): required for a step held by its blast radius,
        /// and refused if the step now waits for another.
        #[arg(long)]
        subject: Option<String>,
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
}

#[derive(Debug, Subcommand)]
pub(super) enum RunsCommand {
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

pub(super) async fn run(cli: &Ctx, command: RunCommand) -> Outcome {
    match command {
        RunCommand::Runs { command } => {
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
        RunCommand::Watch { run } => {
            let c = api_client(cli.config.as_deref())?;
            watch(&c, run, cli.json).await
        }
        RunCommand::Approve {
            run,
            step,
            plan_hash,
            subject,
            comment,
        } => {
            let c = api_client(cli.config.as_deref())?;
            let body =
                serde_json::json!({"step": step, "plan_hash": plan_hash, "subject": subject, "comment": comment});
            let v: serde_json::Value = c
                .post(&format!("/v1/runs/{run}/approve"), &body)
                .await
                .map_err(api_failure)?;
            print_decision(&v, cli.json);
            Ok(ExitCode::SUCCESS)
        }
        RunCommand::Reject {
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
        RunCommand::Cancel { run, reason } => {
            let v = post_reason(cli.config.as_deref(), &format!("/v1/runs/{run}/cancel"), &reason).await?;
            if cli.json {
                print_json(&v);
            } else {
                println!("cancel requested for run {run}; `baton watch {run}` follows it");
            }
            Ok(ExitCode::SUCCESS)
        }
        RunCommand::Redeploy { run, reason } => {
            let v = post_reason(cli.config.as_deref(), &format!("/v1/runs/{run}/redeploy"), &reason).await?;
            if cli.json {
                print_json(&v);
            } else {
                let new = v["run_id"].as_str().unwrap_or("?");
                println!("run {new} deploys the merge event of run {run} again; `baton watch {new}` follows it");
            }
            Ok(ExitCode::SUCCESS)
        }
        RunCommand::Rollback { run, reason } => {
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
