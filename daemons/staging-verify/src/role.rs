//! The `staging-verify` role: `verify` and the `redeploy-previous`
//! compensation (see the crate documentation).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use baton_shared::cluster::{
    self, Applier, ClusterError, Record, RolloutFigures, deployments, kind_of, repository, set_image,
};
use baton_shared::facts::{FactSet, ImageBuilt, StagingVerified};
use baton_shared::git::{self, GitCache};
use baton_shared::kit;
use baton_shared::protocol::{self, Fields, JobKind, Risk, StepJob};
use baton_shared::roles;
use baton_shared::runtime::{BoxFuture, ExecContext, Outcome, Role};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::core::DynamicObject;
use kube::{Client, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Digest;

use crate::checks::{self, Checks, Integration, Latency, SmokeResult};
use crate::config::VerifyConfig;
use crate::error::Error;

/// The field manager of everything this role applies.
pub const MANAGER: &str = "baton";
/// Labels the role's own bookkeeping objects carry.
const MANAGED_BY: &str = "baton-staging-verify";

/// The step's parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// The kustomize directory, relative to the repository root.
    pub manifests_dir: String,
    /// Production's kustomize directory: staging mirrors its topology (the
    /// seed: same services, same configuration structure, same network
    /// policies). Empty: not compared.
    pub production_manifests_dir: String,
    /// The checks file, relative to the repository root.
    pub checks_file: String,
    pub max_regression_percent: f64,
    pub soak_minutes: u64,
    pub critical_soak_minutes: u64,
    /// Overrides both soak lengths (short demos and tests).
    pub soak_seconds: Option<u64>,
    /// Failed requests during the soak, in percent, above which it fails.
    pub max_error_percent: f64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            manifests_dir: "deploy/staging".to_owned(),
            production_manifests_dir: "deploy/production".to_owned(),
            checks_file: "deploy/verify.toml".to_owned(),
            max_regression_percent: 20.0,
            soak_minutes: 15,
            critical_soak_minutes: 60,
            soak_seconds: None,
            max_error_percent: 1.0,
        }
    }
}

impl Params {
    pub fn soak(&self, risk: Risk) -> Duration {
        Duration::from_secs(self.soak_seconds.unwrap_or(match risk {
            Risk::Critical => self.critical_soak_minutes * 60,
            Risk::Standard | Risk::High => self.soak_minutes * 60,
        }))
    }
}

/// The integration Job, as it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntegrationOutcome {
    pub job: String,
    pub image: String,
    pub seconds: f64,
}

/// What the soak watched.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SoakFigures {
    pub seconds: u64,
    pub requests: u64,
    pub errors: u64,
    pub restarts: i64,
}

/// What `verify` reports: the facts contract's [`StagingVerified`] and more.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyOutputs {
    #[serde(flatten)]
    pub facts: StagingVerified,
    pub namespace: String,
    pub commit: String,
    /// The Secret holding each object's state before the deploy.
    pub record: String,
    /// Each object the step applied, as it was before: `created`, `existed`,
    /// or a Deployment's revision (what `redeploy-previous` goes back to).
    pub previous: Vec<PreviousObject>,
    pub applied: Vec<String>,
    pub rollouts: Vec<RolloutFigures>,
    pub smoke: Vec<SmokeResult>,
    /// None: the checks file declares no integration tests.
    pub integration: Option<IntegrationOutcome>,
    pub performance: BTreeMap<String, Latency>,
    /// The commit whose figures the latencies were compared with; none when
    /// there was nothing to compare (the first verification, or no endpoint
    /// in common), and then `regression_percent` is 0 by default, not by
    /// measurement.
    pub baseline_commit: Option<String>,
    /// What differs from what ran before (configuration keys, resources,
    /// network policies, new objects).
    pub differences: Vec<String>,
    /// Where staging does not mirror production's topology (services,
    /// configuration keys, network policies), or why it was not compared.
    pub topology: Vec<String>,
    pub soak: SoakFigures,
    pub roll_forward_seconds: Option<f64>,
}

/// An object as the deploy found it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreviousObject {
    pub object: String,
    /// Whether it existed (false: the deploy created it).
    pub existed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
}

/// What `redeploy-previous` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RedeployOutputs {
    pub reverted: bool,
    pub restored: Vec<String>,
    pub deleted: Vec<String>,
    pub rollouts: Vec<RolloutFigures>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// The baseline of a service's performance.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Baseline {
    commit: String,
    run_id: String,
    endpoints: BTreeMap<String, Latency>,
}

