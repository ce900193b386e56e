//! infrastructure against the real Terraform CLI and its `pg` backend on the
//! real PostgreSQL: each test has a database of its own (dropped at the end).

use std::str::FromStr;

use baton_infrastructure::{ApplyOutputs, InfraConfig, Infrastructure, PlanOutputs, RevertOutputs};
use baton_shared::facts::FactSet;
use baton_shared::protocol::{Fields, JobKind, StepError, StepJob};
use baton_shared::secret::Secret;
use baton_shared::testing::{GitRepo, TempDir};
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};
use uuid::Uuid;

const ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const SCHEMA: &str = "tf_staging_shop_api";

/// A database and a work directory of the test's own.
struct Env {
    db: String,
    work: TempDir,
}

impl Env {
    async fn new() -> Self {
        let db = format!("baton_infra_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(ADMIN).await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{db}\"")))
            .execute(&mut admin)
            .await
            .unwrap();
        Self {
            db,
            work: TempDir::new("infra-work"),
        }
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:5432/{}?sslmode=disable", self.db)
    }

    fn role(&self) -> Infrastructure {
        let config = InfraConfig {
            repos_dir: self.work.path().join("repos"),
            work_dir: self.work.path().to_owned(),
            state_url: Secret::new(self.url()),
            ..InfraConfig::default()
        };
        config.validate().unwrap();
        Infrastructure::new(config)
    }

    async fn connect(&self) -> PgConnection {
        PgConnectOptions::from_str(&self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Resource addresses in the current state, with their `input`'s value.
    async fn resources(&self) -> Vec<(String, Value)> {
        let mut c = self.connect().await;
        let data: String = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT data FROM {SCHEMA}.states WHERE name = 'default'"
        )))
        .fetch_one(&mut c)
        .await
        .unwrap();
        let state: Value = serde_json::from_str(&data).unwrap();
        let mut out = Vec::new();
        for r in state["resources"].as_array().unwrap() {
            for inst in r["instances"].as_array().unwrap() {
                let key = match &inst["index_key"] {
                    Value::Null => String::new(),
                    k => format!("[{k}]"),
                };
                out.push((
                    format!("{}.{}{key}", r["type"].as_str().unwrap(), r["name"].as_str().unwrap()),
                    // terraform_data keeps `input` as a dynamic value: {type, value}.
                    inst["attributes"]["input"]["value"].clone(),
                ));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let db = self.db.clone();
        // The runtime of the test may be gone: drop the database on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(ADMIN).await {
                    let _ = sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)")))
                        .execute(&mut admin)
                        .await;
                }
            });
        })
        .join();
    }
}

/// Terraform configuration: `n` resources `terraform_data.r[i]` with input
/// `"<tag>-i"`, a `terraform_data.db` replaced when `db_version` changes, and an
/// output.
fn config(n: usize, tag: &str, db_version: &str, output: &str) -> String {
    format!(
        "terraform {{\n  backend \"pg\" {{}}\n}}\n\
         resource \"terraform_data\" \"r\" {{\n  count = {n}\n  input = \"{tag}-${{count.index}}\"\n}}\n\
         resource \"terraform_data\" \"db\" {{\n  input = \"database\"\n  triggers_replace = \"{db_version}\"\n}}\n\
         output \"label\" {{\n  value = \"{output}\"\n}}\n"
    )
}

fn commit(repo: &GitRepo, text: &str) -> String {
    repo.write("infra/main.tf", text);
    repo.commit("infra")
}

fn job(repo: &GitRepo, commit: &str, run: Uuid, step: &str, action: &str) -> StepJob {
    let mut job = StepJob::example("staging", "infrastructure", action)
        .with_param("dir", "infra")
        .with_param("protected", serde_json::json!(["terraform_data.db"]));
    job.run_id = run;
    job.step_id = step.to_owned();
    job.deploy.repository = repo.url();
    job.deploy.commit_sha = commit.to_owned();
    job
}

fn parse<T: DeserializeOwned>(fields: Fields) -> T {
    serde_json::from_value(Value::Object(fields)).unwrap()
}

