//! `ops/rabbitmq/definitions.json` imported into a test vhost of the real
//! broker: each component's user can do its job and nothing more.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use baton_shared::topology::{self, DEAD_EXCHANGE, DEFAULT_DELIVERY_LIMIT, EVENTS_EXCHANGE, JOBS_EXCHANGE};
use baton_tests::{TestEnv, bin, event};
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{Value, json};
use uuid::Uuid;

const RUN_TIMEOUT: Duration = Duration::from_secs(90);

fn definitions() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/rabbitmq/definitions.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The definitions' users, renamed for this test, with passwords; deleted on drop.
struct Users {
    vhost: String,
    names: BTreeMap<String, String>,
}

impl Users {
    fn import(env: &TestEnv) -> Self {
        let suffix = &Uuid::new_v4().simple().to_string()[..8];
        let mut defs = definitions();
        let mut text = defs.to_string();
        let mut names = BTreeMap::new();
        for u in defs["users"].as_array().unwrap() {
            let name = u["name"].as_str().unwrap().to_owned();
            names.insert(name.clone(), format!("{name}-{suffix}"));
        }
        for (from, to) in &names {
            text = text.replace(&format!("\"{from}\""), &format!("\"{to}\""));
        }
        defs = serde_json::from_str(&text).unwrap();
        let vhost = env.vhost.clone();
        for key in ["permissions", "policies", "queues", "exchanges", "bindings"] {
            for item in defs[key].as_array_mut().unwrap() {
                item["vhost"] = json!(vhost);
            }
        }
        defs["vhosts"] = json!([{"name": vhost}]);
        let file = env.dir.join("definitions.json");
        std::fs::write(&file, defs.to_string()).unwrap();
        let out = Command::new("rabbitmqctl")
            .args(["import_definitions", file.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "import_definitions: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for user in names.values() {
            let ok = Command::new("rabbitmqctl")
                .args(["change_password", user, "test-password"])
                .output()
                .unwrap()
                .status
                .success();
            assert!(ok, "change_password {user}");
        }
        Self { vhost, names }
    }

    fn url(&self, user: &str) -> String {
        format!(
            "amqp://{}:test-password@127.0.0.1:5672/{}",
            self.names[user], self.vhost
        )
    }

    async fn connect(&self, user: &str) -> Connection {
        Connection::connect(&self.url(user), ConnectionProperties::default())
            .await
            .unwrap()
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        for user in self.names.values() {
            let _ = Command::new("rabbitmqctl").args(["delete_user", user]).output();
        }
    }
}

async fn consume(conn: &Connection, queue: &str) -> Result<(), String> {
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.basic_consume(
        queue.into(),
        "probe".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .map(drop)
    .map_err(|e| e.to_string())
}

async fn publish(conn: &Connection, exchange: &str, key: &str) -> Result<(), String> {
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let confirm = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    if confirm.is_ack() {
        Ok(())
    } else {
        Err(format!("{confirm:?}"))
    }
}

fn refused(res: Result<(), String>, what: &str) {
    let err = res.expect_err(what);
    assert!(
        err.contains("ACCESS_REFUSED") || err.contains("ACCESS-REFUSED"),
        "{what}: {err}"
    );
}

#[test]
fn definitions_match_the_topology_baton_declares() {
    let defs = definitions();
    for q in defs["queues"].as_array().unwrap() {
        let args = &q["arguments"];
        assert_eq!(args["x-queue-type"], "quorum", "{q}");
        if q["name"] != topology::DEAD_QUEUE {
            assert_eq!(args["x-dead-letter-exchange"], DEAD_EXCHANGE, "{q}");
            assert_eq!(args["x-dead-letter-strategy"], "at-least-once", "{q}");
            assert_eq!(args["x-overflow"], "reject-publish", "{q}");
            assert_eq!(args["x-delivery-limit"], DEFAULT_DELIVERY_LIMIT, "{q}");
        }
    }
    // Every results queue the scheduler declares, bound as it binds it.
    for shard in 0..topology::RESULT_SHARDS {
        let queue = topology::result_shard_queue(shard);
        assert!(
            defs["queues"]
                .as_array()
                .unwrap()
                .iter()
                .any(|q| q["name"] == queue.as_str()),
            "{queue} is not in the definitions"
        );
        assert!(
            defs["bindings"]
                .as_array()
                .unwrap()
                .iter()
                .any(|b| b["source"] == topology::RESULTS_EXCHANGE
                    && b["destination"] == queue.as_str()
                    && b["routing_key"] == format!("{}.{shard}", topology::RESULTS_KEY).as_str()),
            "{queue} is not bound to its routing key in the definitions"
        );
    }
    for b in defs["bindings"].as_array().unwrap() {
        if b["source"] == JOBS_EXCHANGE {
            let (zone, role) = b["routing_key"].as_str().unwrap().split_once('.').unwrap();
            assert_eq!(b["destination"], topology::job_queue(zone, role));
        }
    }
    assert!(
        defs["users"]
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["name"] != "guest" && u["password_hash"] == "")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_component_can_do_its_job_and_nothing_more() {
    let env = TestEnv::new("permissions").await;
    let users = Users::import(&env);

    let staging = users.connect("baton-daemon-staging").await;
    consume(&staging, "baton.staging.db-migration")
        .await
        .expect("a staging daemon reads its own queue");
    refused(
        consume(&staging, "baton.production.db-migration").await,
        "staging daemon reading production",
    );
    refused(
        publish(&staging, JOBS_EXCHANGE, "staging.db-migration").await,
        "daemon publishing a job",
    );
    let ch = staging.create_channel().await.unwrap();
    refused(
        ch.queue_declare(
            "baton.staging.extra".into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .map(drop)
        .map_err(|e| e.to_string()),
        "daemon declaring topology",
    );

    let ci = users.connect("baton-ci").await;
    publish(&ci, EVENTS_EXCHANGE, "merge")
        .await
        .expect("CI publishes merge events");
    refused(
        publish(&ci, JOBS_EXCHANGE, "production.production-apply").await,
        "CI publishing a job",
    );
    refused(consume(&ci, "baton.merge-events").await, "CI reading merge events");
    refused(
        consume(&ci, "baton.production.production-apply").await,
        "CI reading jobs",
    );
}

fn least_privilege(url: String) -> Vec<(&'static str, String)> {
    vec![
        ("BATON_AMQP__URL", url),
        ("BATON_DAEMON__DECLARE_QUEUE", "false".into()),
    ]
}

fn refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_runs_with_least_privilege_users() {
    let env = TestEnv::new("least-privilege").await;
    let users = Users::import(&env);
    env.script(json!({"default": {"delay_ms": 20}}));
    env.set_scheduler_env("BATON_AMQP__URL", &users.url("baton-scheduler"));
    let _scheduler = env.scheduler("scheduler").await;
    let ci_env = least_privilege(users.url("baton-daemon-ci"));
    let staging_env = least_privilege(users.url("baton-daemon-staging"));
    let production_env = least_privilege(users.url("baton-daemon-production"));
    let _ci = env.daemon_with("ci", &["ci.container-build"], &refs(&ci_env)).await;
    let _staging = env
        .daemon_with("staging", &["staging.staging-verify"], &refs(&staging_env))
        .await;
    let _production = env
        .daemon_with(
            "production",
            &["production.backup", "production.production-apply"],
            &refs(&production_env),
        )
        .await;

    let ev = event("least", 50, &["src/app.ts"]);
    let file = env.event_file(&ev);
    let out = Command::new(bin("baton-e2e"))
        .args(["enqueue", "--event", file.to_str().unwrap()])
        .env("BATON_AMQP__URL", users.url("baton-ci"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "CI enqueues: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run: Uuid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let view = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(view.status, "succeeded", "{view:#?}");
}