/// The staging-verify role, built from `[verify]`.
#[derive(Debug, Clone)]
pub struct StagingVerify {
    config: VerifyConfig,
    git: GitCache,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::Io {
        what,
        detail: e.to_string(),
    }
}

fn outputs<T: Serialize>(value: &T) -> Result<Fields, Error> {
    protocol::to_fields(value).map_err(|e| Error::Io {
        what: "outputs".into(),
        detail: e.message,
    })
}

/// The kinds that make a zone's topology: its services and what routes to them.
const SERVICES: &[&str] = &[
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "Service",
    "Ingress",
    "CronJob",
];

/// A ConfigMap's or Secret's entries, whichever field holds them.
fn config_data(v: &Value) -> BTreeMap<String, Value> {
    ["data", "stringData", "binaryData"]
        .iter()
        .filter_map(|k| v.get(k).and_then(Value::as_object))
        .flat_map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())))
        .collect()
}

fn config_keys(v: &Value) -> BTreeSet<String> {
    config_data(v).into_keys().collect()
}

/// Where staging's objects do not mirror production's (the seed: "same
/// services, same configuration structure (different values), same network
/// policies").
pub fn topology_differences(staging: &[DynamicObject], production: &[DynamicObject]) -> Vec<String> {
    let mut out = Vec::new();
    let index = |objs: &[DynamicObject]| -> BTreeMap<(String, String), Value> {
        objs.iter()
            .map(|o| {
                (
                    (kind_of(o).to_owned(), o.name_any()),
                    serde_json::to_value(o).unwrap_or_default(),
                )
            })
            .collect()
    };
    let (stg, prd) = (index(staging), index(production));
    let relevant = |k: &str| SERVICES.contains(&k) || matches!(k, "ConfigMap" | "Secret" | "NetworkPolicy");
    for (key @ (kind, name), p) in prd.iter().filter(|((k, _), _)| relevant(k)) {
        let Some(s) = stg.get(key) else {
            out.push(format!("{kind}/{name} is in production, not in staging"));
            continue;
        };
        match kind.as_str() {
            "ConfigMap" | "Secret" => {
                let (sk, pk) = (config_keys(s), config_keys(p));
                for k in pk.difference(&sk) {
                    out.push(format!("{kind}/{name}: key {k} is in production, not in staging"));
                }
                for k in sk.difference(&pk) {
                    out.push(format!("{kind}/{name}: key {k} is in staging, not in production"));
                }
            }
            "NetworkPolicy" if s.get("spec") != p.get("spec") => {
                out.push(format!("NetworkPolicy/{name} differs between staging and production"));
            }
            _ => {}
        }
    }
    for (kind, name) in stg.keys().filter(|(k, _)| relevant(k)) {
        if !prd.contains_key(&(kind.clone(), name.clone())) {
            out.push(format!("{kind}/{name} is in staging, not in production"));
        }
    }
    out
}

/// What differs between the recorded previous objects and the new ones.
fn differences(record: &Record, objects: &[DynamicObject]) -> Vec<String> {
    let mut out = Vec::new();
    for obj in objects {
        let what = cluster::describe(obj);
        let Some(entry) = record
            .entries
            .iter()
            .find(|e| e.kind == kind_of(obj) && e.name == obj.name_any())
        else {
            continue;
        };
        let Some(before) = &entry.previous else {
            out.push(format!("{what} is new"));
            continue;
        };
        match kind_of(obj) {
            "ConfigMap" | "Secret" => {
                let (old, new) = (config_data(before), config_data(&obj.data));
                for k in new.keys().filter(|k| !old.contains_key(*k)) {
                    out.push(format!("{what}: key {k} added"));
                }
                for k in old.keys().filter(|k| !new.contains_key(*k)) {
                    out.push(format!("{what}: key {k} removed"));
                }
                for k in new
                    .keys()
                    .filter(|k| old.get(*k).is_some_and(|o| Some(o) != new.get(*k)))
                {
                    out.push(format!("{what}: key {k} changed"));
                }
            }
            "Deployment" | "StatefulSet" | "DaemonSet" => {
                let containers = |v: &Value| -> BTreeMap<String, Value> {
                    v.pointer("/spec/template/spec/containers")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|c| Some((c.get("name")?.as_str()?.to_owned(), c.clone())))
                        .collect()
                };
                let (old, new) = (containers(before), containers(&obj.data));
                for (name, c) in &new {
                    let r_new = c.get("resources").cloned().unwrap_or(json!({}));
                    let r_old = old
                        .get(name)
                        .and_then(|c| c.get("resources"))
                        .cloned()
                        .unwrap_or(json!({}));
                    if r_new != r_old {
                        out.push(format!("{what} container {name}: resources {r_old} -> {r_new}"));
                    }
                }
                let replicas = |v: &Value| v.pointer("/spec/replicas").cloned();
                if replicas(&obj.data).is_some() && replicas(before) != replicas(&obj.data) {
                    out.push(format!(
                        "{what}: replicas {} -> {}",
                        replicas(before).unwrap_or(json!(1)),
                        replicas(&obj.data).unwrap_or(json!(1))
                    ));
                }
            }
            "NetworkPolicy" if before.get("spec") != obj.data.get("spec") => {
                out.push(format!("{what}: policy changed"));
            }
            _ => {}
        }
    }
    out
}