async fn plan(role: &Infrastructure, repo: &GitRepo, commit: &str, run: Uuid) -> (PlanOutputs, Fields) {
    let fields = role
        .run(&job(repo, commit, run, "infra.staging.plan", "plan"))
        .await
        .unwrap_or_else(|e| panic!("plan: {e}"));
    (parse(fields.clone()), fields)
}

async fn apply(
    role: &Infrastructure,
    repo: &GitRepo,
    commit: &str,
    run: Uuid,
    plan: &Fields,
) -> Result<ApplyOutputs, StepError> {
    let job = job(repo, commit, run, "infra.staging", "apply").with_input("infra.staging.plan", plan.clone());
    role.run(&job).await.map(parse).map_err(|e| e.to_step_error())
}

async fn plan_and_apply(role: &Infrastructure, repo: &GitRepo, commit: &str, run: Uuid) -> ApplyOutputs {
    let (_, p) = plan(role, repo, commit, run).await;
    apply(role, repo, commit, run, &p).await.unwrap()
}

#[tokio::test]
async fn small_changes_apply_and_compensation_re_applies_the_previous_commit() {
    let env = Env::new().await;
    let role = env.role();
    let repo = GitRepo::new();
    let first = commit(&repo, &config(2, "a", "v1", "one"));

    let (p, _) = plan(&role, &repo, &first, Uuid::new_v4()).await;
    assert_eq!(p.facts.resources_changed, 3, "{p:?}");
    assert!(!p.over_limit);
    assert_eq!(p.facts.plan_sha256.as_ref().map(String::len), Some(64));
    let run1 = Uuid::new_v4();
    let a1 = plan_and_apply(&role, &repo, &first, run1).await;
    assert_eq!(a1.previous_commit, None);
    assert_eq!(env.resources().await.len(), 3);

    // The second deploy changes one input and adds a resource.
    let second = commit(&repo, &config(3, "b", "v1", "one"));
    let run2 = Uuid::new_v4();
    let a2 = plan_and_apply(&role, &repo, &second, run2).await;
    assert_eq!(a2.previous_commit.as_deref(), Some(first.as_str()));
    assert_eq!(a2.state_before, a1.state_after);
    assert_eq!(a2.facts.add, 1);
    assert_eq!(a2.facts.change, 2);
    assert_eq!(env.resources().await.len(), 4);

    // A redelivered apply reports the first one's outputs and applies nothing again.
    let again = apply(&role, &repo, &second, run2, &Fields::new()).await.unwrap();
    assert_eq!(again, a2);

    // Compensation of the second run: the first commit's resources, by a plan.
    let mut undo = job(&repo, &second, run2, "infra.staging", "reapply-previous");
    undo.kind = JobKind::Compensate;
    let r: RevertOutputs = parse(role.run(&undo).await.unwrap());
    assert!(r.reverted);
    assert_eq!(r.commit.as_deref(), Some(first.as_str()));
    assert_eq!((r.facts.destroy, r.facts.change), (1, 2), "{r:?}");
    let now = env.resources().await;
    assert_eq!(
        now.iter().map(|(a, i)| format!("{a}={i}")).collect::<Vec<_>>(),
        [
            "terraform_data.db=\"database\"",
            "terraform_data.r[0]=\"a-0\"",
            "terraform_data.r[1]=\"a-1\""
        ]
    );
    // Running the compensation again does nothing more.
    let r2: RevertOutputs = parse(role.run(&undo).await.unwrap());
    assert_eq!(r2, r);

    // The first run's compensation (no earlier apply) destroys what it made,
    // but not after the state moved on without it.
    let mut undo1 = job(&repo, &first, run1, "infra.staging", "reapply-previous");
    undo1.kind = JobKind::Compensate;
    let e = role.run(&undo1).await.unwrap_err().to_step_error();
    assert_eq!(e.code, "state_moved", "{}", e.message);
}

