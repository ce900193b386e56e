//! The engine end to end: `baton scheduler` and test daemons as real processes
//! against the machine's RabbitMQ and PostgreSQL.

use std::collections::BTreeSet;
use std::time::Duration;

use baton_scheduler::store::{RunView, StepView};
use baton_shared::protocol::{JobKind, Message, Refusal, ResultStatus, StepJob, StepResult};
use baton_shared::signing::Trusted;
use baton_shared::topology::{self, DEAD_QUEUE, JOBS_EXCHANGE, NOTICES_QUEUE, REASON_HEADER};
use baton_tests::{EVERYTHING, SEED_BINDINGS, TestEnv, event, seed_bindings_except, step_job};
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use serde_json::json;
use uuid::Uuid;

const RUN_TIMEOUT: Duration = Duration::from_secs(90);

fn step<'a>(view: &'a RunView, id: &str) -> &'a StepView {
    view.step(id).unwrap_or_else(|| panic!("run has no step {id}"))
}

fn overlaps(a: &StepView, b: &StepView) -> bool {
    let (a0, a1) = (a.started_at.unwrap(), a.finished_at.unwrap());
    let (b0, b1) = (b.started_at.unwrap(), b.finished_at.unwrap());
    a0 < b1 && b0 < a1
}

fn assert_needs_respected(view: &RunView) {
    for s in view.steps.iter().filter(|s| s.started_at.is_some()) {
        for n in &s.needs {
            let need = step(view, n);
            let done = need
                .finished_at
                .unwrap_or_else(|| panic!("{} started but its need {n} never finished", s.id));
            assert!(
                s.started_at.unwrap() >= done,
                "{} started at {:?} before its need {n} finished at {done:?}",
                s.id,
                s.started_at
            );
        }
    }
}

fn executed_once(env: &TestEnv, run: Uuid, view: &RunView) {
    for s in view.steps.iter().filter(|s| s.included && s.status == "succeeded") {
        let starts = env.starts(run, &s.id, "execute");
        assert_eq!(
            starts.len(),
            1,
            "step {} executed {} times: {starts:?}",
            s.id,
            starts.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_pipeline_runs_in_dependency_order_with_parallel_windows() {
    let env = TestEnv::new("order").await;
    env.script(baton_tests::with_seed_facts(json!({
        "default": {"delay_ms": 150},
        "execute": {
            "build": {"delay_ms": 1500},
            "apply.production": {"delay_ms": 1200},
            "network": {"delay_ms": 400},
            "cdn": {"delay_ms": 400},
        }
    })));
    let _scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let run = env.enqueue(&event("shop", 1, EVERYTHING));

    let view = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(view.status, "succeeded", "{view:#?}");
    assert!(
        view.steps.iter().all(|s| s.status == "succeeded"),
        "every seed step runs for EVERYTHING"
    );
    assert_needs_respected(&view);
    assert!(
        overlaps(step(&view, "build"), step(&view, "db.staging")),
        "container build overlaps db migration"
    );
    assert!(overlaps(step(&view, "build"), step(&view, "db.production")));
    assert!(
        overlaps(step(&view, "apply.production"), step(&view, "network")),
        "network overlaps production apply"
    );
    assert!(
        overlaps(step(&view, "apply.production"), step(&view, "cdn")),
        "cdn overlaps production apply"
    );
    executed_once(&env, run, &view);
    // Outputs flow to the steps that need them.
    let verify = env.starts(run, "verify.staging", "execute");
    let inputs = &verify[0].extra["inputs"];
    assert_eq!(
        inputs["build"]["done_by"], "build:1",
        "verify.staging receives build's outputs: {inputs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_whose_when_is_false_are_skipped_and_the_dag_still_flows() {
    let env = TestEnv::new("skip").await;
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 50}})));
    let _scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let run = env.enqueue(&event("shop", 2, &["src/app.ts"]));

    let view = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(view.status, "succeeded");
    for id in [
        "db.staging",
        "db.production",
        "infra.staging.plan",
        "infra.staging",
        "infra.production.plan",
        "infra.production",
        "network",
        "cdn",
    ] {
        let s = step(&view, id);
        assert_eq!(s.status, "skipped", "{id}");
        assert!(s.attempts.is_empty(), "{id} was never dispatched");
        assert!(env.starts(run, id, "execute").is_empty(), "{id} never executed");
    }
    for id in [
        "build",
        "backup.pre",
        "verify.staging",
        "apply.production",
        "backup.post",
    ] {
        assert_eq!(step(&view, id).status, "succeeded", "{id}");
    }
    // verify.staging's edges to db.* and infra.* pass through to what they needed.
    let needs: BTreeSet<&str> = step(&view, "verify.staging").needs.iter().map(String::as_str).collect();
    assert_eq!(
        needs,
        BTreeSet::from(["build", "backup.pre"]),
        "skipped db.production passes its need on"
    );
    assert_needs_respected(&view);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_cdn_step_cancels_in_flight_and_compensates_in_reverse_order() {
    let env = TestEnv::new("cdn-fails").await;
    env.script(baton_tests::with_seed_facts(json!({
        "default": {"delay_ms": 60},
        "execute": {
            "apply.production": {"delay_ms": 20000},
            "network": {"delay_ms": 20000},
            "cdn": {"delay_ms": 300, "fail": {"code": "edge_headers_wrong", "message": "cache-control missing immutable", "retryable": false}},
        }
    })));
    let _scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let run = env.enqueue(&event("shop", 3, EVERYTHING));

    let view = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(view.status, "rolled_back", "{view:#?}");
    assert!(
        view.rollback_reason.as_deref().unwrap().contains("cdn"),
        "{:?}",
        view.rollback_reason
    );
    // The failed upload and the cancelled rollout and network change may each
    // have done part of their work: their roles declare partial effects, so
    // they are compensated too, first (docs/decisions.md, "Partial work").
    assert_eq!(step(&view, "cdn").status, "compensated");
    assert_eq!(step(&view, "cdn").error.as_ref().unwrap().code, "edge_headers_wrong");
    for id in ["apply.production", "network"] {
        let s = step(&view, id);
        assert_eq!(s.status, "compensated", "{id} was in flight, cancelled, then undone");
        assert_eq!(s.attempts[0].error.as_ref().unwrap().code, "cancelled", "{id}");
    }
    assert_eq!(step(&view, "backup.post").status, "cancelled", "never started");

    // Exactly the succeeded steps that have a compensation, latest completion first.
    let mut succeeded: Vec<&StepView> = view
        .steps
        .iter()
        .filter(|s| s.completion.is_some() && s.compensate.is_some())
        .collect();
    succeeded.sort_by_key(|s| std::cmp::Reverse(s.completion));
    let expected: Vec<String> = succeeded.iter().map(|s| s.id.clone()).collect();
    let compensated: Vec<String> = env
        .exec_log()
        .into_iter()
        .filter(|l| l.run_id == run && l.kind == "compensate" && l.event == "start")
        .map(|l| l.step_id)
        .collect();
    let mut partial = compensated[..3].to_vec();
    partial.sort();
    assert_eq!(partial, ["apply.production", "cdn", "network"], "{compensated:?}");
    let compensated = compensated[3..].to_vec();
    assert_eq!(compensated, expected, "compensations in reverse completion order");
    assert_eq!(
        expected.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        BTreeSet::from([
            "db.staging",
            "db.production",
            "infra.staging",
            "infra.production",
            "verify.staging"
        ])
    );
    for id in &expected {
        assert_eq!(step(&view, id).status, "compensated", "{id}");
    }
    // Build, backup and the Terraform plans have nothing to undo and stay as they were.
    for id in ["build", "backup.pre", "infra.staging.plan", "infra.production.plan"] {
        assert_eq!(step(&view, id).status, "succeeded", "{id}");
    }
    // No compensation began before the cancelled steps had stopped.
    let first_comp = view
        .steps
        .iter()
        .filter_map(|s| s.compensation_started_at)
        .min()
        .unwrap();
    for id in ["apply.production", "network"] {
        assert!(
            step(&view, id).finished_at.unwrap() <= first_comp,
            "{id} stopped before compensation began"
        );
    }
    // Each compensation started after the one before it finished.
    for pair in expected.windows(2) {
        let (a, b) = (step(&view, &pair[0]), step(&view, &pair[1]));
        assert!(
            a.compensation_finished_at.unwrap() <= b.compensation_started_at.unwrap(),
            "{} before {}",
            a.id,
            b.id
        );
    }
}

