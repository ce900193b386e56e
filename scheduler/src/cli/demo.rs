//! `baton demo`: the db-migration and backup roles end to end on this machine.
//!
//! Against the configured RabbitMQ and PostgreSQL it creates a demo scheduler
//! database and `shop_staging` / `shop_production` databases, a RabbitMQ vhost
//! of its own, a git repository from `examples/demo/commit-*`, keys, and starts
//! the scheduler and the db-migration and backup daemons for both zones as
//! separate processes. It waits until each of them consumes its queues (and
//! the scheduler has initialised its database), then enqueues three merge
//! events and shows each run step by step:
//!
//! 1. commit 1 creates the schema: backed up, migrated on staging, then on
//!    production, backed up again;
//! 2. commit 2 adds a NOT NULL column: fine on staging (no rows), impossible on
//!    production (customers exist), so the run is rolled back: the staging
//!    migration is undone with its down migration;
//! 3. commit 3 is a data migration without a down migration: an operator rolls
//!    it back, and both zones are restored from the run's pre-deploy backups.
//!
//! One demo per database prefix runs at a time (a PostgreSQL advisory lock).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_shared::protocol::{MergeEvent, Message, PROTOCOL_VERSION, PrApproval, PullRequest, Risk};
use baton_shared::signing::Keypair;
use baton_shared::topology;
use chrono::Utc;
use sqlx::{Connection, PgConnection, Row};
use uuid::Uuid;

use crate::config::Config;
use crate::store::{self, RunView};

/// What `baton demo` is asked to do.
pub struct Options {
    /// Folder with the demo repository's commits and pipeline.
    pub examples: Option<PathBuf>,
    /// Prefix of the demo's database names (and part of its vhost's name).
    pub prefix: String,
    /// How long to wait for a started process to be ready.
    pub ready_timeout: Duration,
}

/// Where the demo's processes and files live for one invocation.
pub(super) struct Demo {
    pub(super) dir: PathBuf,
    pub(super) bin_dir: PathBuf,
    pub(super) examples: PathBuf,
    pub(super) amqp_url: String,
    pub(super) children: Vec<(String, Child)>,
    /// The demo's own RabbitMQ vhost, removed when the demo ends.
    pub(super) vhost: Option<String>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for (_, child) in &mut self.children {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(vhost) = self.vhost.take() {
            let _ = rabbitmqctl(&["delete_vhost", &vhost]);
        }
    }
}

