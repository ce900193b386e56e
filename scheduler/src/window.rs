//! Maintenance windows: when high-risk steps and destructive migrations may run.
//!
//! A schedule belongs to one environment and is written in that environment's
//! local time (an IANA time-zone name), because that is how operators think of
//! "Tuesday 22:00". Weekly windows repeat; one-off windows cover planned
//! maintenance on a date. Durations are real elapsed time, so a window that
//! spans a DST change is an hour shorter or longer on the wall clock but not in
//! minutes. A window that starts inside a DST gap (02:30 on the spring-forward
//! night does not exist) starts at the first instant after the gap; a start in
//! the repeated autumn hour uses the first occurrence.
//!
//! Everything here is pure: the caller passes `now`, which is how tests inject
//! the clock.

use std::fmt;

use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc, Weekday};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

/// What happens to a step still running when its window closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overrun {
    /// Let it finish; the overrun is recorded in the run's history and logged as a warning.
    #[default]
    Continue,
    /// Cancel it; the step fails with `window_closed` and the run rolls back.
    Cancel,
}

/// A weekly window, e.g. Tuesdays and Thursdays from 22:00 for 4 hours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weekly {
    /// Days the window starts on: `mon` … `sun`.
    pub days: Vec<String>,
    /// Local start time, `HH:MM`.
    pub start: String,
    pub duration_minutes: u32,
}

/// A one-off window, e.g. planned maintenance on a date.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Once {
    /// Start as RFC 3339 (`2026-12-01T22:00:00+01:00`), or local `YYYY-MM-DDTHH:MM` in the schedule's time zone.
    pub start: String,
    pub duration_minutes: u32,
}

/// One environment's maintenance windows, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// IANA time zone, e.g. `Europe/Amsterdam`.
    pub time_zone: String,
    #[serde(default)]
    pub weekly: Vec<Weekly>,
    #[serde(default)]
    pub once: Vec<Once>,
    #[serde(default)]
    pub overrun: Overrun,
}

/// A validated schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub tz: Tz,
    weekly: Vec<(Vec<Weekday>, NaiveTime, Duration)>,
    once: Vec<(DateTime<Utc>, Duration)>,
    pub overrun: Overrun,
}

