//! Gate rules, with the clock injected.

use baton_shared::protocol::{Message, StepJob, StepResult};
use chrono::Duration as Chrono;
use serde_json::json;

use super::*;
use crate::engine::{Effect, Effects, RunStatus, Settings};
use crate::pipeline::Pipeline;
use crate::planner;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn event(paths: &[&str], risk: &str, approvals: &[&str], author: &str) -> MergeEvent {
    let approvals: Vec<_> = approvals
        .iter()
        .map(|a| json!({"by": a, "at": "2026-11-26T09:00:00Z"}))
        .collect();
    let ev = json!({
        "v": 1, "service": "shop", "environment": "production", "repository": "r", "commit_sha": COMMIT,
        "pull_request": {"number": 12, "title": "t", "author": author, "approvals": approvals},
        "changed_paths": paths, "risk": risk, "requested_by": "ci-bot", "ci_run_url": "u"
    });
    MergeEvent::parse(&serde_json::to_vec(&ev).unwrap()).unwrap()
}

fn run(paths: &[&str], risk: &str) -> RunState {
    let e = event(paths, risk, &["marta"], "dev");
    let plan = planner::plan(&e, &Pipeline::seed()).unwrap();
    RunState::planned(&e, &plan)
}

fn policy(edit: impl FnOnce(&mut GatesConfig)) -> Policy {
    let mut c = GatesConfig::default();
    edit(&mut c);
    c.validate().unwrap()
}

fn settings(p: Policy) -> Settings {
    Settings {
        lease: std::time::Duration::from_secs(30),
        accept_timeout: std::time::Duration::from_secs(60),
        heartbeat: std::time::Duration::from_secs(5),
        lost_attempts_limit: 10,
        gates: std::sync::Arc::new(p),
    }
}

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn idx(run: &RunState, step: &str) -> usize {
    run.steps.iter().position(|s| s.id == step).unwrap()
}

fn verdict(run: &RunState, step: &str, gate: &str, facts: &Facts, p: &Policy, now: DateTime<Utc>) -> Verdict {
    evaluate_step(run, idx(run, step), facts, p, now)
        .all
        .into_iter()
        .find(|v| v.gate == gate)
        .unwrap_or_else(|| panic!("{step} has no gate {gate}"))
        .verdict
}

fn succeed(run: &mut RunState, step: &str, outputs: serde_json::Value, started: DateTime<Utc>) {
    let i = idx(run, step);
    let s = &mut run.steps[i];
    s.status = StepStatus::Succeeded;
    s.started_at = Some(started);
    s.outputs = outputs.as_object().cloned().unwrap_or_default();
}

fn approval(step: &str, plan: &str, who: &str, decision: Decision, expires: DateTime<Utc>) -> Approval {
    Approval {
        step_id: step.into(),
        plan_hash: plan.into(),
        subject: String::new(),
        approver: who.into(),
        decision,
        comment: String::new(),
        at: expires - Chrono::hours(1),
        expires_at: expires,
    }
}

#[test]
fn merge_gate_names_the_missing_approvers_and_never_counts_the_author() {
    let p = MergeConfig::default();
    assert!(merge_gate(&event(&[], "standard", &["iwona"], "dev"), &p).is_ok());
    let e = merge_gate(&event(&[], "standard", &["bob"], "dev"), &p).unwrap_err();
    assert!(e.contains("missing: marta, iwona"), "{e}");
    // Marta wrote it: her own approval does not count.
    let e = merge_gate(&event(&[], "standard", &["marta"], "marta"), &p).unwrap_err();
    assert!(
        e.contains("missing: marta, iwona") && e.contains("marta is the author"),
        "{e}"
    );
    let both = MergeConfig {
        min_approvals: 2,
        ..MergeConfig::default()
    };
    let e = merge_gate(&event(&[], "standard", &["Marta"], "dev"), &both).unwrap_err();
    assert!(e.contains("missing: iwona"), "{e}");
}

