//! The state machine's rules, without database or broker.

use baton_shared::protocol::{MergeEvent, Message, ResultStatus, StepError, StepJob, StepResult};
use chrono::{Duration as Chrono, Utc};
use serde_json::json;

use super::*;
use crate::pipeline::Pipeline;
use crate::planner;

fn settings() -> Settings {
    Settings {
        lease: Duration::from_secs(30),
        accept_timeout: Duration::from_secs(60),
        heartbeat: Duration::from_secs(5),
        lost_attempts_limit: 10,
        gates: std::sync::Arc::new(
            crate::gates::GatesConfig {
                staging_soak_secs: 0,
                ..Default::default()
            }
            .validate()
            .unwrap(),
        ),
    }
}

fn run_for(paths: &[&str]) -> RunState {
    let ev = json!({
        "v": 1, "service": "shop", "environment": "production", "repository": "r",
        "commit_sha": "0123456789abcdef0123456789abcdef01234567",
        "pull_request": {"number": 1, "title": "t", "author": "a", "approvals": []},
        "changed_paths": paths, "risk": "standard", "requested_by": "ci", "ci_run_url": "u"
    });
    let event = MergeEvent::parse(&serde_json::to_vec(&ev).unwrap()).unwrap();
    let plan = planner::plan(&event, &Pipeline::seed()).unwrap();
    RunState::planned(&event, &plan)
}

const EVERYTHING: &[&str] = &[
    "src/a.ts",
    "drizzle/migrations/0001_x.sql",
    "infra/main.tf",
    "network/x.yaml",
    "assets/a.css",
];

fn dispatched(fx: &Effects) -> Vec<(String, JobKind, u32)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Dispatch(j) => Some((j.step_id.clone(), j.kind, j.attempt)),
            _ => None,
        })
        .collect()
}

