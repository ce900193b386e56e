//! Fault injection over real processes (DESIGN §13, issue 7): the broker
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
use baton_tests::{EVERYTHING, PrivateBroker, SEED_BINDINGS, TestEnv, event};
use serde_json::json;
use uuid::Uuid;

const RUN_TIMEOUT: Duration = Duration::from_secs(150);

/// The invariants every scenario ends with.
async fn check_invariants(env: &TestEnv, runs: &[Uuid]) -> Vec<RunView> {
    let mut views = Vec::new();
    for run in runs {
        let v = env.wait_terminal(*run, RUN_TIMEOUT).await;
        // Each side effect at most once per (run, step): a step that succeeded was
        // started by a daemon exactly once; no step of any run started twice.
        let mut starts: HashMap<(String, String), usize> = HashMap::new();
        let log = env.exec_log();
        for l in log.iter().filter(|l| l.event == "start" && l.run_id == *run) {
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
            // Every transition audited: the dispatch, the start and the outcome.
            for kind in ["dispatched", "attempt_started", "step_succeeded"] {
                assert!(
                    v.history
                        .iter()
                        .any(|h| h.kind == kind && h.step_id.as_deref() == Some(s.id.as_str())),
                    "run {run}: no {kind} entry for {}",
                    s.id
                );
            }
        }
        views.push(v);
    }
    let out = env.baton(&["--json", "audit", "verify"]);
    assert!(
        out.status.success(),
        "audit chains broken: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    views
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_broker_restart_mid_run_loses_nothing_and_runs_nothing_twice() {
    let broker = PrivateBroker::start(false);
    let mut env = TestEnv::new("fault-broker-restart").await;
    env.amqp_url = broker.url();
    env.script(json!({"default": {"delay_ms": 400}}));
    // The lease must outlast a reconnect (production: 30 s); the tests' 2 s does not.
    env.set_scheduler_env("BATON_SCHEDULER__LEASE_MS", "10000");
    let _scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let runs = vec![
        env.enqueue(&event("restart-a", 1, EVERYTHING)),
        env.enqueue(&event("restart-b", 2, &["src/app.ts"])),
    ];
    env.wait_step(runs[0], "db.staging", "running", RUN_TIMEOUT).await;
    broker.ctl(&["stop_app"]);
    broker.ctl(&["start_app"]);
    let views = check_invariants(&env, &runs).await;
    for v in &views {
        assert_eq!(v.status, "succeeded", "{}", env.diagnostics());
    }
}
