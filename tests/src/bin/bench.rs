//! `baton-bench`: Baton against this machine's own floor, in one run.
//!
//! Build and run (release):
//! `cargo build --release -p baton-tests --bins && target/release/baton-bench [--json] [--quick]`
//!
//! For profiling: `--latency-only` (floor and latency, as JSON), `--throughput-only=<runs>`
//! (that many runs, as JSON; `--schedulers=<n>`, default 1), and `BENCH_KEEP_LOGS=<dir>` to
//! keep the scheduler's and daemon's logs of those measurements. `--migrations-only` times
//! `baton-db-migration apply` against drizzle-orm's `migrate()` on the same folder (it needs
//! `cargo build -p baton-db-migration` in the same profile and the interop npm packages).
//! `--daemons-only` times the container-build and infrastructure roles against their
//! tools alone: a cached rebuild of an unchanged commit against `buildah bud`, and a
//! no-change Terraform plan against `terraform plan`. `--kube-only` times production-apply
//! around its rollout on the Kubernetes control plane of the daemons' tests (`../shared/k8s`),
//! and its rollback with the seed's strategy against the 60-second budget.
//!
//! Uses the machine's RabbitMQ and PostgreSQL, each measurement in its own vhost
//! and database. Daemons are the scripted test daemon in `--noop` mode (every job
//! succeeds at once), so what is measured is Baton's own overhead.

use std::time::{Duration, Instant};

use baton_shared::protocol::{MergeEvent, Message};
use baton_shared::topology::{EVENTS_EXCHANGE, MERGE_EVENTS_KEY};
use baton_tests::{EVERYTHING, Proc, SEED_BINDINGS, TestEnv, event};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

