//! Gates, approvals and the operator's interfaces over a real scheduler, daemons,
//! RabbitMQ and PostgreSQL: each gate holds and then releases, four-eyes rules,
//! rejection compensates, the merge gate refuses at ingest, Alertmanager opens
//! and closes incidents, the CLI's `--json` output parses, and roles are enforced.

use std::time::Duration;

use baton_scheduler::api::Role;
use baton_scheduler::store::RunView;
use baton_tests::{SEED_BINDINGS, TestEnv, event};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

const RUN_TIMEOUT: Duration = Duration::from_secs(90);

struct Api {
    base: String,
    http: reqwest::Client,
    viewer: String,
    operator: String,
    /// Approvers: alice, bob, and `ci`, who requests every test run.
    alice: String,
    bob: String,
    ci: String,
}

impl Api {
    /// The scheduler's API with the tokens [`configure`] made, in its order.
    fn of(scheduler: &baton_tests::Proc, t: &[(String, Role)]) -> Self {
        Self {
            base: scheduler.api.clone().expect("api"),
            http: reqwest::Client::new(),
            viewer: t[0].0.clone(),
            operator: t[1].0.clone(),
            alice: t[2].0.clone(),
            bob: t[3].0.clone(),
            ci: t[4].0.clone(),
        }
    }

    async fn post(&self, token: &str, path: &str, body: Value) -> (StatusCode, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("api reachable");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, token: &str, path: &str) -> (StatusCode, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("api reachable");
        (r.status(), r.text().await.unwrap_or_default())
    }
}

/// Tokens for every role, and the rest of the scheduler's config.
fn configure(env: &TestEnv, extra: &str) -> Vec<(String, Role)> {
    let who = [
        ("vera", Role::Viewer),
        ("otto", Role::Operator),
        ("alice", Role::Approver),
        ("bob", Role::Approver),
        ("ci", Role::Approver),
    ];
    let (entries, tokens) = baton_tests::api_tokens(&who);
    env.scheduler_config(&format!("[api]\n{entries}{extra}"));
    tokens.into_iter().zip(who.map(|(_, r)| r)).collect()
}

async fn start(env: &TestEnv, extra: &str) -> (Api, Vec<baton_tests::Proc>) {
    let t = configure(env, extra);
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 20}})));
    let scheduler = env.scheduler("scheduler").await;
    let daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let api = Api::of(&scheduler, &t);
    (api, vec![scheduler, daemon])
}