/// The seed's post-deploy backup has `on_failure = "review"`: when it fails,
/// the deploy stays and the run ends `failed`, flagged for rollback review,
/// with nothing compensated; an operator's rollback then undoes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_post_deploy_backup_flags_the_run_for_rollback_review_instead_of_rolling_back() {
    let env = TestEnv::new("review").await;
    env.script(baton_tests::with_seed_facts(json!({
        "default": {"delay_ms": 10},
        "execute": {"backup.post": {"fail": {"code": "verification_failed", "message": "spot-check differs", "retryable": false}}}
    })));
    let _scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let run = env.enqueue(&event("review", 5, &["src/app.ts"]));
    let view = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(view.status, "failed", "{view:#?}");
    assert_eq!(step(&view, "backup.post").status, "failed");
    assert_eq!(step(&view, "apply.production").status, "succeeded", "the deploy stays");
    let flagged = view
        .history
        .iter()
        .find(|h| h.kind == "flagged_for_rollback_review")
        .expect("flagged in the history");
    assert_eq!(flagged.detail["steps"], json!(["backup.post"]));
    assert!(
        !env.exec_log().iter().any(|l| l.run_id == run && l.kind == "compensate"),
        "nothing was compensated"
    );
    let shown = env.baton(&["runs", "show", &run.to_string()]);
    assert_eq!(shown.status.code(), Some(1), "a flagged run exits 1");

    let out = env.baton(&["rollback", &run.to_string(), "--reason", "backup cannot be trusted"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let view = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(view.status, "rolled_back", "{view:#?}");
    assert_eq!(step(&view, "apply.production").status, "compensated");
    assert_eq!(step(&view, "backup.post").status, "failed", "nothing to undo there");
    env.assert_audit_verifies();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_compensation_ends_in_rollback_failed() {
    let env = TestEnv::new("comp-fails").await;
    env.script(baton_tests::with_seed_facts(json!({
        "default": {"delay_ms": 40},
        "execute": {"cdn": {"fail": {"code": "boom", "message": "upload rejected", "retryable": false}}},
        "compensate": {"infra.production": {"fail": {"code": "state_locked", "message": "state lock held", "retryable": true}}}
    })));
    env.set_scheduler_env("BATON_SCHEDULER__LEASE_MS", "2000");
    let _scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let run = env.enqueue(&event("shop", 4, EVERYTHING));

    let view = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(view.status, "rollback_failed", "{view:#?}");
    let infra = step(&view, "infra.production");
    assert_eq!(infra.status, "compensation_failed");
    let comp_attempts: Vec<_> = infra
        .attempts
        .iter()
        .filter(|a| a.kind == JobKind::Compensate)
        .collect();
    assert_eq!(
        comp_attempts.len(),
        3,
        "retryable compensation failures are retried up to max_attempts"
    );
    // It stops there: nothing older is compensated, and the run is not called rolled back.
    assert_eq!(step(&view, "verify.staging").status, "compensated");
    for id in ["infra.staging", "db.production", "db.staging"] {
        assert_eq!(
            step(&view, id).status,
            "succeeded",
            "{id} is not compensated after a failed compensation"
        );
        assert!(env.starts(run, id, "compensate").is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failure_is_retried_with_backoff_then_succeeds() {
    let env = TestEnv::new("retry").await;
    env.script(baton_tests::with_seed_facts(
        json!({"default": {"delay_ms": 30}, "execute": {"db.staging": {"fail_first": 2}}}),
    ));
    let _scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let run = env.enqueue(&event("shop", 5, &["drizzle/migrations/0002_x.sql"]));

    let view = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(view.status, "succeeded", "{view:#?}");
    let db = step(&view, "db.staging");
    let statuses: Vec<&str> = db.attempts.iter().map(|a| a.status.as_str()).collect();
    assert_eq!(statuses, ["failed", "failed", "succeeded"]);
    assert!(
        db.attempts[..2]
            .iter()
            .all(|a| a.error.as_ref().unwrap().code == "flaky")
    );
    // Backoff grows: the second wait is longer than the first (seed: 1 s, then 2 s).
    let gap = |i: usize| db.attempts[i + 1].dispatched_at - db.attempts[i].finished_at.unwrap();
    assert!(
        gap(0) >= chrono::Duration::milliseconds(900),
        "first backoff {:?}",
        gap(0)
    );
    assert!(
        gap(1) >= chrono::Duration::milliseconds(1900),
        "second backoff {:?}",
        gap(1)
    );
    let retries = view.history.iter().filter(|h| h.kind == "retry_scheduled").count();
    assert_eq!(retries, 2);
}

/// Closes a daemon's broker connection from the broker side, as a partition would.
fn close_connections_of(env: &TestEnv, label: &str) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-p", &env.vhost, "pid", "client_properties", "-q"])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout);
    let needle = format!("baton-daemon {label}\"");
    let pids: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(!pids.is_empty(), "no connection of {label} found in:\n{text}");
    for pid in pids {
        let ok = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "test partition"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "close_connection {pid}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_daemon_loses_its_lease_and_its_late_result_changes_nothing() {
    let env = TestEnv::new("lease").await;
    env.script(baton_tests::with_seed_facts(
        json!({"default": {"delay_ms": 30}, "execute": {"verify.staging": {"delay_ms": 5000}}}),
    ));
    let _scheduler = env.scheduler("scheduler").await;
    let others = seed_bindings_except("staging.staging-verify");
    let _rest = env.daemon("rest", &others).await;
    let first = env.daemon("verify-a", &["staging.staging-verify"]).await;
    let run = env.enqueue(&event("shop", 6, &["src/app.ts"]));

    env.wait_step(run, "verify.staging", "running", RUN_TIMEOUT).await;
    first.stop();
    close_connections_of(&env, "verify-a");
    let _second = env.daemon("verify-b", &["staging.staging-verify"]).await;
    env.wait_until(
        "attempt 2 of verify.staging to run on verify-b",
        RUN_TIMEOUT,
        async || {
            env.run(run).await.is_some_and(|v| {
                step(&v, "verify.staging")
                    .attempts
                    .iter()
                    .any(|a| a.attempt == 2 && a.daemon.as_deref() == Some("verify-b"))
            })
        },
    )
    .await;
    first.cont();

    let view = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(view.status, "succeeded");
    let verify = step(&view, "verify.staging");
    assert_eq!(verify.attempts[0].status, "lost");
    assert_eq!(verify.attempts[0].error.as_ref().unwrap().code, "lease_expired");
    assert_eq!(verify.attempts[1].status, "succeeded");
    assert_eq!(
        verify.outputs["done_by"], "verify.staging:2",
        "outputs come from the current attempt"
    );
    // The zombie wakes, abandons its work and reports; the report is recorded as stale.
    env.wait_until(
        "the stale attempt's late result to be recorded",
        RUN_TIMEOUT,
        async || {
            env.run(run).await.is_some_and(|v| {
                v.history.iter().any(|h| {
                    h.kind == "stale_result"
                        && h.step_id.as_deref() == Some("verify.staging")
                        && h.attempt == Some(1)
                        && h.detail["status"] == "failed"
                })
            })
        },
    )
    .await;
    let after = env.run(run).await.unwrap();
    assert_eq!(after.status, "succeeded");
    assert_eq!(step(&after, "verify.staging").attempts.len(), 2, "no third attempt");
    // Its side effect is refused too: woken past its lease, the daemon abandons the
    // work instead of finishing it behind attempt 2 (the role never ran to its end).
    let zombie_ended: Vec<_> = env
        .exec_log()
        .into_iter()
        .filter(|l| l.event == "end" && l.step_id == "verify.staging" && l.attempt == 1)
        .collect();
    assert!(
        zombie_ended.is_empty(),
        "the stale attempt finished its work: {zombie_ended:?}"
    );
    let stale = after
        .history
        .iter()
        .find(|h| h.kind == "stale_result" && h.attempt == Some(1) && h.detail["status"] == "failed")
        .unwrap();
    assert!(stale.detail["message_id"].is_string(), "{stale:?}");
    assert_eq!(step(&after, "verify.staging").outputs["done_by"], "verify.staging:2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_killed_mid_run_finishes_without_executing_a_step_twice() {
    let env = TestEnv::new("kill-scheduler").await;
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 400}})));
    let mut scheduler = env.scheduler("scheduler-1").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let run = env.enqueue(&event("shop", 7, EVERYTHING));

    env.wait_step(run, "db.production", "running", RUN_TIMEOUT).await;
    scheduler.kill();
    // The daemon finishes while no scheduler listens: its result waits in the queue.
    env.wait_until("db.production to finish on the daemon", RUN_TIMEOUT, async || {
        env.exec_log()
            .iter()
            .any(|l| l.run_id == run && l.step_id == "db.production" && l.event == "end")
    })
    .await;
    let _scheduler = env.scheduler("scheduler-2").await;

    let view = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(view.status, "succeeded", "{view:#?}");
    assert_needs_respected(&view);
    executed_once(&env, run, &view);
    assert!(
        view.steps.iter().all(|s| s.attempts.len() == 1),
        "no step needed a second attempt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_merge_event_waits_for_the_environment_and_a_duplicate_is_one_run() {
    let env = TestEnv::new("fifo").await;
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 80}})));
    let _scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let first = env.enqueue(&event("fifo", 8, &["src/app.ts"]));
    let second = env.enqueue(&event("fifo", 9, &["src/app.ts"]));
    let again = env.enqueue(&event("fifo", 8, &["src/app.ts"]));
    assert_eq!(first, again, "the same merge event names the same run");
    assert_ne!(first, second);

    let a = env.wait_terminal(first, RUN_TIMEOUT).await;
    let b = env.wait_terminal(second, RUN_TIMEOUT).await;
    assert_eq!((a.status.as_str(), b.status.as_str()), ("succeeded", "succeeded"));
    assert!(
        b.started_at.unwrap() >= a.finished_at.unwrap(),
        "second run started {:?} before the first ended {:?}",
        b.started_at,
        a.finished_at
    );
    let runs: i64 = sqlx::query_scalar("select count(*) from runs where service = 'fifo'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(runs, 2, "the duplicate event did not create a run");
    env.wait_audited(first, "duplicate_merge_event").await;
    executed_once(&env, first, &a);
}