fn record_name(job: &StepJob) -> String {
    format!("baton-verify.{}", job.key())
}

fn baseline_name(service: &str) -> String {
    format!("baton-baseline.{service}")
}

fn cm_value<T: serde::de::DeserializeOwned>(cm: &ConfigMap, key: &str) -> Result<T, Error> {
    let text = cm.data.as_ref().and_then(|d| d.get(key)).ok_or_else(|| Error::Io {
        what: format!("ConfigMap/{}", cm.name_any()),
        detail: format!("has no {key}"),
    })?;
    serde_json::from_str(text).map_err(|e| Error::Io {
        what: format!("ConfigMap/{} {key}", cm.name_any()),
        detail: e.to_string(),
    })
}

fn bookkeeping(name: &str, service: &str, key: &str, value: &impl Serialize) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {
            "app.kubernetes.io/managed-by": MANAGED_BY, "baton.dev/service": service}},
        "data": {key: serde_json::to_string(value).unwrap_or_default()},
    }))
    .expect("a ConfigMap")
}

impl StagingVerify {
    pub fn new(config: VerifyConfig) -> Self {
        Self {
            git: GitCache::new(config.repos_dir.clone()),
            config,
        }
    }

    /// Runs a job to its outputs; the `Role` methods wrap this.
    pub async fn run(&self, job: &StepJob) -> Result<Fields, Error> {
        match (job.kind, job.action.as_str()) {
            (JobKind::Execute, "verify") => outputs(&self.verify(job).await?),
            (JobKind::Compensate, "redeploy-previous") => outputs(&self.redeploy_previous(job).await?),
            (kind, action) => Err(Error::UnknownAction {
                kind,
                action: action.to_owned(),
            }),
        }
    }

    fn params(job: &StepJob) -> Result<Params, Error> {
        let mut p: Params = job.params().map_err(|e| Error::InvalidParam {
            name: e.key,
            problem: e.problem,
        })?;
        p.manifests_dir = git::check_folder("manifests_dir", &p.manifests_dir)?;
        if !p.production_manifests_dir.is_empty() {
            p.production_manifests_dir = git::check_folder("production_manifests_dir", &p.production_manifests_dir)?;
        }
        p.checks_file = git::check_folder("checks_file", &p.checks_file)?;
        if !(p.max_regression_percent.is_finite() && p.max_regression_percent >= 0.0) {
            return Err(Error::InvalidParam {
                name: "max_regression_percent".into(),
                problem: "must be a number of at least 0".into(),
            });
        }
        if !(p.max_error_percent.is_finite() && (0.0..=100.0).contains(&p.max_error_percent)) {
            return Err(Error::InvalidParam {
                name: "max_error_percent".into(),
                problem: "must be between 0 and 100".into(),
            });
        }
        Ok(p)
    }

