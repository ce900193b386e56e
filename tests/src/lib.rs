//! Test harness: real RabbitMQ, real PostgreSQL, real processes.
//!
//! Each [`TestEnv`] gets its own RabbitMQ vhost and its own database, so tests
//! run in parallel and leave nothing behind; dropping it kills the processes it
//! started and removes both.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use baton_scheduler::store::{self, RunView};
use baton_shared::signing::Keypair;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

pub mod script {
    //! The test daemon's script: how each step behaves, per kind of job.

    use std::collections::BTreeMap;
    use std::path::Path;

    use baton_shared::protocol::{Fields, JobKind, StepError};
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct StepBehaviour {
        pub delay_ms: u64,
        /// The first N executions of this kind in one daemon fail retryably.
        pub fail_first: u32,
        /// Always fail with this error.
        pub fail: Option<StepError>,
        pub outputs: Option<Fields>,
    }

    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct Script {
        pub default: StepBehaviour,
        pub execute: BTreeMap<String, StepBehaviour>,
        pub compensate: BTreeMap<String, StepBehaviour>,
        /// Facts a test declares for the gates to read, by step id: outputs the
        /// step's execution reports (before its behaviour's `outputs`). In
        /// strings, `{run_id}`, `{commit_sha}`, `{service}` and `{step_id}` are
        /// the job's. The test daemon reports no fact a test did not declare.
        pub facts: BTreeMap<String, Fields>,
    }

    /// `v` with the job's values in place of `{run_id}`, `{commit_sha}`,
    /// `{service}` and `{step_id}` in every string.
    fn fill(v: &serde_json::Value, job: &baton_shared::protocol::StepJob) -> serde_json::Value {
        match v {
            serde_json::Value::String(s) => serde_json::Value::String(
                s.replace("{run_id}", &job.run_id.to_string())
                    .replace("{commit_sha}", &job.deploy.commit_sha)
                    .replace("{service}", &job.deploy.service)
                    .replace("{step_id}", &job.step_id),
            ),
            serde_json::Value::Array(a) => a.iter().map(|x| fill(x, job)).collect(),
            serde_json::Value::Object(m) => m.iter().map(|(k, x)| (k.clone(), fill(x, job))).collect(),
            other => other.clone(),
        }
    }

    impl Script {
        pub fn load(path: &Path) -> Self {
            let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read script {}: {e}", path.display()));
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse script {}: {e}", path.display()))
        }

        /// The facts declared for the job's step, with the job's values filled in.
        pub fn facts_for(&self, job: &baton_shared::protocol::StepJob) -> Fields {
            if job.kind != JobKind::Execute {
                return Fields::new();
            }
            self.facts
                .get(&job.step_id)
                .map(|f| f.iter().map(|(k, v)| (k.clone(), fill(v, job))).collect())
                .unwrap_or_default()
        }

        pub fn behaviour(&self, step: &str, kind: JobKind) -> StepBehaviour {
            let table = match kind {
                JobKind::Execute => &self.execute,
                JobKind::Compensate => &self.compensate,
            };
            table.get(step).cloned().unwrap_or_else(|| self.default.clone())
        }
    }
}

/// The facts the seed pipeline's production gates read, as a test declares
/// them for the scripted daemon (a script's `facts`): the build and staging
/// report the same image digest (made from the commit), staging a regression of
/// 0 %, a 900 s soak and a rehearsed rollback, and each pre-deploy backup a verified backup of the run. None of this is
/// real work; a test whose gates should pass on these facts says so with
/// [`with_seed_facts`].
pub fn seed_facts() -> Value {
    let digest = "sha256:{commit_sha}000000000000000000000000";
    let backup = |step: &str| {
        serde_json::json!({
            "backup_id": format!("{{service}}.{step}.{{run_id}}"), "run_id": "{run_id}", "verified": true,
            "sha256": "0".repeat(64), "location": format!("/scripted/primary/{step}"),
            "copy_location": format!("/scripted/copy/{step}"), "region": "nl-ams1", "copy_region": "nl-ams2",
            "tables": 0, "bytes": 0
        })
    };
    serde_json::json!({
        "build": {"image_digest": digest},
        "verify.staging": {"image_digest": digest, "regression_percent": 0.0, "soak_seconds": 900,
                           "rollback_tested": true, "rollback_seconds": 1.0},
        "backup.pre": backup("backup.pre"),
        "backup.staging": backup("backup.staging"),
    })
}

