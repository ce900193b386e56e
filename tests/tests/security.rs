//! Security properties over real processes: signed messages, refusals and the audit chain.

use std::time::Duration;

use baton_shared::protocol::{JobKind, Message, PROTOCOL_VERSION, ResultStatus, StepResult};
use baton_shared::signing::Keypair;
use baton_shared::topology::{DEAD_QUEUE, JOBS_EXCHANGE, RESULTS_EXCHANGE, RESULTS_KEY};
use baton_tests::{SEED_BINDINGS, TestEnv, event, step_job};
use chrono::Utc;
use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use serde_json::{Value, json};
use uuid::Uuid;

const RUN_TIMEOUT: Duration = Duration::from_secs(90);

fn verify(env: &TestEnv) -> (Option<i32>, Value) {
    let out = env.baton(&["audit", "verify", "--json"]);
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("audit verify --json: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), report)
}

/// Edits the audit log as a superuser who turns the append-only trigger off.
async fn tamper(env: &TestEnv, edits: Vec<(&'static str, i64, Option<Value>)>) {
    let mut tx = env.pool.begin().await.unwrap();
    let toggle = |on: bool| {
        if on {
            "alter table audit enable trigger audit_no_update"
        } else {
            "alter table audit disable trigger audit_no_update"
        }
    };
    sqlx::query(toggle(false)).execute(&mut *tx).await.unwrap();
    for (sql, id, value) in edits {
        let mut q = sqlx::query(sql).bind(id);
        if let Some(v) = value {
            q = q.bind(v);
        }
        q.execute(&mut *tx).await.unwrap();
    }
    sqlx::query(toggle(true)).execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_of_a_database_no_scheduler_initialised_says_so() {
    let env = TestEnv::new("audit-uninit").await;
    let out = env.baton(&["audit", "verify"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("the scheduler has not initialised this database"),
        "{stderr}"
    );
    assert!(!stderr.contains("relation"), "no raw SQL error: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_chain_of_a_real_run_verifies_and_names_a_tampered_row() {
    let env = TestEnv::new("audit").await;
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 20}})));
    let _scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let run = env.enqueue(&event("audited", 40, &["src/app.ts"]));
    assert_eq!(env.wait_terminal(run, RUN_TIMEOUT).await.status, "succeeded");
    env.enqueue(&event("audited", 40, &["src/app.ts"]));
    env.wait_audited(run, "duplicate_merge_event").await;

    let (code, report) = verify(&env);
    assert_eq!(code, Some(0), "{report}");
    assert!(report["first_broken"].is_null());
    assert!(
        report["rows"].as_u64().unwrap() >= 5 * 3 + 4,
        "every transition is audited: {report}"
    );
    for kind in [
        "run_created",
        "lock_acquired",
        "dispatched",
        "attempt_started",
        "step_succeeded",
        "run_status",
    ] {
        let n: i64 = sqlx::query_scalar("select count(*) from audit where kind = $1")
            .bind(kind)
            .fetch_one(&env.pool)
            .await
            .unwrap();
        assert!(n > 0, "no {kind} rows");
    }

    // The database itself refuses to change the log.
    for sql in ["update audit set kind = 'x'", "delete from audit", "truncate audit"] {
        let err = sqlx::query(sql).execute(&env.pool).await.unwrap_err().to_string();
        assert!(err.contains("append-only"), "{sql}: {err}");
    }

    // A superuser who disables the trigger can edit a row, and verify names it.
    let target: i64 = sqlx::query_scalar("select id from audit where kind = 'dispatched' order by id limit 1")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let original: Value = sqlx::query_scalar("select detail from audit where id = $1")
        .bind(target)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    tamper(
        &env,
        vec![(
            "update audit set detail = '{\"kind\": \"forged\"}' where id = $1",
            target,
            None,
        )],
    )
    .await;
    let (code, report) = verify(&env);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["first_broken"]["id"].as_i64(), Some(target), "{report}");
    let text = env.baton(&["audit", "verify"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains(&format!("row {target}")));

    // Removing a row breaks the link at the row after it.
    let (a, b): (i64, i64) = sqlx::query_as(
        "select id, lead(id) over (order by id) from audit where run_id = $1 and id > $2 order by id limit 1",
    )
    .bind(run)
    .bind(target)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    tamper(
        &env,
        vec![
            ("update audit set detail = $2 where id = $1", target, Some(original)),
            ("delete from audit where id = $1", a, None),
        ],
    )
    .await;
    let (code, report) = verify(&env);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(
        report["first_broken"]["id"].as_i64(),
        Some(b),
        "the row after the removed one: {report}"
    );
    assert!(
        report["first_broken"]["problem"].as_str().unwrap().contains("removed"),
        "{report}"
    );
}

