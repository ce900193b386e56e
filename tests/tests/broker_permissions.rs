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
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 20}})));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_component_may_publish_what_it_does_not_need() {
    let env = TestEnv::new("publish-rights").await;
    let users = Users::import(&env);
    let exchanges = [
        "",
        EVENTS_EXCHANGE,
        JOBS_EXCHANGE,
        topology::RESULTS_EXCHANGE,
        topology::CONTROL_EXCHANGE,
        DEAD_EXCHANGE,
    ];
    // Each user's exchanges; everything else is refused. Nobody publishes to
    // the dead-letter exchange: only the broker's dead-lettering does.
    let needs: [(&str, &[&str]); 6] = [
        (
            "baton-scheduler",
            &[
                EVENTS_EXCHANGE,
                JOBS_EXCHANGE,
                topology::RESULTS_EXCHANGE,
                topology::CONTROL_EXCHANGE,
            ],
        ),
        ("baton-ci", &[EVENTS_EXCHANGE]),
        ("baton-daemon-dev", &[topology::RESULTS_EXCHANGE]),
        ("baton-daemon-staging", &[topology::RESULTS_EXCHANGE]),
        ("baton-daemon-production", &[topology::RESULTS_EXCHANGE]),
        ("baton-daemon-ci", &[topology::RESULTS_EXCHANGE]),
    ];
    for (user, allowed) in needs {
        let conn = users.connect(user).await;
        for exchange in exchanges {
            let res = publish(&conn, exchange, "probe").await;
            if allowed.contains(&exchange) {
                res.unwrap_or_else(|e| panic!("{user} may publish to {exchange:?}: {e}"));
            } else {
                refused(res, &format!("{user} publishing to {exchange:?}"));
            }
        }
    }
}

/// A dead letter published by hand, naming `job`'s attempt, with `headers`.
async fn forge_dead_letter(
    conn: &Connection,
    body: &[u8],
    message_id: &str,
    headers: FieldTable,
) -> Result<(), String> {
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    ch.basic_publish(
        DEAD_EXCHANGE.into(),
        "staging.db-migration".into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default()
            .with_message_id(message_id.into())
            .with_headers(headers),
    )
    .await
    .map_err(|e| e.to_string())?
    .await
    .map_err(|e| e.to_string())?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_dead_letter_changes_no_run_and_the_real_job_then_runs() {
    use lapin::types::{AMQPValue, LongString, ShortString};
    let env = TestEnv::new("forged-dead-letter").await;
    let users = Users::import(&env);
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 20}})));
    env.set_scheduler_env("BATON_AMQP__URL", &users.url("baton-scheduler"));
    let _scheduler = env.scheduler("scheduler").await;
    // Every role but staging's db-migration is served: its job waits, dispatched.
    let others = baton_tests::seed_bindings_except("staging.db-migration");
    let _others = env.daemon("others", &others).await;
    let run = env.enqueue(&event("forged", 61, &["drizzle/migrations/0001_x.sql"]));
    let mut message_id = None;
    env.wait_until("db.staging's job to be dispatched", RUN_TIMEOUT, async || {
        message_id = sqlx::query_scalar::<_, Uuid>(
            "select message_id from attempts where run_id = $1 and step_id = 'db.staging' and status = 'dispatched'",
        )
        .bind(run)
        .fetch_optional(&env.pool)
        .await
        .unwrap();
        message_id.is_some()
    })
    .await;
    let message_id = message_id.unwrap().to_string();
    // The attacker knows the run, step, attempt and message id (a viewer reads them).
    let mut forged = baton_tests::step_job("staging", "db-migration", 600);
    forged.run_id = run;
    forged.message_id = message_id.parse().unwrap();
    let body = serde_json::to_vec(&forged).unwrap();
    let claim = |reason: &str| {
        let mut h = FieldTable::default();
        h.insert(
            ShortString::from(topology::REASON_HEADER),
            AMQPValue::LongString(LongString::from(reason.to_owned())),
        );
        h.insert(
            ShortString::from(topology::ORIGIN_HEADER),
            AMQPValue::LongString(LongString::from("baton.staging.db-migration".to_owned())),
        );
        h
    };

    // The staging daemon's user may not publish to the dead-letter exchange at all.
    let staging = users.connect("baton-daemon-staging").await;
    refused(
        forge_dead_letter(&staging, &body, &message_id, claim("unauthentic: forged")).await,
        "a daemon publishing a dead letter",
    );
    // An administrator may: ten identical forged letters claiming a refusal,
    // and one that imitates the broker's delivery limit.
    let admin = env.amqp().await;
    for _ in 0..10 {
        forge_dead_letter(&admin, &body, &message_id, claim("unauthentic: forged"))
            .await
            .unwrap();
    }
    let mut death = FieldTable::default();
    death.insert(
        ShortString::from("queue"),
        AMQPValue::LongString(LongString::from("baton.staging.db-migration".to_owned())),
    );
    death.insert(
        ShortString::from("reason"),
        AMQPValue::LongString(LongString::from("delivery_limit".to_owned())),
    );
    let mut x_death = FieldTable::default();
    x_death.insert(
        ShortString::from("x-death"),
        AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
    );
    forge_dead_letter(&admin, &body, &message_id, x_death).await.unwrap();

    let mut rows: Vec<(String, bool, i32, Option<Uuid>)> = Vec::new();
    env.wait_until("eleven arrivals recorded", RUN_TIMEOUT, async || {
        rows = sqlx::query_as("select reason, verified, arrivals, run_id from dead_letters order by id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
        rows.iter().map(|r| r.2).sum::<i32>() >= 11
    })
    .await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        rows[0],
        ("unverified claim: unauthentic: forged".to_owned(), false, 10, None)
    );
    assert_eq!(rows[1], ("broker: delivery_limit".to_owned(), false, 1, None));
    let unverified: i64 =
        sqlx::query_scalar("select count(*) from audit where kind = 'dead_letter_unverified' and run_id is null")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(unverified, 11, "every arrival is audited, apart from run history");
    let status: String = sqlx::query_scalar("select status from attempts where message_id = $1")
        .bind(message_id.parse::<Uuid>().unwrap())
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(status, "dispatched", "the forged letters changed no attempt");

    // The real job then runs, and the run succeeds.
    let _db = env.daemon("staging-db", &["staging.db-migration"]).await;
    let view = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(view.status, "succeeded", "{view:#?}");
    assert_eq!(env.starts(run, "db.staging", "execute").len(), 1);
    let in_history: i64 =
        sqlx::query_scalar("select count(*) from audit where run_id = $1 and kind like 'dead_letter%'")
            .bind(run)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(in_history, 0, "the run's history holds nothing the forger wrote");
}
