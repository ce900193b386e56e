//! One OpenTelemetry trace per run, received by a real OTLP/HTTP endpoint built
//! in the test from the opentelemetry-proto types, through a scheduler that is
//! killed and restarted mid-run and a failure that is compensated.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use baton_tests::{EVERYTHING, SEED_BINDINGS, TestEnv, event, free_port};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::json;

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
struct Received {
    service: String,
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    start: u64,
    end: u64,
    attributes: HashMap<String, String>,
}

type Spans = Arc<Mutex<Vec<Received>>>;

async fn receive(State(spans): State<Spans>, body: Bytes) -> Vec<u8> {
    let req = ExportTraceServiceRequest::decode(body).expect("an OTLP export request");
    let mut out = spans.lock().unwrap();
    for rs in req.resource_spans {
        let attr = |kv: &opentelemetry_proto::tonic::common::v1::KeyValue| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        };
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().map(attr).find(|(k, _)| k == "service.name"))
            .map(|(_, v)| v)
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(Received {
                    service: service.clone(),
                    trace_id: hex::encode(&s.trace_id),
                    span_id: hex::encode(&s.span_id),
                    parent: hex::encode(&s.parent_span_id),
                    name: s.name.clone(),
                    start: s.start_time_unix_nano,
                    end: s.end_time_unix_nano,
                    attributes: s.attributes.iter().map(attr).collect(),
                });
            }
        }
    }
    ExportTraceServiceResponse::default().encode_to_vec()
}

