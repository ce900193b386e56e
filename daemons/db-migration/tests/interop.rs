//! Baton and drizzle-orm's own migrator (`interop/migrate.mjs`, node-postgres) agree:
//! a database either of them migrated is up to date for the other.
//!
//! Needs `npm ci --prefix daemons/db-migration/interop` (CI runs it); without it the
//! tests fail and say so.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use uuid::Uuid;

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("interop")
}

/// Runs drizzle-orm's `migrate()` on `db` with the folder at `folder`.
fn drizzle_migrate(db: &TestDb, folder: &Path) {
    assert!(
        interop_dir().join("node_modules/drizzle-orm/package.json").exists(),
        "drizzle-orm is not installed: run `npm ci --prefix daemons/db-migration/interop` first"
    );
    let out = Command::new("node")
        .current_dir(interop_dir())
        .arg("migrate.mjs")
        .arg(folder)
        .env("DATABASE_URL", db.url())
        .output()
        .expect("run node (Node 20 must be installed)");
    assert!(
        out.status.success(),
        "drizzle's migrator failed ({}): {} {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn drizzle_finds_nothing_to_apply_after_baton_migrated() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_fixture(&repo, 4);
    let sha = repo.commit("migrations");
    let out = run(&role(&db, &cache), &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap();
    assert_eq!(strings(&out["applied"]).len(), 4);
    let history = db.history().await;
    let schema = db.snapshot().await;

    drizzle_migrate(&db, &repo.path().join(DIR));

    assert_eq!(db.history().await, history, "drizzle applied nothing");
    assert_eq!(db.snapshot().await, schema);
}

#[tokio::test]
async fn baton_finds_nothing_to_apply_after_drizzle_migrated() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    write_fixture(&repo, 4);
    let sha = repo.commit("migrations");
    drizzle_migrate(&db, &repo.path().join(DIR));
    let history = db.history().await;
    assert_eq!(history.len(), 4);
    let schema = db.snapshot().await;

    let out = run(&role(&db, &cache), &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap();
    assert!(strings(&out["applied"]).is_empty(), "{out:?}");
    assert_eq!(out["verify"]["schema_matches"], true);
    assert_eq!(db.history().await, history);
    assert_eq!(db.snapshot().await, schema);
}

#[tokio::test]
async fn each_continues_where_the_other_stopped() {
    let db = TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = GitRepo::new();
    let role = role(&db, &cache);

    // drizzle applies the first migration, Baton the next two, drizzle the last.
    write_fixture(&repo, 1);
    repo.commit("one");
    drizzle_migrate(&db, &repo.path().join(DIR));
    write_fixture(&repo, 3);
    let sha = repo.commit("three");
    let out = run(&role, &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap();
    assert_eq!(strings(&out["applied"]), &fixture_tags()[1..3]);
    write_fixture(&repo, 4);
    let sha = repo.commit("four");
    drizzle_migrate(&db, &repo.path().join(DIR));
    assert_eq!(db.history().await.len(), 4);

    let out = run(&role, &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap();
    assert!(strings(&out["applied"]).is_empty());
    // drizzle and Baton record identical rows for identical files.
    let set = baton_db_migration::drizzle::MigrationSet::from_dir(&fixture_dir()).unwrap();
    let expected: Vec<(String, i64)> = set.migrations.iter().map(|m| (m.hash.clone(), m.when)).collect();
    assert_eq!(db.history().await, expected);
}