#[tokio::test]
async fn a_large_change_is_reported_over_the_limit_and_applies_exactly_the_saved_plan() {
    let env = Env::new().await;
    let role = env.role();
    let repo = GitRepo::new();
    let c = commit(&repo, &config(6, "a", "v1", "one"));
    let run = Uuid::new_v4();
    let (p, fields) = plan(&role, &repo, &c, run).await;
    assert_eq!(p.facts.resources_changed, 7);
    assert!(p.over_limit);
    assert!(
        p.facts
            .changes
            .iter()
            .any(|ch| ch.address == "terraform_data.r[5]" && ch.action == "create")
    );

    // Without a plan step the apply refuses what needs an approval.
    let e = role
        .run(&job(&repo, &c, Uuid::new_v4(), "infra.staging", "apply"))
        .await
        .unwrap_err()
        .to_step_error();
    assert_eq!(e.code, "approval_required");
    assert!(
        e.message
            .contains("7 resources change, over the blast radius limit of 5"),
        "{}",
        e.message
    );

    // A plan hash that is not the saved one is refused.
    let mut forged = fields.clone();
    forged.insert("plan_sha256".into(), Value::String("0".repeat(64)));
    let e = apply(&role, &repo, &c, run, &forged).await.unwrap_err();
    assert_eq!(e.code, "plan_missing", "{}", e.message);

    let a = apply(&role, &repo, &c, run, &fields).await.unwrap();
    assert_eq!(a.facts.plan_sha256, p.facts.plan_sha256);
    assert_eq!(env.resources().await.len(), 7);
}

#[tokio::test]
async fn a_stale_plan_is_re_planned_and_a_different_or_large_one_asks_again() {
    let env = Env::new().await;
    let role = env.role();
    let repo = GitRepo::new();
    let base = commit(&repo, &config(1, "a", "v1", "base"));
    plan_and_apply(&role, &repo, &base, Uuid::new_v4()).await;

    // Planned, then the state changes in a way that leaves its changes the same
    // (another deploy changes only an output): applied, with a warning.
    let wanted = commit(&repo, &config(2, "a", "v1", "base"));
    let run = Uuid::new_v4();
    let (_, planned) = plan(&role, &repo, &wanted, run).await;
    let other = commit(&repo, &config(1, "a", "v1", "other output"));
    plan_and_apply(&role, &repo, &other, Uuid::new_v4()).await;
    let a = apply(&role, &repo, &wanted, run, &planned).await.unwrap();
    assert!(a.warnings.iter().any(|w| w.contains("went stale")), "{:?}", a.warnings);
    assert_eq!(env.resources().await.len(), 3);

    // Planned, then the state changes so that a new plan differs: nothing is
    // applied; the new plan is saved and reported for the gates to decide on.
    let wanted = commit(&repo, &config(3, "a", "v1", "base"));
    let run = Uuid::new_v4();
    let (_, planned) = plan(&role, &repo, &wanted, run).await;
    let other = commit(&repo, &config(2, "changed", "v1", "base"));
    plan_and_apply(&role, &repo, &other, Uuid::new_v4()).await;
    let e = apply(&role, &repo, &wanted, run, &planned).await.unwrap_err();
    assert_eq!(e.code, "approval_required_again", "{}", e.message);
    assert!(!e.retryable);
    assert!(e.message.contains("terraform_data.r[0] (update)"), "{}", e.message);
    let replanned = e.outputs.clone();
    let fresh = baton_shared::facts::TerraformPlanned::read("infra.staging", &replanned).unwrap();
    let fresh_sha = fresh.plan_sha256.clone().expect("the new plan's hash");
    assert_ne!(
        Some(&fresh_sha),
        planned
            .get("plan_sha256")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .as_ref()
    );
    assert!(e.message.contains(&fresh_sha), "{}", e.message);
    assert_eq!((fresh.add, fresh.change), (1, 2), "{fresh:?}");
    assert_eq!(env.resources().await.len(), 3);
    // It applied nothing, so its compensation re-applies nothing either (and
    // does not undo the other deploy's change).
    let mut undo = job(&repo, &wanted, run, "infra.staging", "reapply-previous");
    undo.kind = JobKind::Compensate;
    let r: RevertOutputs = parse(role.run(&undo).await.unwrap());
    assert!(!r.reverted, "{r:?}");
    let inputs: Vec<_> = env.resources().await.into_iter().map(|(_, i)| i).collect();
    assert!(inputs.contains(&Value::String("changed-0".into())), "{inputs:?}");

    // A forged report of the step's own plan is refused.
    let mut forged = replanned.clone();
    forged.insert("plan_sha256".into(), Value::String("1".repeat(64)));
    let e = role
        .run(&job(&repo, &wanted, run, "infra.staging", "apply").with_input("infra.staging", forged))
        .await
        .unwrap_err()
        .to_step_error();
    assert_eq!(e.code, "plan_missing", "{}", e.message);
    assert!(e.message.contains(&fresh_sha), "{}", e.message);
    assert_eq!(env.resources().await.len(), 3);

    // Approved (the scheduler sends the step's own report back among its
    // inputs): exactly the saved new plan is applied.
    let again = job(&repo, &wanted, run, "infra.staging", "apply")
        .with_input("infra.staging.plan", planned.clone())
        .with_input("infra.staging", replanned.clone());
    let a: ApplyOutputs = role.run(&again).await.map(parse).unwrap();
    assert_eq!(a.facts.plan_sha256.as_deref(), Some(fresh_sha.as_str()));
    let inputs: Vec<_> = env.resources().await.into_iter().map(|(_, i)| i).collect();
    assert_eq!(inputs.len(), 4);
    assert!(inputs.contains(&Value::String("a-2".into())), "{inputs:?}");
}

