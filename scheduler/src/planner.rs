//! The planner: turns a merge event and a pipeline into a [`Plan`], deciding for every
//! step whether it takes part and why. Pure: no I/O, the same inputs give the same plan
//! and the same plan hash.
//!
//! A step is left out when its zone is an environment promoted after the event's target
//! environment, or when its `when` condition is false. Left-out steps stay in the plan
//! (with the reason) so `baton plan` can explain them, and the needs of included steps
//! pass through them: if A needs B and B is left out, A needs what B needed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use baton_shared::protocol::{Fields, MergeEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::pipeline::{Pipeline, PipelineError, RetryPolicy, StepDef, When, canonical_sha256, path_glob};

/// Paths named in a reason before the rest is summarised as a count.
const REASON_PATHS: usize = 3;
const WIDTH: usize = 80;

/// Why no plan could be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("unknown environment {environment:?} (known environments: {})", known.join(", "))]
    UnknownEnvironment { environment: String, known: Vec<String> },
    #[error("invalid pipeline: {0}")]
    InvalidPipeline(#[from] PipelineError),
}

/// One pipeline step as planned for a particular merge event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedStep {
    pub id: String,
    pub role: String,
    pub zone: String,
    pub action: String,
    pub compensate: Option<String>,
    /// A compensation that cannot undo the step (`irreversible`, or its down
    /// migration failed) falls back to restoring the pre-deploy backup.
    #[serde(default)]
    pub restore_from_backup: bool,
    /// Failing, it flags the run for rollback review instead of rolling it back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub review_on_failure: bool,
    pub included: bool,
    /// Why the step is in or out, for people.
    pub reason: String,
    /// Included steps this one waits for, in pipeline order, after passing through
    /// left-out steps.
    pub needs: Vec<String>,
    pub gates: Vec<String>,
    pub timeout_secs: u64,
    pub retry: RetryPolicy,
    pub params: Fields,
}

/// What a run will do: every pipeline step, in pipeline order, in or out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub run_id: Uuid,
    pub service: String,
    pub environment: String,
    pub commit_sha: String,
    pub pipeline: String,
    pub pipeline_hash: String,
    pub steps: Vec<PlannedStep>,
    /// SHA-256 (hex) of the plan's canonical JSON with this field empty; approvals bind to it.
    pub hash: String,
}

/// Plans `event` against `pipeline`.
pub fn plan(event: &MergeEvent, pipeline: &Pipeline) -> Result<Plan, PlanError> {
    // Re-validated because a pipeline built in code skips `from_toml`, and a cycle would
    // loop the pass-through below.
    pipeline.validate()?;
    let target = pipeline
        .promotion
        .iter()
        .position(|env| env == &event.environment)
        .ok_or_else(|| PlanError::UnknownEnvironment {
            environment: event.environment.clone(),
            known: pipeline.promotion.clone(),
        })?;

    let mut decisions = Vec::with_capacity(pipeline.steps.len());
    for step in &pipeline.steps {
        let beyond = pipeline
            .promotion
            .iter()
            .position(|env| env == &step.zone)
            .is_some_and(|zone| zone > target);
        let decision = if beyond {
            (
                false,
                format!("zone {} is beyond target environment {}", step.zone, event.environment),
            )
        } else {
            match &step.when {
                None => (true, "always runs (no when condition)".to_owned()),
                Some(when) => evaluate(step, when, event)?,
            }
        };
        decisions.push(decision);
    }

    let included: BTreeMap<&str, bool> = pipeline
        .steps
        .iter()
        .zip(&decisions)
        .map(|(s, (inc, _))| (s.id.as_str(), *inc))
        .collect();
    let mut through = BTreeMap::new();
    let steps = pipeline
        .steps
        .iter()
        .zip(decisions)
        .map(|(step, (included_here, reason))| {
            let mut needs = BTreeSet::new();
            for need in &step.needs {
                effective(pipeline, &included, need, &mut through, &mut needs);
            }
            PlannedStep {
                id: step.id.clone(),
                role: step.role.clone(),
                zone: step.zone.clone(),
                action: step.action.clone(),
                compensate: step.compensate.clone(),
                restore_from_backup: step.restore_from_backup,
                review_on_failure: step.review_on_failure,
                included: included_here,
                reason,
                needs: in_pipeline_order(pipeline, &needs),
                gates: step.gates.clone(),
                timeout_secs: step.timeout_secs,
                retry: step.retry.clone(),
                params: step.params.clone(),
            }
        })
        .collect();

    let mut plan = Plan {
        run_id: event.run_id(),
        service: event.service.clone(),
        environment: event.environment.clone(),
        commit_sha: event.commit_sha.clone(),
        pipeline: pipeline.name.clone(),
        pipeline_hash: pipeline.hash(),
        steps,
        hash: String::new(),
    };
    plan.hash = plan.computed_hash();
    Ok(plan)
}

