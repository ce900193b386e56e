//! Commands that work on this machine: serve, the demo, planning, enqueueing, keys, tokens, the audit log, pipelines.

use super::*;

#[derive(Debug, Subcommand)]
pub(super) enum LocalCommand {
    /// Serve: consume merge events and results, dispatch jobs, fire timers.
    Scheduler,
    /// Run the seed pipeline on the eight real role daemons on this machine
    /// (`--migrations`: only the db-migration and backup roles, with their
    /// down migrations and backup restores).
    Demo {
        /// The db-migration and backup demo instead.
        #[arg(long)]
        migrations: bool,
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
pub(super) enum TokenCommand {
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
pub(super) enum AuditCommand {
    /// Check every hash chain; exit 1 naming the first broken row.
    Verify,
}

#[derive(Debug, Subcommand)]
pub(super) enum PipelineCommand {
    /// Check a pipeline file and print its steps.
    Validate { file: PathBuf },
}

pub(super) async fn run(cli: &Ctx, command: LocalCommand) -> Outcome {
    match command {
        LocalCommand::Scheduler => {
            let cfg = load_config(cli.config.as_deref())?;
            cfg.validate_for_serving().map_err(bad_input)?;
            telemetry::init_logging(&cfg.log);
            let pipeline = load_pipeline(None, Some(&cfg))?;
            crate::service::run(cfg, pipeline, baton_shared::shutdown::signal())
                .await
                .map_err(unavailable)?;
            Ok(ExitCode::SUCCESS)
        }
        LocalCommand::Demo {
            migrations,
            examples,
            prefix,
            ready_timeout,
        } => {
            let cfg = load_config(cli.config.as_deref())?;
            let opts = demo::Options {
                examples,
                prefix,
                ready_timeout: std::time::Duration::from_secs(ready_timeout),
            };
            let result = if migrations {
                demo::run(&cfg, &opts).await
            } else {
                demo_seed::run(&cfg, &opts).await
            };
            match result {
                Ok(true) => Ok(ExitCode::SUCCESS),
                Ok(false) => Ok(ExitCode::from(Exit::Failed)),
                Err(e) => Err(unavailable(e)),
            }
        }
        LocalCommand::Enqueue { event } => {
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
        LocalCommand::Plan { event, pipeline } => {
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
        LocalCommand::Pipeline {
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
        LocalCommand::Token {
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
        LocalCommand::Keygen { out } => {
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
        LocalCommand::Audit {
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
                ExitCode::from(Exit::Failed)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