/// Runs `rabbitmqctl` (the demo runs on the broker's machine, as the README says).
pub(super) fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("rabbitmqctl").args(args).output().map_err(|e| {
        anyhow::anyhow!(
            "cannot run rabbitmqctl ({e}): baton demo makes a RabbitMQ vhost of its own with it, \
             so run the demo on the broker's machine"
        )
    })?;
    if !out.status.success() {
        bail!(
            "rabbitmqctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `amqp://user:pw@host:port/vhost?query` with its vhost replaced, and the user
/// it names (`guest` when none, as AMQP's default).
pub(super) fn with_vhost(url: &str, vhost: &str) -> anyhow::Result<(String, String)> {
    let (scheme, rest) = url
        .split_once("://")
        .with_context(|| format!("amqp.url {} has no scheme", baton_shared::secret::redact_url(url)))?;
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let query = tail.find('?').map(|i| &tail[i..]).unwrap_or("");
    let user = authority
        .rsplit_once('@')
        .map(|(info, _)| info.split(':').next().unwrap_or(""))
        .filter(|u| !u.is_empty())
        .unwrap_or("guest");
    Ok((format!("{scheme}://{authority}/{vhost}{query}"), user.to_owned()))
}

/// A process the demo started and what it must be consuming before the demo
/// sends it work.
pub(super) struct Readiness {
    pub(super) label: String,
    pub(super) queues: Vec<String>,
    /// The scheduler must also have initialised its database.
    pub(super) database: bool,
}

impl Readiness {
    /// The scheduler: its database initialised, consuming its queues.
    pub(super) fn scheduler() -> Self {
        Self {
            label: "scheduler".to_owned(),
            queues: [
                topology::MERGE_EVENTS_QUEUE,
                topology::DEAD_QUEUE,
                topology::NOTICES_QUEUE,
            ]
            .into_iter()
            .map(str::to_owned)
            .chain(topology::result_queues())
            .collect(),
            database: true,
        }
    }
}

pub(super) fn db_url(server: &str, db: &str) -> String {
    format!("{server}/{db}")
}

/// `postgres://user@host:port/db` → `postgres://user@host:port`.
pub(super) fn server_of(url: &str) -> String {
    match url.rsplit_once('/') {
        Some((server, _)) if server.contains("://") && !server.ends_with('/') => server.to_owned(),
        _ => url.trim_end_matches('/').to_owned(),
    }
}

pub(super) fn git(repo: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .env("GIT_AUTHOR_NAME", "Sanne Demo")
        .env("GIT_AUTHOR_EMAIL", "sanne@example.org")
        .env("GIT_COMMITTER_NAME", "Sanne Demo")
        .env("GIT_COMMITTER_EMAIL", "sanne@example.org")
        .output()
        .with_context(|| format!("running git {args:?}"))?;
    if !out.status.success() {
        bail!("git {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub(super) fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            std::fs::create_dir_all(&target)?;
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

pub(super) fn changed_paths(repo: &Path, from: Option<&str>, to: &str) -> anyhow::Result<Vec<String>> {
    let listing = match from {
        Some(f) => git(repo, &["diff", "--name-only", f, to])?,
        None => git(repo, &["ls-tree", "-r", "--name-only", to])?,
    };
    Ok(listing.lines().map(str::to_owned).collect())
}

/// A connection to the server's `postgres` database.
pub(super) async fn admin_connection(server: &str) -> anyhow::Result<PgConnection> {
    PgConnection::connect(&db_url(server, "postgres"))
        .await
        .with_context(|| {
            format!(
                "connecting to PostgreSQL at {}",
                baton_shared::secret::redact_url(server)
            )
        })
}

pub(super) async fn recreate_database(server: &str, name: &str) -> anyhow::Result<()> {
    let mut admin = admin_connection(server).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "drop database if exists {name} with (force)"
    )))
    .execute(&mut admin)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
        .execute(&mut admin)
        .await?;
    Ok(())
}

impl Demo {
    pub(super) fn spawn(
        &mut self,
        label: &str,
        bin: &str,
        args: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<()> {
        let path = self.bin_dir.join(bin);
        if !path.exists() {
            bail!(
                "{} is not built; build every binary first: cargo build --workspace --bins",
                path.display()
            );
        }
        let log = std::fs::File::create(self.dir.join(format!("{label}.log")))?;
        let mut cmd = Command::new(&path);
        cmd.args(args)
            .env("BATON_LOG__FORMAT", "json")
            .env("BATON_AMQP__URL", &self.amqp_url)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("starting {label}"))?;
        self.children.push((label.to_owned(), child));
        Ok(())
    }

    pub(super) fn check_alive(&mut self) -> anyhow::Result<()> {
        for (label, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                let log = self.dir.join(format!("{label}.log"));
                bail!(
                    "{label} exited ({status}); the end of its log ({}):\n{}",
                    log.display(),
                    log_tail(&log, 15)
                );
            }
        }
        Ok(())
    }

    /// Waits until every process is ready: consuming each of its queues (and
    /// for the scheduler, its database initialised), or names the first that
    /// is not, with the end of its log.
    pub(super) async fn wait_ready(
        &mut self,
        broker: &baton_shared::amqp::Broker,
        pool: &sqlx::PgPool,
        expected: &[Readiness],
        patience: Duration,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        let mut waiting: Vec<&Readiness> = expected.iter().collect();
        loop {
            self.check_alive()?;
            let mut still = Vec::new();
            let mut why = String::new();
            for r in waiting {
                match not_ready(broker, pool, r).await? {
                    Some(reason) => {
                        if why.is_empty() {
                            why = format!("{} is not ready: {reason}", r.label);
                        }
                        still.push(r);
                    }
                    None => tracing::debug!(process = %r.label, "ready"),
                }
            }
            waiting = still;
            let Some(first) = waiting.first() else {
                return Ok(());
            };
            if start.elapsed() > patience {
                let log = self.dir.join(format!("{}.log", first.label));
                bail!(
                    "{why} after {} s; the end of its log ({}):\n{}",
                    patience.as_secs(),
                    log.display(),
                    log_tail(&log, 15)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Why one process is not ready yet, or `None` when it is.
async fn not_ready(
    broker: &baton_shared::amqp::Broker,
    pool: &sqlx::PgPool,
    r: &Readiness,
) -> anyhow::Result<Option<String>> {
    if r.database {
        match store::require_initialised(pool).await {
            Ok(()) => {}
            Err(store::StoreError::NotInitialised { .. }) => {
                return Ok(Some("its database is not initialised yet".to_owned()));
            }
            Err(e) => return Err(e.into()),
        }
    }
    for q in &r.queues {
        match broker.queue_state(q).await? {
            None => return Ok(Some(format!("queue {q} is not declared yet"))),
            Some(s) if s.consumers == 0 => return Ok(Some(format!("nothing consumes {q} yet"))),
            Some(_) => {}
        }
    }
    Ok(None)
}

/// The last `n` lines of a log file (or why it cannot be read).
pub(super) fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(n)..].join("\n    ");
            if tail.is_empty() {
                "    (empty)".to_owned()
            } else {
                format!("    {tail}")
            }
        }
        Err(e) => format!("    (cannot read it: {e})"),
    }
}

pub(super) fn event(repo: &Path, sha: &str, paths: Vec<String>, title: &str, number: u64) -> MergeEvent {
    service_event("shop-api", repo, sha, paths, title, number)
}

/// A merge event of `service` as CI sends it for pull request `number`.
pub(super) fn service_event(
    service: &str,
    repo: &Path,
    sha: &str,
    paths: Vec<String>,
    title: &str,
    number: u64,
) -> MergeEvent {
    MergeEvent {
        v: PROTOCOL_VERSION,
        service: service.into(),
        environment: "production".into(),
        repository: repo.display().to_string(),
        commit_sha: sha.to_owned(),
        pull_request: PullRequest {
            number,
            title: title.to_owned(),
            author: "sanne".into(),
            approvals: vec![PrApproval {
                by: "marta".into(),
                at: Utc::now(),
            }],
        },
        changed_paths: paths,
        flags: vec![],
        risk: Risk::Standard,
        requested_by: "baton demo".into(),
        ci_run_url: format!("https://ci.example.org/{service}/runs/{number}"),
        exceptions: Vec::new(),
    }
}

/// Prints audit rows of the run as they appear, until the run ends.
async fn follow(pool: &sqlx::PgPool, demo: &mut Demo, run: Uuid, patience: Duration) -> anyhow::Result<RunView> {
    follow_until(pool, demo, run, patience, &mut 0, |v| v.is_terminal()).await
}

/// Prints audit rows of the run after `seen` as they appear, until `stop`
/// holds for the run (or it ends); `seen` is where the next call goes on.
pub(super) async fn follow_until(
    pool: &sqlx::PgPool,
    demo: &mut Demo,
    run: Uuid,
    patience: Duration,
    seen: &mut i64,
    stop: impl Fn(&RunView) -> bool,
) -> anyhow::Result<RunView> {
    let start = Instant::now();
    loop {
        demo.check_alive()?;
        let rows = sqlx::query(
            "select id, at, step_id, attempt, kind, detail from audit where run_id = $1 and id > $2 order by id",
        )
        .bind(run)
        .bind(*seen)
        .fetch_all(pool)
        .await?;
        for r in rows {
            *seen = r.try_get("id")?;
            let step: Option<String> = r.try_get("step_id")?;
            let attempt: Option<i32> = r.try_get("attempt")?;
            let kind: String = r.try_get("kind")?;
            let detail: serde_json::Value = r.try_get::<sqlx::types::Json<serde_json::Value>, _>("detail")?.0;
            let t = start.elapsed().as_secs_f64();
            let what = match kind.as_str() {
                "run_status" => format!("run is {}", detail["to"].as_str().unwrap_or("?")),
                "dispatched" => format!(
                    "{} sent (attempt {})",
                    detail["kind"].as_str().unwrap_or("job"),
                    attempt.unwrap_or(0)
                ),
                "attempt_started" => format!("started on {}", detail["daemon"].as_str().unwrap_or("?")),
                "step_succeeded" => "succeeded".to_owned(),
                "step_compensated" => "compensated (undone)".to_owned(),
                "step_failed" | "compensation_failed" | "retry_scheduled" => format!(
                    "{}: {}",
                    kind.replace('_', " "),
                    detail["error"]["message"].as_str().unwrap_or("")
                ),
                "step_cancelled" => "cancelled".to_owned(),
                "restore_from_backup" => format!(
                    "no down migration: restoring backup {}",
                    detail["backup_id"].as_str().unwrap_or("?")
                ),
                "lock_acquired" => "holds the environment's lock".to_owned(),
                "run_created" => "planned".to_owned(),
                _ => continue,
            };
            let step = step
                .map(|s| format!("{s:<16}"))
                .unwrap_or_else(|| format!("{:<16}", "run"));
            println!("  {t:>6.1}s  {step} {}", truncate(&what, 52));
        }
        if let Some(view) = store::run_view(pool, run).await?
            && (view.is_terminal() || stop(&view))
        {
            return Ok(view);
        }
        if start.elapsed() > patience {
            bail!(
                "run {run} did not end within {patience:?}; logs are in {}",
                demo.dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

pub(super) fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        s.chars().take(max - 1).collect::<String>() + "…"
    }
}

pub(super) async fn describe_schema(server: &str, db: &str) -> anyhow::Result<String> {
    let mut conn = PgConnection::connect(&db_url(server, db)).await?;
    let cols: Vec<String> = sqlx::query_scalar(
        "select column_name::text from information_schema.columns
         where table_schema = 'public' and table_name = 'customers' order by ordinal_position",
    )
    .fetch_all(&mut conn)
    .await?;
    let applied: i64 = sqlx::query_scalar("select count(*) from drizzle.__drizzle_migrations")
        .fetch_one(&mut conn)
        .await
        .unwrap_or(0);
    Ok(format!(
        "{db}:\n    customers({}); {applied} migration(s) applied",
        cols.join(", ")
    ))
}

/// Runs the demo; returns whether the runs ended as they should. Interrupted
/// (Ctrl-C, SIGTERM), it stops its processes and removes its vhost first.
pub async fn run(cfg: &Config, opts: &Options) -> anyhow::Result<bool> {
    for c in opts.prefix.chars() {
        if !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
            bail!("--prefix may only contain a-z, 0-9 and _");
        }
    }
    tokio::select! {
        res = run_demo(cfg, opts) => res,
        () = baton_shared::shutdown::signal() => bail!("interrupted; the demo's processes were stopped"),
    }
}

/// Takes the lock that lets one demo with a given prefix run at a time on a
/// PostgreSQL server (a session advisory lock: it ends with the connection,
/// so a killed demo leaves no lock behind).
pub(super) async fn demo_lock(server: &str, prefix: &str) -> anyhow::Result<PgConnection> {
    let mut conn = admin_connection(server).await?;
    let taken: bool = sqlx::query_scalar("select pg_try_advisory_lock(hashtextextended($1, 0))")
        .bind(format!("baton demo/{prefix}"))
        .fetch_one(&mut conn)
        .await?;
    if !taken {
        bail!(
            "another `baton demo` is running against this PostgreSQL server with the same databases \
             (prefix {prefix:?}); wait for it to finish, or give this one its own --prefix"
        );
    }
    Ok(conn)
}

/// What both demos do first: find the examples (a folder holding `marker`),
/// make the demo's directory, its own RabbitMQ vhost (nothing an earlier,
/// interrupted demo left in the broker reaches this one; the lock the caller
/// holds makes it this invocation's) and a connection to it; prints `title`.
pub(super) async fn begin(
    cfg: &Config,
    opts: &Options,
    marker: &str,
    title: &str,
) -> anyhow::Result<(Demo, baton_shared::amqp::Broker)> {
    let exe = std::env::current_exe()?;
    let bin_dir = exe.parent().context("binary directory")?.to_path_buf();
    let examples = match opts.examples.clone() {
        Some(e) => e,
        None => [
            "examples/demo",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/demo"),
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join(marker).exists())
        .context("examples/demo not found; run from the repository root or pass --examples DIR")?,
    };
    let dir = std::env::temp_dir().join(format!("baton-demo-{}", &Uuid::new_v4().simple().to_string()[..8]));
    std::fs::create_dir_all(&dir)?;
    let vhost = format!("baton-demo-{}", opts.prefix)
        .trim_end_matches(['-', '_'])
        .to_owned();
    let (amqp_url, amqp_user) = with_vhost(cfg.amqp.url.expose(), &vhost)?;
    let mut demo = Demo {
        dir: dir.clone(),
        bin_dir,
        examples,
        amqp_url: amqp_url.clone(),
        children: Vec::new(),
        vhost: None,
    };
    println!("{title} — files and logs in {}", dir.display());
    let _ = rabbitmqctl(&["delete_vhost", &vhost]);
    rabbitmqctl(&["add_vhost", &vhost])?;
    demo.vhost = Some(vhost.clone());
    rabbitmqctl(&["set_permissions", "-p", &vhost, &amqp_user, ".*", ".*", ".*"])?;
    println!("  RabbitMQ vhost {vhost} (removed at the end)");
    let mut amqp = cfg.amqp.clone();
    amqp.url = baton_shared::secret::Secret::new(amqp_url);
    let broker = baton_shared::amqp::Broker::connect_config(&amqp, "baton demo").await?;
    Ok((demo, broker))
}

async fn run_demo(cfg: &Config, opts: &Options) -> anyhow::Result<bool> {
    let prefix = opts.prefix.as_str();
    let _lock = demo_lock(&server_of(cfg.database.url.expose()), prefix).await?;
    let (sched_db, staging_db, production_db) = (
        format!("{prefix}baton_demo"),
        format!("{prefix}shop_staging"),
        format!("{prefix}shop_production"),
    );
    let (mut demo, broker) = begin(cfg, opts, "pipeline.toml", "Baton demo").await?;
    let (exe, dir, examples, server_url) = (
        std::env::current_exe()?,
        demo.dir.clone(),
        demo.examples.clone(),
        server_of(cfg.database.url.expose()),
    );

    // Databases: the scheduler's, and the shop's staging and production.
    for db in [&sched_db, &staging_db, &production_db] {
        recreate_database(&server_url, db).await?;
    }
    let pool = store::connect(&db_url(&server_url, &sched_db), 4).await?;
    println!("  created databases:");
    for db in [&sched_db, &staging_db, &production_db] {
        println!("    {db}");
    }

    // The shop's repository: two commits from examples/demo.
    let repo = dir.join("shop-api");
    std::fs::create_dir_all(&repo)?;
    git(&repo, &["init", "-q", "-b", "main"])?;
    copy_tree(&demo.examples.join("commit-1"), &repo)?;
    git(&repo, &["add", "-A"])?;
    git(&repo, &["commit", "-q", "-m", "Create customers and orders"])?;
    let sha1 = git(&repo, &["rev-parse", "HEAD"])?;
    copy_tree(&demo.examples.join("commit-2"), &repo)?;
    git(&repo, &["add", "-A"])?;
    git(&repo, &["commit", "-q", "-m", "Add loyalty tier"])?;
    let sha2 = git(&repo, &["rev-parse", "HEAD"])?;
    // Commit 3 drops commit 2's migration (it never reached production) and adds a
    // data migration that has no down, only a recovery procedure.
    git(
        &repo,
        &[
            "rm",
            "-q",
            "drizzle/migrations/0001_loyalty_tier.sql",
            "drizzle/migrations/0001_loyalty_tier.down.sql",
        ],
    )?;
    copy_tree(&demo.examples.join("commit-3"), &repo)?;
    git(&repo, &["add", "-A"])?;
    git(&repo, &["commit", "-q", "-m", "Lower-case e-mail addresses"])?;
    let sha3 = git(&repo, &["rev-parse", "HEAD"])?;
    println!("  repository {}", repo.display());
    println!("    with commits {}, {} and {}", &sha1[..10], &sha2[..10], &sha3[..10]);

    // Keys: the scheduler signs jobs, daemons sign results.
    let (sched_key, daemon_key) = (Keypair::generate(), Keypair::generate());
    std::fs::write(dir.join("scheduler.key"), sched_key.secret_file_contents())?;
    std::fs::write(dir.join("daemon.key"), daemon_key.secret_file_contents())?;

    let scheduler_env = vec![
        ("BATON_DATABASE__URL", db_url(&server_url, &sched_db)),
        ("BATON_API__LISTEN", String::new()),
        (
            "BATON_SCHEDULER__PIPELINE",
            examples.join("pipeline.toml").display().to_string(),
        ),
        ("BATON_SCHEDULER__HEARTBEAT_MS", "1000".to_owned()),
        ("BATON_SCHEDULER__LEASE_MS", "10000".to_owned()),
        (
            "BATON_SIGNING__KEY_FILE",
            dir.join("scheduler.key").display().to_string(),
        ),
        ("BATON_SIGNING__TRUSTED", format!("[{:?}]", daemon_key.public())),
    ];
    demo.spawn(
        "scheduler",
        exe.file_name().and_then(|n| n.to_str()).unwrap_or("baton"),
        &["scheduler"],
        &scheduler_env,
    )?;
    let age_recipient = {
        let out = Command::new(demo.bin_dir.join("baton-backup"))
            .arg("--keygen")
            .arg(dir.join("backup-identity.txt"))
            .output()
            .context("running baton-backup --keygen (build every binary first: cargo build --workspace --bins)")?;
        if !out.status.success() {
            bail!("baton-backup --keygen failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    for zone in ["staging", "production"] {
        let common = vec![
            ("BATON_DAEMON__INSTANCE", format!("{zone}-daemon")),
            ("BATON_SIGNING__KEY_FILE", dir.join("daemon.key").display().to_string()),
            ("BATON_SIGNING__TRUSTED", format!("[{:?}]", sched_key.public())),
        ];
        let shop_db = db_url(&server_url, &format!("{prefix}shop_{zone}"));
        let migration = dir.join(format!("db-migration-{zone}.toml"));
        std::fs::write(
            &migration,
            format!(
                "[daemon]\nzone = {zone:?}\n\n[migration]\nrepos_dir = {repos:?}\nadmin_url = {admin:?}\n\n\
                 [migration.databases]\nshop-api = {shop_db:?}\n",
                repos = dir.join(format!("repos-{zone}")).display().to_string(),
                admin = db_url(&server_url, "postgres"),
            ),
        )?;
        let migration = migration.display().to_string();
        demo.spawn(
            &format!("db-migration-{zone}"),
            "baton-db-migration",
            &["--config", &migration],
            &common,
        )?;
        {
            let backup = dir.join(format!("backup-{zone}.toml"));
            std::fs::write(
                &backup,
                format!(
                    "[daemon]\nzone = {zone:?}\n\n[backup]\nadmin_url = {admin:?}\nrecipients = [{age_recipient:?}]\n\
                     identity_file = {identity:?}\n\n[backup.primary]\npath = {primary:?}\nregion = \"nl-ams1\"\n\n\
                     [backup.copy]\npath = {copy:?}\nregion = \"nl-ams2\"\n\n[backup.databases]\nshop-api = {shop_db:?}\n\n\
                     # The demo shows deploys; the daily backup, prune and restore test stay off.\n\
                     [backup.schedule]\nenabled = false\n",
                    admin = db_url(&server_url, "postgres"),
                    identity = dir.join("backup-identity.txt").display().to_string(),
                    primary = dir.join("backups/primary").display().to_string(),
                    copy = dir.join("backups/copy").display().to_string(),
                ),
            )?;
            std::fs::create_dir_all(dir.join("backups/primary"))?;
            std::fs::create_dir_all(dir.join("backups/copy"))?;
            let backup = backup.display().to_string();
            demo.spawn(
                &format!("backup-{zone}"),
                "baton-backup",
                &["--config", &backup],
                &common,
            )?;
        }
    }
    println!("  started the scheduler and daemons:");
    println!("    db-migration and backup, each for staging and production");
    let mut expected = vec![Readiness::scheduler()];
    for zone in ["staging", "production"] {
        for role in [baton_shared::roles::DB_MIGRATION, baton_shared::roles::BACKUP] {
            expected.push(Readiness {
                label: format!("{role}-{zone}"),
                queues: vec![topology::job_queue(zone, role)],
                database: false,
            });
        }
    }
    let waited = Instant::now();
    demo.wait_ready(&broker, &pool, &expected, opts.ready_timeout).await?;
    println!(
        "    all consuming their queues after {:.1} s",
        waited.elapsed().as_secs_f64()
    );

    let patience = Duration::from_secs(180);
    let ev1 = event(
        &repo,
        &sha1,
        changed_paths(&repo, None, &sha1)?,
        "Create customers and orders",
        101,
    );
    let run1 = enqueue(&broker, &ev1).await?;
    println!(
        "\n1) merge of {} — {}\n   run {run1}",
        &sha1[..10],
        ev1.pull_request.title
    );
    let view1 = follow(&pool, &mut demo, run1, patience).await?;
    print!("\n{}", super::render_run(&view1, false));

    // Production has customers; staging (anonymised, here empty) has none.
    let mut prod = PgConnection::connect(&db_url(&server_url, &production_db)).await?;
    sqlx::query("insert into customers (email) values ('Ada@Example.org'), ('grace@example.org')")
        .execute(&mut prod)
        .await
        .context("the first run should have created customers on production")?;
    println!("\n   production now has 2 customers");

    let ev2 = event(
        &repo,
        &sha2,
        changed_paths(&repo, Some(&sha1), &sha2)?,
        "Add loyalty tier",
        102,
    );
    let run2 = enqueue(&broker, &ev2).await?;
    println!(
        "\n2) merge of {} — {}\n   run {run2}",
        &sha2[..10],
        ev2.pull_request.title
    );
    let view2 = follow(&pool, &mut demo, run2, patience).await?;
    print!("\n{}", super::render_run(&view2, false));

    let ev3 = event(
        &repo,
        &sha3,
        changed_paths(&repo, Some(&sha2), &sha3)?,
        "Lower-case e-mail addresses",
        103,
    );
    let run3 = enqueue(&broker, &ev3).await?;
    println!(
        "\n3) merge of {} — {}\n   run {run3}",
        &sha3[..10],
        ev3.pull_request.title
    );
    let view3 = follow(&pool, &mut demo, run3, patience).await?;
    print!("\n{}", super::render_run(&view3, false));
    let lowered = emails(&mut prod).await?;
    println!("\n   production e-mails now: {}", lowered.join(", "));
    println!("   an operator rolls run 3 back: its migration has no down migration");
    let settings = cfg.engine_settings()?;
    let operator = store::Store::new(pool.clone(), settings, Duration::ZERO, "demo-operator");
    let out = operator
        .request_rollback(run3, "demo-operator", "the support team needs the original spelling")
        .await?;
    // Zero claim: the scheduler's sweeper publishes what the rollback caused.
    drop(out);
    let view3 = follow(&pool, &mut demo, run3, patience).await?;
    print!("\n{}", super::render_run(&view3, false));
    let restored = emails(&mut prod).await?;
    println!("\n   production e-mails after the rollback: {}", restored.join(", "));

    println!("\nFinal state:");
    for db in [&staging_db, &production_db] {
        println!("  {}", describe_schema(&server_url, db).await?);
    }
    let ok = view1.status == "succeeded"
        && view2.status == "rolled_back"
        && view3.status == "rolled_back"
        && lowered.iter().all(|e| *e == e.to_lowercase())
        && restored.iter().any(|e| e == "Ada@Example.org");
    println!(
        "\n{}",
        if ok {
            "Demo finished as expected: run 1 succeeded, run 2 was rolled back on\n\
             staging, run 3 was undone by restoring both zones' pre-deploy backups."
        } else {
            "Demo did NOT end as expected; see the logs above."
        }
    );
    broker.close().await;
    Ok(ok)
}

async fn emails(conn: &mut PgConnection) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("select email from customers order by id")
        .fetch_all(conn)
        .await
}

pub(super) async fn enqueue(broker: &baton_shared::amqp::Broker, ev: &MergeEvent) -> anyhow::Result<Uuid> {
    let out = baton_shared::amqp::Outgoing {
        message_id: Some(ev.run_id()),
        ..Default::default()
    };
    broker
        .publish(
            topology::EVENTS_EXCHANGE,
            topology::MERGE_EVENTS_KEY,
            &ev.to_bytes(),
            &out,
        )
        .await
        .context("enqueueing the merge event")?;
    Ok(ev.run_id())
}
