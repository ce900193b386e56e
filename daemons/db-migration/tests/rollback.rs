//! `rollback`, the compensation of `migrate`, against a real PostgreSQL.

mod common;

use common::*;
use uuid::Uuid;

#[tokio::test]
async fn rollback_runs_down_migrations_in_reverse_order_and_records_them() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_fixture(&repo, 3);
    let sha = repo.commit("migrations");
    let role = role(&db, &cache);
    let run_id = Uuid::new_v4();
    let outputs = run(&role, &migrate_job("staging", &repo, &sha, run_id)).await.unwrap();

    let out = run(&role, &rollback_job("staging", &repo, &sha, run_id, &outputs))
        .await
        .unwrap();
    let tags = fixture_tags();
    assert_eq!(
        strings(&out["rolled_back"]),
        [tags[2].clone(), tags[1].clone(), tags[0].clone()]
    );
    assert!(db.history().await.is_empty());
    assert!(db.tables().await.is_empty(), "the down migrations ran");
    let log: Vec<(String, String)> = db
        .log()
        .await
        .into_iter()
        .inspect(|(_, _, r)| assert_eq!(*r, run_id))
        .map(|(t, d, _)| (t, d))
        .collect();
    let want: Vec<(String, String)> = [
        (&tags[0], "up"),
        (&tags[1], "up"),
        (&tags[2], "up"),
        (&tags[2], "down"),
        (&tags[1], "down"),
        (&tags[0], "down"),
    ]
    .iter()
    .map(|(t, d)| ((*t).clone(), (*d).to_owned()))
    .collect();
    assert_eq!(log, want);

    // Compensations are retried like any job: a second rollback does nothing.
    let again = run(&role, &rollback_job("staging", &repo, &sha, run_id, &outputs))
        .await
        .unwrap();
    assert!(strings(&again["rolled_back"]).is_empty());
    assert_eq!(strings(&again["not_applied"]).len(), 3);
    assert_eq!(db.log().await.len(), 6);

    // drizzle's rule makes the migrations pending again.
    let out = run(&role, &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap();
    assert_eq!(strings(&out["applied"]).len(), 3);
}

#[tokio::test]
async fn rollback_undoes_only_what_this_run_applied() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    let role = role(&db, &cache);
    write_fixture(&repo, 1);
    let sha1 = repo.commit("tables");
    run(&role, &migrate_job("staging", &repo, &sha1, Uuid::new_v4()))
        .await
        .unwrap();
    write_fixture(&repo, 3);
    let sha2 = repo.commit("nickname, drop legacy note");
    let run_id = Uuid::new_v4();
    let outputs = run(&role, &migrate_job("staging", &repo, &sha2, run_id)).await.unwrap();
    assert_eq!(strings(&outputs["applied"]), &fixture_tags()[1..3]);
    assert!(!db.columns("orders").await.contains(&"legacy_note".to_owned()));

    let out = run(&role, &rollback_job("staging", &repo, &sha2, run_id, &outputs))
        .await
        .unwrap();
    assert_eq!(
        strings(&out["rolled_back"]),
        [fixture_tags()[2].clone(), fixture_tags()[1].clone()]
    );
    assert_eq!(db.history().await.len(), 1, "the earlier run's migration stays");
    assert_eq!(
        db.columns("orders").await,
        ["id", "user_id", "total_cents", "legacy_note"]
    );
    assert_eq!(db.columns("users").await, ["id", "email", "name", "created_at"]);
}

#[tokio::test]
async fn rollback_after_a_retried_migrate_still_undoes_the_first_attempts_work() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_fixture(&repo, 2);
    let sha = repo.commit("migrations");
    let role = role(&db, &cache);
    let run_id = Uuid::new_v4();
    // Attempt 1 committed, then its result was lost; attempt 2 finds nothing pending.
    run(&role, &migrate_job("staging", &repo, &sha, run_id)).await.unwrap();
    let mut retry = migrate_job("staging", &repo, &sha, run_id);
    retry.attempt = 2;
    let outputs = run(&role, &retry).await.unwrap();
    assert_eq!(strings(&outputs["applied"]).len(), 2);

    let out = run(&role, &rollback_job("staging", &repo, &sha, run_id, &outputs))
        .await
        .unwrap();
    assert_eq!(strings(&out["rolled_back"]).len(), 2);
    assert!(db.tables().await.is_empty());
}

#[tokio::test]
async fn rollback_of_an_irreversible_migration_fails_naming_it_its_procedure_and_the_backup() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_fixture(&repo, 4);
    let sha = repo.commit("migrations");
    let role = role(&db, &cache);
    let run_id = Uuid::new_v4();
    let mut job = migrate_job("production", &repo, &sha, run_id);
    job.inputs.insert("backup.pre".into(), backup_input(run_id, true));
    let outputs = run(&role, &job).await.unwrap();
    let history = db.history().await;

    let mut rollback = rollback_job("production", &repo, &sha, run_id, &outputs);
    rollback.inputs.insert("backup.pre".into(), backup_input(run_id, true));
    let err = run(&role, &rollback).await.unwrap_err();
    assert_eq!(err.code, "irreversible");
    assert!(!err.retryable);
    for needle in [
        "0003_lowercase_user_emails",
        "drizzle/migrations/0003_lowercase_user_emails.recovery.md",
        "bk-2026-11-26-0001",
        "nothing was rolled back",
    ] {
        assert!(err.message.contains(needle), "{needle}: {}", err.message);
    }
    assert_eq!(db.history().await, history, "nothing was rolled back");
}

#[tokio::test]
async fn rollback_refuses_while_later_migrations_sit_on_top() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    let role = role(&db, &cache);
    write_fixture(&repo, 1);
    let sha1 = repo.commit("tables");
    let run1 = Uuid::new_v4();
    let outputs = run(&role, &migrate_job("staging", &repo, &sha1, run1)).await.unwrap();
    write_fixture(&repo, 2);
    let sha2 = repo.commit("nickname");
    run(&role, &migrate_job("staging", &repo, &sha2, Uuid::new_v4()))
        .await
        .unwrap();

    let err = run(&role, &rollback_job("staging", &repo, &sha1, run1, &outputs))
        .await
        .unwrap_err();
    assert_eq!(err.code, "newer_migrations_applied");
    assert_eq!(db.history().await.len(), 2);
}

#[tokio::test]
async fn rollback_with_nothing_applied_succeeds_without_touching_anything() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_fixture(&repo, 1);
    let sha = repo.commit("migrations");
    let outputs = serde_json::json!({"applied": [], "hashes": [], "destructive": false, "warnings": [],
        "database": SERVICE, "last_created_at": null});
    let out = run(
        &role(&db, &cache),
        &rollback_job("staging", &repo, &sha, Uuid::new_v4(), outputs.as_object().unwrap()),
    )
    .await
    .unwrap();
    assert!(strings(&out["rolled_back"]).is_empty());
    assert!(db.history().await.is_empty());
}