async fn publish(ch: &lapin::Channel, exchange: &str, key: &str, body: &[u8], message_id: Uuid) {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default().with_message_id(message_id.to_string().into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_unsigned_expired_replayed_and_unknown_key_jobs_are_refused_dead_lettered_and_audited() {
    let env = TestEnv::new("refusals").await;
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 10}})));
    let _scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", &["staging.db-migration"]).await;
    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let key = &env.scheduler_key;

    let unsigned = step_job("staging", "db-migration", 60);
    let mut forged = step_job("staging", "db-migration", 60);
    key.sign(&mut forged);
    forged.action = "drop-everything".into();
    let mut expired = step_job("staging", "db-migration", -30);
    key.sign(&mut expired);
    let mut stranger = step_job("staging", "db-migration", 60);
    Keypair::generate().sign(&mut stranger);
    let mut genuine = step_job("staging", "db-migration", 60);
    key.sign(&mut genuine);

    for j in [&unsigned, &forged, &expired, &stranger, &genuine] {
        publish(&ch, JOBS_EXCHANGE, "staging.db-migration", &j.to_bytes(), j.message_id).await;
    }
    env.wait_until("the genuine job to run", RUN_TIMEOUT, async || {
        env.exec_log()
            .iter()
            .any(|l| l.run_id == genuine.run_id && l.event == "end")
    })
    .await;
    // The same signed job again: a replay.
    publish(
        &ch,
        JOBS_EXCHANGE,
        "staging.db-migration",
        &genuine.to_bytes(),
        genuine.message_id,
    )
    .await;

    // The broker dead-letters what the daemon rejected; the scheduler moves it
    // into its database (`baton dlq`) with the reason from the daemon's signed notice.
    let mut reasons: Vec<String> = Vec::new();
    env.wait_until("five dead letters with their reasons", RUN_TIMEOUT, async || {
        reasons = sqlx::query_scalar(
            "select refused_for from dead_letters where origin = 'baton.staging.db-migration'
                and reason = 'broker: rejected' and refused_for is not null",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap();
        reasons.len() >= 5
    })
    .await;
    let has = |needle: &str| reasons.iter().any(|r| r.contains(needle));
    assert!(has("unauthentic: unsigned"), "{reasons:?}");
    assert!(has("unauthentic: signature does not match"), "{reasons:?}");
    assert!(has("unauthentic: signed with unknown key id"), "{reasons:?}");
    assert!(has("expired"), "{reasons:?}");
    assert!(has("replayed"), "{reasons:?}");

    // Nothing but the genuine job ran, once.
    let runs: Vec<Uuid> = env
        .exec_log()
        .iter()
        .filter(|l| l.event == "start")
        .map(|l| l.run_id)
        .collect();
    assert_eq!(runs, [genuine.run_id]);

    // Every refusal reached the audit log, and the chain holds.
    env.wait_until("five refusals in the audit log", RUN_TIMEOUT, async || {
        let n: i64 = sqlx::query_scalar("select count(*) from audit where kind = 'message_refused'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        n >= 5
    })
    .await;
    let audited: Vec<String> =
        sqlx::query_scalar("select detail->>'reason' from audit where kind = 'message_refused' order by id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    for r in &reasons {
        assert!(audited.contains(r), "{r} not audited: {audited:?}");
    }
    assert_eq!(verify(&env).0, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_or_forged_results_change_nothing_and_are_audited() {
    let env = TestEnv::new("forged-results").await;
    env.script(baton_tests::with_seed_facts(
        json!({"default": {"delay_ms": 10}, "execute": {"build": {"delay_ms": 60000}}}),
    ));
    let _scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let run = env.enqueue(&event("forged", 41, &["src/app.ts"]));
    let view = env.wait_step(run, "build", "running", RUN_TIMEOUT).await;
    let attempt = &view.step("build").unwrap().attempts[0];

    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let forge = |signer: Option<&Keypair>| {
        let mut r = StepResult {
            v: PROTOCOL_VERSION,
            message_id: Uuid::new_v4(),
            run_id: run,
            step_id: "build".into(),
            attempt: attempt.attempt as u32,
            kind: JobKind::Execute,
            zone: "ci".into(),
            role: "container-build".into(),
            daemon: "mallory".into(),
            status: ResultStatus::Succeeded,
            at: Utc::now(),
            outputs: Default::default(),
            error: None,
            started_at: None,
            signature: None,
        };
        if let Some(k) = signer {
            k.sign(&mut r);
        }
        r
    };
    let stranger = Keypair::generate();
    for r in [forge(None), forge(Some(&stranger)), forge(Some(&env.scheduler_key))] {
        publish(&ch, RESULTS_EXCHANGE, RESULTS_KEY, &r.to_bytes(), r.message_id).await;
    }
    env.wait_until("three refused results in the audit log", RUN_TIMEOUT, async || {
        let n: i64 = sqlx::query_scalar("select count(*) from audit where kind = 'result_refused'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        n >= 3
    })
    .await;
    let view = env.run(run).await.unwrap();
    assert_eq!(
        view.step("build").unwrap().status,
        "running",
        "a forged success changes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_secret_never_appears_in_logs_messages_or_dead_letters() {
    let env = TestEnv::new("sentinel").await;
    let sentinel = format!("S3NT1NEL{}", Uuid::new_v4().simple());
    let user = format!("sentinel-{}", &sentinel[8..16]);
    let ctl = |args: &[&str]| {
        assert!(
            std::process::Command::new("rabbitmqctl")
                .args(args)
                .output()
                .unwrap()
                .status
                .success(),
            "{args:?}"
        );
    };
    ctl(&["add_user", &user, &sentinel]);
    ctl(&["set_permissions", "-p", &env.vhost, &user, ".*", ".*", ".*"]);
    let url = format!("amqp://{user}:{sentinel}@127.0.0.1:5672/{}", env.vhost);
    // By reference: the scheduler reads it from a file, the daemon from another variable.
    std::fs::write(env.dir.join("amqp-url"), &url).unwrap();
    env.set_scheduler_env(
        "BATON_AMQP__URL",
        &format!("file:{}", env.dir.join("amqp-url").display()),
    );
    env.set_scheduler_env(
        "BATON_DATABASE__URL",
        &env.db_url.replace("postgres@", &format!("postgres:{sentinel}@")),
    );
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 20}, "execute": {"cdn": {"fail": {"code": "x", "message": "boom", "retryable": false}}}})));
    let _scheduler = env.scheduler("scheduler").await;
    let _daemon = env
        .daemon_with(
            "daemon",
            SEED_BINDINGS,
            &[
                ("BATON_AMQP__URL", "env:SENTINEL_AMQP_URL"),
                ("SENTINEL_AMQP_URL", &url),
            ],
        )
        .await;
    let run = env.enqueue(&event("sentinel", 42, &["src/app.ts", "assets/a.css"]));
    assert_eq!(env.wait_terminal(run, RUN_TIMEOUT).await.status, "rolled_back");
    // A refused message and a printed config, too.
    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    publish(
        &ch,
        JOBS_EXCHANGE,
        "staging.staging-verify",
        b"{\"bad\": 1}",
        Uuid::new_v4(),
    )
    .await;
    env.wait_until("the refusal to be audited", RUN_TIMEOUT, async || {
        let n: i64 = sqlx::query_scalar("select count(*) from audit where kind = 'message_refused'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        n >= 1
    })
    .await;
    let printed = std::process::Command::new(baton_tests::bin("baton-e2e"))
        .args(["--print-config"])
        .env("BATON_AMQP__URL", &url)
        .output()
        .unwrap();
    assert!(printed.status.success());

    let mut haystacks = vec![(
        "print-config".to_owned(),
        String::from_utf8_lossy(&printed.stdout).into_owned(),
    )];
    for entry in std::fs::read_dir(&env.dir).unwrap().flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "log" || e == "jsonl") {
            haystacks.push((p.display().to_string(), std::fs::read_to_string(&p).unwrap()));
        }
    }
    let bodies: Vec<Vec<u8>> = sqlx::query_scalar("select body from outbox")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    haystacks.extend(
        bodies
            .into_iter()
            .map(|b| ("outbox".to_owned(), String::from_utf8_lossy(&b).into_owned())),
    );
    let audit: Vec<String> = sqlx::query_scalar("select detail::text from audit")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    haystacks.extend(audit.into_iter().map(|a| ("audit".to_owned(), a)));
    while let Some(msg) = ch
        .basic_get(DEAD_QUEUE.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let headers = format!("{:?}", msg.delivery.properties);
        haystacks.push((
            "dead letter".to_owned(),
            headers + &String::from_utf8_lossy(&msg.delivery.data),
        ));
    }
    let recorded: Vec<String> =
        sqlx::query_scalar("select reason || headers::text || convert_from(body, 'UTF8') from dead_letters")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    haystacks.extend(recorded.into_iter().map(|d| ("recorded dead letter".to_owned(), d)));
    assert!(haystacks.len() > 5);
    assert!(
        haystacks
            .iter()
            .any(|(_, h)| h.contains("[redacted]") || h.contains("***")),
        "redaction shows somewhere"
    );
    for (place, text) in &haystacks {
        assert!(!text.contains(&sentinel), "the secret leaked into {place}");
    }
    ctl(&["delete_user", &user]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_verifies_the_broker_certificate_against_the_configured_ca() {
    let broker = baton_tests::PrivateBroker::start(true);
    let port = broker.tls_port.unwrap();
    let cfg = |ca: Option<String>| baton_shared::config::AmqpConfig {
        url: baton_shared::secret::Secret::new(format!("amqps://guest:guest@localhost:{port}/%2f")),
        ca_file: ca,
        ..Default::default()
    };
    let ca = broker.dir.join("ca.pem").display().to_string();
    let conn = baton_shared::amqp::Broker::connect_config(&cfg(Some(ca)), "tls test")
        .await
        .expect("connects over TLS when the CA is configured");
    baton_shared::topology::declare_core(&conn.channel().await.unwrap(), 5)
        .await
        .unwrap();
    conn.close().await;
    let err = baton_shared::amqp::Broker::connect_config(&cfg(None), "tls test")
        .await
        .err()
        .expect("unknown CA refused");
    assert!(err.to_string().contains("cannot connect"), "{err}");
    // Another CA's certificate does not verify the broker either.
    let other = baton_tests::PrivateBroker::start(true);
    let wrong = other.dir.join("ca.pem").display().to_string();
    assert!(
        baton_shared::amqp::Broker::connect_config(&cfg(Some(wrong)), "tls test")
            .await
            .is_err()
    );
}

/// With `sslmode=verify-ca` in its database URL the scheduler talks to
/// PostgreSQL over TLS only, having verified the server's certificate against
/// the given CA; against a CA that did not sign the server's certificate it
/// refuses to start, and says why. (`verify-ca` rather than `verify-full`: the
/// name in the server's certificate differs between machines; `.ci/run` makes
/// sure the server offers TLS.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_reaches_postgresql_over_verified_tls_and_refuses_a_server_it_cannot_verify() {
    let env = TestEnv::new("pg-tls").await;
    let (ssl, cert, data): (String, String, String) = sqlx::query_as(
        "select current_setting('ssl'), current_setting('ssl_cert_file'), current_setting('data_directory')",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        ssl, "on",
        "this test needs PostgreSQL with ssl = on (.ci/run turns it on)"
    );
    let cert = std::path::Path::new(&data).join(cert).display().to_string();
    // The server's certificate is self-signed (Debian's or .ci/run's): its own CA.
    let url = |root: &str| {
        format!(
            "postgres://postgres@127.0.0.1:5432/{}?sslmode=verify-ca&sslrootcert={root}&application_name=baton-pg-tls",
            env.db_name
        )
    };

    env.set_scheduler_env("BATON_DATABASE__URL", &url(&cert));
    let scheduler = env.scheduler("scheduler").await;
    let (total, encrypted): (i64, i64) = sqlx::query_as(
        "select count(*), count(*) filter (where s.ssl)
           from pg_stat_activity a join pg_stat_ssl s using (pid)
          where a.datname = current_database() and a.application_name = 'baton-pg-tls'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(total > 0, "no scheduler connection found");
    assert_eq!(
        encrypted, total,
        "{total} scheduler connections, {encrypted} of them over TLS"
    );
    drop(scheduler);

    // A CA of its own, which signed nothing PostgreSQL has.
    let ca = baton_tests::make_ca(&env.dir, "other-ca");
    env.set_scheduler_env("BATON_DATABASE__URL", &url(ca.to_str().unwrap()));
    let mut refused = env.spawn_scheduler("refused");
    // At once, not after the minute it waits for a database that is down.
    env.wait_until(
        "the scheduler to give up on an unverified server",
        Duration::from_secs(20),
        async || !refused.is_running(),
    )
    .await;
    let log = env.log("refused");
    assert!(
        log.contains("TLS certificate was not accepted") && log.contains("UnknownIssuer"),
        "the refusal does not say what is wrong:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_is_refused_by_every_replica_and_after_a_restart() {
    let env = TestEnv::new("replay-ledger").await;
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 10}})));
    let _scheduler = env.scheduler("scheduler").await;
    // The zone's daemons share a replay ledger (here in the test's database).
    let ledger = [("BATON_DAEMON__LEDGER_URL", env.db_url.as_str())];
    let a = env.daemon_with("replica-a", &["staging.db-migration"], &ledger).await;
    let b = env.daemon_with("replica-b", &["staging.db-migration"], &ledger).await;
    let conn = env.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let mut genuine = step_job("staging", "db-migration", 600);
    env.scheduler_key.sign(&mut genuine);
    let send = async || {
        publish(
            &ch,
            JOBS_EXCHANGE,
            "staging.db-migration",
            &genuine.to_bytes(),
            genuine.message_id,
        )
        .await
    };
    let replays = async |n: i64| {
        env.wait_until(&format!("{n} replays refused"), RUN_TIMEOUT, async || {
            sqlx::query_scalar::<_, i64>(
                "select count(*) from refusals where reason like 'replayed:%' and refused_message_id = $1",
            )
            .bind(genuine.message_id.to_string())
            .fetch_one(&env.pool)
            .await
            .unwrap()
                >= n
        })
        .await;
    };
    send().await;
    env.wait_until("the genuine job to run", RUN_TIMEOUT, async || {
        env.exec_log()
            .iter()
            .any(|l| l.run_id == genuine.run_id && l.event == "end")
    })
    .await;
    // Copies sent while both replicas consume: whichever receives one refuses it.
    for _ in 0..4 {
        send().await;
    }
    replays(4).await;
    // Both replicas stop; a new one, inside the job's validity, refuses it too.
    drop((a, b));
    let _c = env.daemon_with("replica-c", &["staging.db-migration"], &ledger).await;
    send().await;
    replays(5).await;
    let starts = env
        .exec_log()
        .iter()
        .filter(|l| l.run_id == genuine.run_id && l.event == "start")
        .count();
    assert_eq!(starts, 1, "the job ran once: {:?}", env.exec_log());
    let refusers: Vec<String> =
        sqlx::query_scalar("select distinct daemon from refusals where reason like 'replayed:%(replay ledger)'")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert!(
        refusers.iter().any(|d| d.contains("replica-c")),
        "the restarted replica refused from the ledger: {refusers:?}"
    );
}