/// Where `now` stands relative to a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowState {
    Open {
        opened: DateTime<Utc>,
        closes: DateTime<Utc>,
    },
    Closed {
        opens: Option<DateTime<Utc>>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {message}")]
pub struct WindowError {
    pub at: String,
    pub message: String,
}

fn err(at: impl Into<String>, message: impl Into<String>) -> WindowError {
    WindowError {
        at: at.into(),
        message: message.into(),
    }
}

/// Longest window: a week (a longer one would overlap its own next start).
const MAX_MINUTES: u32 = 7 * 24 * 60;

impl ScheduleConfig {
    /// Checks the schedule; `at` is the configuration key, for error messages.
    pub fn validate(&self, at: &str) -> Result<Schedule, WindowError> {
        let tz: Tz = self.time_zone.parse().map_err(|_| {
            err(
                format!("{at}.time_zone"),
                format!(
                    "unknown time zone {:?} (use an IANA name such as Europe/Amsterdam)",
                    self.time_zone
                ),
            )
        })?;
        let mut weekly = Vec::new();
        for (i, w) in self.weekly.iter().enumerate() {
            let key = format!("{at}.weekly[{i}]");
            if w.days.is_empty() {
                return Err(err(format!("{key}.days"), "needs at least one day (mon … sun)"));
            }
            let days = w
                .days
                .iter()
                .map(|d| {
                    d.parse::<Weekday>()
                        .map_err(|_| err(format!("{key}.days"), format!("{d:?} is not a day (mon … sun)")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let start = NaiveTime::parse_from_str(&w.start, "%H:%M").map_err(|_| {
                err(
                    format!("{key}.start"),
                    format!("{:?} is not a local time HH:MM", w.start),
                )
            })?;
            weekly.push((days, start, minutes(&key, w.duration_minutes)?));
        }
        let mut once = Vec::new();
        for (i, o) in self.once.iter().enumerate() {
            let key = format!("{at}.once[{i}]");
            let start = match DateTime::parse_from_rfc3339(&o.start) {
                Ok(t) => t.with_timezone(&Utc),
                Err(_) => {
                    let local = NaiveDateTime::parse_from_str(&o.start, "%Y-%m-%dT%H:%M").map_err(|_| {
                        err(
                            format!("{key}.start"),
                            format!("{:?} is neither RFC 3339 nor local YYYY-MM-DDTHH:MM", o.start),
                        )
                    })?;
                    resolve_local(tz, local)
                }
            };
            once.push((start, minutes(&key, o.duration_minutes)?));
        }
        if weekly.is_empty() && once.is_empty() {
            return Err(err(at, "has no windows: add `weekly` or `once` entries"));
        }
        Ok(Schedule {
            tz,
            weekly,
            once,
            overrun: self.overrun,
        })
    }
}

fn minutes(key: &str, m: u32) -> Result<Duration, WindowError> {
    if m == 0 || m > MAX_MINUTES {
        return Err(err(
            format!("{key}.duration_minutes"),
            format!("must be between 1 and {MAX_MINUTES} (a week)"),
        ));
    }
    Ok(Duration::minutes(m.into()))
}

/// The instant a local wall-clock time means: the first occurrence in the repeated
/// autumn hour, the end of the gap for a time skipped in spring.
fn resolve_local(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(first, _) => first.with_timezone(&Utc),
        LocalResult::None => {
            // Walk forward minute by minute to the first time that exists (gaps are at most a few hours).
            let mut probe = local;
            for _ in 0..(24 * 60) {
                probe += Duration::minutes(1);
                if let Some(t) = tz.from_local_datetime(&probe).earliest() {
                    return t.with_timezone(&Utc);
                }
            }
            tz.from_utc_datetime(&local).with_timezone(&Utc)
        }
    }
}

impl Schedule {
    /// Window occurrences that could contain or follow `now`: starts from 8 days
    /// before to 15 days after, in local dates.
    fn occurrences(&self, now: DateTime<Utc>) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        let today: NaiveDate = now.with_timezone(&self.tz).date_naive();
        let mut out: Vec<(DateTime<Utc>, DateTime<Utc>)> = self.once.iter().map(|(s, d)| (*s, *s + *d)).collect();
        for offset in -8..=15 {
            let date = today + Duration::days(offset);
            for (days, start, duration) in &self.weekly {
                if days.contains(&date.weekday()) {
                    let s = resolve_local(self.tz, date.and_time(*start));
                    out.push((s, s + *duration));
                }
            }
        }
        out.sort();
        out
    }

    /// Whether a window is open at `now`, and when it closes or the next one opens.
    /// Overlapping or touching windows count as one.
    pub fn state(&self, now: DateTime<Utc>) -> WindowState {
        let occ = self.occurrences(now);
        let mut open: Option<(DateTime<Utc>, DateTime<Utc>)> = None;
        for (s, e) in &occ {
            match &mut open {
                None if *s <= now && now < *e => open = Some((*s, *e)),
                Some((_, end)) if *s <= *end && *e > *end => *end = *e,
                _ => {}
            }
        }
        if let Some((opened, closes)) = open {
            return WindowState::Open { opened, closes };
        }
        WindowState::Closed {
            opens: occ.iter().map(|(s, _)| *s).find(|s| *s > now),
        }
    }

    /// A time as operators read it: local time with its zone abbreviation.
    pub fn local(&self, t: DateTime<Utc>) -> impl fmt::Display {
        t.with_timezone(&self.tz).format("%a %Y-%m-%d %H:%M %Z")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(weekly: &[(&[&str], &str, u32)], once: &[(&str, u32)]) -> Schedule {
        ScheduleConfig {
            time_zone: "Europe/Amsterdam".into(),
            weekly: weekly
                .iter()
                .map(|(d, s, m)| Weekly {
                    days: d.iter().map(|x| x.to_string()).collect(),
                    start: s.to_string(),
                    duration_minutes: *m,
                })
                .collect(),
            once: once
                .iter()
                .map(|(s, m)| Once {
                    start: s.to_string(),
                    duration_minutes: *m,
                })
                .collect(),
            overrun: Overrun::Continue,
        }
        .validate("gates.maintenance_windows.production")
        .unwrap()
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn weekly_window_in_local_winter_time() {
        // Tuesday 22:00 CET is 21:00 UTC.
        let s = schedule(&[(&["tue"], "22:00", 240)], &[]);
        assert_eq!(
            s.state(t("2026-12-01T20:59:00Z")),
            WindowState::Closed {
                opens: Some(t("2026-12-01T21:00:00Z"))
            }
        );
        assert_eq!(
            s.state(t("2026-12-01T23:00:00Z")),
            WindowState::Open {
                opened: t("2026-12-01T21:00:00Z"),
                closes: t("2026-12-02T01:00:00Z")
            }
        );
        // Closed right at the end; the next opens a week later.
        assert_eq!(
            s.state(t("2026-12-02T01:00:00Z")),
            WindowState::Closed {
                opens: Some(t("2026-12-08T21:00:00Z"))
            }
        );
    }

    #[test]
    fn the_same_local_start_moves_in_utc_across_dst() {
        // Summer: Tuesday 22:00 CEST is 20:00 UTC.
        let s = schedule(&[(&["tue"], "22:00", 60)], &[]);
        assert!(matches!(s.state(t("2026-07-07T20:30:00Z")), WindowState::Open { .. }));
        assert!(matches!(s.state(t("2026-07-07T21:30:00Z")), WindowState::Closed { .. }));
        // From the Saturday before the autumn change, the next Tuesday window is in CET.
        assert_eq!(
            s.state(t("2026-10-24T12:00:00Z")),
            WindowState::Closed {
                opens: Some(t("2026-10-27T21:00:00Z"))
            }
        );
    }

    #[test]
    fn a_start_in_the_spring_gap_begins_when_the_gap_ends() {
        // 2026-03-29 02:30 does not exist in Amsterdam: clocks jump from 02:00 CET to 03:00 CEST (01:00 UTC).
        let s = schedule(&[(&["sun"], "02:30", 60)], &[]);
        assert_eq!(
            s.state(t("2026-03-29T00:30:00Z")),
            WindowState::Closed {
                opens: Some(t("2026-03-29T01:00:00Z"))
            }
        );
        // Elapsed time counts: 60 minutes from 03:00 CEST.
        assert_eq!(
            s.state(t("2026-03-29T01:30:00Z")),
            WindowState::Open {
                opened: t("2026-03-29T01:00:00Z"),
                closes: t("2026-03-29T02:00:00Z")
            }
        );
    }

    #[test]
    fn a_start_in_the_repeated_autumn_hour_uses_the_first_occurrence() {
        // 2026-10-25 02:30 happens twice in Amsterdam: first at 00:30 UTC (CEST), then 01:30 UTC (CET).
        let s = schedule(&[(&["sun"], "02:30", 30)], &[]);
        assert_eq!(
            s.state(t("2026-10-25T00:45:00Z")),
            WindowState::Open {
                opened: t("2026-10-25T00:30:00Z"),
                closes: t("2026-10-25T01:00:00Z")
            }
        );
        assert!(matches!(s.state(t("2026-10-25T01:45:00Z")), WindowState::Closed { .. }));
    }

    #[test]
    fn one_off_windows_in_utc_or_local_time_and_merged_overlaps() {
        let s = schedule(
            &[(&["wed"], "23:00", 60)],
            &[("2026-12-02T22:30:00+01:00", 60), ("2026-12-05T10:00", 30)],
        );
        // The one-off (21:30-22:30 UTC) and the weekly (22:00-23:00 UTC) overlap: one window.
        assert_eq!(
            s.state(t("2026-12-02T21:45:00Z")),
            WindowState::Open {
                opened: t("2026-12-02T21:30:00Z"),
                closes: t("2026-12-02T23:00:00Z")
            }
        );
        // Local 10:00 CET on Saturday is 09:00 UTC.
        assert!(matches!(s.state(t("2026-12-05T09:10:00Z")), WindowState::Open { .. }));
    }

    #[test]
    fn a_window_running_over_midnight_is_open_after_midnight() {
        let s = schedule(&[(&["sat"], "23:00", 180)], &[]);
        // Sunday 01:00 CET, still inside Saturday's window.
        assert!(matches!(s.state(t("2026-12-06T00:00:00Z")), WindowState::Open { .. }));
    }

    #[test]
    fn bad_schedules_name_the_key() {
        let mut c = ScheduleConfig {
            time_zone: "Mars/Olympus".into(),
            weekly: vec![],
            once: vec![],
            overrun: Overrun::Continue,
        };
        let e = c.validate("gates.maintenance_windows.production").unwrap_err();
        assert_eq!(e.at, "gates.maintenance_windows.production.time_zone");
        c.time_zone = "Europe/Amsterdam".into();
        assert!(c.validate("w").unwrap_err().message.contains("no windows"));
        c.weekly.push(Weekly {
            days: vec!["tue".into(), "someday".into()],
            start: "22:00".into(),
            duration_minutes: 60,
        });
        assert_eq!(c.validate("w").unwrap_err().at, "w.weekly[0].days");
        c.weekly[0].days.pop();
        c.weekly[0].start = "25:00".into();
        assert_eq!(c.validate("w").unwrap_err().at, "w.weekly[0].start");
        c.weekly[0].start = "22:00".into();
        c.weekly[0].duration_minutes = 0;
        assert_eq!(c.validate("w").unwrap_err().at, "w.weekly[0].duration_minutes");
    }
}