async fn receiver() -> (String, Spans) {
    let spans: Spans = Arc::default();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", free_port())).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/v1/traces", post(receive))
        .with_state(spans.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_one_trace_across_a_scheduler_restart_and_a_compensation() {
    let env = TestEnv::new("traces").await;
    let (endpoint, spans) = receiver().await;
    let sentinel = format!("SENTINEL{}", uuid::Uuid::new_v4().simple());
    env.set_scheduler_env("BATON_TELEMETRY__OTLP_ENDPOINT", &endpoint);
    env.set_scheduler_env(
        "BATON_DATABASE__URL",
        &env.db_url.replace("postgres@", &format!("postgres:{sentinel}@")),
    );
    env.script(baton_tests::with_seed_facts(json!({
        "default": {"delay_ms": 150},
        "execute": {
            // Long enough that the test sees it running (a 150 ms window can
            // fall between two polls on a loaded machine).
            "db.production": {"delay_ms": 3000},
            "apply.production": {"delay_ms": 20000},
            "cdn": {"delay_ms": 300, "fail": {"code": "purge_failed", "message": "purge incomplete", "retryable": false}},
            "build": {"fail_first": 1}
        }
    })));
    let mut first = env.scheduler("scheduler-1").await;
    let _daemon = env
        .daemon_with(
            "daemon",
            SEED_BINDINGS,
            &[("BATON_TELEMETRY__OTLP_ENDPOINT", &endpoint)],
        )
        .await;
    let run = env.enqueue(&event("traced", 80, EVERYTHING));
    env.wait_step(run, "db.production", "running", RUN_TIMEOUT).await;
    first.kill();
    let _second = env.scheduler("scheduler-2").await;
    let view = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(view.status, "rolled_back", "{view:#?}");

    let attempts: usize = view.steps.iter().map(|s| s.attempts.len()).sum();
    let mut all = Vec::new();
    env.wait_until(
        "the run span and every attempt span to arrive",
        RUN_TIMEOUT,
        async || {
            all = spans.lock().unwrap().clone();
            let sched = all.iter().filter(|s| s.service == "baton-scheduler").count();
            let root = all
                .iter()
                .any(|s| s.name.starts_with("run ") && s.parent.trim_start_matches('0').is_empty());
            root && sched > attempts
        },
    )
    .await;
    // Daemon spans arrive in batches; wait for one per attempt the daemon ran.
    let executed = env.exec_log().iter().filter(|l| l.event == "start").count();
    env.wait_until("a daemon span for every job the daemon ran", RUN_TIMEOUT, async || {
        all = spans.lock().unwrap().clone();
        all.iter().filter(|s| s.service == "baton-test-daemon").count() >= executed
    })
    .await;

    let root = all.iter().find(|s| s.name.starts_with("run ")).unwrap();
    let traces: HashSet<&str> = all.iter().map(|s| s.trace_id.as_str()).collect();
    assert_eq!(
        traces.len(),
        1,
        "one trace for the whole run, across both schedulers: {traces:?}"
    );
    assert_eq!(root.attributes["baton.run_id"], run.to_string());
    assert_eq!(root.attributes["baton.outcome"], "rolled_back");

    let sched: Vec<&Received> = all
        .iter()
        .filter(|s| s.service == "baton-scheduler" && s.span_id != root.span_id)
        .collect();
    assert_eq!(sched.len(), attempts, "one span per attempt");
    for s in &sched {
        assert_eq!(s.parent, root.span_id, "{} is a child of the run span", s.name);
    }
    let by_id: HashMap<&str, &Received> = all.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let daemon: Vec<&Received> = all.iter().filter(|s| s.service == "baton-test-daemon").collect();
    for d in &daemon {
        let parent = by_id
            .get(d.parent.as_str())
            .unwrap_or_else(|| panic!("daemon span {} has no parent", d.name));
        assert_eq!(
            parent.service, "baton-scheduler",
            "{} hangs under a step attempt span",
            d.name
        );
        assert_eq!(parent.parent, root.span_id);
        assert_eq!(d.attributes["messaging.system"], "rabbitmq");
        assert_eq!(d.attributes["baton.step_id"], parent.attributes["baton.step_id"]);
    }
    let compensations = sched.iter().filter(|s| s.name.starts_with("compensate ")).count();
    let compensated = view.steps.iter().filter(|s| s.status == "compensated").count();
    assert!(compensated >= 5, "{view:#?}");
    assert_eq!(
        compensations, compensated,
        "every compensation is a span under the failing run"
    );
    let build: Vec<&&Received> = sched.iter().filter(|s| s.name == "execute build").collect();
    assert_eq!(build.len(), 2, "the retried build shows both attempts");
    for s in &all {
        assert!(s.end >= s.start && s.end > 0, "{} ended", s.name);
    }
    let text = format!("{all:?}");
    assert!(!text.contains(&sentinel), "no secret in spans");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_wait_is_a_span_under_the_run() {
    let env = TestEnv::new("traces-gate").await;
    let (endpoint, spans) = receiver().await;
    env.set_scheduler_env("BATON_TELEMETRY__OTLP_ENDPOINT", &endpoint);
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 20}})));
    let _scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    // An incident open in production holds the whole run (production is its
    // target) until an operator resolves it.
    let out = env.baton(&[
        "--json",
        "incident",
        "open",
        "--environment",
        "production",
        "--title",
        "checkout errors",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let opened: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let incident = opened[0]["id"].as_str().unwrap().to_owned();
    let run = env.enqueue(&event("soaked", 81, &["src/app.ts"]));
    let held = env.wait_run_status(run, "blocked", RUN_TIMEOUT).await;
    assert_eq!(held.hold.as_ref().unwrap().gate, "incident");
    let out = env.baton(&["incident", "resolve", &incident]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let view = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(view.status, "succeeded", "{view:#?}");
    let mut all = Vec::new();
    env.wait_until("the run span to arrive", RUN_TIMEOUT, async || {
        all = spans.lock().unwrap().clone();
        all.iter().any(|s| s.name.starts_with("run "))
    })
    .await;
    let root = all.iter().find(|s| s.name.starts_with("run ")).unwrap();
    let wait = all
        .iter()
        .find(|s| s.name == "gate wait run")
        .unwrap_or_else(|| panic!("no gate wait span: {all:#?}"));
    assert_eq!(wait.parent, root.span_id);
    assert_eq!(wait.trace_id, root.trace_id);
    assert_eq!(wait.attributes["baton.gate"], "incident");
    assert_eq!(wait.attributes["baton.wait.outcome"], "passed");
    let step = all.iter().find(|s| s.name == "execute build").unwrap();
    // Both are written by one transition; its audit rows are stamped when they are
    // persisted, a moment after the dispatch time the attempt records.
    let slack = Duration::from_millis(100).as_nanos() as u64;
    assert!(
        step.start + slack >= wait.end,
        "the first step starts as the run's wait ends"
    );
    assert!(step.start > wait.start, "the step waited");
}