fn cli(env: &TestEnv, api: &Api, token: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = env.baton_with(
        args,
        &[("BATON_CLIENT__URL", api.base.as_str()), ("BATON_CLIENT__TOKEN", token)],
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.code() != Some(3),
        "baton {args:?} could not reach the API: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), stdout)
}

/// A production maintenance window of 30 minutes from `start`, as configuration.
fn window(start: chrono::DateTime<chrono::Utc>) -> String {
    format!(
        "[gates.maintenance_windows.production]\ntime_zone = \"Europe/Amsterdam\"\n\
         once = [{{ start = \"{}\", duration_minutes = 30 }}]\n",
        start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )
}

/// An operator opens an incident through the CLI; returns its id.
fn open_incident(env: &TestEnv, api: &Api, environment: &str, title: &str) -> String {
    let (code, out) = cli(
        env,
        api,
        &api.operator,
        &[
            "--json",
            "incident",
            "open",
            "--environment",
            environment,
            "--title",
            title,
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    json_of(&out)[0]["id"].as_str().unwrap().to_owned()
}

fn json_of(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn gate_entries<'a>(v: &'a RunView, gate: &str, verdict: &str) -> Vec<&'a Value> {
    v.history
        .iter()
        .flat_map(|h| match h.kind.as_str() {
            "gate" => vec![&h.detail],
            "gates_passed" => h.detail["gates"]
                .as_array()
                .map(|a| a.iter().collect())
                .unwrap_or_default(),
            _ => vec![],
        })
        .filter(|d| d["gate"] == gate && d["verdict"] == verdict)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incidents_from_operators_and_alertmanager_hold_runs_until_resolved() {
    let env = TestEnv::new("gates-incident").await;
    let (api, _procs) = start(&env, "").await;

    // An operator opens an incident through the CLI; a new run is held at admission.
    let incident = open_incident(&env, &api, "production", "checkout 500s");
    // Alertmanager reports a firing alert for production too (its real payload shape).
    let alert = |status: &str| {
        json!({
            "version": "4", "groupKey": "{}:{alertname=\"HighErrorRate\"}", "truncatedAlerts": 0,
            "status": status, "receiver": "baton", "groupLabels": {"alertname": "HighErrorRate"},
            "commonLabels": {"alertname": "HighErrorRate"}, "commonAnnotations": {},
            "externalURL": "http://alertmanager:9093",
            "alerts": [{
                "status": status,
                "labels": {"alertname": "HighErrorRate", "environment": "production", "severity": "page"},
                "annotations": {"summary": "5xx above 2 %"},
                "startsAt": "2026-11-26T10:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus/graph", "fingerprint": "c0ffee1234"
            }]
        })
    };
    let (status, body) = api
        .post(&api.operator, "/v1/webhooks/alertmanager", alert("firing"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["opened"].as_array().unwrap().len(), 1);
    // Re-sent notifications for the same alert do not open a second incident.
    let (_, body) = api
        .post(&api.operator, "/v1/webhooks/alertmanager", alert("firing"))
        .await;
    assert_eq!(body["unchanged"], 1);

    let run = env.enqueue(&event("held", 1, &["src/app.ts"]));
    let v = env.wait_run_status(run, "blocked", RUN_TIMEOUT).await;
    assert_eq!(v.hold.as_ref().unwrap().gate, "incident");
    assert!(v.steps.iter().all(|s| s.attempts.is_empty()), "nothing ran");
    let (code, out) = cli(&env, &api, &api.viewer, &["--json", "incident", "list"]);
    assert_eq!(code, Some(0));
    assert_eq!(json_of(&out).as_array().unwrap().len(), 2);
    let (code, out) = cli(&env, &api, &api.viewer, &["--json", "locks"]);
    assert_eq!(code, Some(0));
    let locks = json_of(&out);
    assert_eq!(locks[0]["run_id"], run.to_string());
    assert_eq!(locks[0]["run_status"], "blocked");

    // Resolving one incident is not enough: the Alertmanager one still holds.
    let (code, out) = cli(&env, &api, &api.operator, &["--json", "incident", "resolve", &incident]);
    assert_eq!(code, Some(0), "{out}");
    assert!(json_of(&out)[0]["resolved_at"].is_string());
    let v = env.run(run).await.unwrap();
    assert_eq!(v.status, "blocked");
    assert!(
        v.hold.as_ref().unwrap().reason.contains("HighErrorRate"),
        "{:?}",
        v.hold
    );

    let (status, body) = api
        .post(&api.operator, "/v1/webhooks/alertmanager", alert("resolved"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["resolved"].as_array().unwrap().len(), 1);
    let v = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(v.status, "succeeded", "{}", env.diagnostics());
    assert!(!gate_entries(&v, "incident", "hold").is_empty());
    let out = env.baton(&["--json", "runs", "list", "--service", "held", "--status", "succeeded"]);
    let listed = json_of(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["id"], run.to_string());
    let out = env.baton(&["--json", "runs", "list", "--service", "held", "--status", "failed"]);
    assert_eq!(json_of(&String::from_utf8_lossy(&out.stdout)), json!([]));

    // The run's events as server-sent events: every transition, then `end`.
    let (status, sse) = api.get(&api.viewer, &format!("/v1/runs/{run}/events")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        sse.contains("event: history") && sse.contains("\"kind\":\"gate\""),
        "{sse}"
    );
    assert!(
        sse.trim_end()
            .ends_with(&format!("data: {}", json!({"run_id": run, "status": "succeeded"}))),
        "{sse}"
    );

    // An operator rolls the finished run back from the command line.
    let out = env.baton(&["--json", "rollback", &run.to_string(), "--reason", "customer reports"]);
    assert_eq!(
        json_of(&String::from_utf8_lossy(&out.stdout)),
        json!({"run_id": run, "rollback": "requested"})
    );
    assert_eq!(env.wait_terminal(run, RUN_TIMEOUT).await.status, "rolled_back");

    // Cancelling a run held by an incident ends it without running anything.
    let (status, _) = api
        .post(
            &api.operator,
            "/v1/incidents",
            json!({"environment": "production", "title": "again"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let file = env.event_file(&event("held", 2, &["src/app.ts"]));
    let out = env.baton(&["--json", "enqueue", "--event", file.to_str().unwrap()]);
    let enqueued = json_of(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(enqueued["service"], "held");
    let run2: Uuid = enqueued["run_id"].as_str().unwrap().parse().unwrap();
    env.wait_run_status(run2, "blocked", RUN_TIMEOUT).await;
    let (code, out) = cli(
        &env,
        &api,
        &api.operator,
        &["--json", "cancel", &run2.to_string(), "--reason", "not today"],
    );
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(json_of(&out)["cancel"], "requested");
    let v = env.wait_terminal(run2, RUN_TIMEOUT).await;
    assert_eq!(v.status, "cancelled");
    let (code, _) = cli(&env, &api, &api.viewer, &["watch", &run2.to_string()]);
    assert_eq!(code, Some(1), "watch exits 1 for a cancelled run");
}

const APPROVAL_PIPELINE: &str = r#"
[pipeline]
name = "approval"
promotion = ["staging", "production"]

[[step]]
id = "migrate"
role = "db-migration"
zone = "production"
action = "migrate"
compensate = "rollback"

[[step]]
id = "apply"
role = "production-apply"
zone = "production"
action = "apply"
needs = ["migrate"]
gates = ["human-approval"]
compensate = "rollback-replicaset"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_are_four_eyes_bound_to_the_plan_expire_and_a_rejection_compensates() {
    let env = TestEnv::new("gates-approval").await;
    let pipeline = env.dir.join("approval.toml");
    std::fs::write(&pipeline, APPROVAL_PIPELINE).unwrap();
    env.set_scheduler_env("BATON_SCHEDULER__PIPELINE", pipeline.to_str().unwrap());
    let (api, _procs) = start(&env, "[gates.approval]\nrequired = 2\n").await;

    let run = env.enqueue(&event("approve", 1, &["src/app.ts"]));
    let v = env.wait_run_status(run, "awaiting_approval", RUN_TIMEOUT).await;
    let hold = v.step("apply").unwrap().hold.clone().expect("apply waits");
    assert!(hold.approval && hold.gate == "human-approval", "{hold:?}");
    let plan = v.plan_hash.clone();
    let path = format!("/v1/runs/{run}/approve");
    let body = |plan: &str| json!({"step": "apply", "plan_hash": plan, "comment": "looks fine"});

    // The requester may not approve; an approval for another plan is refused;
    // viewers and operators may not approve at all.
    let (status, e) = api.post(&api.ci, &path, body(&plan)).await;
    assert_eq!(
        (status, e["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("four_eyes")),
        "{e}"
    );
    let (status, e) = api.post(&api.alice, &path, body("0000")).await;
    assert_eq!(
        (status, e["code"].as_str()),
        (StatusCode::CONFLICT, Some("plan_hash_mismatch")),
        "{e}"
    );
    assert_eq!(api.post(&api.viewer, &path, body(&plan)).await.0, StatusCode::FORBIDDEN);
    assert_eq!(
        api.post(&api.operator, &path, body(&plan)).await.0,
        StatusCode::FORBIDDEN
    );
    let (status, e) = api.post("not-a-token", &path, body(&plan)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{e}");

    // Alice approves through the CLI; one of two approvals is not enough.
    let (code, out) = cli(
        &env,
        &api,
        &api.alice,
        &[
            "--json",
            "approve",
            &run.to_string(),
            "--step",
            "apply",
            "--plan-hash",
            &plan,
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(json_of(&out)["run_status"], "awaiting_approval");
    let (status, e) = api.post(&api.alice, &path, body(&plan)).await;
    assert_eq!(status, StatusCode::CONFLICT, "a second approval by alice: {e}");
    // Her approval's time runs out (`gates.approval.ttl_secs` after she gave it):
    // the test moves its expiry into the past instead of waiting for it.
    sqlx::query("update approvals set expires_at = now() - interval '1 second' where approver = 'alice'")
        .execute(&env.pool)
        .await
        .unwrap();
    let (status, e) = api.post(&api.bob, &path, body(&plan)).await;
    assert_eq!(status, StatusCode::OK, "{e}");
    let v = env.run(run).await.unwrap();
    assert_eq!(v.status, "awaiting_approval", "alice's approval expired");
    let reason = &v.step("apply").unwrap().hold.as_ref().unwrap().reason;
    assert!(reason.contains("has bob; expired: alice"), "{reason}");
    // A fresh approval by alice completes four-eyes.
    let (status, e) = api.post(&api.alice, &path, body(&plan)).await;
    assert_eq!(status, StatusCode::OK, "{e}");
    let (code, out) = cli(&env, &api, &api.viewer, &["--json", "watch", &run.to_string()]);
    assert_eq!(code, Some(0), "{out}");
    let lines: Vec<Value> = out.lines().map(json_of).collect();
    assert!(lines.iter().any(|l| l["kind"] == "approved" && l["actor"] == "bob"));
    let v = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(v.status, "succeeded");
    assert!(
        gate_entries(&v, "human-approval", "pass")[0]["reason"]
            .as_str()
            .unwrap()
            .contains("approved by bob, alice")
    );

    // A rejection fails the step and compensates what ran before it.
    let run = env.enqueue(&event("approve", 2, &["src/app.ts"]));
    let v = env.wait_run_status(run, "awaiting_approval", RUN_TIMEOUT).await;
    let (code, out) = cli(
        &env,
        &api,
        &api.bob,
        &[
            "--json",
            "reject",
            &run.to_string(),
            "--step",
            "apply",
            "--plan-hash",
            &v.plan_hash,
            "--reason",
            "wrong ticket",
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    let v = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(v.status, "rolled_back");
    let apply = v.step("apply").unwrap();
    assert_eq!(apply.status, "failed");
    assert_eq!(apply.error.as_ref().unwrap().code, "rejected");
    assert!(
        apply
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("rejected by bob: wrong ticket")
    );
    assert_eq!(v.step("migrate").unwrap().status, "compensated");
    assert!(
        env.starts(run, "apply", "execute").is_empty(),
        "a rejected step never runs"
    );
    let (code, out) = cli(&env, &api, &api.viewer, &["runs", "show", &run.to_string()]);
    assert_eq!(code, Some(1));
    assert!(out.contains("gate human-approval fail: rejected by bob"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_maintenance_window_holds_production_after_a_watched_soak_until_it_opens() {
    let env = TestEnv::new("gates-window").await;
    // A window that opens in an hour, and a 3 s staging soak minimum, which the
    // scripted verification's declared 900 s soak covers.
    env.set_scheduler_env("BATON_GATES__STAGING_SOAK_SECS", "3");
    let t = configure(&env, &window(chrono::Utc::now() + chrono::Duration::hours(1)));
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 20}})));
    let scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let _api = Api::of(&scheduler, &t);
    let mut high = event("window", 1, &["src/app.ts"]);
    high["risk"] = json!("high");
    let run = env.enqueue(&high);
    // The soak passes, the closed window holds production apply.
    env.wait_until("apply.production to wait for the window", RUN_TIMEOUT, async || {
        env.run(run).await.is_some_and(|v| {
            v.step("apply.production")
                .and_then(|s| s.hold.as_ref())
                .is_some_and(|h| h.gate == "maintenance-window")
        })
    })
    .await;
    assert!(env.starts(run, "apply.production", "execute").is_empty());

    // An operator schedules a window that is open now and restarts the scheduler.
    drop(scheduler);
    let restarted = chrono::Utc::now();
    let t = configure(&env, &window(restarted - chrono::Duration::minutes(5)));
    let scheduler = env.scheduler("scheduler-2").await;
    let _api = Api::of(&scheduler, &t);
    let v = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(v.status, "succeeded", "{}", env.diagnostics());
    let apply = v.step("apply.production").unwrap().started_at.unwrap();
    assert!(apply >= restarted, "apply started at {apply}, before the window opened");
    let soak = gate_entries(&v, "staging-soak", "pass");
    assert!(
        soak[0]["reason"].as_str().unwrap().starts_with(
            "verify.staging watched staging run this change for 900 s without it degrading (minimum 0.05 min)"
        ),
        "{soak:?}"
    );
    let held = gate_entries(&v, "maintenance-window", "hold");
    assert!(
        held[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("high risk: outside the maintenance window"),
        "{held:?}"
    );
    assert!(!gate_entries(&v, "maintenance-window", "pass").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_events_without_required_approvers_are_refused_with_their_names() {
    let env = TestEnv::new("gates-merge").await;
    std::fs::write(env.dir.join("webhook-secret"), "s3cret").unwrap();
    let secret = format!("file:{}", env.dir.join("webhook-secret").display());
    env.set_scheduler_env("BATON_API__WEBHOOK_SECRET", &secret);
    let (api, _procs) = start(&env, "").await;
    let mut ev = event("merge", 1, &["src/app.ts"]);
    ev["pull_request"]["approvals"] = json!([{"by": "dev", "at": "2026-11-26T09:00:00Z"}]);
    let body = serde_json::to_vec(&ev).unwrap();
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").unwrap();
    mac.update(&body);
    let r = api
        .http
        .post(format!("{}/v1/webhooks/ci", api.base))
        .header(
            "x-baton-signature",
            format!("sha256={}", hex::encode(mac.finalize().into_bytes())),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["code"], "merge_gate");
    assert!(e["message"].as_str().unwrap().contains("missing: marta, iwona"), "{e}");
    // Through the broker: refused, dead-lettered and audited, and no run exists.
    let run = env.enqueue(&ev);
    env.wait_until("the refusal to be audited", RUN_TIMEOUT, async || {
        sqlx::query_scalar::<_, i64>(
            "select count(*) from audit where kind = 'merge_event_refused' and detail->>'reason' like '%missing: marta, iwona%'",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap()
            == 1
    })
    .await;
    assert!(env.run(run).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_fail_their_attempt_and_are_listed_and_replayed_through_the_cli() {
    let env = TestEnv::new("gates-dlq").await;
    let t = configure(&env, "");
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 20}})));
    let scheduler = env.scheduler("scheduler").await;
    // The staging db-migration daemon trusts another key: it refuses every job it is sent.
    let stranger = baton_shared::signing::Keypair::generate();
    let others: Vec<&str> = SEED_BINDINGS
        .iter()
        .copied()
        .filter(|b| *b != "staging.db-migration")
        .collect();
    let _daemon = env.daemon("daemon", &others).await;
    let trusted = format!("[{:?}]", stranger.public());
    let _suspicious = env
        .daemon_with(
            "suspicious",
            &["staging.db-migration"],
            &[("BATON_SIGNING__TRUSTED", trusted.as_str())],
        )
        .await;
    let api = Api::of(&scheduler, &t);

    // The refused job fails its step at once (not after the accept timeout), with the reason.
    let run = env.enqueue(&event("dlq", 1, &["drizzle/migrations/0001_x.sql"]));
    let v = env.wait_terminal(run, RUN_TIMEOUT).await;
    let db = v.step("db.staging").unwrap();
    assert_eq!(db.status, "failed", "{v:#?}");
    let err = db.error.as_ref().unwrap();
    assert_eq!(err.code, "dead_lettered");
    assert!(
        err.message.contains("unauthentic: signed with unknown key id"),
        "{err:?}"
    );
    assert!(env.starts(run, "db.staging", "execute").is_empty());
    // Other jobs keep flowing: a run that needs no db-migration job goes through
    // the other daemon while the refusing one stays up. (Whether the failed run's
    // parallel backup job started before the failure cancelled it is a race.)
    let other = env.enqueue(&event("dlq-other", 3, &["src/app.ts"]));
    let v = env.wait_terminal(other, RUN_TIMEOUT).await;
    assert_eq!(v.status, "succeeded", "{v:#?}");
    assert!(!env.starts(other, "backup.pre", "execute").is_empty());

    // A refused merge event is a dead letter too; both are listed.
    let mut unapproved = event("dlq", 2, &["src/app.ts"]);
    unapproved["pull_request"]["approvals"] = json!([]);
    env.enqueue(&unapproved);
    let mut list = Value::Null;
    // Under load an attempt may also be presumed lost first (its cancel is refused and listed too),
    // so wait for the two origins this test is about rather than for a count.
    env.wait_until(
        "the job's and the merge event's dead letters listed",
        RUN_TIMEOUT,
        async || {
            let (code, out) = cli(&env, &api, &api.viewer, &["--json", "dlq", "list"]);
            assert_eq!(code, Some(0), "{out}");
            list = json_of(&out);
            let origins: Vec<&str> = list
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|d| d["origin"].as_str())
                .collect();
            origins.contains(&"baton.merge-events") && origins.contains(&"baton.staging.db-migration")
        },
    )
    .await;
    let merge = list
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["origin"] == "baton.merge-events")
        .unwrap_or_else(|| panic!("{list:#}"))
        .clone();
    assert!(
        merge["reason"].as_str().unwrap().contains("missing: marta, iwona"),
        "{merge}"
    );
    let job = list
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["origin"] == "baton.staging.db-migration")
        .unwrap();
    assert_eq!(job["run_id"], run.to_string());

    let metrics = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("baton_dead_letters_pending{origin=\"baton.merge-events\"} 1"),
        "{metrics}"
    );
    // Viewers may not replay; operators may. The replayed event is refused again (and audited again).
    let id = merge["id"].as_i64().unwrap().to_string();
    let (code, _) = cli(&env, &api, &api.viewer, &["dlq", "replay", &id]);
    assert_eq!(code, Some(2), "a viewer may not replay");
    let (code, out) = cli(&env, &api, &api.operator, &["--json", "dlq", "replay", &id]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(json_of(&out)["exchange"], "baton.events");
    env.wait_until("the replayed event to be refused again", RUN_TIMEOUT, async || {
        sqlx::query_scalar::<_, i64>("select count(*) from audit where kind = 'merge_event_refused'")
            .fetch_one(&env.pool)
            .await
            .unwrap()
            == 2
    })
    .await;
    let (_, out) = cli(&env, &api, &api.viewer, &["--json", "dlq", "list", "--all"]);
    let replayed = json_of(&out)
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == merge["id"])
        .cloned()
        .unwrap();
    assert_eq!(replayed["replayed_by"], "otto");
    let (code, err) = cli(&env, &api, &api.operator, &["dlq", "replay", "999999"]);
    assert_eq!(code, Some(2), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destructive_migration_waits_for_the_window_with_a_verified_backup_and_an_excepted_removal_warns() {
    let env = TestEnv::new("gates-destructive").await;
    configure(&env, &window(chrono::Utc::now() + chrono::Duration::hours(1)));
    // Scripted facts: staging reports what the db-migration daemon reports for a
    // destructive migration whose column the shipped code still names.
    env.script(baton_tests::with_seed_facts(json!({
        "default": {"delay_ms": 20},
        "execute": {"db.staging": {"outputs": {
            "destructive": true,
            "removals": [{"tag": "0002_drop_name", "change": "drops column name of customers",
                          "name": "name", "used_by": ["src/app.ts"]}]
        }}}
    })));
    let scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    // Standard risk: only the destructive migration needs the window. The event
    // excepts the deploy from additive-first, with its reason.
    let mut merge = event(
        "destructive",
        1,
        &["drizzle/migrations/0002_drop_name.sql", "src/app.ts"],
    );
    merge["exceptions"] = json!([{"rule": "additive-first", "reason": "src/app.ts reads the column nowhere"}]);
    let run = env.enqueue(&merge);
    let v = env.wait_run_status(run, "blocked", RUN_TIMEOUT).await;
    let hold = v
        .step("db.production")
        .unwrap()
        .hold
        .clone()
        .expect("db.production waits");
    assert_eq!(hold.gate, "maintenance-window");
    assert!(
        hold.reason
            .starts_with("destructive migration: outside the maintenance window"),
        "{hold:?}"
    );
    assert!(env.starts(run, "db.production", "execute").is_empty());
    // The window opens (by configuration and a restart, not by waiting for it).
    drop(scheduler);
    let opened = chrono::Utc::now();
    configure(&env, &window(opened - chrono::Duration::minutes(5)));
    let _scheduler = env.scheduler("scheduler-2").await;
    let v = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(v.status, "succeeded", "{}", env.diagnostics());
    let started = v.step("db.production").unwrap().started_at.unwrap();
    assert!(started >= opened, "{started} before the window opened at {opened}");
    let backup = gate_entries(&v, "backup-verified", "pass");
    let backup = backup
        .iter()
        .find(|d| d["reason"].as_str().unwrap().contains("is verified"))
        .unwrap_or_else(|| panic!("{backup:?}"));
    assert!(backup["reason"].as_str().unwrap().contains("from backup.pre"));
    let warned = gate_entries(&v, "additive-first", "warn");
    let reason = warned[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("drops column name of customers") && reason.contains("reads the column nowhere"),
        "{warned:?}"
    );
    assert!(
        v.history.iter().any(|h| h.kind == "rule_exception"),
        "the exception is audited: {:?}",
        v.history
    );
}

/// docs/architecture.md, Compensation: a failed rollback stops. Its environment, left half undone,
/// stays held: the next run waits until an operator releases it through the
/// CLI (a viewer may not), the release is in the held run's history, and the
/// held environment is a metric to alert on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rollback_holds_the_environment_until_an_operator_releases_it() {
    let env = TestEnv::new("held-env").await;
    let t = configure(&env, "");
    env.script(baton_tests::with_seed_facts(json!({
        "default": {"delay_ms": 20},
        "execute": {"cdn": {"fail": {"code": "boom", "message": "upload rejected", "retryable": false}}},
        "compensate": {"infra.production": {"fail": {"code": "state_locked", "message": "state lock held", "retryable": false}}}
    })));
    let scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let api = Api::of(&scheduler, &t);

    let first = env.enqueue(&event("held", 1, baton_tests::EVERYTHING));
    let v = env.wait_terminal(first, RUN_TIMEOUT).await;
    assert_eq!(v.status, "rollback_failed", "{v:#?}");
    assert!(v.history.iter().any(|h| h.kind == "environment_held"), "{v:#?}");
    // A run is admitted in the transaction that records it: once it is
    // recorded, queued means queued until something releases the environment.
    let second = env.enqueue(&event("held", 2, &["src/app.ts"]));
    env.wait_until("the second run recorded", RUN_TIMEOUT, async || {
        env.run(second).await.is_some()
    })
    .await;
    assert_eq!(env.run(second).await.unwrap().status, "queued");
    let (code, out) = cli(&env, &api, &api.viewer, &["--json", "locks"]);
    assert_eq!(code, Some(0), "{out}");
    let locks = json_of(&out);
    assert_eq!(locks[0]["run_id"], json!(first), "{locks}");
    assert_eq!(locks[0]["run_status"], "rollback_failed", "{locks}");
    assert_eq!(locks[0]["waiting"], json!([second]), "{locks}");
    let (_, metrics) = api.get(&api.viewer, "/metrics").await;
    assert!(
        metrics.contains(r#"baton_environment_held{service="held",environment="production"} 1"#),
        "{metrics}"
    );

    let release = [
        "--json",
        "locks",
        "release",
        "held",
        "production",
        "--reason",
        "state unlocked by hand",
    ];
    let (code, out) = cli(&env, &api, &api.viewer, &release);
    assert_eq!(code, Some(2), "a viewer may not release: {out}");
    assert_eq!(env.run(second).await.unwrap().status, "queued");
    let (code, out) = cli(&env, &api, &api.operator, &release);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(json_of(&out), json!({"run_id": first, "release": "done"}));

    assert_eq!(env.wait_terminal(second, RUN_TIMEOUT).await.status, "succeeded");
    let v = env.run(first).await.unwrap();
    let released = v
        .history
        .iter()
        .find(|h| h.kind == "environment_released")
        .expect("the release is in the held run's history");
    assert_eq!(released.actor, "otto");
    assert_eq!(released.detail["reason"], "state unlocked by hand");
    let (_, metrics) = api.get(&api.viewer, "/metrics").await;
    assert!(!metrics.contains("baton_environment_held{"), "{metrics}");
    // Nothing is held any more: a second release names what is wrong.
    let (code, _) = cli(&env, &api, &api.operator, &release);
    assert_eq!(code, Some(2), "an environment that is not locked cannot be released");
    env.assert_audit_verifies();
}

/// Alertmanager's payload for one alert (its real shape).
fn alertmanager(status: &str, fingerprint: &str, environment: &str, truncated: u64) -> Value {
    json!({
        "version": "4", "groupKey": "{}:{alertname=\"Latency\"}", "truncatedAlerts": truncated,
        "status": status, "receiver": "baton", "groupLabels": {"alertname": "Latency"},
        "commonLabels": {"alertname": "Latency"}, "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": [{
            "status": status,
            "labels": {"alertname": "Latency", "environment": environment},
            "annotations": {"summary": "p95 above 2 s"},
            "startsAt": "2026-12-01T10:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus/graph", "fingerprint": fingerprint
        }]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_resolved_alert_is_acknowledged_until_it_resolves_and_bad_input_is_named() {
    let env = TestEnv::new("gates-alert-ack").await;
    let (api, _procs) = start(&env, "").await;
    let hook = "/v1/webhooks/alertmanager";

    // Alertmanager cut 12 alerts from the group: the incident says so.
    let (status, body) = api
        .post(&api.operator, hook, alertmanager("firing", "ack1", "production", 12))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["truncated_alerts"], 12);
    let id = body["opened"][0].as_str().unwrap().to_owned();
    let (_, list) = api.get(&api.viewer, "/v1/incidents").await;
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list[0]["truncated_alerts"], 12, "{list}");
    let (code, out) = cli(&env, &api, &api.viewer, &["incident", "list"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("Alertmanager cut 12 alert(s) from its group"), "{out}");

    // Resolved by hand while the alert fires: its repeats do not reopen it...
    let (status, _) = api
        .post(&api.operator, &format!("/v1/incidents/{id}/resolve"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, body) = api
        .post(&api.operator, hook, alertmanager("firing", "ack1", "production", 0))
        .await;
    assert_eq!(body["acknowledged"], 1, "{body}");
    assert!(body["opened"].as_array().unwrap().is_empty(), "{body}");
    // ...until it resolves; then a new firing opens a new incident.
    let (_, body) = api
        .post(&api.operator, hook, alertmanager("resolved", "ack1", "production", 0))
        .await;
    assert_eq!(body["unchanged"], 1, "{body}");
    let (_, body) = api
        .post(&api.operator, hook, alertmanager("firing", "ack1", "production", 0))
        .await;
    assert_eq!(body["opened"].as_array().unwrap().len(), 1, "{body}");

    // An alert for an environment the pipeline does not know opens nothing.
    let (status, body) = api
        .post(&api.operator, hook, alertmanager("firing", "qa1", "qa", 0))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["ignored"][0]["environment"], "qa", "{body}");
    assert!(body["opened"].as_array().unwrap().is_empty());

    // Bad input: named, 400, nothing stored.
    let mut wrong_type = alertmanager("firing", "t1", "production", 0);
    wrong_type["groupKey"] = json!(42);
    let mut nul = alertmanager("firing", "n1", "production", 0);
    nul["alerts"][0]["annotations"]["summary"] = json!("p95\u{0}");
    for (path, payload, names) in [
        (hook, wrong_type, "groupKey"),
        (hook, nul, "NUL"),
        (
            "/v1/incidents",
            json!({"environment": "atlantis", "title": "x"}),
            "atlantis",
        ),
        (
            "/v1/incidents",
            json!({"environment": "production", "title": "a\u{0}b"}),
            "title must not contain the NUL",
        ),
    ] {
        let (status, body) = api.post(&api.operator, path, payload).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["code"], "bad_request", "{body}");
        assert!(body["message"].as_str().unwrap().contains(names), "{names}: {body}");
    }
    for query in ["limit=0", "limit=1001", "limit=-5"] {
        for route in ["/v1/runs", "/v1/dlq"] {
            let (status, text) = api.get(&api.viewer, &format!("{route}?{query}")).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{route}?{query}: {text}");
            assert!(text.contains("limit must be from 1 to 1000"), "{text}");
        }
    }
    let n: i64 = sqlx::query_scalar("select count(*) from incidents where environment = 'atlantis' or title like '%p95%' and fingerprint like '%n1'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);

    // A rollback request is its own audit entry naming the token's holder
    // (the alert resolves first: its incident would hold the run).
    let (_, body) = api
        .post(&api.operator, hook, alertmanager("resolved", "ack1", "production", 0))
        .await;
    assert_eq!(body["resolved"].as_array().unwrap().len(), 1, "{body}");
    let run = env.enqueue(&event("ack-rollback", 7, &["src/app.ts"]));
    env.wait_terminal(run, RUN_TIMEOUT).await;
    let (status, body) = api
        .post(
            &api.operator,
            &format!("/v1/runs/{run}/rollback"),
            json!({"reason": "bad release"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (actor, reason): (String, String) =
        sqlx::query_as("select actor, detail->>'reason' from audit where run_id = $1 and kind = 'rollback_requested'")
            .bind(run)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(actor, "otto");
    assert!(reason.starts_with("bad release"), "{reason}");

    // A merge event refused for what its bytes are is not replayed: it would be refused again.
    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        baton_shared::topology::EVENTS_EXCHANGE.into(),
        baton_shared::topology::MERGE_EVENTS_KEY.into(),
        Default::default(),
        br#"{"v": 1, "not": "an event"}"#,
        Default::default(),
    )
    .await
    .unwrap();
    let mut id = None;
    env.wait_until("the malformed event's dead letter", RUN_TIMEOUT, async || {
        id = sqlx::query_scalar::<_, i64>(
            "select id from dead_letters where origin = 'baton.merge-events' and reason like 'malformed%'",
        )
        .fetch_optional(&env.pool)
        .await
        .unwrap();
        id.is_some()
    })
    .await;
    let (status, body) = api
        .post(&api.operator, &format!("/v1/dlq/{}/replay", id.unwrap()), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "would_be_refused", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_commit_is_deployed_again_by_an_operator_redeploy_through_the_same_gates() {
    let env = TestEnv::new("gates-redeploy").await;
    let (api, _procs) = start(&env, "").await;
    // Production apply fails: the run is rolled back.
    env.script(baton_tests::with_seed_facts(json!({
        "default": {"delay_ms": 20},
        "execute": {"apply.production": {"fail": {"code": "rollout_failed", "message": "pods crash", "retryable": false}}}
    })));
    let merge = event("redeploy", 1, &["src/app.ts"]);
    let first = env.enqueue(&merge);
    let v = env.wait_terminal(first, RUN_TIMEOUT).await;
    assert_eq!(v.status, "rolled_back", "{}", env.diagnostics());
    // CI sending the same event again is the same run, still rolled back.
    assert_eq!(env.enqueue(&merge), first);
    assert_eq!(env.run(first).await.unwrap().status, "rolled_back");

    // The cause is fixed elsewhere (the cluster); production is held by an
    // incident while the operator redeploys, so the new run waits at admission.
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 20}})));
    let incident = open_incident(&env, &api, "production", "node pool");
    let path = format!("/v1/runs/{first}/redeploy");
    // Viewers may not; a reason is required.
    assert_eq!(
        api.post(&api.viewer, &path, json!({"reason": "x"})).await.0,
        StatusCode::FORBIDDEN
    );
    let (status, e) = api.post(&api.operator, &path, json!({"reason": ""})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    let (code, out) = cli(
        &env,
        &api,
        &api.operator,
        &[
            "--json",
            "redeploy",
            &first.to_string(),
            "--reason",
            "node pool replaced",
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    let second: Uuid = json_of(&out)["run_id"].as_str().unwrap().parse().unwrap();
    assert_ne!(second, first);
    let v = env.wait_run_status(second, "blocked", RUN_TIMEOUT).await;
    assert_eq!(v.hold.as_ref().unwrap().gate, "incident");
    assert_eq!(v.redeploy_of, Some(first));
    assert_eq!(v.commit_sha, env.run(first).await.unwrap().commit_sha);
    // A second redeploy while this one has not ended is refused, naming it.
    let (status, e) = api.post(&api.operator, &path, json!({"reason": "again"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{e}");
    assert!(e["message"].as_str().unwrap().contains(&second.to_string()), "{e}");

    let (code, out) = cli(&env, &api, &api.operator, &["--json", "incident", "resolve", &incident]);
    assert_eq!(code, Some(0), "{out}");
    let v = env.wait_terminal(second, RUN_TIMEOUT).await;
    assert_eq!(v.status, "succeeded", "{}", env.diagnostics());
    // Through the same gates, and audited on both runs.
    assert!(!gate_entries(&v, "image-match", "pass").is_empty());
    let created = v.history.iter().find(|h| h.kind == "run_created").unwrap();
    assert_eq!(created.detail["redeploy_of"], first.to_string());
    assert_eq!(created.detail["reason"], "node pool replaced");
    let earlier = env.run(first).await.unwrap();
    let link = earlier.history.iter().find(|h| h.kind == "redeployed").unwrap();
    assert_eq!((link.actor.as_str(), &link.detail["run_id"]), ("otto", &json!(second)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_rollout_is_undone_and_a_daemon_killed_while_undoing_it_leaves_that_to_its_successor() {
    let env = TestEnv::new("gates-partial").await;
    let t = configure(&env, "");
    // Scripted: the rollout and its undo both take long, so both can be interrupted.
    env.script(baton_tests::with_seed_facts(json!({
        "default": {"delay_ms": 20},
        "execute": {"apply.production": {"delay_ms": 600000}},
        "compensate": {"apply.production": {"delay_ms": 600000}}
    })));
    let scheduler = env.scheduler("scheduler").await;
    let api = Api::of(&scheduler, &t);
    let others: Vec<&str> = SEED_BINDINGS
        .iter()
        .copied()
        .filter(|b| *b != "production.production-apply")
        .collect();
    let _rest = env.daemon("rest", &others).await;
    let mut first = env.daemon("apply-a", &["production.production-apply"]).await;
    let run = env.enqueue(&event("partial", 1, &["src/app.ts"]));
    env.wait_step(run, "apply.production", "running", RUN_TIMEOUT).await;

    // The operator cancels mid-rollout: the rollout stops, and since a
    // production-apply attempt may leave part of its work, it is undone.
    let (code, out) = cli(
        &env,
        &api,
        &api.operator,
        &["--json", "cancel", &run.to_string(), "--reason", "wrong release"],
    );
    assert_eq!(code, Some(0), "{out}");
    // (Waiting for `started` to be recorded: the delivery is then acknowledged, and
    // only the lease can tell the scheduler the daemon died.)
    env.wait_until(
        "the undo of the cancelled rollout to be running",
        RUN_TIMEOUT,
        async || {
            env.run(run).await.is_some_and(|v| {
                v.step("apply.production")
                    .unwrap()
                    .attempts
                    .iter()
                    .any(|a| a.kind == baton_shared::protocol::JobKind::Compensate && a.status == "running")
            })
        },
    )
    .await;
    // Its daemon dies while undoing it.
    first.kill();
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 20}})));
    let _second = env.daemon("apply-b", &["production.production-apply"]).await;

    let v = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(v.status, "rolled_back", "{}", env.diagnostics());
    let apply = v.step("apply.production").unwrap();
    assert_eq!(apply.status, "compensated");
    let attempts: Vec<(&str, &str, Option<&str>)> = apply
        .attempts
        .iter()
        .map(|a| {
            (
                if a.kind == baton_shared::protocol::JobKind::Execute {
                    "execute"
                } else {
                    "compensate"
                },
                a.status.as_str(),
                a.daemon.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        attempts,
        [
            ("execute", "failed", Some("apply-a")),
            ("compensate", "lost", Some("apply-a")),
            ("compensate", "succeeded", Some("apply-b")),
        ],
        "{:?}",
        apply.attempts
    );
    assert_eq!(apply.attempts[0].error.as_ref().unwrap().code, "cancelled");
    let undos = env.starts(run, "apply.production", "compensate");
    assert_eq!(undos.len(), 2, "{undos:?}");
    assert_ne!(undos[0].pid, undos[1].pid, "the successor did it");
}

const INFRA_PIPELINE: &str = r#"
[pipeline]
name = "infra"
promotion = ["staging", "production"]

[[step]]
id = "infra.staging.plan"
role = "infrastructure"
zone = "staging"
action = "plan"
params = { blast_radius_limit = 5, dir = "infra" }

[[step]]
id = "infra.staging"
role = "infrastructure"
zone = "staging"
action = "apply"
needs = ["infra.staging.plan"]
gates = ["blast-radius"]
compensate = "reapply-previous"
params = { blast_radius_limit = 5, dir = "infra" }
"#;

/// The blast-radius gate on real facts: the real infrastructure daemon plans a
/// Terraform change of 7 resources (real Terraform, state in PostgreSQL), the
/// run waits for an approval that shows the addresses and the saved plan's
/// hash, and after it the apply applies exactly that plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terraform_change_over_the_blast_radius_waits_for_approval_of_its_plan() {
    use baton_shared::testing::GitRepo;

    let env = TestEnv::new("gates-blast").await;
    let pipeline = env.dir.join("infra.toml");
    std::fs::write(&pipeline, INFRA_PIPELINE).unwrap();
    env.set_scheduler_env("BATON_SCHEDULER__PIPELINE", pipeline.to_str().unwrap());
    let t = configure(&env, "");
    let scheduler = env.scheduler("scheduler").await;
    let api = Api::of(&scheduler, &t);

    // The zone's Terraform state database, and the daemon.
    let state_db = format!("{}_tf", env.db_name);
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {state_db}")))
        .execute(&env.pool)
        .await
        .unwrap();
    let state_url = format!("postgres://postgres@127.0.0.1:5432/{state_db}?sslmode=disable");
    let config = env.dir.join("infra-staging.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nzone = \"staging\"\n\n[infrastructure]\nrepos_dir = {:?}\nwork_dir = {:?}\nstate_url = {state_url:?}\n",
            env.dir.join("infra-repos").display().to_string(),
            env.dir.join("infra-work").display().to_string(),
        ),
    )
    .unwrap();
    let daemon = baton_tests::RealDaemon::start(&env, "infra-staging", "baton-infrastructure", config, &[]);

    let repo = GitRepo::new();
    repo.write(
        "infra/main.tf",
        "terraform {\n  backend \"pg\" {}\n}\nresource \"terraform_data\" \"r\" {\n  count = 7\n  input = \"r-${count.index}\"\n}\n",
    );
    let commit = repo.commit("seven resources");
    let mut ev = event("infra", 1, &["infra/main.tf"]);
    ev["repository"] = json!(repo.url());
    ev["commit_sha"] = json!(commit);
    let run = env.enqueue(&ev);

    let v = env.wait_run_status(run, "awaiting_approval", RUN_TIMEOUT).await;
    let hold = v.step("infra.staging").unwrap().hold.clone().expect("the apply waits");
    assert!(hold.approval && hold.gate == "blast-radius", "{hold:?}");
    let plan_sha = v.step("infra.staging.plan").unwrap().outputs["plan_sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    for want in [
        "7 resources change, above the blast radius limit of 5",
        "terraform_data.r[0] (create)",
        "terraform_data.r[6] (create)",
        &format!("saved plan sha256:{} of infra.staging.plan", &plan_sha[..16]),
    ] {
        assert!(hold.reason.contains(want), "{want:?} not in {}", hold.reason);
    }
    // Nothing is applied while it waits.
    let applied: Option<i64> = sqlx::query_scalar("select count(*) from baton_terraform.applies")
        .fetch_one(
            &mut <sqlx::PgConnection as sqlx::Connection>::connect(&state_url)
                .await
                .unwrap(),
        )
        .await
        .ok();
    assert_eq!(applied, Some(0));
    assert_eq!(
        hold.subject.as_deref(),
        Some(plan_sha.as_str()),
        "what an approval approves"
    );

    // While it waits, someone applies another change to the same state with
    // Terraform itself: the saved plan goes stale.
    let outside = env.dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(
        outside.join("main.tf"),
        "terraform {\n  backend \"pg\" {}\n}\nresource \"terraform_data\" \"other\" {\n  input = \"made by hand\"\n}\n",
    )
    .unwrap();
    for args in [
        &["init", "-input=false", "-no-color"][..],
        &["apply", "-input=false", "-no-color", "-auto-approve"],
    ] {
        let out = std::process::Command::new("terraform")
            .args(args)
            .current_dir(&outside)
            .env("PG_CONN_STR", &state_url)
            .env("PG_SCHEMA_NAME", "tf_staging_infra")
            .env("CHECKPOINT_DISABLE", "1")
            .env("TF_DATA_DIR", outside.join(".terraform"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "terraform {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The approval is of the shown plan; the apply finds it stale, plans
    // again (now also deleting what was made by hand) and asks again.
    let (status, e) = api
        .post(
            &api.alice,
            &format!("/v1/runs/{run}/approve"),
            json!({"step": "infra.staging", "plan_hash": v.plan_hash, "subject": plan_sha, "comment": "seven new resources, expected"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{e}");
    let mut v = env.run(run).await.unwrap();
    env.wait_until("the apply to ask again", RUN_TIMEOUT, async || {
        v = env.run(run).await.unwrap();
        v.history.iter().any(|h| h.kind == "approval_asked_again") && v.status == "awaiting_approval"
    })
    .await;
    let hold = v
        .step("infra.staging")
        .unwrap()
        .hold
        .clone()
        .expect("the apply waits again");
    let new_sha = hold.subject.clone().expect("the new plan's hash");
    assert_ne!(new_sha, plan_sha);
    for want in [
        "8 resources change, above the blast radius limit of 5",
        "terraform_data.other (delete)",
        &format!("saved plan sha256:{} of infra.staging", &new_sha[..16]),
    ] {
        assert!(hold.reason.contains(want), "{want:?} not in {}", hold.reason);
    }
    // An approval naming the stale plan is refused; the approval of the
    // stale plan does not count for the new one.
    let (status, e) = api
        .post(
            &api.alice,
            &format!("/v1/runs/{run}/approve"),
            json!({"step": "infra.staging", "plan_hash": v.plan_hash, "subject": plan_sha, "comment": "again"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{e}");
    assert_eq!(e["code"], "plan_changed", "{e}");
    // The web view's approval form carries the plan it shows.
    let web = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = web
        .post(format!("{}/ui/login", api.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}", api.alice))
        .send()
        .await
        .unwrap();
    let cookie = login.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let page = web
        .get(format!("{}/ui/runs/{run}", api.base))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains(&format!(r#"name="subject" value="{new_sha}""#)), "{page}");
    assert!(
        page.contains(&format!(
            "applying saved plan <code class=\"subject\">{}",
            &new_sha[..16]
        )),
        "{page}"
    );
    // One naming no plan at all is refused too, and says which plan to name.
    let (status, e) = api
        .post(
            &api.alice,
            &format!("/v1/runs/{run}/approve"),
            json!({"step": "infra.staging", "plan_hash": v.plan_hash, "comment": "again"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["code"], "subject_required", "{e}");
    assert!(e["message"].as_str().unwrap().contains(&new_sha), "{e}");
    assert!(env.run(run).await.unwrap().status == "awaiting_approval");

    let (status, e) = api
        .post(
            &api.alice,
            &format!("/v1/runs/{run}/approve"),
            json!({"step": "infra.staging", "plan_hash": v.plan_hash, "subject": new_sha, "comment": "and remove the hand-made one"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{e}");
    let v = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(v.status, "succeeded", "{}", env.diagnostics());
    let applied = &v.step("infra.staging").unwrap().outputs;
    assert_eq!(
        applied["plan_sha256"],
        json!(new_sha),
        "the apply applied the plan approved last"
    );
    assert_eq!(applied["resources_changed"], 8);
    assert_eq!(applied["state_after"]["serial"], 2);
    // Both approvals are recorded with what they approved.
    let subjects: Vec<String> =
        sqlx::query_scalar("select subject from approvals where run_id = $1 and decision = 'approve' order by id")
            .bind(run)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(subjects, [plan_sha.clone(), new_sha.clone()]);
    assert!(
        gate_entries(&v, "blast-radius", "pass")[0]["reason"]
            .as_str()
            .unwrap()
            .contains("approved by alice")
    );

    drop(daemon);
    sqlx::query(sqlx::AssertSqlSafe(format!("drop database {state_db} with (force)")))
        .execute(&env.pool)
        .await
        .unwrap();
}
