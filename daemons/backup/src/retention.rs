//! Retention: which backups to keep, as a pure function of their timestamps and now.
//!
//! The rule (the seed's "30 daily, 12 monthly, 7 yearly"), with all calendar
//! periods in UTC:
//!
//! - **daily**: for each of the `daily` most recent calendar days (today and
//!   the `daily - 1` days before it), the newest backup taken that day;
//! - **monthly**: for each of the `monthly` most recent calendar months
//!   (this month included), the newest backup taken that month;
//! - **yearly**: for each of the `yearly` most recent calendar years (this
//!   year included), the newest backup taken that year;
//! - the newest backup overall is always kept, however old;
//! - a backup dated after `now` (clock skew between hosts) is kept: it cannot
//!   be placed in a period yet.
//!
//! Everything else is deleted. Ties in time are broken by the larger key, so
//! the result is deterministic. A backup kept by several rules counts once, so
//! at most `daily + monthly + yearly` backups (at least the newest) are kept,
//! plus any dated in the future. The rule is applied per service: each
//! database has its own history.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

/// How many periods of each kind keep a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub daily: u32,
    pub monthly: u32,
    pub yearly: u32,
}

impl Default for Policy {
    /// The seed's policy: 30 daily, 12 monthly, 7 yearly.
    fn default() -> Self {
        Self {
            daily: 30,
            monthly: 12,
            yearly: 7,
        }
    }
}

impl Policy {
    /// The most backups (dated up to now) this policy ever keeps.
    pub fn max_kept(&self) -> usize {
        (self.daily as usize + self.monthly as usize + self.yearly as usize).max(1)
    }
}

/// Which of `backups` (key, time) to keep at `now`; the rest may be deleted.
pub fn keep<K: Ord + Clone>(backups: &[(K, DateTime<Utc>)], now: DateTime<Utc>, policy: Policy) -> BTreeSet<K> {
    let mut kept = BTreeSet::new();
    // Newest per period; (time, key) orders ties by key.
    let mut days: BTreeMap<NaiveDate, (DateTime<Utc>, &K)> = BTreeMap::new();
    let mut months: BTreeMap<i64, (DateTime<Utc>, &K)> = BTreeMap::new();
    let mut years: BTreeMap<i32, (DateTime<Utc>, &K)> = BTreeMap::new();
    let mut newest: Option<(DateTime<Utc>, &K)> = None;
    for (key, at) in backups {
        let cand = (*at, key);
        if newest.is_none_or(|n| cand > n) {
            newest = Some(cand);
        }
        if *at > now {
            kept.insert(key.clone());
            continue;
        }
        for slot in [
            days.entry(at.date_naive()).or_insert(cand),
            months.entry(month_index(*at)).or_insert(cand),
            years.entry(at.year()).or_insert(cand),
        ] {
            if cand > *slot {
                *slot = cand;
            }
        }
    }
    let today = now.date_naive();
    for (day, (_, key)) in &days {
        let age = (today - *day).num_days();
        if age < i64::from(policy.daily) {
            kept.insert((*key).clone());
        }
    }
    let this_month = month_index(now);
    for (month, (_, key)) in &months {
        if this_month - month < i64::from(policy.monthly) {
            kept.insert((*key).clone());
        }
    }
    for (year, (_, key)) in &years {
        if i64::from(now.year() - year) < i64::from(policy.yearly) {
            kept.insert((*key).clone());
        }
    }
    if let Some((_, key)) = newest {
        kept.insert(key.clone());
    }
    kept
}

