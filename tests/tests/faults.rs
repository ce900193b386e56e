//! Fault injection over real processes (docs/architecture.md, Invariants): the broker
//! restarted and alarmed, PostgreSQL stopped, schedulers killed, bursts of
//! events while a daemon dies. After each scenario the invariants are checked:
//! no run lost, each side effect at most once per (run, step), every transition
//! audited (and the audit chains intact), every run in a terminal state.
//!
//! Scenarios that restart or alarm the broker run against a private RabbitMQ
//! node, and the one that stops PostgreSQL against a private cluster, so the
//! rest of the suite is not disturbed. They are slow: filter them out locally
//! with `cargo test -p baton-tests --test faults -- --skip slow_`.

use std::collections::HashMap;
use std::time::Duration;

use baton_scheduler::store::RunView;
use baton_tests::{EVERYTHING, ExecLine, PrivateBroker, RealDaemon, SEED_BINDINGS, TestEnv, event};
use serde_json::json;
use uuid::Uuid;

const RUN_TIMEOUT: Duration = Duration::from_secs(150);

/// The invariants every scenario ends with.
async fn check_invariants(env: &TestEnv, runs: &[Uuid]) -> Vec<RunView> {
    check_invariants_with(env, runs, &[]).await
}

/// With `killed` daemons (label and pid, SIGKILLed mid-work), "at most once"
/// counts completed executions: an attempt a killed daemon was running started
/// but never ended. One it had finished but not yet reported runs again
/// (docs/architecture.md, Invariants: one live executor per attempt, executors idempotent per run
/// and step): as a new attempt once the old one's lease expires (recorded as
/// lost from the killed daemon), or, if the daemon had not yet acknowledged the
/// job (a quick job reports only its outcome), as the same attempt redelivered
/// to another daemon. Such executions by a killed daemon are not counted.
async fn check_invariants_with(env: &TestEnv, runs: &[Uuid], killed: &[(&str, u32)]) -> Vec<RunView> {
    let event = if killed.is_empty() { "start" } else { "end" };
    let mut views = Vec::new();
    for run in runs {
        let v = env.wait_terminal(*run, RUN_TIMEOUT).await;
        let unreported = |l: &ExecLine| {
            let Some((label, _)) = killed.iter().find(|(_, pid)| *pid == l.pid) else {
                return false;
            };
            v.step(&l.step_id).is_some_and(|s| {
                s.attempts.iter().any(|a| {
                    a.attempt as u32 == l.attempt && (a.status == "lost" || a.daemon.as_deref() != Some(label))
                })
            })
        };
        // Each side effect at most once per (run, step): a step that succeeded was
        // started by a daemon exactly once; no step of any run started twice.
        let mut starts: HashMap<(String, String), usize> = HashMap::new();
        let log = env.exec_log();
        for l in log
            .iter()
            .filter(|l| l.event == event && l.run_id == *run && !unreported(l))
        {
            *starts.entry((l.step_id.clone(), l.kind.clone())).or_default() += 1;
        }
        for ((step, kind), n) in &starts {
            let lines: Vec<_> = log.iter().filter(|l| l.run_id == *run && &l.step_id == step).collect();
            assert_eq!(
                *n,
                1,
                "run {run}: {kind} of {step} started {n} times: {lines:#?}\nattempts: {:#?}\nhistory: {:#?}",
                v.step(step).map(|s| &s.attempts),
                v.history
                    .iter()
                    .filter(|h| h.step_id.as_deref() == Some(step.as_str()))
                    .collect::<Vec<_>>()
            );
        }
        for s in v.steps.iter().filter(|s| s.status == "succeeded") {
            assert_eq!(
                starts.get(&(s.id.clone(), "execute".to_owned())),
                Some(&1),
                "run {run}: {} succeeded without exactly one execution",
                s.id
            );
        }
        assert_transitions_audited(&v);
        views.push(v);
    }
    env.assert_audit_verifies();
    views
}

/// Every succeeded step's transitions are in the run's history: the dispatch,
/// the start and the outcome.
fn assert_transitions_audited(v: &RunView) {
    for s in v.steps.iter().filter(|s| s.status == "succeeded") {
        for kind in ["dispatched", "attempt_started", "step_succeeded"] {
            assert!(
                v.history
                    .iter()
                    .any(|h| h.kind == kind && h.step_id.as_deref() == Some(s.id.as_str())),
                "run {}: no {kind} entry for {}",
                v.id,
                s.id
            );
        }
    }
}

/// Waits until the run is under way: some steps done, others not. A step's
/// "running" window can be shorter than a poll, so progress is what is awaited.
async fn wait_mid_run(env: &TestEnv, run: Uuid) {
    env.wait_until(&format!("run {run} to be under way"), RUN_TIMEOUT, async || {
        let Some(v) = env.run(run).await else {
            return false;
        };
        assert!(!v.is_terminal(), "run {run} ended before the fault was injected");
        v.steps.iter().filter(|s| s.status == "succeeded").count() >= 2
    })
    .await;
}

