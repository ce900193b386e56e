//! DESIGN §13 invariant 3: a duplicate or stale message changes nothing, and
//! is audited. (Part of the fault-injection work; more scenarios to come.)

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
    env.script(json!({"default": {"delay_ms": 20}, "execute": {"build": {"fail_first": 1}}}));
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
    assert_eq!(env.baton(&["audit", "verify"]).status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_step_loses_its_lease_and_another_daemon_finishes_the_step() {
    let env = TestEnv::new("kill-daemon").await;
    env.script(json!({"default": {"delay_ms": 20}, "execute": {"verify.staging": {"delay_ms": 3000}}}));
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
