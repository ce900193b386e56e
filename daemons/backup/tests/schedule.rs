//! The backup daemon's own schedule against real PostgreSQL, `pg_dump` and
//! `pg_restore`: a pass of the daily work in process, and the `baton-backup`
//! process doing it on its own, across a restart.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use baton_backup::role::daily_run_id;
use baton_backup::schedule::{self, ScheduleSettings, month_of};
use baton_backup::store::{self, BackupKind, Manifest};
use baton_backup::{Policy, RestoreTest};
use chrono::{NaiveDate, Utc};
use common::{Env, SERVICE, ZONE, flip_byte, job, scratch_databases, seed_params, write_config};
use uuid::Uuid;

fn manifest(dir: &Path) -> Manifest {
    serde_json::from_slice(&std::fs::read(dir.join(store::MANIFEST_FILE)).expect("manifest")).expect("manifest JSON")
}

/// A date of its own for each test: daily backup ids (and so the names of the
/// spot checks' scratch databases) depend only on zone, service and date, and
/// the tests run at once.
fn date(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).unwrap()
}

fn daily_id(date: NaiveDate) -> String {
    format!(
        "{SERVICE}.daily-{}.{}",
        date.format("%Y%m%d"),
        daily_run_id(ZONE, SERVICE, date)
    )
}

#[tokio::test]
async fn a_pass_takes_each_database_s_daily_backup_once_prunes_and_tests_a_restore_once_a_month() {
    let env = Env::new().await;
    let settings = ScheduleSettings::default();
    let date = date(2001, 1, 10);
    // An older pre-deploy backup of the same day: the policy alone would
    // delete it, but it is younger than keep_recent_hours.
    let pre = env
        .run(&job("pre-deploy", "backup.pre", Uuid::new_v4(), seed_params()))
        .await
        .unwrap();
    let pre_id = common::backup_id_of(&pre);

    assert_eq!(
        schedule::pass(&env.role, ZONE, &settings, date).await.failed(),
        0,
        "no task fails"
    );
    let id = daily_id(date);
    let mut expected = vec![id.clone(), pre_id.clone()];
    expected.sort();
    assert_eq!(env.backups_in(&env.settings.primary.path), expected);
    assert_eq!(env.backups_in(&env.settings.copy.path), expected);
    let m = manifest(&env.primary_dir(&id));
    assert_eq!(m.kind, BackupKind::Daily);
    assert_eq!(m.run_id, daily_run_id(ZONE, SERVICE, date));
    assert!(env.primary_dir(&id).join(store::VERIFIED_FILE).exists(), "verified");

    // Day 1 is the default restore test day, so the month's test is due.
    let month = month_of(date);
    let test: RestoreTest = env
        .role
        .restore_test_of(ZONE, SERVICE, &month)
        .await
        .unwrap()
        .expect("the month's restore test is recorded");
    assert_eq!(test.backup_id, id, "the newest backup is tested");
    let sites: Vec<(&str, &str, usize)> = test
        .sites
        .iter()
        .map(|s| (s.site.as_str(), s.region.as_str(), s.tables))
        .collect();
    assert_eq!(sites, vec![("primary", "nl-ams1", 3), ("copy", "de-fra1", 3)]);
    assert!(scratch_databases(&id).await.is_empty(), "scratch databases dropped");

    // Again the same day: the same backup, and the month's test is not repeated.
    assert_eq!(schedule::pass(&env.role, ZONE, &settings, date).await.failed(), 0);
    assert_eq!(env.backups_in(&env.settings.primary.path), expected);
    let again = env.role.restore_test_of(ZONE, SERVICE, &month).await.unwrap();
    assert_eq!(again.as_ref(), Some(&test), "the month's test ran once");

    // The next day: a second daily backup.
    let next = date.succ_opt().unwrap();
    assert_eq!(schedule::pass(&env.role, ZONE, &settings, next).await.failed(), 0);
    assert!(env.backups_in(&env.settings.primary.path).contains(&daily_id(next)));
}