#[test]
fn an_open_incident_holds_admission_and_steps_in_its_environment_only() {
    let r = run(&["src/a.ts"], "standard");
    let p = Policy::default();
    let mut facts = Facts::default();
    assert!(matches!(admission(&r, &facts).verdict, Verdict::Pass { .. }));
    facts.incidents.push(Incident {
        id: Uuid::nil(),
        environment: "production".into(),
        title: "checkout 500s".into(),
        opened_at: t("2026-11-26T10:00:00Z"),
    });
    let v = admission(&r, &facts).verdict;
    assert!(
        matches!(
            &v,
            Verdict::Hold {
                approval: false,
                until: None,
                ..
            }
        ),
        "{v:?}"
    );
    assert!(v.reason().contains("checkout 500s"));
    let now = t("2026-11-26T11:00:00Z");
    // Production steps hold; the CI build does not.
    assert!(matches!(
        verdict(&r, "backup.pre", "incident", &facts, &p, now),
        Verdict::Hold { .. }
    ));
    assert!(matches!(
        verdict(&r, "build", "incident", &facts, &p, now),
        Verdict::Pass { .. }
    ));
}

fn verified(soak_seconds: u64, rollback: serde_json::Value) -> serde_json::Value {
    let mut v = json!({"image_digest": format!("sha256:{}", "a".repeat(64)), "regression_percent": 0.0,
                       "soak_seconds": soak_seconds});
    v.as_object_mut()
        .unwrap()
        .extend(rollback.as_object().cloned().unwrap_or_default());
    v
}

#[test]
fn staging_soak_wants_a_watched_soak_not_elapsed_time() {
    let mut r = run(&["src/a.ts"], "standard");
    let p = policy(|c| c.staging_soak_secs = 900);
    let since = t("2026-11-26T10:00:00Z");
    let f = Facts::default();
    let v = verdict(&r, "apply.production", "staging-soak", &f, &p, since);
    assert!(matches!(v, Verdict::Fail { .. }), "no verification yet: {v:?}");
    // Hours after a verification that watched only 10 minutes: still too short.
    succeed(&mut r, "verify.staging", verified(600, json!({})), since);
    let v = verdict(&r, "apply.production", "staging-soak", &f, &p, since + Chrono::hours(5));
    assert_eq!(
        v,
        Verdict::Fail {
            reason: "verify.staging watched staging run this change for 600 s; the minimum is 15 min \
                     (the step's soak must cover gates.staging_soak_secs)"
                .into()
        }
    );
    succeed(&mut r, "verify.staging", verified(900, json!({})), since);
    let v = verdict(&r, "apply.production", "staging-soak", &f, &p, since);
    assert!(matches!(v, Verdict::Pass { .. }), "{v:?}");
}

#[test]
fn critical_changes_soak_longer_and_never_shorter_than_the_rest() {
    let since = t("2026-11-26T10:00:00Z");
    let f = Facts::default();
    let p = Policy::default();
    assert_eq!(p.staging_soak_for(Risk::Standard).as_secs(), 900);
    assert_eq!(p.staging_soak_for(Risk::High).as_secs(), 900);
    assert_eq!(p.staging_soak_for(Risk::Critical).as_secs(), 3600);
    let mut critical = run(&["src/a.ts"], "critical");
    let mut high = run(&["src/a.ts"], "high");
    succeed(&mut critical, "verify.staging", verified(900, json!({})), since);
    succeed(&mut high, "verify.staging", verified(900, json!({})), since);
    let v = verdict(&high, "apply.production", "staging-soak", &f, &p, since);
    assert!(
        matches!(v, Verdict::Pass { .. }),
        "a high-risk change soaks 15 min: {v:?}"
    );
    let v = verdict(&critical, "apply.production", "staging-soak", &f, &p, since);
    assert!(
        matches!(&v, Verdict::Fail { reason } if reason.contains("for 900 s; the minimum is 60 min, critical risk")),
        "{v:?}"
    );
    succeed(&mut critical, "verify.staging", verified(3600, json!({})), since);
    let v = verdict(&critical, "apply.production", "staging-soak", &f, &p, since);
    assert!(matches!(v, Verdict::Pass { .. }), "{v:?}");
    // A longer general soak also holds critical changes to it.
    let p = policy(|c| {
        c.staging_soak_secs = 7200;
        c.critical_staging_soak_secs = 3600;
    });
    assert_eq!(p.staging_soak_for(Risk::Critical).as_secs(), 7200);
}

