//! production-apply against a real Kubernetes control plane (kube-apiserver and
//! kube-controller-manager; only the node is simulated, per test namespace) and,
//! for monitoring, a real Prometheus scraping a test application.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use baton_production_apply::config::PrometheusConfig;
use baton_production_apply::{ApplyConfig, ApplyOutputs, ProductionApply, RollbackOutputs};
use baton_shared::facts::{FactSet, StagingVerified};
use baton_shared::protocol::{Fields, JobKind, StepJob};
use baton_shared::test_cluster::{Behaviour, TestNamespace};
use baton_shared::testing::{GitRepo, TempDir};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use serde_json::Value;
use uuid::Uuid;

const REPO: &str = "registry.test/shop/web";

struct Fixture {
    ns: TestNamespace,
    repo: GitRepo,
    role: ProductionApply,
    _dirs: TempDir,
}

fn manifests(repo: &GitRepo) {
    repo.write(
        "deploy/production/kustomization.yaml",
        "resources:\n- deployment.yaml\n",
    );
    repo.write(
        "deploy/production/deployment.yaml",
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 3\n  strategy:\n    rollingUpdate: {{maxSurge: 25%}}\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n      - name: app\n        image: {REPO}:dev\n"
        ),
    );
}

fn digest(n: u8) -> String {
    format!("sha256:{}", format!("{n:02x}").repeat(32))
}

fn parse<T: serde::de::DeserializeOwned>(fields: Fields) -> T {
    serde_json::from_value(Value::Object(fields)).unwrap()
}

impl Fixture {
    async fn new(prefix: &str, prometheus: Option<PrometheusConfig>) -> Self {
        let ns = TestNamespace::new(prefix).await;
        let dirs = TempDir::new("apply");
        let repo = GitRepo::new();
        manifests(&repo);
        let config = ApplyConfig {
            kubeconfig: ns.kubeconfig.clone(),
            namespace: ns.name.clone(),
            repos_dir: dirs.path().join("repos"),
            work_dir: dirs.path().join("work"),
            poll_ms: 100,
            prometheus,
            ..ApplyConfig::default()
        };
        config.validate().unwrap();
        Self {
            ns,
            repo,
            role: ProductionApply::new(config),
            _dirs: dirs,
        }
    }

    fn job(&self, commit: &str, run: Uuid, digest: &str) -> StepJob {
        let verified = StagingVerified {
            image_digest: digest.to_owned(),
            regression_percent: 0.0,
            image: Some(format!("{REPO}@{digest}")),
            soak_seconds: 900,
            rollback_tested: true,
            rollback_seconds: Some(1.0),
            first_deployment: false,
        };
        let mut job = StepJob::example("production", "production-apply", "apply")
            .with_param("min_ready_seconds", 1)
            .with_param("progress_deadline_seconds", 120)
            .with_param("monitor_seconds", 1)
            // The fact this step reads from staging, declared by name.
            .with_input("verify.staging", verified.to_fields());
        job.run_id = run;
        job.step_id = "apply.production".to_owned();
        job.deploy.repository = self.repo.url();
        job.deploy.commit_sha = commit.to_owned();
        job
    }

    async fn apply(&self, job: &StepJob) -> Result<ApplyOutputs, String> {
        self.role
            .run(job)
            .await
            .map(parse)
            .map_err(|e| format!("{}: {e}", e.code()))
    }

    async fn live(&self) -> Deployment {
        Api::<Deployment>::namespaced(self.ns.client.clone(), &self.ns.name)
            .get("web")
            .await
            .unwrap()
    }

    async fn live_image(&self) -> String {
        self.live().await.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .clone()
            .unwrap()
    }

    /// A first release, running `digest(1)` at revision 1.
    async fn released(&self) -> String {
        let commit = self.repo.commit("first");
        let out = self
            .apply(&self.job(&commit, Uuid::new_v4(), &digest(1)))
            .await
            .unwrap();
        assert_eq!(out.deployments[0].revision_after, 1);
        commit
    }
}

