//! Debian's Alertmanager (a real process) with `ops/alertmanager/alertmanager.yml`
//! sending to a real scheduler: a firing alert opens an incident that holds a
//! production run, its resolution releases it, a 300-alert group arrives whole,
//! and an alert silenced before it resolved (no resolved notification) is
//! closed by reconciliation with Alertmanager's alerts.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use baton_tests::{TestEnv, event, free_port};
use chrono::Utc;
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(120);

/// Debian's binary; the test says so plainly where it is missing.
fn alertmanager_binary() -> &'static str {
    for b in ["/usr/bin/prometheus-alertmanager", "/usr/bin/alertmanager"] {
        if Path::new(b).exists() {
            return b;
        }
    }
    panic!("Alertmanager is not installed: apt-get install prometheus-alertmanager (.ci/run does)");
}

struct Alertmanager {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Alertmanager {
    /// Starts Alertmanager on `port` with the shipped configuration, sending to
    /// `scheduler` with `token`, with timings short enough for a test.
    async fn start(env: &TestEnv, port: u16, scheduler: &str, token: &str) -> Self {
        let shipped = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../ops/alertmanager/alertmanager.yml"
        ))
        .unwrap();
        let token_file = env.dir.join("baton-token");
        std::fs::write(&token_file, token).unwrap();
        let config = shipped
            .replace("http://baton-scheduler:8080", scheduler)
            .replace("/etc/alertmanager/baton-token", token_file.to_str().unwrap())
            .replace("group_wait: 30s", "group_wait: 1s")
            .replace("group_interval: 5m", "group_interval: 1s")
            .replace("repeat_interval: 4h", "repeat_interval: 1h");
        assert!(
            config.contains(scheduler) && config.contains("group_wait: 1s"),
            "{config}"
        );
        let file = env.dir.join("alertmanager.yml");
        std::fs::write(&file, config).unwrap();
        let data = env.dir.join("alertmanager-data");
        std::fs::create_dir_all(&data).unwrap();
        let log = std::fs::File::create(env.dir.join("alertmanager.log")).unwrap();
        let child = Command::new(alertmanager_binary())
            .arg(format!("--config.file={}", file.display()))
            .arg(format!("--storage.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let am = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        env.wait_until("Alertmanager to be ready", TIMEOUT, async || {
            am.http
                .get(format!("{}/-/ready", am.base))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        am
    }

    /// Posts alerts as Prometheus does (`POST /api/v2/alerts`).
    async fn post(&self, alerts: Value) {
        let r = self
            .http
            .post(format!("{}/api/v2/alerts", self.base))
            .json(&alerts)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{:?}", r.text().await);
    }

    async fn silence(&self, alertname: &str) {
        let now = Utc::now();
        let r = self
            .http
            .post(format!("{}/api/v2/silences", self.base))
            .json(&json!({
                "matchers": [{"name": "alertname", "value": alertname, "isRegex": false, "isEqual": true}],
                "startsAt": now.to_rfc3339(),
                "endsAt": (now + chrono::Duration::hours(1)).to_rfc3339(),
                "createdBy": "baton-tests",
                "comment": "maintenance"
            }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{:?}", r.text().await);
    }
}

fn alert(name: &str, instance: &str, resolved: bool) -> Value {
    let now = Utc::now();
    let mut a = json!({
        "labels": {"alertname": name, "environment": "production", "instance": instance},
        "annotations": {"summary": format!("{name} on {instance}")},
        "startsAt": (now - chrono::Duration::minutes(1)).to_rfc3339(),
        "generatorURL": "http://prometheus/graph"
    });
    if resolved {
        a["endsAt"] = json!(now.to_rfc3339());
    }
    a
}

async fn open_incidents(env: &TestEnv, like: &str) -> i64 {
    sqlx::query_scalar(
        "select count(*) from incidents where source = 'alertmanager' and resolved_at is null and title like $1",
    )
    .bind(format!("{like}%"))
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alertmanager_opens_an_incident_that_holds_a_run_resolves_it_and_sends_a_300_alert_group_whole() {
    let env = TestEnv::new("alertmanager").await;
    // Scripted facts: the seed pipeline's production gates read them.
    env.script(baton_tests::with_seed_facts(serde_json::json!({})));
    let am_port = free_port();
    let scheduler = env.scheduler("scheduler").await;
    let am = Alertmanager::start(&env, am_port, scheduler.api.as_ref().unwrap(), &env.operator_token).await;

    // Fire: an incident opens and holds a production run at admission.
    am.post(json!([alert("HighErrorRate", "web-1", false)])).await;
    env.wait_until("the incident to open", TIMEOUT, async || {
        open_incidents(&env, "HighErrorRate").await == 1
    })
    .await;
    let run = env.enqueue(&event("alerted", 1, &["src/app.ts"]));
    let v = env.wait_run_status(run, "blocked", TIMEOUT).await;
    assert_eq!(v.hold.as_ref().unwrap().gate, "incident");
    // Resolve: Alertmanager's resolved notification closes it; the run goes on.
    am.post(json!([alert("HighErrorRate", "web-1", true)])).await;
    env.wait_until("the incident to close", TIMEOUT, async || {
        open_incidents(&env, "HighErrorRate").await == 0
    })
    .await;
    env.wait_until("the run to leave its hold", TIMEOUT, async || {
        env.run(run).await.unwrap().status != "blocked"
    })
    .await;

    // A group of 300 alerts: over api.max_body_bytes, within the webhook's own limit.
    let flood: Vec<Value> = (0..300)
        .map(|i| alert("Flood", &format!("node-{i:03}"), false))
        .collect();
    am.post(Value::Array(flood)).await;
    env.wait_until("300 incidents from one group", TIMEOUT, async || {
        open_incidents(&env, "Flood").await == 300
    })
    .await;
    let resolved: Vec<Value> = (0..300)
        .map(|i| alert("Flood", &format!("node-{i:03}"), true))
        .collect();
    am.post(Value::Array(resolved)).await;
    env.wait_until("the 300 incidents to close", TIMEOUT, async || {
        open_incidents(&env, "Flood").await == 0
    })
    .await;
    // Every incident was closed by a resolved notification (no reconciliation here).
    let by_webhook: i64 =
        sqlx::query_scalar("select count(*) from audit where kind = 'incident_resolved' and actor = 'baton-tests'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(by_webhook, 301);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_silenced_before_it_resolved_is_closed_by_reconciliation() {
    let env = TestEnv::new("alertmanager-silence").await;
    // Scripted facts: the seed pipeline's production gates read them.
    env.script(baton_tests::with_seed_facts(serde_json::json!({})));
    let am_port = free_port();
    env.scheduler_config(&format!(
        "[api]\nalertmanager_url = \"http://127.0.0.1:{am_port}\"\nalertmanager_reconcile_secs = 1\n"
    ));
    let scheduler = env.scheduler("scheduler").await;
    let am = Alertmanager::start(&env, am_port, scheduler.api.as_ref().unwrap(), &env.operator_token).await;

    am.post(json!([alert("DiskFull", "db-1", false)])).await;
    env.wait_until("the DiskFull incident to open", TIMEOUT, async || {
        open_incidents(&env, "DiskFull").await == 1
    })
    .await;
    let id: uuid::Uuid = sqlx::query_scalar("select id from incidents where title like 'DiskFull%'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    // Silenced, it stays in Alertmanager (suppressed): reconciliation keeps the incident.
    am.silence("DiskFull").await;
    // Resolved while silenced: Alertmanager sends nothing; reconciliation closes it.
    am.post(json!([alert("DiskFull", "db-1", true)])).await;
    env.wait_until(
        "reconciliation to close the silenced alert's incident",
        TIMEOUT,
        async || open_incidents(&env, "DiskFull").await == 0,
    )
    .await;
    let how: Vec<(String, String)> =
        sqlx::query_as("select kind, actor from audit where kind like 'incident_%' and detail->>'incident' = $1")
            .bind(id.to_string())
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        how,
        [
            ("incident_opened".to_owned(), "baton-tests".to_owned()),
            (
                "incident_reconciled".to_owned(),
                "alertmanager-reconciliation".to_owned()
            )
        ]
    );
}