#[test]
fn production_needs_a_rehearsed_rollback_unless_nothing_came_before() {
    let since = t("2026-11-26T10:00:00Z");
    let (f, p) = (Facts::default(), Policy::default());
    let mut r = run(&["src/a.ts"], "standard");
    succeed(&mut r, "verify.staging", verified(900, json!({})), since);
    let v = verdict(&r, "apply.production", "rollback-tested", &f, &p, since);
    assert_eq!(
        v,
        Verdict::Fail {
            reason: "verify.staging did not rehearse the rollback on staging: production apply needs a tested rollback"
                .into()
        }
    );
    succeed(
        &mut r,
        "verify.staging",
        verified(900, json!({"rollback_tested": true, "rollback_seconds": 4.2})),
        since,
    );
    let v = verdict(&r, "apply.production", "rollback-tested", &f, &p, since);
    assert!(
        matches!(&v, Verdict::Pass { reason } if reason.contains("in 4.2 s and forward again")),
        "{v:?}"
    );
    succeed(
        &mut r,
        "verify.staging",
        verified(900, json!({"first_deployment": true})),
        since,
    );
    let v = verdict(&r, "apply.production", "rollback-tested", &f, &p, since);
    assert!(
        matches!(&v, Verdict::Pass { reason } if reason.starts_with("the service's first deployment")),
        "{v:?}"
    );
}

#[test]
fn production_facts_must_be_reported_and_agree() {
    // (`backup` below: a well-formed backup report of the given run.)
    let mut r = run(&["src/a.ts"], "standard");
    let p = Policy::default();
    let f = Facts::default();
    let now = Utc::now();
    let run_id = r.id;
    succeed(&mut r, "backup.pre", backup("b1", run_id, false), now);
    let v = verdict(&r, "apply.production", "backup-verified", &f, &p, now);
    assert_eq!(v, Verdict::fail("backup b1 from backup.pre is not verified"));
    succeed(&mut r, "backup.pre", backup("b1", Uuid::nil(), true), now);
    let v = verdict(&r, "apply.production", "backup-verified", &f, &p, now);
    assert_eq!(
        v,
        Verdict::fail(format!(
            "backup b1 from backup.pre is not of this run (it belongs to run {})",
            Uuid::nil()
        ))
    );
    succeed(&mut r, "backup.pre", backup("b1", run_id, true), now);
    assert!(matches!(
        verdict(&r, "apply.production", "backup-verified", &f, &p, now),
        Verdict::Pass { .. }
    ));

    let (a, b) = (
        format!("sha256:{}", "a".repeat(64)),
        format!("sha256:{}", "b".repeat(64)),
    );
    succeed(&mut r, "build", json!({"image_digest": a}), now);
    succeed(
        &mut r,
        "verify.staging",
        json!({"image_digest": b, "regression_percent": 25.0}),
        now,
    );
    let v = verdict(&r, "apply.production", "image-match", &f, &p, now);
    assert_eq!(v, Verdict::fail(format!("build built {a} but staging verified {b}")));
    // A digest that is not one fails the gate naming the step.
    succeed(&mut r, "build", json!({"image_digest": "sha256:aaa"}), now);
    let v = verdict(&r, "apply.production", "image-match", &f, &p, now);
    assert!(
        matches!(&v, Verdict::Fail { reason } if reason.starts_with("outputs of step build are not an image build report")),
        "{v:?}"
    );
    let v = verdict(&r, "apply.production", "performance-regression", &f, &p, now);
    assert_eq!(
        v,
        Verdict::fail("25 % slower than the baseline, above the limit of 20 %")
    );
}

