//! staging-verify against a real Kubernetes control plane (kube-apiserver and
//! kube-controller-manager; only the node is simulated, per test namespace) and
//! a real HTTP service standing in for the deployed application.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use baton_shared::facts::{FactSet, ImageBuilt};
use baton_shared::protocol::{Fields, JobKind, StepJob};
use baton_shared::test_cluster::{Behaviour, TestNamespace};
use baton_shared::testing::{GitRepo, TempDir};
use baton_staging_verify::role::RedeployOutputs;
use baton_staging_verify::{StagingVerify, VerifyConfig, VerifyOutputs};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use serde_json::Value;
use uuid::Uuid;

const REPO: &str = "registry.test/shop/web";

/// The application as staging serves it: answers every path with "ok" after a
/// delay; after `fail_after` requests, with 500.
#[derive(Default)]
struct Service {
    requests: AtomicU64,
    delay_ms: AtomicU64,
    fail_after: AtomicU64,
}

async fn serve(state: Arc<Service>) -> SocketAddr {
    let app = axum::Router::new().fallback(move || {
        let s = state.clone();
        async move {
            let n = s.requests.fetch_add(1, Ordering::SeqCst) + 1;
            let delay = s.delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            let limit = s.fail_after.load(Ordering::SeqCst);
            if limit > 0 && n > limit {
                (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "broken")
            } else {
                (axum::http::StatusCode::OK, "ok")
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

struct Fixture {
    ns: TestNamespace,
    repo: GitRepo,
    service: Arc<Service>,
    role: StagingVerify,
    _dirs: TempDir,
}

const VERIFY_TOML: &str = r#"
[[smoke]]
path = "/healthz"
body_contains = "ok"

[performance]
requests = 20
endpoints = ["/api/items"]
"#;

fn manifests(repo: &GitRepo, setting: &str) {
    repo.write(
        "deploy/staging/kustomization.yaml",
        "resources:\n- deployment.yaml\n- config.yaml\n- policy.yaml\n",
    );
    repo.write(
        "deploy/staging/deployment.yaml",
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 2\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n      - name: app\n        image: {REPO}:dev\n        envFrom: [{{configMapRef: {{name: web}}}}]\n"
        ),
    );
    repo.write(
        "deploy/staging/config.yaml",
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web\ndata:\n  SETTING: \"{setting}\"\n"),
    );
    repo.write(
        "deploy/staging/policy.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: default-deny\nspec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
    );
}

impl Fixture {
    /// `noise_floor_ms`: latencies below it are equal; the tests that are not
    /// about performance set it high, so a busy machine's slow request is not
    /// taken for a regression.
    async fn new(prefix: &str, readiness_grace_secs: u64, noise_floor_ms: f64) -> Self {
        let ns = TestNamespace::new(prefix).await;
        let service = Arc::new(Service::default());
        let addr = serve(service.clone()).await;
        let dirs = TempDir::new("verify");
        let config = VerifyConfig {
            kubeconfig: ns.kubeconfig.clone(),
            namespace: ns.name.clone(),
            base_url: format!("http://{addr}"),
            repos_dir: dirs.path().join("repos"),
            work_dir: dirs.path().join("work"),
            poll_ms: 100,
            rollout_timeout_secs: 300,
            readiness_grace_secs,
            noise_floor_ms,
            ..VerifyConfig::default()
        };
        config.validate().unwrap();
        let repo = GitRepo::new();
        manifests(&repo, "one");
        repo.write("deploy/verify.toml", VERIFY_TOML);
        Self {
            ns,
            repo,
            service,
            role: StagingVerify::new(config),
            _dirs: dirs,
        }
    }

    fn job(&self, commit: &str, run: Uuid, digest: &str) -> StepJob {
        let built = ImageBuilt {
            image_digest: digest.to_owned(),
            image: Some(format!("{REPO}:{commit}")),
            size_bytes: None,
            scan: None,
        };
        let mut job = StepJob::example("staging", "staging-verify", "verify")
            .with_param("soak_seconds", 1)
            // The fact this step reads from the build, declared by name.
            .with_input("build", built.to_fields());
        job.run_id = run;
        job.step_id = "verify.staging".to_owned();
        job.deploy.repository = self.repo.url();
        job.deploy.commit_sha = commit.to_owned();
        job
    }

    async fn verify(&self, commit: &str, run: Uuid, digest: &str) -> Result<VerifyOutputs, String> {
        self.role
            .run(&self.job(commit, run, digest))
            .await
            .map(parse)
            .map_err(|e| format!("{}: {e}", e.code()))
    }

    async fn live_image(&self) -> String {
        let d = Api::<Deployment>::namespaced(self.ns.client.clone(), &self.ns.name)
            .get("web")
            .await
            .unwrap();
        d.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .clone()
            .unwrap()
    }

    async fn setting(&self) -> String {
        let cm = Api::<ConfigMap>::namespaced(self.ns.client.clone(), &self.ns.name)
            .get("web")
            .await
            .unwrap();
        cm.data.unwrap()["SETTING"].clone()
    }
}

fn digest(n: u8) -> String {
    format!("sha256:{}", format!("{n:02x}").repeat(32))
}

fn parse<T: serde::de::DeserializeOwned>(fields: Fields) -> T {
    serde_json::from_value(Value::Object(fields)).unwrap()
}

#[tokio::test]
async fn a_change_is_deployed_checked_soaked_rehearsed_and_redeployed_back() {
    let fx = Fixture::new("verify-ok", 120, 1000.0).await;
    let first = fx.repo.commit("first");
    let out = fx.verify(&first, Uuid::new_v4(), &digest(1)).await.unwrap();
    assert_eq!(out.facts.image_digest, digest(1));
    assert_eq!(
        out.facts.image.as_deref(),
        Some(format!("{REPO}@{}", digest(1)).as_str())
    );
    assert!(out.facts.first_deployment && !out.facts.rollback_tested, "{out:?}");
    assert_eq!(out.baseline_commit, None);
    assert_eq!(out.facts.regression_percent, 0.0);
    assert_eq!(out.facts.soak_seconds, 1);
    assert!(out.soak.requests > 0 && out.soak.errors == 0, "{:?}", out.soak);
    assert_eq!(out.smoke.len(), 1);
    assert_eq!(out.performance["/api/items"].requests, 20);
    assert_eq!(fx.live_image().await, format!("{REPO}@{}", digest(1)));
    assert_eq!(
        out.topology,
        ["not compared with production: deploy/production is not in the repository"]
    );

    manifests(&fx.repo, "two");
    // Production's manifests: one more configuration key, no network policy.
    fx.repo.write(
        "deploy/production/kustomization.yaml",
        "resources:\n- deployment.yaml\n- config.yaml\n",
    );
    let deployment = std::fs::read_to_string(fx.repo.path().join("deploy/staging/deployment.yaml")).unwrap();
    fx.repo.write("deploy/production/deployment.yaml", deployment);
    fx.repo.write(
        "deploy/production/config.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web\ndata:\n  SETTING: \"prod\"\n  REGION: \"eu\"\n",
    );
    let second = fx.repo.commit("second");
    let run = Uuid::new_v4();
    let out = fx.verify(&second, run, &digest(2)).await.unwrap();
    assert!(out.facts.rollback_tested && !out.facts.first_deployment, "{out:?}");
    assert!(out.facts.rollback_seconds.unwrap() > 0.0);
    assert_eq!(out.baseline_commit.as_deref(), Some(first.as_str()));
    assert_eq!(out.differences, ["ConfigMap/web: key SETTING changed"]);
    assert_eq!(
        out.topology,
        [
            "ConfigMap/web: key REGION is in production, not in staging",
            "NetworkPolicy/default-deny is in staging, not in production",
        ]
    );
    let web = out.previous.iter().find(|p| p.object == "Deployment/web").unwrap();
    assert!(web.existed && web.revision == Some(1), "{:?}", out.previous);
    // Rolled back and forward again: the new image runs.
    assert_eq!(fx.live_image().await, format!("{REPO}@{}", digest(2)));
    assert_eq!(fx.setting().await, "two");

    // A later step fails: the compensation puts the first deploy back.
    let mut undo = fx.job(&second, run, &digest(2));
    undo.kind = JobKind::Compensate;
    undo.action = "redeploy-previous".to_owned();
    let back: RedeployOutputs = parse(fx.role.run(&undo).await.unwrap());
    assert!(back.reverted && back.deleted.is_empty(), "{back:?}");
    assert_eq!(back.restored.len(), 3, "{back:?}");
    assert_eq!(fx.live_image().await, format!("{REPO}@{}", digest(1)));
    assert_eq!(fx.setting().await, "one");
    // Delivered again: everything is as recorded, nothing to do, no refusal.
    let again: RedeployOutputs = parse(fx.role.run(&undo).await.unwrap());
    assert!(again.reverted && again.restored.is_empty(), "{again:?}");
}

#[tokio::test]
async fn a_crash_looping_pod_fails_the_step_naming_pod_and_container() {
    let fx = Fixture::new("verify-crash", 120, 1000.0).await;
    fx.ns.behave(&format!("{REPO}@{}", digest(3)), Behaviour::CrashLoop);
    let commit = fx.repo.commit("crash");
    let e = fx.verify(&commit, Uuid::new_v4(), &digest(3)).await.unwrap_err();
    assert!(e.starts_with("pod_unhealthy: Deployment/web: pod web-"), "{e}");
    assert!(e.contains("container app: CrashLoopBackOff"), "{e}");
    // Nothing after the rollout ran: the service saw no smoke test.
    assert_eq!(fx.service.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_pod_that_never_gets_ready_fails_its_readiness() {
    let fx = Fixture::new("verify-unready", 1, 1000.0).await;
    fx.ns.behave(&format!("{REPO}@{}", digest(4)), Behaviour::Unready);
    let commit = fx.repo.commit("unready");
    let e = fx.verify(&commit, Uuid::new_v4(), &digest(4)).await.unwrap_err();
    assert!(e.starts_with("pod_unhealthy:"), "{e}");
    assert!(
        e.contains("container app: not ready") && e.contains("readiness probe failing"),
        "{e}"
    );
}

#[tokio::test]
async fn a_failing_smoke_test_fails_the_step() {
    let fx = Fixture::new("verify-smoke", 120, 1000.0).await;
    fx.repo.write(
        "deploy/verify.toml",
        "[[smoke]]\npath = \"/healthz\"\nbody_contains = \"healthy\"\n",
    );
    let commit = fx.repo.commit("smoke");
    let e = fx.verify(&commit, Uuid::new_v4(), &digest(5)).await.unwrap_err();
    assert!(
        e.starts_with("smoke_failed: smoke test failed: GET http://")
            && e.contains("/healthz: the body does not contain \"healthy\": ok"),
        "{e}"
    );
}

#[tokio::test]
async fn failing_integration_tests_fail_the_step_with_their_job() {
    let fx = Fixture::new("verify-it", 120, 1000.0).await;
    let tests = "registry.test/shop/web-tests@sha256:".to_owned() + &"9".repeat(64);
    fx.ns.behave(
        &tests,
        Behaviour::Exit(
            1,
            "checkout.spec.ts\n  expected 200, got 502 on POST /api/orders\n1 failing\n".into(),
        ),
    );
    fx.repo.write(
        "deploy/verify.toml",
        format!(
            "[[smoke]]\npath = \"/healthz\"\n\n[integration]\nimage = \"{tests}\"\ncommand = [\"npm\", \"test\"]\n"
        ),
    );
    let commit = fx.repo.commit("integration");
    let e = fx.verify(&commit, Uuid::new_v4(), &digest(6)).await.unwrap_err();
    assert!(
        e.starts_with("integration_failed: integration tests failed: Job/baton-it-"),
        "{e}"
    );
    assert!(e.contains("(npm test) failed: BackoffLimitExceeded"), "{e}");
    // The tail of the tests' log, read through the API server from the node.
    assert!(
        e.contains("log tail: checkout.spec.ts") && e.contains("1 failing"),
        "{e}"
    );
}

#[tokio::test]
async fn passing_integration_tests_are_reported() {
    let fx = Fixture::new("verify-it-ok", 120, 1000.0).await;
    let tests = "registry.test/shop/web-tests@sha256:".to_owned() + &"8".repeat(64);
    fx.ns.behave(&tests, Behaviour::Exit(0, "12 passing\n".into()));
    fx.repo.write(
        "deploy/verify.toml",
        format!(
            "[[smoke]]\npath = \"/healthz\"\n\n[integration]\nimage = \"{tests}\"\ncommand = [\"npm\", \"test\"]\n"
        ),
    );
    let commit = fx.repo.commit("integration");
    let out = fx.verify(&commit, Uuid::new_v4(), &digest(7)).await.unwrap();
    let it = out.integration.expect("integration tests ran");
    assert_eq!(it.image, tests);
    assert!(it.job.starts_with("baton-it-"));
}

#[tokio::test]
async fn a_regression_over_the_limit_fails_against_the_last_baseline() {
    let fx = Fixture::new("verify-perf", 120, 10.0).await;
    let first = fx.repo.commit("fast");
    fx.verify(&first, Uuid::new_v4(), &digest(8)).await.unwrap();
    // The new version answers 300 ms later: far beyond the 10 ms noise floor
    // and what a busy machine adds.
    fx.service.delay_ms.store(300, Ordering::SeqCst);
    let second = fx.repo.commit("slow");
    let e = fx.verify(&second, Uuid::new_v4(), &digest(9)).await.unwrap_err();
    assert!(
        e.starts_with("performance_regression: performance regression: /api/items p95 "),
        "{e}"
    );
    assert!(e.contains(&format!("at {first}")) && e.contains("limit 20 %"), "{e}");
}

#[tokio::test]
async fn errors_during_the_soak_fail_it() {
    let fx = Fixture::new("verify-soak", 120, 1000.0).await;
    // The smoke test and the 20 measured requests pass; then the service fails.
    fx.service.fail_after.store(21, Ordering::SeqCst);
    let commit = fx.repo.commit("soak");
    let e = fx.verify(&commit, Uuid::new_v4(), &digest(10)).await.unwrap_err();
    assert!(e.starts_with("soak_failed: soak failed after "), "{e}");
    assert!(e.contains("requests to GET http://") && e.contains("limit 1 %"), "{e}");
}

#[tokio::test]
async fn manifests_that_do_not_run_the_built_image_are_refused() {
    let fx = Fixture::new("verify-image", 120, 1000.0).await;
    let commit = fx.repo.commit("first");
    let mut job = fx.job(&commit, Uuid::new_v4(), &digest(11));
    let other = ImageBuilt {
        image_digest: digest(11),
        image: Some(format!("registry.test/shop/other:{commit}")),
        size_bytes: None,
        scan: None,
    };
    job = job.with_input("build", other.to_fields());
    let e = fx.role.run(&job).await.unwrap_err();
    assert_eq!(e.code(), "invalid_manifests");
    assert_eq!(
        e.to_string(),
        "no container in deploy/staging runs registry.test/shop/other: the verified image would not be deployed"
    );
}