#[tokio::test]
async fn a_verified_image_rolls_out_with_the_seed_strategy_and_the_compensation_rolls_it_back() {
    let fx = Fixture::new("apply-ok", None).await;
    let commit = fx.repo.commit("first");
    let out = fx.apply(&fx.job(&commit, Uuid::new_v4(), &digest(1))).await.unwrap();
    assert_eq!(out.image, format!("{REPO}@{}", digest(1)));
    assert_eq!(out.deployments[0].revision_before, 0);
    assert!(
        out.warnings[0].contains("spec.strategy.rollingUpdate.maxSurge is \"25%\" in the manifest; set to 1"),
        "{:?}",
        out.warnings
    );
    assert!(
        out.warnings.iter().any(|w| w.contains("no metrics were watched")),
        "{:?}",
        out.warnings
    );
    assert_eq!(out.monitoring.seconds, 1);
    assert!(out.drift.is_empty(), "{:?}", out.drift);
    let spec = fx.live().await.spec.unwrap();
    let rolling = spec.strategy.unwrap().rolling_update.unwrap();
    assert_eq!(
        serde_json::to_value((&rolling.max_surge, &rolling.max_unavailable)).unwrap(),
        serde_json::json!([1, 0])
    );
    assert_eq!(
        (spec.min_ready_seconds, spec.progress_deadline_seconds),
        (Some(1), Some(120))
    );

    // Someone scales production by hand: the next apply names it first.
    kube::Api::<Deployment>::namespaced(fx.ns.client.clone(), &fx.ns.name)
        .patch(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    let run = Uuid::new_v4();
    let job = fx.job(&commit, run, &digest(2));
    let out = fx.apply(&job).await.unwrap();
    assert_eq!(out.drift.len(), 1, "{:?}", out.drift);
    assert!(
        out.drift[0].starts_with(&format!("{}/Deployment/web was changed since run ", fx.ns.name)),
        "{:?}",
        out.drift
    );
    let change = &out.deployments[0];
    assert_eq!((change.revision_before, change.revision_after), (1, 2));
    assert_ne!(change.replica_set_before, change.replica_set_after);
    assert_eq!(fx.live_image().await, format!("{REPO}@{}", digest(2)));

    // A later step fails: the run compensates this one.
    let mut undo = job.clone();
    undo.kind = JobKind::Compensate;
    undo.action = "rollback-replicaset".to_owned();
    undo.own_outputs = baton_shared::protocol::to_fields(&out).unwrap();
    let back: RollbackOutputs = parse(fx.role.run(&undo).await.unwrap());
    assert!(back.rolled_back, "{back:?}");
    assert_eq!(
        (back.deployments[0].from_revision, back.deployments[0].to_revision),
        (2, 1)
    );
    assert_eq!(back.budget_seconds, 60);
    assert_eq!(back.over_budget, back.seconds > 60.0);
    assert_eq!(fx.live_image().await, format!("{REPO}@{}", digest(1)));
    // Delivered again (the daemon died before reporting): nothing left to do,
    // though the old ReplicaSet now has a new revision number.
    let again: RollbackOutputs = parse(fx.role.run(&undo).await.unwrap());
    assert!(again.deployments.is_empty(), "{again:?}");
    assert_eq!(fx.live_image().await, format!("{REPO}@{}", digest(1)));
    // The rollback's own strategy is gone again.
    let spec = fx.live().await.spec.unwrap();
    assert_eq!(spec.min_ready_seconds, Some(1));
    let rolling = spec.strategy.unwrap().rolling_update.unwrap();
    assert_eq!(serde_json::to_value(&rolling.max_surge).unwrap(), serde_json::json!(1));
    // What the rollback left is what the pipeline left: no drift next time.
    let next = fx.apply(&fx.job(&commit, Uuid::new_v4(), &digest(3))).await.unwrap();
    assert!(next.drift.is_empty(), "{:?}", next.drift);

    // A manifest that leaves the replica count to an autoscaler: the
    // autoscaler scaling is not drift; any other change still is.
    let text = std::fs::read_to_string(fx.repo.path().join("deploy/production/deployment.yaml")).unwrap();
    fx.repo
        .write("deploy/production/deployment.yaml", text.replace("  replicas: 3\n", ""));
    let commit = fx.repo.commit("replicas from the autoscaler");
    let first = fx.apply(&fx.job(&commit, Uuid::new_v4(), &digest(4))).await.unwrap();
    assert!(first.drift.is_empty(), "{:?}", first.drift);
    let deployments = kube::Api::<Deployment>::namespaced(fx.ns.client.clone(), &fx.ns.name);
    deployments
        .patch(
            "web",
            &kube::api::PatchParams::apply("horizontal-pod-autoscaler").force(),
            &kube::api::Patch::Apply(serde_json::json!({
                "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                "spec": {"replicas": 4}
            })),
        )
        .await
        .unwrap();
    let scaled = fx.apply(&fx.job(&commit, Uuid::new_v4(), &digest(5))).await.unwrap();
    assert!(scaled.drift.is_empty(), "scaling by the autoscaler: {:?}", scaled.drift);
    deployments
        .patch(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"minReadySeconds": 7}})),
        )
        .await
        .unwrap();
    let changed = fx.apply(&fx.job(&commit, Uuid::new_v4(), &digest(6))).await.unwrap();
    assert_eq!(changed.drift.len(), 1, "{:?}", changed.drift);
}

#[tokio::test]
async fn a_crash_loop_in_production_is_rolled_back_before_the_step_fails() {
    let fx = Fixture::new("apply-crash", None).await;
    let commit = fx.released().await;
    fx.ns.behave(&format!("{REPO}@{}", digest(2)), Behaviour::CrashLoop);
    let e = fx
        .apply(&fx.job(&commit, Uuid::new_v4(), &digest(2)))
        .await
        .unwrap_err();
    assert!(e.starts_with("pod_unhealthy: Deployment/web: pod web-"), "{e}");
    assert!(
        e.contains("CrashLoopBackOff") && e.contains("Deployment/web rolled back from revision 2 to 1"),
        "{e}"
    );
    assert_eq!(fx.live_image().await, format!("{REPO}@{}", digest(1)));
}