// The scheduler and the daemon keep their connections themselves (no lapin
// auto-recovery): both must reconnect, subscribe again and carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_broker_restart_mid_run_loses_nothing_and_runs_nothing_twice() {
    let broker = PrivateBroker::start(false);
    let mut env = TestEnv::new("fault-broker-restart").await;
    env.amqp_url = broker.url();
    // The production apply is slow, so the run is still going when the broker
    // stops: `rabbitmqctl` itself can take seconds on a loaded machine, and a
    // run that ended first would leave nothing for the restart to disturb.
    env.script(baton_tests::with_seed_facts(json!({
        "default": {"delay_ms": 400},
        "execute": {"apply.production": {"delay_ms": 4000}}
    })));
    // The lease must outlast a reconnect (production: 30 s); the tests' 2 s does not.
    env.set_scheduler_env("BATON_SCHEDULER__LEASE_MS", "10000");
    let mut scheduler = env.scheduler("scheduler").await;
    let mut daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let runs = vec![
        env.enqueue(&event("restart-a", 1, EVERYTHING)),
        env.enqueue(&event("restart-b", 2, &["src/app.ts"])),
    ];
    wait_mid_run(&env, runs[0]).await;
    broker.ctl(&["stop_app"]);
    let at_stop = env.run(runs[0]).await.expect("run");
    assert!(
        !at_stop.is_terminal(),
        "run {} ended before the broker stopped: the fault was not injected mid-run",
        runs[0]
    );
    broker.ctl(&["start_app"]);
    let views = check_invariants(&env, &runs).await;
    for v in &views {
        assert_eq!(v.status, "succeeded", "{}", env.diagnostics());
    }
    // The same processes carried on: they reconnected, nobody restarted them.
    assert!(scheduler.is_running() && daemon.is_running(), "{}", env.diagnostics());
    for label in ["scheduler", "daemon"] {
        env.wait_until(&format!("{label} to log its reconnect"), RUN_TIMEOUT, async || {
            env.log(label).contains("rabbitmq connection re-established")
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_broker_memory_alarm_blocks_publishers_without_open_transactions_then_work_resumes() {
    let broker = PrivateBroker::start(false);
    let mut env = TestEnv::new("fault-broker-alarm").await;
    env.amqp_url = broker.url();
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 300}})));
    // Production-like lease and accept timeout (the tests' 2 s / 5 s are shorter than
    // a loaded CI machine takes to drain the backlog the alarm leaves).
    env.set_scheduler_env("BATON_SCHEDULER__LEASE_MS", "10000");
    env.set_scheduler_env("BATON_SCHEDULER__ACCEPT_TIMEOUT_MS", "30000");
    let _scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let run = env.enqueue(&event("alarm", 1, EVERYTHING));
    wait_mid_run(&env, run).await;
    // A memory alarm: the broker blocks every publishing connection.
    let started_before = env.exec_log().iter().filter(|l| l.event == "start").count();
    broker.ctl(&["set_vm_memory_high_watermark", "0.000001"]);
    let before = env.run(run).await.unwrap();
    let done = |v: &RunView| v.steps.iter().filter(|s| s.status == "succeeded").count();
    // The window ends with events: every execution begun before the alarm has
    // ended (its outcome now waits behind the alarm), and the broker reports the
    // scheduler's and the daemon's connections blocked, for a second. (A
    // connection is reported blocked once it tries to publish: if the alarm came
    // between two steps, the idle daemon has nothing to publish, and the
    // scheduler's blocked connection is enough.) Throughout it, nobody may hold
    // a database transaction open waiting on the broker.
    let mut blocked_since: Option<std::time::Instant> = None;
    env.wait_until(
        "executions begun before the alarm to end and both connections to be blocked for a second",
        RUN_TIMEOUT,
        async || {
            let stuck: i64 = sqlx::query_scalar(
                "select count(*) from pg_stat_activity where datname = current_database()
                   and state like 'idle in transaction%' and now() - xact_start > interval '500 milliseconds'",
            )
            .fetch_one(&env.pool)
            .await
            .unwrap();
            assert_eq!(
                stuck, 0,
                "a transaction stayed open while the broker blocked publishers"
            );
            let log = env.exec_log();
            let started = log.iter().filter(|l| l.event == "start").count();
            let ended = log.iter().filter(|l| l.event == "end").count();
            let blocked = broker
                .ctl(&["list_connections", "-q", "--no-table-headers", "state"])
                .lines()
                .filter(|l| l.trim() == "blocked")
                .count();
            let daemon_idle = ended == started;
            if ended < started_before || blocked < 1 || (blocked < 2 && !daemon_idle) {
                blocked_since = None;
                return false;
            }
            blocked_since.get_or_insert_with(std::time::Instant::now).elapsed() > Duration::from_secs(1)
        },
    )
    .await;
    let during = env.run(run).await.unwrap();
    assert!(
        done(&during) <= done(&before) + 1,
        "work went on while every publisher was blocked: {} then {}",
        done(&before),
        done(&during)
    );
    assert!(!during.is_terminal());
    broker.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    let views = check_invariants(&env, &[run]).await;
    assert_eq!(views[0].status, "succeeded", "{}", env.diagnostics());
    let lost = views[0]
        .steps
        .iter()
        .flat_map(|s| &s.attempts)
        .filter(|a| a.status == "lost")
        .count();
    assert_eq!(lost, 0, "no lease expired because of the alarm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_database_crash_mid_run_the_scheduler_waits_and_resumes() {
    let pg = baton_tests::PrivateDatabase::start();
    let mut env = TestEnv::new("fault-pg-stop").await;
    let admin = sqlx::PgPool::connect(&pg.url("postgres")).await.unwrap();
    sqlx::query("create database baton").execute(&admin).await.unwrap();
    admin.close().await;
    env.db_url = pg.url("baton");
    env.pool = sqlx::PgPool::connect(&env.db_url).await.unwrap();
    // The production migration takes long enough that the crash lands while
    // it runs, however loaded the machine: the test waits for it to start.
    env.script(baton_tests::with_seed_facts(json!({
        "default": {"delay_ms": 300},
        "execute": {"db.production": {"delay_ms": 4000}}
    })));
    env.set_scheduler_env("BATON_SCHEDULER__LEASE_MS", "10000");
    let _scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let run = env.enqueue(&event("pg-crash", 1, EVERYTHING));
    env.wait_until("db.production to start", RUN_TIMEOUT, async || {
        env.exec_log()
            .iter()
            .any(|l| l.event == "start" && l.step_id == "db.production")
    })
    .await;
    env.pool.close().await;
    pg.crash();
    let crashed = chrono::Utc::now();
    // The database stays down until a daemon has finished a step meanwhile: its
    // result waits in RabbitMQ for the scheduler, which cannot apply it yet.
    env.wait_until("a step to finish while the database is down", RUN_TIMEOUT, async || {
        env.exec_log().iter().any(|l| l.event == "end" && l.at > crashed)
    })
    .await;
    pg.start_again();
    env.pool = sqlx::PgPool::connect(&env.db_url).await.unwrap();
    let views = check_invariants(&env, &[run]).await;
    assert_eq!(views[0].status, "succeeded", "{}", env.diagnostics());
    // No half-written transition: every attempt row has its step's matching state.
    for s in &views[0].steps {
        for a in &s.attempts {
            assert!(
                a.finished_at.is_some(),
                "{}: attempt {} never finished",
                s.id,
                a.attempt
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_one_of_two_schedulers_killed_mid_run_exactly_one_dispatch_per_attempt() {
    let env = TestEnv::new("fault-replica").await;
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 300}})));
    let (mut a, _b) = env.two_schedulers("scheduler-a", "scheduler-b").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let runs: Vec<Uuid> = (0..6)
        .map(|i| env.enqueue(&event(&format!("replica-{}", i % 3), i, EVERYTHING)))
        .collect();
    wait_mid_run(&env, runs[0]).await;
    a.kill();
    let views = check_invariants(&env, &runs).await;
    for v in &views {
        assert_eq!(v.status, "succeeded", "{}", env.diagnostics());
    }
    let doubled: Vec<(Uuid, String, i32, i64)> = sqlx::query_as(
        "select run_id, step_id, attempt, count(*) from outbox where step_id is not null and exchange = 'baton.jobs'
          group by run_id, step_id, attempt having count(*) > 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert!(doubled.is_empty(), "an attempt was dispatched twice: {doubled:?}");
    // The killed replica's heartbeat ages out and the survivor takes its shards.
    env.wait_shards_shared("scheduler-b", 1).await;
}

