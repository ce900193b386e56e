//! `baton_shared::cluster` against a real control plane with the simulated node.

use std::time::Duration;

use baton_shared::cluster::{self, Applier, HealthLimits, RolloutFailure};
use baton_shared::test_cluster::{Behaviour, TestNamespace};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;

const GOOD: &str = "registry.test/web@sha256:1111111111111111111111111111111111111111111111111111111111111111";
const BAD: &str = "registry.test/web@sha256:2222222222222222222222222222222222222222222222222222222222222222";

fn deployment(image: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 2\n  progressDeadlineSeconds: 600\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n      - name: app\n        image: {image}\n"
    )
}

const LIMITS: HealthLimits = HealthLimits {
    max_restarts: 3,
    readiness_grace: Duration::from_secs(120),
};

async fn apply(ns: &TestNamespace, image: &str) {
    let mut applier = Applier::new(ns.client.clone(), &ns.name, "baton-test");
    for obj in cluster::parse_manifests("web", &deployment(image)).unwrap() {
        applier.apply(&obj).await.unwrap();
    }
}

async fn watch(ns: &TestNamespace) -> Result<cluster::RolloutFigures, RolloutFailure> {
    cluster::watch_rollout(
        &ns.client,
        &ns.name,
        "web",
        LIMITS,
        Duration::from_secs(600),
        Duration::from_millis(200),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_rollout_completes_a_crash_loop_is_named_and_undo_goes_back() {
    let ns = TestNamespace::new("cluster").await;
    ns.behave(BAD, Behaviour::CrashLoop);
    apply(&ns, GOOD).await;
    let done = watch(&ns).await.expect("the first rollout completes");
    assert_eq!((done.revision, done.replicas), (1, 2));

    apply(&ns, BAD).await;
    let failure = watch(&ns).await.unwrap_err();
    let RolloutFailure::Pod(text) = &failure else {
        panic!("{failure:?}")
    };
    assert!(text.contains("container app: CrashLoopBackOff"), "{text}");

    let api: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);
    let d = api.get("web").await.unwrap();
    assert_eq!(
        cluster::revision_of(&d.metadata.annotations.clone().unwrap_or_default()),
        2
    );
    let previous = cluster::revision(&ns.client, &ns.name, &d, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(previous.number, 1);
    cluster::undo(&ns.client, &ns.name, &d, &previous, None).await.unwrap();
    let back = watch(&ns).await.expect("the undo completes");
    // As with `kubectl rollout undo`: the old template comes back as revision 3.
    assert_eq!(back.revision, 3);
    let d = api.get("web").await.unwrap();
    let image = d.spec.unwrap().template.spec.unwrap().containers[0].image.clone();
    assert_eq!(image.as_deref(), Some(GOOD));
}