/// A run that targets production deploys to staging first, so a run of the
/// same service that targets staging waits for it: one run per service is in
/// progress, whatever environment it targets. Other services are not held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_s_runs_take_turns_whatever_environment_they_target() {
    let env = TestEnv::new("per-service").await;
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 10}})));
    // No daemon yet: the production run holds the service while the rest arrive.
    let _broker = seed_job_queues(&env).await;
    let _scheduler = env.scheduler("scheduler").await;
    let production = env.enqueue(&event("turns", 1, &["src/app.ts"]));
    env.wait_run_status(production, "running", RUN_TIMEOUT).await;
    let on_staging = |service: &str, n: u8| {
        let mut e = event(service, n, &["src/app.ts"]);
        e["environment"] = "staging".into();
        e
    };
    let staging = env.enqueue(&on_staging("turns", 2));
    let other = env.enqueue(&on_staging("other", 3));
    // Merge events are ingested in publish order: once the other service's
    // run is admitted, the staging run has been queued.
    env.wait_run_status(other, "running", RUN_TIMEOUT).await;
    assert_eq!(
        env.run(staging).await.unwrap().status,
        "queued",
        "a staging run waits while the service's production run deploys"
    );
    let locks = baton_scheduler::store::list_locks(&env.pool).await.unwrap();
    let turns: Vec<_> = locks.iter().filter(|l| l.service == "turns").collect();
    assert_eq!(turns.len(), 1, "{locks:#?}");
    assert_eq!(
        (turns[0].environment.as_str(), turns[0].run_id, turns[0].waiting.clone()),
        ("production", production, vec![staging]),
        "the staging run is shown waiting behind the production run"
    );

    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let p = env.wait_terminal(production, RUN_TIMEOUT).await;
    let s = env.wait_terminal(staging, RUN_TIMEOUT).await;
    assert_eq!((p.status.as_str(), s.status.as_str()), ("succeeded", "succeeded"));
    assert!(
        s.started_at.unwrap() >= p.finished_at.unwrap(),
        "the staging run started {:?} before the production run ended {:?}",
        s.started_at,
        p.finished_at
    );
    let acquired = s.history.iter().find(|h| h.kind == "lock_acquired").unwrap();
    assert_eq!(acquired.detail, json!({"service": "turns", "environment": "staging"}));
    assert_eq!(env.wait_terminal(other, RUN_TIMEOUT).await.status, "succeeded");
    env.assert_audit_verifies();
}