/// `script` with the seed pipeline's facts declared ([`seed_facts`]); facts it
/// declares itself for the same step win, key by key.
pub fn with_seed_facts(mut script: Value) -> Value {
    let mut facts = seed_facts();
    if let Some(own) = script.get("facts").and_then(Value::as_object) {
        for (step, f) in own {
            match (facts.get_mut(step).and_then(Value::as_object_mut), f.as_object()) {
                (Some(base), Some(f)) => base.extend(f.clone()),
                _ => {
                    facts[step] = f.clone();
                }
            }
        }
    }
    script["facts"] = facts;
    script
}

/// Every (zone, role) the seed pipeline dispatches to.
pub const SEED_BINDINGS: &[&str] = &[
    "ci.container-build",
    "production.backup",
    "staging.db-migration",
    "production.db-migration",
    "staging.infrastructure",
    "production.infrastructure",
    "staging.staging-verify",
    "production.production-apply",
    "production.network",
    "production.cdn",
];

/// New API tokens for these names and roles: the `[[api.tokens]]` entries
/// that admit them (for a scheduler's configuration) and the tokens, in order.
pub fn api_tokens(who: &[(&str, baton_scheduler::api::Role)]) -> (String, Vec<String>) {
    let mut toml = String::new();
    let mut tokens = Vec::new();
    for (name, role) in who {
        let (token, e) = baton_scheduler::api::new_token(name, *role);
        toml.push_str(&format!(
            "[[api.tokens]]\nname = {:?}\nrole = {}\nsha256 = {:?}\n",
            e.name,
            serde_json::to_value(e.role).expect("a role serialises"),
            e.sha256
        ));
        tokens.push(token);
    }
    (toml, tokens)
}

/// Debian's Chromium, when it and playwright-core (`tests/web/node_modules`)
/// are installed; None outside CI when they are not (`.ci/run` installs both,
/// and in CI their absence fails the test).
pub fn browser_tools() -> Option<PathBuf> {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    let playwright = workspace_root().join("tests/web/node_modules/playwright-core");
    match chromium {
        Some(c) if playwright.is_dir() => Some(c),
        _ if std::env::var_os("CI").is_some() => {
            panic!("CI needs Debian's chromium and `npm ci --prefix tests/web` (.ci/run installs both)")
        }
        _ => {
            eprintln!("no browser test: no chromium or tests/web/node_modules (run .ci/run --setup)");
            None
        }
    }
}

/// The repository's root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Runs `tests/web/browser.mjs` with `input` (its `chromium` filled in) and
/// returns its output; it exits 0 when every check it makes passed.
pub async fn browser(chromium: &Path, mut input: Value) -> Output {
    input["chromium"] = json!(chromium);
    tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(workspace_root().join("tests/web/browser.mjs"))
            .env("BATON_WEB_TEST", input.to_string())
            .current_dir(workspace_root().join("tests/web"))
            .output()
            .expect("run node")
    })
    .await
    .expect("browser task")
}

/// Where cargo put the workspace's binaries (next to this test's executable).
pub fn bin(name: &str) -> PathBuf {
    // Tests run from target/<profile>/deps, binaries such as baton-bench from target/<profile>.
    let exe = std::env::current_exe().expect("current exe");
    let here = exe.parent().expect("exe dir");
    let dir = if here.ends_with("deps") {
        here.parent().expect("target dir")
    } else {
        here
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; `cargo test --workspace` builds it (or run `cargo build --workspace --bins`)",
        path.display()
    );
    path
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A started process; killed when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    /// For a scheduler: the base URL of its HTTP API.
    pub api: Option<String>,
}

