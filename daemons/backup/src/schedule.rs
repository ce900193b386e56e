//! The backup daemon's own schedule: the routine work of the seed's step 9
//! and "Zone boundaries" table that no deploy asks for.
//!
//! - **Daily backup** of every database of the zone ("Backups: Daily" for
//!   staging, "Pre/post-deploy + daily" for production), due each day at
//!   `daily_at` (UTC). Its id is fixed by zone, service and date, so a daemon
//!   that restarts, or a second replica, completes or finds the same backup
//!   instead of taking another.
//! - **Prune** with the retention policy after the daily backups, so the zone
//!   keeps 30 daily, 12 monthly and 7 yearly backups without an operator
//!   sending `prune` (which, like every job, must be signed by the scheduler).
//! - **Restore test**, monthly from day `restore_test_day`: the newest backup of
//!   each service is restored from both locations and compared with its
//!   recorded statistics. A pass is recorded in `.restore-tests/`, so the test
//!   runs once a month however often the daemon restarts, and a month whose
//!   test failed is tried again.
//!
//! A pass whose tasks all succeeded is not repeated for the same date; one
//! with a failure is tried again after `retry_secs` (each task that already
//! succeeded is then quick). A daemon that was down when work fell due does it
//! when it starts. Every task counts in `baton_backup_scheduled_tasks_total`,
//! and `baton_backup_scheduled_last_success_timestamp_seconds` is what to alert
//! on (daemons/backup/README.md, "Schedule").

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use crate::config::ScheduleSettings;
use crate::error::Error;
use crate::role::BackupRole;

/// The longest the schedule sleeps before looking at the clock again, so a
/// clock that jumps (or a host that was suspended) delays work by at most this.
const MAX_SLEEP: Duration = Duration::from_secs(300);

/// The date whose daily work is due at `now`: today once `at` has passed,
/// yesterday before that.
pub fn due_date(now: DateTime<Utc>, at: NaiveTime) -> NaiveDate {
    let today = now.date_naive();
    if now.time() >= at {
        today
    } else {
        today.pred_opt().expect("dates this early are not used")
    }
}

/// The first instant after `now` at which the next day's work falls due.
pub fn next_due(now: DateTime<Utc>, at: NaiveTime) -> DateTime<Utc> {
    let next_date = due_date(now, at).succ_opt().expect("dates this late are not used");
    next_date.and_time(at).and_utc()
}

/// Whether the month's restore test is due on `date`.
pub fn restore_test_due(date: NaiveDate, restore_test_day: u32) -> bool {
    date.day() >= restore_test_day
}

/// `YYYY-MM` of `date`.
pub fn month_of(date: NaiveDate) -> String {
    date.format("%Y-%m").to_string()
}

/// Runs the schedule until `cancel` fires. The settings must be valid.
pub async fn run(role: Arc<BackupRole>, zone: String, settings: ScheduleSettings, cancel: CancellationToken) {
    let at = match settings.time_of_day() {
        Ok(at) => at,
        Err(e) => {
            tracing::error!(error = %e, "backup schedule not started");
            return;
        }
    };
    tracing::info!(zone = %zone, daily_at = %settings.daily_at, restore_test_day = settings.restore_test_day, "backup schedule started");
    let mut state = State::default();
    loop {
        let wake = match state.next(Utc::now(), at) {
            Next::Sleep(until) => until,
            Next::Pass(date) => {
                let span = tracing::info_span!("scheduled backups", zone = %zone, date = %date);
                let failed = tokio::select! {
                    report = pass(&role, &zone, &settings, date).instrument(span) => report.failed(),
                    () = cancel.cancelled() => return,
                };
                if failed > 0 {
                    tracing::warn!(zone = %zone, %date, failed, retry_secs = settings.retry_secs, "scheduled backup work failed; trying again later");
                }
                state.passed(date, failed == 0, Utc::now(), at, settings.retry_secs)
            }
        };
        let nap = (wake - Utc::now()).to_std().unwrap_or_default().min(MAX_SLEEP);
        tokio::select! {
            () = tokio::time::sleep(nap) => {}
            () = cancel.cancelled() => return,
        }
    }
}

/// What the schedule remembers between passes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct State {
    /// The date whose work last succeeded.
    done: Option<NaiveDate>,
    /// After a failed pass: not again before this.
    retry_at: Option<DateTime<Utc>>,
}

/// What the schedule does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Run the pass of this date now.
    Pass(NaiveDate),
    /// Nothing is due before this instant.
    Sleep(DateTime<Utc>),
}

impl State {
    fn next(&self, now: DateTime<Utc>, at: NaiveTime) -> Next {
        let date = due_date(now, at);
        if self.done == Some(date) {
            Next::Sleep(next_due(now, at))
        } else if let Some(retry) = self.retry_at.filter(|r| now < *r) {
            Next::Sleep(retry)
        } else {
            Next::Pass(date)
        }
    }

