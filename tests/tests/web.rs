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

use baton_scheduler::api::Role;
use baton_tests::{SEED_BINDINGS, TestEnv, api_tokens, browser, browser_tools, event, workspace_root};
use serde_json::json;

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

const PIPELINE: &str = r#"
[pipeline]
name = "web"
promotion = ["staging", "production"]
typical_minutes = [30, 60]
orchestration_minutes = 1

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
    let (entries, tokens) = api_tokens(&[("vera", Role::Viewer), ("marta", Role::Approver)]);
    env.scheduler_config(&format!(
        "[api]\ntrace_url = \"http://jaeger.test/trace/{{trace_id}}\"\n{entries}"
    ));
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
    let shown = String::from_utf8_lossy(&env.baton(&["runs", "show", &run_a.to_string()]).stdout).into_owned();
    let orchestration = shown
        .lines()
        .find(|l| l.trim_start().starts_with("orchestration "))
        .unwrap_or_else(|| panic!("no orchestration line:\n{shown}"))
        .to_owned();
    assert!(
        orchestration.contains("scheduler") && orchestration.contains("1 min") && !orchestration.contains("OVER"),
        "the first dispatch came within its minute: {shown}"
    );
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
        line("migrate").contains("2–10 min") && line("migrate").contains(" OVER "),
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

const FORM: &str = "application/x-www-form-urlencoded";