/// Adds to `out` the included steps that stand for `need`: itself if included, otherwise
/// (memoised in `through`) whatever it needed, recursively. Terminates because the
/// pipeline was validated acyclic.
fn effective<'p>(
    pipeline: &'p Pipeline,
    included: &BTreeMap<&str, bool>,
    need: &'p str,
    through: &mut BTreeMap<&'p str, BTreeSet<&'p str>>,
    out: &mut BTreeSet<&'p str>,
) {
    if included.get(need).copied().unwrap_or(false) {
        out.insert(need);
        return;
    }
    if let Some(known) = through.get(need) {
        out.extend(known.iter().copied());
        return;
    }
    let mut resolved = BTreeSet::new();
    if let Some(step) = pipeline.step(need) {
        for inner in &step.needs {
            effective(pipeline, included, inner, through, &mut resolved);
        }
    }
    out.extend(resolved.iter().copied());
    through.insert(need, resolved);
}

fn in_pipeline_order(pipeline: &Pipeline, ids: &BTreeSet<&str>) -> Vec<String> {
    pipeline
        .steps
        .iter()
        .filter(|s| ids.contains(s.id.as_str()))
        .map(|s| s.id.clone())
        .collect()
}

/// Decides a `when` condition and explains the decision.
fn evaluate(step: &StepDef, when: &When, event: &MergeEvent) -> Result<(bool, String), PlanError> {
    let compile = |field: &'static str, globs: &[String]| {
        globs
            .iter()
            .map(|g| {
                path_glob(g).map_err(|e| {
                    PlanError::InvalidPipeline(PipelineError::BadGlob {
                        step: step.id.clone(),
                        field,
                        glob: g.clone(),
                        message: e.kind().to_string(),
                    })
                })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let paths = compile("when.paths", &when.paths)?;
    let except = compile("when.except", &when.except)?;

    // Sorted so the reason, and with it the plan hash, ignores the order CI lists paths in.
    let changed: BTreeSet<&str> = event.changed_paths.iter().map(String::as_str).collect();
    // Each matching path is credited to the first pattern it matches.
    let mut matched: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    let mut excluded: Vec<&str> = Vec::new();
    let mut excluded_by: BTreeSet<usize> = BTreeSet::new();
    for path in changed {
        let Some(pattern) = paths.iter().position(|m| m.is_match(path)) else {
            continue;
        };
        let hits: Vec<usize> = (0..except.len()).filter(|&i| except[i].is_match(path)).collect();
        if hits.is_empty() {
            matched.entry(pattern).or_default().push(path);
        } else {
            excluded.push(path);
            excluded_by.extend(hits);
        }
    }
    let flags: Vec<&str> = when
        .flags
        .iter()
        .filter(|f| event.flags.contains(f))
        .map(String::as_str)
        .collect();

    if !matched.is_empty() || !flags.is_empty() {
        let mut parts = Vec::new();
        if !matched.is_empty() {
            let listed: Vec<String> = matched
                .iter()
                .map(|(&i, hits)| format!("{}: {}", when.paths[i], summarise(hits)))
                .collect();
            parts.push(format!("changed paths match {}", listed.join("; ")));
        }
        match flags.as_slice() {
            [] => {}
            [one] => parts.push(format!("flag {one} is set")),
            many => parts.push(format!("flags {} are set", many.join(", "))),
        }
        return Ok((true, parts.join("; ")));
    }

    let mut parts = Vec::new();
    if !when.paths.is_empty() {
        if excluded.is_empty() {
            parts.push(format!("no changed path matches {}", when.paths.join(", ")));
        } else {
            let by: Vec<&str> = excluded_by.iter().map(|&i| when.except[i].as_str()).collect();
            parts.push(format!(
                "changed paths matching {} are all excluded by {}: {}",
                when.paths.join(", "),
                by.join(", "),
                summarise(&excluded)
            ));
        }
    }
    match when.flags.as_slice() {
        [] => {}
        [one] => parts.push(format!("flag {one} is not set")),
        many => parts.push(format!("none of flags {} is set", many.join(", "))),
    }
    Ok((false, parts.join(" and ")))
}

fn summarise(paths: &[&str]) -> String {
    let shown = paths[..paths.len().min(REASON_PATHS)].join(", ");
    match paths.len().saturating_sub(REASON_PATHS) {
        0 => shown,
        more => format!("{shown} (+{more} more)"),
    }
}

impl Plan {
    pub fn step(&self, id: &str) -> Option<&PlannedStep> {
        self.steps.iter().find(|s| s.id == id)
    }

    /// The steps that will run, in pipeline order.
    pub fn included(&self) -> impl Iterator<Item = &PlannedStep> {
        self.steps.iter().filter(|s| s.included)
    }

    /// The hash this plan should carry: SHA-256 of its canonical JSON with `hash` empty.
    /// A stored plan whose `hash` differs was altered.
    pub fn computed_hash(&self) -> String {
        let mut unhashed = self.clone();
        unhashed.hash.clear();
        canonical_sha256(&unhashed)
    }

    /// The plan explained for a terminal, at most 80 columns wide: a header, then per step
    /// a line with in/out, id, role@zone and needs, and the reason indented below it.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let included = self.included().count();
        let header = [
            ("run", self.run_id.to_string()),
            ("service", self.service.clone()),
            ("env", self.environment.clone()),
            ("commit", self.commit_sha.clone()),
            (
                "pipeline",
                format!("{} ({})", self.pipeline, short(&self.pipeline_hash)),
            ),
            ("plan", self.hash.clone()),
            ("steps", format!("{included} of {} included", self.steps.len())),
        ];
        for (label, value) in header {
            push_wrapped(&mut out, &format!("{label:<9}{value}"), 9);
        }
        out.push('\n');

        let id_width = self.steps.iter().map(|s| s.id.len()).max().unwrap_or(0);
        let at_width = self
            .steps
            .iter()
            .map(|s| s.role.len() + 1 + s.zone.len())
            .max()
            .unwrap_or(0);
        for step in &self.steps {
            let mark = if step.included { "in" } else { "out" };
            let at = format!("{}@{}", step.role, step.zone);
            let needs = if step.needs.is_empty() {
                "-".to_owned()
            } else {
                step.needs.join(", ")
            };
            let line = format!("{mark:<4} {:<id_width$}  {at:<at_width$}  needs {needs}", step.id);
            // Continued needs line up under the first one while that leaves room for them.
            let needs_column = 4 + 1 + id_width + 2 + at_width + 2 + "needs ".len();
            let indent = if WIDTH.saturating_sub(needs_column) >= 20 {
                needs_column
            } else {
                5
            };
            push_wrapped(&mut out, &line, indent);
            push_wrapped(&mut out, &format!("     {}", step.reason), 5);
        }
        out
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Appends `text` word-wrapped to [`WIDTH`] columns, continuation lines indented by
/// `indent`; a word longer than a line is split.
fn push_wrapped(out: &mut String, text: &str, indent: usize) {
    let pad = " ".repeat(indent);
    let mut prefix = "";
    let mut rest = text;
    loop {
        let room = WIDTH.saturating_sub(prefix.len()).max(1);
        let Some((limit, _)) = rest.char_indices().nth(room) else {
            let _ = writeln!(out, "{}", format!("{prefix}{rest}").trim_end());
            return;
        };
        // Break at the last space that fits, but never inside the leading indentation
        // (which would loop) and keep the spacing between columns as it is.
        let space = if rest[limit..].starts_with(' ') {
            Some(limit)
        } else {
            rest[..limit].rfind(' ')
        };
        let (line, next) = match space {
            Some(at) if !rest[..at].trim().is_empty() => (&rest[..at], rest[at..].trim_start()),
            _ => (&rest[..limit], &rest[limit..]),
        };
        let _ = writeln!(out, "{}", format!("{prefix}{line}").trim_end());
        if next.is_empty() {
            return;
        }
        prefix = &pad;
        rest = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(environment: &str, paths: &[&str], flags: &[&str]) -> MergeEvent {
        serde_json::from_value(serde_json::json!({
            "v": 1,
            "service": "shop-api",
            "environment": environment,
            "repository": "git@example.org:shop/api.git",
            "commit_sha": "0123456789abcdef0123456789abcdef01234567",
            "pull_request": {"number": 42, "title": "Add orders", "author": "dev",
                "approvals": [{"by": "marta", "at": "2026-11-26T09:00:00Z"}]},
            "changed_paths": paths,
            "flags": flags,
            "risk": "standard",
            "requested_by": "ci",
            "ci_run_url": "https://ci.example.org/runs/1"
        }))
        .unwrap()
    }

    fn seed_plan(paths: &[&str]) -> Plan {
        plan(&event("production", paths, &[]), &Pipeline::seed()).unwrap()
    }

    fn included(plan: &Plan) -> Vec<&str> {
        plan.included().map(|s| s.id.as_str()).collect()
    }

    fn needs<'a>(plan: &'a Plan, id: &str) -> Vec<&'a str> {
        plan.step(id).unwrap().needs.iter().map(String::as_str).collect()
    }

    #[test]
    fn seed_plan_for_app_only_runs_build_verify_apply_and_backups() {
        let p = seed_plan(&["src/app.ts"]);
        assert_eq!(
            included(&p),
            [
                "build",
                "backup.pre",
                "verify.staging",
                "apply.production",
                "backup.post"
            ]
        );
        // db.* and infra.* are skipped: verify.staging waits for the build, and through the
        // skipped db.production for the pre-deploy backup it needed.
        assert_eq!(needs(&p, "verify.staging"), ["build", "backup.pre"]);
        assert_eq!(needs(&p, "apply.production"), ["backup.pre", "verify.staging"]);
        assert_eq!(needs(&p, "backup.post"), ["apply.production"]);
        for id in [
            "db.staging",
            "db.production",
            "infra.staging.plan",
            "infra.staging",
            "infra.production.plan",
            "infra.production",
            "network",
            "cdn",
        ] {
            assert!(!p.step(id).unwrap().included, "{id} should be skipped");
        }
        assert_eq!(
            p.step("db.staging").unwrap().reason,
            "no changed path matches drizzle/migrations/**"
        );
        assert_eq!(
            p.step("network").unwrap().reason,
            "no changed path matches network/** and flag network_change is not set"
        );
        assert_eq!(p.step("build").unwrap().reason, "changed paths match **: src/app.ts");
    }

    #[test]
    fn seed_plan_for_migrations_only_skips_build_and_apply() {
        let p = seed_plan(&[
            "drizzle/migrations/0001_orders.sql",
            "drizzle/migrations/meta/_journal.json",
        ]);
        assert_eq!(
            included(&p),
            [
                "backup.pre",
                "db.staging",
                "db.production",
                "verify.staging",
                "backup.post"
            ]
        );
        assert_eq!(needs(&p, "db.production"), ["backup.pre", "db.staging"]);
        // build and infra.* are skipped, so verify.staging waits only for the migrations.
        assert_eq!(needs(&p, "verify.staging"), ["db.staging", "db.production"]);
        // apply.production is skipped: the post-deploy backup follows what it would have.
        assert_eq!(needs(&p, "backup.post"), ["backup.pre", "verify.staging"]);
        assert_eq!(
            p.step("db.staging").unwrap().reason,
            "changed paths match drizzle/migrations/**: drizzle/migrations/0001_orders.sql, \
             drizzle/migrations/meta/_journal.json"
        );
        assert!(
            p.step("build")
                .unwrap()
                .reason
                .starts_with("changed paths matching ** are all excluded by drizzle/**: "),
            "{}",
            p.step("build").unwrap().reason
        );
    }

    #[test]
    fn seed_plan_for_infra_only_runs_infra_with_backup_and_verify() {
        let p = seed_plan(&["infra/main.tf", "infra/production.tfvars"]);
        assert_eq!(
            included(&p),
            [
                "backup.pre",
                "infra.staging.plan",
                "infra.staging",
                "infra.production.plan",
                "infra.production",
                "verify.staging",
                "backup.post"
            ]
        );
        // The staging plan needs the skipped db.production, which needed the backup.
        assert_eq!(needs(&p, "infra.staging.plan"), ["backup.pre"]);
        assert_eq!(needs(&p, "infra.staging"), ["infra.staging.plan"]);
        assert_eq!(needs(&p, "infra.production.plan"), ["infra.staging"]);
        assert_eq!(needs(&p, "infra.production"), ["infra.production.plan"]);
        assert_eq!(
            needs(&p, "verify.staging"),
            [
                "backup.pre",
                "infra.staging.plan",
                "infra.staging",
                "infra.production.plan",
                "infra.production"
            ]
        );
        assert_eq!(needs(&p, "backup.post"), ["backup.pre", "verify.staging"]);
    }

    #[test]
    fn seed_plan_for_everything_includes_all_steps() {
        let pipeline = Pipeline::seed();
        let p = seed_plan(&[
            "src/app.ts",
            "drizzle/migrations/0002_x.sql",
            "infra/main.tf",
            "network/dns.yaml",
            "assets/logo.svg",
        ]);
        assert_eq!(p.included().count(), 13);
        // Nothing is skipped, so effective needs are exactly the declared ones.
        for step in &pipeline.steps {
            assert_eq!(p.step(&step.id).unwrap().needs, step.needs, "{}", step.id);
        }
        assert_eq!(
            p.step("cdn").unwrap().reason,
            "changed paths match assets/**: assets/logo.svg"
        );
    }

    #[test]
    fn seed_plan_for_nothing_deployable_skips_every_step() {
        let p = seed_plan(&["README.md", "docs/runbook.md", "docs/diagram.png"]);
        assert_eq!(p.included().count(), 0);
        assert_eq!(
            p.step("backup.pre").unwrap().reason,
            "changed paths matching ** are all excluded by docs/**, **/*.md: \
             README.md, docs/diagram.png, docs/runbook.md"
        );
    }

    #[test]
    fn network_change_flag_runs_network_after_staging_verification() {
        let p = plan(&event("production", &[], &["network_change"]), &Pipeline::seed()).unwrap();
        assert_eq!(included(&p), ["verify.staging", "network"]);
        assert_eq!(needs(&p, "network"), ["verify.staging"]);
        assert_eq!(p.step("network").unwrap().reason, "flag network_change is set");
    }

    #[test]
    fn staging_target_skips_production_steps() {
        let p = plan(
            &event("staging", &["src/app.ts", "drizzle/migrations/0001_x.sql"], &[]),
            &Pipeline::seed(),
        )
        .unwrap();
        assert_eq!(included(&p), ["build", "db.staging", "verify.staging"]);
        for id in ["backup.pre", "db.production", "apply.production", "backup.post"] {
            assert_eq!(
                p.step(id).unwrap().reason,
                "zone production is beyond target environment staging",
                "{id}"
            );
        }
        // db.staging loses nothing; verify.staging no longer waits on production steps.
        assert_eq!(needs(&p, "verify.staging"), ["build", "db.staging"]);
    }

    #[test]
    fn unknown_environment_is_refused() {
        let e = plan(&event("dev", &["src/app.ts"], &[]), &Pipeline::seed()).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"unknown environment "dev" (known environments: staging, production)"#
        );
    }

    #[test]
    fn plan_hash_is_deterministic() {
        let a = seed_plan(&["src/app.ts", "src/orders.ts"]);
        let b = seed_plan(&["src/orders.ts", "src/app.ts"]);
        assert_eq!(a, b);
        assert_eq!(a.hash.len(), 64);
        assert_eq!(a.hash, a.computed_hash());
    }

    #[test]
    fn plan_hash_changes_with_inclusion() {
        let app = seed_plan(&["src/app.ts"]);
        let app_and_cdn = seed_plan(&["src/app.ts", "public/favicon.ico"]);
        assert!(app_and_cdn.step("cdn").unwrap().included);
        assert_ne!(app.hash, app_and_cdn.hash);
    }

    #[test]
    fn plan_records_the_run_and_the_pipeline() {
        let ev = event("production", &["src/app.ts"], &[]);
        let pipeline = Pipeline::seed();
        let p = plan(&ev, &pipeline).unwrap();
        assert_eq!(p.run_id, ev.run_id());
        assert_eq!(p.pipeline, "seed");
        assert_eq!(p.pipeline_hash, pipeline.hash());
        assert_eq!(p.steps.len(), pipeline.steps.len());
        let apply = p.step("apply.production").unwrap();
        assert_eq!(apply.compensate.as_deref(), Some("rollback-replicaset"));
        assert_eq!(apply.params["max_surge"], 1);
    }

    #[test]
    fn plan_round_trips_through_json() {
        let p = seed_plan(&["src/app.ts", "assets/app.css"]);
        let back: Plan = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.computed_hash(), p.hash);
    }

    #[test]
    fn hand_built_cyclic_pipeline_is_refused() {
        let mut pipeline = Pipeline::seed();
        pipeline.steps[2].needs.push("verify.staging".into());
        let e = plan(&event("production", &["src/app.ts"], &[]), &pipeline).unwrap_err();
        assert!(e.to_string().starts_with("invalid pipeline: step "), "{e}");
    }

    #[test]
    fn render_text_fits_80_columns_and_explains_each_step() {
        let p = seed_plan(&[
            "src/app.ts",
            "drizzle/migrations/0002_a_rather_long_migration_name_for_wrapping.sql",
            "drizzle/migrations/0003_x.sql",
            "drizzle/migrations/0004_y.sql",
            "drizzle/migrations/0005_z.sql",
        ]);
        let text = p.render_text();
        for line in text.lines() {
            assert!(line.chars().count() <= 80, "too wide: {line:?}");
        }
        assert!(text.contains(&p.run_id.to_string()));
        assert!(text.contains(&p.hash));
        assert!(text.contains("shop-api") && text.contains("0123456789abcdef0123456789abcdef01234567"));
        assert!(text.contains("(+1 more)"), "{text}");
        for step in &p.steps {
            let line = text
                .lines()
                .find(|l| l.split_whitespace().nth(1) == Some(step.id.as_str()))
                .unwrap_or_else(|| panic!("no line for {}:\n{text}", step.id));
            let mark = if step.included { "in" } else { "out" };
            assert!(line.starts_with(mark), "{line}");
            assert!(line.contains(&format!("{}@{}", step.role, step.zone)), "{line}");
        }
    }

    #[test]
    fn wrapping_splits_words_longer_than_a_line() {
        let mut out = String::new();
        push_wrapped(&mut out, &format!("     {}", "x".repeat(200)), 5);
        assert!(out.lines().all(|l| l.chars().count() <= 80), "{out}");
        assert_eq!(out.chars().filter(|&c| c == 'x').count(), 200);
    }
}