/// The value of one sample line of a Prometheus text exposition, e.g.
/// `baton_runs{status="succeeded"}` (name and labels exactly as written).
pub fn metric_sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Makes a self-signed CA in `dir` (`<name>.pem` and `<name>.key`, with
/// openssl) and returns its certificate's path.
pub fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"])
        .args(["-subj", &format!("/CN={name}")])
        .arg("-keyout")
        .arg(dir.join(format!("{name}.key")))
        .arg("-out")
        .arg(dir.join(format!("{name}.pem")))
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join(format!("{name}.pem"))
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {} ({}) failed", self.pid(), self.name);
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `patience` for it to exit; returns whether it exited cleanly.
    pub fn terminate(&mut self, patience: Duration) -> bool {
        self.signal("-TERM");
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{} did not exit within {patience:?} of SIGTERM", self.name);
    }

    pub fn stop(&self) {
        self.signal("-STOP");
    }

    pub fn cont(&self) {
        self.signal("-CONT");
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One entry of the test daemon's execution log.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ExecLine {
    pub event: String,
    pub run_id: Uuid,
    pub step_id: String,
    pub attempt: u32,
    pub kind: String,
    pub pid: u32,
    pub at: chrono::DateTime<chrono::Utc>,
    pub extra: Value,
}

/// An isolated vhost + database, and the processes of one test.
pub struct TestEnv {
    pub name: String,
    pub vhost: String,
    pub db_name: String,
    pub amqp_url: String,
    pub db_url: String,
    pub dir: PathBuf,
    pub pool: PgPool,
    /// Extra environment for the scheduler (`BATON_...` overrides).
    pub scheduler_env: Mutex<Vec<(String, String)>>,
    /// The scheduler's signing key (daemons trust its public half).
    pub scheduler_key: Keypair,
    /// The daemons' signing key (the scheduler trusts its public half).
    pub daemon_key: Keypair,
    /// An operator token every scheduler started here accepts; [`Self::baton`]
    /// presents it, so the CLI's API commands work in any test.
    pub operator_token: String,
    operator_entry: baton_scheduler::api::TokenEntry,
    /// The API of every scheduler started here, in start order.
    apis: Mutex<Vec<String>>,
}

const ADMIN_DB: &str = "postgres://postgres@127.0.0.1:5432/postgres";

impl TestEnv {
    pub async fn new(name: &str) -> Self {
        let id = Uuid::new_v4().simple().to_string()[..10].to_owned();
        let vhost = format!("baton-test-{name}-{id}");
        let db_name = format!("baton_test_{id}");
        rabbitmqctl(&["add_vhost", &vhost]);
        rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
        let admin = PgPool::connect(ADMIN_DB)
            .await
            .expect("connect to PostgreSQL at 127.0.0.1:5432 as postgres");
        sqlx::query(sqlx::AssertSqlSafe(format!("create database {db_name}")))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let db_url = format!("postgres://postgres@127.0.0.1:5432/{db_name}");
        let pool = PgPool::connect(&db_url).await.expect("connect test database");
        let dir = std::env::temp_dir().join(format!("baton-{name}-{id}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("script.json"), "{}").expect("script");
        let amqp_url = format!("amqp://guest:guest@127.0.0.1:5672/{}", vhost);
        let (scheduler_key, daemon_key) = (Keypair::generate(), Keypair::generate());
        let (operator_token, operator_entry) =
            baton_scheduler::api::new_token("baton-tests", baton_scheduler::api::Role::Operator);
        std::fs::write(dir.join("scheduler.key"), scheduler_key.secret_file_contents()).expect("key");
        std::fs::write(dir.join("daemon.key"), daemon_key.secret_file_contents()).expect("key");
        Self {
            name: name.to_owned(),
            vhost,
            db_name,
            amqp_url,
            db_url,
            dir,
            pool,
            scheduler_env: Mutex::new(Vec::new()),
            scheduler_key,
            daemon_key,
            operator_token,
            operator_entry,
            apis: Mutex::new(Vec::new()),
        }
    }

    fn common_env(&self, cmd: &mut Command) {
        cmd.env("BATON_AMQP__URL", &self.amqp_url)
            .env("BATON_DATABASE__URL", &self.db_url)
            .env("BATON_LOG__FORMAT", "json")
            .env("RUST_LOG", "info,lapin=warn,sqlx=warn")
            .env_remove("BATON_SCHEDULER__PIPELINE")
            .stdin(Stdio::null());
    }

    fn log_file(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .expect("log file")
    }

    /// Writes a configuration file for schedulers started from now on.
    pub fn scheduler_config(&self, toml: &str) {
        std::fs::write(self.dir.join("scheduler.toml"), toml).expect("write scheduler.toml");
    }

    /// Sets a scheduler override for processes started from now on.
    pub fn set_scheduler_env(&self, key: &str, value: &str) {
        self.scheduler_env
            .lock()
            .unwrap()
            .push((key.to_owned(), value.to_owned()));
    }

    /// Waits until `queue` exists and has at least `n` consumers.
    ///
    /// A passive declare of a missing queue closes its channel; every probe is
    /// bounded and a connection that misbehaves is replaced, so the wait itself
    /// cannot hang.
    pub async fn wait_consumers(&self, queue: &str, n: u32) {
        let mut conn: Option<lapin::Connection> = None;
        self.wait_until(
            &format!("{n} consumer(s) on {queue}"),
            Duration::from_secs(30),
            async || {
                if conn.is_none() {
                    conn = tokio::time::timeout(Duration::from_secs(5), self.amqp_connect())
                        .await
                        .ok()
                        .flatten();
                }
                let Some(c) = conn.as_ref() else { return false };
                let probe = async {
                    let ch = c.create_channel().await.ok()?;
                    let opts = lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    };
                    let q = ch.queue_declare(queue.into(), opts, Default::default()).await.ok()?;
                    let _ = ch.close(200, "probed".into()).await;
                    Some(q.consumer_count())
                };
                match tokio::time::timeout(Duration::from_secs(5), probe).await {
                    Ok(Some(count)) => count >= n,
                    Ok(None) => false,
                    Err(_) => {
                        conn = None;
                        false
                    }
                }
            },
        )
        .await;
        if let Some(c) = conn {
            let _ = c.close(200, "bye".into()).await;
        }
    }

    async fn amqp_connect(&self) -> Option<lapin::Connection> {
        lapin::Connection::connect(&self.amqp_url, lapin::ConnectionProperties::default())
            .await
            .ok()
    }

    /// Starts a scheduler and waits until merge events are consumed (by it, or
    /// by a replica already running: the queue has one active consumer).
    pub async fn scheduler(&self, label: &str) -> Proc {
        let p = self.spawn_scheduler(label);
        self.wait_consumers(baton_shared::topology::MERGE_EVENTS_QUEUE, 1).await;
        p
    }

    /// Starts two scheduler replicas and waits until both consume results.
    /// The first takes the merge events; the second waits as the queue's
    /// standby consumer, which the broker does not count.
    pub async fn two_schedulers(&self, a: &str, b: &str) -> (Proc, Proc) {
        let first = self.scheduler(a).await;
        let second = self.spawn_scheduler(b);
        self.wait_replicas(2).await;
        (first, second)
    }

    /// Waits until `n` scheduler replicas consume results: each consumes
    /// `baton.results` (the unsharded queue) once.
    pub async fn wait_replicas(&self, n: u32) {
        self.wait_consumers(baton_shared::topology::RESULTS_QUEUE, n).await;
    }

    /// Waits until scheduler `label`'s latest result-shard assignment is among
    /// `replicas` replicas (its log line "result shards assigned").
    pub async fn wait_shards_shared(&self, label: &str, replicas: usize) {
        self.wait_until(
            &format!("{label} to share the result shards among {replicas} replica(s)"),
            Duration::from_secs(60),
            async || {
                self.log(label)
                    .lines()
                    .rev()
                    .find(|l| l.contains("result shards assigned"))
                    .is_some_and(|l| l.contains(&format!("\"replicas\":{replicas},")))
            },
        )
        .await;
    }

    /// Starts a daemon and waits until it consumes each of its queues.
    pub async fn daemon(&self, label: &str, bindings: &[&str]) -> Proc {
        let p = self.spawn_daemon(label, bindings);
        for b in bindings {
            let (zone, role) = b.split_once('.').expect("zone.role");
            self.wait_consumers(&baton_shared::topology::job_queue(zone, role), 1)
                .await;
        }
        p
    }

    /// Like [`Self::daemon`], with extra `BATON_*` settings.
    pub async fn daemon_with(&self, label: &str, bindings: &[&str], env: &[(&str, &str)]) -> Proc {
        let p = self.spawn_daemon_with(label, bindings, env);
        for b in bindings {
            let (zone, role) = b.split_once('.').expect("zone.role");
            self.wait_consumers(&baton_shared::topology::job_queue(zone, role), 1)
                .await;
        }
        p
    }

    /// Starts `baton scheduler` with short leases and timers suited to tests.
    pub fn spawn_scheduler(&self, label: &str) -> Proc {
        let mut cmd = Command::new(bin("baton-e2e"));
        cmd.arg("scheduler");
        // The test's configuration, if it wrote one, plus the operator token.
        let mut toml = std::fs::read_to_string(self.dir.join("scheduler.toml")).unwrap_or_default();
        toml.push_str(&format!(
            "\n[[api.tokens]]\nname = {:?}\nrole = \"operator\"\nsha256 = {:?}\n",
            self.operator_entry.name, self.operator_entry.sha256
        ));
        let file = self.dir.join(format!("scheduler-{label}.toml"));
        std::fs::write(&file, toml).expect("write the scheduler's configuration");
        cmd.arg("--config").arg(file);
        self.common_env(&mut cmd);
        cmd.env("BATON_SIGNING__KEY_FILE", self.dir.join("scheduler.key"))
            .env("BATON_SIGNING__TRUSTED", format!("[{:?}]", self.daemon_key.public()))
            .env("BATON_SCHEDULER__INSTANCE", label)
            .env("BATON_SCHEDULER__LEASE_MS", "2000")
            .env("BATON_SCHEDULER__HEARTBEAT_MS", "250")
            .env("BATON_SCHEDULER__ACCEPT_TIMEOUT_MS", "5000")
            .env("BATON_SCHEDULER__CLAIM_MS", "1000")
            .env("BATON_SCHEDULER__TIMER_POLL_MS", "50")
            // Tests that exercise the soak minimum set their own.
            .env("BATON_GATES__STAGING_SOAK_SECS", "0");
        let port = free_port();
        cmd.env("BATON_API__LISTEN", format!("127.0.0.1:{port}"));
        for (k, v) in self.scheduler_env.lock().unwrap().iter() {
            cmd.env(k, v);
        }
        cmd.stdout(self.log_file(label)).stderr(self.log_file(label));
        let api = format!("http://127.0.0.1:{port}");
        self.apis.lock().unwrap().push(api.clone());
        Proc {
            name: label.to_owned(),
            child: cmd.spawn().expect("spawn baton scheduler"),
            api: Some(api),
        }
    }

    /// Writes the test daemons' script (read again for every job).
    pub fn script(&self, script: Value) {
        let parsed: script::Script = serde_json::from_value(script).expect("valid script");
        // Daemons read the script for every job: replace it atomically.
        let tmp = self.dir.join("script.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&parsed).unwrap()).expect("write script");
        std::fs::rename(&tmp, self.dir.join("script.json")).expect("replace script");
    }

    /// Starts a test daemon serving the given `zone.role` bindings.
    pub fn spawn_daemon(&self, label: &str, bindings: &[&str]) -> Proc {
        self.spawn_daemon_with(label, bindings, &[])
    }

    /// Like [`Self::spawn_daemon`], with extra `BATON_*` settings.
    pub fn spawn_daemon_with(&self, label: &str, bindings: &[&str], env: &[(&str, &str)]) -> Proc {
        self.spawn_daemon_full(label, bindings, env, false)
    }

    /// A daemon whose every job succeeds at once, for benchmarks.
    pub fn spawn_noop_daemon(&self, label: &str, bindings: &[&str], env: &[(&str, &str)]) -> Proc {
        self.spawn_daemon_full(label, bindings, env, true)
    }

    fn spawn_daemon_full(&self, label: &str, bindings: &[&str], env: &[(&str, &str)], noop: bool) -> Proc {
        let mut cmd = Command::new(bin("baton-test-daemon"));
        if noop {
            cmd.arg("--noop");
        }
        cmd.arg("--script").arg(self.dir.join("script.json"));
        cmd.arg("--log").arg(self.dir.join("exec.jsonl"));
        for b in bindings {
            cmd.arg("--serve").arg(b);
        }
        self.common_env(&mut cmd);
        cmd.env("BATON_SIGNING__KEY_FILE", self.dir.join("daemon.key"))
            .env("BATON_SIGNING__TRUSTED", format!("[{:?}]", self.scheduler_key.public()))
            .env("BATON_DAEMON__INSTANCE", label)
            .env("BATON_DAEMON__SHUTDOWN_GRACE_SECS", "5");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdout(self.log_file(label)).stderr(self.log_file(label));
        Proc {
            name: label.to_owned(),
            child: cmd.spawn().expect("spawn test daemon"),
            api: None,
        }
    }

    /// Asserts that `baton audit verify` finds every audit chain intact.
    pub fn assert_audit_verifies(&self) {
        let out = self.baton(&["audit", "verify"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "audit chains broken: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs the `baton` CLI against this environment: its API commands go to
    /// the newest scheduler whose API answers, with the operator token.
    pub fn baton(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("baton-e2e"));
        cmd.args(args);
        self.common_env(&mut cmd);
        let live = self
            .apis
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|api| {
                let addr = api.trim_start_matches("http://");
                std::net::TcpStream::connect(addr).is_ok()
            })
            .cloned();
        if let Some(api) = live {
            cmd.env("BATON_CLIENT__URL", api);
        }
        cmd.env("BATON_CLIENT__TOKEN", &self.operator_token);
        cmd.output().expect("run baton")
    }

    /// Runs the `baton` CLI with extra environment (e.g. the API client's url and token).
    pub fn baton_with(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(bin("baton-e2e"));
        cmd.args(args);
        self.common_env(&mut cmd);
        cmd.envs(env.iter().copied());
        cmd.output().expect("run baton")
    }

    /// Writes a merge event file and returns its path.
    pub fn event_file(&self, event: &Value) -> PathBuf {
        let path = self.dir.join(format!("event-{}.json", Uuid::new_v4()));
        std::fs::write(&path, serde_json::to_vec_pretty(event).unwrap()).expect("write event");
        path
    }

    /// `baton enqueue --event FILE`, returning the printed run id.
    pub fn enqueue(&self, event: &Value) -> Uuid {
        let path = self.event_file(event);
        let out = self.baton(&["enqueue", "--event", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "baton enqueue failed ({:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("enqueue prints a run id")
    }

    pub async fn run(&self, run: Uuid) -> Option<RunView> {
        store::run_view(&self.pool, run).await.expect("read run")
    }

    /// Polls the database until `check` holds (bounded, with a message naming what was awaited).
    pub async fn wait_until<F>(&self, what: &str, timeout: Duration, mut check: F)
    where
        F: AsyncFnMut() -> bool,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if check().await {
                return;
            }
            if Instant::now() > deadline {
                panic!("timed out after {timeout:?} waiting for {what}\n{}", self.diagnostics());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the run to reach a terminal state and returns it.
    pub async fn wait_terminal(&self, run: Uuid, timeout: Duration) -> RunView {
        let mut last = None;
        self.wait_until(&format!("run {run} to end"), timeout, async || {
            last = self.run(run).await;
            last.as_ref().is_some_and(RunView::is_terminal)
        })
        .await;
        last.expect("run")
    }

    /// Waits until the run has the given status and returns it.
    pub async fn wait_run_status(&self, run: Uuid, status: &str, timeout: Duration) -> RunView {
        let mut last = None;
        self.wait_until(&format!("run {run} to be {status}"), timeout, async || {
            last = self.run(run).await;
            last.as_ref().is_some_and(|v| v.status == status)
        })
        .await;
        last.expect("run")
    }

    /// Waits until the run's audit trail has an entry of `kind`.
    pub async fn wait_audited(&self, run: Uuid, kind: &str) {
        self.wait_until(
            &format!("a {kind} entry in run {run}'s audit trail"),
            Duration::from_secs(90),
            async || {
                self.run(run)
                    .await
                    .is_some_and(|v| v.history.iter().any(|h| h.kind == kind))
            },
        )
        .await;
    }

    /// Waits until a step of the run has the given status.
    pub async fn wait_step(&self, run: Uuid, step: &str, status: &str, timeout: Duration) -> RunView {
        let mut last = None;
        self.wait_until(
            &format!("step {step} of run {run} to be {status}"),
            timeout,
            async || {
                last = self.run(run).await;
                last.as_ref()
                    .and_then(|v| v.step(step))
                    .is_some_and(|s| s.status == status)
            },
        )
        .await;
        last.expect("run")
    }

    /// Everything the test daemons executed, in log order.
    pub fn exec_log(&self) -> Vec<ExecLine> {
        let text = std::fs::read_to_string(self.dir.join("exec.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).expect("exec log line"))
            .collect()
    }

    /// Starts of executions (not compensations) of one step.
    pub fn starts(&self, run: Uuid, step: &str, kind: &str) -> Vec<ExecLine> {
        self.exec_log()
            .into_iter()
            .filter(|l| l.run_id == run && l.step_id == step && l.kind == kind && l.event == "start")
            .collect()
    }

    /// Everything the process started under `label` has logged so far.
    pub fn log(&self, label: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{label}.log"))).unwrap_or_default()
    }

    /// What the processes logged, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(15).collect();
                    s.push_str(&format!("--- {} (last lines)\n", p.display()));
                    for l in tail.iter().rev() {
                        s.push_str(l);
                        s.push('\n');
                    }
                }
            }
        }
        s
    }

    /// Opens an AMQP connection to this test's vhost.
    pub async fn amqp(&self) -> lapin::Connection {
        lapin::Connection::connect(&self.amqp_url, lapin::ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ")
    }

    /// Publishes merge events in one burst, as CI would under load (each
    /// confirmed by the broker), and returns their run ids.
    pub async fn enqueue_burst(&self, events: &[Value]) -> Vec<Uuid> {
        use baton_shared::protocol::{MergeEvent, Message};
        use baton_shared::topology::{EVENTS_EXCHANGE, MERGE_EVENTS_KEY};
        let conn = self.amqp().await;
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(Default::default()).await.expect("confirms");
        let events: Vec<MergeEvent> = events
            .iter()
            .map(|e| MergeEvent::parse(&serde_json::to_vec(e).unwrap()).expect("a valid merge event"))
            .collect();
        let mut confirms = Vec::new();
        for ev in &events {
            let confirm = ch
                .basic_publish(
                    EVENTS_EXCHANGE.into(),
                    MERGE_EVENTS_KEY.into(),
                    Default::default(),
                    &ev.to_bytes(),
                    lapin::BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish a merge event");
            confirms.push(confirm);
        }
        for confirm in confirms {
            assert!(
                confirm.await.expect("confirm").is_ack(),
                "the broker refused a merge event"
            );
        }
        events.iter().map(MergeEvent::run_id).collect()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("BATON_KEEP_FAILED").is_some() {
            eprintln!(
                "kept for inspection: files {}, database {}, vhost {}",
                self.dir.display(),
                self.db_name,
                self.vhost
            );
            return;
        }
        let _ = Command::new("rabbitmqctl").args(["delete_vhost", &self.vhost]).output();
        // The test's database and those it made beside it (`<db_name>_…`).
        let listed = Command::new("psql")
            .args([
                ADMIN_DB,
                "-Atc",
                &format!(
                    "select datname from pg_database where datname like '{}\\_%'",
                    self.db_name
                ),
            ])
            .output();
        let mut dbs = vec![self.db_name.clone()];
        if let Ok(out) = listed {
            dbs.extend(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned));
        }
        for db in dbs.iter().filter(|d| !d.is_empty()) {
            let _ = Command::new("psql")
                .args([ADMIN_DB, "-qc", &format!("drop database if exists {db} with (force)")])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A valid merge event for the seed pipeline.
pub fn event(service: &str, commit_seed: u8, paths: &[&str]) -> Value {
    let sha: String = std::iter::repeat_n(format!("{commit_seed:02x}"), 20).collect();
    json!({
        "v": 1,
        "service": service,
        "environment": "production",
        "repository": "git@example.org:shop/api.git",
        "commit_sha": sha,
        "pull_request": {"number": 7, "title": "Ship it", "author": "dev",
            "approvals": [{"by": "marta", "at": "2026-11-26T09:00:00Z"}]},
        "changed_paths": paths,
        "risk": "standard",
        "requested_by": "ci",
        "ci_run_url": "https://ci.example.org/runs/7"
    })
}

/// Changed paths that include every step of the seed pipeline.
pub const EVERYTHING: &[&str] = &[
    "src/app.ts",
    "drizzle/migrations/0001_orders.sql",
    "infra/main.tf",
    "network/ingress.yaml",
    "assets/logo.svg",
];

/// A private RabbitMQ node (own name, ports, data and logs) for tests that
/// restart the broker, alarm it or need TLS, so the shared node is untouched.
/// Stopped and removed when dropped.
pub struct PrivateBroker {
    pub node: String,
    pub port: u16,
    /// The TLS listener's port, when started with TLS.
    pub tls_port: Option<u16>,
    pub dir: PathBuf,
}

impl PrivateBroker {
    /// Starts a node; with `tls`, also a TLS listener whose certificate is
    /// signed by `dir/ca.pem` (made here with openssl, for `localhost`).
    pub fn start(tls: bool) -> Self {
        let id = &Uuid::new_v4().simple().to_string()[..8];
        let node = format!("baton-{id}@localhost");
        let dir = std::env::temp_dir().join(format!("baton-broker-{id}"));
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).expect("broker dir");
        }
        let (port, dist) = (free_port(), free_port());
        let mut conf = format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n");
        let tls_port = tls.then(|| {
            let sh = |args: &str| {
                let ok = Command::new("sh").arg("-c").arg(args).current_dir(&dir).output().expect("openssl");
                assert!(ok.status.success(), "{args}: {}", String::from_utf8_lossy(&ok.stderr));
            };
            make_ca(&dir, "ca");
            sh("openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost");
            std::fs::write(dir.join("ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
            sh("openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile ext");
            let tls_port = free_port();
            conf.push_str(&format!(
                "listeners.ssl.default = 127.0.0.1:{tls_port}\nssl_options.cacertfile = {d}/ca.pem\n\
                 ssl_options.certfile = {d}/server.pem\nssl_options.keyfile = {d}/server.key\n\
                 ssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n",
                d = dir.display()
            ));
            tls_port
        });
        std::fs::write(dir.join("rabbitmq.conf"), conf).unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        // The broker runs as the rabbitmq user.
        let _ = Command::new("chmod").args(["-R", "a+rwX"]).arg(&dir).status();
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .status()
            .expect("rabbitmq-server");
        assert!(status.success(), "rabbitmq-server -detached failed");
        let broker = Self {
            node,
            port,
            tls_port,
            dir,
        };
        // `wait` blocks until the pid file appears and the node has booted.
        let pid = broker.dir.join("pid").display().to_string();
        broker.ctl(&["wait", &pid, "--timeout", "90"]);
        broker
    }

    /// Runs `rabbitmqctl` against this node and returns what it printed.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new("rabbitmqctl")
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .output()
            .expect("rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl -n {} {args:?}: {}",
            self.node,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["-n", &self.node, "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A valid (unsigned) job for `db.staging`'s zone and role as given, issued two
/// minutes ago and acceptable for `not_after_secs` more seconds (negative: expired).
pub fn step_job(zone: &str, role: &str, not_after_secs: i64) -> baton_shared::protocol::StepJob {
    use baton_shared::protocol::{Deploy, JobKind, PROTOCOL_VERSION, Risk, StepJob};
    let now = chrono::Utc::now();
    StepJob {
        v: PROTOCOL_VERSION,
        message_id: Uuid::new_v4(),
        run_id: Uuid::new_v4(),
        step_id: "db.staging".into(),
        attempt: 1,
        kind: JobKind::Execute,
        zone: zone.into(),
        role: role.into(),
        action: "migrate".into(),
        params: Default::default(),
        inputs: Default::default(),
        own_outputs: Default::default(),
        deploy: Deploy {
            service: "shop".into(),
            environment: "production".into(),
            repository: "r".into(),
            commit_sha: "0".repeat(40),
            risk: Risk::Standard,
            exceptions: Vec::new(),
        },
        issued_at: now - chrono::Duration::seconds(120),
        not_after: now + chrono::Duration::seconds(not_after_secs),
        deadline: now + chrono::Duration::seconds(600),
        heartbeat_ms: 1000,
        lease_ms: 0,
        traceparent: None,
        signature: None,
    }
}

/// The seed bindings without one, for tests that give one zone/role its own daemon.
pub fn seed_bindings_except(binding: &str) -> Vec<&'static str> {
    SEED_BINDINGS.iter().copied().filter(|b| *b != binding).collect()
}

/// A private PostgreSQL cluster (initdb in a temporary directory, its own port),
/// for tests that stop the database, so the shared server is untouched. Runs as
/// the `postgres` user when started by root (initdb refuses root). Stopped and
/// removed when dropped.
pub struct PrivateDatabase {
    pub port: u16,
    pub dir: PathBuf,
    bin: PathBuf,
}

impl PrivateDatabase {
    pub fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries in /usr/lib/postgresql")
            .flatten()
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists())
            .expect("initdb");
        let id = &Uuid::new_v4().simple().to_string()[..8];
        let dir = std::env::temp_dir().join(format!("baton-pg-{id}"));
        std::fs::create_dir_all(&dir).expect("pg dir");
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status();
        let db = Self {
            port: free_port(),
            dir,
            bin,
        };
        db.pg(&["initdb", "-D", &db.data(), "-A", "trust", "-U", "postgres", "--no-sync"]);
        db.start_again();
        db
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// Runs a PostgreSQL binary as the postgres user.
    fn pg(&self, args: &[&str]) {
        let program = self.bin.join(args[0]);
        let as_root = std::env::var("USER").map(|u| u == "root").unwrap_or(true);
        let out = if as_root {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&program)
                .args(&args[1..])
                .output()
        } else {
            Command::new(&program).args(&args[1..]).output()
        }
        .expect("run a PostgreSQL binary");
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts (again) and waits until it accepts connections.
    pub fn start_again(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log").display().to_string();
        self.pg(&["pg_ctl", "-D", &self.data(), "-o", &opts, "-l", &log, "-w", "start"]);
    }

    /// Stops at once, as a crash would (no checkpoint): `pg_ctl stop -m immediate`.
    pub fn crash(&self) {
        self.pg(&["pg_ctl", "-D", &self.data(), "-m", "immediate", "-w", "stop"]);
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PrivateDatabase {
    fn drop(&mut self) {
        let data = self.data();
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &data, "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A real role daemon (`baton-db-migration`, `baton-infrastructure`, …) on the
/// test's broker with the test's signing keys, logging to `<label>.log`;
/// killed when dropped, restartable.
pub struct RealDaemon {
    label: String,
    bin: &'static str,
    config: PathBuf,
    env: Vec<(String, String)>,
    child: Child,
}

impl RealDaemon {
    fn spawn(test: &TestEnv, label: &str, bin: &str, config: &Path, env: &[(String, String)]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(test.dir.join(format!("{label}.log")))
            .expect("open the daemon's log");
        Command::new(crate::bin(bin))
            .arg("--config")
            .arg(config)
            .env("BATON_AMQP__URL", &test.amqp_url)
            .env("BATON_LOG__FORMAT", "json")
            .env("RUST_LOG", "info,lapin=warn,sqlx=warn")
            .env("BATON_DAEMON__INSTANCE", label)
            .env("BATON_SIGNING__KEY_FILE", test.dir.join("daemon.key"))
            .env("BATON_SIGNING__TRUSTED", format!("[{:?}]", test.scheduler_key.public()))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {bin} (build every binary first: cargo build --workspace --bins): {e}"))
    }

    /// Starts `bin --config config` with extra environment `env`.
    pub fn start(test: &TestEnv, label: &str, bin: &'static str, config: PathBuf, env: &[(&str, &str)]) -> Self {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let child = Self::spawn(test, label, bin, &config, &env);
        Self {
            label: label.to_owned(),
            bin,
            config,
            env,
            child,
        }
    }

    /// SIGKILL, then a new process in its place.
    pub fn kill_and_restart(&mut self, test: &TestEnv) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(test, &self.label, self.bin, &self.config, &self.env);
    }
}

impl Drop for RealDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
