//! Metrics of the scheduler and a daemon, scraped over HTTP while a run progresses.

use std::time::Duration;

use baton_tests::{SEED_BINDINGS, TestEnv, event, free_port, metric_sample as sample};
use serde_json::json;

const RUN_TIMEOUT: Duration = Duration::from_secs(90);

async fn scrape(url: &str) -> String {
    let r = reqwest::get(url).await.unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_a_run_progresses() {
    let env = TestEnv::new("metrics").await;
    env.script(baton_tests::with_seed_facts(
        json!({"default": {"delay_ms": 20}, "execute": {"build": {"fail_first": 1}}}),
    ));
    let scheduler = env.scheduler("scheduler").await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _daemon = env
        .daemon_with("daemon", SEED_BINDINGS, &[("BATON_DAEMON__HTTP_LISTEN", &listen)])
        .await;
    let sched = format!("{}/metrics", scheduler.api.clone().unwrap());
    let daemon = format!("http://{listen}/metrics");

    let before = scrape(&sched).await;
    assert_eq!(sample(&before, "baton_runs{status=\"succeeded\"}"), None);
    assert_eq!(
        sample(&before, "baton_queue_depth{queue=\"baton.results\"}"),
        Some(0.0),
        "{before}"
    );

    let run = env.enqueue(&event("metered", 70, &["src/app.ts"]));
    assert_eq!(env.wait_terminal(run, RUN_TIMEOUT).await.status, "succeeded");
    let after = scrape(&sched).await;
    assert_eq!(sample(&after, "baton_runs{status=\"succeeded\"}"), Some(1.0), "{after}");
    // The only replica owns every result shard, and each shard's depth is reported.
    assert_eq!(
        sample(&after, "baton_scheduler_result_shards_owned"),
        Some(f64::from(baton_shared::topology::RESULT_SHARDS)),
        "{after}"
    );
    assert_eq!(
        sample(&after, "baton_queue_depth{queue=\"baton.results.0\"}"),
        Some(0.0),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            "baton_steps{role=\"container-build\",zone=\"ci\",status=\"succeeded\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &after,
            "baton_steps{role=\"cdn\",zone=\"production\",status=\"skipped\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&after, "baton_retries_total"),
        Some(1.0),
        "build failed once and was retried"
    );
    assert_eq!(
        sample(
            &after,
            "baton_step_duration_seconds_count{role=\"backup\",zone=\"production\"}"
        ),
        Some(2.0),
        "backup.pre and backup.post"
    );
    assert_eq!(sample(&after, "baton_outbox_unsent"), Some(0.0));
    assert!(sample(&after, "baton_queue_depth{queue=\"baton.ci.container-build\"}").is_some());

    let d = scrape(&daemon).await;
    let jobs = |outcome: &str| {
        sample(
            &d,
            &format!(
                "baton_daemon_jobs_total{{zone=\"ci\",role=\"container-build\",kind=\"execute\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(jobs("succeeded"), Some(1.0), "{d}");
    assert_eq!(jobs("failed"), Some(1.0), "{d}");
    assert!(d.contains("baton_daemon_job_duration_seconds_bucket"), "{d}");
    let ready = reqwest::get(format!("http://{listen}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
}

/// Many runs at once: their transitions share write statements (the counters
/// say so), results are computed from runs kept in memory, and still every
/// step runs exactly once, every run succeeds and every audit chain verifies.
///
/// Writes are combined only when they come while a statement is in flight.
/// Whether that happens by itself depends on the machine's speed, so the test
/// makes it happen: it holds a lock every write statement waits for (inserts
/// into the audit table) until writes queue up behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_runs_at_once_share_write_statements_and_run_each_step_once() {
    let env = TestEnv::new("combined").await;
    // Scripted facts: the seed pipeline's production gates read them.
    env.script(baton_tests::with_seed_facts(serde_json::json!({})));
    let scheduler = env.scheduler("scheduler").await;
    let sched = format!("{}/metrics", scheduler.api.clone().unwrap());
    // A daemon declares the job queues and leaves: the runs' first jobs wait
    // in them until the next daemon comes.
    let mut first = env.daemon("first-daemon", SEED_BINDINGS).await;
    assert!(
        first.terminate(Duration::from_secs(10)),
        "the first daemon did not stop"
    );
    let events: Vec<_> = (0..30)
        .map(|i| event(&format!("combined-{i}"), 93, &["src/app.ts"]))
        .collect();
    let runs = env.enqueue_burst(&events).await;
    env.wait_until("every run to dispatch its first step", RUN_TIMEOUT, async || {
        let n: i64 = sqlx::query_scalar("select count(distinct run_id) from attempts")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        n == runs.len() as i64
    })
    .await;

    let mut hold = env.pool.begin().await.unwrap();
    sqlx::query("lock table audit in share mode")
        .execute(&mut *hold)
        .await
        .unwrap();
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    env.wait_until("writes to queue up behind the held lock", RUN_TIMEOUT, async || {
        sample(&scrape(&sched).await, "baton_scheduler_write_queue").is_some_and(|n| n >= 2.0)
    })
    .await;
    hold.commit().await.unwrap();

    for &run in &runs {
        assert_eq!(env.wait_terminal(run, RUN_TIMEOUT).await.status, "succeeded");
    }

    let mut seen = std::collections::HashSet::new();
    for line in env.exec_log().into_iter().filter(|l| l.event == "start") {
        assert!(
            seen.insert((line.run_id, line.step_id.clone(), line.kind.clone())),
            "{} {} of run {} started twice",
            line.kind,
            line.step_id,
            line.run_id
        );
    }
    assert!(seen.len() >= runs.len() * 5, "only {} steps ran", seen.len());

    let text = scrape(&sched).await;
    let statements = sample(&text, "baton_scheduler_write_statements_total").expect("statements counted");
    let written = sample(&text, "baton_scheduler_written_runs_total").expect("runs counted");
    assert!(
        written > statements,
        "{written} transitions in {statements} statements: none were combined"
    );
    let kept = sample(&text, "baton_scheduler_run_snapshots_total{source=\"kept\"}").unwrap_or(0.0);
    assert!(kept > 0.0, "no transition used a kept run:\n{text}");

    env.assert_audit_verifies();
}