#[tokio::test]
async fn a_failed_pass_is_counted_and_the_next_takes_a_fresh_backup() {
    let env = Env::new().await;
    let settings = ScheduleSettings::default();
    let date = date(2001, 3, 10);
    let id = daily_id(date);
    env.role.daily_backup(ZONE, SERVICE, date).await.unwrap();
    // The primary's dump rots before the month's restore test.
    flip_byte(&env.primary_dir(&id).join(store::DUMP_FILE));

    // The daily backup finds it corrupted and sets it aside; with no backup
    // left, the restore test has nothing to test. Both count as failures.
    let report = schedule::pass(&env.role, ZONE, &settings, date).await;
    assert_eq!(report.failed(), 2, "{report:#?}");
    let errors: Vec<(&str, &str)> = report
        .tasks
        .iter()
        .filter_map(|t| Some((t.task.as_str(), t.error.as_deref()?.split(':').next()?)))
        .collect();
    assert_eq!(
        errors,
        vec![("daily_backup", "backup_corrupted"), ("restore_test", "no_backup")]
    );
    assert!(env.backups_in(&env.settings.primary.path).is_empty());
    assert_eq!(
        env.role.restore_test_of(ZONE, SERVICE, &month_of(date)).await.unwrap(),
        None
    );
    let metrics = baton_shared::metrics::global().render();
    for task in ["daily_backup", "restore_test"] {
        let series = format!("baton_backup_scheduled_tasks_total{{task=\"{task}\",outcome=\"failed\"}}");
        assert!(metrics.contains(&series), "{series} missing from:\n{metrics}");
    }

    // The retry takes a fresh backup under the same id, and tests it.
    assert_eq!(schedule::pass(&env.role, ZONE, &settings, date).await.failed(), 0);
    assert_eq!(env.backups_in(&env.settings.primary.path), vec![id.clone()]);
    let test = env.role.restore_test_of(ZONE, SERVICE, &month_of(date)).await.unwrap();
    assert_eq!(test.map(|t| t.backup_id), Some(id));
}

#[tokio::test]
async fn the_restore_test_names_the_location_that_fails_it() {
    let env = Env::new().await;
    let err = env.role.restore_test(ZONE, SERVICE, "2026-11").await.unwrap_err();
    assert_eq!(err.code(), "no_backup", "{err}");
    assert!(err.to_string().contains(SERVICE), "{err}");

    let date = date(2001, 5, 10);
    let id = daily_id(date);
    env.role.daily_backup(ZONE, SERVICE, date).await.unwrap();
    flip_byte(&env.copy_dir(&id).join(store::DUMP_FILE));
    let err = env.role.restore_test(ZONE, SERVICE, "2026-11").await.unwrap_err();
    assert_eq!(err.code(), "copy_mismatch", "{err}");
    assert!(err.to_string().contains("copy location"), "{err}");
    assert_eq!(
        env.role.restore_test_of(ZONE, SERVICE, "2026-11").await.unwrap(),
        None,
        "a failed test is not recorded"
    );
    assert!(scratch_databases(&id).await.is_empty(), "scratch databases dropped");
}

/// Two pre-deploy backups of two runs, oldest first.
async fn two_pre_deploy_backups(env: &Env) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..2 {
        let out = env
            .run(&job("pre-deploy", "backup.pre", Uuid::new_v4(), seed_params()))
            .await
            .unwrap();
        ids.push(common::backup_id_of(&out));
    }
    ids
}

#[tokio::test]
async fn prune_keeps_backups_younger_than_keep_recent_hours() {
    let env = Env::new().await;
    let ids = two_pre_deploy_backups(&env).await;
    let (older, newer) = (ids[0].clone(), ids[1].clone());
    let now = manifest(&env.primary_dir(&newer)).created_at;
    let report = env.role.prune(ZONE, Policy::default(), now).await.unwrap();
    assert!(report.deleted.is_empty(), "{:?}", report.deleted);
    assert_eq!(report.protected, vec![older.clone()]);
    assert_eq!(report.keep_recent_hours, 48);

    // Backups set aside as rotten stay 30 days for inspection, by the time
    // they were set aside; anything else in `.rejected/` is not prune's.
    let rejected = env.settings.primary.path.join(ZONE).join(store::REJECTED_DIR);
    let old = rejected.join(format!("{older}.20010101T000000.000000001Z"));
    let recent = rejected.join(format!("{older}.{}", Utc::now().format("%Y%m%dT%H%M%S%.fZ")));
    let notes = rejected.join("operator-notes");
    for dir in [&old, &recent, &notes] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let report = env.role.prune(ZONE, Policy::default(), now).await.unwrap();
    assert_eq!(report.rejected_removed, 1);
    assert!(!old.exists() && recent.exists() && notes.exists());

    // Once it is older than that, only the newest of its day stays.
    let later = now + chrono::Duration::hours(49);
    let report = env.role.prune(ZONE, Policy::default(), later).await.unwrap();
    assert_eq!(report.deleted, vec![older]);
    assert_eq!(env.backups_in(&env.settings.primary.path), vec![newer]);
}

