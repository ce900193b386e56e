//! The README's main job, `baton demo`, as a test: the built binaries, real
//! scheduler, real db-migration and backup daemons for both zones, real
//! RabbitMQ, PostgreSQL, git and pg_dump; the final database states of both
//! zones are checked. The demo's scheduler is made to start slowly and an
//! interrupted demo's leftovers wait in the broker, as a new user's machine
//! may have them.

use std::process::{Command, Output};

use baton_shared::amqp::{Broker, Outgoing};
use baton_shared::secret::Secret;
use baton_shared::topology;
use baton_tests::{TestEnv, bin, event};
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

fn rabbitmqctl(args: &[&str]) -> Output {
    Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("run rabbitmqctl")
}

/// Removes the demo's vhost if a failing demo left it.
struct DropVhost(String);

impl Drop for DropVhost {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["delete_vhost", &self.0]);
    }
}

/// `baton demo --migrations` as a user runs it (the built binary), with extra
/// environment.
fn demo(env: &TestEnv, prefix: &str, args: &[&str], extra: &[(&str, &str)]) -> Output {
    Command::new(bin("baton-e2e"))
        .args(["demo", "--migrations", "--prefix", prefix])
        .args(args)
        .arg("--examples")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/demo"))
        .env("BATON_AMQP__URL", &env.amqp_url)
        .env("BATON_DATABASE__URL", "postgres://postgres@127.0.0.1:5432/postgres")
        .envs(extra.iter().copied())
        .output()
        .unwrap()
}