    fn http(&self) -> Result<reqwest::Client, Error> {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(self.config.request_timeout_secs))
            .build()
            .map_err(|e| Error::Io {
                what: "cannot make an HTTP client".into(),
                detail: e.to_string(),
            })
    }

    /// The image to verify: the built one among the inputs, else the one the
    /// service's Deployments run now (a change without a new image).
    async fn image(
        &self,
        job: &StepJob,
        objects: &[DynamicObject],
        client: &Client,
        ns: &str,
    ) -> Result<(String, String), Error> {
        for (step, fields) in &job.inputs {
            if let Ok(built) = ImageBuilt::read(step, fields) {
                let Some(image) = built.image else {
                    return Err(Error::NoImage(format!(
                        "{step} reported digest {} without the image's name",
                        built.image_digest
                    )));
                };
                return Ok((repository(&image).to_owned(), built.image_digest));
            }
        }
        let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
        for name in deployments(objects) {
            let Some(live) = api
                .get_opt(&name)
                .await
                .map_err(ClusterError::api(format!("cannot read Deployment/{name}")))?
            else {
                continue;
            };
            let containers = live
                .spec
                .and_then(|s| s.template.spec)
                .map(|s| s.containers)
                .unwrap_or_default();
            for c in containers {
                if let Some((image, digest)) = c.image.as_deref().and_then(|i| i.split_once('@')) {
                    return Ok((repository(image).to_owned(), digest.to_owned()));
                }
            }
        }
        Err(Error::NoImage(format!(
            "no input step reported a built image, and no Deployment in {ns} runs one pinned by digest: nothing to verify"
        )))
    }

    /// The record of the objects' state before this step's deploy.
    async fn record(
        &self,
        applier: &mut Applier,
        job: &StepJob,
        objects: &[DynamicObject],
    ) -> Result<(String, Record), Error> {
        let name = record_name(job);
        let labels = BTreeMap::from([
            ("app.kubernetes.io/managed-by".to_owned(), MANAGED_BY.to_owned()),
            ("baton.dev/service".to_owned(), job.deploy.service.clone()),
        ]);
        let record = cluster::record_before(applier, &name, &labels, &job.deploy.commit_sha, objects).await?;
        Ok((name, record))
    }

    /// Staging's objects against production's manifests at the same commit.
    async fn topology(&self, p: &Params, source: &std::path::Path, staging: &[DynamicObject]) -> Vec<String> {
        if p.production_manifests_dir.is_empty() {
            return Vec::new();
        }
        let dir = source.join(&p.production_manifests_dir);
        if !dir.is_dir() {
            return vec![format!(
                "not compared with production: {} is not in the repository",
                p.production_manifests_dir
            )];
        }
        match cluster::kustomize(&self.config.kubectl, &dir).await {
            Err(detail) => vec![format!(
                "not compared with production: {} does not render: {detail}",
                p.production_manifests_dir
            )],
            Ok(yaml) => match cluster::parse_manifests(&p.production_manifests_dir, &yaml) {
                Ok(production) => topology_differences(staging, &production),
                Err(e) => vec![format!("not compared with production: {e}")],
            },
        }
    }

    async fn watch(&self, client: &Client, ns: &str, names: &[String]) -> Result<Vec<RolloutFigures>, Error> {
        let mut figures = Vec::new();
        for name in names {
            let wait = Duration::from_secs(self.config.rollout_timeout_secs);
            match cluster::watch_rollout(client, ns, name, self.config.limits(), wait, self.config.poll()).await? {
                Ok(f) => figures.push(f),
                Err(failure) => return Err(Error::Rollout(failure)),
            }
        }
        Ok(figures)
    }

    async fn verify(&self, job: &StepJob) -> Result<VerifyOutputs, Error> {
        let p = Self::params(job)?;
        let commit = job.deploy.commit_sha.clone();
        git::check_commit(&commit)?;
        let service = &job.deploy.service;
        let ns = self.config.namespace(service);
        let client = cluster::connect(&self.config.kubeconfig).await?;

        let scratch = git::JobDir::new(&self.config.work_dir, job).map_err(io("cannot create the job's directory"))?;
        let source = scratch.path().join("source");
        self.git.export(&job.deploy.repository, &commit, ".", &source).await?;
        let checks_path = source.join(&p.checks_file);
        let text = std::fs::read_to_string(&checks_path).map_err(|e| Error::Checks {
            file: p.checks_file.clone(),
            problem: format!("cannot read it at commit {commit}: {e}"),
        })?;
        let checks = Checks::parse(&p.checks_file, &text)?;
        let dir = source.join(&p.manifests_dir);
        if !dir.is_dir() {
            return Err(Error::Source(git::GitError::FolderNotFound {
                dir: p.manifests_dir.clone(),
                commit: commit.clone(),
            }));
        }
        let yaml = cluster::kustomize(&self.config.kubectl, &dir)
            .await
            .map_err(|detail| Error::Render {
                dir: p.manifests_dir.clone(),
                detail,
            })?;
        let mut objects =
            cluster::parse_manifests(&p.manifests_dir, &yaml).map_err(|e| Error::Manifests(e.to_string()))?;
        if objects.is_empty() {
            return Err(Error::Manifests(format!("{} renders no objects", p.manifests_dir)));
        }
        for obj in &objects {
            if let Some(other) = obj.metadata.namespace.as_deref()
                && other != ns
            {
                return Err(Error::Manifests(format!(
                    "{} names namespace {other}; staging deploys {service} to {ns}",
                    cluster::describe(obj)
                )));
            }
        }
        let (repo, digest) = self.image(job, &objects, &client, &ns).await?;
        if set_image(&mut objects, &repo, &digest) == 0 {
            return Err(Error::Manifests(format!(
                "no container in {} runs {repo}: the verified image would not be deployed",
                p.manifests_dir
            )));
        }
        if cluster::deployments_running(&objects, &format!("{repo}@{digest}")).is_empty() {
            return Err(Error::Manifests(format!(
                "no Deployment in {} runs {repo}: only Deployments' rollouts are watched and rolled back, \
                 so the image must run in one",
                p.manifests_dir
            )));
        }
        for obj in &mut objects {
            let a = obj.metadata.annotations.get_or_insert_with(Default::default);
            a.insert(cluster::RUN_ANNOTATION.into(), job.run_id.to_string());
            a.insert("baton.dev/step".into(), job.step_id.clone());
            a.insert("baton.dev/commit".into(), commit.clone());
        }

        let mut applier = Applier::new(client.clone(), &ns, MANAGER);
        let (record_name, record) = self.record(&mut applier, job, &objects).await?;
        let differences = differences(&record, &objects);
        let topology = self.topology(&p, &source, &objects).await;
        if !topology.is_empty() {
            tracing::warn!(run_id = %job.run_id, differences = ?topology, "staging does not mirror production's topology");
        }
        let mut applied = Vec::new();
        for obj in &objects {
            applier.apply(obj).await?;
            applied.push(cluster::describe(obj));
        }
        tracing::info!(run_id = %job.run_id, namespace = %ns, objects = applied.len(), "staging deployed");

        let names = deployments(&objects);
        let rollouts = self.watch(&client, &ns, &names).await?;

        let http = self.http()?;
        let base = self.config.base_url(service);
        let smoke = checks::smoke(&http, &base, &checks.smoke).await?;

        let image = format!("{repo}@{digest}");
        let integration = match &checks.integration {
            Some(it) => Some(self.integration(&client, &ns, job, it, &image, &base).await?),
            None => None,
        };

        let requests = checks.performance.requests.unwrap_or(50);
        let performance = checks::measure(&http, &base, &checks.endpoints(), requests).await?;
        let baseline = self.baseline(&client, &ns, service).await?;
        let mut regression_percent = 0.0;
        let mut compared_with = None;
        if let Some(b) = &baseline
            && let Some((endpoint, percent)) =
                checks::regression(&performance, &b.endpoints, self.config.noise_floor_ms)
        {
            regression_percent = percent;
            compared_with = Some(b.commit.clone());
            if percent > p.max_regression_percent {
                return Err(Error::Regression {
                    now_ms: performance[&endpoint].p95_ms,
                    baseline_ms: b.endpoints[&endpoint].p95_ms,
                    endpoint,
                    baseline_commit: b.commit.clone(),
                    percent,
                    limit: p.max_regression_percent,
                });
            }
        }

        let soak = self
            .soak(
                &client,
                &ns,
                &names,
                &http,
                &base,
                &checks,
                &p,
                self.config
                    .soak_seconds
                    .map(Duration::from_secs)
                    .unwrap_or_else(|| p.soak(job.deploy.risk)),
            )
            .await?;
        let (rollback_seconds, roll_forward_seconds, first_deployment) =
            self.rehearse(&client, &ns, &names, &record).await?;

        // Endpoints measured now replace their figures; the others keep theirs.
        let mut endpoints = baseline.as_ref().map(|b| b.endpoints.clone()).unwrap_or_default();
        endpoints.extend(performance.clone());
        let new_baseline = Baseline {
            commit: commit.clone(),
            run_id: job.run_id.to_string(),
            endpoints,
        };
        let cm = bookkeeping(&baseline_name(service), service, "baseline.json", &new_baseline);
        Api::<ConfigMap>::namespaced(client.clone(), &ns)
            .patch(
                &baseline_name(service),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&cm),
            )
            .await
            .map_err(ClusterError::api("cannot store the performance baseline"))?;

        Ok(VerifyOutputs {
            facts: StagingVerified {
                image_digest: digest,
                regression_percent,
                image: Some(image),
                soak_seconds: soak.seconds,
                rollback_tested: rollback_seconds.is_some(),
                rollback_seconds,
                first_deployment,
            },
            namespace: ns,
            commit,
            previous: record
                .entries
                .iter()
                .map(|e| PreviousObject {
                    object: e.describe(),
                    existed: e.previous.is_some(),
                    revision: e.revision,
                })
                .collect(),
            record: record_name,
            applied,
            rollouts,
            smoke,
            integration,
            performance,
            baseline_commit: compared_with,
            differences,
            topology,
            soak,
            roll_forward_seconds,
        })
    }

    async fn baseline(&self, client: &Client, ns: &str, service: &str) -> Result<Option<Baseline>, Error> {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        let name = baseline_name(service);
        match api
            .get_opt(&name)
            .await
            .map_err(ClusterError::api(format!("cannot read ConfigMap/{name}")))?
        {
            Some(cm) => Ok(Some(cm_value(&cm, "baseline.json")?)),
            None => Ok(None),
        }
    }

    /// Runs the integration tests as a Job and waits for its verdict.
    async fn integration(
        &self,
        client: &Client,
        ns: &str,
        job: &StepJob,
        it: &Integration,
        verified: &str,
        base: &str,
    ) -> Result<IntegrationOutcome, Error> {
        let key = format!("{}/{}/{}", job.run_id, job.step_id, job.attempt);
        let name = format!("baton-it-{}", &hex::encode(sha2::Sha256::digest(key.as_bytes()))[..12]);
        let image = it.image.clone().unwrap_or_else(|| verified.to_owned());
        let env: Vec<Value> = it
            .env
            .iter()
            .map(|(k, v)| json!({"name": k, "value": v.replace("{base_url}", base)}))
            .chain([json!({"name": "BASE_URL", "value": base})])
            .collect();
        let manifest: Job = serde_json::from_value(json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": MANAGED_BY},
                         "annotations": {"baton.dev/run": job.run_id.to_string(), "baton.dev/step": job.step_id}},
            "spec": {"backoffLimit": 0, "activeDeadlineSeconds": it.timeout_secs,
                     "template": {"metadata": {"labels": {"app.kubernetes.io/managed-by": MANAGED_BY}},
                                  "spec": {"restartPolicy": "Never", "containers": [{
                                      "name": "tests", "image": image, "command": it.command, "env": env}]}}}
        }))
        .map_err(|e| Error::Io {
            what: "the integration Job".into(),
            detail: e.to_string(),
        })?;
        let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
        match jobs.create(&PostParams::default(), &manifest).await {
            Ok(_) => {}
            // A redelivered job: the Job of this attempt runs already.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(ClusterError::api(format!("cannot create Job/{name}"))(e).into()),
        }
        let started = Instant::now();
        let wait = Duration::from_secs(it.timeout_secs + 60);
        loop {
            let j = jobs
                .get(&name)
                .await
                .map_err(ClusterError::api(format!("cannot read Job/{name}")))?;
            let condition = |t: &str| {
                j.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|c| c.iter().find(|c| c.type_ == t && c.status == "True"))
                    .cloned()
            };
            if condition("Complete").is_some() {
                return Ok(IntegrationOutcome {
                    job: name,
                    image,
                    seconds: started.elapsed().as_secs_f64(),
                });
            }
            if let Some(c) = condition("Failed") {
                let tail = self.job_log(client, ns, &name).await;
                return Err(Error::Integration(format!(
                    "Job/{name} ({}) failed: {}{}; log tail: {tail}",
                    it.command.join(" "),
                    c.reason.as_deref().unwrap_or("no reason given"),
                    c.message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default(),
                )));
            }
            if started.elapsed() >= wait {
                return Err(Error::Integration(format!(
                    "Job/{name} did not finish within {} s",
                    wait.as_secs()
                )));
            }
            tokio::time::sleep(self.config.poll()).await;
        }
    }

    /// The last lines the Job's pod logged, or why they cannot be read.
    async fn job_log(&self, client: &Client, ns: &str, job: &str) -> String {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let list = match pods
            .list(&ListParams::default().labels(&format!("job-name={job}")))
            .await
        {
            Ok(l) => l.items,
            Err(e) => return format!("(its pods cannot be listed: {e})"),
        };
        let Some(pod) = list.first() else {
            return "(no pod ran)".to_owned();
        };
        let lp = LogParams {
            tail_lines: Some(20),
            ..LogParams::default()
        };
        match pods.logs(&pod.name_any(), &lp).await {
            Ok(text) if text.trim().is_empty() => "(empty)".to_owned(),
            Ok(text) => checks::excerpt(&text),
            Err(e) => format!("(the log of pod {} cannot be read: {e})", pod.name_any()),
        }
    }

    /// Watches the deployment for `duration`: rollouts stay complete, pods
    /// stay ready without restarting, and the first smoke check keeps passing.
    #[allow(clippy::too_many_arguments)]
    async fn soak(
        &self,
        client: &Client,
        ns: &str,
        names: &[String],
        http: &reqwest::Client,
        base: &str,
        checks: &Checks,
        p: &Params,
        duration: Duration,
    ) -> Result<SoakFigures, Error> {
        let watch = cluster::HealthWatch::start(client, ns, names, self.config.limits()).await?;
        let probe = &checks.smoke[0];
        let url = format!("{base}{}", probe.path);
        let started = Instant::now();
        let mut figures = SoakFigures::default();
        let fail = |why: String, started: Instant| Error::Soak {
            after_secs: started.elapsed().as_secs(),
            soak_secs: duration.as_secs(),
            why,
        };
        while started.elapsed() < duration {
            tokio::time::sleep(self.config.poll().min(duration.saturating_sub(started.elapsed()))).await;
            if let Some(problem) = watch.check().await? {
                return Err(fail(problem, started));
            }
            figures.requests += 1;
            let ok = matches!(checks::request(http, &probe.method, &url).await, Ok((s, _, _)) if s == probe.status);
            if !ok {
                figures.errors += 1;
            }
            // Judged once ten requests give the rate some meaning, and at
            // the end whatever their number: errors are never waved through
            // because the soak was short or the machine slow.
            let over = figures.errors as f64 * 100.0 / figures.requests as f64 > p.max_error_percent;
            let last = started.elapsed() >= duration;
            if over && (figures.requests >= 10 || last) {
                return Err(fail(
                    format!(
                        "{} of {} requests to {} {url} failed ({:.1} %, limit {} %)",
                        figures.errors,
                        figures.requests,
                        probe.method,
                        figures.errors as f64 * 100.0 / figures.requests as f64,
                        p.max_error_percent
                    ),
                    started,
                ));
            }
        }
        figures.seconds = duration.as_secs();
        Ok(figures)
    }

    /// Rolls each Deployment back to its previous revision and forward again;
    /// the slowest rollback and roll-forward, or none on a first deployment.
    async fn rehearse(
        &self,
        client: &Client,
        ns: &str,
        names: &[String],
        record: &Record,
    ) -> Result<(Option<f64>, Option<f64>, bool), Error> {
        let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
        let (mut back_max, mut forward_max) = (0.0f64, 0.0f64);
        let mut rehearsed = false;
        for name in names {
            let read = || async {
                api.get(name)
                    .await
                    .map_err(ClusterError::api(format!("cannot read Deployment/{name}")))
            };
            let d = read().await?;
            let current = cluster::revision_of(d.annotations());
            // Only a Deployment this deploy created has nothing to go back to.
            let created = record
                .entries
                .iter()
                .any(|e| e.kind == "Deployment" && e.name == *name && e.previous.is_none());
            let Some(previous) = cluster::revision(client, ns, &d, None).await? else {
                if created {
                    continue;
                }
                return Err(Error::Rehearsal(format!(
                    "Deployment/{name} existed before this deploy but has no earlier revision to roll back to \
                     (its revisionHistoryLimit is 0, or its history was lost): the rollback cannot be rehearsed"
                )));
            };
            let Some(now) = cluster::revision(client, ns, &d, Some(current)).await? else {
                return Err(Error::Rehearsal(format!(
                    "Deployment/{name}: the ReplicaSet of its current revision {current} is gone"
                )));
            };
            let started = Instant::now();
            cluster::undo(client, ns, &d, &previous, None).await?;
            self.watch(client, ns, std::slice::from_ref(name)).await.map_err(|e| {
                Error::Rehearsal(format!("Deployment/{name} back to revision {}: {e}", previous.number))
            })?;
            back_max = back_max.max(started.elapsed().as_secs_f64());
            let d = read().await?;
            let started = Instant::now();
            cluster::undo(client, ns, &d, &now, None).await?;
            self.watch(client, ns, std::slice::from_ref(name))
                .await
                .map_err(|e| Error::Rehearsal(format!("Deployment/{name} forward again: {e}")))?;
            forward_max = forward_max.max(started.elapsed().as_secs_f64());
            rehearsed = true;
        }
        if rehearsed {
            Ok((Some(round(back_max)), Some(round(forward_max)), false))
        } else {
            Ok((None, None, !names.is_empty()))
        }
    }

    async fn redeploy_previous(&self, job: &StepJob) -> Result<RedeployOutputs, Error> {
        let ns = self.config.namespace(&job.deploy.service);
        let client = cluster::connect(&self.config.kubeconfig).await?;
        let Some(record) = cluster::read_record(&client, &ns, &record_name(job)).await? else {
            return Ok(RedeployOutputs {
                reverted: false,
                restored: Vec::new(),
                deleted: Vec::new(),
                rollouts: Vec::new(),
                note: "the step recorded nothing, so it deployed nothing".to_owned(),
            });
        };
        let mut applier = Applier::new(client.clone(), &ns, MANAGER);
        let done = cluster::restore(&mut applier, &record, &job.run_id.to_string(), &[]).await?;
        let names: Vec<String> = record
            .entries
            .iter()
            .filter(|e| e.kind == "Deployment" && e.previous.is_some())
            .map(|e| e.name.clone())
            .collect();
        let rollouts = self.watch(&client, &ns, &names).await?;
        Ok(RedeployOutputs {
            reverted: true,
            restored: done.restored,
            deleted: done.deleted,
            rollouts,
            note: String::new(),
        })
    }
}

