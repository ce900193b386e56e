//! `migrate` and `verify` against a real PostgreSQL: applying, idempotency, the
//! seed's refusals, the lock, and the integrity checks.

mod common;

use std::time::Duration;

use baton_db_migration::drizzle;
use common::*;
use sqlx::Connection;
use uuid::Uuid;

#[tokio::test]
async fn pending_migrations_are_applied_in_one_go_and_recorded_as_drizzle_records_them() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_fixture(&repo, 4);
    let sha = repo.commit("migrations");
    let run_id = Uuid::new_v4();

    let out = run(&role(&db, &cache), &migrate_job("staging", &repo, &sha, run_id))
        .await
        .unwrap();

    let tags = fixture_tags();
    assert_eq!(strings(&out["applied"]), tags);
    let set = drizzle::MigrationSet::from_dir(&fixture_dir()).unwrap();
    let expected: Vec<(String, i64)> = set.migrations.iter().map(|m| (m.hash.clone(), m.when)).collect();
    assert_eq!(db.history().await, expected);
    assert_eq!(
        strings(&out["hashes"]),
        expected.iter().map(|e| e.0.clone()).collect::<Vec<_>>()
    );
    assert_eq!(out["last_created_at"], expected.last().unwrap().1);
    assert_eq!(out["database"], SERVICE);
    // 0002 drops a column: destructive, and against the additive-first rule.
    assert_eq!(out["destructive"], true);
    let warnings = strings(&out["warnings"]);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("0002_drop_orders_legacy_note") && warnings[0].contains("legacy_note"),
        "{warnings:?}"
    );
    assert_eq!(out["verify"]["schema_matches"], true);
    assert_eq!(db.tables().await, ["orders", "users"]);
    assert_eq!(db.columns("orders").await, ["id", "user_id", "total_cents"]);
    let log = db.log().await;
    assert_eq!(log.len(), 4);
    assert!(log.iter().all(|(_, dir, r)| dir == "up" && *r == run_id), "{log:?}");
}