    /// Records a pass of `date`; returns when to look again.
    fn passed(
        &mut self,
        date: NaiveDate,
        ok: bool,
        now: DateTime<Utc>,
        at: NaiveTime,
        retry_secs: u64,
    ) -> DateTime<Utc> {
        if ok {
            self.done = Some(date);
            self.retry_at = None;
            next_due(now, at)
        } else {
            // A retry never delays the next day's work.
            let retry = (now + chrono::Duration::seconds(retry_secs as i64)).min(next_due(now, at));
            self.retry_at = Some(retry);
            retry
        }
    }
}

/// What one pass did, task by task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PassReport {
    pub zone: String,
    /// The date whose work this was.
    pub date: NaiveDate,
    pub tasks: Vec<TaskOutcome>,
}

impl PassReport {
    /// How many tasks failed.
    pub fn failed(&self) -> usize {
        self.tasks.iter().filter(|t| t.error.is_some()).count()
    }
}

/// One task of a pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskOutcome {
    /// `daily_backup`, `prune` or `restore_test`.
    pub task: String,
    /// The service, or empty for `prune`.
    pub service: String,
    /// The backup taken or tested, where there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    /// Why it failed: the error's code and message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One pass of the work due on `date`.
pub async fn pass(role: &BackupRole, zone: &str, settings: &ScheduleSettings, date: NaiveDate) -> PassReport {
    let mut tasks = Vec::new();
    let services: Vec<String> = role.services().map(str::to_owned).collect();
    for service in &services {
        let result = role.daily_backup(zone, service, date).await;
        match &result {
            Ok(r) => tracing::info!(service, backup_id = %r.backup_id, %date, "daily backup verified"),
            Err(e) => tracing::error!(service, %date, error = %e, code = e.code(), "daily backup failed"),
        }
        tasks.push(outcome("daily_backup", service, result.map(|r| Some(r.backup_id))));
    }
    let result = role.prune(zone, settings.retention, Utc::now()).await;
    if let Err(e) = &result {
        tracing::error!(error = %e, code = e.code(), "scheduled prune failed");
    }
    tasks.push(outcome("prune", "", result.map(|_| None)));
    if restore_test_due(date, settings.restore_test_day) {
        let month = month_of(date);
        for service in &services {
            match role.restore_test_of(zone, service, &month).await {
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(service, month, error = %e, "cannot read the month's restore test record; testing again")
                }
            }
            let result = role.restore_test(zone, service, &month).await;
            if let Err(e) = &result {
                tracing::error!(service, month, error = %e, code = e.code(), "restore test failed");
            }
            tasks.push(outcome("restore_test", service, result.map(|t| Some(t.backup_id))));
        }
    }
    PassReport {
        zone: zone.to_owned(),
        date,
        tasks,
    }
}

/// Counts a task's outcome in the metrics and describes it.
fn outcome(task: &str, service: &str, result: Result<Option<String>, Error>) -> TaskOutcome {
    let m = baton_shared::metrics::global();
    m.inc(
        "baton_backup_scheduled_tasks_total",
        "Scheduled backup tasks (daily_backup, prune, restore_test) by outcome",
        &[
            ("task", task),
            ("outcome", if result.is_ok() { "succeeded" } else { "failed" }),
        ],
        1.0,
    );
    if result.is_ok() {
        m.set(
            "baton_backup_scheduled_last_success_timestamp_seconds",
            "When each scheduled task last succeeded (Unix seconds), by service (empty for prune)",
            &[("task", task), ("service", service)],
            Utc::now().timestamp() as f64,
        );
    }
    let (backup_id, error) = match result {
        Ok(id) => (id, None),
        Err(e) => (None, Some(format!("{}: {e}", e.code()))),
    };
    TaskOutcome {
        task: task.to_owned(),
        service: service.to_owned(),
        backup_id,
        error,
    }
}