#[derive(Debug, Default, Serialize, Clone, Copy)]
struct Stats {
    n: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    if v.is_empty() {
        return Stats::default();
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        n: v.len(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: *v.last().unwrap(),
    }
}

fn ms(d: chrono::Duration) -> f64 {
    d.num_microseconds().unwrap_or(0) as f64 / 1000.0
}

async fn confirm_channel(conn: &lapin::Connection) -> Channel {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    ch
}

async fn quorum(ch: &Channel, name: &str) {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    ch.queue_declare(name.into(), QueueDeclareOptions::durable(), args)
        .await
        .unwrap();
}

async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8]) {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[derive(Debug, Serialize, Clone, Copy)]
struct Floor {
    publish_confirm: Stats,
    pg_commit: Stats,
    /// Job publish → daemon-side delivery → result publish → delivery → one commit.
    round_trip: Stats,
}

/// The machine's raw costs: what any engine on these parts pays per step.
async fn floor(iterations: usize) -> Floor {
    let env = TestEnv::new("bench-floor").await;
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    quorum(&ch, "floor.jobs").await;
    quorum(&ch, "floor.results").await;
    sqlx::query("create table floor (id bigserial primary key, at timestamptz not null default now())")
        .execute(&env.pool)
        .await
        .unwrap();
    let body = vec![b'x'; 200];

    let mut pc = Vec::new();
    for _ in 0..iterations {
        let t = Instant::now();
        publish(&ch, "", "floor.jobs", &body).await;
        pc.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ch.queue_purge("floor.jobs".into(), Default::default()).await.unwrap();

    let mut commits = Vec::new();
    for _ in 0..iterations {
        let t = Instant::now();
        sqlx::query("insert into floor default values")
            .execute(&env.pool)
            .await
            .unwrap();
        commits.push(t.elapsed().as_secs_f64() * 1000.0);
    }

    // A "daemon" echoing jobs as results, with prefetch like Baton's.
    let daemon_ch = confirm_channel(&conn).await;
    daemon_ch.basic_qos(16, Default::default()).await.unwrap();
    let mut jobs = daemon_ch
        .basic_consume(
            "floor.jobs".into(),
            "d".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let echo = daemon_ch.clone();
    tokio::spawn(async move {
        while let Some(Ok(d)) = jobs.next().await {
            publish(&echo, "", "floor.results", &d.data).await;
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    });
    let results_ch = conn.create_channel().await.unwrap();
    results_ch.basic_qos(16, Default::default()).await.unwrap();
    let mut results = results_ch
        .basic_consume(
            "floor.results".into(),
            "s".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut rt = Vec::new();
    for _ in 0..iterations {
        let t = Instant::now();
        publish(&ch, "", "floor.jobs", &body).await;
        let d = results.next().await.unwrap().unwrap();
        sqlx::query("insert into floor default values")
            .execute(&env.pool)
            .await
            .unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
        rt.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = conn.close(200, "done".into()).await;
    Floor {
        publish_confirm: stats(pc),
        pg_commit: stats(commits),
        round_trip: stats(rt),
    }
}

/// A running Baton: schedulers and one no-op daemon for every seed binding.
struct Baton {
    env: TestEnv,
    schedulers: Vec<Proc>,
    daemon: Proc,
    events: Channel,
    _conn: lapin::Connection,
}

async fn baton(name: &str, schedulers: usize) -> Baton {
    let env = TestEnv::new(name).await;
    env.set_scheduler_env("BATON_LOG__LEVEL", "warn");
    env.set_scheduler_env("RUST_LOG", "warn");
    env.set_scheduler_env("BATON_SCHEDULER__LEASE_MS", "30000");
    env.set_scheduler_env("BATON_SCHEDULER__HEARTBEAT_MS", "5000");
    env.set_scheduler_env("BATON_SCHEDULER__ACCEPT_TIMEOUT_MS", "120000");
    let mut procs = vec![env.scheduler("scheduler-0").await];
    for i in 1..schedulers {
        procs.push(env.spawn_scheduler(&format!("scheduler-{i}")));
    }
    env.wait_replicas(schedulers as u32).await;
    // The noop daemon reports the facts the seed's production gates read, as declared here.
    env.script(baton_tests::with_seed_facts(serde_json::json!({})));
    let daemon = env.spawn_noop_daemon(
        "daemon",
        SEED_BINDINGS,
        &[
            ("BATON_DAEMON__CONCURRENCY", "64"),
            ("BATON_DAEMON__PREFETCH", "64"),
            ("RUST_LOG", "warn"),
        ],
    );
    for b in SEED_BINDINGS {
        let (z, r) = b.split_once('.').unwrap();
        env.wait_consumers(&baton_shared::topology::job_queue(z, r), 1).await;
    }
    let conn = env.amqp().await;
    let events = confirm_channel(&conn).await;
    Baton {
        env,
        schedulers: procs,
        daemon,
        events,
        _conn: conn,
    }
}

impl Baton {
    async fn enqueue(&self, ev: &serde_json::Value) -> Uuid {
        let ev = MergeEvent::parse(&serde_json::to_vec(ev).unwrap()).unwrap();
        publish(&self.events, EVENTS_EXCHANGE, MERGE_EVENTS_KEY, &ev.to_bytes()).await;
        ev.run_id()
    }

    /// One seed pipeline run each for services `{prefix}-0` to `{prefix}-{n-1}`.
    async fn enqueue_services(&self, prefix: &str, n: usize) -> Vec<Uuid> {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            ids.push(
                self.enqueue(&event(&format!("{prefix}-{i}"), (i % 250) as u8, EVERYTHING))
                    .await,
            );
        }
        ids
    }

    async fn finished(&self, runs: &[Uuid], patience: Duration) -> Vec<DateTime<Utc>> {
        let deadline = Instant::now() + patience;
        let mut pending: Vec<Uuid> = runs.to_vec();
        let mut done = Vec::with_capacity(runs.len());
        loop {
            // Only the runs not seen ending yet are asked about.
            let ended: Vec<(Uuid, DateTime<Utc>)> =
                sqlx::query_as("select id, finished_at from runs where id = any($1) and finished_at is not null")
                    .bind(&pending)
                    .fetch_all(&self.env.pool)
                    .await
                    .unwrap();
            pending.retain(|id| !ended.iter().any(|(e, _)| e == id));
            done.extend(ended.into_iter().map(|(_, at)| at));
            if pending.is_empty() {
                return done;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {} runs ended within {patience:?}",
                done.len(),
                runs.len()
            );
            // The measurement is the runs' own `finished_at`; polling only decides when
            // to look, so it stays light to leave the machine to Baton.
            let every = if runs.len() == 1 { 5 } else { 200 };
            tokio::time::sleep(Duration::from_millis(every)).await;
        }
    }
}

fn rss_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[derive(Debug, Serialize)]
struct Latency {
    pipeline: Stats,
    pipeline_parts: PipelineParts,
    step_overhead: Stats,
    overhead_parts: OverheadParts,
}

/// A run, its first job's delivery, its last result's sending and its end.
type RunEnds = (uuid::Uuid, DateTime<Utc>, DateTime<Utc>, DateTime<Utc>);

/// The seed pipeline's ends, outside its steps (see [`latency`]).
#[derive(Debug, Serialize)]
struct PipelineParts {
    /// The merge event's publish started → the run's first job delivered to
    /// its daemon (the event's way to the scheduler, the run's creation and
    /// admission, the first job's way to its daemon).
    enqueue_to_first_job: Stats,
    /// The run's last result sent by its daemon → the run recorded as ended.
    last_result_to_end: Stats,
}

/// Step overhead in two parts (see [`latency`]); all stamps come from one machine's clock.
#[derive(Debug, Serialize)]
struct OverheadParts {
    /// Result sent by its daemon → the next step's job created by the transition
    /// applying it (the broker, the scheduler's read and decision).
    result_to_job: Stats,
    /// Job created → delivered to its daemon (the write and commit, the relay, the broker).
    job_to_daemon: Stats,
}

/// Seed pipeline runs one after another: end-to-end latency and the gap between
/// a step's result leaving its daemon and the next step's job reaching one.
/// Seed pipelines run before the latency measurement, and not counted.
const WARM_UP_RUNS: usize = 3;

async fn latency(runs: usize) -> Latency {
    let b = baton("bench-latency", 1).await;
    // Unmeasured first runs: in a vhost declared a moment ago, a job's way to
    // its daemon takes 2–4 times as long in the first two runs as later
    // (6–13 ms against 3). That is the bench's brand-new queues, not Baton's
    // steady state; BENCHMARKS.md says so.
    for i in 0..WARM_UP_RUNS {
        let id = b.enqueue(&event("latency-warm-up", i as u8, EVERYTHING)).await;
        b.finished(&[id], Duration::from_secs(60)).await;
    }
    let mut total = Vec::new();
    let mut ids = Vec::new();
    let mut enqueued = Vec::new();
    for i in 0..runs {
        let t0 = Utc::now();
        let id = b.enqueue(&event("latency", (i % 250) as u8, EVERYTHING)).await;
        let end = b.finished(&[id], Duration::from_secs(60)).await[0];
        total.push(ms(end - t0));
        ids.push(id);
        enqueued.push(t0);
    }
    // Each run's first job delivered, and its last result sent and its end.
    let ends: Vec<RunEnds> = sqlx::query_as(
        "select r.id, (select min(a.started_at) from attempts a where a.run_id = r.id),
                (select max(i.reported_at) from inbox i where i.run_id = r.id), r.finished_at
           from runs r where r.id = any($1)",
    )
    .bind(&ids)
    .fetch_all(&b.env.pool)
    .await
    .unwrap();
    let enqueued_at = |run: uuid::Uuid| enqueued[ids.iter().position(|&i| i == run).expect("a measured run")];
    let pipeline_parts = PipelineParts {
        enqueue_to_first_job: stats(ends.iter().map(|e| ms(e.1 - enqueued_at(e.0))).collect()),
        last_result_to_end: stats(ends.iter().map(|e| ms(e.3 - e.2)).collect()),
    };
    // started_at of a step (stamped by the daemon on delivery) minus the latest
    // result time of the steps it needs (stamped by their daemon on sending).
    // The same gap in two parts, split where the transition creates the next
    // step's job (`dispatched_at`): the result's way to the scheduler and the
    // transition's read and decision, then the write and commit, the relay and
    // the job's way to its daemon.
    let rows: Vec<(f64, f64, f64, i32, String, DateTime<Utc>)> = sqlx::query_as(
        "select extract(epoch from (a.started_at - prev.reported_at))::float8 * 1000,
                extract(epoch from (a.dispatched_at - prev.reported_at))::float8 * 1000,
                extract(epoch from (a.started_at - a.dispatched_at))::float8 * 1000,
                array_position($1, s.run_id), s.step_id, a.started_at
           from steps s
           join attempts a on a.run_id = s.run_id and a.step_id = s.step_id and a.attempt = 1
           join lateral (select i.reported_at from inbox i
                          where i.run_id = s.run_id and i.step_id = any(s.needs) and i.status = 'succeeded'
                          order by i.reported_at desc limit 1) prev on true
          where s.run_id = any($1) and cardinality(s.needs) > 0",
    )
    .bind(&ids)
    .fetch_all(&b.env.pool)
    .await
    .unwrap();
    if let Some(dir) = std::env::var_os("BENCH_KEEP_LOGS") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::write(dir.join("scheduler.log"), b.env.log("scheduler-0")).unwrap();
        std::fs::write(dir.join("daemon.log"), b.env.log("daemon")).unwrap();
        // Every step overhead sample, for finding where a tail comes from.
        let mut csv = String::from("run,step,started_at,overhead_ms,result_to_job_ms,job_to_daemon_ms\n");
        for (overhead, to_job, to_daemon, run, step, at) in &rows {
            csv.push_str(&format!(
                "{run},{step},{},{overhead:.3},{to_job:.3},{to_daemon:.3}\n",
                at.to_rfc3339()
            ));
        }
        std::fs::write(dir.join("latency-samples.csv"), csv).unwrap();
    }
    Latency {
        pipeline: stats(total),
        pipeline_parts,
        step_overhead: stats(rows.iter().map(|r| r.0).collect()),
        overhead_parts: OverheadParts {
            result_to_job: stats(rows.iter().map(|r| r.1).collect()),
            job_to_daemon: stats(rows.iter().map(|r| r.2).collect()),
        },
    }
}

#[derive(Debug, Serialize)]
struct Throughput {
    schedulers: usize,
    /// Each scheduler's CPU limit in cores (a cgroup quota), if any.
    scheduler_cpu: Option<f64>,
    runs: usize,
    seconds: f64,
    runs_per_s: f64,
    steps_per_s: f64,
    /// The whole machine's busy CPU time (every process: Baton, PostgreSQL,
    /// RabbitMQ, the bench) per step, less sensitive to a noisy machine than rates.
    cpu_ms_per_step: f64,
    scheduler_peak_rss_mib: f64,
    daemon_peak_rss_mib: f64,
    /// Transitions per write statement, over all schedulers (how much combining helped).
    runs_per_write_statement: f64,
    /// Of the runs transitions were computed from, the share kept in memory
    /// (the rest were read from the database).
    kept_run_share: f64,
}

/// Sums a series over the schedulers' `/metrics`.
async fn scheduler_metric(b: &Baton, series: &str) -> f64 {
    let mut sum = 0.0;
    for p in &b.schedulers {
        let Some(api) = &p.api else { continue };
        let Ok(text) = async { reqwest::get(format!("{api}/metrics")).await?.text().await }.await else {
            continue;
        };
        sum += baton_tests::metric_sample(&text, series).unwrap_or(0.0);
    }
    sum
}

/// The machine's busy CPU time so far (all processes, `/proc/stat`), in ms.
fn busy_cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq: busy is all but idle and iowait.
    let busy: f64 = ticks
        .iter()
        .take(7)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    busy * 1000.0 / 100.0
}

/// Each scheduler's CPU limit, in cores, in the full run's capped rows.
const CAPPED_CPU: f64 = 0.25;

/// Runs finished before a throughput measurement starts (at most as many as it measures).
const TP_WARM_UP_RUNS: usize = 200;

/// The schedulers' write-combining and run-cache counters, summed.
struct WriteMetrics {
    statements: f64,
    written: f64,
    kept: f64,
    read: f64,
}

impl WriteMetrics {
    async fn read(b: &Baton) -> Self {
        Self {
            statements: scheduler_metric(b, "baton_scheduler_write_statements_total").await,
            written: scheduler_metric(b, "baton_scheduler_written_runs_total").await,
            kept: scheduler_metric(b, "baton_scheduler_run_snapshots_total{source=\"kept\"}").await,
            read: scheduler_metric(b, "baton_scheduler_run_snapshots_total{source=\"read\"}").await
                + scheduler_metric(b, "baton_scheduler_run_snapshots_total{source=\"stale\"}").await,
        }
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            statements: self.statements - before.statements,
            written: self.written - before.written,
            kept: self.kept - before.kept,
            read: self.read - before.read,
        }
    }
}

async fn throughput(runs: usize, schedulers: usize, cap: Option<f64>) -> Throughput {
    let b = baton(&format!("bench-tp-{runs}-{schedulers}"), schedulers).await;
    let caps: Vec<CpuCap> = match cap {
        Some(cpus) => b
            .schedulers
            .iter()
            .map(|p| CpuCap::new(p.pid(), cpus).unwrap_or_else(|e| panic!("--scheduler-cpu: {e}")))
            .collect(),
        None => Vec::new(),
    };
    // Sustained throughput is a warm scheduler's: each fresh process opens its
    // pool's connections, and PostgreSQL plans the large write statement
    // six times on each of them (4–9 ms a plan under load) before it keeps a
    // generic plan. Left in, that start-up cost is a larger share of a short run and
    // doubles with two schedulers; the warm-up runs it out first.
    let warm_up = b.enqueue_services("warm", runs.min(TP_WARM_UP_RUNS)).await;
    b.finished(&warm_up, Duration::from_secs(600)).await;
    let before = WriteMetrics::read(&b).await;
    let cpu0 = busy_cpu_ms();
    let t0 = Utc::now();
    let ids = b.enqueue_services("svc", runs).await;
    let ends = b.finished(&ids, Duration::from_secs(1200)).await;
    let cpu_ms = busy_cpu_ms() - cpu0;
    if let Some(dir) = std::env::var_os("BENCH_KEEP_LOGS") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::write(dir.join(format!("tp-{runs}-scheduler.log")), b.env.log("scheduler-0")).unwrap();
    }
    let end = ends.into_iter().max().unwrap();
    let seconds = ms(end - t0) / 1000.0;
    let steps: i64 = sqlx::query_scalar("select count(*) from attempts where run_id = any($1)")
        .bind(&ids)
        .fetch_one(&b.env.pool)
        .await
        .unwrap();
    let peak = b
        .schedulers
        .iter()
        .map(|p| rss_kib(p.pid(), "VmHWM:"))
        .max()
        .unwrap_or(0);
    let m = WriteMetrics::read(&b).await.since(&before);
    let daemon_peak_rss_mib = rss_kib(b.daemon.pid(), "VmHWM:") as f64 / 1024.0;
    // The processes leave their cgroups when they exit; only then can they go.
    drop(b);
    drop(caps);
    Throughput {
        schedulers,
        scheduler_cpu: cap,
        runs,
        seconds,
        runs_per_s: runs as f64 / seconds,
        steps_per_s: steps as f64 / seconds,
        cpu_ms_per_step: cpu_ms / steps as f64,
        scheduler_peak_rss_mib: peak as f64 / 1024.0,
        daemon_peak_rss_mib,
        runs_per_write_statement: m.written / m.statements.max(1.0),
        kept_run_share: m.kept / (m.kept + m.read).max(1.0),
    }
}

/// A CPU limit on one process: a cgroup of its own with a CFS quota of
/// `cpus` cores (cgroup v2 `cpu.max`, or v1's `cpu` controller). Shows what
/// more scheduler replicas add when the scheduler, not the machine, is the
/// limit, as under a Kubernetes CPU limit. Needs root; removed on drop.
struct CpuCap {
    dir: std::path::PathBuf,
}

impl CpuCap {
    const PERIOD_US: u64 = 100_000;

    /// Where CPU cgroups are made: the v2 root (if its `cpu` controller is
    /// on) or v1's `cpu` hierarchy; and whether it is v2.
    fn hierarchy() -> Result<(&'static std::path::Path, bool), String> {
        let v2 = std::path::Path::new("/sys/fs/cgroup");
        let v1 = std::path::Path::new("/sys/fs/cgroup/cpu");
        let controllers = std::fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "cpu") {
            Ok((v2, true))
        } else if v1.join("cpu.cfs_quota_us").exists() {
            Ok((v1, false))
        } else {
            Err("no cgroup CPU controller under /sys/fs/cgroup".into())
        }
    }

    /// Whether CPU limits can be set here (a cgroup can be made and removed).
    fn available() -> Result<(), String> {
        let (base, _) = Self::hierarchy()?;
        let probe = base.join(format!("baton-bench-{}-probe", std::process::id()));
        std::fs::create_dir(&probe)
            .map_err(|e| format!("cannot create a cgroup in {} (root is needed): {e}", base.display()))?;
        std::fs::remove_dir(&probe).map_err(|e| format!("cannot remove the cgroup {}: {e}", probe.display()))
    }

    /// Limits `pid` to `cpus` cores (positive; `--scheduler-cpu` checks it).
    fn new(pid: u32, cpus: f64) -> Result<Self, String> {
        let quota = ((cpus * Self::PERIOD_US as f64) as u64).max(1000);
        let (base, v2) = Self::hierarchy()?;
        let dir = base.join(format!("baton-bench-{}-{pid}", std::process::id()));
        let limits = if v2 {
            vec![("cpu.max", format!("{quota} {}", Self::PERIOD_US))]
        } else {
            vec![
                ("cpu.cfs_period_us", Self::PERIOD_US.to_string()),
                ("cpu.cfs_quota_us", quota.to_string()),
            ]
        };
        std::fs::create_dir(&dir)
            .map_err(|e| format!("cannot create the cgroup {} (root is needed): {e}", dir.display()))?;
        let cap = Self { dir };
        for (file, value) in limits.into_iter().chain([("cgroup.procs", pid.to_string())]) {
            let path = cap.dir.join(file);
            std::fs::write(&path, value).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        Ok(cap)
    }
}

impl Drop for CpuCap {
    fn drop(&mut self) {
        // An exited process may linger in the cgroup for a moment.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("baton-bench: could not remove the cgroup {}", self.dir.display());
    }
}

/// A scheduler is killed with runs in flight; how long from its replacement's
/// start to the next dispatch.
async fn recovery() -> f64 {
    let mut b = baton("bench-recovery", 1).await;
    let ids = b.enqueue_services("rec", 200).await;
    b.env
        .wait_until("some dispatches", Duration::from_secs(60), async || {
            let n: i64 = sqlx::query_scalar("select count(*) from attempts")
                .fetch_one(&b.env.pool)
                .await
                .unwrap();
            n > 100
        })
        .await;
    b.schedulers[0].kill();
    // Let in-flight results pile up with nobody scheduling.
    let quiet = Utc::now();
    b.env
        .wait_until("the daemon to go idle", Duration::from_secs(30), async || {
            let last: Option<DateTime<Utc>> = sqlx::query_scalar("select max(dispatched_at) from attempts")
                .fetch_one(&b.env.pool)
                .await
                .unwrap();
            last.is_none_or(|l| l < quiet)
        })
        .await;
    let start = Utc::now();
    b.schedulers.push(b.env.spawn_scheduler("replacement"));
    let mut first: Option<DateTime<Utc>> = None;
    b.env
        .wait_until("the replacement to dispatch", Duration::from_secs(60), async || {
            first = sqlx::query_scalar("select min(dispatched_at) from attempts where dispatched_at > $1")
                .bind(start)
                .fetch_one(&b.env.pool)
                .await
                .unwrap();
            first.is_some()
        })
        .await;
    b.finished(&ids, Duration::from_secs(300)).await;
    ms(first.unwrap() - start)
}

const USAGE: &str = "usage: baton-bench [--json] [--quick]
       baton-bench --latency-only
       baton-bench --throughput-only=<runs> [--schedulers=<n>] [--scheduler-cpu=<cores>]

Measures Baton against this machine's RabbitMQ and PostgreSQL (see BENCHMARKS.md).
  --json                 print the results as JSON instead of a table
  --quick                fewer samples, 100 runs only
  --latency-only         the floor and latency phases, as JSON
  --throughput-only=N    one throughput phase with N runs, as JSON
  --schedulers=M         scheduler processes for --throughput-only (default 1)
  --scheduler-cpu=C      limit each scheduler to C cores (a cgroup CPU quota; needs root)
  --migrations-only      baton-db-migration apply against drizzle-orm's migrate() on the same
                         35-migration folder, each on a fresh database, as JSON
  --daemons-only         container-build's cached rebuild against `buildah bud` alone, and
                         infrastructure's no-change plan against `terraform plan` alone, as JSON
  --kube-only            production-apply's own time around a rollout on a real control plane,
                         and a rollback with the seed's strategy against its 60 s budget, as JSON";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let known = |a: &str| {
        [
            "--json",
            "--quick",
            "--latency-only",
            "--migrations-only",
            "--daemons-only",
            "--kube-only",
        ]
        .contains(&a)
            || ["--throughput-only=", "--schedulers=", "--scheduler-cpu="]
                .iter()
                .any(|p| a.starts_with(p))
    };
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    if let Some(bad) = args.iter().find(|a| !known(a)) {
        eprintln!("baton-bench: unknown argument {bad:?}\n\n{USAGE}");
        std::process::exit(baton_shared::exit::Exit::BadInput.code().into());
    }
    let as_json = args.iter().any(|a| a == "--json");
    let quick = args.iter().any(|a| a == "--quick");
    let (iters, seq, sizes) = if quick {
        (100, 10, vec![100])
    } else {
        (500, 50, vec![100, 1000])
    };

    if args.iter().any(|a| a == "--kube-only") {
        let m = kube(if quick { 3 } else { 7 }).await;
        println!("{}", serde_json::to_string_pretty(&m).unwrap());
        return;
    }
    if args.iter().any(|a| a == "--daemons-only") {
        let m = daemons(if quick { 3 } else { 7 }).await;
        println!("{}", serde_json::to_string_pretty(&m).unwrap());
        return;
    }
    if args.iter().any(|a| a == "--migrations-only") {
        let m = migrations(if quick { 3 } else { 7 }).await;
        println!("{}", serde_json::to_string_pretty(&m).unwrap());
        return;
    }
    if let Some(runs) = args.iter().find_map(|a| a.strip_prefix("--throughput-only=")) {
        let runs = runs.parse().expect("--throughput-only=<runs>");
        let schedulers = args
            .iter()
            .find_map(|a| a.strip_prefix("--schedulers="))
            .map_or(1, |n| n.parse().expect("--schedulers=<n>"));
        let cap = args
            .iter()
            .find_map(|a| a.strip_prefix("--scheduler-cpu="))
            .map(|c| match c.parse::<f64>() {
                Ok(c) if c > 0.0 && c.is_finite() => c,
                _ => {
                    eprintln!("baton-bench: --scheduler-cpu must be a positive number of cores, not {c:?}");
                    std::process::exit(baton_shared::exit::Exit::BadInput.code().into());
                }
            });
        let t = throughput(runs, schedulers, cap).await;
        println!("{}", serde_json::to_string_pretty(&t).unwrap());
        return;
    }
    eprintln!("measuring the floor…");
    let floor = floor(iters).await;
    eprintln!("measuring latency…");
    let lat = latency(seq).await;
    if args.iter().any(|a| a == "--latency-only") {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"floor": floor, "latency": lat})).unwrap()
        );
        return;
    }
    let mut tp = Vec::new();
    for &runs in &sizes {
        for schedulers in [1, 2, 4] {
            eprintln!("throughput: {runs} runs, {schedulers} scheduler(s)…");
            tp.push(throughput(runs, schedulers, None).await);
        }
    }
    // The same, with each scheduler limited to a quarter of a core: what a
    // second replica adds when the scheduler is the limit, not the machine.
    let runs = *sizes.last().unwrap();
    let capped_note = match CpuCap::available() {
        Ok(()) => {
            for schedulers in [1, 2] {
                eprintln!("throughput: {runs} runs, {schedulers} scheduler(s) at {CAPPED_CPU} CPU each…");
                tp.push(throughput(runs, schedulers, Some(CAPPED_CPU)).await);
            }
            None
        }
        Err(e) => Some(format!("rows with schedulers limited to {CAPPED_CPU} CPU skipped: {e}")),
    };
    eprintln!("measuring recovery…");
    let recovery_ms = recovery().await;
    let idle_daemon = {
        let env = TestEnv::new("bench-idle").await;
        let d = env.spawn_noop_daemon("idle", SEED_BINDINGS, &[("RUST_LOG", "warn")]);
        for b in SEED_BINDINGS {
            let (z, r) = b.split_once('.').unwrap();
            env.wait_consumers(&baton_shared::topology::job_queue(z, r), 1).await;
        }
        rss_kib(d.pid(), "VmRSS:") as f64 / 1024.0
    };

    let report = json!({
        "machine": {"cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
        "floor": floor,
        "pipeline_latency": lat.pipeline,
        "step_overhead": lat.step_overhead,
        "step_overhead_parts": lat.overhead_parts,
        "step_overhead_ratio_to_floor": {
            "p50": lat.step_overhead.p50_ms / floor.round_trip.p50_ms,
            "p99": lat.step_overhead.p99_ms / floor.round_trip.p50_ms,
        },
        // The 60 ms target was set where the floor's round trip took 1.3 ms:
        // about 46 round trips.
        "pipeline_ratio_to_floor": {
            "p50": lat.pipeline.p50_ms / floor.round_trip.p50_ms,
            "p99": lat.pipeline.p99_ms / floor.round_trip.p50_ms,
        },
        "throughput": tp,
        "capped_rows_skipped": capped_note,
        "recovery_ms": recovery_ms,
        "idle_daemon_rss_mib": idle_daemon,
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap());
        return;
    }
    let f = |s: &Stats| format!("{:>8.2} {:>8.2} {:>8.2}", s.p50_ms, s.p99_ms, s.max_ms);
    println!("{:<44} {:>8} {:>8} {:>8}", "measurement (ms)", "p50", "p99", "max");
    println!(
        "{:<44} {}",
        "floor: publish with confirm (quorum)",
        f(&floor.publish_confirm)
    );
    println!("{:<44} {}", "floor: single-row PostgreSQL commit", f(&floor.pg_commit));
    println!(
        "{:<44} {}",
        "floor: job+result round trip + commit",
        f(&floor.round_trip)
    );
    println!(
        "{:<44} {}",
        "step overhead (result sent → next job in)",
        f(&lat.step_overhead)
    );
    let parts = &lat.overhead_parts;
    println!("{:<44} {}", "  result sent → next job created", f(&parts.result_to_job));
    println!(
        "{:<44} {}",
        "  next job created → in its daemon",
        f(&parts.job_to_daemon)
    );
    println!(
        "{:<44} {:>8.2} {:>8.2}",
        "step overhead / floor round trip (p50)",
        lat.step_overhead.p50_ms / floor.round_trip.p50_ms,
        lat.step_overhead.p99_ms / floor.round_trip.p50_ms
    );
    println!(
        "{:<44} {}",
        "seed pipeline, every step, enqueue → end",
        f(&lat.pipeline)
    );
    println!(
        "{:<44} {}",
        "  enqueue → first job in its daemon",
        f(&lat.pipeline_parts.enqueue_to_first_job)
    );
    println!(
        "{:<44} {}",
        "  last result sent → run ended",
        f(&lat.pipeline_parts.last_result_to_end)
    );
    println!(
        "{:<44} {:>8.2} {:>8.2}",
        "seed pipeline / floor round trip (p50)",
        lat.pipeline.p50_ms / floor.round_trip.p50_ms,
        lat.pipeline.p99_ms / floor.round_trip.p50_ms
    );
    println!();
    println!(
        "{:>5} {:>10} {:>7} {:>9} {:>9} {:>10} {:>12} {:>13} {:>10} {:>10} {:>6}",
        "runs",
        "schedulers",
        "CPU cap",
        "seconds",
        "runs/s",
        "steps/s",
        "CPU ms/step",
        "sched RSS MiB",
        "daemon MiB",
        "runs/write",
        "kept"
    );
    for t in &tp {
        println!(
            "{:>5} {:>10} {:>7} {:>9.1} {:>9.1} {:>10.1} {:>12.2} {:>13.1} {:>10.1} {:>10.2} {:>5.0}%",
            t.runs,
            t.schedulers,
            t.scheduler_cpu.map_or("-".to_owned(), |c| c.to_string()),
            t.seconds,
            t.runs_per_s,
            t.steps_per_s,
            t.cpu_ms_per_step,
            t.scheduler_peak_rss_mib,
            t.daemon_peak_rss_mib,
            t.runs_per_write_statement,
            t.kept_run_share * 100.0
        );
    }
    if let Some(note) = &capped_note {
        println!("{note}");
    }
    println!();
    println!("recovery: replacement scheduler start → next dispatch: {recovery_ms:.0} ms");
    println!("idle daemon RSS: {idle_daemon:.1} MiB");
}