/// Where a migrate step's verification took its expected schema from.
fn expected_from(out: &baton_shared::protocol::Fields) -> &str {
    out["verify"]["expected_schema"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn a_folder_is_replayed_once_and_its_expected_schema_reused() {
    let (a, b) = (TestDb::create().await, TestDb::create().await);
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_fixture(&repo, 4);
    // Migrations no other test has: the expected-schema cache has no entry for them.
    let first = format!("{DIR}/{}.sql", fixture_tags()[0]);
    let text = std::fs::read_to_string(repo.path().join(&first)).unwrap();
    repo.write(&first, format!("{text}\n-- {}\n", Uuid::new_v4()));
    let sha = repo.commit("migrations");

    // An empty database: the migrations run on a known (empty) schema, so what
    // they produce is the expected schema, without a replay.
    let out = run(&role(&a, &cache), &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap();
    assert!(expected_from(&out).starts_with("derived"), "{out:?}");
    // Another database (another zone, a recreated environment): no replay.
    let out = run(&role(&b, &cache), &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap();
    assert_eq!(expected_from(&out), "cached");
    assert_eq!(out["verify"]["schema_matches"], true);
    assert_eq!(b.columns("orders").await, ["id", "user_id", "total_cents"]);

    // A new migration on top: the schema of the four is cached and `a` still
    // matches it, so the five's schema is derived too, and then cached for `b`.
    repo.write(
        &format!("{DIR}/0004_notes.sql"),
        format!(
            "CREATE TABLE \"notes\" (\"id\" serial PRIMARY KEY);\n-- {}\n",
            Uuid::new_v4()
        ),
    );
    repo.write(&format!("{DIR}/0004_notes.down.sql"), "DROP TABLE \"notes\";\n");
    let journal_path = repo.path().join(format!("{DIR}/meta/_journal.json"));
    let mut journal: serde_json::Value = serde_json::from_slice(&std::fs::read(&journal_path).unwrap()).unwrap();
    let entries = journal["entries"].as_array_mut().unwrap();
    let when = entries.last().unwrap()["when"].as_i64().unwrap() + 60_000;
    entries.push(serde_json::json!({"idx": 4, "version": "7", "when": when, "tag": "0004_notes", "breakpoints": true}));
    repo.write(
        &format!("{DIR}/meta/_journal.json"),
        serde_json::to_string_pretty(&journal).unwrap(),
    );
    let sha2 = repo.commit("a fifth migration");
    let out = run(&role(&a, &cache), &migrate_job("staging", &repo, &sha2, Uuid::new_v4()))
        .await
        .unwrap();
    assert!(expected_from(&out).starts_with("derived"), "{out:?}");
    // `b` was changed by hand: it no longer matches its four migrations, so the
    // five are replayed (here: cached from `a`) and the difference is named;
    // nothing is applied.
    b.exec("CREATE TABLE hand_made (id integer)").await;
    let err = run(&role(&b, &cache), &migrate_job("staging", &repo, &sha2, Uuid::new_v4()))
        .await
        .unwrap_err();
    assert_eq!(err.code, "schema_mismatch", "{}", err.message);
    assert!(err.message.contains("hand_made"), "{}", err.message);
    assert!(b.columns("notes").await.is_empty(), "nothing was applied");
}

#[tokio::test]
async fn reapplying_is_a_no_op_that_reports_what_the_run_applied() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_fixture(&repo, 3);
    let sha = repo.commit("migrations");
    let role = role(&db, &cache);
    let run_id = Uuid::new_v4();

    let first = run(&role, &migrate_job("staging", &repo, &sha, run_id)).await.unwrap();
    let history = db.history().await;
    // The same (run, step) again, as after a crash before the result was sent.
    let mut again = migrate_job("staging", &repo, &sha, run_id);
    again.attempt = 2;
    let second = run(&role, &again).await.unwrap();
    // Where the expected schema came from may differ (the first attempt
    // derived or replayed it; the retry finds it cached): all else is the same.
    let without_source = |mut o: baton_shared::protocol::Fields| {
        o["verify"].as_object_mut().unwrap().remove("expected_schema");
        o
    };
    assert_eq!(
        without_source(second),
        without_source(first),
        "a retry reports the same outputs, so the rollback still undoes them"
    );
    assert_eq!(db.history().await, history);
    assert_eq!(db.log().await.len(), 3, "nothing was applied or logged again");

    // Another run finds nothing to do.
    let other = run(&role, &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap();
    assert!(strings(&other["applied"]).is_empty());
    assert_eq!(other["destructive"], false);
    assert_eq!(db.history().await, history);
}

#[tokio::test]
async fn irreversible_migration_without_recovery_procedure_is_refused_naming_it() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_migrations(
        &repo,
        &[
            Mig {
                tag: "0000_create_accounts",
                sql: "CREATE TABLE \"accounts\" (\"id\" serial PRIMARY KEY NOT NULL, \"email\" text);",
                down: Some("DROP TABLE \"accounts\";"),
                recovery: None,
            },
            Mig {
                tag: "0001_normalise_emails",
                sql: "UPDATE \"accounts\" SET \"email\" = lower(\"email\");",
                down: None,
                // An empty procedure documents nothing.
                recovery: Some("\n  \n"),
            },
        ],
    );
    let sha = repo.commit("irreversible");

    let err = run(&role(&db, &cache), &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap_err();
    assert_eq!(err.code, "irreversible_without_procedure");
    assert!(!err.retryable);
    assert!(err.message.contains("0001_normalise_emails"), "{}", err.message);
    assert!(!err.message.contains("0000_create_accounts"), "{}", err.message);
    assert!(db.tables().await.is_empty(), "nothing may be applied");
    assert!(db.history().await.is_empty());
}

#[tokio::test]
async fn destructive_migration_in_production_without_verified_backup_is_refused() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_fixture(&repo, 3);
    let sha = repo.commit("drop legacy note");
    let role = role(&db, &cache);
    let run_id = Uuid::new_v4();

    // No backup at all.
    let job = migrate_job("production", &repo, &sha, run_id);
    let err = run(&role, &job).await.unwrap_err();
    assert_eq!(err.code, "backup_not_verified");
    assert!(!err.retryable);
    assert!(
        err.message.contains("backup.pre") && err.message.contains("0002_drop_orders_legacy_note"),
        "{}",
        err.message
    );
    assert!(db.tables().await.is_empty(), "nothing may be applied");

    // A backup that is not verified, and a verified one of another run.
    let mut job = migrate_job("production", &repo, &sha, run_id);
    job.inputs.insert("backup.pre".into(), backup_input(run_id, false));
    let err = run(&role, &job).await.unwrap_err();
    assert_eq!(err.code, "backup_not_verified");
    assert!(err.message.contains("not verified"), "{}", err.message);
    let other_run = Uuid::new_v4();
    job.inputs.insert("backup.pre".into(), backup_input(other_run, true));
    let err = run(&role, &job).await.unwrap_err();
    assert_eq!(err.code, "backup_not_verified");
    assert!(err.message.contains(&other_run.to_string()), "{}", err.message);
    assert!(db.history().await.is_empty());

    // This run's verified backup lets it through.
    job.inputs.insert("backup.pre".into(), backup_input(run_id, true));
    let out = run(&role, &job).await.unwrap();
    assert_eq!(strings(&out["applied"]).len(), 3);
    assert_eq!(out["destructive"], true);
}

#[tokio::test]
async fn additive_migrations_in_production_need_no_backup() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_fixture(&repo, 2);
    let sha = repo.commit("additive");
    let out = run(
        &role(&db, &cache),
        &migrate_job("production", &repo, &sha, Uuid::new_v4()),
    )
    .await
    .unwrap();
    assert_eq!(strings(&out["applied"]).len(), 2);
    assert_eq!(out["destructive"], false);
    assert!(strings(&out["warnings"]).is_empty());
}

#[tokio::test]
async fn sql_files_the_journal_does_not_name_are_reported_and_not_applied() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_fixture(&repo, 2);
    repo.write(
        &format!("{DIR}/0009_forgotten.sql"),
        "CREATE TABLE forgotten (id int);\n",
    );
    let sha = repo.commit("a file outside the journal");
    let out = run(&role(&db, &cache), &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap();
    assert_eq!(strings(&out["applied"]).len(), 2);
    assert_eq!(strings(&out["unjournaled_sql"]), ["0009_forgotten.sql"]);
    // A warning, which the scheduler copies into the run's history.
    assert!(
        strings(&out["warnings"])
            .iter()
            .any(|w| w.starts_with("drizzle/migrations/0009_forgotten.sql is not in meta/_journal.json")),
        "{out:?}"
    );
    assert!(!db.tables().await.contains(&"forgotten".to_owned()), "never applied");
}

#[tokio::test]
async fn concurrent_migrations_of_one_database_apply_exactly_once() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_fixture(&repo, 4);
    let sha = repo.commit("migrations");
    let role = std::sync::Arc::new(role(&db, &cache));
    // Warm the repository cache so both jobs reach the database at the same time.
    baton_shared::git::GitCache::new(cache.0.clone())
        .read_folder(&repo.url(), &sha, DIR)
        .await
        .unwrap();

    let (a, b) = (
        migrate_job("staging", &repo, &sha, Uuid::new_v4()),
        migrate_job("staging", &repo, &sha, Uuid::new_v4()),
    );
    let (ra, rb) = (role.clone(), role.clone());
    let (ta, tb) = (
        tokio::spawn(async move { run(&ra, &a).await }),
        tokio::spawn(async move { run(&rb, &b).await }),
    );
    let (oa, ob) = (ta.await.unwrap().unwrap(), tb.await.unwrap().unwrap());
    let mut counts = [strings(&oa["applied"]).len(), strings(&ob["applied"]).len()];
    counts.sort();
    assert_eq!(counts, [0, 4], "exactly one job applies: {oa:?} {ob:?}");
    assert_eq!(db.history().await.len(), 4);
    assert_eq!(db.log().await.len(), 4);
    assert_eq!(
        db.columns("users").await,
        ["id", "email", "name", "created_at", "nickname"]
    );
}

#[tokio::test]
async fn migrate_waits_for_the_migration_lock_and_gives_up_after_the_bound() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_fixture(&repo, 2);
    let sha = repo.commit("migrations");

    // Someone else is migrating this database.
    let mut holder = db.connect().await;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(baton_db_migration::db::LOCK_KEY)
        .execute(&mut holder)
        .await
        .unwrap();

    let mut cfg = config(&db, &cache);
    cfg.lock_timeout_secs = 1;
    let impatient = baton_db_migration::DbMigration::new(cfg);
    let err = run(&impatient, &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap_err();
    assert_eq!(err.code, "migration_locked");
    assert!(err.retryable);
    assert!(db.history().await.is_empty());

    // A patient job waits, and proceeds once the lock is released.
    let patient = role(&db, &cache);
    let job = migrate_job("staging", &repo, &sha, Uuid::new_v4());
    let task = tokio::spawn(async move { run(&patient, &job).await });
    let mut watcher = db.connect().await;
    // Poll the server's lock table (each round trip paces the loop) until the job queues.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut waiting = false;
    while std::time::Instant::now() < deadline {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        if n > 0 {
            waiting = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(waiting, "the second job never queued for the lock");
    assert!(db.history().await.is_empty(), "nothing happens while the lock is held");
    holder.close().await.unwrap();
    let out = task.await.unwrap().unwrap();
    assert_eq!(strings(&out["applied"]).len(), 2);
}

#[tokio::test]
async fn a_broken_migration_fails_naming_it_before_touching_the_database() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_migrations(
        &repo,
        &[
            Mig {
                tag: "0000_create_a",
                sql: "CREATE TABLE \"a\" (\"id\" integer);",
                down: Some("DROP TABLE \"a\";"),
                recovery: None,
            },
            Mig {
                tag: "0001_broken",
                sql: "ALTER TABLE \"a\" ADD COLUMN \"b\" text;--> statement-breakpoint\nALTER TABLE \"nope\" ADD COLUMN \"c\" text;",
                down: Some("ALTER TABLE \"a\" DROP COLUMN \"b\";"),
                recovery: None,
            },
        ],
    );
    let sha = repo.commit("broken");
    let err = run(&role(&db, &cache), &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap_err();
    assert_eq!(err.code, "migration_failed");
    assert!(!err.retryable);
    assert!(
        err.message.contains("0001_broken") && err.message.contains("statement 2 of 2"),
        "{}",
        err.message
    );
    assert!(db.tables().await.is_empty(), "one transaction: 0000 is rolled back too");
    assert!(db.history().await.is_empty());
}

#[tokio::test]
async fn a_migration_failing_on_the_target_rolls_back_every_pending_migration() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    let role = role(&db, &cache);
    let create = Mig {
        tag: "0000_create_a",
        sql: "CREATE TABLE \"a\" (\"id\" integer);",
        down: Some("DROP TABLE \"a\";"),
        recovery: None,
    };
    write_migrations(&repo, &[create]);
    let sha1 = repo.commit("a");
    run(&role, &migrate_job("staging", &repo, &sha1, Uuid::new_v4()))
        .await
        .unwrap();
    // Data the next migration does not expect: fine on an empty database, fatal here.
    db.exec("INSERT INTO a (id) VALUES (NULL)").await;
    write_migrations(
        &repo,
        &[
            Mig {
                tag: "0000_create_a",
                sql: "CREATE TABLE \"a\" (\"id\" integer);",
                down: Some("DROP TABLE \"a\";"),
                recovery: None,
            },
            Mig {
                tag: "0001_create_b",
                sql: "CREATE TABLE \"b\" (\"id\" integer);",
                down: Some("DROP TABLE \"b\";"),
                recovery: None,
            },
            Mig {
                tag: "0002_a_id_not_null",
                sql: "ALTER TABLE \"a\" ADD COLUMN \"c\" text;--> statement-breakpoint\nALTER TABLE \"a\" ALTER COLUMN \"id\" SET NOT NULL;",
                down: Some(
                    "ALTER TABLE \"a\" ALTER COLUMN \"id\" DROP NOT NULL;--> statement-breakpoint\nALTER TABLE \"a\" DROP COLUMN \"c\";",
                ),
                recovery: None,
            },
        ],
    );
    let sha2 = repo.commit("b, a.id not null");
    let err = run(&role, &migrate_job("staging", &repo, &sha2, Uuid::new_v4()))
        .await
        .unwrap_err();
    assert_eq!(err.code, "migration_failed");
    assert!(
        err.message.contains("0002_a_id_not_null") && err.message.contains("statement 2 of 2"),
        "{}",
        err.message
    );
    assert!(!err.message.contains("scratch"), "{}", err.message);
    assert_eq!(db.tables().await, ["a"], "0001 is rolled back with 0002");
    assert_eq!(db.columns("a").await, ["id"]);
    assert_eq!(db.history().await.len(), 1);
}

fn accounts_migrations(with_constraint: bool) -> Vec<Mig<'static>> {
    let mut m = vec![Mig {
        tag: "0000_create_accounts",
        sql: "CREATE TABLE \"accounts\" (\n\t\"id\" serial PRIMARY KEY NOT NULL,\n\t\"balance\" integer NOT NULL\n);\n",
        down: Some("DROP TABLE \"accounts\";"),
        recovery: None,
    }];
    if with_constraint {
        m.push(Mig {
            tag: "0001_accounts_balance_check",
            sql: "ALTER TABLE \"accounts\" ADD CONSTRAINT \"accounts_balance_non_negative\" CHECK (\"balance\" >= 0) NOT VALID;",
            down: Some("ALTER TABLE \"accounts\" DROP CONSTRAINT \"accounts_balance_non_negative\";"),
            recovery: None,
        });
    }
    m
}

#[tokio::test]
async fn verify_catches_a_not_valid_constraint_that_rows_violate_naming_it() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    let role = role(&db, &cache);
    write_migrations(&repo, &accounts_migrations(false));
    let sha1 = repo.commit("accounts");
    run(&role, &migrate_job("staging", &repo, &sha1, Uuid::new_v4()))
        .await
        .unwrap();
    db.exec("INSERT INTO accounts (balance) VALUES (10), (-5)").await;

    write_migrations(&repo, &accounts_migrations(true));
    let sha2 = repo.commit("balance check");
    let err = run(&role, &migrate_job("staging", &repo, &sha2, Uuid::new_v4()))
        .await
        .unwrap_err();
    assert_eq!(err.code, "constraint_invalid");
    assert!(!err.retryable);
    assert!(
        err.message.contains("accounts_balance_non_negative") && err.message.contains("nothing was applied"),
        "{}",
        err.message
    );
    assert_eq!(
        db.history().await.len(),
        1,
        "the failed check rolled the migration back"
    );

    // The verify action alone says what is missing.
    let err = run(
        &role,
        &job(
            baton_shared::protocol::JobKind::Execute,
            "verify",
            "staging",
            &repo,
            &sha2,
            Uuid::new_v4(),
        ),
    )
    .await
    .unwrap_err();
    assert!(err.message.contains("0001_accounts_balance_check"), "{}", err.message);

    // Fix the data: the constraint is added and validated.
    db.exec("UPDATE accounts SET balance = 0 WHERE balance < 0").await;
    let out = run(&role, &migrate_job("staging", &repo, &sha2, Uuid::new_v4()))
        .await
        .unwrap();
    assert_eq!(strings(&out["applied"]), ["0001_accounts_balance_check"]);
    let validated = strings(&out["verify"]["validated_constraints"]);
    assert_eq!(validated, ["accounts.accounts_balance_non_negative"]);
    let out = run(
        &role,
        &job(
            baton_shared::protocol::JobKind::Execute,
            "verify",
            "staging",
            &repo,
            &sha2,
            Uuid::new_v4(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(out["schema_matches"], true);
}

#[tokio::test]
async fn verify_catches_rows_that_break_a_foreign_key() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_fixture(&repo, 2);
    let sha = repo.commit("migrations");
    let role = role(&db, &cache);
    run(&role, &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap();
    // Rows that bypassed the constraint's triggers, as a restore or replication can leave.
    db.exec(
        "INSERT INTO users (email) VALUES ('a@example.org'); \
         ALTER TABLE orders DISABLE TRIGGER ALL; \
         INSERT INTO orders (user_id, total_cents) VALUES (999, 100); \
         ALTER TABLE orders ENABLE TRIGGER ALL;",
    )
    .await;
    let err = run(
        &role,
        &job(
            baton_shared::protocol::JobKind::Execute,
            "verify",
            "staging",
            &repo,
            &sha,
            Uuid::new_v4(),
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, "foreign_key_violation");
    assert!(err.message.contains("orders_user_id_users_id_fk"), "{}", err.message);
}

#[tokio::test]
async fn verify_reports_schema_drift_from_what_the_migrations_produce() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_fixture(&repo, 2);
    let sha = repo.commit("migrations");
    let role = role(&db, &cache);
    run(&role, &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap();
    db.exec("ALTER TABLE users ADD COLUMN hand_made integer; DROP INDEX orders_user_id_idx; ALTER TABLE users ALTER COLUMN name SET NOT NULL")
        .await;
    let err = run(
        &role,
        &job(
            baton_shared::protocol::JobKind::Execute,
            "verify",
            "staging",
            &repo,
            &sha,
            Uuid::new_v4(),
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, "schema_mismatch");
    for needle in [
        "users.hand_made",
        "orders_user_id_idx",
        "users.name is text not null, expected text null",
    ] {
        assert!(err.message.contains(needle), "{needle}: {}", err.message);
    }
}

#[tokio::test]
async fn unknown_commit_is_refused_naming_it() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_fixture(&repo, 1);
    repo.commit("migrations");
    let missing = "0123456789abcdef0123456789abcdef01234567";
    let err = run(
        &role(&db, &cache),
        &migrate_job("staging", &repo, missing, Uuid::new_v4()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, "unknown_commit");
    assert!(!err.retryable);
    assert!(err.message.contains(missing), "{}", err.message);
}

#[tokio::test]
async fn service_without_a_configured_database_is_refused_naming_service_and_zone() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_fixture(&repo, 1);
    let sha = repo.commit("migrations");
    let mut job = migrate_job("staging", &repo, &sha, Uuid::new_v4());
    job.deploy.service = "billing".into();
    let err = run(&role(&db, &cache), &job).await.unwrap_err();
    assert_eq!(err.code, "no_database");
    assert!(!err.retryable);
    assert!(
        err.message.contains("\"billing\"") && err.message.contains("zone staging"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn unknown_actions_are_refused() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    let mut job = migrate_job(
        "staging",
        &repo,
        "0123456789abcdef0123456789abcdef01234567",
        Uuid::new_v4(),
    );
    job.action = "drop-everything".into();
    let err = run(&role(&db, &cache), &job).await.unwrap_err();
    assert_eq!(err.code, "unknown_action");
    assert!(err.message.contains("drop-everything"));
}

#[tokio::test]
async fn removing_a_column_the_code_still_names_is_refused_unless_the_event_excepts_it() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    // 0002 drops orders.legacy_note; the Drizzle schema of the same commit still declares it.
    write_fixture(&repo, 3);
    repo.write(
        "src/db/schema.ts",
        "export const orders = pgTable(\"orders\", {\n  legacyNote: text(\"legacy_note\"),\n});\n",
    );
    repo.write("docs/notes.md", "`legacy_note` is going away\n");
    let sha = repo.commit("drop legacy note, schema not updated");
    let role = role(&db, &cache);
    let run_id = Uuid::new_v4();

    let err = run(&role, &migrate_job("staging", &repo, &sha, run_id))
        .await
        .unwrap_err();
    assert_eq!(err.code, "additive_first");
    assert!(!err.retryable);
    assert!(
        err.message.contains("0002_drop_orders_legacy_note")
            && err.message.contains("still named in src/db/schema.ts")
            && !err.message.contains("docs/notes.md"),
        "{}",
        err.message
    );
    assert!(db.tables().await.is_empty(), "nothing may be applied");

    // An explicit exception with a reason lets it through, and the facts name the user.
    let mut job = migrate_job("staging", &repo, &sha, run_id);
    job.deploy.exceptions.push(baton_shared::protocol::RuleException {
        rule: "additive-first".into(),
        reason: "the field is read nowhere; the schema line goes in the next deploy".into(),
    });
    let out = run(&role, &job).await.unwrap();
    let removals = out["removals"].as_array().unwrap();
    assert_eq!(removals.len(), 1, "{removals:?}");
    assert_eq!(removals[0]["name"], "legacy_note");
    assert_eq!(removals[0]["used_by"], serde_json::json!(["src/db/schema.ts"]));

    // Once the code stops naming it, no exception is needed.
    let db2 = TestDb::create().await;
    repo.write("src/db/schema.ts", "export const orders = pgTable(\"orders\", {});\n");
    let sha2 = repo.commit("schema updated");
    let out = run(
        &self::role(&db2, &cache),
        &migrate_job("staging", &repo, &sha2, Uuid::new_v4()),
    )
    .await
    .unwrap();
    assert_eq!(out["removals"][0]["used_by"], serde_json::Value::Null);
}

#[tokio::test]
async fn a_migration_with_its_own_transaction_control_is_refused_before_anything_is_applied() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    // The first migration commits on its own; the second fails. Applied, the
    // first would stay committed while the report said nothing was applied.
    write_migrations(
        &repo,
        &[
            Mig::reversible(
                "0000_own_tx",
                "BEGIN;\nCREATE TABLE \"a\" (\"id\" integer);\nCOMMIT;",
                "DROP TABLE \"a\";",
            ),
            Mig::reversible(
                "0001_concurrent",
                "CREATE INDEX CONCURRENTLY \"a_id\" ON \"a\" (\"id\");",
                "DROP INDEX \"a_id\";",
            ),
            Mig::reversible("0002_fails", "SELECT * FROM \"missing_table\";", "SELECT 1;"),
        ],
    );
    let sha = repo.commit("own transaction control");
    let err = run(&role(&db, &cache), &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap_err();
    assert_eq!(err.code, "not_transactional");
    assert!(!err.retryable);
    for named in [
        "drizzle/migrations/0000_own_tx.sql has `BEGIN`",
        "drizzle/migrations/0000_own_tx.sql has `COMMIT`",
        "drizzle/migrations/0001_concurrent.sql has `CREATE INDEX CONCURRENTLY",
        "nothing was applied",
    ] {
        assert!(err.message.contains(named), "{named}: {}", err.message);
    }
    assert!(db.tables().await.is_empty(), "nothing may be applied");
    assert!(db.history().await.is_empty());
}

#[tokio::test]
async fn a_journal_entry_older_than_the_applied_ones_is_named_and_applied_only_when_excepted() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    let mig = |tag, sql| Mig::reversible(tag, sql, "SELECT 1;");
    write_migrations(
        &repo,
        &[
            mig("0000_a", "CREATE TABLE \"a\" (\"id\" integer);"),
            mig("0001_b", "CREATE TABLE \"b\" (\"id\" integer);"),
        ],
    );
    let first = repo.commit("two migrations");
    let role = role(&db, &cache);
    run(&role, &migrate_job("staging", &repo, &first, Uuid::new_v4()))
        .await
        .unwrap();

    // A branch merged late brings an entry whose `when` is older than 0001_b's.
    let journal_path = format!("{DIR}/meta/_journal.json");
    let mut journal: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.path().join(&journal_path)).unwrap()).unwrap();
    let when_b = journal["entries"][1]["when"].as_i64().unwrap();
    journal["entries"].as_array_mut().unwrap().push(serde_json::json!(
        {"idx": 2, "version": "7", "when": when_b - 30_000, "tag": "0002_late", "breakpoints": true}
    ));
    repo.write(&journal_path, serde_json::to_string_pretty(&journal).unwrap());
    repo.write(
        &format!("{DIR}/0002_late.sql"),
        "CREATE TABLE \"late\" (\"id\" integer);",
    );
    repo.write(&format!("{DIR}/0002_late.down.sql"), "DROP TABLE \"late\";");
    let late = repo.commit("late branch");

    let run_id = Uuid::new_v4();
    let err = run(&role, &migrate_job("staging", &repo, &late, run_id))
        .await
        .unwrap_err();
    assert_eq!(err.code, "older_than_applied");
    assert!(
        err.message.contains(&format!(
            "0002_late (when {}, older than the applied 0001_b)",
            when_b - 30_000
        )),
        "{}",
        err.message
    );
    assert_eq!(db.tables().await, ["a", "b"], "nothing applied");
    // `verify` names it as pending, not as an unexplained schema difference.
    let err = run(
        &role,
        &job(
            baton_shared::protocol::JobKind::Execute,
            "verify",
            "staging",
            &repo,
            &late,
            run_id,
        ),
    )
    .await
    .unwrap_err();
    assert!(
        err.message
            .contains("0002_late (older than the applied 0001_b: drizzle-orm never applies it)"),
        "{}",
        err.message
    );

    // The merge event's exception, with its reason, lets this deploy apply it.
    let mut excepted = migrate_job("staging", &repo, &late, run_id);
    excepted.deploy.exceptions.push(baton_shared::protocol::RuleException {
        rule: "apply-older-migrations".into(),
        reason: "0002 was merged late from a long-lived branch".into(),
    });
    let out = run(&role, &excepted).await.unwrap();
    assert_eq!(strings(&out["applied_older"]), ["0002_late"]);
    assert_eq!(db.tables().await, ["a", "b", "late"]);
    // And now nothing is pending or older for either bookkeeping.
    let again = run(&role, &migrate_job("staging", &repo, &late, Uuid::new_v4()))
        .await
        .unwrap();
    assert!(again.get("applied_older").is_none(), "{again:?}");
}

#[tokio::test]
async fn a_migration_changed_after_it_was_applied_is_refused_naming_it() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_fixture(&repo, 2);
    let sha = repo.commit("two");
    let role = role(&db, &cache);
    run(&role, &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap();
    let tag = &fixture_tags()[0];
    let path = format!("{DIR}/{tag}.sql");
    let text = std::fs::read_to_string(repo.path().join(&path)).unwrap();
    repo.write(&path, format!("{text}\n-- edited after it was applied\n"));
    let edited = repo.commit("edit an applied migration");
    let err = run(&role, &migrate_job("staging", &repo, &edited, Uuid::new_v4()))
        .await
        .unwrap_err();
    assert_eq!(err.code, "changed_after_applied");
    assert!(err.message.contains(tag.as_str()), "{}", err.message);
}

#[tokio::test]
async fn a_history_that_predates_baton_is_applied_without_companions_up_to_its_baseline() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    // Years of drizzle-kit history with no down files or recovery procedures,
    // then a change written after the repository adopted Baton, also without one.
    write_migrations(
        &repo,
        &[
            Mig::bare("0000_users", "CREATE TABLE \"users\" (\"id\" integer);"),
            Mig::bare("0001_orders", "CREATE TABLE \"orders\" (\"id\" integer);"),
            Mig::bare("0002_drop_x", "ALTER TABLE \"users\" ADD COLUMN \"x\" text;"),
            Mig::bare("0003_after", "CREATE TABLE \"after_adoption\" (\"id\" integer);"),
        ],
    );
    let sha = repo.commit("history");
    let role = role(&db, &cache);
    // Without a baseline every migration is held to the rule.
    let err = run(&role, &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap_err();
    assert_eq!(err.code, "irreversible_without_procedure");
    assert!(
        err.message.contains("0000_users") && err.message.contains("baton.baseline"),
        "{}",
        err.message
    );

    // The repository adopts Baton: its newest migration before adoption is the baseline.
    repo.write(&format!("{DIR}/baton.baseline"), "# adopted 2026-12-06\n0002_drop_x\n");
    let sha = repo.commit("adopt baton");
    let err = run(&role, &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap_err();
    assert_eq!(err.code, "irreversible_without_procedure");
    assert!(
        err.message.contains("0003_after") && !err.message.contains("0000_users"),
        "only the change after adoption is held to the rule: {}",
        err.message
    );
    assert!(db.tables().await.is_empty());

    repo.write(&format!("{DIR}/0003_after.down.sql"), "DROP TABLE \"after_adoption\";");
    let sha = repo.commit("down for the new migration");
    let out = run(&role, &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap();
    assert_eq!(strings(&out["applied"]).len(), 4);
    assert_eq!(
        strings(&out["applied_before_adoption"]),
        ["0000_users", "0001_orders", "0002_drop_x"]
    );

    // A baseline that names no journal entry is refused, naming the file.
    repo.write(&format!("{DIR}/baton.baseline"), "0009_missing\n");
    let sha = repo.commit("bad baseline");
    let err = run(&role, &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap_err();
    assert!(
        err.message.contains("baton.baseline names \"0009_missing\""),
        "{}",
        err.message
    );
}

/// The seed's zone rule "staging uses an anonymised snapshot": a configured
/// check the database must pass before anything is applied. A table the
/// migrations have not created yet passes; rows with production's customer
/// domain fail the step, naming the check and the count.
#[tokio::test]
async fn a_database_failing_its_data_checks_is_refused_before_any_migration_runs() {
    use baton_db_migration::config::DataCheck;
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_fixture(&repo, 1);
    let sha = repo.commit("users");
    let mut config = config(&db, &cache);
    config.data_checks.insert(
        SERVICE.to_owned(),
        vec![DataCheck {
            name: "no production customer e-mail".into(),
            query: "select count(*) from users where email like '%@shop.example'".into(),
        }],
    );
    config.validate().unwrap();
    let role = baton_db_migration::DbMigration::new(config);
    // First deploy: no users table yet, nothing to check.
    let out = run(&role, &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap();
    assert_eq!(strings(&out["data_checks"]), ["no production customer e-mail"]);

    // A copy of production that was not anonymised.
    db.exec("insert into users (email) values ('ada@shop.example'), ('x@anon.invalid')")
        .await;
    write_fixture(&repo, 2);
    let sha = repo.commit("more");
    let e = run(&role, &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap_err();
    assert_eq!(e.code, "data_checks_failed");
    assert!(
        e.message
            .contains("no production customer e-mail: 1 rows; no migration was applied"),
        "{}",
        e.message
    );
    assert_eq!(db.history().await.len(), 1, "nothing more applied");
}
