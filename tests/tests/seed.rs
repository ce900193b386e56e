//! The shipped seed pipeline (`scheduler/pipelines/seed.toml`) end to end on
//! the eight real role daemons, each its own process in its zone: buildah and
//! a containerd of the test's own (build), PostgreSQL (migrations, backups,
//! Terraform's state), Terraform, a real Kubernetes control plane with a
//! simulated node (staging, production, network objects), pebble issuing the
//! certificate, and the stand-ins for TransIP (its API and authoritative DNS)
//! and bunny.net (storage, pull zone, a caching edge) at their network
//! boundaries. No step's facts are scripted: every gate decides on what a
//! daemon reported from real work. Timings are shortened by the daemons'
//! configuration (a 1 s soak and watch); the pipeline is the shipped one.
//!
//! Two releases: the first goes through all nine steps; the second fails its
//! production rollout (its image crash-loops on production's node), and the
//! run is compensated in reverse order across every role that changed
//! something. The assertions look at the real systems afterwards.

use std::path::Path;
use std::time::Duration;

use baton_shared::fake_transip::Entry;
use baton_shared::sandbox::{Databases, IMAGE, SERVICE, STORAGE_ZONE, Sandbox};
use baton_shared::test_cluster::{Behaviour, TestNamespace};
use baton_shared::testing::GitRepo;
use baton_tests::{RealDaemon, TestEnv};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use serde_json::{Value, json};

const RUN_TIMEOUT: Duration = Duration::from_secs(600);

struct World {
    env: TestEnv,
    dbs: Databases,
    sandbox: Sandbox,
    _daemons: Vec<RealDaemon>,
}

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo")
}

impl World {
    async fn new() -> Self {
        let env = TestEnv::new("seed-real").await;
        let dbs = Databases {
            server: "postgres://postgres@127.0.0.1:5432".to_owned(),
            staging: format!("{}_app_stg", env.db_name),
            production: format!("{}_app_prd", env.db_name),
            terraform: format!("{}_tf", env.db_name),
        };
        for db in [&dbs.staging, &dbs.production, &dbs.terraform] {
            sqlx::query(sqlx::AssertSqlSafe(format!("create database {db}")))
                .execute(&env.pool)
                .await
                .unwrap();
        }
        let sandbox = Sandbox::start(&env.dir.join("sandbox"), &dbs, &baton_tests::bin("baton-backup")).await;
        let daemons = sandbox
            .daemons
            .iter()
            .map(|d| RealDaemon::start(&env, &d.label, d.binary, d.config.clone(), &[]))
            .collect();
        Self {
            env,
            dbs,
            sandbox,
            _daemons: daemons,
        }
    }

    fn release(&self, repo: &GitRepo, n: u32) -> String {
        self.sandbox.release(repo.path(), &examples(), n);
        repo.commit(&format!("release {n}"))
    }

    async fn deployed_image(&self, ns: &TestNamespace) -> String {
        let d = kube::Api::<Deployment>::namespaced(ns.client.clone(), &ns.name)
            .get("web")
            .await
            .unwrap();
        d.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .clone()
            .unwrap()
    }

