//! Scratch databases left by a dead process are swept; a live one's are not
//! (real PostgreSQL on 127.0.0.1:5432).

use baton_shared::scratch;
use sqlx::{Connection, PgConnection};

const ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";

async fn exists(conn: &mut PgConnection, name: &str) -> bool {
    sqlx::query_scalar("select exists (select from pg_database where datname = $1)")
        .bind(name)
        .fetch_one(conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_sweep_drops_the_scratch_databases_whose_creator_is_gone_and_no_other() {
    let prefix = format!("baton_sweeptest_{}_", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut admin = PgConnection::connect(ADMIN).await.unwrap();
    let (live, dead) = (scratch::name(&prefix), scratch::name(&prefix));
    assert!(live.len() <= 63 && live.starts_with(&prefix) && live != dead);
    // Each creator takes its database's lock before creating it.
    let live_lock = scratch::hold(PgConnection::connect(ADMIN).await.unwrap(), &live)
        .await
        .unwrap();
    let mut dead_lock = scratch::hold(PgConnection::connect(ADMIN).await.unwrap(), &dead)
        .await
        .unwrap();
    for name in [&live, &dead] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("create database \"{name}\"")))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    // While both creators live, nothing is swept.
    assert!(scratch::sweep(&mut admin, &prefix).await.unwrap().is_empty());
    // One creator's process dies: its session is ended, and the server waits
    // until it is gone (PostgreSQL 14's pg_terminate_backend with a timeout).
    let dead_pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(dead_lock.connection())
        .await
        .unwrap();
    let ended: bool = sqlx::query_scalar("select pg_terminate_backend($1, 30000)")
        .bind(dead_pid)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert!(ended);
    drop(dead_lock);
    let dropped = scratch::sweep(&mut admin, &prefix).await.unwrap();
    assert_eq!(dropped, std::slice::from_ref(&dead));
    assert!(!exists(&mut admin, &dead).await);
    assert!(exists(&mut admin, &live).await, "a live creator's database stays");
    // Its creator drops it and lets go.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("drop database \"{live}\" with (force)")))
        .execute(&mut admin)
        .await
        .unwrap();
    live_lock.release().await;
}