/// `scheduler.queue_policy = "newest"`: each run queued behind a waiting one
/// ends that one `superseded` without starting it, and when the environment
/// frees, the newest deploys. Runs of other environments are not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_newest_policy_a_newer_merge_supersedes_the_waiting_run_and_deploys_next() {
    let env = TestEnv::new("newest").await;
    env.set_scheduler_env("BATON_SCHEDULER__QUEUE_POLICY", "newest");
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 10}})));
    // No daemon yet: the first run holds the environment while the rest arrive.
    let _broker = seed_job_queues(&env).await;
    let _scheduler = env.scheduler("scheduler").await;
    let first = env.enqueue(&event("newest", 1, &["src/app.ts"]));
    env.wait_run_status(first, "running", RUN_TIMEOUT).await;
    let other = env.enqueue(&event("newest", 2, &["src/app.ts"]));
    let mut staging = event("newest", 2, &["src/app.ts"]);
    staging["environment"] = "staging".into();
    let elsewhere = env.enqueue(&staging);
    let middle = env.enqueue(&event("newest", 3, &["src/app.ts"]));
    let newest = env.enqueue(&event("newest", 4, &["src/app.ts"]));
    for (run, by) in [(other, middle), (middle, newest)] {
        let view = env.wait_run_status(run, "superseded", RUN_TIMEOUT).await;
        let entry = view
            .history
            .iter()
            .find(|h| h.kind == "superseded")
            .expect("a superseded entry");
        assert_eq!(entry.detail["by"], json!(by), "{view:#?}");
        assert!(view.started_at.is_none() && view.finished_at.is_some(), "{view:#?}");
        let shown = env.baton(&["runs", "show", &run.to_string()]);
        assert_eq!(shown.status.code(), Some(1), "a superseded run exits 1");
    }
    assert_eq!(env.run(newest).await.unwrap().status, "queued");

    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let a = env.wait_terminal(first, RUN_TIMEOUT).await;
    let d = env.wait_terminal(newest, RUN_TIMEOUT).await;
    assert_eq!((a.status.as_str(), d.status.as_str()), ("succeeded", "succeeded"));
    assert!(
        d.started_at.unwrap() >= a.finished_at.unwrap(),
        "the newest waited for the first"
    );
    assert_eq!(env.wait_terminal(elsewhere, RUN_TIMEOUT).await.status, "succeeded");
    let ran: BTreeSet<Uuid> = env.exec_log().iter().map(|l| l.run_id).collect();
    assert!(
        !ran.contains(&other) && !ran.contains(&middle),
        "a superseded run executed nothing"
    );
    env.assert_audit_verifies();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_events_waiting_together_are_queued_in_arrival_order_per_environment() {
    let env = TestEnv::new("ingest-order").await;
    // Scripted facts: the seed pipeline's production gates read them.
    env.script(baton_tests::with_seed_facts(serde_json::json!({})));
    // Jobs wait in their queues: no daemon takes them, and runs stay running.
    let _broker = seed_job_queues(&env).await;
    // Everything is waiting in the queue when the scheduler starts, so it
    // ingests several events at once: one environment's six interleaved with
    // six others, one event each.
    let mut enqueued = Vec::new();
    for n in 1..=6u8 {
        enqueued.push(env.enqueue(&event("ordered", n, &["src/app.ts"])));
        env.enqueue(&event(&format!("other-{n}"), n, &["src/app.ts"]));
    }
    let _scheduler = env.scheduler("scheduler").await;
    env.wait_until("all twelve runs recorded", RUN_TIMEOUT, async || {
        let n: i64 = sqlx::query_scalar("select count(*) from runs")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        n == 12
    })
    .await;
    let queued: Vec<Uuid> = sqlx::query_scalar("select id from runs where service = 'ordered' order by seq")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(queued, enqueued, "one environment's runs are queued in arrival order");
    env.wait_until("every environment's first run admitted", RUN_TIMEOUT, async || {
        let running: Vec<String> =
            sqlx::query_scalar("select service from runs where status = 'running' order by service")
                .fetch_all(&env.pool)
                .await
                .unwrap();
        running.len() == 7
    })
    .await;
    let first = env.run(enqueued[0]).await.unwrap();
    assert_eq!(
        first.status, "running",
        "the first of the environment's runs is the one admitted"
    );
}

