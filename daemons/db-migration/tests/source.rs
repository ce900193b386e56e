//! Reading migrations from a real git repository at exactly one commit.

mod common;

use baton_db_migration::drizzle::MigrationSet;
use baton_shared::git::GitCache;
use common::*;
use uuid::Uuid;

#[tokio::test]
async fn migrations_are_read_at_the_given_commit_and_later_commits_do_not_leak_in() {
    let repo = GitRepo::new();
    let cache = TempDir::new("cache");
    write_fixture(&repo, 2);
    let sha1 = repo.commit("two migrations");
    write_fixture(&repo, 4);
    // An edit of an applied migration after the fact, as happens by mistake.
    repo.write(
        &format!("{DIR}/0001_add_users_nickname.sql"),
        "ALTER TABLE \"users\" ADD COLUMN \"nickname\" varchar(64);",
    );
    let sha2 = repo.commit("four migrations");
    let git = GitCache::new(cache.0.clone());

    let read = |sha: String| {
        let git = git.clone();
        let url = repo.url();
        async move {
            let files = git.read_folder(&url, &sha, DIR).await.unwrap();
            MigrationSet::from_files(sha, &files).unwrap()
        }
    };
    let later = read(sha2.clone()).await;
    assert_eq!(later.migrations.len(), 4);
    assert!(later.migrations[1].sql.contains("varchar(64)"));
    // Read the earlier commit after the later one is in the cache.
    let earlier = read(sha1.clone()).await;
    assert_eq!(
        earlier.migrations.iter().map(|m| m.tag.as_str()).collect::<Vec<_>>(),
        &fixture_tags()[..2]
    );
    assert_eq!(
        earlier.migrations[1].sql,
        std::fs::read_to_string(fixture_dir().join("0001_add_users_nickname.sql")).unwrap()
    );
    assert!(earlier.migrations[0].down.is_some());
    // The files from git hash exactly like the files on disk that drizzle reads.
    let on_disk = MigrationSet::from_dir(&fixture_dir()).unwrap();
    assert_eq!(earlier.migrations[0].hash, on_disk.migrations[0].hash);
    assert_eq!(later.migrations[3].recovery, on_disk.migrations[3].recovery);
}

#[tokio::test]
async fn a_later_commit_is_fetched_into_an_existing_cache() {
    let repo = GitRepo::new();
    let cache = TempDir::new("cache");
    let git = GitCache::new(cache.0.clone());
    write_fixture(&repo, 1);
    let sha1 = repo.commit("one");
    assert_eq!(git.read_folder(&repo.url(), &sha1, DIR).await.unwrap().len(), 3);
    write_fixture(&repo, 2);
    let sha2 = repo.commit("two");
    let files = git.read_folder(&repo.url(), &sha2, DIR).await.unwrap();
    assert!(files.contains_key("0001_add_users_nickname.sql"), "{:?}", files.keys());
}

#[tokio::test]
async fn a_relative_repository_path_is_refused_naming_it() {
    let db = TestDb::create().await;
    let repo = GitRepo::new();
    let cache = TempDir::new("cache");
    repo.write("README.md", "x\n");
    let sha = repo.commit("docs");
    let mut job = migrate_job("staging", &repo, &sha, Uuid::new_v4());
    job.deploy.repository = "shop-api".into();
    let err = run(&role(&db, &cache), &job).await.unwrap_err();
    assert!(
        err.message.contains("\"shop-api\" is a relative path"),
        "{}: {}",
        err.code,
        err.message
    );
    assert!(!err.retryable, "bad input is not retried");
}

#[tokio::test]
async fn a_commit_without_the_migrations_folder_is_refused_naming_folder_and_commit() {
    let db = TestDb::create().await;
    let repo = GitRepo::new();
    let cache = TempDir::new("cache");
    repo.write("README.md", "no migrations here\n");
    let sha = repo.commit("docs");
    let err = run(&role(&db, &cache), &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap_err();
    assert_eq!(err.code, "migrations_not_found");
    assert!(
        err.message.contains(DIR) && err.message.contains(&sha),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn the_migrations_dir_parameter_picks_another_folder() {
    let db = TestDb::create().await;
    let repo = GitRepo::new();
    let cache = TempDir::new("cache");
    write_fixture(&repo, 1);
    std::fs::rename(repo.path().join("drizzle"), repo.path().join("db")).unwrap();
    let sha = repo.commit("moved");
    let mut job = migrate_job("staging", &repo, &sha, Uuid::new_v4());
    job.params.insert("migrations_dir".into(), "db/migrations".into());
    let out = run(&role(&db, &cache), &job).await.unwrap();
    assert_eq!(strings(&out["applied"]), &fixture_tags()[..1]);

    job.params.insert("migrations_dir".into(), "../etc".into());
    let err = run(&role(&db, &cache), &job).await.unwrap_err();
    assert_eq!(err.code, "invalid_params");
}

#[tokio::test]
async fn a_journal_entry_without_its_sql_file_is_refused_naming_it() {
    let db = TestDb::create().await;
    let repo = GitRepo::new();
    let cache = TempDir::new("cache");
    write_fixture(&repo, 2);
    std::fs::remove_file(repo.path().join(DIR).join("0001_add_users_nickname.sql")).unwrap();
    let sha = repo.commit("lost a file");
    let err = run(&role(&db, &cache), &migrate_job("staging", &repo, &sha, Uuid::new_v4()))
        .await
        .unwrap_err();
    assert_eq!(err.code, "invalid_migrations");
    assert!(err.message.contains("0001_add_users_nickname.sql"), "{}", err.message);
    assert!(db.tables().await.is_empty());
}