/// Months since year 0, so consecutive months differ by one across years.
fn month_index(at: DateTime<Utc>) -> i64 {
    i64::from(at.year()) * 12 + i64::from(at.month0())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};
    use proptest::prelude::*;

    fn at(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
    }

    #[test]
    fn newest_of_the_day_month_and_year_survive() {
        let now = at(2026, 11, 26, 12);
        let backups = vec![
            ("today-early", at(2026, 11, 26, 1)),
            ("today-late", at(2026, 11, 26, 9)),
            ("yesterday", at(2026, 11, 25, 9)),
            ("31-days-ago", at(2026, 10, 26, 9)),
            ("october-newest", at(2026, 10, 31, 9)),
            ("last-year-early", at(2025, 3, 1, 0)),
            ("last-year-newest", at(2025, 12, 31, 23)),
            ("five-years-ago", at(2021, 6, 1, 0)),
            ("seven-years-ago", at(2019, 6, 1, 0)),
        ];
        let kept = keep(&backups, now, Policy::default());
        // Daily window: Oct 28 - Nov 26. Monthly: Dec 2025 - Nov 2026. Yearly: 2020 - 2026.
        let expected: BTreeSet<_> = [
            "today-late",
            "yesterday",
            "october-newest",
            "last-year-newest",
            "five-years-ago",
        ]
        .into_iter()
        .collect();
        assert_eq!(kept, expected);
    }

    #[test]
    fn the_newest_is_kept_even_when_ancient() {
        let now = at(2026, 1, 1, 0);
        let kept = keep(
            &[("a", at(2001, 1, 1, 0)), ("b", at(2000, 1, 1, 0))],
            now,
            Policy::default(),
        );
        assert_eq!(kept, ["a"].into_iter().collect());
    }

    #[test]
    fn future_backups_are_kept() {
        let now = at(2026, 1, 1, 0);
        let kept = keep(
            &[("future", now + Duration::hours(2)), ("today", now)],
            now,
            Policy::default(),
        );
        assert_eq!(kept.len(), 2);
    }

    fn backups_strategy() -> impl Strategy<Value = (DateTime<Utc>, Vec<(u32, DateTime<Utc>)>)> {
        // Now anywhere in 2020-2030; backups up to ten years before it, often
        // several on one day to exercise the per-day choice.
        (1_577_836_800i64..1_893_456_000i64).prop_flat_map(|now_s| {
            let now = Utc.timestamp_opt(now_s, 0).unwrap();
            let one = prop_oneof![
                3 => 0i64..(86_400 * 45),
                2 => 0i64..(86_400 * 400),
                1 => 0i64..(86_400 * 3_700),
            ];
            (
                Just(now),
                proptest::collection::vec(one, 0..120).prop_map(move |ages| {
                    ages.into_iter()
                        .enumerate()
                        .map(|(i, age)| (i as u32, now - Duration::seconds(age)))
                        .collect()
                }),
            )
        })
    }

    fn policy_strategy() -> impl Strategy<Value = Policy> {
        prop_oneof![
            Just(Policy::default()),
            (0u32..40, 0u32..15, 0u32..10).prop_map(|(daily, monthly, yearly)| Policy { daily, monthly, yearly }),
        ]
    }

    proptest! {
        #[test]
        fn retention_is_idempotent((now, backups) in backups_strategy(), policy in policy_strategy()) {
            let kept = keep(&backups, now, policy);
            let survivors: Vec<_> = backups.iter().filter(|(k, _)| kept.contains(k)).cloned().collect();
            prop_assert_eq!(keep(&survivors, now, policy), kept);
        }

        #[test]
        fn retention_never_keeps_more_than_the_policy_allows((now, backups) in backups_strategy(), policy in policy_strategy()) {
            let kept = keep(&backups, now, policy);
            prop_assert!(kept.len() <= policy.max_kept(), "kept {} > {}", kept.len(), policy.max_kept());
            prop_assert!(kept.iter().all(|k| backups.iter().any(|(b, _)| b == k)));
        }

        #[test]
        fn retention_always_keeps_the_newest((now, backups) in backups_strategy(), policy in policy_strategy()) {
            let kept = keep(&backups, now, policy);
            if let Some(newest) = backups.iter().max_by_key(|(k, t)| (*t, *k)) {
                prop_assert!(kept.contains(&newest.0));
            } else {
                prop_assert!(kept.is_empty());
            }
        }

        #[test]
        fn retention_keeps_the_newest_of_each_recent_day((now, backups) in backups_strategy(), policy in policy_strategy()) {
            let kept = keep(&backups, now, policy);
            let today = now.date_naive();
            for day_offset in 0..i64::from(policy.daily) {
                let day = today - Duration::days(day_offset);
                let newest = backups.iter().filter(|(_, t)| t.date_naive() == day).max_by_key(|(k, t)| (*t, *k));
                if let Some((k, _)) = newest {
                    prop_assert!(kept.contains(k), "newest of {} not kept", day);
                }
            }
        }

        #[test]
        fn retention_keeps_the_newest_of_each_recent_month_and_year((now, backups) in backups_strategy(), policy in policy_strategy()) {
            let kept = keep(&backups, now, policy);
            for m in 0..i64::from(policy.monthly) {
                let idx = month_index(now) - m;
                let newest = backups.iter().filter(|(_, t)| month_index(*t) == idx).max_by_key(|(k, t)| (*t, *k));
                if let Some((k, _)) = newest {
                    prop_assert!(kept.contains(k), "newest of month {} not kept", idx);
                }
            }
            for y in 0..policy.yearly as i32 {
                let year = now.year() - y;
                let newest = backups.iter().filter(|(_, t)| t.year() == year).max_by_key(|(k, t)| (*t, *k));
                if let Some((k, _)) = newest {
                    prop_assert!(kept.contains(k), "newest of {} not kept", year);
                }
            }
        }

        #[test]
        fn retention_keeps_at_most_one_backup_per_day((now, backups) in backups_strategy(), policy in policy_strategy()) {
            let kept = keep(&backups, now, policy);
            let mut days = BTreeSet::new();
            for (k, t) in &backups {
                if kept.contains(k) {
                    prop_assert!(days.insert(t.date_naive()), "two backups kept on {}", t.date_naive());
                }
            }
        }

        #[test]
        fn retention_deletes_only_what_a_newer_backup_of_the_same_period_replaces(
            (now, backups) in backups_strategy(), policy in policy_strategy()
        ) {
            // Anything deleted from within the daily window has a newer kept
            // backup the same day: the window never loses a day.
            let kept = keep(&backups, now, policy);
            let today = now.date_naive();
            for (k, t) in &backups {
                let in_window = (today - t.date_naive()).num_days() < i64::from(policy.daily);
                if !kept.contains(k) && in_window {
                    prop_assert!(backups.iter().any(|(k2, t2)| kept.contains(k2) && t2.date_naive() == t.date_naive() && (*t2, *k2) > (*t, *k)));
                }
            }
        }
    }
}
