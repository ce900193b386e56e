//! The seed pipeline with the real staging-verify and production-apply daemons
//! on a real Kubernetes control plane (only the node simulated,
//! `baton_shared::test_cluster`); the other roles are the scripted daemon,
//! whose facts are declared below by name. The production gates decide on the
//! soak, rollback rehearsal, regression and image that staging-verify reports
//! from its real work, and a rollback through the engine takes production and
//! staging back.

use std::time::Duration;

use baton_shared::test_cluster::TestNamespace;
use baton_shared::testing::GitRepo;
use baton_tests::{RealDaemon, SEED_BINDINGS, TestEnv, event, with_seed_facts};
use k8s_openapi::api::apps::v1::Deployment;
use serde_json::json;

const RUN_TIMEOUT: Duration = Duration::from_secs(300);
const REPO: &str = "registry.test/shop/web";

fn manifests(repo: &GitRepo, zone: &str) {
    repo.write(
        &format!("deploy/{zone}/kustomization.yaml"),
        "resources:\n- deployment.yaml\n",
    );
    repo.write(
        &format!("deploy/{zone}/deployment.yaml"),
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n      - name: app\n        image: {REPO}:dev\n"
        ),
    );
}

async fn image(ns: &TestNamespace) -> String {
    let d = kube::Api::<Deployment>::namespaced(ns.client.clone(), &ns.name)
        .get("web")
        .await
        .unwrap();
    d.spec.unwrap().template.spec.unwrap().containers[0]
        .image
        .clone()
        .unwrap()
}

/// The scripted build reports the image it "built" (a declared fact: the
/// digest made from the commit, and the image's name).
fn script(fail_post_backup: bool) -> serde_json::Value {
    let mut s = json!({
        "default": {"delay_ms": 20},
        "facts": {"build": {"image": format!("{REPO}:{{commit_sha}}")}},
    });
    if fail_post_backup {
        s["execute"] = json!({"backup.post": {"fail": {"code": "backup_verification_failed",
            "message": "the post-deploy backup did not restore", "retryable": false}}});
    }
    with_seed_facts(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_run_deploys_through_real_staging_and_production_daemons_and_a_rollback_takes_both_back() {
    let env = TestEnv::new("kube-seed").await;
    let staging = TestNamespace::new("seed-staging").await;
    let production = TestNamespace::new("seed-production").await;
    // The application as staging serves it.
    let app = axum::Router::new().fallback(|| async { "ok" });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let verify_config = env.dir.join("staging-verify.toml");
    std::fs::write(
        &verify_config,
        format!(
            "[daemon]\nzone = \"staging\"\n\n[verify]\nkubeconfig = {:?}\nnamespace = {:?}\nbase_url = {base:?}\n\
             repos_dir = {:?}\nwork_dir = {:?}\npoll_ms = 100\nsoak_seconds = 1\nnoise_floor_ms = 1000.0\n",
            staging.kubeconfig.display().to_string(),
            staging.name,
            env.dir.join("verify-repos").display().to_string(),
            env.dir.join("verify-work").display().to_string(),
        ),
    )
    .unwrap();
    let apply_config = env.dir.join("production-apply.toml");
    std::fs::write(
        &apply_config,
        format!(
            "[daemon]\nzone = \"production\"\n\n[apply]\nkubeconfig = {:?}\nnamespace = {:?}\n\
             repos_dir = {:?}\nwork_dir = {:?}\npoll_ms = 100\nmonitor_seconds = 1\n",
            production.kubeconfig.display().to_string(),
            production.name,
            env.dir.join("apply-repos").display().to_string(),
            env.dir.join("apply-work").display().to_string(),
        ),
    )
    .unwrap();
    let _verify = RealDaemon::start(&env, "staging-verify", "baton-staging-verify", verify_config, &[]);
    let _apply = RealDaemon::start(&env, "production-apply", "baton-production-apply", apply_config, &[]);
    let scripted: Vec<&str> = SEED_BINDINGS
        .iter()
        .copied()
        .filter(|b| !matches!(*b, "staging.staging-verify" | "production.production-apply"))
        .collect();
    env.script(script(false));
    let _scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", &scripted).await;

    let repo = GitRepo::new();
    manifests(&repo, "staging");
    manifests(&repo, "production");
    repo.write(
        "deploy/verify.toml",
        "[[smoke]]\npath = \"/healthz\"\nbody_contains = \"ok\"\n\n[performance]\nrequests = 5\n",
    );
    repo.write("src/app.ts", "export const v = 1;\n");
    let first = repo.commit("first");
    let mut ev = event("shop", 1, &["src/app.ts"]);
    ev["repository"] = json!(repo.url());
    ev["commit_sha"] = json!(first);
    let run = env.enqueue(&ev);
    let v = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(v.status, "succeeded", "{}", env.diagnostics());
    let digest1 = format!("sha256:{first}000000000000000000000000");
    assert_eq!(image(&staging).await, format!("{REPO}@{digest1}"));
    assert_eq!(image(&production).await, format!("{REPO}@{digest1}"));
    let verified = &v.step("verify.staging").unwrap().outputs;
    assert_eq!(verified["soak_seconds"], 1);
    assert_eq!(verified["first_deployment"], true);

    // The second release: staging rehearses its rollback, production rolls
    // out; then the post-deploy backup fails and the run waits for review.
    repo.write("src/app.ts", "export const v = 2;\n");
    let second = repo.commit("second");
    env.script(script(true));
    let mut ev = event("shop", 2, &["src/app.ts"]);
    ev["repository"] = json!(repo.url());
    ev["commit_sha"] = json!(second);
    let run = env.enqueue(&ev);
    let v = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(v.status, "failed", "{}", env.diagnostics());
    let digest2 = format!("sha256:{second}000000000000000000000000");
    assert_eq!(image(&production).await, format!("{REPO}@{digest2}"));
    let verified = &v.step("verify.staging").unwrap().outputs;
    assert_eq!(verified["rollback_tested"], true, "{verified:?}");
    let gates: Vec<String> = v
        .history
        .iter()
        .filter(|h| h.kind == "gates_passed" && h.step_id.as_deref() == Some("apply.production"))
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
        "staging-soak: verify.staging watched staging run this change for 1 s",
        "rollback-tested: verify.staging rolled staging back to the previous revision in",
        &format!("image-match: production gets {digest2}, the image verified on staging"),
    ] {
        assert!(gates.iter().any(|g| g.starts_with(want)), "{want:?} not in {gates:#?}");
    }

    // An operator decides: roll it back. Production returns to the previous
    // ReplicaSet, staging to the previous manifests.
    let out = env.baton(&["rollback", &run.to_string(), "--reason", "the backup cannot be trusted"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = env.wait_run_status(run, "rolled_back", RUN_TIMEOUT).await;
    let undo = v.step("apply.production").unwrap();
    assert_eq!(undo.status, "compensated", "{undo:?}");
    assert_eq!(image(&production).await, format!("{REPO}@{digest1}"));
    assert_eq!(image(&staging).await, format!("{REPO}@{digest1}"));
}