#[test]
fn destructive_migrations_need_a_backup_and_a_window_additive_ones_do_not() {
    let mut r = run(&["drizzle/migrations/0002_drop.sql", "src/a.ts"], "standard");
    let now = t("2026-12-01T12:00:00Z"); // Tuesday 13:00 in Amsterdam
    let f = Facts::default();
    let p = policy(|c| {
        c.maintenance_windows.insert(
            "production".into(),
            crate::window::ScheduleConfig {
                time_zone: "Europe/Amsterdam".into(),
                weekly: vec![crate::window::Weekly {
                    days: vec!["tue".into()],
                    start: "22:00".into(),
                    duration_minutes: 120,
                }],
                once: vec![],
                overrun: Overrun::Cancel,
            },
        );
    });
    succeed(&mut r, "db.staging", json!({"destructive": false, "warnings": []}), now);
    assert!(matches!(
        verdict(&r, "db.production", "maintenance-window", &f, &p, now),
        Verdict::Pass { .. }
    ));
    assert!(matches!(
        verdict(&r, "db.production", "backup-verified", &f, &p, now),
        Verdict::Pass { .. }
    ));
    succeed(
        &mut r,
        "db.staging",
        json!({"destructive": true, "removals": [
            {"tag": "0002_drop", "change": "drops column name of users", "name": "name", "used_by": ["src/a.ts"]}
        ]}),
        now,
    );
    let v = verdict(&r, "db.production", "maintenance-window", &f, &p, now);
    assert_eq!(
        v,
        Verdict::hold(
            "destructive migration: outside the maintenance window; next opens Tue 2026-12-01 22:00 CET",
            Some(t("2026-12-01T21:00:00Z"))
        )
    );
    let s = evaluate_step(&r, idx(&r, "db.production"), &f, &p, t("2026-12-01T21:30:00Z"));
    assert_eq!(s.window, Some((t("2026-12-01T23:00:00Z"), Overrun::Cancel)));
    assert!(matches!(
        verdict(&r, "db.production", "backup-verified", &f, &p, now),
        Verdict::Fail { .. }
    ));
    // The same deploy ships code that still names the column: additive-first fails.
    let v = verdict(&r, "db.production", "additive-first", &f, &p, now);
    assert!(
        matches!(&v, Verdict::Fail { reason } if reason.contains("drops column name of users (still named in src/a.ts)")),
        "{v:?}"
    );
    // An explicit exception in the merge event turns it into a warning naming the reason.
    let mut excepted = r.clone();
    excepted.event.exceptions.push(baton_shared::protocol::RuleException {
        rule: "additive-first".into(),
        reason: "the column is unused since release 41".into(),
    });
    let v = verdict(&excepted, "db.production", "additive-first", &f, &p, now);
    assert!(
        matches!(&v, Verdict::Warn { reason } if reason.contains("since release 41") && reason.contains("src/a.ts")),
        "{v:?}"
    );
    // Once no code names it, the removal passes.
    succeed(
        &mut r,
        "db.staging",
        json!({"destructive": true, "removals": [
            {"tag": "0002_drop", "change": "drops column name of users", "name": "name"}
        ]}),
        now,
    );
    let v = verdict(&r, "db.production", "additive-first", &f, &p, now);
    assert!(matches!(&v, Verdict::Pass { .. }), "{v:?}");
    // High risk without any window configured fails with the key to set.
    let r = run(&["src/a.ts"], "high");
    let v = verdict(
        &r,
        "apply.production",
        "maintenance-window",
        &f,
        &Policy::default(),
        now,
    );
    assert!(v.reason().contains("gates.maintenance_windows.production"), "{v:?}");
}