/// With two replicas, one replica takes every merge event (the queue has a
/// single active consumer), so one environment's runs are queued in the order
/// CI published them even while the other replica is frozen; when the first
/// dies, the other takes over. Spread over both, the frozen replica would hold
/// every other event, and they would be queued late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_queue_one_environment_s_merge_events_in_publish_order_and_one_takes_over() {
    let env = TestEnv::new("ingest-order-two").await;
    // Scripted facts: the seed pipeline's production gates read them.
    env.script(baton_tests::with_seed_facts(serde_json::json!({})));
    // No daemon: each environment's first run holds its lock, the rest wait.
    let _broker = seed_job_queues(&env).await;
    let (mut first, second) = env.two_schedulers("first", "second").await;
    second.stop();
    let events: Vec<_> = (1..=6u8)
        .flat_map(|n| {
            [
                event("ordered", n, &["src/app.ts"]),
                event(&format!("other-{n}"), n, &["src/app.ts"]),
            ]
        })
        .collect();
    let ids = env.enqueue_burst(&events).await;
    let mut published: Vec<Uuid> = ids.iter().step_by(2).copied().collect();
    let recorded = async |n: i64| {
        let count: i64 = sqlx::query_scalar("select count(*) from runs")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        count == n
    };
    env.wait_until(
        "all twelve runs recorded while the second replica is frozen",
        Duration::from_secs(30),
        async || recorded(12).await,
    )
    .await;
    second.cont();
    let queued = async || -> Vec<Uuid> {
        sqlx::query_scalar("select id from runs where service = 'ordered' order by seq")
            .fetch_all(&env.pool)
            .await
            .unwrap()
    };
    assert_eq!(queued().await, published, "runs queued in the order CI published them");

    // The replica that took the events dies; the other takes the next ones.
    first.kill();
    published.extend(
        env.enqueue_burst(&[
            event("ordered", 7, &["src/app.ts"]),
            event("ordered", 8, &["src/app.ts"]),
        ])
        .await,
    );
    env.wait_until(
        "the second replica to ingest the events published after the first died",
        RUN_TIMEOUT,
        async || recorded(14).await,
    )
    .await;
    assert_eq!(queued().await, published, "runs queued in the order CI published them");
}

/// A broker whose merge events queue an older Baton declared (without a
/// single active consumer) stops the scheduler at start with an error that
/// names the queue, the argument and what to do, and the queue keeps its events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_events_queue_declared_by_an_older_baton_stops_the_scheduler_with_a_clear_error() {
    let env = TestEnv::new("old-merge-queue").await;
    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    // Today's arguments less the single active consumer.
    let mut old = lapin::types::FieldTable::default();
    for (k, v) in topology::merge_events_args(topology::DEFAULT_DELIVERY_LIMIT).inner() {
        if k.as_str() != "x-single-active-consumer" {
            old.insert(k.clone(), v.clone());
        }
    }
    ch.queue_declare(
        topology::MERGE_EVENTS_QUEUE.into(),
        QueueDeclareOptions::durable(),
        old.clone(),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        topology::MERGE_EVENTS_QUEUE.into(),
        BasicPublishOptions::default(),
        b"{}",
        lapin::BasicProperties::default(),
    )
    .await
    .unwrap();
    let mut scheduler = env.spawn_scheduler("scheduler");
    env.wait_until("the scheduler to stop", RUN_TIMEOUT, async || !scheduler.is_running())
        .await;
    let log = env.log("scheduler");
    for needle in [
        "cannot declare the broker topology",
        "x-single-active-consumer",
        "baton.merge-events",
        "Upgrading",
    ] {
        assert!(log.contains(needle), "the error names {needle:?}:\n{log}");
    }
    let ch = conn.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let q = ch
        .queue_declare(topology::MERGE_EVENTS_QUEUE.into(), passive, old)
        .await
        .unwrap();
    assert_eq!(q.message_count(), 1, "the old queue keeps its event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_misrouted_and_expired_jobs_are_dead_lettered_and_nothing_executes() {
    let env = TestEnv::new("dead-letters").await;
    // Scripted facts: the seed pipeline's production gates read them.
    env.script(baton_tests::with_seed_facts(serde_json::json!({})));
    let (_conn, ch) = core_channel(&env).await;
    let _daemon = env.daemon("daemon", &["staging.db-migration"]).await;

    let signed = |mut j: StepJob| {
        env.scheduler_key.sign(&mut j);
        j.to_bytes()
    };
    let bodies: Vec<Vec<u8>> = vec![
        br#"{"v": 1, "garbage": true}"#.to_vec(),
        signed(step_job("production", "db-migration", 60)),
        signed(step_job("staging", "db-migration", -60)),
    ];
    for body in &bodies {
        ch.basic_publish(
            JOBS_EXCHANGE.into(),
            "staging.db-migration".into(),
            BasicPublishOptions::default(),
            body,
            Default::default(),
        )
        .await
        .unwrap();
    }
    // The daemon rejects each to the broker's dead-lettering (it may not
    // publish there itself) and says why in a signed notice.
    let (mut dead, mut reasons) = (Vec::new(), Vec::new());
    env.wait_until("three dead letters and three notices", RUN_TIMEOUT, async || {
        while let Some(msg) = ch
            .basic_get(DEAD_QUEUE.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let headers = msg.delivery.properties.headers().clone().unwrap_or_default();
            assert!(
                headers.inner().get(REASON_HEADER).is_none(),
                "no claim of the daemon's travels unsigned"
            );
            assert!(headers.inner().contains_key("x-death"), "dead-lettered by the broker");
            dead.push(msg.delivery.data);
        }
        while let Some(msg) = ch
            .basic_get(NOTICES_QUEUE.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let notice = Refusal::parse(&msg.delivery.data).unwrap();
            Trusted::parse(&[env.daemon_key.public()])
                .unwrap()
                .verify(&notice)
                .unwrap();
            let refused = notice.refused_bytes().expect("the notice carries the refused bytes");
            assert!(bodies.contains(&refused), "{notice:?}");
            reasons.push(notice.reason);
        }
        dead.len() >= 3 && reasons.len() >= 3
    })
    .await;
    reasons.sort();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("malformed step job") && r.contains("unknown field `garbage`")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("misrouted") && r.contains("production.db-migration")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.starts_with("expired")), "{reasons:?}");
    assert!(env.exec_log().is_empty(), "nothing executed: {:?}", env.exec_log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_share_one_database_without_double_dispatching() {
    let env = TestEnv::new("two-schedulers").await;
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 100}})));
    let _schedulers = env.two_schedulers("scheduler-a", "scheduler-b").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let runs: Vec<Uuid> = (10..14)
        .map(|i| env.enqueue(&event(&format!("svc{i}"), i, EVERYTHING)))
        .collect();
    for run in &runs {
        let view = env.wait_terminal(*run, RUN_TIMEOUT).await;
        assert_eq!(view.status, "succeeded");
        assert_needs_respected(&view);
        executed_once(&env, *run, &view);
        assert!(
            view.steps.iter().all(|s| s.attempts.len() == 1),
            "one dispatch per step"
        );
    }
    let jobs: i64 = sqlx::query_scalar("select count(*) from outbox where exchange = 'baton.jobs'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 4 * 13, "exactly one job per step and run");
    let actors: Vec<String> = sqlx::query_scalar("select distinct actor from audit where kind = 'dispatched'")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert!(!actors.is_empty());
}

