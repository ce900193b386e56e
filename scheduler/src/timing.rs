//! A run's timing against the pipeline's typical durations: the scheduler's
//! orchestration (from the run's start to its first dispatch) and per step the
//! typical range, the actual duration, whether it is over, and which steps ran
//! beside it; for the run its total against its budget. `baton runs show`, the
//! web view and `/metrics` read the same figures.

use chrono::{DateTime, Utc};

use crate::store::{RunView, StepView};

/// One step's timing.
#[derive(Debug, Clone, PartialEq)]
pub struct StepTiming {
    pub step: String,
    pub role: String,
    pub zone: String,
    pub typical_minutes: Option<[u32; 2]>,
    /// From the step's start to its outcome, or to `now` while it runs.
    pub actual_secs: Option<f64>,
    pub running: bool,
    /// Longer than the upper typical bound (a running step as soon as it is).
    pub over: bool,
    /// Steps whose run time overlapped this one's, in pipeline order.
    pub parallel: Vec<String>,
}

/// A run's timing.
#[derive(Debug, Clone, PartialEq)]
pub struct RunTiming {
    /// The orchestration row first (when the pipeline gives its typical
    /// time), then each step that takes part.
    pub steps: Vec<StepTiming>,
    pub budget_minutes: Option<u32>,
    /// From the run's start to its end, or to `now` while it goes on.
    pub actual_secs: Option<f64>,
    pub over: bool,
}

/// Seconds from `a` to `b`, never negative.
pub fn secs(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    (b - a).num_milliseconds().max(0) as f64 / 1000.0
}

/// When a step ran forward: its start, and its end (or `now`).
fn span(st: &StepView, now: DateTime<Utc>) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let start = st.started_at?;
    Some((start, st.finished_at.unwrap_or(now).max(start)))
}

fn over(actual_secs: f64, minutes: Option<u32>) -> bool {
    minutes.is_some_and(|m| actual_secs > f64::from(m) * 60.0)
}

/// The row of the scheduler's own time: from the run's start to its first
/// dispatch (or to now, or to the run's end when nothing was dispatched).
fn orchestration(run: &RunView, now: DateTime<Utc>) -> Option<StepTiming> {
    let minutes = run.orchestration_minutes?;
    let start = run.started_at?;
    let first = run
        .steps
        .iter()
        .flat_map(|s| s.attempts.iter().map(|a| a.dispatched_at))
        .min();
    let end = first.or(run.finished_at);
    let actual = secs(start, end.unwrap_or(now));
    Some(StepTiming {
        step: "orchestration".to_owned(),
        role: "scheduler".to_owned(),
        zone: String::new(),
        typical_minutes: Some([minutes, minutes]),
        actual_secs: Some(actual),
        running: end.is_none(),
        over: over(actual, Some(minutes)),
        parallel: Vec::new(),
    })
}

/// The timing of `run` (already filled in by [`RunView::with_timing`]) at `now`.
pub fn of(run: &RunView, now: DateTime<Utc>) -> RunTiming {
    let spans: Vec<_> = run.steps.iter().map(|s| span(s, now)).collect();
    let steps = orchestration(run, now)
        .into_iter()
        .chain(
            run.steps
                .iter()
                .zip(&spans)
                .filter(|(st, _)| st.included)
                .map(|(st, sp)| {
                    let actual_secs = sp.map(|(a, b)| secs(a, b));
                    let parallel = match sp {
                        Some((a, b)) => run
                            .steps
                            .iter()
                            .zip(&spans)
                            .filter(|(o, _)| o.id != st.id)
                            .filter_map(|(o, osp)| osp.filter(|(oa, ob)| oa < b && a < ob).map(|_| o.id.clone()))
                            .collect(),
                        None => Vec::new(),
                    };
                    StepTiming {
                        step: st.id.clone(),
                        role: st.role.clone(),
                        zone: st.zone.clone(),
                        typical_minutes: st.typical_minutes,
                        actual_secs,
                        running: st.started_at.is_some() && st.finished_at.is_none(),
                        over: actual_secs.is_some_and(|a| over(a, st.typical_minutes.map(|[_, high]| high))),
                        parallel,
                    }
                }),
        )
        .collect();
    let actual_secs = run.started_at.map(|a| secs(a, run.finished_at.unwrap_or(now)));
    RunTiming {
        steps,
        budget_minutes: run.budget_minutes,
        actual_secs,
        over: actual_secs.is_some_and(|a| over(a, run.budget_minutes)),
    }
}

