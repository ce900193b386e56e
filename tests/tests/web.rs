//! The operator's web view in Debian's headless Chromium, driven by
//! playwright-core (`tests/web/browser.mjs`) against a real scheduler, broker,
//! database and daemons: the runs list shows a run the test started; a run's
//! hold and its reason appear; a viewer sees no approve button and a POST
//! without the session's CSRF token is refused; an approver approves one run
//! and rejects another from the page, and a viewer's page, never reloaded,
//! follows the first to its end; an attacker-controlled pull request title
//! renders as text. Screenshots of the list and of runs (waiting for approval,
//! succeeded, rolled back) are saved under `target/web-screenshots/`.

use std::time::Duration;

use baton_scheduler::api::{Role, new_token};
use baton_tests::{SEED_BINDINGS, TestEnv, browser, browser_tools, event, workspace_root};
use serde_json::json;

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

const PIPELINE: &str = r#"
[pipeline]
name = "web"
promotion = ["staging", "production"]
typical_minutes = [30, 60]

[[step]]
id = "migrate"
role = "db-migration"
zone = "production"
action = "migrate"
compensate = "rollback"
typical_minutes = [2, 10]

[[step]]
id = "apply"
role = "production-apply"
zone = "production"
action = "apply"
needs = ["migrate"]
gates = ["human-approval"]
compensate = "rollback-replicaset"
typical_minutes = [5, 10]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_view_in_a_real_browser() {
    let Some(chromium) = browser_tools() else { return };
    let env = TestEnv::new("web").await;
    let pipeline = env.dir.join("web.toml");
    std::fs::write(&pipeline, PIPELINE).unwrap();
    env.set_scheduler_env("BATON_SCHEDULER__PIPELINE", pipeline.to_str().unwrap());
    let mut toml = String::from("[api]\ntrace_url = \"http://jaeger.test/trace/{trace_id}\"\n");
    let mut tokens = Vec::new();
    for (name, role) in [("vera", Role::Viewer), ("marta", Role::Approver)] {
        let (token, e) = new_token(name, role);
        toml.push_str(&format!(
            "[[api.tokens]]\nname = {:?}\nrole = {}\nsha256 = {:?}\n",
            e.name,
            serde_json::to_value(e.role).unwrap(),
            e.sha256
        ));
        tokens.push(token);
    }
    env.scheduler_config(&toml);
    env.script(json!({"default": {"delay_ms": 50}}));
    let scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let base = scheduler.api.clone().expect("the scheduler serves its API");

    // Two services, so neither run waits for the other's environment.
    let mut a = event("shop-web", 1, &["src/app.ts"]);
    a["pull_request"]["title"] = json!("<script>window.__pwned = 1</script> Ship the new checkout");
    let run_a = env.enqueue(&a);
    let run_b = env.enqueue(&event("shop-api", 2, &["src/app.ts"]));
    for run in [run_a, run_b] {
        env.wait_run_status(run, "awaiting_approval", RUN_TIMEOUT).await;
    }

    let shots = workspace_root().join("target/web-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let input = json!({
        "base": base, "viewer": tokens[0], "approver": tokens[1],
        "runA": run_a, "runB": run_b, "shots": shots,
    });
    let out = browser(&chromium, input).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the browser test failed:\n{stdout}\n{stderr}\n{}",
        env.diagnostics()
    );
    eprintln!("{stdout}");

    // What the browser did, as the scheduler recorded it.
    let v = env.wait_terminal(run_a, RUN_TIMEOUT).await;
    assert_eq!(v.status, "succeeded");
    let (by, comment): (String, String) =
        sqlx::query_as("select approver, comment from approvals where run_id = $1 and step_id = 'apply'")
            .bind(run_a)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!((by.as_str(), comment.as_str()), ("marta", "reviewed in the browser"));
    let v = env.wait_terminal(run_b, RUN_TIMEOUT).await;
    assert_eq!(v.status, "rolled_back", "the rejection rolled run B back");
    assert_eq!(v.step("migrate").unwrap().status, "compensated");
    // The forged POSTs changed nothing: the page's approval and rejection are all.
    let decisions: Vec<(String, String)> = sqlx::query_as("select decision, approver from approvals order by id")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    let expected = [("approve", "marta"), ("reject", "marta")].map(|(d, a)| (d.to_owned(), a.to_owned()));
    assert_eq!(decisions, expected, "only the page's decisions were recorded");

    // Timing against the pipeline: a migration that took 20 minutes (made so
    // in the database: the test does not wait for it) is over its typical
    // 2-10 minutes, in `baton runs show` and in /metrics; the run, now 20
    // minutes long, is still within its 60-minute budget.
    let metrics = || async {
        reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let over = r#"baton_steps_over_typical_total{step="migrate",role="db-migration"}"#;
    assert_eq!(
        baton_tests::metric_sample(&metrics().await, over),
        None,
        "nothing is over yet"
    );
    for sql in [
        "update steps set started_at = finished_at - interval '20 minutes' where run_id = $1 and step_id = 'migrate'",
        "update runs set started_at = started_at - interval '20 minutes' where id = $1",
    ] {
        sqlx::query(sql).bind(run_a).execute(&env.pool).await.unwrap();
    }
    let text = metrics().await;
    assert_eq!(baton_tests::metric_sample(&text, over), Some(1.0), "{text}");
    assert_eq!(
        baton_tests::metric_sample(&text, "baton_runs_over_budget_total"),
        Some(0.0)
    );
    let out = env.baton(&["runs", "show", &run_a.to_string()]);
    let shown = String::from_utf8_lossy(&out.stdout);
    let line = |step: &str| {
        shown
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with(&format!("{step} ")))
            .unwrap_or_else(|| panic!("no timing line for {step}:\n{shown}"))
            .to_owned()
    };
    assert!(
        line("migrate").contains("2–10 min") && line("migrate").ends_with("OVER"),
        "{shown}"
    );
    assert!(
        line("apply").contains("5–10 min") && !line("apply").contains("OVER"),
        "{shown}"
    );
    assert!(shown.contains("of a 60 min budget\n"), "{shown}");

    for shot in ["runs", "run-waiting-for-approval", "run-succeeded", "run-rolled-back"] {
        let p = shots.join(format!("{shot}.png"));
        assert!(
            std::fs::metadata(&p).is_ok_and(|m| m.len() > 10_000),
            "screenshot {}",
            p.display()
        );
    }
}