#[tokio::test]
async fn a_held_state_lock_names_its_holder_and_times_out_retryably() {
    let env = Env::new().await;
    let role = env.role();
    let repo = GitRepo::new();
    let c = commit(&repo, &config(1, "a", "v1", "one"));
    plan_and_apply(&role, &repo, &c, Uuid::new_v4()).await;

    let mut holder = PgConnectOptions::from_str(&env.url())
        .unwrap()
        .application_name("ops-console")
        .connect()
        .await
        .unwrap();
    let id: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT id FROM {SCHEMA}.states WHERE name = 'default'"
    )))
    .fetch_one(&mut holder)
    .await
    .unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut holder)
        .await
        .unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(id)
        .execute(&mut holder)
        .await
        .unwrap();

    let job = job(&repo, &c, Uuid::new_v4(), "infra.staging.plan", "plan").with_param("lock_timeout_secs", 1);
    let e = role.run(&job).await.unwrap_err().to_step_error();
    assert_eq!(e.code, "state_locked");
    assert!(e.retryable);
    assert!(
        e.message.contains(&format!("pid {pid}"))
            && e.message.contains("\"ops-console\"")
            && e.message.contains(SCHEMA),
        "{}",
        e.message
    );
    holder.close().await.unwrap();
    // Released: the same job goes through.
    role.run(&job).await.unwrap();
}

#[tokio::test]
async fn protected_replacements_and_local_state_are_refused() {
    let env = Env::new().await;
    let role = env.role();
    let repo = GitRepo::new();
    let c = commit(&repo, &config(1, "a", "v1", "one"));
    plan_and_apply(&role, &repo, &c, Uuid::new_v4()).await;

    let replace = commit(&repo, &config(1, "a", "v2", "one"));
    let e = role
        .run(&job(&repo, &replace, Uuid::new_v4(), "infra.staging.plan", "plan"))
        .await
        .unwrap_err()
        .to_step_error();
    assert_eq!(e.code, "unintended_change");
    assert!(e.message.contains("terraform_data.db (replace)"), "{}", e.message);

    let local = commit(&repo, "resource \"terraform_data\" \"x\" {}\n");
    let e = role
        .run(&job(&repo, &local, Uuid::new_v4(), "infra.staging.plan", "plan"))
        .await
        .unwrap_err()
        .to_step_error();
    assert_eq!(e.code, "local_backend");
    assert!(
        e.message.contains("in a local file") && e.message.contains("staging"),
        "{}",
        e.message
    );
}