    async fn columns(&self, db: &str) -> Vec<String> {
        let pool = sqlx::PgPool::connect(&self.dbs.url(db)).await.unwrap();
        let cols: Vec<String> = sqlx::query_scalar(
            "select column_name::text from information_schema.columns where table_name = 'customers' order by 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        pool.close().await;
        cols
    }

    /// The `input` of `terraform_data.web` in `zone`'s Terraform state.
    async fn terraform_input(&self, zone: &str) -> String {
        let pool = sqlx::PgPool::connect(&self.dbs.url(&self.dbs.terraform)).await.unwrap();
        let data: String = sqlx::query_scalar(sqlx::AssertSqlSafe(Sandbox::terraform_input_sql(zone)))
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        let state: Value = serde_json::from_str(&data).unwrap();
        let input = &state["resources"][0]["instances"][0]["attributes"]["input"];
        input["value"]
            .as_str()
            .or(input.as_str())
            .unwrap_or_default()
            .to_owned()
    }

    fn enqueue(&self, repo: &GitRepo, commit: &str, number: u64, from: Option<&str>) -> uuid::Uuid {
        let changed = match from {
            None => repo.git(&["ls-files"]),
            Some(prev) => repo.git(&["diff", "--name-only", prev, commit]),
        };
        let paths: Vec<&str> = changed.lines().filter(|l| !l.is_empty()).collect();
        let mut ev = baton_tests::event(SERVICE, number as u8, &paths);
        ev["repository"] = json!(repo.url());
        ev["commit_sha"] = json!(commit);
        ev["pull_request"]["number"] = json!(number);
        self.env.enqueue(&ev)
    }
}

fn entry(name: &str, ttl: u32, kind: &str, content: &str) -> Entry {
    Entry {
        name: name.into(),
        expire: ttl,
        kind: kind.into(),
        content: content.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_pipeline_runs_on_the_eight_real_daemons_and_a_failed_production_rollout_is_compensated_everywhere() {
    let w = World::new().await;
    let scheduler = w.env.scheduler("scheduler").await;
    let repo = GitRepo::new();

    // Release 1: all nine steps.
    let first = w.release(&repo, 1);
    let run = w.enqueue(&repo, &first, 1, None);
    let run1 = run;
    let v = w.env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(v.status, "succeeded", "{}", w.env.diagnostics());
    let mut steps: Vec<(&str, &str)> = v
        .steps
        .iter()
        .filter(|s| s.included)
        .map(|s| (s.id.as_str(), s.status.as_str()))
        .collect();
    steps.sort();
    assert_eq!(
        steps,
        [
            ("apply.production", "succeeded"),
            ("backup.post", "succeeded"),
            ("backup.pre", "succeeded"),
            ("build", "succeeded"),
            ("cdn", "succeeded"),
            ("db.production", "succeeded"),
            ("db.staging", "succeeded"),
            ("infra.production", "succeeded"),
            ("infra.production.plan", "succeeded"),
            ("infra.staging", "succeeded"),
            ("infra.staging.plan", "succeeded"),
            ("network", "succeeded"),
            ("verify.staging", "succeeded"),
        ],
        "{}",
        w.env.diagnostics()
    );
    let digest1 = v.step("build").unwrap().outputs["image_digest"]
        .as_str()
        .unwrap()
        .to_owned();
    // The image in containerd, the same one staging verified and production runs.
    assert!(
        w.sandbox.containerd.images().contains(&digest1),
        "{}",
        w.sandbox.containerd.images()
    );
    assert_eq!(w.deployed_image(&w.sandbox.staging).await, format!("{IMAGE}@{digest1}"));
    assert_eq!(
        w.deployed_image(&w.sandbox.production).await,
        format!("{IMAGE}@{digest1}")
    );
    // Migrations in both databases, Terraform in both states, DNS, the
    // certificate, the assets at the edge, the backups.
    assert_eq!(w.columns(&w.dbs.staging).await, ["created_at", "email", "id"]);
    assert_eq!(w.columns(&w.dbs.production).await, ["created_at", "email", "id"]);
    assert_eq!(w.terraform_input("staging").await, "release-1");
    assert_eq!(w.terraform_input("production").await, "release-1");
    assert_eq!(w.sandbox.www(), [entry("www", 300, "A", "192.0.2.1")]);
    let tls = kube::Api::<Secret>::namespaced(w.sandbox.production.client.clone(), &w.sandbox.production.name)
        .get("web-tls")
        .await
        .unwrap();
    assert_eq!(tls.type_.as_deref(), Some("kubernetes.io/tls"));
    let index1 = w
        .sandbox
        .bunny
        .file(STORAGE_ZONE, "index.html")
        .expect("index.html uploaded");
    let backups = std::fs::read_dir(w.env.dir.join("sandbox/backups/primary"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(backups > 0, "no backup in the primary location");
    // Staging's data passed its anonymisation check.
    assert_eq!(
        v.step("db.staging").unwrap().outputs["data_checks"],
        json!(["no customer e-mail in production's domain"])
    );
    // Nothing changed production outside the pipeline.
    for step in ["apply.production", "network"] {
        assert_eq!(v.step(step).unwrap().outputs["drift"], json!([]), "{step}");
    }
    // Staging mirrors production's topology (the same manifests here).
    assert_eq!(v.step("verify.staging").unwrap().outputs["topology"], json!([]));
    // The gates decided on real facts.
    let reasons: Vec<String> = v
        .history
        .iter()
        .filter(|h| h.kind == "gates_passed")
        .flat_map(|h| h.detail["gates"].as_array().cloned().unwrap_or_default())
        .map(|g| {
            format!(
                "{}: {}",
                g["gate"].as_str().unwrap_or(""),
                g["reason"].as_str().unwrap_or("")
            )
        })
        .collect();
    for want in [
        format!("image-match: production gets {digest1}"),
        "backup-verified: ".to_owned(),
        "rollback-tested: ".to_owned(),
    ] {
        assert!(
            reasons.iter().any(|r| r.starts_with(&want)),
            "{want:?} not in {reasons:#?}"
        );
    }

    // Release 2 crash-loops on production's node: once the build reports its
    // image, production's node is told so (staging's runs it fine).
    let second = w.release(&repo, 2);
    let run = w.enqueue(&repo, &second, 2, Some(&first));
    let v = w.env.wait_step(run, "build", "succeeded", RUN_TIMEOUT).await;
    let digest2 = v.step("build").unwrap().outputs["image_digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(digest2, digest1);
    w.sandbox
        .production
        .behave(&format!("{IMAGE}@{digest2}"), Behaviour::CrashLoop);
    let v = w.env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(v.status, "rolled_back", "{}", w.env.diagnostics());
    let apply = v.step("apply.production").unwrap();
    assert_eq!(apply.status, "compensated", "{apply:?}");
    // Undone in reverse order across every role that changed something.
    let order: Vec<String> = v
        .history
        .iter()
        .filter(|h| h.kind == "step_compensated")
        .filter_map(|h| h.step_id.clone())
        .collect();
    let pos = |s: &str| {
        order
            .iter()
            .position(|o| o == s)
            .unwrap_or_else(|| panic!("{s} not compensated: {order:?}"))
    };
    assert!(pos("verify.staging") < pos("infra.production"), "{order:?}");
    assert!(pos("infra.production") < pos("infra.staging"), "{order:?}");
    assert!(pos("infra.staging") < pos("db.production"), "{order:?}");
    assert!(pos("db.production") < pos("db.staging"), "{order:?}");
    for s in ["cdn", "network"] {
        assert!(pos(s) < pos("verify.staging"), "{s} after verify.staging: {order:?}");
    }
    // The real systems are back at release 1.
    assert_eq!(
        w.deployed_image(&w.sandbox.production).await,
        format!("{IMAGE}@{digest1}")
    );
    assert_eq!(w.deployed_image(&w.sandbox.staging).await, format!("{IMAGE}@{digest1}"));
    assert_eq!(w.columns(&w.dbs.production).await, ["created_at", "email", "id"]);
    assert_eq!(w.columns(&w.dbs.staging).await, ["created_at", "email", "id"]);
    assert_eq!(w.terraform_input("production").await, "release-1");
    assert_eq!(w.terraform_input("staging").await, "release-1");
    assert_eq!(w.sandbox.www(), [entry("www", 300, "A", "192.0.2.1")]);
    assert_eq!(w.sandbox.bunny.file(STORAGE_ZONE, "index.html"), Some(index1));
    // The image of release 2 was built and stays (no compensation for a build).
    assert!(w.sandbox.containerd.images().contains(&digest2));

    // Both runs as the web view shows them (the README's screenshots).
    if let Some(chromium) = baton_tests::browser_tools() {
        let shots = baton_tests::workspace_root().join("target/web-screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        let input = serde_json::json!({
            "mode": "shots", "base": scheduler.api, "viewer": w.env.operator_token, "shots": shots,
            "pages": [["seed-succeeded", format!("/ui/runs/{run1}")], ["seed-rolled-back", format!("/ui/runs/{run}")]],
        });
        let out = baton_tests::browser(&chromium, input).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // The pages' sizes and load times (figures for the README).
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    }
}