/// `2–10 min`, or `—` when the pipeline gives none.
pub fn typical_text(typical: Option<[u32; 2]>) -> String {
    match typical {
        Some([low, high]) if low == high => format!("{high} min"),
        Some([low, high]) => format!("{low}–{high} min"),
        None => "—".to_owned(),
    }
}

/// `4.2s`, `3m 12s`, `1h 05m`.
pub fn duration_text(secs: f64) -> String {
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else if secs < 3600.0 {
        let s = secs.round() as u64;
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        let m = (secs / 60.0).round() as u64;
        format!("{}h {:02}m", m / 60, m % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(id: &str, start: Option<i64>, end: Option<i64>, typical: Option<[u32; 2]>) -> StepView {
        let at = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap();
        serde_json::from_value(serde_json::json!({
            "id": id, "role": "backup", "zone": "production", "action": "a", "compensate": null,
            "included": true, "reason": "", "needs": [], "gates": [], "hold": null, "status": "succeeded",
            "completion": null, "started_at": start.map(at), "finished_at": end.map(at),
            "compensation_started_at": null, "compensation_finished_at": null, "outputs": {},
            "error": null, "attempts": [], "typical_minutes": typical,
        }))
        .unwrap()
    }

    fn run(steps: Vec<StepView>, budget: Option<u32>, end: Option<i64>) -> RunView {
        let at = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap();
        serde_json::from_value(serde_json::json!({
            "id": uuid::Uuid::nil(), "service": "s", "environment": "production", "commit_sha": "c",
            "status": "running", "plan_hash": "h", "rollback_reason": null, "hold": null, "trace_id": null,
            "created_at": at(0), "started_at": at(0), "finished_at": end.map(at), "steps": steps,
            "history": [], "budget_minutes": budget,
        }))
        .unwrap()
    }

    #[test]
    fn over_typical_parallel_and_budget() {
        let now = DateTime::from_timestamp(1_800_000_000 + 4000, 0).unwrap();
        let r = run(
            vec![
                step("a", Some(0), Some(120), Some([1, 5])),
                step("b", Some(60), Some(500), Some([2, 5])),
                step("c", Some(500), None, Some([1, 2])),
                step("d", None, None, None),
            ],
            Some(60),
            None,
        );
        let t = of(&r, now);
        let by = |id: &str| t.steps.iter().find(|s| s.step == id).unwrap().clone();
        assert!(!by("a").over);
        assert_eq!(by("a").parallel, ["b"]);
        assert!(by("b").over, "440 s is over 5 min");
        // b ends when c starts: they did not overlap.
        assert_eq!(by("b").parallel, ["a"]);
        assert!(by("c").running && by("c").over, "running for 3500 s against 2 min");
        assert_eq!(by("d").actual_secs, None);
        assert!(!by("d").over);
        assert!(t.over, "4000 s is over a 60 min budget");
        assert!(
            t.steps.iter().all(|s| s.step != "orchestration"),
            "no typical time, no row"
        );

        // Orchestration: from the run's start to its first dispatch.
        let mut r = r;
        r.orchestration_minutes = Some(1);
        let attempt = |at: i64| {
            serde_json::json!({"attempt": 1, "kind": "execute", "status": "succeeded", "daemon": null,
                "message_id": uuid::Uuid::nil(), "dispatched_at": DateTime::from_timestamp(1_800_000_000 + at, 0).unwrap(),
                "started_at": null, "finished_at": null, "error": null})
        };
        r.steps[0].attempts = vec![serde_json::from_value(attempt(90)).unwrap()];
        r.steps[1].attempts = vec![serde_json::from_value(attempt(30)).unwrap()];
        let o = of(&r, now).steps[0].clone();
        assert_eq!(
            (o.step.as_str(), o.actual_secs, o.over),
            ("orchestration", Some(30.0), false)
        );
        r.steps[1].attempts.clear();
        assert!(of(&r, now).steps[0].over, "90 s against 1 min");
        let done = run(vec![], Some(60), Some(1800));
        assert!(!of(&done, now).over);
    }

    #[test]
    fn texts() {
        assert_eq!(typical_text(Some([2, 10])), "2–10 min");
        assert_eq!(typical_text(Some([5, 5])), "5 min");
        assert_eq!(typical_text(None), "—");
        assert_eq!(duration_text(4.25), "4.2s");
        assert_eq!(duration_text(192.0), "3m 12s");
        assert_eq!(duration_text(3900.0), "1h 05m");
    }
}