/// A Drizzle folder of `n` migrations as drizzle-kit writes them (tables,
/// columns, indexes, foreign keys), committed to a new git repository in
/// `dir`; returns the commit. The folder's `baton.baseline` names the last one,
/// so Baton applies the history as an adopted one (no down files needed).
fn migration_repo(dir: &std::path::Path, n: usize) -> String {
    let folder = dir.join("drizzle/migrations");
    std::fs::create_dir_all(folder.join("meta")).expect("folder");
    let mut entries = Vec::new();
    for i in 0..n {
        let tag = format!("{i:04}_step{i}");
        let sql = match i % 3 {
            _ if i == 0 => {
                "CREATE TABLE \"t0\" (\"id\" serial PRIMARY KEY NOT NULL, \"name\" text NOT NULL);".to_owned()
            }
            0 => format!(
                "CREATE TABLE \"t{i}\" (\"id\" serial PRIMARY KEY NOT NULL, \"ref\" integer);\n--> statement-breakpoint\n\
                 ALTER TABLE \"t{i}\" ADD CONSTRAINT \"t{i}_ref_fk\" FOREIGN KEY (\"ref\") REFERENCES \"public\".\"t0\"(\"id\");"
            ),
            1 => format!(
                "ALTER TABLE \"t0\" ADD COLUMN \"c{i}\" text;\n--> statement-breakpoint\n\
                 CREATE INDEX \"t0_c{i}_idx\" ON \"t0\" USING btree (\"c{i}\");"
            ),
            _ => {
                format!("CREATE TABLE \"u{i}\" (\"id\" serial PRIMARY KEY NOT NULL, \"v\" integer DEFAULT 0 NOT NULL);")
            }
        };
        std::fs::write(folder.join(format!("{tag}.sql")), sql).expect("migration");
        entries.push(
            json!({"idx": i, "version": "7", "when": 1_700_000_000_000_i64 + i as i64 * 60_000,
                            "tag": tag, "breakpoints": true}),
        );
    }
    let journal = json!({"version": "7", "dialect": "postgresql", "entries": entries});
    std::fs::write(folder.join("meta/_journal.json"), journal.to_string()).expect("journal");
    std::fs::write(folder.join("baton.baseline"), format!("{:04}_step{}\n", n - 1, n - 1)).expect("baseline");
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .current_dir(dir)
            .args(["-c", "user.email=bench@baton", "-c", "user.name=bench"])
            .args(args)
            .output()
            .expect("git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    git(&["commit", "-qm", "history"]);
    git(&["rev-parse", "HEAD"])
}

/// `baton-db-migration apply` (one-shot: process start, reading the folder
/// from git, the expected schema — replayed on a scratch database in the first
/// round, cached after —, applying, verifying) against drizzle-orm's
/// `migrate()` (node: process start, reading the folder, applying) on the same
/// 35-migration folder, each round on two fresh databases; the first round
/// alone and medians of the rest (drizzle: of all), in ms.
async fn migrations(rounds: usize) -> serde_json::Value {
    let interop = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemons/db-migration/interop");
    assert!(
        interop.join("node_modules/drizzle-orm").exists(),
        "drizzle-orm is not installed: npm ci --prefix daemons/db-migration/interop"
    );
    let dir = std::env::temp_dir().join(format!("baton-bench-migrations-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).expect("repo dir");
    let commit = migration_repo(&repo, 35);
    let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres")
        .await
        .expect("postgres");
    let (baton_db, drizzle_db, admin_db) = (
        format!("bench_mig_baton_{}", std::process::id()),
        format!("bench_mig_drizzle_{}", std::process::id()),
        format!("bench_mig_admin_{}", std::process::id()),
    );
    // An admin database of the bench's own: its expected-schema cache starts
    // empty, so the first round replays the folder (a first deploy) and the
    // others find it cached (every later zone, replica or redeploy).
    let admin = format!("postgres://postgres@127.0.0.1:5432/{admin_db}");
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "drop database if exists {admin_db} with (force)"
    )))
    .execute(&pool)
    .await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("create database {admin_db}")))
        .execute(&pool)
        .await
        .expect("create the admin database");
    let config = dir.join("baton.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nzone = \"staging\"\n[migration]\nrepos_dir = {:?}\nadmin_url = {admin:?}\n\
             [migration.databases]\nbench = \"postgres://postgres@127.0.0.1:5432/{baton_db}\"\n",
            dir.join("cache").display().to_string()
        ),
    )
    .expect("config");
    let fresh = async |name: &str| {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "drop database if exists {name} with (force)"
        )))
        .execute(&pool)
        .await
        .expect("drop");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("create database {name}")))
            .execute(&pool)
            .await
            .expect("create");
    };
    // The daemon's repository cache is filled first, by a `check` (which reads
    // the folder and applies nothing): a folder's first deploy is usually a new
    // commit of a repository the daemon has fetched before. Timed on its own.
    fresh(&baton_db).await;
    let started = Instant::now();
    let out = std::process::Command::new(baton_tests::bin("baton-db-migration"))
        .args(["--config", config.to_str().unwrap(), "check", "--service", "bench"])
        .args(["--repository", repo.to_str().unwrap(), "--commit", &commit])
        .env("BATON_LOG__LEVEL", "warn")
        .output()
        .expect("baton-db-migration");
    let first_fetch = started.elapsed().as_secs_f64() * 1000.0;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (mut baton_ms, mut drizzle_ms) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        fresh(&baton_db).await;
        let started = Instant::now();
        let out = std::process::Command::new(baton_tests::bin("baton-db-migration"))
            .args(["--config", config.to_str().unwrap(), "apply", "--service", "bench"])
            .args(["--repository", repo.to_str().unwrap(), "--commit", &commit])
            .env("BATON_LOG__LEVEL", "warn")
            .output()
            .expect("baton-db-migration");
        baton_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        fresh(&drizzle_db).await;
        let started = Instant::now();
        let out = std::process::Command::new("node")
            .current_dir(&interop)
            .arg("migrate.mjs")
            .arg(repo.join("drizzle/migrations"))
            .env(
                "DATABASE_URL",
                format!("postgres://postgres@127.0.0.1:5432/{drizzle_db}"),
            )
            .output()
            .expect("node");
        drizzle_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    for name in [&baton_db, &drizzle_db, &admin_db] {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "drop database if exists {name} with (force)"
        )))
        .execute(&pool)
        .await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let cold = baton_ms.remove(0);
    let (b, d) = (median(&mut baton_ms), median(&mut drizzle_ms));
    json!({"migrations": 35, "rounds": rounds,
           "baton_check_with_first_fetch_ms": first_fetch,
           "baton_apply_first_deploy_ms": cold, "first_deploy_ratio": cold / d,
           "baton_apply_ms_p50": b, "drizzle_migrate_ms_p50": d,
           "ratio": b / d, "target_ratio": 1.5})
}