#[test]
fn approvals_count_distinct_unexpired_approvers_of_this_plan_never_the_requester() {
    let mut r = run(&["src/a.ts"], "standard");
    let i = idx(&r, "apply.production");
    r.steps[i].gates = vec!["human-approval".into()];
    let p = policy(|c| c.approval.required = 2);
    let now = t("2026-11-26T12:00:00Z");
    let later = now + Chrono::hours(1);
    let plan = r.plan_hash.clone();
    let mut f = Facts::default();
    let check = |f: &Facts| verdict(&r, "apply.production", "human-approval", f, &p, now);
    assert!(matches!(check(&f), Verdict::Hold { approval: true, .. }));
    f.approvals = vec![
        approval("apply.production", &plan, "ci-bot", Decision::Approve, later),
        approval("apply.production", &plan, "alice", Decision::Approve, later),
        approval("apply.production", &plan, "alice", Decision::Approve, later),
        approval("apply.production", "other-plan", "bob", Decision::Approve, later),
        approval("apply.production", &plan, "carol", Decision::Approve, now),
    ];
    let v = check(&f);
    assert!(
        matches!(&v, Verdict::Hold { approval: true, reason, .. } if reason.ends_with("has alice; expired: carol")),
        "{v:?}"
    );
    f.approvals
        .push(approval("apply.production", &plan, "bob", Decision::Approve, later));
    assert!(matches!(check(&f), Verdict::Pass { .. }));
    f.approvals
        .push(approval("apply.production", &plan, "dave", Decision::Reject, later));
    let v = check(&f);
    assert!(
        is_rejection(&GateVerdict {
            gate: "human-approval".into(),
            verdict: v.clone()
        }),
        "{v:?}"
    );
}

fn drive(run: &mut RunState, cfg: &Settings, now: DateTime<Utc>, stop: &[&str]) -> Effects {
    let mut all = Vec::new();
    let mut fx = Vec::new();
    if run.status == RunStatus::Queued {
        run.start(now, cfg, &mut fx);
    } else {
        run.advance(now, cfg, &mut fx);
    }
    loop {
        let jobs: Vec<StepJob> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::Dispatch(j) if !stop.contains(&j.step_id.as_str()) => Some((**j).clone()),
                _ => None,
            })
            .collect();
        all.append(&mut fx);
        if jobs.is_empty() {
            return all;
        }
        for j in jobs {
            let mut r = StepResult::for_job(&j, "d", baton_shared::protocol::ResultStatus::Succeeded);
            let digest = format!("sha256:{COMMIT}{}", &COMMIT[..24]);
            let v = match j.role.as_str() {
                "backup" => backup("b", j.run_id, true),
                "container-build" => json!({"image_digest": digest}),
                "staging-verify" => json!({"image_digest": digest, "regression_percent": 0, "soak_seconds": 900,
                                           "rollback_tested": true}),
                _ => json!({}),
            };
            r.outputs = v.as_object().cloned().unwrap_or_default();
            run.apply_result(&r, now, cfg, &mut fx);
        }
    }
}

#[test]
fn the_engine_holds_for_approval_then_dispatches_or_rolls_back_on_rejection() {
    for decision in [Decision::Approve, Decision::Reject] {
        let mut r = run(&["src/a.ts"], "standard");
        let i = idx(&r, "apply.production");
        r.steps[i].gates.push("human-approval".into());
        let cfg = settings(policy(|c| c.staging_soak_secs = 0));
        let now = Utc::now();
        let fx = drive(&mut r, &cfg, now, &[]);
        assert_eq!(r.status, RunStatus::AwaitingApproval);
        let hold = r.steps[i].hold.clone().expect("held");
        assert!(hold.approval && hold.gate == "human-approval", "{hold:?}");
        assert!(
            fx.iter()
                .any(|e| matches!(e, Effect::History { kind: "gate", step: Some(s), .. } if s == "apply.production"))
        );
        // Re-evaluating without news records nothing new.
        let mut again = Vec::new();
        r.advance(now, &cfg, &mut again);
        assert!(again.is_empty(), "{again:?}");
        let plan = r.plan_hash.clone();
        r.facts.approvals.push(approval(
            "apply.production",
            &plan,
            "alice",
            decision,
            now + Chrono::hours(1),
        ));
        let fx = drive(&mut r, &cfg, now, &[]);
        match decision {
            Decision::Approve => {
                assert_eq!(r.status, RunStatus::Succeeded);
                assert!(r.steps[i].hold.is_none());
            }
            Decision::Reject => {
                assert_eq!(r.steps[i].status, StepStatus::Failed);
                assert_eq!(r.steps[i].error.as_ref().unwrap().code, "rejected");
                assert!(
                    fx.iter().any(
                        |e| matches!(e, Effect::Dispatch(j) if j.kind == baton_shared::protocol::JobKind::Compensate)
                    ),
                    "rejection compensates"
                );
                assert_eq!(r.status, RunStatus::RolledBack);
            }
        }
    }
}