#[tokio::test]
async fn a_rollout_past_its_progress_deadline_is_rolled_back() {
    let fx = Fixture::new("apply-deadline", None).await;
    let commit = fx.released().await;
    // Never ready, and the readiness grace (120 s) is longer than the deadline:
    // the controller's ProgressDeadlineExceeded is what ends it.
    fx.ns.behave(&format!("{REPO}@{}", digest(3)), Behaviour::Unready);
    let job = fx
        .job(&commit, Uuid::new_v4(), &digest(3))
        .with_param("progress_deadline_seconds", 5);
    let e = fx.apply(&job).await.unwrap_err();
    assert!(
        e.starts_with("progress_deadline_exceeded: Deployment/web: ProgressDeadlineExceeded"),
        "{e}"
    );
    assert!(e.contains("rolled back from revision 2 to 1"), "{e}");
    assert_eq!(fx.live_image().await, format!("{REPO}@{}", digest(1)));
}

#[tokio::test]
async fn production_deploys_only_an_image_staging_verified() {
    let fx = Fixture::new("apply-image", None).await;
    let commit = fx.repo.commit("first");
    let mut job = fx.job(&commit, Uuid::new_v4(), &digest(1));
    job.inputs.clear();
    let e = fx.apply(&job).await.unwrap_err();
    assert!(
        e.starts_with("image_missing: production deploys only an image staging verified"),
        "{e}"
    );
    let other = StagingVerified {
        image_digest: digest(1),
        regression_percent: 0.0,
        image: Some(format!("registry.test/shop/other@{}", digest(1))),
        soak_seconds: 900,
        rollback_tested: true,
        rollback_seconds: None,
        first_deployment: false,
    };
    let job = job.with_input("verify.staging", other.to_fields());
    let e = fx.apply(&job).await.unwrap_err();
    assert_eq!(
        e,
        "invalid_manifests: no container in deploy/production runs registry.test/shop/other: the image staging verified would not be deployed"
    );
    // Nothing was applied.
    let none = Api::<Deployment>::namespaced(fx.ns.client.clone(), &fx.ns.name)
        .get_opt("web")
        .await
        .unwrap();
    assert!(none.is_none());
}

/// A real Prometheus scraping `target` every second.
struct Prometheus {
    child: Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn prometheus(dir: &std::path::Path, target: SocketAddr) -> Prometheus {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n- job_name: app\n  static_configs:\n  - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let mut child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("Debian's prometheus (.ci/run installs it)");
    // Ready when it says so in its log; the rest of the log is drained so
    // that it never blocks on a full pipe.
    let stderr = child.stderr.take().expect("piped stderr");
    let (ready, said) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut ready = Some(ready);
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("Server is ready to receive web requests")
                && let Some(tx) = ready.take()
            {
                let _ = tx.send(());
            }
        }
    });
    said.await.expect("prometheus exited before it was ready");
    let url = format!("http://127.0.0.1:{port}");
    Prometheus { child, url }
}

/// The application's metrics: every scrape adds 100 requests, half of them 500s.
async fn failing_app() -> SocketAddr {
    let scrapes = Arc::new(AtomicU64::new(0));
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let n = scrapes.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                format!(
                    "# TYPE http_requests_total counter\nhttp_requests_total{{code=\"200\"}} {}\nhttp_requests_total{{code=\"500\"}} {}\n",
                    n * 50,
                    n * 50
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test]
async fn an_error_rate_over_the_limit_while_monitoring_rolls_back() {
    let dir = TempDir::new("prometheus");
    let app = failing_app().await;
    let prom = prometheus(dir.path(), app).await;
    let fx = Fixture::new(
        "apply-monitor",
        Some(PrometheusConfig {
            url: prom.url.clone(),
            error_percent:
                "100 * sum(rate(http_requests_total{code=~\"5..\"}[5s])) / sum(rate(http_requests_total[5s]))"
                    .to_owned(),
            p95_ms: "0".to_owned(),
        }),
    )
    .await;
    // The first release is monitored too, so it runs before the app fails:
    // its monitoring sees no data yet or none at all within 1 s.
    let commit = fx.repo.commit("first");
    let mut first = fx.job(&commit, Uuid::new_v4(), &digest(1));
    first.params.insert("max_error_percent".into(), 100.into());
    fx.apply(&first).await.unwrap();
    // The next release is watched until Prometheus reports its error rate
    // (the breach ends the wait; 300 s is only the bound).
    let job = fx
        .job(&commit, Uuid::new_v4(), &digest(2))
        .with_param("monitor_seconds", 300);
    let e = fx.apply(&job).await.unwrap_err();
    assert!(e.starts_with("monitoring_breach: monitoring breach after "), "{e}");
    assert!(e.contains("error rate 50.00 % above 1 % (Prometheus)"), "{e}");
    assert!(
        e.contains("rolled back in ") && e.contains("the 60 s budget") && e.contains("from revision 2 to 1"),
        "{e}"
    );
    assert_eq!(fx.live_image().await, format!("{REPO}@{}", digest(1)));
}