/// Starts the scheduler with a crash point armed, waits for it to hit it, and
/// starts a successor (the point fires once).
async fn scheduler_crashing_at(env: &TestEnv, point: &str) -> baton_tests::Proc {
    env.set_scheduler_env("BATON_FAILPOINTS", point);
    env.set_scheduler_env("BATON_FAILPOINT_DIR", env.dir.to_str().unwrap());
    env.scheduler("scheduler-1").await
}

async fn wait_exit(env: &TestEnv, p: &mut baton_tests::Proc, what: &str) {
    env.wait_until(what, RUN_TIMEOUT, async || !p.is_running()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_scheduler_killed_between_a_result_commit_and_the_next_dispatch() {
    let env = TestEnv::new("fault-after-commit").await;
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 100}})));
    let mut first = scheduler_crashing_at(&env, "scheduler-after-result-commit").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let run = env.enqueue(&event("crash-commit", 1, &["src/app.ts"]));
    wait_exit(&env, &mut first, "the scheduler to crash after a result's commit").await;
    let _second = env.scheduler("scheduler-2").await;
    let views = check_invariants(&env, &[run]).await;
    assert_eq!(views[0].status, "succeeded", "{}", env.diagnostics());
    assert!(
        env.dir.join("scheduler-after-result-commit").exists(),
        "the crash point was hit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_scheduler_killed_after_publishing_before_marking_the_outbox_sent() {
    let env = TestEnv::new("fault-before-mark").await;
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 100}})));
    let mut first = scheduler_crashing_at(&env, "scheduler-after-publish-before-mark-sent").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let run = env.enqueue(&event("crash-publish", 1, &["src/app.ts"]));
    wait_exit(&env, &mut first, "the scheduler to crash after publishing").await;
    let _second = env.scheduler("scheduler-2").await;
    // The successor publishes the unmarked rows again: the daemon refuses the copy as
    // a replay, so the step still runs once.
    let views = check_invariants(&env, &[run]).await;
    assert_eq!(views[0].status, "succeeded", "{}", env.diagnostics());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_scheduler_killed_during_compensation() {
    let env = TestEnv::new("fault-compensation").await;
    env.script(baton_tests::with_seed_facts(json!({
        "default": {"delay_ms": 100},
        "execute": {"apply.production": {"fail": {"code": "rollout_failed", "message": "pods crash", "retryable": false}}}
    })));
    let mut first = scheduler_crashing_at(&env, "scheduler-compensation-published").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let run = env.enqueue(&event("crash-compensate", 1, &["src/app.ts"]));
    wait_exit(&env, &mut first, "the scheduler to crash while compensating").await;
    let _second = env.scheduler("scheduler-2").await;
    let views = check_invariants(&env, &[run]).await;
    assert_eq!(views[0].status, "rolled_back", "{}", env.diagnostics());
    assert_eq!(views[0].step("verify.staging").unwrap().status, "compensated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_daemon_killed_after_publishing_its_outcome() {
    let env = TestEnv::new("fault-daemon-outcome").await;
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 100}})));
    let _scheduler = env.scheduler("scheduler").await;
    let dir = env.dir.to_str().unwrap().to_owned();
    // One job at a time: the crash then interrupts no other job between its side
    // effect and its report (a daemon dying there is the mid-step case, covered
    // by invariants.rs, where the retry may repeat the effect).
    let crash = [
        ("BATON_FAILPOINTS", "daemon-after-outcome"),
        ("BATON_FAILPOINT_DIR", dir.as_str()),
        ("BATON_DAEMON__CONCURRENCY", "1"),
    ];
    let mut first = env.daemon_with("daemon-1", SEED_BINDINGS, &crash).await;
    let run = env.enqueue(&event("crash-outcome", 1, &["src/app.ts"]));
    wait_exit(&env, &mut first, "the daemon to crash after its first outcome").await;
    let _second = env.daemon("daemon-2", SEED_BINDINGS).await;
    let views = check_invariants(&env, &[run]).await;
    assert_eq!(views[0].status, "succeeded", "{}", env.diagnostics());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_daemon_killed_after_a_quick_job_s_work_before_acking_it_the_broker_redelivers_the_same_attempt() {
    let env = TestEnv::new("fault-quick-outcome").await;
    // Every job is quick: it reports only its outcome, and its delivery is
    // acknowledged only once its work is done. The quiet start is a second
    // here, not the default 10 ms, so that a loaded machine (CI) cannot make
    // a job without work look slow: one that did reported `started`, was
    // acked, and its attempt was left to the lease.
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 0}})));
    let _scheduler = env.scheduler("scheduler").await;
    let dir = env.dir.to_str().unwrap().to_owned();
    let crash = [
        ("BATON_FAILPOINTS", "daemon-after-work"),
        ("BATON_FAILPOINT_DIR", dir.as_str()),
        ("BATON_DAEMON__CONCURRENCY", "1"),
        ("BATON_DAEMON__REPORT_STARTED_AFTER_MS", "1000"),
    ];
    let mut first = env.daemon_with("daemon-1", SEED_BINDINGS, &crash).await;
    let killed = first.pid();
    let run = env.enqueue(&event("crash-quick", 1, &["src/app.ts"]));
    wait_exit(
        &env,
        &mut first,
        "the daemon to crash with a finished job unacknowledged",
    )
    .await;
    let done: Vec<ExecLine> = env
        .exec_log()
        .into_iter()
        .filter(|l| l.run_id == run && l.event == "end")
        .collect();
    assert_eq!(done.len(), 1, "one job finished before the crash: {done:?}");
    let step = done[0].step_id.clone();
    let _second = env.daemon("daemon-2", SEED_BINDINGS).await;
    let views = check_invariants_with(&env, &[run], &[("daemon-1", killed)]).await;
    assert_eq!(views[0].status, "succeeded", "{}", env.diagnostics());
    // The unacknowledged job went back to the broker and ran again as the same
    // attempt, reported by the second daemon; no lease had to expire.
    let attempts = &views[0].step(&step).unwrap().attempts;
    assert_eq!(attempts.len(), 1, "one attempt of {step}: {attempts:#?}");
    assert_eq!(attempts[0].status, "succeeded");
    assert_eq!(attempts[0].daemon.as_deref(), Some("daemon-2"));
    let ends: Vec<u32> = env
        .exec_log()
        .iter()
        .filter(|l| l.run_id == run && l.step_id == step && l.event == "end")
        .map(|l| l.pid)
        .collect();
    assert!(
        ends.len() == 2 && ends[0] == killed && ends[1] != killed,
        "{step} ended twice, first in the killed daemon: {ends:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_daemon_killed_before_acking_a_job_the_job_is_redelivered_and_runs_once() {
    let env = TestEnv::new("fault-daemon-before-ack").await;
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 50}})));
    let _scheduler = env.scheduler("scheduler").await;
    let dir = env.dir.to_str().unwrap().to_owned();
    // The daemon dies once, on the build job's delivery, before reporting or acking it.
    let crash = [
        ("BATON_FAILPOINTS", "daemon-before-ack-build"),
        ("BATON_FAILPOINT_DIR", dir.as_str()),
    ];
    let mut first = env.daemon_with("daemon-1", SEED_BINDINGS, &crash).await;
    let run = env.enqueue(&event("crash-before-ack", 1, &["src/app.ts"]));
    wait_exit(&env, &mut first, "the daemon to crash on the build job's delivery").await;
    assert!(
        env.starts(run, "build", "execute").is_empty(),
        "nothing ran before the crash"
    );
    // Its successor gets the unacknowledged job from the broker.
    let _second = env.daemon("daemon-2", SEED_BINDINGS).await;
    let views = check_invariants(&env, &[run]).await;
    assert_eq!(views[0].status, "succeeded", "{}", env.diagnostics());
    assert_eq!(
        env.starts(run, "build", "execute").len(),
        1,
        "the job ran once (redelivered, or retried once its acceptance timed out)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_poison_job_reaches_the_delivery_limit_and_fails_its_step_while_others_flow() {
    let env = TestEnv::new("fault-poison").await;
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 50}})));
    let _scheduler = env.scheduler("scheduler").await;
    let others = baton_tests::seed_bindings_except("production.cdn");
    let _daemon = env.daemon("daemon", &others).await;
    let dir = env.dir.to_str().unwrap().to_owned();
    // This daemon dies on every delivery of the cdn job, before it acks it.
    let crash = [
        ("BATON_FAILPOINTS", "daemon-before-ack-cdn!"),
        ("BATON_FAILPOINT_DIR", dir.as_str()),
    ];
    let mut cdn = env.daemon_with("cdn-1", &["production.cdn"], &crash).await;
    let run = env.enqueue(&event("poison", 1, &["src/app.ts", "assets/logo.svg"]));
    // A supervisor restarts it, as Kubernetes would, until the run is over.
    let mut restarts = 0;
    env.wait_until("the run with a poison job to end", RUN_TIMEOUT, async || {
        if !cdn.is_running() {
            restarts += 1;
            cdn = env.spawn_daemon_with(&format!("cdn-{}", restarts + 1), &["production.cdn"], &crash);
        }
        env.run(run).await.is_some_and(|v| v.is_terminal())
    })
    .await;
    let views = check_invariants(&env, &[run]).await;
    let v = &views[0];
    assert_eq!(v.status, "rolled_back", "{}", env.diagnostics());
    let cdn_step = v.step("cdn").unwrap();
    let err = cdn_step.error.as_ref().expect("cdn failed");
    assert_eq!(err.code, "dead_lettered", "{err:?}");
    assert!(err.message.contains("delivery_limit"), "{err:?}");
    assert!(restarts >= 4, "the daemon died on each delivery: {restarts} restarts");
    // Other jobs kept flowing: apply.production ran in parallel (and was compensated).
    assert!(!env.starts(run, "apply.production", "execute").is_empty());
    assert!(
        env.starts(run, "cdn", "execute").is_empty(),
        "the poison job never executed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_burst_of_200_merge_events_for_20_services_while_a_daemon_is_killed_and_restarted() {
    let env = TestEnv::new("fault-burst").await;
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 5}})));
    let _scheduler = env.scheduler("scheduler").await;
    let mut daemon = env.daemon("daemon-1", SEED_BINDINGS).await;
    let mut killed_pid = 0;
    let mut runs = Vec::new();
    let mut by_service: HashMap<String, Vec<Uuid>> = HashMap::new();
    for i in 0..200u32 {
        let service = format!("svc-{:02}", i % 20);
        let ev = event(&service, (i / 20) as u8 + 1, &["src/app.ts"]);
        let run = env.enqueue(&ev);
        by_service.entry(service).or_default().push(run);
        runs.push(run);
        if i == 100 {
            // SIGKILL mid-burst, and restart at once as a supervisor would. (A daemon
            // away for longer than accept_timeout × max_attempts fails the steps it
            // owes: the retry policy decides, as it should.)
            killed_pid = daemon.pid();
            daemon.kill();
            daemon = env.spawn_daemon("daemon-2", SEED_BINDINGS);
        }
    }
    let views = check_invariants_with(&env, &runs, &[("daemon-1", killed_pid)]).await;
    drop(daemon);
    let by_id: HashMap<Uuid, &RunView> = views.iter().map(|v| (v.id, v)).collect();
    for v in &views {
        assert_eq!(
            v.status,
            "succeeded",
            "run {} of {}: {:?}",
            v.id,
            v.service,
            v.steps.iter().filter_map(|s| s.error.as_ref()).collect::<Vec<_>>()
        );
    }
    // Per environment: one run at a time, in the order the events arrived.
    for (service, ids) in &by_service {
        for pair in ids.windows(2) {
            let (a, b) = (by_id[&pair[0]], by_id[&pair[1]]);
            assert!(
                b.started_at.unwrap() >= a.finished_at.unwrap(),
                "{service}: run {} started before run {} (enqueued earlier) finished",
                b.id,
                a.id
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_sigterm_mid_run_stops_cleanly_and_a_successor_finishes() {
    let env = TestEnv::new("fault-sched-sigterm").await;
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 300}})));
    let mut first = env.scheduler("scheduler-1").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let run = env.enqueue(&event("sigterm", 1, EVERYTHING));
    wait_mid_run(&env, run).await;
    assert!(
        first.terminate(Duration::from_secs(20)),
        "the scheduler exits 0 after SIGTERM"
    );
    // In-flight results wait in the queue; the successor applies them and finishes.
    let _second = env.scheduler("scheduler-2").await;
    let views = check_invariants(&env, &[run]).await;
    assert_eq!(views[0].status, "succeeded", "{}", env.diagnostics());
}