#[test]
fn an_incident_blocks_admission_until_resolved() {
    let mut r = run(&["src/a.ts"], "standard");
    r.facts.incidents.push(Incident {
        id: Uuid::nil(),
        environment: "production".into(),
        title: "db down".into(),
        opened_at: Utc::now(),
    });
    let cfg = settings(policy(|c| c.staging_soak_secs = 0));
    let fx = drive(&mut r, &cfg, Utc::now(), &[]);
    assert_eq!(r.status, RunStatus::Blocked);
    assert!(!fx.iter().any(|e| matches!(e, Effect::Dispatch(_))));
    r.facts.incidents.clear();
    drive(&mut r, &cfg, Utc::now(), &[]);
    assert_eq!(r.status, RunStatus::Succeeded);
}

fn ask<'a>(step: &'a str, plan_hash: &'a str, who: &'a str) -> Ask<'a> {
    Ask {
        step,
        plan_hash,
        subject: None,
        who,
        decision: Decision::Approve,
    }
}

#[test]
fn decisions_are_checked_before_they_are_recorded() {
    let mut r = run(&["src/a.ts"], "standard");
    let i = idx(&r, "apply.production");
    r.steps[i].gates.push("human-approval".into());
    let p = policy(|c| c.staging_soak_secs = 0);
    let now = Utc::now();
    let f = Facts::default();
    let plan = r.plan_hash.clone();
    let e = check_decision(&r, ask("apply.production", &plan, "alice"), &f, &p, now).unwrap_err();
    assert!(matches!(e, DecisionError::NotAwaiting { .. }), "{e}");
    drive(&mut r, &settings(p.clone()), now, &[]);
    let e = check_decision(&r, ask("nope", &plan, "alice"), &f, &p, now).unwrap_err();
    assert!(matches!(e, DecisionError::NoSuchStep { .. }), "{e}");
    let e = check_decision(&r, ask("apply.production", "f00", "alice"), &f, &p, now).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("the approval names plan f00 but the run's plan is {plan}")
    );
    let e = check_decision(&r, ask("apply.production", &plan, "ci-bot"), &f, &p, now).unwrap_err();
    assert_eq!(
        e.to_string(),
        "four-eyes: ci-bot requested this run and cannot approve it"
    );
    // Nor may the pull request's author, whatever the case of the name.
    let e = check_decision(&r, ask("apply.production", &plan, "Dev"), &f, &p, now).unwrap_err();
    assert_eq!(e.to_string(), "four-eyes: Dev wrote this change and cannot approve it");
    let e = check_decision(&r, ask("apply.production", &plan, "CI-Bot"), &f, &p, now).unwrap_err();
    assert!(matches!(e, DecisionError::SelfApproval { .. }), "{e}");
    let mut f2 = f.clone();
    f2.approvals.push(approval(
        "apply.production",
        &plan,
        "alice",
        Decision::Approve,
        now + Chrono::hours(1),
    ));
    let e = check_decision(&r, ask("apply.production", &plan, "alice"), &f2, &p, now).unwrap_err();
    assert!(matches!(e, DecisionError::AlreadyApproved { .. }), "{e}");
    // Once her approval expired she may approve again.
    f2.approvals[0].expires_at = now;
    check_decision(&r, ask("apply.production", &plan, "alice"), &f2, &p, now).unwrap();
}