fn job(fx: &Effects, step: &str) -> StepJob {
    fx.iter()
        .find_map(|e| match e {
            Effect::Dispatch(j) if j.step_id == step => Some((**j).clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no job for {step} in {fx:?}"))
}

fn result(job: &StepJob, status: ResultStatus) -> StepResult {
    let mut r = StepResult::for_job(job, "d1", status);
    if status == ResultStatus::Succeeded {
        r.outputs = facts(job);
    }
    r
}

/// What the real daemons report and the gates read.
fn facts(job: &StepJob) -> baton_shared::protocol::Fields {
    let digest = format!("sha256:{}{}", job.deploy.commit_sha, &job.deploy.commit_sha[..24]);
    let v = match (job.role.as_str(), job.action.as_str()) {
        ("backup", "pre-deploy") => {
            let backup = baton_shared::facts::BackupRef::example(&format!("b-{}", job.run_id), job.run_id);
            serde_json::Value::Object(baton_shared::facts::FactSet::to_fields(&backup))
        }
        ("container-build", _) => json!({"image_digest": digest}),
        ("staging-verify", _) => {
            json!({"image_digest": digest, "regression_percent": 3.5, "soak_seconds": 900, "rollback_tested": true})
        }
        _ => json!({}),
    };
    v.as_object().cloned().unwrap_or_default()
}

fn failed(job: &StepJob, retryable: bool) -> StepResult {
    let mut r = result(job, ResultStatus::Failed);
    r.error = Some(StepError::new("boom", "it broke", retryable));
    r
}

fn status(run: &RunState, step: &str) -> StepStatus {
    run.steps.iter().find(|s| s.id == step).unwrap().status
}

/// Starts the run and lets every dispatched step succeed until `stop_at` is dispatched.
fn run_until(run: &mut RunState, stop_at: &str) -> (Effects, StepJob) {
    let cfg = settings();
    let now = Utc::now();
    let mut fx = Vec::new();
    run.start(now, &cfg, &mut fx);
    let mut pending: Vec<StepJob> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::Dispatch(j) => Some((**j).clone()),
            _ => None,
        })
        .collect();
    while let Some(j) = pending.pop() {
        if j.step_id == stop_at {
            return (fx, j);
        }
        let mut more = Vec::new();
        assert_eq!(
            run.apply_result(&result(&j, ResultStatus::Started), now, &cfg, &mut more),
            Applied::Applied
        );
        assert_eq!(
            run.apply_result(&result(&j, ResultStatus::Succeeded), now, &cfg, &mut more),
            Applied::Applied
        );
        pending.extend(more.iter().filter_map(|e| match e {
            Effect::Dispatch(j) => Some((**j).clone()),
            _ => None,
        }));
        fx.extend(more);
    }
    panic!("{stop_at} was never dispatched");
}

#[test]
fn start_dispatches_exactly_the_steps_without_needs() {
    let mut run = run_for(EVERYTHING);
    let mut fx = Vec::new();
    run.start(Utc::now(), &settings(), &mut fx);
    let mut roots: Vec<String> = dispatched(&fx).into_iter().map(|(s, _, _)| s).collect();
    roots.sort();
    assert_eq!(roots, ["backup.pre", "build", "db.staging"]);
    assert_eq!(run.status, RunStatus::Running);
    assert!(fx.iter().any(|e| matches!(
        e,
        Effect::SetTimer {
            kind: TimerKind::Lease,
            ..
        }
    )));
}

#[test]
fn a_plan_with_nothing_to_do_succeeds_at_once_and_releases_the_lock() {
    let mut run = run_for(&["README.md"]);
    let mut fx = Vec::new();
    run.start(Utc::now(), &settings(), &mut fx);
    assert_eq!(run.status, RunStatus::Succeeded);
    assert!(dispatched(&fx).is_empty());
    assert!(fx.iter().any(|e| matches!(e, Effect::ReleaseLock)));
}

#[test]
fn results_for_other_attempts_are_stale_and_change_nothing() {
    let mut run = run_for(EVERYTHING);
    let mut fx = Vec::new();
    let cfg = settings();
    run.start(Utc::now(), &cfg, &mut fx);
    let build = job(&fx, "build");
    let mut old = result(&build, ResultStatus::Succeeded);
    old.attempt = 7;
    let before = format!("{:?}", run.steps);
    let mut fx2 = Vec::new();
    assert!(matches!(
        run.apply_result(&old, Utc::now(), &cfg, &mut fx2),
        Applied::Stale(_)
    ));
    assert!(fx2.is_empty());
    assert_eq!(format!("{:?}", run.steps), before);
    // A result for a step that is not awaiting one is stale too.
    let mut wrong_kind = result(&build, ResultStatus::Succeeded);
    wrong_kind.kind = JobKind::Compensate;
    assert!(matches!(
        run.apply_result(&wrong_kind, Utc::now(), &cfg, &mut fx2),
        Applied::Stale(_)
    ));
}

#[test]
fn steps_start_only_when_every_need_has_succeeded() {
    let mut run = run_for(EVERYTHING);
    let cfg = settings();
    let now = Utc::now();
    let mut fx = Vec::new();
    run.start(now, &cfg, &mut fx);
    let db = job(&fx, "db.staging");
    let mut fx2 = Vec::new();
    run.apply_result(&result(&db, ResultStatus::Succeeded), now, &cfg, &mut fx2);
    assert!(dispatched(&fx2).is_empty(), "db.production also needs backup.pre");
    let backup = job(&fx, "backup.pre");
    run.apply_result(&result(&backup, ResultStatus::Succeeded), now, &cfg, &mut fx2);
    assert_eq!(dispatched(&fx2), [("db.production".to_owned(), JobKind::Execute, 1)]);
    let next = job(&fx2, "db.production");
    assert_eq!(next.inputs.keys().collect::<Vec<_>>(), ["backup.pre", "db.staging"]);
}

#[test]
fn retryable_failure_waits_for_backoff_then_dispatches_a_new_attempt() {
    let mut run = run_for(EVERYTHING);
    let cfg = settings();
    let now = Utc::now();
    let mut fx = Vec::new();
    run.start(now, &cfg, &mut fx);
    let build = job(&fx, "build");
    let mut fx2 = Vec::new();
    run.apply_result(&failed(&build, true), now, &cfg, &mut fx2);
    assert_eq!(status(&run, "build"), StepStatus::Ready);
    let due = fx2
        .iter()
        .find_map(|e| match e {
            Effect::SetTimer {
                kind: TimerKind::Dispatch,
                due,
                attempt,
                ..
            } => Some((*due, *attempt)),
            _ => None,
        })
        .expect("backoff timer");
    assert_eq!(due.0, now + Chrono::milliseconds(1000));
    let mut fx3 = Vec::new();
    run.fire_timer("build", TimerKind::Dispatch, due.1, now, &cfg, &mut fx3);
    assert_eq!(dispatched(&fx3), [("build".to_owned(), JobKind::Execute, 2)]);
    // A fatal failure is not retried and rolls the run back.
    let second = job(&fx3, "build");
    let mut fx4 = Vec::new();
    run.apply_result(&failed(&second, false), now, &cfg, &mut fx4);
    assert_eq!(status(&run, "build"), StepStatus::Failed);
    assert_eq!(run.status, RunStatus::RollingBack);
}

#[test]
fn retries_stop_at_max_attempts() {
    let mut run = run_for(EVERYTHING);
    let cfg = settings();
    let now = Utc::now();
    let mut fx = Vec::new();
    run.start(now, &cfg, &mut fx);
    let mut j = job(&fx, "build");
    for attempt in 1..=3 {
        assert_eq!(j.attempt, attempt);
        let mut fx2 = Vec::new();
        run.apply_result(&failed(&j, true), now, &cfg, &mut fx2);
        if attempt == 3 {
            assert_eq!(status(&run, "build"), StepStatus::Failed);
            return;
        }
        let mut fx3 = Vec::new();
        run.fire_timer("build", TimerKind::Dispatch, j.attempt as i32, now, &cfg, &mut fx3);
        j = job(&fx3, "build");
    }
}

/// `j`'s attempt loses its lease (started first if `started`); the effects.
fn lose(run: &mut RunState, j: &StepJob, started: bool, cfg: &Settings) -> Effects {
    let now = Utc::now();
    let mut fx = Vec::new();
    if started {
        run.apply_result(&result(j, ResultStatus::Started), now, cfg, &mut fx);
    }
    run.fire_timer(&j.step_id, TimerKind::Lease, j.attempt as i32, now, cfg, &mut fx);
    fx
}

/// The retry of `j`'s step, once its backoff is over.
fn retry(run: &mut RunState, j: &StepJob, cfg: &Settings) -> StepJob {
    let mut fx = Vec::new();
    run.fire_timer(
        &j.step_id,
        TimerKind::Dispatch,
        j.attempt as i32,
        Utc::now(),
        cfg,
        &mut fx,
    );
    job(&fx, &j.step_id)
}

#[test]
fn attempts_lost_to_dead_daemons_do_not_use_up_the_steps_retries_until_their_own_limit() {
    let mut run = run_for(EVERYTHING);
    let cfg = Settings {
        lost_attempts_limit: 4,
        ..settings()
    };
    let mut fx = Vec::new();
    run.start(Utc::now(), &cfg, &mut fx);
    let mut j = job(&fx, "build");
    // Four started attempts lost (daemons killed mid-step): each is retried,
    // although the step allows 3 attempts, and the history says they were not counted.
    for lost in 1..=4 {
        let fx = lose(&mut run, &j, true, &cfg);
        assert_eq!(status(&run, "build"), StepStatus::Ready, "loss {lost} is retried");
        let retried = fx
            .iter()
            .find_map(|e| match e {
                Effect::History { kind, detail, .. } if *kind == "retry_scheduled" => Some(detail.clone()),
                _ => None,
            })
            .expect("a retry in the history");
        assert_eq!(retried["lost_to_dead_daemons"], lost, "{retried}");
        assert_eq!(retried["counted"], false, "{retried}");
        j = retry(&mut run, &j, &cfg);
    }
    // Past the limit a loss counts like a failure; the step's own three tries remain.
    for attempt in 1..=3 {
        lose(&mut run, &j, true, &cfg);
        if attempt == 3 {
            assert_eq!(status(&run, "build"), StepStatus::Failed);
            return;
        }
        j = retry(&mut run, &j, &cfg);
    }
}

#[test]
fn a_job_nobody_started_counts_against_the_steps_retries() {
    let mut run = run_for(EVERYTHING);
    let cfg = settings();
    let mut fx = Vec::new();
    run.start(Utc::now(), &cfg, &mut fx);
    let mut j = job(&fx, "build");
    for attempt in 1..=3 {
        lose(&mut run, &j, false, &cfg);
        if attempt == 3 {
            assert_eq!(
                status(&run, "build"),
                StepStatus::Failed,
                "no daemon took it: not a crash"
            );
            return;
        }
        j = retry(&mut run, &j, &cfg);
    }
}

#[test]
fn lease_expiry_loses_the_attempt_and_the_retry_policy_decides() {
    let mut run = run_for(EVERYTHING);
    let cfg = settings();
    let now = Utc::now();
    let mut fx = Vec::new();
    run.start(now, &cfg, &mut fx);
    let build = job(&fx, "build");
    let mut fx2 = Vec::new();
    run.apply_result(&result(&build, ResultStatus::Started), now, &cfg, &mut fx2);
    run.fire_timer("build", TimerKind::Lease, 1, now, &cfg, &mut fx2);
    assert!(
        fx2.iter().any(|e| matches!(e, Effect::Cancel(c) if c.attempt == 1)),
        "the zombie is told to stop"
    );
    assert!(
        fx2.iter()
            .any(|e| matches!(e, Effect::AttemptFinished { status: "lost", .. }))
    );
    assert_eq!(status(&run, "build"), StepStatus::Ready, "lost attempts are retried");
    // The zombie's late success is stale.
    let mut fx3 = Vec::new();
    assert!(matches!(
        run.apply_result(&result(&build, ResultStatus::Succeeded), now, &cfg, &mut fx3),
        Applied::Stale(_)
    ));
    // A stale lease timer (older attempt) does nothing.
    let mut fx4 = Vec::new();
    run.fire_timer("build", TimerKind::Lease, 1, now, &cfg, &mut fx4);
    assert!(fx4.is_empty());
}

#[test]
fn failure_cancels_in_flight_steps_then_compensates_in_reverse_completion_order() {
    let mut run = run_for(EVERYTHING);
    let cfg = settings();
    let now = Utc::now();
    let (fx, cdn) = run_until(&mut run, "cdn");
    let in_flight: Vec<StepJob> = ["apply.production", "network"].iter().map(|s| job(&fx, s)).collect();
    let mut fx2 = Vec::new();
    run.apply_result(&failed(&cdn, false), now, &cfg, &mut fx2);
    assert_eq!(run.status, RunStatus::RollingBack);
    let cancels: Vec<&str> = fx2
        .iter()
        .filter_map(|e| match e {
            Effect::Cancel(c) => Some(c.step_id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(cancels, ["apply.production", "network"]);
    assert!(dispatched(&fx2).is_empty(), "no compensation while steps are in flight");
    assert_eq!(status(&run, "backup.post"), StepStatus::Cancelled, "never started");

    let mut order = Vec::new();
    let mut fx3 = Vec::new();
    for j in &in_flight {
        let mut r = failed(j, false);
        r.error = Some(StepError::fatal("cancelled", "cancelled"));
        run.apply_result(&r, now, &cfg, &mut fx3);
    }
    assert_eq!(status(&run, "network"), StepStatus::Cancelled);
    let mut next = dispatched(&fx3);
    while let Some((step, kind, _)) = next.pop() {
        assert_eq!(kind, JobKind::Compensate);
        order.push(step.clone());
        let j = job(&fx3, &step);
        let mut fx4 = Vec::new();
        run.apply_result(&result(&j, ResultStatus::Succeeded), now, &cfg, &mut fx4);
        next = dispatched(&fx4);
        fx3 = fx4;
    }
    // First the steps that were attempted and may have left part of their work
    // (the failed CDN upload, the cancelled rollout and network change), then
    // the succeeded ones, latest completion first.
    let mut partial = order[..3].to_vec();
    partial.sort();
    assert_eq!(partial, ["apply.production", "cdn", "network"], "{order:?}");
    let mut expected: Vec<&StepState> = run
        .steps
        .iter()
        .filter(|s| s.status == StepStatus::Compensated && s.completion.is_some())
        .collect();
    expected.sort_by_key(|s| std::cmp::Reverse(s.completion));
    assert_eq!(order[3..], expected.iter().map(|s| s.id.clone()).collect::<Vec<_>>());
    assert_eq!(order.len(), 8, "{order:?}");
    assert!(
        run.steps.iter().find(|s| s.id == "cdn").unwrap().error.is_some(),
        "a compensated failed step keeps its error"
    );
    assert_eq!(run.status, RunStatus::RolledBack);
    assert_eq!(
        status(&run, "build"),
        StepStatus::Succeeded,
        "build has nothing to undo"
    );
}

#[test]
fn failed_compensation_stops_the_rollback_and_says_rollback_failed() {
    let mut run = run_for(EVERYTHING);
    let cfg = settings();
    let now = Utc::now();
    let (_, verify) = run_until(&mut run, "verify.staging");
    let mut fx = Vec::new();
    run.apply_result(&failed(&verify, false), now, &cfg, &mut fx);
    // Staging verification may have deployed before it failed: it is undone first.
    let comp = dispatched(&fx);
    assert_eq!(comp, [("verify.staging".to_owned(), JobKind::Compensate, 2)]);
    let j = job(&fx, "verify.staging");
    let mut fx2 = Vec::new();
    run.apply_result(&failed(&j, false), now, &cfg, &mut fx2);
    assert_eq!(status(&run, "verify.staging"), StepStatus::CompensationFailed);
    assert_eq!(run.status, RunStatus::RollbackFailed);
    assert!(dispatched(&fx2).is_empty(), "nothing older is compensated");
}

#[test]
fn operator_rollback_of_a_succeeded_run_compensates_it() {
    let mut run = run_for(&["src/a.ts"]);
    let cfg = settings();
    let now = Utc::now();
    let (_, last) = run_until(&mut run, "backup.post");
    let mut fx = Vec::new();
    run.apply_result(&result(&last, ResultStatus::Succeeded), now, &cfg, &mut fx);
    assert_eq!(run.status, RunStatus::Succeeded);
    let mut fx2 = Vec::new();
    run.request_rollback("bad release", now, &cfg, &mut fx2).unwrap();
    assert_eq!(run.status, RunStatus::RollingBack);
    assert_eq!(
        dispatched(&fx2)[0].0,
        "apply.production",
        "latest compensable completion first"
    );
    assert!(
        run.request_rollback("again", now, &cfg, &mut fx2).is_err(),
        "a run already rolling back"
    );
}

/// Compensates the run step by step, answering each compensation with `answer`.
fn compensate_all(run: &mut RunState, mut fx: Effects, answer: impl Fn(&StepJob) -> StepResult) -> Vec<StepJob> {
    let cfg = settings();
    let now = Utc::now();
    let mut seen = Vec::new();
    loop {
        let Some(j) = fx.iter().rev().find_map(|e| match e {
            Effect::Dispatch(j) if j.kind == JobKind::Compensate => Some((**j).clone()),
            _ => None,
        }) else {
            return seen;
        };
        seen.push(j.clone());
        let mut more = Vec::new();
        run.apply_result(&result(&j, ResultStatus::Started), now, &cfg, &mut more);
        run.apply_result(&answer(&j), now, &cfg, &mut more);
        fx = more;
    }
}

#[test]
fn an_irreversible_migration_or_a_failed_down_is_undone_by_restoring_the_pre_deploy_backup() {
    let cases = [
        ("irreversible", "0002_drop has no down migration", true),
        ("irreversible", "0002_drop has no down migration", false),
        (
            "rollback_failed",
            "down migration of 0002_drop failed at statement 1 of 1",
            true,
        ),
        (
            "rollback_failed",
            "down migration of 0002_drop failed at statement 1 of 1",
            false,
        ),
    ];
    for (code, message, verified) in cases {
        let mut run = run_for(&["drizzle/migrations/0001_x.sql"]);
        let i = run.steps.iter().position(|s| s.id == "db.production").unwrap();
        run.steps[i].restore_from_backup = true;
        let cfg = settings();
        let now = Utc::now();
        let (_, last) = run_until(&mut run, "backup.post");
        if !verified {
            let b = run.steps.iter().position(|s| s.id == "backup.pre").unwrap();
            run.steps[b].outputs.insert("verified".into(), false.into());
        }
        let mut fx = Vec::new();
        run.apply_result(&result(&last, ResultStatus::Succeeded), now, &cfg, &mut fx);
        let mut fx = Vec::new();
        run.request_rollback("bad release", now, &cfg, &mut fx).unwrap();
        let jobs = compensate_all(&mut run, fx, |j| {
            if j.step_id == "db.production" && j.role == "db-migration" {
                let mut r = result(j, ResultStatus::Failed);
                r.error = Some(StepError::fatal(code, message));
                r
            } else {
                let mut r = StepResult::for_job(j, "d1", ResultStatus::Succeeded);
                r.outputs = Default::default();
                r
            }
        });
        let restore: Vec<&StepJob> = jobs.iter().filter(|j| j.role == "backup").collect();
        if verified {
            assert_eq!(restore.len(), 1, "{jobs:?}");
            let r = restore[0];
            assert_eq!(
                (r.step_id.as_str(), r.action.as_str(), r.zone.as_str()),
                ("db.production", "restore", "production")
            );
            let id = format!("b-{}", run.id);
            assert_eq!(r.params.get("backup_id"), Some(&json!(id)));
            assert_eq!(r.params.get("confirm_backup_id"), Some(&json!(id)));
            assert_eq!(status(&run, "db.production"), StepStatus::Compensated);
            assert_eq!(run.status, RunStatus::RolledBack);
        } else {
            assert!(restore.is_empty());
            assert_eq!(status(&run, "db.production"), StepStatus::CompensationFailed);
            let e = run.steps[i].error.as_ref().unwrap();
            assert!(
                e.message.contains("cannot be restored: backup b-")
                    && e.message.contains("from backup.pre is not verified"),
                "{e:?}"
            );
            assert!(e.message.starts_with(message), "{e:?}");
            assert_eq!(e.code, code, "the daemon's code is kept");
            assert_eq!(run.status, RunStatus::RollbackFailed);
        }
    }
}

#[test]
fn a_queued_run_is_superseded_without_starting_and_an_admitted_one_cannot_be() {
    let mut run = run_for(EVERYTHING);
    let newer = Uuid::new_v4();
    let now = Utc::now();
    let mut fx = Vec::new();
    run.supersede(newer, now, &mut fx).unwrap();
    assert_eq!(run.status, RunStatus::Superseded);
    assert!(run.status.is_terminal());
    assert_eq!(run.finished_at, Some(now));
    assert!(run.started_at.is_none(), "it never started");
    assert!(
        run.steps
            .iter()
            .all(|s| matches!(s.status, StepStatus::Cancelled | StepStatus::Skipped)),
        "no step is left to run"
    );
    assert!(dispatched(&fx).is_empty());
    let said = fx
        .iter()
        .any(|e| matches!(e, Effect::History { kind: "superseded", detail, .. } if detail["by"] == json!(newer)));
    assert!(said, "the history names the newer run: {fx:?}");

    let mut admitted = run_for(EVERYTHING);
    admitted.start(now, &settings(), &mut Vec::new());
    assert_eq!(admitted.status, RunStatus::Running);
    let refused = admitted.supersede(newer, now, &mut Vec::new());
    assert!(
        matches!(
            refused,
            Err(EngineError::WrongState {
                action: "supersede",
                ..
            })
        ),
        "{refused:?}"
    );
    assert_eq!(admitted.status, RunStatus::Running);
}

#[test]
fn a_failed_post_deploy_backup_flags_the_run_for_review_and_an_operator_may_roll_it_back() {
    let mut run = run_for(EVERYTHING);
    assert!(run.steps.iter().any(|s| s.id == "backup.post" && s.review_on_failure));
    let cfg = settings();
    let now = Utc::now();
    let (_, last) = run_until(&mut run, "backup.post");
    let mut fx = Vec::new();
    let mut r = result(&last, ResultStatus::Failed);
    r.error = Some(StepError::fatal("verification_failed", "restore spot-check differs"));
    run.apply_result(&r, now, &cfg, &mut fx);
    assert_eq!(run.status, RunStatus::Failed, "the run ends failed, not rolling back");
    assert!(dispatched(&fx).is_empty(), "nothing is compensated: {fx:?}");
    assert!(!fx.iter().any(|e| matches!(e, Effect::Cancel(_))));
    let flagged = fx.iter().find_map(|e| match e {
        Effect::History {
            kind: "flagged_for_rollback_review",
            detail,
            ..
        } => Some(detail.clone()),
        _ => None,
    });
    assert_eq!(
        flagged.expect("flagged in the history")["steps"],
        json!(["backup.post"])
    );
    assert_eq!(
        status(&run, "apply.production"),
        StepStatus::Succeeded,
        "the deploy stays"
    );

    let mut fx = Vec::new();
    run.request_rollback("backup cannot be trusted", now, &cfg, &mut fx)
        .unwrap();
    assert_eq!(run.status, RunStatus::RollingBack);
    let jobs = compensate_all(&mut run, fx, |j| {
        let mut r = StepResult::for_job(j, "d1", ResultStatus::Succeeded);
        r.outputs = Default::default();
        r
    });
    assert!(jobs.iter().any(|j| j.step_id == "apply.production"), "{jobs:?}");
    assert!(
        !jobs.iter().any(|j| j.step_id == "backup.post"),
        "nothing to undo there"
    );
    assert_eq!(run.status, RunStatus::RolledBack);
}

#[test]
fn a_review_step_that_fails_while_others_run_lets_them_finish() {
    // On its own the run's other steps still go on: only a failure of a
    // rollback-policy step stops the run.
    let mut run = run_for(EVERYTHING);
    let i = run.steps.iter().position(|s| s.id == "cdn").unwrap();
    run.steps[i].review_on_failure = true;
    let cfg = settings();
    let now = Utc::now();
    let (fx, cdn) = run_until(&mut run, "cdn");
    let others: Vec<StepJob> = ["apply.production", "network"].iter().map(|s| job(&fx, s)).collect();
    let mut fx2 = Vec::new();
    run.apply_result(&failed(&cdn, false), now, &cfg, &mut fx2);
    assert_eq!(run.status, RunStatus::Running);
    assert!(
        !fx2.iter().any(|e| matches!(e, Effect::Cancel(_))),
        "nothing is cancelled"
    );
    for j in &others {
        let mut fx3 = Vec::new();
        run.apply_result(&result(j, ResultStatus::Succeeded), now, &cfg, &mut fx3);
    }
    assert_eq!(run.status, RunStatus::Running, "backup.post still to run");
}

#[test]
fn a_failed_attempt_of_a_role_with_partial_effects_is_compensated_with_what_it_reported() {
    let mut run = run_for(EVERYTHING);
    let cfg = settings();
    let now = Utc::now();
    let (_, apply) = run_until(&mut run, "apply.production");
    let mut r = failed(&apply, false);
    r.outputs = json!({"previous_revision": 41}).as_object().cloned().unwrap();
    let mut fx = Vec::new();
    run.apply_result(&r, now, &cfg, &mut fx);
    let comp = job(&fx, "apply.production");
    assert_eq!(
        (comp.kind, comp.action.as_str()),
        (JobKind::Compensate, "rollback-replicaset")
    );
    assert_eq!(comp.own_outputs["previous_revision"], 41);
    // A role whose failed attempts change nothing is not compensated: a failed
    // migration rolled its transaction back.
    let mut run = run_for(&["drizzle/migrations/0001_x.sql"]);
    let (_, db) = run_until(&mut run, "db.staging");
    let mut fx = Vec::new();
    run.apply_result(&failed(&db, false), now, &cfg, &mut fx);
    assert!(
        dispatched(&fx).iter().all(|(step, _, _)| step != "db.staging"),
        "{fx:?}"
    );
    assert!(!run.steps.iter().find(|s| s.id == "db.staging").unwrap().partial_work());
    assert_eq!(status(&run, "db.staging"), StepStatus::Failed);
}

#[test]
fn a_daemon_s_warnings_are_kept_in_the_run_s_history() {
    let mut run = run_for(&["drizzle/migrations/0001_x.sql"]);
    let cfg = settings();
    let (_, db) = run_until(&mut run, "db.staging");
    let mut r = result(&db, ResultStatus::Succeeded);
    r.outputs
        .insert("warnings".into(), json!(["0009_forgotten.sql is not in the journal"]));
    let mut fx = Vec::new();
    run.apply_result(&r, Utc::now(), &cfg, &mut fx);
    let detail = fx
        .iter()
        .find_map(|e| match e {
            Effect::History {
                kind: "step_succeeded",
                detail,
                ..
            } => Some(detail.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(detail["warnings"], json!(["0009_forgotten.sql is not in the journal"]));
}

/// A Terraform plan report of `n` created resources, saved as `sha`.
fn terraform_plan(n: u64, sha: char) -> baton_shared::protocol::Fields {
    let p = baton_shared::facts::TerraformPlanned {
        resources_changed: n,
        add: n,
        change: 0,
        destroy: 0,
        changes: (0..n)
            .map(|i| baton_shared::facts::ResourceChange {
                address: format!("terraform_data.r[{i}]"),
                action: "create".into(),
            })
            .collect(),
        plan_sha256: Some(sha.to_string().repeat(64)),
        unintended: Vec::new(),
    };
    baton_shared::facts::FactSet::to_fields(&p)
}

fn approve(run: &mut RunState, step: &str, subject: &str, who: &str) {
    let now = Utc::now();
    run.facts.approvals.push(crate::state::Approval {
        step_id: step.into(),
        plan_hash: run.plan_hash.clone(),
        subject: subject.into(),
        approver: who.into(),
        decision: crate::state::Decision::Approve,
        comment: String::new(),
        at: now,
        expires_at: now + Chrono::hours(1),
    });
}

#[test]
fn an_apply_whose_approved_plan_went_stale_asks_again_for_the_new_plan() {
    let cfg = settings();
    let now = Utc::now();
    let mut run = run_for(&["infra/main.tf"]);
    let (_, plan_job) = run_until(&mut run, "infra.staging.plan");
    let mut fx = Vec::new();
    let mut r = result(&plan_job, ResultStatus::Succeeded);
    r.outputs = terraform_plan(3, 'a');
    run.apply_result(&r, now, &cfg, &mut fx);
    // Three changes: within the limit, dispatched at once.
    let apply = job(&fx, "infra.staging");
    assert_eq!(apply.inputs["infra.staging.plan"]["plan_sha256"], json!("a".repeat(64)));

    // The state moved; the daemon re-planned seven changes, saved as "b".
    let mut fx = Vec::new();
    let mut r = result(&apply, ResultStatus::Failed);
    r.error = Some(StepError::fatal(APPROVAL_AGAIN, "the approved plan went stale"));
    r.outputs = terraform_plan(7, 'b');
    assert_eq!(run.apply_result(&r, now, &cfg, &mut fx), Applied::Applied);
    assert!(dispatched(&fx).is_empty(), "{fx:?}");
    let step = run.steps.iter().find(|s| s.id == "infra.staging").unwrap();
    assert_eq!(step.status, StepStatus::Pending);
    assert_eq!(step.exec_attempts, 0, "asking again is not a failed try");
    assert_eq!(
        step.started_at, None,
        "nothing was applied: not partial work to compensate"
    );
    let hold = step.hold.clone().expect("held for approval");
    assert!(hold.approval && hold.gate == "blast-radius", "{hold:?}");
    assert_eq!(hold.subject.as_deref(), Some("b".repeat(64).as_str()));
    assert!(hold.reason.contains("7 resources change"), "{}", hold.reason);
    assert_eq!(run.status, RunStatus::AwaitingApproval);
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::History { kind, .. } if *kind == "approval_asked_again"))
    );

    // An approval of the old plan does not count; one of the new plan does.
    approve(&mut run, "infra.staging", &"a".repeat(64), "marta");
    let mut fx = Vec::new();
    run.advance(now, &cfg, &mut fx);
    assert!(dispatched(&fx).is_empty(), "{fx:?}");
    approve(&mut run, "infra.staging", &"b".repeat(64), "marta");
    let mut fx = Vec::new();
    run.advance(now, &cfg, &mut fx);
    let again = job(&fx, "infra.staging");
    assert_eq!(again.inputs["infra.staging"]["plan_sha256"], json!("b".repeat(64)));
    let mut fx = Vec::new();
    run.apply_result(&result(&again, ResultStatus::Succeeded), now, &cfg, &mut fx);
    assert_eq!(status(&run, "infra.staging"), StepStatus::Succeeded);
}

#[test]
fn a_step_without_an_approval_gate_cannot_ask_again_and_fails() {
    let cfg = settings();
    let now = Utc::now();
    let mut run = run_for(&["infra/main.tf"]);
    let (_, plan_job) = run_until(&mut run, "infra.staging.plan");
    let mut fx = Vec::new();
    let mut r = result(&plan_job, ResultStatus::Failed);
    r.error = Some(StepError::fatal(APPROVAL_AGAIN, "asks again"));
    r.outputs = terraform_plan(7, 'b');
    run.apply_result(&r, now, &cfg, &mut fx);
    assert_eq!(status(&run, "infra.staging.plan"), StepStatus::Failed);
}