#[tokio::test]
async fn a_backup_never_verified_counts_for_nothing_and_is_set_aside_once_old() {
    let env = Env::new().await;
    let ids = two_pre_deploy_backups(&env).await;
    // The newer one's step was killed during its spot check: no verification record.
    let (older, unverified) = (ids[0].clone(), ids[1].clone());
    std::fs::remove_file(env.primary_dir(&unverified).join(store::VERIFIED_FILE)).unwrap();
    let now = manifest(&env.primary_dir(&unverified)).created_at;
    // Young, it is kept for a retry to complete, but it takes no retention slot:
    // the verified backup of the day is kept as the day's newest.
    let report = env.role.prune(ZONE, Policy::default(), now).await.unwrap();
    assert!(report.unverified_set_aside.is_empty());
    assert!(
        report.kept.contains(&older) && report.kept.contains(&unverified),
        "{report:?}"
    );
    assert!(
        !report.protected.contains(&older),
        "the verified one is kept by retention: {report:?}"
    );
    // Older than keep_recent_hours, it is set aside in both locations like a rejected backup.
    let later = now + chrono::Duration::hours(49);
    let report = env.role.prune(ZONE, Policy::default(), later).await.unwrap();
    assert_eq!(report.unverified_set_aside, vec![unverified.clone()]);
    assert!(report.deleted.is_empty(), "{report:?}");
    assert_eq!(env.backups_in(&env.settings.primary.path), vec![older.clone()]);
    assert_eq!(env.backups_in(&env.settings.copy.path), vec![older]);
    for root in [&env.settings.primary.path, &env.settings.copy.path] {
        let rejected: Vec<String> = std::fs::read_dir(root.join(ZONE).join(store::REJECTED_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(rejected.iter().any(|n| n.starts_with(&unverified)), "{rejected:?}");
    }
}

/// A vhost of its own, removed on drop.
struct Vhost(String);

impl Vhost {
    fn new() -> Self {
        let name = format!("baton-test-bkschedule-{}", &Uuid::new_v4().simple().to_string()[..10]);
        for args in [
            vec!["add_vhost", name.as_str()],
            vec!["set_permissions", "-p", name.as_str(), "guest", ".*", ".*", ".*"],
        ] {
            let out = Command::new("rabbitmqctl")
                .args(&args)
                .output()
                .expect("run rabbitmqctl");
            assert!(
                out.status.success(),
                "rabbitmqctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Self(name)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["delete_vhost", &self.0]).output();
    }
}

struct Daemon {
    child: tokio::process::Child,
    metrics_addr: String,
}

impl Daemon {
    fn start(vhost: &Vhost, config: &Path, log: &Path) -> Self {
        Self::start_with(vhost, config, log, &[])
    }

    fn start_with(vhost: &Vhost, config: &Path, log: &Path, extra: &[(&str, &str)]) -> Self {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_baton-backup"))
            .arg("--config")
            .arg(config)
            .env(
                "BATON_AMQP__URL",
                format!("amqp://guest:guest@127.0.0.1:5672/{}", vhost.0),
            )
            .env("BATON_DAEMON__HTTP_LISTEN", format!("127.0.0.1:{port}"))
            .env("BATON_LOG__FORMAT", "json")
            .env("RUST_LOG", "info,lapin=warn,sqlx=warn")
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn baton-backup");
        Self {
            child,
            metrics_addr: format!("127.0.0.1:{port}"),
        }
    }

    /// SIGTERM, then its exit status, awaited for up to `patience`.
    async fn terminate(mut self, patience: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.child.id().expect("still running").to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        match tokio::time::timeout(patience, self.child.wait()).await {
            Ok(status) => Some(status.expect("wait for baton-backup")),
            Err(_) => None, // killed on drop
        }
    }
}

/// Waits (bounded) for `check`, polling; panics with `what` and the log.
/// What the tests wait for (a backup on disk, a series on `/metrics`) has no
/// event to await from outside the process, so it is polled.
async fn wait_for(what: &str, log: &Path, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; daemon log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn daily_backups(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join(ZONE))
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".daily-"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn an_operator_s_scheduled_pass_reports_each_task_and_exits_1_when_one_fails() {
    let env = Env::new().await;
    let config = write_config(&env);
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_baton-backup"))
            .arg("--config")
            .arg(&config)
            .arg("--scheduled-pass")
            .env("RUST_LOG", "warn")
            .output()
            .expect("run baton-backup --scheduled-pass");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "not a JSON report ({e}):\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code(), report)
    };

    let (code, report) = run();
    assert_eq!(code, Some(0), "{report:#}");
    let tasks: Vec<(&str, &str)> = report["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["task"].as_str().unwrap(), t["service"].as_str().unwrap()))
        .collect();
    assert_eq!(
        tasks,
        vec![("daily_backup", SERVICE), ("prune", ""), ("restore_test", SERVICE)]
    );
    let id = report["tasks"][0]["backup_id"].as_str().unwrap().to_owned();
    assert_eq!(report["date"], serde_json::json!(daily_date(&id)));
    assert_eq!(report["tasks"][2]["backup_id"], serde_json::json!(id));

    // The day's backup rots: the next pass says so and exits 1.
    flip_byte(&env.primary_dir(&id).join(store::DUMP_FILE));
    let (code, report) = run();
    assert_eq!(code, Some(1), "{report:#}");
    let error = report["tasks"][0]["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("backup_corrupted:"), "{report:#}");
}

/// The date (`YYYY-MM-DD`) in a daily backup's id.
fn daily_date(id: &str) -> String {
    let day = id
        .split('.')
        .nth(1)
        .and_then(|s| s.strip_prefix("daily-"))
        .expect("a daily backup id");
    format!("{}-{}-{}", &day[..4], &day[4..6], &day[6..])
}

#[tokio::test]
async fn the_daemon_takes_its_daily_backup_and_restore_test_on_its_own_once_across_restarts() {
    let env = Env::new().await;
    let vhost = Vhost::new();
    let config = write_config(&env);
    let s = &env.settings;
    let log = env.root.join("daemon.log");
    let before = Utc::now().date_naive();

    let daemon = Daemon::start(&vhost, &config, &log);
    // The gauge is set once the month's restore test, the pass's last task, is recorded.
    let mut metrics = String::new();
    wait_for(
        "the daily backup and the month's restore test",
        &log,
        Duration::from_secs(120),
        || {
            metrics = http_get(&daemon.metrics_addr);
            metrics.contains(
                "baton_backup_scheduled_last_success_timestamp_seconds{task=\"restore_test\",service=\"shop-api\"}",
            )
        },
    )
    .await;
    let after = Utc::now().date_naive();
    let taken = daily_backups(&s.primary.path);
    assert!(
        taken == vec![daily_id(before)] || taken == vec![daily_id(after)],
        "{taken:?} is not the daily backup of {before} or {after}"
    );
    assert!(env.primary_dir(&taken[0]).join(store::VERIFIED_FILE).exists());
    assert_eq!(daily_backups(&s.copy.path), taken, "copied to the second location");
    let month = month_of(manifest(&env.primary_dir(&taken[0])).created_at.date_naive());
    let test = env
        .role
        .restore_test_of(ZONE, SERVICE, &month)
        .await
        .unwrap()
        .expect("the month's restore test is recorded");
    assert_eq!(test.backup_id, taken[0]);
    for task in ["daily_backup", "prune", "restore_test"] {
        let series = format!("baton_backup_scheduled_tasks_total{{task=\"{task}\",outcome=\"succeeded\"}} 1");
        assert!(metrics.contains(&series), "{series} missing from:\n{metrics}");
    }

    let status = daemon
        .terminate(Duration::from_secs(20))
        .await
        .expect("stops on SIGTERM");
    assert!(status.success(), "exit status {status}");

    // Restarted the same day: the work is done, so nothing is taken or tested again.
    let daemon = Daemon::start(&vhost, &config, &log);
    let mut metrics = String::new();
    wait_for("the restarted daemon's pass", &log, Duration::from_secs(60), || {
        metrics = http_get(&daemon.metrics_addr);
        metrics.contains("baton_backup_scheduled_tasks_total{task=\"prune\",outcome=\"succeeded\"} 1")
    })
    .await;
    if Utc::now().date_naive() == after {
        assert_eq!(
            daily_backups(&s.primary.path),
            taken,
            "no second daily backup the same day"
        );
    }
    assert!(
        !metrics.contains("task=\"restore_test\""),
        "the month's test ran again:\n{metrics}"
    );
    assert_eq!(
        env.role.restore_test_of(ZONE, SERVICE, &month).await.unwrap(),
        Some(test),
        "the record is the first run's"
    );
    let status = daemon
        .terminate(Duration::from_secs(20))
        .await
        .expect("stops on SIGTERM");
    assert!(status.success(), "exit status {status}");
}

/// The body of `GET /metrics`, or empty while the daemon is not listening yet.
fn http_get(addr: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut conn) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut text = String::new();
    if conn
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .and_then(|()| conn.read_to_string(&mut text))
        .is_err()
    {
        return String::new();
    }
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// Scratch databases of this test's daily backup (zone `zone`, today or tomorrow
/// should the test run over midnight).
async fn scratch_of(admin: &str, zone: &str) -> Vec<String> {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(admin).await.unwrap();
    let today = Utc::now().date_naive();
    let mut prefixes: Vec<String> = [today, today.succ_opt().unwrap()]
        .iter()
        .map(|d| {
            let id = format!(
                "{SERVICE}.daily-{}.{}",
                d.format("%Y%m%d"),
                daily_run_id(zone, SERVICE, *d)
            );
            baton_backup::role::scratch_prefix(&id)
        })
        .collect();
    prefixes.dedup();
    let mut found = Vec::new();
    for p in prefixes {
        let names: Vec<String> =
            sqlx::query_scalar("select datname::text from pg_database where left(datname, length($1)) = $1")
                .bind(&p)
                .fetch_all(&mut conn)
                .await
                .unwrap();
        found.extend(names);
    }
    found
}

#[tokio::test]
async fn a_daemon_killed_mid_check_leaves_its_scratch_database_to_its_successor() {
    let env = Env::new().await;
    let vhost = Vhost::new();
    // A zone of its own: its daily backup's id (and scratch names) are this test's alone.
    let zone = format!("kill{}", &Uuid::new_v4().simple().to_string()[..6]);
    let config = write_config(&env);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&format!("zone = {ZONE:?}"), &format!("zone = {zone:?}"));
    std::fs::write(&config, text).unwrap();
    let admin = env.settings.admin_url.expose().clone();
    let log = env.root.join("daemon.log");

    // The daemon stops right after creating its spot check's scratch database.
    let mut daemon = Daemon::start_with(
        &vhost,
        &config,
        &log,
        &[("BATON_PAUSEPOINTS", "backup-scratch-created:600000")],
    );
    // The pause point says so in the log when the daemon reaches it.
    wait_for(
        "the spot check's scratch database",
        &log,
        Duration::from_secs(120),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("pause point backup-scratch-created")
        },
    )
    .await;
    let scratch = scratch_of(&admin, &zone).await;
    assert_eq!(scratch.len(), 1, "{scratch:?}");
    // A sweep while its daemon lives leaves it alone.
    assert!(
        env.role
            .sweep_scratch()
            .await
            .unwrap()
            .iter()
            .all(|d| !scratch.contains(d))
    );
    assert_eq!(
        scratch_of(&admin, &zone).await,
        scratch,
        "a live daemon's scratch database stays"
    );

    daemon.child.kill().await.unwrap();
    assert_eq!(
        scratch_of(&admin, &zone).await,
        scratch,
        "left behind by the killed daemon"
    );
    // Its successor sweeps it at start.
    let successor = Daemon::start(&vhost, &config, &log);
    wait_for(
        "the successor to sweep the leftover",
        &log,
        Duration::from_secs(120),
        || {
            std::fs::read_to_string(&log).unwrap_or_default().lines().any(|l| {
                l.contains("leftover scratch database of a daemon that died dropped") && l.contains(&scratch[0])
            })
        },
    )
    .await;
    // (The successor's own scheduled pass may have a scratch database of its own by now.)
    let left = scratch_of(&admin, &zone).await;
    assert!(!left.contains(&scratch[0]), "the leftover is gone: {left:?}");
    let _ = successor.terminate(Duration::from_secs(30)).await;
}