#[test]
fn a_step_running_when_its_window_closes_continues_or_is_cancelled_by_policy() {
    for overrun in [Overrun::Continue, Overrun::Cancel] {
        let mut r = run(&["src/a.ts"], "high");
        let now = Utc::now();
        let p = policy(|c| {
            c.staging_soak_secs = 0;
            c.maintenance_windows.insert(
                "production".into(),
                crate::window::ScheduleConfig {
                    time_zone: "UTC".into(),
                    weekly: vec![],
                    once: vec![crate::window::Once {
                        start: (now - Chrono::minutes(5)).to_rfc3339(),
                        duration_minutes: 10,
                    }],
                    overrun,
                },
            );
        });
        let cfg = settings(p);
        let fx = drive(&mut r, &cfg, now, &["apply.production"]);
        let window = fx
            .iter()
            .find_map(|e| match e {
                Effect::SetTimer {
                    step,
                    kind: crate::engine::TimerKind::Window,
                    attempt,
                    due,
                } if step == "apply.production" => Some((*attempt, *due)),
                _ => None,
            })
            .expect("a window timer for the dispatched step");
        assert_eq!(window.1.timestamp(), (now + Chrono::minutes(5)).timestamp());
        let mut fx = Vec::new();
        r.fire_timer(
            "apply.production",
            crate::engine::TimerKind::Window,
            window.0,
            window.1,
            &cfg,
            &mut fx,
        );
        let i = idx(&r, "apply.production");
        assert!(fx.iter().any(|e| matches!(
            e,
            Effect::History {
                kind: "window_overrun",
                ..
            }
        )));
        match overrun {
            Overrun::Continue => assert_eq!(r.steps[i].status, StepStatus::Dispatched),
            Overrun::Cancel => {
                // No daemon had started it: nothing to undo.
                assert_eq!(r.steps[i].status, StepStatus::Failed);
                assert_eq!(r.steps[i].error.as_ref().unwrap().code, "window_closed");
                assert!(fx.iter().any(|e| matches!(e, Effect::Cancel(_))));
                assert_eq!(r.status, RunStatus::RollingBack);
            }
        }
    }
}

#[test]
fn a_pass_that_fails_a_gate_and_begins_the_rollback_dispatches_nothing_else() {
    let mut r = run(
        &["src/a.ts", "infra/main.tf", "network/ingress.yaml", "assets/logo.svg"],
        "standard",
    );
    let cfg = settings(policy(|c| c.staging_soak_secs = 0));
    let now = Utc::now();
    // Everything up to staging verification, which is left unanswered.
    let sent = drive(&mut r, &cfg, now, &["verify.staging"]);
    let job = sent
        .iter()
        .find_map(|e| match e {
            Effect::Dispatch(j) if j.step_id == "verify.staging" => Some((**j).clone()),
            _ => None,
        })
        .expect("verify.staging was sent");
    // Staging verified another image than the one built: apply.production fails
    // image-match in the same pass that makes network and cdn ready.
    let mut res = StepResult::for_job(&job, "d", baton_shared::protocol::ResultStatus::Succeeded);
    res.outputs = json!({"image_digest": "sha256:other", "regression_percent": 0})
        .as_object()
        .cloned()
        .unwrap();
    let mut fx = Vec::new();
    r.apply_result(&res, now, &cfg, &mut fx);
    assert_eq!(r.steps[idx(&r, "apply.production")].status, StepStatus::Failed);
    let sent: Vec<&str> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::Dispatch(j) if j.kind == baton_shared::protocol::JobKind::Execute => Some(j.step_id.as_str()),
            _ => None,
        })
        .collect();
    assert!(sent.is_empty(), "nothing is sent to be cancelled at once: {sent:?}");
    for step in ["network", "cdn"] {
        assert_eq!(r.steps[idx(&r, step)].attempt, 0, "{step} was never sent");
    }
    assert!(
        matches!(r.status, RunStatus::RollingBack | RunStatus::RolledBack),
        "{:?}",
        r.status
    );
}