fn round(secs: f64) -> f64 {
    (secs * 100.0).round() / 100.0
}

impl Role for StagingVerify {
    fn name(&self) -> &str {
        roles::STAGING_VERIFY
    }

    fn execute<'a>(&'a self, job: &'a StepJob, _ctx: &'a ExecContext) -> BoxFuture<'a, Outcome> {
        // Cancellation drops this future; what it applied so far is undone by
        // `redeploy-previous` from the record made before anything changed.
        Box::pin(async move { kit::outcome(job, self.run(job).await) })
    }

    fn compensate<'a>(&'a self, job: &'a StepJob, _ctx: &'a ExecContext) -> BoxFuture<'a, Outcome> {
        Box::pin(async move { kit::outcome(job, self.run(job).await) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_must_mirror_productions_services_keys_and_policies() {
        let staging = cluster::parse_manifests(
            "s",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {A: 'staging', DEBUG: '1'}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n",
        )
        .unwrap();
        let production = cluster::parse_manifests(
            "p",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: worker}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {A: 'production'}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress]}\n",
        )
        .unwrap();
        assert_eq!(
            topology_differences(&staging, &production),
            [
                "ConfigMap/cfg: key DEBUG is in staging, not in production",
                "Deployment/worker is in production, not in staging",
                "NetworkPolicy/deny differs between staging and production",
            ]
        );
        // Different values are expected: only the structure is compared.
        assert!(topology_differences(&production, &production).is_empty());
    }

    #[test]
    fn differences_name_keys_resources_and_policies() {
        let objs = cluster::parse_manifests(
            "t",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {a: '1', c: '3'}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow}\nspec: {podSelector: {}}\n",
        )
        .unwrap();
        let record = Record {
            commit: "x".into(),
            entries: vec![
                cluster::RecordEntry {
                    api_version: "v1".into(),
                    kind: "ConfigMap".into(),
                    name: "cfg".into(),
                    previous: Some(json!({"data": {"a": "0", "b": "2"}})),
                    revision: None,
                },
                cluster::RecordEntry {
                    api_version: "networking.k8s.io/v1".into(),
                    kind: "NetworkPolicy".into(),
                    name: "allow".into(),
                    previous: None,
                    revision: None,
                },
            ],
        };
        assert_eq!(
            differences(&record, &objs),
            [
                "ConfigMap/cfg: key c added",
                "ConfigMap/cfg: key b removed",
                "ConfigMap/cfg: key a changed",
                "NetworkPolicy/allow is new"
            ]
        );
    }
}