/// The status of `step`'s attempt `attempt`, if it has one.
async fn attempt_status(env: &TestEnv, run: Uuid, step: &str, attempt: i32) -> Option<String> {
    sqlx::query_scalar("select status from attempts where run_id = $1 and step_id = $2 and attempt = $3")
        .bind(run)
        .bind(step)
        .bind(attempt)
        .fetch_optional(&env.pool)
        .await
        .unwrap()
}

/// A replica that restarts every 2 s (SIGKILLed, started again) while another
/// runs must not keep a killed daemon's attempt alive, as it would if each start pushed
/// every lease in the database one lease period on. The bound stated here:
/// lost within two lease periods plus 20 s of the daemon's death (one period
/// is the lease itself; at most one renewal per silence adds the second;
/// 20 s is slack for a loaded machine), while the restarts go on for 90 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_a_replica_restarting_every_two_seconds_does_not_delay_lease_expiry() {
    let env = TestEnv::new("fault-lease-restarts").await;
    let lease = Duration::from_secs(5);
    env.set_scheduler_env("BATON_SCHEDULER__LEASE_MS", &lease.as_millis().to_string());
    env.set_scheduler_env("BATON_SCHEDULER__HEARTBEAT_MS", "1000");
    env.script(baton_tests::with_seed_facts(
        json!({"default": {"delay_ms": 20}, "execute": {"build": {"delay_ms": 600000}}}),
    ));
    let (_a, mut b) = env.two_schedulers("scheduler-a", "scheduler-b").await;
    let mut daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let run = env.enqueue(&event("lease-restarts", 1, EVERYTHING));
    env.wait_until("build to be running", RUN_TIMEOUT, async || {
        attempt_status(&env, run, "build", 1).await.as_deref() == Some("running")
    })
    .await;
    daemon.kill();
    let killed = std::time::Instant::now();
    let mut lost_after = None;
    let mut restarts = 0;
    while killed.elapsed() < Duration::from_secs(90) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        b.kill();
        restarts += 1;
        b = env.spawn_scheduler(&format!("scheduler-b{restarts}"));
        if lost_after.is_none() && attempt_status(&env, run, "build", 1).await.as_deref() == Some("lost") {
            lost_after = Some(killed.elapsed());
            break;
        }
    }
    let lost_after = lost_after.unwrap_or_else(|| {
        panic!(
            "the killed daemon's attempt was not lost in 90 s of restarts ({restarts} restarts)\n{}",
            env.diagnostics()
        )
    });
    let bound = lease * 2 + Duration::from_secs(20);
    assert!(
        lost_after <= bound,
        "lost after {lost_after:?}, over the bound {bound:?} ({restarts} restarts)"
    );
    eprintln!("lease {lease:?}: the attempt was lost {lost_after:?} after its daemon died, across {restarts} restarts");
}