/// A change the merge did not ask for — here drift made outside Baton in a
/// module the merge does not touch — is named in the plan's `unintended`.
#[tokio::test]
async fn changes_in_modules_the_merge_did_not_touch_are_reported_as_unintended() {
    let env = Env::new().await;
    let role = env.role();
    let repo = GitRepo::new();
    let module = |input: &str| format!("resource \"terraform_data\" \"x\" {{\n  input = \"{input}\"\n}}\n");
    repo.write(
        "infra/main.tf",
        "terraform {\n  backend \"pg\" {}\n}\nmodule \"db\" {\n  source = \"./modules/db\"\n}\nmodule \"cdn\" {\n  source = \"./modules/cdn\"\n}\n",
    );
    repo.write("infra/modules/db/main.tf", module("db-1"));
    repo.write("infra/modules/cdn/main.tf", module("cdn-1"));
    let first = repo.commit("two modules");
    plan_and_apply(&role, &repo, &first, Uuid::new_v4()).await;

    // Someone applies another db input by hand, outside Baton.
    let by_hand = TempDir::new("infra-by-hand");
    for (path, text) in [
        (
            "main.tf",
            std::fs::read_to_string(repo.path().join("infra/main.tf")).unwrap(),
        ),
        ("modules/db/main.tf", module("db-by-hand")),
        ("modules/cdn/main.tf", module("cdn-1")),
    ] {
        let p = by_hand.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    apply_by_hand(&env, by_hand.path());

    // The merge changes only the cdn module: its change is intended, putting the
    // db input back is not.
    repo.write("infra/modules/cdn/main.tf", module("cdn-2"));
    let second = repo.commit("cdn only");
    let (p, _) = plan(&role, &repo, &second, Uuid::new_v4()).await;
    assert_eq!(p.facts.resources_changed, 2, "{p:?}");
    let unintended: Vec<_> = p.facts.unintended.iter().map(|c| c.address.as_str()).collect();
    assert_eq!(unintended, ["module.db.terraform_data.x"]);
    // An apply without a plan step refuses what would need that approval.
    let e = role
        .run(&job(&repo, &second, Uuid::new_v4(), "infra.staging", "apply"))
        .await
        .unwrap_err()
        .to_step_error();
    assert_eq!(e.code, "approval_required");
    assert!(
        e.message.contains("module.db.terraform_data.x (update)"),
        "{}",
        e.message
    );
}

/// `terraform apply` of the configuration in `dir` to the test's state, as an
/// operator would, outside Baton.
fn apply_by_hand(env: &Env, dir: &std::path::Path) {
    for args in [
        &["init", "-input=false"][..],
        &["apply", "-input=false", "-auto-approve"][..],
    ] {
        let out = std::process::Command::new("terraform")
            .current_dir(dir)
            .args(args)
            .env("CHECKPOINT_DISABLE", "1")
            .env("TF_CLI_CONFIG_FILE", "/dev/null")
            .env("PG_CONN_STR", env.url())
            .env("PG_SCHEMA_NAME", SCHEMA)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "terraform {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Baton's first apply to a state made outside Baton cannot be undone by a
/// configuration it never had, and is never undone by destroying.
#[tokio::test]
async fn a_first_apply_over_a_state_made_outside_baton_is_not_compensated_by_destroying() {
    let env = Env::new().await;
    let role = env.role();
    let by_hand = TempDir::new("infra-by-hand");
    std::fs::write(by_hand.path().join("main.tf"), config(2, "hand", "v1", "one")).unwrap();
    apply_by_hand(&env, by_hand.path());

    let repo = GitRepo::new();
    let c = commit(&repo, &config(3, "a", "v1", "one"));
    let run = Uuid::new_v4();
    let a = plan_and_apply(&role, &repo, &c, run).await;
    assert_eq!(a.previous_commit, None);
    assert!(a.state_before.is_some());
    let mut undo = job(&repo, &c, run, "infra.staging", "reapply-previous");
    undo.kind = JobKind::Compensate;
    let e = role.run(&undo).await.unwrap_err().to_step_error();
    assert_eq!(e.code, "no_previous_configuration", "{}", e.message);
    assert_eq!(env.resources().await.len(), 4, "nothing was destroyed");
}