fn median_ms(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn timed_ms(f: impl FnOnce()) -> f64 {
    let started = Instant::now();
    f();
    started.elapsed().as_secs_f64() * 1000.0
}

/// production-apply against a real control plane (kube-apiserver and
/// kube-controller-manager, a simulated node: `baton_shared::test_cluster`):
/// its own time before the first object is applied and after the rollout
/// completes, against the rollout itself (three replicas, `maxSurge` 1, no
/// `minReadySeconds`, no monitoring); then a release with the seed's strategy
/// (`minReadySeconds` 30) and its `rollback-replicaset`, against the seed's
/// 60-second budget.
async fn kube(rounds: usize) -> serde_json::Value {
    use baton_production_apply::{ApplyConfig, ApplyOutputs, ProductionApply, RollbackOutputs};
    use baton_shared::facts::{FactSet, StagingVerified};
    use baton_shared::protocol::{JobKind, StepJob};
    use baton_shared::test_cluster::TestNamespace;
    use baton_shared::testing::{GitRepo, TempDir};

    const REPO: &str = "registry.bench/shop/web";
    let ns = TestNamespace::new("bench").await;
    let dirs = TempDir::new("bench-kube");
    let repo = GitRepo::new();
    repo.write(
        "deploy/production/kustomization.yaml",
        "resources:\n- deployment.yaml\n",
    );
    repo.write(
        "deploy/production/deployment.yaml",
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 3\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n      - name: app\n        image: {REPO}:dev\n"
        ),
    );
    let commit = repo.commit("web");
    let role = ProductionApply::new(ApplyConfig {
        kubeconfig: ns.kubeconfig.clone(),
        namespace: ns.name.clone(),
        repos_dir: dirs.path().join("repos"),
        work_dir: dirs.path().join("work"),
        poll_ms: 50,
        ..ApplyConfig::default()
    });
    let job = |n: usize, min_ready: u32| {
        let digest = format!("sha256:{:064x}", n + 1);
        let verified = StagingVerified {
            image_digest: digest.clone(),
            regression_percent: 0.0,
            image: Some(format!("{REPO}@{digest}")),
            soak_seconds: 900,
            rollback_tested: true,
            rollback_seconds: None,
            first_deployment: false,
        };
        let mut j = StepJob::example("production", "production-apply", "apply")
            .with_param("min_ready_seconds", min_ready)
            .with_param("progress_deadline_seconds", 300)
            .with_param("monitor_seconds", 0)
            .with_input("verify.staging", verified.to_fields());
        j.run_id = Uuid::new_v4();
        j.step_id = "apply.production".to_owned();
        j.deploy.repository = repo.url();
        j.deploy.commit_sha = commit.clone();
        j
    };
    let apply = async |j: &StepJob| -> ApplyOutputs {
        let out = role.run(j).await.unwrap_or_else(|e| panic!("apply: {e}"));
        serde_json::from_value(serde_json::Value::Object(out)).unwrap()
    };
    apply(&job(0, 0)).await;
    let (mut before, mut rollout, mut after) = (Vec::new(), Vec::new(), Vec::new());
    for n in 1..=rounds {
        let out = apply(&job(n, 0)).await;
        before.push(out.timings.to_first_apply_ms);
        rollout.push(out.timings.rollout_ms);
        after.push(out.timings.after_ms);
    }
    // The seed's strategy forward, then the compensation back.
    let seed = job(rounds + 1, 30);
    let released = apply(&seed).await;
    let mut undo = seed.clone();
    undo.kind = JobKind::Compensate;
    undo.action = "rollback-replicaset".to_owned();
    undo.own_outputs = baton_shared::protocol::to_fields(&released).unwrap();
    let back: RollbackOutputs = serde_json::from_value(serde_json::Value::Object(
        role.run(&undo).await.unwrap_or_else(|e| panic!("rollback: {e}")),
    ))
    .unwrap();
    let (before, rollout, after) = (median_ms(&mut before), median_ms(&mut rollout), median_ms(&mut after));
    json!({
        "rounds": rounds,
        "replicas": 3,
        "production_apply": {
            "to_first_apply_ms_p50": before, "rollout_ms_p50": rollout, "after_rollout_ms_p50": after,
            "overhead_ms_p50": before + after,
        },
        "seed_strategy": {
            "release_rollout_ms": released.timings.rollout_ms,
            "rollback_seconds": back.seconds, "rollback_budget_seconds": back.budget_seconds,
            "over_budget": back.over_budget,
        },
    })
}