// Result affinity (scheduler/src/affinity.rs): two replicas split the result
// shards, and each run's results are applied by the one that owns its shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_split_the_result_shards_and_each_run_s_results_reach_one_of_them() {
    let env = TestEnv::new("affinity").await;
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 20}})));
    let (mut a, _b) = env.two_schedulers("scheduler-a", "scheduler-b").await;
    // Both have seen each other and taken their half of the shards.
    env.wait_shards_shared("scheduler-a", 2).await;
    env.wait_shards_shared("scheduler-b", 2).await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let runs: Vec<Uuid> = (0..16)
        .map(|i| env.enqueue(&event(&format!("affine{i}"), 40 + i, &["src/app.ts"])))
        .collect();
    for run in &runs {
        let view = env.wait_terminal(*run, RUN_TIMEOUT).await;
        assert_eq!(view.status, "succeeded", "{}", env.diagnostics());
    }
    // Transitions made from results only: who applied each run's results.
    let appliers: Vec<(Uuid, Vec<String>)> = sqlx::query_as(
        "select run_id, array_agg(distinct actor order by actor) from audit
          where kind in ('attempt_started', 'step_succeeded') group by run_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(appliers.len(), runs.len());
    for (run, actors) in &appliers {
        assert_eq!(
            actors.len(),
            1,
            "run {run} (shard {}): results applied by {actors:?}",
            topology::result_shard(*run)
        );
    }
    // Both replicas did some of it (16 runs over 8 shards: all in one half has odds of 1 in 32,768).
    let used: BTreeSet<&str> = appliers.iter().map(|(_, a)| a[0].as_str()).collect();
    assert_eq!(used.len(), 2, "only {used:?} applied results");
    // The shards went where membership says: one owner per shard.
    let mut owners: std::collections::HashMap<u32, &str> = std::collections::HashMap::new();
    for (run, actors) in &appliers {
        let previous = owners.insert(topology::result_shard(*run), actors[0].as_str());
        assert!(
            previous.is_none_or(|p| p == actors[0]),
            "shard {} applied by two replicas",
            topology::result_shard(*run)
        );
    }
    // A clean stop hands the leaver's shards over: the other now owns them all,
    // and applies every result of the next runs.
    assert!(
        a.terminate(Duration::from_secs(20)),
        "scheduler-a exits 0 after SIGTERM"
    );
    env.wait_shards_shared("scheduler-b", 1).await;
    let later: Vec<Uuid> = (0..4)
        .map(|i| env.enqueue(&event(&format!("affine-later{i}"), 60 + i, &["src/app.ts"])))
        .collect();
    for run in &later {
        assert_eq!(env.wait_terminal(*run, RUN_TIMEOUT).await.status, "succeeded");
    }
    let actors: Vec<String> = sqlx::query_scalar(
        "select distinct actor from audit where run_id = any($1) and kind in ('attempt_started', 'step_succeeded')",
    )
    .bind(&later)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(actors, ["scheduler-b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_daemon_finish_its_step_or_hand_it_back() {
    let env = TestEnv::new("sigterm").await;
    env.script(baton_tests::with_seed_facts(
        json!({"default": {"delay_ms": 30}, "execute": {"verify.staging": {"delay_ms": 1500}}}),
    ));
    let _scheduler = env.scheduler("scheduler").await;
    let others = seed_bindings_except("staging.staging-verify");
    let _rest = env.daemon("rest", &others).await;

    // Within the grace period: the step finishes and the daemon exits cleanly.
    let mut a = env.daemon("verify-a", &["staging.staging-verify"]).await;
    let run = env.enqueue(&event("term", 20, &["src/app.ts"]));
    env.wait_step(run, "verify.staging", "running", RUN_TIMEOUT).await;
    assert!(a.terminate(Duration::from_secs(20)), "daemon exits 0 after SIGTERM");
    let view = env.run(run).await.unwrap();
    let verify = step(&view, "verify.staging");
    assert_eq!(verify.attempts.len(), 1);
    env.wait_step(run, "verify.staging", "succeeded", RUN_TIMEOUT).await;

    // Past the grace period: the job is handed back and retried elsewhere, without
    // using up one of the step's attempts.
    env.script(baton_tests::with_seed_facts(
        json!({"default": {"delay_ms": 30}, "execute": {"verify.staging": {"delay_ms": 30000}}}),
    ));
    let mut b = env
        .daemon_with(
            "verify-b",
            &["staging.staging-verify"],
            &[("BATON_DAEMON__SHUTDOWN_GRACE_SECS", "1")],
        )
        .await;
    let run2 = env.enqueue(&event("term", 21, &["src/app.ts"]));
    env.wait_step(run2, "verify.staging", "running", RUN_TIMEOUT).await;
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 30}})));
    assert!(
        b.terminate(Duration::from_secs(20)),
        "daemon exits 0 after handing back"
    );
    let _c = env.daemon("verify-c", &["staging.staging-verify"]).await;
    let view = env.wait_terminal(run2, RUN_TIMEOUT).await;
    assert_eq!(view.status, "succeeded", "{view:#?}");
    let verify = step(&view, "verify.staging");
    assert_eq!(verify.attempts[0].error.as_ref().unwrap().code, "daemon_shutdown");
    assert_eq!(verify.attempts.last().unwrap().daemon.as_deref(), Some("verify-c"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_can_roll_back_a_finished_run() {
    let env = TestEnv::new("rollback").await;
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 30}})));
    let _scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let run = env.enqueue(&event("rb", 30, &["src/app.ts"]));
    assert_eq!(env.wait_terminal(run, RUN_TIMEOUT).await.status, "succeeded");

    let out = env.baton(&["rollback", &run.to_string(), "--reason", "error rate up"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let view = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(view.status, "rolled_back", "{view:#?}");
    let compensated: Vec<String> = env
        .exec_log()
        .into_iter()
        .filter(|l| l.run_id == run && l.kind == "compensate" && l.event == "start")
        .map(|l| l.step_id)
        .collect();
    assert_eq!(compensated, ["apply.production", "verify.staging"]);

    let shown = env.baton(&["runs", "show", &run.to_string(), "--json"]);
    assert_eq!(shown.status.code(), Some(1), "a rolled-back run exits 1");
    let json: RunView = serde_json::from_slice(&shown.stdout).expect("runs show --json parses");
    assert_eq!(json.status, "rolled_back");
    // Through the API, so the rollback names the token that asked for it.
    assert_eq!(
        json.rollback_reason.as_deref(),
        Some("operator requested rollback: error rate up (by baton-tests)")
    );
    let again = env.baton(&["rollback", &run.to_string()]);
    assert_eq!(
        again.status.code(),
        Some(2),
        "a rolled-back run cannot be rolled back again"
    );
    let missing = env.baton(&["runs", "show", &Uuid::new_v4().to_string()]);
    assert_eq!(missing.status.code(), Some(2));
}

/// The core topology and the seed pipeline's job queues, declared with no
/// daemon consuming: jobs wait there, and runs stay where they are.
async fn seed_job_queues(env: &TestEnv) -> (lapin::Connection, lapin::Channel) {
    let (conn, ch) = core_channel(env).await;
    for binding in SEED_BINDINGS {
        let (zone, role) = binding.split_once('.').unwrap();
        topology::declare_job_queue(&ch, zone, role, topology::DEFAULT_DELIVERY_LIMIT)
            .await
            .unwrap();
    }
    (conn, ch)
}

/// A channel of a new connection, with the core topology declared.
async fn core_channel(env: &TestEnv) -> (lapin::Connection, lapin::Channel) {
    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    topology::declare_core(&ch, topology::DEFAULT_DELIVERY_LIMIT)
        .await
        .unwrap();
    (conn, ch)
}

/// A staging db-migration job of a new run, signed by the scheduler.
fn signed_staging_job(env: &TestEnv) -> StepJob {
    let mut job = step_job("staging", "db-migration", 60);
    env.scheduler_key.sign(&mut job);
    job
}

/// How many times the test daemon logged `event` for `run`.
fn exec_events(env: &TestEnv, run: Uuid, event: &str) -> usize {
    env.exec_log()
        .iter()
        .filter(|l| l.run_id == run && l.event == event)
        .count()
}

/// A probe queue of this connection bound to the result shards of `jobs`'
/// runs; each job is then published to its zone and role.
async fn probe_and_publish(ch: &lapin::Channel, jobs: &[&StepJob]) -> String {
    let probe = probe_queue(ch).await;
    for j in jobs {
        bind_probe(ch, &probe, j.run_id).await;
    }
    publish_jobs(ch, jobs).await;
    probe
}

/// An exclusive queue of this connection, bound to nothing yet.
async fn probe_queue(ch: &lapin::Channel) -> String {
    let probe = format!("probe-{}", Uuid::new_v4());
    ch.queue_declare(
        probe.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap();
    probe
}

/// Binds `queue` to the result shard of `run`.
async fn bind_probe(ch: &lapin::Channel, queue: &str, run: Uuid) {
    ch.queue_bind(
        queue.into(),
        topology::RESULTS_EXCHANGE.into(),
        topology::result_key(run).as_str().into(),
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap();
}

/// Publishes each job to its zone and role.
async fn publish_jobs(ch: &lapin::Channel, jobs: &[&StepJob]) {
    for j in jobs {
        ch.basic_publish(
            JOBS_EXCHANGE.into(),
            format!("{}.{}", j.zone, j.role).as_str().into(),
            BasicPublishOptions::default(),
            &j.to_bytes(),
            Default::default(),
        )
        .await
        .unwrap();
    }
}

/// Messages ready in a zone's db-migration job queue.
async fn ready_jobs(ch: &lapin::Channel, zone: &str) -> u32 {
    ch.queue_declare(
        topology::job_queue(zone, "db-migration").as_str().into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap()
    .message_count()
}

/// The results a probe queue bound to the runs' result shards received, as
/// `(run, status)` in arrival order, heartbeats left out, until `done` says so.
async fn probe_results(
    env: &TestEnv,
    ch: &lapin::Channel,
    queue: &str,
    done: impl Fn(&[(Uuid, StepResult)]) -> bool,
) -> Vec<(Uuid, StepResult)> {
    let mut seen = Vec::new();
    env.wait_until("the jobs' outcomes", RUN_TIMEOUT, async || {
        while let Some(msg) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let r = StepResult::parse(&msg.delivery.data).expect("a step result");
            if r.status != ResultStatus::Heartbeat {
                seen.push((r.run_id, r));
            }
        }
        done(&seen)
    })
    .await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_job_reports_only_its_outcome_and_a_slow_one_reports_started_first() {
    let env = TestEnv::new("started-report").await;
    env.script(baton_tests::with_seed_facts(
        json!({"default": {"delay_ms": 0}, "execute": {"slow": {"delay_ms": 500}}}),
    ));
    let (_conn, ch) = core_channel(&env).await;
    // The default (10 ms) in staging; `started` always first in production.
    let quiet_daemon = env.daemon("daemon-quiet", &["staging.db-migration"]).await;
    let eager_daemon = env
        .daemon_with(
            "daemon-eager",
            &["production.db-migration"],
            &[("BATON_DAEMON__REPORT_STARTED_AFTER_MS", "0")],
        )
        .await;

    let job = |zone: &str, step: &str| {
        let mut j = step_job(zone, "db-migration", 60);
        j.step_id = step.into();
        env.scheduler_key.sign(&mut j);
        j
    };
    let quick = job("staging", "quick");
    let slow = job("staging", "slow");
    let eager = job("production", "quick");
    let probe = probe_and_publish(&ch, &[&quick, &slow, &eager]).await;
    let runs = [quick.run_id, slow.run_id, eager.run_id];
    let seen = probe_results(&env, &ch, &probe, |seen| {
        runs.iter().all(|run| {
            seen.iter()
                .any(|(r, m)| r == run && m.status == ResultStatus::Succeeded)
        })
    })
    .await;
    let statuses =
        |run: Uuid| -> Vec<ResultStatus> { seen.iter().filter(|(r, _)| *r == run).map(|(_, m)| m.status).collect() };
    // Whether the quick job sends `started` depends on whether it was done within
    // the quiet start (10 ms) by the daemon's own clock, which a loaded machine can
    // stretch: the outcome's `started_at` and `at` say which case this was.
    let quick_outcome = &seen
        .iter()
        .find(|(r, m)| *r == quick.run_id && m.status == ResultStatus::Succeeded)
        .unwrap()
        .1;
    let took = quick_outcome.at - quick_outcome.started_at.expect("the outcome carries started_at");
    if took < chrono::Duration::milliseconds(10) {
        assert_eq!(
            statuses(quick.run_id),
            [ResultStatus::Succeeded],
            "a job done within the quiet start ({took}) sends its outcome alone"
        );
    } else {
        assert_eq!(statuses(quick.run_id).last(), Some(&ResultStatus::Succeeded));
    }
    assert_eq!(
        statuses(slow.run_id),
        [ResultStatus::Started, ResultStatus::Succeeded],
        "a longer job says it started"
    );
    assert_eq!(
        statuses(eager.run_id),
        [ResultStatus::Started, ResultStatus::Succeeded],
        "with report_started_after_ms = 0, every job says it started"
    );
    // The lone outcome still tells the scheduler when the work began.
    let outcome = &seen.iter().find(|(r, _)| *r == quick.run_id).unwrap().1;
    let began = outcome.started_at.expect("the outcome carries started_at");
    assert!(
        began <= outcome.at,
        "started {began} after the outcome at {}",
        outcome.at
    );
    // Every job was acknowledged: after the daemons stop, nothing is back in
    // their queues (an unacknowledged delivery would be).
    for mut d in [quiet_daemon, eager_daemon] {
        assert!(d.terminate(Duration::from_secs(30)), "the daemon stops on SIGTERM");
    }
    for zone in ["staging", "production"] {
        assert_eq!(ready_jobs(&ch, zone).await, 0, "{zone}'s job queue is empty");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_quick_job_finishes_it_without_giving_it_back_to_the_broker() {
    let env = TestEnv::new("quiet-sigterm").await;
    // 300 ms of work inside a 1,000 ms quiet start: the job's delivery is
    // unacknowledged while it runs.
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 300}})));
    let (_conn, ch) = core_channel(&env).await;
    let mut daemon = env
        .daemon_with(
            "daemon",
            &["staging.db-migration"],
            &[("BATON_DAEMON__REPORT_STARTED_AFTER_MS", "1000")],
        )
        .await;
    let job = signed_staging_job(&env);
    let probe = probe_and_publish(&ch, &[&job]).await;
    env.wait_until("the job to start", RUN_TIMEOUT, async || {
        exec_events(&env, job.run_id, "start") > 0
    })
    .await;
    assert!(daemon.terminate(Duration::from_secs(30)), "the daemon stops on SIGTERM");

    let seen = probe_results(&env, &ch, &probe, |seen| {
        seen.iter().any(|(_, m)| m.status == ResultStatus::Succeeded)
    })
    .await;
    let statuses: Vec<ResultStatus> = seen.iter().map(|(_, m)| m.status).collect();
    assert_eq!(statuses, [ResultStatus::Succeeded], "finished within the grace period");
    // Its channel stayed open until it was settled: nothing went back to the queue.
    assert_eq!(
        ready_jobs(&ch, "staging").await,
        0,
        "the finished job was given back to the broker"
    );
    assert_eq!(exec_events(&env, job.run_id, "start"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_quiet_start_that_cannot_report_started_is_stopped_and_handed_back() {
    let env = TestEnv::new("started-unsent").await;
    // 400 ms of work, well past the 10 ms quiet start: the daemon must say
    // `started` before the work may finish.
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 400}})));
    let (_conn, ch) = core_channel(&env).await;
    // A delivery limit high enough that the job keeps coming back while the
    // broker cannot route its results.
    let mut daemon = env
        .daemon_with(
            "daemon",
            &["staging.db-migration"],
            &[("BATON_AMQP__DELIVERY_LIMIT", "1000")],
        )
        .await;
    let job = signed_staging_job(&env);
    // Nothing receives this run's results: `started` comes back unroutable.
    let shard = topology::result_shard(job.run_id);
    ch.queue_unbind(
        topology::result_shard_queue(shard).as_str().into(),
        topology::RESULTS_EXCHANGE.into(),
        topology::result_key(job.run_id).as_str().into(),
        Default::default(),
    )
    .await
    .unwrap();
    let probe = probe_queue(&ch).await;
    publish_jobs(&ch, &[&job]).await;
    let events = |event: &str| exec_events(&env, job.run_id, event);
    env.wait_until("the job to be started three times", RUN_TIMEOUT, async || {
        events("start") >= 3
    })
    .await;
    assert_eq!(
        events("end"),
        0,
        "work whose start could not be reported was finished anyway"
    );

    // Once results are routed again, the next delivery reports `started`
    // and finishes the same attempt.
    bind_probe(&ch, &probe, job.run_id).await;
    let seen = probe_results(&env, &ch, &probe, |seen| {
        seen.iter().any(|(_, m)| m.status == ResultStatus::Succeeded)
    })
    .await;
    let statuses: Vec<ResultStatus> = seen.iter().map(|(_, m)| m.status).collect();
    assert_eq!(statuses, [ResultStatus::Started, ResultStatus::Succeeded]);
    assert!(seen.iter().all(|(_, m)| m.attempt == job.attempt), "{seen:?}");
    assert_eq!(events("end"), 1, "the work finished once");
    assert!(daemon.terminate(Duration::from_secs(30)), "the daemon stops on SIGTERM");
    assert_eq!(ready_jobs(&ch, "staging").await, 0, "the finished job is settled");
}