fn git(repo: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .env("GIT_AUTHOR_NAME", "Storm")
        .env("GIT_AUTHOR_EMAIL", "storm@example.org")
        .env("GIT_COMMITTER_NAME", "Storm")
        .env("GIT_COMMITTER_EMAIL", "storm@example.org")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Scratch databases (`prefix…`) whose lock nobody holds: leaked by a dead daemon.
async fn leaked_scratch(prefix: &str) -> Vec<String> {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect("postgres://postgres@127.0.0.1:5432/postgres")
        .await
        .unwrap();
    let names: Vec<String> =
        sqlx::query_scalar("select datname::text from pg_database where left(datname, length($1)) = $1")
            .bind(prefix)
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let mut leaked = Vec::new();
    for n in names {
        let key = format!("baton-scratch/{n}");
        let free: bool = sqlx::query_scalar("select pg_try_advisory_lock(hashtextextended($1, 0))")
            .bind(&key)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        if free {
            sqlx::query("select pg_advisory_unlock(hashtextextended($1, 0))")
                .bind(&key)
                .execute(&mut conn)
                .await
                .unwrap();
            leaked.push(n);
        }
    }
    leaked
}

/// The operator's bad day, scaled to CI: two schedulers, two db-migration
/// daemons per zone and a backup daemon per zone, all real, and 3 services ×
/// 2 merge events through the demo pipeline while a random process is
/// SIGKILLed and restarted every 0.3–3 s for 45 s (fixed seed). Then: every
/// run ended and succeeded (losses to dead daemons do not use up retries), no
/// migration ran twice, each database's history is exactly its journal, no
/// scratch database is left behind, and the audit chains hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_crash_storm_with_real_daemons_loses_no_run_and_leaves_nothing_behind() {
    let env = TestEnv::new("fault-storm").await;
    // Scripted facts: the seed pipeline's production gates read them.
    env.script(baton_tests::with_seed_facts(serde_json::json!({})));
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo");
    env.scheduler_config(&format!(
        "[scheduler]\npipeline = {:?}\n",
        examples.join("pipeline.toml").display().to_string()
    ));
    // The repository: the demo's first two commits (a table, then a column).
    let repo = env.dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    let mut commits = Vec::new();
    for c in ["commit-1", "commit-2"] {
        copy_tree(&examples.join(c), &repo);
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-q", "-m", c]);
        commits.push(git(&repo, &["rev-parse", "HEAD"]));
    }
    // Three services, each with a database per zone.
    let services = ["storm-a", "storm-b", "storm-c"];
    let admin = "postgres://postgres@127.0.0.1:5432/postgres";
    let mut dbs = Vec::new();
    {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(admin).await.unwrap();
        for s in services {
            for zone in ["staging", "production"] {
                let name = format!("{}_{}_{zone}", env.db_name, s.replace('-', "_"));
                sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                dbs.push((s, zone, name));
            }
        }
    }
    let db_map = |zone: &str| -> String {
        dbs.iter()
            .filter(|(_, z, _)| *z == zone)
            .map(|(s, _, n)| format!("{s} = \"postgres://postgres@127.0.0.1:5432/{n}\"\n"))
            .collect()
    };
    let age = std::process::Command::new(baton_tests::bin("baton-backup"))
        .arg("--keygen")
        .arg(env.dir.join("age.txt"))
        .output()
        .unwrap();
    assert!(age.status.success());
    let recipient = String::from_utf8_lossy(&age.stdout).trim().to_owned();
    // Every verification lingers with its scratch database, so kills land mid-check.
    const PAUSES: &[(&str, &str)] = &[(
        "BATON_PAUSEPOINTS",
        "db-migration-scratch-created:3000,backup-scratch-created:3000",
    )];
    let mut daemons = Vec::new();
    for zone in ["staging", "production"] {
        for i in 1..=2 {
            let label = format!("db-{zone}-{i}");
            let config = env.dir.join(format!("{label}.toml"));
            std::fs::write(
                &config,
                format!(
                    "[daemon]\nzone = {zone:?}\n\n[migration]\nrepos_dir = {repos:?}\nadmin_url = {admin:?}\n\n\
                     [migration.databases]\n{map}",
                    repos = env.dir.join(format!("repos-{label}")).display().to_string(),
                    map = db_map(zone),
                ),
            )
            .unwrap();
            daemons.push(RealDaemon::start(&env, &label, "baton-db-migration", config, PAUSES));
        }
        let label = format!("backup-{zone}");
        let config = env.dir.join(format!("{label}.toml"));
        std::fs::write(
            &config,
            format!(
                "[daemon]\nzone = {zone:?}\n\n[backup]\nadmin_url = {admin:?}\nrecipients = [{recipient:?}]\n\
                 identity_file = {identity:?}\n\n[backup.primary]\npath = {primary:?}\nregion = \"nl-ams1\"\n\n\
                 [backup.copy]\npath = {copy:?}\nregion = \"nl-ams2\"\n\n[backup.databases]\n{map}\n\
                 [backup.schedule]\nenabled = false\n",
                identity = env.dir.join("age.txt").display().to_string(),
                primary = env.dir.join("backups/primary").display().to_string(),
                copy = env.dir.join("backups/copy").display().to_string(),
                map = db_map(zone),
            ),
        )
        .unwrap();
        daemons.push(RealDaemon::start(&env, &label, "baton-backup", config, PAUSES));
    }
    let mut schedulers = [env.scheduler("scheduler-a").await, env.spawn_scheduler("scheduler-b")];

    // Each service's two merge events, in order.
    let mut runs = Vec::new();
    for (n, s) in services.iter().enumerate() {
        for (k, sha) in commits.iter().enumerate() {
            let mut ev = event(s, 0, &["drizzle/migrations/meta/_journal.json"]);
            ev["repository"] = json!(repo.display().to_string());
            ev["commit_sha"] = json!(sha);
            ev["pull_request"]["number"] = json!(100 + n * 10 + k);
            runs.push(env.enqueue(&ev));
        }
    }

    // The storm: a random process (fixed seed) killed and restarted every 0.3–3 s.
    let mut seed: u64 = 0x005e_ed0f_ba70;
    let mut next = |n: u64| {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let start = std::time::Instant::now();
    let (mut kills, mut mid_run) = (0, 0);
    while start.elapsed() < Duration::from_secs(45) {
        tokio::time::sleep(Duration::from_millis(300 + next(2700))).await;
        let going: i64 = sqlx::query_scalar("select count(*) from runs where status in ('queued', 'running')")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        if going > 0 {
            mid_run += 1;
        }
        let victim = next((daemons.len() + schedulers.len()) as u64) as usize;
        if victim < daemons.len() {
            daemons[victim].kill_and_restart(&env);
        } else {
            let i = victim - daemons.len();
            schedulers[i].kill();
            schedulers[i] = env.spawn_scheduler(&format!("scheduler-{i}-{kills}"));
        }
        kills += 1;
    }

    // Real daemons keep no execution log: what they did is read from the
    // databases below; every run ends, succeeds, and every transition is audited.
    for run in &runs {
        let v = env.wait_terminal(*run, RUN_TIMEOUT).await;
        assert_eq!(v.status, "succeeded", "{v:#?}\n{}", env.diagnostics());
        assert_transitions_audited(&v);
    }
    env.assert_audit_verifies();
    // Each database applied each migration once and holds exactly its journal.
    for (_, _, name) in &dbs {
        let mut conn =
            <sqlx::PgConnection as sqlx::Connection>::connect(&format!("postgres://postgres@127.0.0.1:5432/{name}"))
                .await
                .unwrap();
        let applied: i64 = sqlx::query_scalar("select count(*) from drizzle.__drizzle_migrations")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(applied, 2, "{name}: history is the journal's two entries");
        let twice: Vec<(String, i64)> = sqlx::query_as(
            "select tag, count(*) from baton_migrations.log where direction = 'up' group by tag having count(*) > 1",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        assert!(twice.is_empty(), "{name}: a migration ran twice: {twice:?}");
    }
    // Every killed daemon's successor swept its scratch databases.
    for prefix in ["baton_scratch_", "baton_verify_"] {
        let deadline = std::time::Instant::now() + RUN_TIMEOUT;
        loop {
            let leaked = leaked_scratch(prefix).await;
            if leaked.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "leaked scratch databases: {leaked:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let lost: i64 = sqlx::query_scalar("select count(*) from attempts where status = 'lost'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    eprintln!(
        "crash storm: {kills} kills in 45 s ({mid_run} while runs were under way), {lost} attempts lost, every run succeeded"
    );
    assert!(
        mid_run >= 5,
        "the storm must hit runs under way: {mid_run} of {kills} kills did"
    );
    drop(daemons);
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(admin).await.unwrap();
    for (_, _, name) in &dbs {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "drop database if exists {name} with (force)"
        )))
        .execute(&mut conn)
        .await;
    }
}