/// The daemons' own overhead over their tools, in process (no broker): the
/// container-build role's cached rebuild of an unchanged commit (export from
/// git, the Dockerfile rules, `buildah bud`, `buildah push` to an archive, the
/// file list and size, the import into containerd and the read-back; the
/// scanner is a recorded empty report, so its own time is not counted) against
/// `buildah bud` alone on the same context; and the infrastructure role's
/// no-change plan (export, `init`, `plan -out`, `show -json`, the plan saved in
/// PostgreSQL) against `terraform plan` alone in an initialised directory.
async fn daemons(rounds: usize) -> serde_json::Value {
    use baton_shared::testing::{GitRepo, TempDir};

    let work = TempDir::new("bench-daemons");
    let w = work.path();
    let buildah = |args: &[&str]| {
        let out = std::process::Command::new("buildah")
            .arg("--root")
            .arg(w.join("storage"))
            .arg("--runroot")
            .arg(w.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()
            .expect("buildah");
        assert!(
            out.status.success(),
            "buildah {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    // The base image, from Debian's busybox-static, and containerd.
    let base = w.join("base");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::copy("/bin/busybox", base.join("busybox")).expect("busybox-static");
    std::fs::write(base.join("Dockerfile"), "FROM scratch\nCOPY busybox /bin/busybox\n").unwrap();
    buildah(&[
        "bud",
        "--isolation",
        "chroot",
        "-t",
        "localhost/busybox:base",
        base.to_str().unwrap(),
    ]);
    let digest = buildah(&["images", "--format", "{{.Digest}}", "localhost/busybox:base"]);
    let socket = w.join("containerd.sock");
    std::fs::write(
        w.join("containerd.toml"),
        format!(
            "version = 2\nroot = {:?}\nstate = {:?}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = {:?}\n",
            w.join("ctd-root").display().to_string(),
            w.join("ctd-state").display().to_string(),
            socket.display().to_string()
        ),
    )
    .unwrap();
    let mut containerd = std::process::Command::new("containerd")
        .arg("--config")
        .arg(w.join("containerd.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("containerd");
    let ready = Instant::now();
    while !std::process::Command::new("ctr")
        .arg("--address")
        .arg(&socket)
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        assert!(ready.elapsed() < Duration::from_secs(120), "containerd did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let repo = GitRepo::new();
    repo.write("src/app.txt", "hello\n");
    repo.write(
        "Dockerfile",
        format!(
            "FROM localhost/busybox@{digest} AS build\nCOPY src /src\nRUN [\"/bin/busybox\", \"cp\", \"/src/app.txt\", \"/app\"]\n\
             FROM localhost/busybox@{digest}\nCOPY --from=build /app /app\n"
        ),
    );
    let commit = repo.commit("app");
    let empty_report = w.join("empty-report.json");
    std::fs::write(&empty_report, r#"{"SchemaVersion": 2}"#).unwrap();
    let mut config = baton_container_build::BuildConfig {
        repos_dir: w.join("repos"),
        work_dir: w.to_owned(),
        ..Default::default()
    };
    config.buildah.storage_root = w.join("storage");
    config.buildah.run_root = w.join("run");
    config.containerd.address = socket.clone();
    config.scan.command = vec!["cat".into(), empty_report.display().to_string()];
    config.scan.sbom_command = Vec::new();
    config.scan.config_command = Vec::new();
    let role = baton_container_build::ContainerBuild::new(config).unwrap();
    let mut job = baton_shared::protocol::StepJob::example("ci", "container-build", "build");
    job.deploy.repository = repo.url();
    job.deploy.commit_sha = commit.clone();
    role.run(&job).await.expect("the first build");
    let context = w.join("context");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::copy(repo.path().join("Dockerfile"), context.join("Dockerfile")).unwrap();
    std::fs::create_dir_all(context.join("src")).unwrap();
    std::fs::copy(repo.path().join("src/app.txt"), context.join("src/app.txt")).unwrap();
    let (mut role_ms, mut bud_ms) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let started = Instant::now();
        role.run(&job).await.expect("a cached rebuild");
        role_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        bud_ms.push(timed_ms(|| {
            buildah(&[
                "bud",
                "--isolation",
                "chroot",
                "--layers",
                "--timestamp",
                "0",
                "--pull=never",
                "-t",
                "localhost/bench:bud",
                context.to_str().unwrap(),
            ]);
        }));
    }
    let _ = containerd.kill();
    let _ = containerd.wait();
    let (b_role, b_bud) = (median_ms(&mut role_ms), median_ms(&mut bud_ms));

    // Terraform: a database of its own, ten resources applied once.
    let admin = "postgres://postgres@127.0.0.1:5432/postgres";
    let pool = sqlx::PgPool::connect(admin).await.expect("postgres");
    let db = format!("bench_tf_{}", std::process::id());
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "drop database if exists {db} with (force)"
    )))
    .execute(&pool)
    .await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("create database {db}")))
        .execute(&pool)
        .await
        .expect("create database");
    let url = format!("postgres://postgres@127.0.0.1:5432/{db}?sslmode=disable");
    let infra = GitRepo::new();
    let tf = "terraform {\n  backend \"pg\" {}\n}\nresource \"terraform_data\" \"r\" {\n  count = 10\n  input = \"r-${count.index}\"\n}\n";
    infra.write("main.tf", tf);
    let tf_commit = infra.commit("ten resources");
    let role = baton_infrastructure::Infrastructure::new(baton_infrastructure::InfraConfig {
        repos_dir: w.join("tf-repos"),
        work_dir: w.join("tf-work"),
        state_url: baton_shared::secret::Secret::new(url.clone()),
        ..Default::default()
    });
    let tf_job = |action: &str, run: Uuid| {
        let mut j = baton_shared::protocol::StepJob::example("staging", "infrastructure", action)
            .with_param("blast_radius_limit", 20);
        j.run_id = run;
        j.step_id = format!("infra.{action}");
        j.deploy.repository = infra.url();
        j.deploy.commit_sha = tf_commit.clone();
        j
    };
    role.run(&tf_job("apply", Uuid::new_v4()))
        .await
        .expect("the first apply");
    // `terraform plan` alone, in a directory initialised once.
    let plain = w.join("tf-plain");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::write(plain.join("main.tf"), tf).unwrap();
    let terraform = |args: &[&str]| {
        let out = std::process::Command::new("terraform")
            .current_dir(&plain)
            .args(args)
            .env("CHECKPOINT_DISABLE", "1")
            .env("TF_IN_AUTOMATION", "1")
            .env("PG_CONN_STR", &url)
            .env("PG_SCHEMA_NAME", "tf_staging_shop_api")
            .output()
            .expect("terraform");
        assert!(
            out.status.success(),
            "terraform {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    terraform(&["init", "-input=false", "-no-color"]);
    let (mut plan_ms, mut tf_ms) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let started = Instant::now();
        let out = role
            .run(&tf_job("plan", Uuid::new_v4()))
            .await
            .expect("a no-change plan");
        plan_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(out["resources_changed"], 0);
        tf_ms.push(timed_ms(|| {
            terraform(&["plan", "-input=false", "-no-color", "-lock-timeout=60s"])
        }));
    }
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "drop database if exists {db} with (force)"
    )))
    .execute(&pool)
    .await;
    let (t_role, t_plain) = (median_ms(&mut plan_ms), median_ms(&mut tf_ms));
    json!({
        "rounds": rounds,
        "container_build": {"role_cached_rebuild_ms_p50": b_role, "buildah_bud_cached_ms_p50": b_bud,
                            "ratio": b_role / b_bud, "target_ratio": 1.2},
        "infrastructure": {"role_no_change_plan_ms_p50": t_role, "terraform_plan_ms_p50": t_plain,
                           "ratio": t_role / t_plain, "target_ratio": 1.2},
    })
}