#[test]
fn network_and_cdn_wait_for_the_production_gates_of_production_apply() {
    for risk in ["standard", "high"] {
        let mut r = run(&["src/a.ts", "network/ingress.yaml", "assets/logo.svg"], risk);
        // A soak minimum of an hour, which staging's 15 minutes do not meet (and,
        // for a high-risk change, no maintenance window configured).
        let cfg = settings(policy(|c| c.staging_soak_secs = 3600));
        let now = Utc::now();
        let fx = drive(&mut r, &cfg, now, &[]);
        let sent: Vec<&str> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::Dispatch(j) if j.zone == "production" && j.role != "backup" && j.role != "db-migration" => {
                    Some(j.step_id.as_str())
                }
                _ => None,
            })
            .collect();
        assert!(sent.is_empty(), "{risk}: sent to production before apply may: {sent:?}");
        for step in ["network", "cdn"] {
            let s = &r.steps[idx(&r, step)];
            assert_eq!(s.attempt, 0, "{risk}: {step} was not sent");
        }
        for step in ["apply.production", "network", "cdn"] {
            let s = &r.steps[idx(&r, step)];
            let error = s.error.as_ref().expect("the gate failed the step");
            assert!(
                error
                    .message
                    .starts_with("gate staging-soak: verify.staging watched staging run this change for 900 s"),
                "{risk} {step}: {error:?}"
            );
        }
    }
}

/// A backup step's outputs: a well-formed report of run `run_id`.
fn backup(id: &str, run_id: Uuid, verified: bool) -> serde_json::Value {
    let mut b = baton_shared::facts::BackupRef::example(id, run_id);
    b.verified = verified;
    serde_json::Value::Object(baton_shared::facts::FactSet::to_fields(&b))
}

#[test]
fn the_blast_radius_wants_an_approval_over_the_limit_and_for_unintended_changes() {
    let mut r = run(&["infra/main.tf"], "standard");
    let now = t("2026-12-01T10:00:00Z");
    let p = policy(|_| {});
    let facts = Facts::default();
    let changes = |n: usize| -> Vec<serde_json::Value> {
        (0..n)
            .map(|i| json!({"address": format!("terraform_data.r[{i}]"), "action": "create"}))
            .collect()
    };
    let plan = |n: usize, unintended: serde_json::Value| json!({"resources_changed": n, "changes": changes(n), "plan_sha256": "ab".repeat(32), "unintended": unintended});

    succeed(&mut r, "infra.staging.plan", plan(3, json!([])), now);
    match verdict(&r, "infra.staging", "blast-radius", &facts, &p, now) {
        Verdict::Pass { reason } => assert!(reason.contains("3 resources change (limit 5)"), "{reason}"),
        v => panic!("{v:?}"),
    }

    succeed(&mut r, "infra.staging.plan", plan(7, json!([])), now);
    match verdict(&r, "infra.staging", "blast-radius", &facts, &p, now) {
        Verdict::Hold { reason, approval, .. } => {
            assert!(approval);
            for want in [
                "7 resources change, above the blast radius limit of 5",
                "terraform_data.r[6] (create)",
                "saved plan sha256:abababababababab of infra.staging.plan",
            ] {
                assert!(reason.contains(want), "{want:?} not in {reason}");
            }
        }
        v => panic!("{v:?}"),
    }

    // One change, under the limit, but in a module the merge did not touch.
    let drift = json!([{"address": "module.db.terraform_data.x", "action": "update"}]);
    succeed(&mut r, "infra.staging.plan", plan(1, drift), now);
    match verdict(&r, "infra.staging", "blast-radius", &facts, &p, now) {
        Verdict::Hold { reason, approval, .. } => {
            assert!(approval);
            assert!(
                reason.contains("in modules this merge did not touch (module.db.terraform_data.x (update))"),
                "{reason}"
            );
        }
        v => panic!("{v:?}"),
    }
}