/// `application/x-www-form-urlencoded`, as a browser sends a form.
fn form_body(pairs: &[(&'static str, String)]) -> String {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => (b as char).to_string(),
                b' ' => "+".to_owned(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The web view's forms without a browser: log-in, roles, CSRF and each
/// operator action (cancel, redeploy, incidents), with their errors as pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_actions_and_refusals_through_the_web_view() {
    let env = TestEnv::new("web-actions").await;
    let pipeline = env.dir.join("web.toml");
    std::fs::write(&pipeline, PIPELINE).unwrap();
    env.set_scheduler_env("BATON_SCHEDULER__PIPELINE", pipeline.to_str().unwrap());
    let (entries, tokens) = api_tokens(&[("vera", Role::Viewer), ("otto", Role::Operator)]);
    env.scheduler_config(&format!("[api]\n{entries}"));
    env.script(json!({"default": {"delay_ms": 20}}));
    let scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let base = scheduler.api.clone().unwrap();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    // Log-in: an unknown token is refused; a known one gets the session cookie.
    let login = |token: String| {
        let http = http.clone();
        let base = base.clone();
        async move {
            http.post(format!("{base}/ui/login"))
                .header("content-type", FORM)
                .body(form_body(&[("token", token)]))
                .send()
                .await
                .unwrap()
        }
    };
    let r = login("baton_0000".into()).await;
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    let session = |r: &reqwest::Response| {
        let c = r.headers()["set-cookie"].to_str().unwrap().to_owned();
        for flag in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
            assert!(c.contains(flag), "{c}");
        }
        c.split(';').next().unwrap().to_owned()
    };
    let viewer = session(&login(tokens[0].clone()).await);
    let r = login(tokens[1].clone()).await;
    assert_eq!(r.status(), 303);
    let operator = session(&r);

    let get = |cookie: &str, path: &str| {
        let req = http.get(format!("{base}{path}")).header("cookie", cookie);
        async move {
            let r = req.send().await.unwrap();
            let status = r.status();
            let csp = r
                .headers()
                .get("content-security-policy")
                .map(|v| v.to_str().unwrap().to_owned());
            (status, csp, r.text().await.unwrap())
        }
    };
    let post = |cookie: &str, path: &str, form: Vec<(&'static str, String)>| {
        let req = http
            .post(format!("{base}{path}"))
            .header("cookie", cookie)
            .header("content-type", FORM)
            .body(form_body(&form));
        async move {
            let r = req.send().await.unwrap();
            let status = r.status();
            let location = r.headers().get("location").map(|v| v.to_str().unwrap().to_owned());
            (status, location, r.text().await.unwrap())
        }
    };
    let csrf = |html: &str| {
        let at = html.find("name=\"csrf\" value=\"").expect("a form with a CSRF token") + 19;
        html[at..at + 64].to_owned()
    };

    let run = env.enqueue(&event("shop-web", 3, &["src/app.ts"]));
    env.wait_run_status(run, "awaiting_approval", RUN_TIMEOUT).await;
    let (status, csp, page) = get(&operator, &format!("/ui/runs/{run}")).await;
    assert_eq!(status, 200);
    assert!(csp.unwrap().contains("default-src 'none'"));
    assert!(page.contains("Cancel the run") && !page.contains("button class=\"approve\""));
    let op_csrf = csrf(&page);
    let (_, _, page) = get(&viewer, &format!("/ui/runs/{run}")).await;
    assert!(!page.contains("Cancel the run"), "a viewer gets no operator buttons");
    let viewer_csrf = csrf(&page);

    // A viewer with a valid session and token still may not cancel; an operator
    // must say why; then the cancel goes through.
    let cancel = format!("/ui/runs/{run}/cancel");
    let (status, _, page) = post(
        &viewer,
        &cancel,
        vec![("csrf", viewer_csrf.clone()), ("reason", "no".into())],
    )
    .await;
    assert_eq!(status, 403, "{page}");
    assert!(page.contains("it needs operator"), "{page}");
    let (status, _, page) = post(&operator, &cancel, vec![("reason", "no".into())]).await;
    assert_eq!(status, 403, "no CSRF token: {page}");
    let (status, _, page) = post(&operator, &cancel, vec![("csrf", op_csrf.clone())]).await;
    assert_eq!(status, 400);
    assert!(page.contains("reason must not be empty"), "{page}");
    assert_eq!(env.run(run).await.unwrap().status, "awaiting_approval");
    let (status, location, _) = post(
        &operator,
        &cancel,
        vec![("csrf", op_csrf.clone()), ("reason", "wrong week".into())],
    )
    .await;
    assert_eq!((status.as_u16(), location), (303, Some(format!("/ui/runs/{run}"))));
    // What had succeeded is compensated: the cancelled run ends rolled back.
    let v = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(v.status, "rolled_back");
    assert!(
        v.history.iter().any(|h| h.actor == "otto" && h.kind.contains("cancel")),
        "{:?}",
        v.history
    );

    // Redeploy: a new run of the same merge event, linked to this one.
    let (status, location, _) = post(
        &operator,
        &format!("/ui/runs/{run}/redeploy"),
        vec![("csrf", op_csrf.clone()), ("reason", "next week came".into())],
    )
    .await;
    assert_eq!(status, 303);
    let again: uuid::Uuid = location.unwrap().trim_start_matches("/ui/runs/").parse().unwrap();
    let v = env.wait_run_status(again, "awaiting_approval", RUN_TIMEOUT).await;
    assert_eq!(v.redeploy_of, Some(run));
    let (_, _, page) = get(&operator, &format!("/ui/runs/{again}")).await;
    assert!(
        page.contains(&format!("href=\"/ui/runs/{run}\"")),
        "links the run it redeploys"
    );

    // Incidents: a viewer may not open one; an operator opens and resolves one.
    let title = "<b>checkout errors</b>";
    let form = |csrf: &str| {
        vec![
            ("csrf", csrf.to_owned()),
            ("environment", "production".into()),
            ("title", title.into()),
        ]
    };
    let (status, _, _) = post(&viewer, "/ui/incidents", form(&viewer_csrf)).await;
    assert_eq!(status, 403);
    let (status, _, page) = post(
        &operator,
        "/ui/incidents",
        vec![
            ("csrf", op_csrf.clone()),
            ("environment", "moon".into()),
            ("title", "x".into()),
        ],
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        page.contains("environment &quot;moon&quot; is not one the pipeline deploys to"),
        "{page}"
    );
    let (status, _, _) = post(&operator, "/ui/incidents", form(&op_csrf)).await;
    assert_eq!(status, 303);
    let (_, _, page) = get(&operator, "/ui/runs").await;
    assert!(
        page.contains("&lt;b&gt;checkout errors&lt;/b&gt;"),
        "the title is escaped: {page}"
    );
    let (id,): (uuid::Uuid,) = sqlx::query_as("select id from incidents where resolved_at is null")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let (status, _, _) = post(
        &operator,
        &format!("/ui/incidents/{id}/resolve"),
        vec![("csrf", op_csrf.clone())],
    )
    .await;
    assert_eq!(status, 303);
    let open: i64 = sqlx::query_scalar("select count(*) from incidents where resolved_at is null")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(open, 0);

    // A filter that names no status is refused, naming it; the list filters.
    let (status, _, page) = get(&viewer, "/ui/runs?status=sideways").await;
    assert_eq!(status, 400);
    assert!(page.contains("status:"), "{page}");
    let (_, _, page) = get(&viewer, "/ui/runs?status=rolled_back&since=24h").await;
    assert!(page.contains(&run.to_string()[..8]) && !page.contains(&again.to_string()[..8]));
    // Pages of the list: a page past the runs is empty and links back; a bad page is named.
    let (status, _, page) = get(&viewer, "/ui/runs?status=rolled_back&page=2").await;
    assert_eq!(status, 200);
    assert!(page.contains("No runs match.") && page.contains("page 2"), "{page}");
    assert!(page.contains("href=\"/ui/runs?status=rolled_back\""), "{page}");
    let (status, _, page) = get(&viewer, "/ui/runs?page=0").await;
    assert_eq!(status, 400);
    assert!(page.contains("page:"), "{page}");

    // Roll back the redeployed run: what it did is undone, and its history says who asked.
    let (status, location, _) = post(
        &operator,
        &format!("/ui/runs/{again}/rollback"),
        vec![("csrf", op_csrf.clone()), ("reason", "wrong build".into())],
    )
    .await;
    assert_eq!((status.as_u16(), location), (303, Some(format!("/ui/runs/{again}"))));
    let v = env.wait_terminal(again, RUN_TIMEOUT).await;
    assert_eq!(v.status, "rolled_back");
    assert_eq!(v.step("migrate").unwrap().status, "compensated");
    assert!(
        v.rollback_reason
            .as_deref()
            .is_some_and(|r| r.contains("wrong build (by otto)")),
        "{:?}",
        v.rollback_reason
    );

    // Log-out ends the session's cookie; without one, pages send you to log in.
    let (status, _, _) = post(&viewer, "/ui/logout", vec![("csrf", viewer_csrf)]).await;
    assert_eq!(status, 303);
    let r = http.get(format!("{base}/ui/runs")).send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.headers()["location"].to_str().unwrap()),
        (303, "/ui/login")
    );
}
