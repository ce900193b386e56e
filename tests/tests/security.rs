//! Security properties over real processes: the audit chain.

use std::time::Duration;

use baton_tests::{SEED_BINDINGS, TestEnv, event};
use serde_json::{Value, json};

const RUN_TIMEOUT: Duration = Duration::from_secs(90);

fn verify(env: &TestEnv) -> (Option<i32>, Value) {
    let out = env.baton(&["audit", "verify", "--json"]);
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("audit verify --json: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_chain_of_a_real_run_verifies_and_names_a_tampered_row() {
    let env = TestEnv::new("audit").await;
    env.script(json!({"default": {"delay_ms": 20}}));
    let _scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let run = env.enqueue(&event("audited", 40, &["src/app.ts"]));
    assert_eq!(env.wait_terminal(run, RUN_TIMEOUT).await.status, "succeeded");
    env.enqueue(&event("audited", 40, &["src/app.ts"]));
    env.wait_until("the duplicate merge event to be audited", RUN_TIMEOUT, async || {
        env.run(run)
            .await
            .unwrap()
            .history
            .iter()
            .any(|h| h.kind == "duplicate_merge_event")
    })
    .await;

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
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("alter table audit disable trigger audit_no_update")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("update audit set detail = '{\"kind\": \"forged\"}' where id = $1")
        .bind(target)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("alter table audit enable trigger audit_no_update")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
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
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("alter table audit disable trigger audit_no_update")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("update audit set detail = $2 where id = $1")
        .bind(target)
        .bind(&original)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("delete from audit where id = $1")
        .bind(a)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("alter table audit enable trigger audit_no_update")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
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
