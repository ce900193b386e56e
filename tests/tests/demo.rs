//! The README's main job, `baton demo`, as a test: real scheduler, real
//! db-migration and backup daemons for both zones, real RabbitMQ, PostgreSQL,
//! git and pg_dump; the final database states of both zones are checked.

use std::process::Command;

use baton_tests::{TestEnv, bin};
use sqlx::{Connection, PgConnection};

async fn columns(db: &str) -> Vec<String> {
    let mut conn = PgConnection::connect(&format!("postgres://postgres@127.0.0.1:5432/{db}"))
        .await
        .unwrap();
    sqlx::query_scalar(
        "select column_name::text from information_schema.columns
         where table_schema = 'public' and table_name = 'customers' order by ordinal_position",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
}

async fn scalar(db: &str, sql: &'static str) -> i64 {
    let mut conn = PgConnection::connect(&format!("postgres://postgres@127.0.0.1:5432/{db}"))
        .await
        .unwrap();
    sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap()
}

struct DropDatabases(Vec<String>);

impl Drop for DropDatabases {
    fn drop(&mut self) {
        for db in &self.0 {
            let _ = Command::new("psql")
                .args(["postgres://postgres@127.0.0.1:5432/postgres", "-qc"])
                .arg(format!("drop database if exists {db} with (force)"))
                .output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_migrates_both_zones_rolls_back_staging_when_production_fails_and_restores_backups() {
    let env = TestEnv::new("demo").await;
    let prefix = format!("{}_", env.db_name);
    let dbs = ["baton_demo", "shop_staging", "shop_production"].map(|d| format!("{prefix}{d}"));
    let _cleanup = DropDatabases(dbs.to_vec());
    let out = Command::new(bin("baton-e2e"))
        .args(["demo", "--prefix", &prefix, "--examples"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/demo"))
        .env("BATON_AMQP__URL", &env.amqp_url)
        .env("BATON_DATABASE__URL", "postgres://postgres@127.0.0.1:5432/postgres")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed ({:?}):\n{stdout}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Demo finished as expected"), "{stdout}");
    let wide: Vec<&str> = stdout.lines().filter(|l| l.chars().count() > 80).collect();
    assert!(wide.is_empty(), "output fits 80 columns; these lines do not: {wide:#?}");

    let [sched, staging, production] = &dbs;
    // Run 1 created the schema in both zones; run 2's column was undone on staging
    // and never applied on production.
    for db in [staging, production] {
        assert_eq!(columns(db).await, ["id", "email", "created_at"], "{db}");
        assert_eq!(
            scalar(db, "select count(*) from drizzle.__drizzle_migrations").await,
            1,
            "{db}"
        );
    }
    assert_eq!(
        scalar(production, "select count(*) from customers").await,
        2,
        "production data survived"
    );
    assert_eq!(
        scalar(
            staging,
            "select count(*) from baton_migrations.log where direction = 'down'"
        )
        .await,
        1,
        "the staging down migration is recorded"
    );
    let statuses: Vec<String> = {
        let mut conn = PgConnection::connect(&format!("postgres://postgres@127.0.0.1:5432/{sched}"))
            .await
            .unwrap();
        sqlx::query_scalar("select status from runs order by seq")
            .fetch_all(&mut conn)
            .await
            .unwrap()
    };
    assert_eq!(statuses, ["succeeded", "rolled_back", "rolled_back"]);
    // Run 3's data migration had no down: both zones were restored from the
    // pre-deploy backups run 3 took, by the backup daemons.
    let restores: Vec<(String, String)> = {
        let mut conn = PgConnection::connect(&format!("postgres://postgres@127.0.0.1:5432/{sched}"))
            .await
            .unwrap();
        sqlx::query_as(
            "select a.step_id, s.status from audit a join steps s on s.run_id = a.run_id and s.step_id = a.step_id
              where a.kind = 'restore_from_backup' order by a.id",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap()
    };
    assert_eq!(
        restores,
        [
            ("db.production".to_owned(), "compensated".to_owned()),
            ("db.staging".to_owned(), "compensated".to_owned())
        ]
    );
    let emails: Vec<String> = {
        let mut conn = PgConnection::connect(&format!("postgres://postgres@127.0.0.1:5432/{production}"))
            .await
            .unwrap();
        sqlx::query_scalar("select email from customers order by id")
            .fetch_all(&mut conn)
            .await
            .unwrap()
    };
    assert_eq!(
        emails,
        ["Ada@Example.org", "grace@example.org"],
        "the original spelling is back"
    );
    let dir = stdout_dir(&stdout);
    let backups = std::fs::read_dir(dir.join("backups/primary/production"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(
        backups >= 5,
        "pre and post backups of runs 1 and 3 and the pre backup of run 2 exist"
    );
    let copies = std::fs::read_dir(dir.join("backups/copy/production"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(backups, copies, "every backup has its copy in the second location");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The demo prints where its files are.
fn stdout_dir(stdout: &str) -> std::path::PathBuf {
    let line = stdout
        .lines()
        .find(|l| l.contains("files and logs in"))
        .expect("demo prints its directory");
    std::path::PathBuf::from(line.rsplit(' ').next().unwrap())
}
