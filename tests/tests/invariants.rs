//! docs/architecture.md, Invariants ("Exactly-once transitions"): a duplicate or stale message changes nothing, and
//! is audited.

use std::time::Duration;

use baton_shared::protocol::{JobKind, Message, PROTOCOL_VERSION, ResultStatus, StepResult};
use baton_shared::topology::{RESULTS_EXCHANGE, RESULTS_KEY};
use baton_tests::{SEED_BINDINGS, TestEnv, event, seed_bindings_except};
use chrono::Utc;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use serde_json::json;
use uuid::Uuid;

const RUN_TIMEOUT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_out_of_order_and_unknown_run_results_change_nothing_and_are_audited() {
    let env = TestEnv::new("dup-results").await;
    env.script(baton_tests::with_seed_facts(
        json!({"default": {"delay_ms": 20}, "execute": {"build": {"fail_first": 1}}}),
    ));
    let _scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let run = env.enqueue(&event("dups", 90, &["src/app.ts"]));
    let before = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(before.status, "succeeded");
    let build = before.step("build").unwrap();
    assert_eq!(build.attempts.len(), 2, "build failed once and was retried");

    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let result = |run_id: Uuid, attempt: u32, status: ResultStatus, message_id: Uuid| {
        let mut r = StepResult {
            v: PROTOCOL_VERSION,
            message_id,
            run_id,
            step_id: "build".into(),
            attempt,
            kind: JobKind::Execute,
            zone: "ci".into(),
            role: "container-build".into(),
            daemon: "daemon".into(),
            status,
            at: Utc::now(),
            outputs: Default::default(),
            error: None,
            started_at: None,
            signature: None,
        };
        if status == ResultStatus::Failed {
            r.error = Some(baton_shared::protocol::StepError::fatal("late", "late failure"));
        }
        env.daemon_key.sign(&mut r);
        r
    };
    let applied: Uuid = sqlx::query_scalar(
        "select message_id from inbox where run_id = $1 and step_id = 'build' and status = 'succeeded'",
    )
    .bind(run)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let messages = [
        // The very message already applied, delivered again.
        result(run, 2, ResultStatus::Succeeded, applied),
        // An outcome of the old, failed attempt arriving late and out of order.
        result(run, 1, ResultStatus::Succeeded, Uuid::new_v4()),
        // A failure for the current attempt after it succeeded.
        result(run, 2, ResultStatus::Failed, Uuid::new_v4()),
        // A result for a run nobody knows.
        result(Uuid::new_v4(), 1, ResultStatus::Succeeded, Uuid::new_v4()),
    ];
    for m in &messages {
        ch.basic_publish(
            RESULTS_EXCHANGE.into(),
            RESULTS_KEY.into(),
            BasicPublishOptions::default(),
            &m.to_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    env.wait_until("all four to be audited", RUN_TIMEOUT, async || {
        let kinds: Vec<String> = sqlx::query_scalar(
            "select kind from audit where kind in ('duplicate_result', 'stale_result', 'result_for_unknown_run')",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap();
        kinds.iter().filter(|k| *k == "duplicate_result").count() >= 1
            && kinds.iter().filter(|k| *k == "stale_result").count() >= 2
            && kinds.iter().any(|k| k == "result_for_unknown_run")
    })
    .await;
    let after = env.run(run).await.unwrap();
    assert_eq!(after.status, "succeeded");
    let strip = |v: &baton_scheduler::store::RunView| {
        v.steps
            .iter()
            .map(|s| (s.id.clone(), s.status.clone(), s.attempts.len(), s.outputs.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&after), strip(&before), "no step changed");
    env.assert_audit_verifies();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_step_loses_its_lease_and_another_daemon_finishes_the_step() {
    let env = TestEnv::new("kill-daemon").await;
    env.script(baton_tests::with_seed_facts(
        json!({"default": {"delay_ms": 20}, "execute": {"verify.staging": {"delay_ms": 3000}}}),
    ));
    let _scheduler = env.scheduler("scheduler").await;
    let others = seed_bindings_except("staging.staging-verify");
    let _rest = env.daemon("rest", &others).await;
    let mut victim = env.daemon("victim", &["staging.staging-verify"]).await;
    let run = env.enqueue(&event("killed", 91, &["src/app.ts"]));
    env.wait_step(run, "verify.staging", "running", RUN_TIMEOUT).await;
    victim.kill();
    let _heir = env.daemon("heir", &["staging.staging-verify"]).await;

    let view = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(view.status, "succeeded", "{view:#?}");
    let verify = view.step("verify.staging").unwrap();
    assert_eq!(verify.attempts.len(), 2, "{verify:#?}");
    assert_eq!(verify.attempts[0].status, "lost");
    assert_eq!(verify.attempts[0].daemon.as_deref(), Some("victim"));
    assert_eq!(verify.attempts[1].daemon.as_deref(), Some("heir"));
    // The killed attempt never finished; only the new attempt completed its work.
    let ends: Vec<u32> = env
        .exec_log()
        .iter()
        .filter(|l| l.run_id == run && l.step_id == "verify.staging" && l.event == "end")
        .map(|l| l.attempt)
        .collect();
    assert_eq!(ends, [2]);
}

/// A scheduler and a daemon running one seed-pipeline run, returned once its
/// build step is running; build takes 1.5 s and sends no heartbeat, so its
/// outcome is the run's next result.
async fn build_running_for_a_while(name: &str, commit: u8) -> (TestEnv, Vec<baton_tests::Proc>, Uuid) {
    let env = TestEnv::new(name).await;
    env.script(baton_tests::with_seed_facts(
        json!({"execute": {"build": {"delay_ms": 1500}}}),
    ));
    env.set_scheduler_env("BATON_SCHEDULER__HEARTBEAT_MS", "5000");
    env.set_scheduler_env("BATON_SCHEDULER__LEASE_MS", "30000");
    let procs = vec![
        env.scheduler("scheduler").await,
        env.daemon("daemon", SEED_BINDINGS).await,
    ];
    let run = env.enqueue(&event(name, commit, &["src/app.ts"]));
    env.wait_until("build to be running", RUN_TIMEOUT, async || {
        env.run(run)
            .await
            .and_then(|v| v.step("build").map(|s| s.status == "running"))
            .unwrap_or(false)
    })
    .await;
    (env, procs, run)
}

/// A result is applied from an unlocked read and written only if the run did not
/// change in between (store.rs, optimistic apply). Here something else holds
/// the run's row while the scheduler applies build's outcome, and once the
/// scheduler's write waits for the row, appends an entry to the run's audit
/// chain (bumping the run's version, as every change does) and commits. The scheduler must not write what it
/// computed before (its audit rows would link onto a stale head and fork the
/// chain); it applies the results again under the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_applied_from_a_stale_read_is_applied_again_after_a_concurrent_change() {
    let (env, _procs, run) = build_running_for_a_while("stale-read", 91).await;

    // Hold the run's row: build's outcome is read without it, and its write waits.
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("select id from runs where id = $1 for update")
        .bind(run)
        .execute(&mut *tx)
        .await
        .unwrap();
    env.wait_until(
        "the scheduler's write of build's outcome to wait for the run's row",
        RUN_TIMEOUT,
        async || {
            let waiting: i64 = sqlx::query_scalar(
                "select count(*) from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'",
            )
            .fetch_one(&env.pool)
            .await
            .unwrap();
            waiting > 0
        },
    )
    .await;
    // Now change the run under it.
    sqlx::query("update runs set version = version + 1 where id = $1")
        .bind(run)
        .execute(&mut *tx)
        .await
        .unwrap();
    let head: String = sqlx::query_scalar("select hash from audit where run_id = $1 order by id desc limit 1")
        .bind(run)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let detail = json!({"note": "a concurrent change"});
    let at = chrono::DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
    let entry = baton_scheduler::audit::Entry {
        run_id: Some(run),
        step_id: None,
        attempt: None,
        at,
        actor: "test",
        kind: "concurrent_change",
        detail: &detail,
    };
    let hash = baton_scheduler::audit::chain_hash(&head, &entry);
    sqlx::query(
        "insert into audit (run_id, step_id, attempt, at, actor, kind, detail, prev_hash, hash)
         values ($1, null, null, $2, 'test', 'concurrent_change', $3, $4, $5)",
    )
    .bind(run)
    .bind(at)
    .bind(sqlx::types::Json(&detail))
    .bind(&head)
    .bind(&hash)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let done = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(done.status, "succeeded");
    assert_eq!(done.step("build").unwrap().attempts.len(), 1, "build ran once");
    let after: i64 = sqlx::query_scalar("select count(*) from audit where run_id = $1 and prev_hash = $2")
        .bind(run)
        .bind(&hash)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        after, 1,
        "the scheduler's next audit row links onto the concurrent entry"
    );
    env.assert_audit_verifies();
}

/// The scheduler keeps a run as it last wrote it, with the gates' facts it read
/// then, so the run's next result needs no read. An incident opened meanwhile
/// (here by hand, in SQL) must still hold the next step: the write notices the
/// facts changed and the transition is computed again from what they are now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incident_opened_while_a_run_is_kept_in_memory_holds_its_next_step() {
    let (env, _procs, run) = build_running_for_a_while("kept-facts", 92).await;
    let staging: Vec<String> = env
        .run(run)
        .await
        .unwrap()
        .steps
        .iter()
        .filter(|s| s.zone == "staging" && s.included)
        .map(|s| s.id.clone())
        .collect();
    assert!(!staging.is_empty(), "the plan has staging steps");

    sqlx::query(
        "insert into incidents (id, environment, title, source, opened_by)
         values ($1, 'staging', 'staging is on fire', 'test', 'test')",
    )
    .bind(Uuid::new_v4())
    .execute(&env.pool)
    .await
    .unwrap();

    env.wait_until("the run to be held by the incident", RUN_TIMEOUT, async || {
        env.run(run).await.is_some_and(|v| {
            v.steps
                .iter()
                .any(|s| s.hold.as_ref().is_some_and(|h| h.gate == "incident"))
        })
    })
    .await;
    let v = env.run(run).await.unwrap();
    assert_eq!(v.step("build").unwrap().status, "succeeded");
    for id in &staging {
        let s = v.step(id).unwrap();
        assert!(
            s.attempts.is_empty(),
            "staging step {id} was dispatched despite the open incident: {:?}",
            s.attempts
        );
    }
}