/// `--scheduled-pass`: one pass of the work due now, its report printed on
/// stdout as JSON; [`Exit::Failed`](baton_shared::exit::Exit) if a task failed.
pub async fn pass_once(role: &BackupRole, zone: &str, settings: &ScheduleSettings) -> baton_shared::exit::Exit {
    use baton_shared::exit::Exit;
    let at = match settings.time_of_day() {
        Ok(at) => at,
        Err(e) => {
            eprintln!("baton-backup: {e}");
            return Exit::BadInput;
        }
    };
    let date = due_date(chrono::Utc::now(), at);
    let report = pass(role, zone, settings, date).await;
    match serde_json::to_string_pretty(&report) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("baton-backup: cannot print the report: {e}"),
    }
    if report.failed() == 0 {
        Exit::Success
    } else {
        Exit::Failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
    }

    fn two_am() -> NaiveTime {
        NaiveTime::from_hms_opt(2, 0, 0).unwrap()
    }

    #[test]
    fn the_day_s_work_is_due_from_its_time_of_day() {
        let d = |y, m, day| NaiveDate::from_ymd_opt(y, m, day).unwrap();
        assert_eq!(due_date(at(2026, 11, 27, 1, 59), two_am()), d(2026, 11, 26));
        assert_eq!(due_date(at(2026, 11, 27, 2, 0), two_am()), d(2026, 11, 27));
        assert_eq!(due_date(at(2026, 11, 27, 23, 0), two_am()), d(2026, 11, 27));
        assert_eq!(due_date(at(2027, 1, 1, 0, 30), two_am()), d(2026, 12, 31));
    }

    #[test]
    fn the_next_due_instant_is_the_following_day_s_time_of_day() {
        assert_eq!(next_due(at(2026, 11, 27, 1, 59), two_am()), at(2026, 11, 27, 2, 0));
        assert_eq!(next_due(at(2026, 11, 27, 2, 0), two_am()), at(2026, 11, 28, 2, 0));
        assert_eq!(next_due(at(2026, 12, 31, 12, 0), two_am()), at(2027, 1, 1, 2, 0));
        let midnight = NaiveTime::from_hms_opt(0, 0, 0).unwrap();
        assert_eq!(next_due(at(2028, 2, 28, 0, 0), midnight), at(2028, 2, 29, 0, 0));
    }

    #[test]
    fn the_restore_test_is_due_from_its_day_to_the_month_s_end() {
        let d = |day| NaiveDate::from_ymd_opt(2026, 11, day).unwrap();
        assert!(!restore_test_due(d(1), 2));
        assert!(restore_test_due(d(2), 2));
        assert!(restore_test_due(d(30), 2));
        assert!(restore_test_due(d(1), 1));
        assert_eq!(month_of(d(30)), "2026-11");
    }

    #[test]
    fn a_failed_pass_waits_retry_secs_and_a_passed_one_waits_for_the_next_day() {
        let mut state = State::default();
        let d = |day| NaiveDate::from_ymd_opt(2026, 11, day).unwrap();
        // Started after the day's time: the day's work at once.
        assert_eq!(state.next(at(2026, 11, 27, 9, 0), two_am()), Next::Pass(d(27)));
        // It fails: nothing before retry_secs, however often the clock is read.
        let retry = state.passed(d(27), false, at(2026, 11, 27, 9, 1), two_am(), 900);
        assert_eq!(retry, at(2026, 11, 27, 9, 16));
        assert_eq!(state.next(at(2026, 11, 27, 9, 6), two_am()), Next::Sleep(retry));
        assert_eq!(state.next(at(2026, 11, 27, 9, 16), two_am()), Next::Pass(d(27)));
        // It passes: nothing until the next day's time.
        let next = state.passed(d(27), true, at(2026, 11, 27, 9, 17), two_am(), 900);
        assert_eq!(next, at(2026, 11, 28, 2, 0));
        assert_eq!(state.next(at(2026, 11, 27, 23, 59), two_am()), Next::Sleep(next));
        assert_eq!(state.next(at(2026, 11, 28, 2, 0), two_am()), Next::Pass(d(28)));
        // A retry late in the day is cut short by the next day's time.
        let retry = state.passed(d(28), false, at(2026, 11, 29, 1, 55), two_am(), 900);
        assert_eq!(retry, at(2026, 11, 29, 2, 0));
        assert_eq!(state.next(at(2026, 11, 29, 2, 0), two_am()), Next::Pass(d(29)));
    }

    #[test]
    fn bad_settings_name_their_key() {
        let key = |s: ScheduleSettings| match s.validate().unwrap_err() {
            Error::Config { key, .. } => key,
            other => panic!("not a config error: {other}"),
        };
        ScheduleSettings::default().validate().unwrap();
        for bad in ["2:00", "24:00", "02:60", "0200", "02:00:00", ""] {
            let s = ScheduleSettings {
                daily_at: bad.into(),
                ..ScheduleSettings::default()
            };
            assert_eq!(key(s), "backup.schedule.daily_at", "{bad:?} accepted");
        }
        for day in [0, 29, 31] {
            let s = ScheduleSettings {
                restore_test_day: day,
                ..ScheduleSettings::default()
            };
            assert_eq!(key(s), "backup.schedule.restore_test_day");
        }
        let s = ScheduleSettings {
            retry_secs: 0,
            ..ScheduleSettings::default()
        };
        assert_eq!(key(s), "backup.schedule.retry_secs");
    }
}