/// What an interrupted demo leaves in the broker: the topology and a merge
/// event nobody consumed, in the configured vhost (as in `/` on a user's
/// machine) and in a vhost of the demo's own name. A demo that reused either
/// would run that event first, and would find the merge-event queue before its
/// scheduler had started.
async fn leave_an_interrupted_demo(url: &str) {
    let broker = Broker::connect(&Secret::new(url.to_owned()), "interrupted demo")
        .await
        .unwrap();
    topology::declare_core(&broker.channel().await.unwrap(), topology::DEFAULT_DELIVERY_LIMIT)
        .await
        .unwrap();
    let mut leftover = event("shop-api", 0x7e, &["drizzle/migrations/0009_leftover.sql"]);
    leftover["pull_request"]["approvals"] = serde_json::json!([{"by": "marta", "at": "2026-12-01T09:00:00Z"}]);
    broker
        .publish(
            topology::EVENTS_EXCHANGE,
            topology::MERGE_EVENTS_KEY,
            &serde_json::to_vec(&leftover).unwrap(),
            &Outgoing::default(),
        )
        .await
        .unwrap();
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_migrates_both_zones_rolls_back_staging_when_production_fails_and_restores_backups() {
    let env = TestEnv::new("demo").await;
    let prefix = format!("{}_", env.db_name);
    let dbs = ["baton_demo", "shop_staging", "shop_production"].map(|d| format!("{prefix}{d}"));
    let _cleanup = DropDatabases(dbs.to_vec());
    let vhost = format!("baton-demo-{}", env.db_name);
    let _vhost = DropVhost(vhost.clone());
    assert!(rabbitmqctl(&["add_vhost", &vhost]).status.success());
    assert!(
        rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"])
            .status
            .success()
    );
    leave_an_interrupted_demo(&format!("amqp://guest:guest@127.0.0.1:5672/{vhost}")).await;
    leave_an_interrupted_demo(&env.amqp_url).await;
    // The scheduler takes seconds before it creates its tables: the demo must
    // wait for it, not read its tables or send it work before then.
    let out = demo(
        &env,
        &prefix,
        &[],
        &[("BATON_PAUSEPOINTS", "scheduler-before-migrate:4000")],
    );
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
    let vhosts = String::from_utf8_lossy(&rabbitmqctl(&["-q", "list_vhosts"]).stdout).into_owned();
    assert!(
        !vhosts.lines().any(|v| v.trim() == vhost),
        "the demo removed its vhost {vhost}: {vhosts}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_that_never_becomes_ready_is_named_with_the_end_of_its_log() {
    let env = TestEnv::new("demo-stuck").await;
    let prefix = format!("{}_", env.db_name);
    let dbs = ["baton_demo", "shop_staging", "shop_production"].map(|d| format!("{prefix}{d}"));
    let _cleanup = DropDatabases(dbs.to_vec());
    let vhost = format!("baton-demo-{}", env.db_name);
    let _vhost = DropVhost(vhost.clone());
    // The scheduler stops before it creates its tables for longer than the test runs.
    let out = demo(
        &env,
        &prefix,
        &["--ready-timeout", "3"],
        &[("BATON_PAUSEPOINTS", "scheduler-before-migrate:600000")],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(3), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("scheduler is not ready: its database is not initialised yet after 3 s"),
        "{stderr}"
    );
    assert!(
        stderr.contains("pause point scheduler-before-migrate"),
        "the end of the scheduler's log is shown: {stderr}"
    );
    assert!(!stdout.contains("merge of"), "no merge event was sent: {stdout}");
    let vhosts = String::from_utf8_lossy(&rabbitmqctl(&["-q", "list_vhosts"]).stdout).into_owned();
    assert!(!vhosts.lines().any(|v| v.trim() == vhost), "vhost removed: {vhosts}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_demo_with_the_same_databases_is_refused_while_one_runs() {
    let env = TestEnv::new("demo-twice").await;
    let prefix = format!("{}_", env.db_name);
    // The running demo holds its lock on the PostgreSQL server.
    let mut running = PgConnection::connect("postgres://postgres@127.0.0.1:5432/postgres")
        .await
        .unwrap();
    let taken: bool = sqlx::query_scalar("select pg_try_advisory_lock(hashtextextended($1, 0))")
        .bind(format!("baton demo/{prefix}"))
        .fetch_one(&mut running)
        .await
        .unwrap();
    assert!(taken);
    let out = demo(&env, &prefix, &[], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("another `baton demo` is running"), "{stderr}");
    let exists: bool = sqlx::query_scalar("select exists (select from pg_database where datname = $1)")
        .bind(format!("{prefix}baton_demo"))
        .fetch_one(&mut running)
        .await
        .unwrap();
    assert!(!exists, "the refused demo created nothing");
}

/// The demo prints where its files are.
fn stdout_dir(stdout: &str) -> std::path::PathBuf {
    let line = stdout
        .lines()
        .find(|l| l.contains("files and logs in"))
        .expect("demo prints its directory");
    std::path::PathBuf::from(line.rsplit(' ').next().unwrap())
}

/// `baton demo` itself: the seed pipeline on the eight real daemons, three
/// runs (all nine steps; a failed production rollout compensated across every
/// role; a Terraform change over the blast radius approved through the API).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_demo_deploys_everything_compensates_a_failed_rollout_and_applies_an_approved_plan() {
    let env = TestEnv::new("demo-seed").await;
    let prefix = format!("{}_", env.db_name);
    let dbs = ["baton_demo", "shop_staging", "shop_production", "shop_terraform"].map(|d| format!("{prefix}{d}"));
    let _cleanup = DropDatabases(dbs.to_vec());
    let vhost = format!("baton-demo-{}", env.db_name);
    let _vhost = DropVhost(vhost.clone());
    let out = Command::new(bin("baton-e2e"))
        .args(["demo", "--prefix", &prefix])
        .env("BATON_AMQP__URL", &env.amqp_url)
        .env("BATON_DATABASE__URL", "postgres://postgres@127.0.0.1:5432/postgres")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("Demo finished as expected"), "{stdout}");
    for want in [
        "network          succeeded",
        "cdn              succeeded",
        "apply.production step failed: Deployment/web: pod",
        "cdn              compensated (undone)",
        "network          compensated (undone)",
        "db.staging       compensated (undone)",
        "run is rolled_back",
        "infra.staging waits for approval: 7 resources change, above the blast radius limit of 5",
        "infra.production waits for approval",
    ] {
        assert!(stdout.contains(want), "{want:?} not in:\n{stdout}");
    }
    assert_eq!(stdout.matches("marta (approver) approves plan").count(), 2, "{stdout}");
    // Release 2's column was rolled back in both zones.
    for db in [&dbs[1], &dbs[2]] {
        assert_eq!(columns(db).await, ["id", "email", "created_at"], "{db}");
    }
    let vhosts = String::from_utf8_lossy(&rabbitmqctl(&["-q", "list_vhosts"]).stdout).into_owned();
    assert!(!vhosts.lines().any(|v| v.trim() == vhost), "vhost removed: {vhosts}");
}
