//! The `production-apply` role: `apply` and the `rollback-replicaset`
//! compensation (see the crate documentation).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use baton_shared::cluster::{self, Applier, ClusterError, RolloutFigures, deployments, repository, set_image};
use baton_shared::facts::{FactSet, StagingVerified};
use baton_shared::git::{self, GitCache};
use baton_shared::kit;
use baton_shared::protocol::{self, Fields, JobKind, StepJob};
use baton_shared::roles;
use baton_shared::runtime::{BoxFuture, ExecContext, Outcome, Role};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::DynamicObject;
use kube::{Client, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::ApplyConfig;
use crate::error::Error;
use crate::monitor;

/// The field manager of everything this role applies.
pub const MANAGER: &str = "baton";
const MANAGED_BY: &str = "baton-production-apply";
/// The revision a Deployment had before this step applied it (for people),
/// and its pod template hash (what a rollback finds it by: a rollback gives
/// the old ReplicaSet a new revision number).
const PREVIOUS_REVISION: &str = "baton.dev/previous-revision";
const PREVIOUS_HASH: &str = "baton.dev/previous-template-hash";

/// What a Deployment ran before this step: none, it created it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Previous {
    pub revision: u64,
    pub template_hash: Option<String>,
}

/// The step's parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    pub manifests_dir: String,
    pub max_surge: u32,
    pub max_unavailable: u32,
    pub min_ready_seconds: u32,
    pub progress_deadline_seconds: u32,
    pub monitor_minutes: u64,
    /// Overrides the minutes (short demos and tests).
    pub monitor_seconds: Option<u64>,
    pub rollback_max_seconds: u64,
    /// Failed requests in percent (from Prometheus) above which it rolls back.
    pub max_error_percent: f64,
    /// p95 latency in milliseconds (from Prometheus) above which it rolls back.
    pub max_p95_ms: Option<f64>,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            manifests_dir: "deploy/production".to_owned(),
            max_surge: 1,
            max_unavailable: 0,
            min_ready_seconds: 30,
            progress_deadline_seconds: 300,
            monitor_minutes: 15,
            monitor_seconds: None,
            rollback_max_seconds: 60,
            max_error_percent: 1.0,
            max_p95_ms: None,
        }
    }
}

impl Params {
    fn monitor(&self) -> Duration {
        Duration::from_secs(self.monitor_seconds.unwrap_or(self.monitor_minutes * 60))
    }
}

/// A Deployment this step changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentChange {
    pub name: String,
    /// 0: the step created it.
    pub revision_before: u64,
    /// The pod template hash of the revision before (none: created).
    #[serde(default)]
    pub template_hash_before: Option<String>,
    pub revision_after: u64,
    pub replica_set_before: Option<String>,
    pub replica_set_after: Option<String>,
}

/// What the monitoring period saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MonitorFigures {
    pub seconds: u64,
    pub polls: u64,
    /// Whether metrics were watched (`[apply.prometheus]`) or only the API.
    pub metrics: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_percent_seen: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p95_ms_seen: Option<f64>,
    /// Polls at which a query had no data yet.
    pub no_data: u64,
}

/// The rolling update the step enforced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Strategy {
    pub max_surge: u32,
    pub max_unavailable: u32,
    pub min_ready_seconds: u32,
    pub progress_deadline_seconds: u32,
}

/// Where an apply's time went, in milliseconds: the daemon's own work before
/// the first object is applied (git, rendering, the record), the rollout, the
/// monitoring period, and the daemon's own work from the rollout's completion
/// to the result (less the monitoring period it is configured to wait).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub to_first_apply_ms: f64,
    pub rollout_ms: f64,
    pub monitor_ms: f64,
    pub after_ms: f64,
}

/// What `apply` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplyOutputs {
    pub image: String,
    pub image_digest: String,
    pub namespace: String,
    pub commit: String,
    pub record: String,
    pub deployments: Vec<DeploymentChange>,
    pub rollouts: Vec<RolloutFigures>,
    pub strategy: Strategy,
    pub monitoring: MonitorFigures,
    pub timings: Timings,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// What changed in production outside the pipeline since the last apply
    /// or rollback of this service, found before this one changed anything
    /// (the seed: production changes only through the pipeline).
    #[serde(default)]
    pub drift: Vec<String>,
}

/// One Deployment's way back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolledBack {
    pub name: String,
    pub from_revision: u64,
    /// 0: the step created the Deployment, and it was deleted.
    pub to_revision: u64,
    pub seconds: f64,
}

/// What a rollback did (the compensation's outputs, and the figures a failed
/// apply names in its error).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RollbackOutputs {
    pub rolled_back: bool,
    pub deployments: Vec<RolledBack>,
    pub restored: Vec<String>,
    pub deleted: Vec<String>,
    pub seconds: f64,
    pub budget_seconds: u64,
    pub over_budget: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

impl RollbackOutputs {
    fn summary(&self) -> String {
        if self.deployments.is_empty() && self.restored.is_empty() && self.deleted.is_empty() {
            return "nothing needed rolling back".to_owned();
        }
        let each: Vec<String> = self
            .deployments
            .iter()
            .map(|d| match d.to_revision {
                0 => format!("Deployment/{} (new) deleted", d.name),
                to => format!(
                    "Deployment/{} rolled back from revision {} to {to}",
                    d.name, d.from_revision
                ),
            })
            .collect();
        format!(
            "rolled back in {:.1} s ({} the {} s budget): {}",
            self.seconds,
            if self.over_budget { "over" } else { "within" },
            self.budget_seconds,
            each.join(", ")
        )
    }
}

/// The production-apply role, built from `[apply]`.
#[derive(Debug, Clone)]
pub struct ProductionApply {
    config: ApplyConfig,
    git: GitCache,
}

fn outputs<T: Serialize>(value: &T) -> Result<Fields, Error> {
    protocol::to_fields(value).map_err(|e| Error::Io {
        what: "outputs".into(),
        detail: e.message,
    })
}

fn record_name(job: &StepJob) -> String {
    format!("baton-apply.{}", job.key())
}

/// The Secret holding what the last apply or rollback of `service` left.
fn left_name(service: &str) -> String {
    format!("baton-production-applied.{service}")
}

/// What the last apply or rollback of a service left in production, to find
/// what changed outside the pipeline before the next one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Left {
    run: String,
    objects: Vec<cluster::LeftAs>,
}

/// Sets the pipeline's rolling update on every Deployment; a warning for each
/// value a manifest set otherwise.
pub fn enforce_strategy(objects: &mut [DynamicObject], s: &Strategy) -> Vec<String> {
    let mut warnings = Vec::new();
    for obj in objects.iter_mut().filter(|o| cluster::kind_of(o) == "Deployment") {
        let what = cluster::describe(obj);
        let spec = obj
            .data
            .as_object_mut()
            .and_then(|d| d.entry("spec").or_insert_with(|| json!({})).as_object_mut());
        let Some(spec) = spec else { continue };
        let wanted = [
            ("/strategy/type", json!("RollingUpdate")),
            ("/strategy/rollingUpdate/maxSurge", json!(s.max_surge)),
            ("/strategy/rollingUpdate/maxUnavailable", json!(s.max_unavailable)),
            ("/minReadySeconds", json!(s.min_ready_seconds)),
            ("/progressDeadlineSeconds", json!(s.progress_deadline_seconds)),
        ];
        let current = Value::Object(spec.clone());
        for (pointer, value) in &wanted {
            if let Some(found) = current.pointer(pointer)
                && found != value
            {
                warnings.push(format!(
                    "{what}: spec{} is {found} in the manifest; set to {value}, the pipeline's rolling update",
                    pointer.replace('/', ".")
                ));
            }
        }
        spec.insert(
            "strategy".into(),
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": s.max_surge, "maxUnavailable": s.max_unavailable}}),
        );
        spec.insert("minReadySeconds".into(), json!(s.min_ready_seconds));
        spec.insert("progressDeadlineSeconds".into(), json!(s.progress_deadline_seconds));
    }
    warnings
}

/// The strategy a rollback uses: every replica of the known-good revision at
/// once, counted available as soon as it is ready.
fn rollback_strategy() -> Value {
    json!({
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "100%", "maxUnavailable": 0}},
        "minReadySeconds": 0,
    })
}

impl ProductionApply {
    pub fn new(config: ApplyConfig) -> Self {
        Self {
            git: GitCache::new(config.repos_dir.clone()),
            config,
        }
    }

    /// Runs a job to its outputs; the `Role` methods wrap this.
    pub async fn run(&self, job: &StepJob) -> Result<Fields, Error> {
        match (job.kind, job.action.as_str()) {
            (JobKind::Execute, "apply") => outputs(&self.apply(job).await?),
            (JobKind::Compensate, "rollback-replicaset") => outputs(&self.rollback_replicaset(job).await?),
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
        let bad = |name: &str, problem: &str| Error::InvalidParam {
            name: name.to_owned(),
            problem: problem.to_owned(),
        };
        if p.max_surge == 0 && p.max_unavailable == 0 {
            return Err(bad(
                "max_surge",
                "and max_unavailable cannot both be 0: the rollout could not move",
            ));
        }
        if p.progress_deadline_seconds <= p.min_ready_seconds {
            return Err(bad(
                "progress_deadline_seconds",
                "must be greater than min_ready_seconds (Kubernetes refuses it otherwise)",
            ));
        }
        if p.rollback_max_seconds == 0 {
            return Err(bad("rollback_max_seconds", "must be at least 1"));
        }
        if !(p.max_error_percent.is_finite() && (0.0..=100.0).contains(&p.max_error_percent)) {
            return Err(bad("max_error_percent", "must be between 0 and 100"));
        }
        if p.max_p95_ms.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
            return Err(bad("max_p95_ms", "must be a positive number"));
        }
        Ok(p)
    }

    /// The image staging verified, from the staging-verify input step.
    fn verified(job: &StepJob) -> Result<(String, String), Error> {
        for (step, fields) in &job.inputs {
            if let Ok(v) = StagingVerified::read(step, fields) {
                let Some(image) = v.image else {
                    return Err(Error::NoImage(format!(
                        "{step} verified digest {} without naming the image",
                        v.image_digest
                    )));
                };
                return Ok((repository(&image).to_owned(), v.image_digest));
            }
        }
        Err(Error::NoImage(
            "production deploys only an image staging verified, and no input step reported one (does this step need the staging verification?)"
                .to_owned(),
        ))
    }

    async fn apply(&self, job: &StepJob) -> Result<ApplyOutputs, Error> {
        let started = Instant::now();
        let ms = |since: Instant| since.elapsed().as_secs_f64() * 1000.0;
        let mut timings = Timings::default();
        let p = Self::params(job)?;
        let (repo, digest) = Self::verified(job)?;
        let commit = job.deploy.commit_sha.clone();
        git::check_commit(&commit)?;
        let service = &job.deploy.service;
        let ns = self.config.namespace(service);
        let client = cluster::connect(&self.config.kubeconfig).await?;

        let scratch = git::JobDir::new(&self.config.work_dir, job).map_err(|e| Error::Io {
            what: "cannot create the job's directory".into(),
            detail: e.to_string(),
        })?;
        let source = scratch.path().join("source");
        self.git.export(&job.deploy.repository, &commit, ".", &source).await?;
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
        for obj in &objects {
            if let Some(other) = obj.metadata.namespace.as_deref()
                && other != ns
            {
                return Err(Error::Manifests(format!(
                    "{} names namespace {other}; production deploys {service} to {ns}",
                    cluster::describe(obj)
                )));
            }
        }
        let image = format!("{repo}@{digest}");
        if set_image(&mut objects, &repo, &digest) == 0 {
            return Err(Error::Manifests(format!(
                "no container in {} runs {repo}: the image staging verified would not be deployed",
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
        let strategy = Strategy {
            max_surge: p.max_surge,
            max_unavailable: p.max_unavailable,
            min_ready_seconds: p.min_ready_seconds,
            progress_deadline_seconds: p.progress_deadline_seconds,
        };
        let mut warnings = enforce_strategy(&mut objects, &strategy);
        let names = deployments(&objects);

        let mut applier = Applier::new(client.clone(), &ns, MANAGER);
        let labels = BTreeMap::from([
            ("app.kubernetes.io/managed-by".to_owned(), MANAGED_BY.to_owned()),
            ("baton.dev/service".to_owned(), service.clone()),
        ]);
        let record_name = record_name(job);
        let drift = match cluster::read_json::<Left>(&client, &ns, &left_name(service)).await? {
            Some(left) if left.run != job.run_id.to_string() => {
                cluster::changed_since(&client, &left.objects, &left.run).await?
            }
            _ => Vec::new(),
        };
        for d in &drift {
            warnings.push(format!("changed outside the pipeline: {d}"));
        }
        cluster::record_before(&mut applier, &record_name, &labels, &commit, &objects).await?;

        // The revision each Deployment replaces: from a redelivered job's own
        // annotation, else what runs now.
        let api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let run = job.run_id.to_string();
        let mut before: BTreeMap<String, Previous> = BTreeMap::new();
        for name in &names {
            let live = api
                .get_opt(name)
                .await
                .map_err(ClusterError::api(format!("cannot read Deployment/{name}")))?;
            let previous = match &live {
                Some(d) if d.annotations().get(cluster::RUN_ANNOTATION) == Some(&run) => Previous {
                    revision: d
                        .annotations()
                        .get(PREVIOUS_REVISION)
                        .and_then(|r| r.parse().ok())
                        .unwrap_or(0),
                    template_hash: d.annotations().get(PREVIOUS_HASH).filter(|h| !h.is_empty()).cloned(),
                },
                Some(d) => Previous {
                    revision: cluster::revision_of(d.annotations()),
                    template_hash: cluster::current_template_hash(&client, &ns, d).await?,
                },
                None => Previous::default(),
            };
            before.insert(name.clone(), previous);
        }
        for obj in &mut objects {
            let previous = (cluster::kind_of(obj) == "Deployment").then(|| before[&obj.name_any()].clone());
            let a = obj.metadata.annotations.get_or_insert_with(Default::default);
            a.insert(cluster::RUN_ANNOTATION.into(), run.clone());
            a.insert("baton.dev/step".into(), job.step_id.clone());
            a.insert("baton.dev/commit".into(), commit.clone());
            if let Some(previous) = previous {
                a.insert(PREVIOUS_REVISION.into(), previous.revision.to_string());
                a.insert(PREVIOUS_HASH.into(), previous.template_hash.unwrap_or_default());
            }
        }
        for (i, obj) in objects.iter().enumerate() {
            if i == 0 {
                timings.to_first_apply_ms = ms(started);
            }
            applier.apply(obj).await?;
        }
        tracing::info!(run_id = %job.run_id, namespace = %ns, image = %image, "production applied");

        // What runs is what staging verified (a mutating webhook or another
        // writer could have changed it).
        for name in &names {
            let d = api
                .get(name)
                .await
                .map_err(ClusterError::api(format!("cannot read Deployment/{name}")))?;
            let wrong: Vec<String> = d
                .spec
                .and_then(|s| s.template.spec)
                .map(|s| s.containers)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|c| c.image)
                .filter(|i| repository(i) == repo && *i != image)
                .collect();
            if !wrong.is_empty() {
                let rollback = self
                    .undo_after_failure(job, &client, &ns, &before, &strategy, p.rollback_max_seconds)
                    .await;
                return Err(Error::ImageMismatch(format!(
                    "Deployment/{name} runs {} after the apply, not {image} which staging verified; {rollback}",
                    wrong.join(", "),
                )));
            }
        }

        let mut rollouts = Vec::new();
        let rollout_started = Instant::now();
        let wait = Duration::from_secs(u64::from(p.progress_deadline_seconds) + 60);
        for name in &names {
            match cluster::watch_rollout(&client, &ns, name, self.config.limits(), wait, self.config.poll()).await? {
                Ok(f) => rollouts.push(f),
                Err(failure) => {
                    let rollback = self
                        .undo_after_failure(job, &client, &ns, &before, &strategy, p.rollback_max_seconds)
                        .await;
                    return Err(Error::Rollout { failure, rollback });
                }
            }
        }
        timings.rollout_ms = ms(rollout_started);
        let rollout_done = Instant::now();
        let mut changes = Vec::new();
        for name in &names {
            let d = api
                .get(name)
                .await
                .map_err(ClusterError::api(format!("cannot read Deployment/{name}")))?;
            let sets = cluster::replica_sets(&client, &ns, &d).await?;
            let rs = |rev: u64| {
                sets.iter()
                    .find(|rs| cluster::revision_of(rs.annotations()) == rev)
                    .map(|rs| rs.name_any())
            };
            let after = cluster::revision_of(d.annotations());
            let hash = before[name].template_hash.clone();
            changes.push(DeploymentChange {
                name: name.clone(),
                revision_before: before[name].revision,
                replica_set_before: hash.as_ref().and_then(|h| {
                    sets.iter()
                        .find(|rs| rs.labels().get(cluster::POD_TEMPLATE_HASH) == Some(h))
                        .map(|rs| rs.name_any())
                }),
                template_hash_before: hash,
                revision_after: after,
                replica_set_after: rs(after),
            });
        }

        let monitor_started = Instant::now();
        let monitoring = match self.monitor(&client, &ns, &names, &p, service).await? {
            Ok(figures) => figures,
            Err((after_secs, why)) => {
                let rollback = self
                    .undo_after_failure(job, &client, &ns, &before, &strategy, p.rollback_max_seconds)
                    .await;
                return Err(Error::Monitoring {
                    after_secs,
                    why,
                    rollback,
                });
            }
        };
        timings.monitor_ms = ms(monitor_started);
        if monitoring.metrics && monitoring.max_error_percent_seen.is_none() {
            warnings.push(format!(
                "Prometheus had no error-rate data during the {} s of monitoring: only rollout, readiness and restarts were watched",
                monitoring.seconds
            ));
        }
        if !monitoring.metrics {
            warnings.push(
                "no metrics were watched while monitoring (no [apply.prometheus]): only rollout, readiness and restarts"
                    .to_owned(),
            );
        }
        // From the rollout's completion to the result, less the monitoring
        // period the step is configured to wait.
        timings.after_ms = (ms(rollout_done) - monitoring.seconds as f64 * 1000.0).max(0.0);
        self.save_left(&client, &ns, job, &objects).await?;
        Ok(ApplyOutputs {
            timings,
            image,
            image_digest: digest,
            namespace: ns,
            commit,
            record: record_name,
            deployments: changes,
            rollouts,
            strategy,
            monitoring,
            warnings,
            drift,
        })
    }

    /// Keeps what `objects` are now as what this run left.
    async fn save_left(
        &self,
        client: &Client,
        ns: &str,
        job: &StepJob,
        objects: &[DynamicObject],
    ) -> Result<(), Error> {
        let mut applier = Applier::new(client.clone(), ns, MANAGER);
        let mut left = Vec::new();
        for o in objects {
            if let Some(live) = applier.get(o).await? {
                left.push(cluster::LeftAs::of(&live, ns));
            }
        }
        let labels = BTreeMap::from([
            ("app.kubernetes.io/managed-by".to_owned(), MANAGED_BY.to_owned()),
            ("baton.dev/service".to_owned(), job.deploy.service.clone()),
        ]);
        let value = Left {
            run: job.run_id.to_string(),
            objects: left,
        };
        cluster::put_json(client, ns, &left_name(&job.deploy.service), &labels, &value, MANAGER).await?;
        Ok(())
    }

    /// Watches the new revision for the monitoring period; `Err` is a breach
    /// (after how long, and what).
    async fn monitor(
        &self,
        client: &Client,
        ns: &str,
        names: &[String],
        p: &Params,
        service: &str,
    ) -> Result<Result<MonitorFigures, (u64, String)>, Error> {
        let duration = self
            .config
            .monitor_seconds
            .map(Duration::from_secs)
            .unwrap_or_else(|| p.monitor());
        let watch = cluster::HealthWatch::start(client, ns, names, self.config.limits()).await?;
        let http = reqwest::Client::new();
        let mut figures = MonitorFigures {
            metrics: self.config.prometheus.is_some(),
            ..MonitorFigures::default()
        };
        let started = Instant::now();
        let breach = |why: String, started: Instant| Ok(Err((started.elapsed().as_secs(), why)));
        while started.elapsed() < duration {
            tokio::time::sleep(self.config.poll().min(duration.saturating_sub(started.elapsed()))).await;
            figures.polls += 1;
            if let Some(problem) = watch.check().await? {
                return breach(problem, started);
            }
            if let Some(prom) = &self.config.prometheus {
                let fill = |q: &str| q.replace("{namespace}", ns).replace("{service}", service);
                match monitor::query(&http, &prom.url, &fill(&prom.error_percent)).await {
                    Ok(Some(v)) => {
                        figures.max_error_percent_seen = Some(figures.max_error_percent_seen.unwrap_or(v).max(v));
                        if v > p.max_error_percent {
                            return breach(
                                format!("error rate {v:.2} % above {} % (Prometheus)", p.max_error_percent),
                                started,
                            );
                        }
                    }
                    Ok(None) => figures.no_data += 1,
                    // Monitoring that cannot see is not a pass: the rollout is
                    // not vouched for, so it rolls back.
                    Err(e) => return breach(format!("the error rate cannot be read: {e}"), started),
                }
                if let Some(limit) = p.max_p95_ms {
                    match monitor::query(&http, &prom.url, &fill(&prom.p95_ms)).await {
                        Ok(Some(v)) => {
                            figures.max_p95_ms_seen = Some(figures.max_p95_ms_seen.unwrap_or(v).max(v));
                            if v > limit {
                                return breach(format!("p95 latency {v:.1} ms above {limit} ms (Prometheus)"), started);
                            }
                        }
                        Ok(None) => figures.no_data += 1,
                        Err(e) => return breach(format!("the p95 latency cannot be read: {e}"), started),
                    }
                }
            }
        }
        figures.seconds = duration.as_secs();
        Ok(Ok(figures))
    }

    /// Takes every Deployment back to the revision it had before this step
    /// (deleting those it created) and the other recorded objects back as
    /// they were — the configuration first, so the old pods start with it —
    /// after checking that no other run has deployed over any of them.
    /// Idempotent: a Deployment already on its previous revision is left.
    async fn undo(
        &self,
        job: &StepJob,
        client: &Client,
        ns: &str,
        before: &BTreeMap<String, Previous>,
        strategy: &Strategy,
        budget: u64,
    ) -> Result<RollbackOutputs, Error> {
        let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
        let run = job.run_id.to_string();
        let started = Instant::now();
        let mut out = RollbackOutputs {
            rolled_back: true,
            budget_seconds: budget,
            ..RollbackOutputs::default()
        };
        // Everything is checked before anything changes.
        for name in before.keys() {
            if let Some(d) = api
                .get_opt(name)
                .await
                .map_err(ClusterError::api(format!("cannot read Deployment/{name}")))?
                && let Some(by) = d.annotations().get(cluster::RUN_ANNOTATION)
                && *by != run
            {
                return Err(ClusterError::Moved {
                    object: format!("Deployment/{name}"),
                    run: format!("run {by}"),
                }
                .into());
            }
        }
        let record = cluster::read_record(client, ns, &record_name(job)).await?;
        let mut applier = Applier::new(client.clone(), ns, MANAGER);
        if let Some(record) = &record {
            // `restore` checks every object before it changes one.
            let done = cluster::restore(&mut applier, record, &run, &["Deployment"]).await?;
            out.restored = done.restored;
            out.deleted = done.deleted;
        }
        let pipeline = json!({
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {
                "maxSurge": strategy.max_surge, "maxUnavailable": strategy.max_unavailable}},
            "minReadySeconds": strategy.min_ready_seconds,
        });
        for (name, previous) in before {
            let one = Instant::now();
            let Some(d) = api
                .get_opt(name)
                .await
                .map_err(ClusterError::api(format!("cannot read Deployment/{name}")))?
            else {
                continue;
            };
            let from = cluster::revision_of(d.annotations());
            let Some(hash) = &previous.template_hash else {
                api.delete(name, &DeleteParams::foreground())
                    .await
                    .map_err(ClusterError::api(format!("cannot delete Deployment/{name}")))?;
                out.deployments.push(RolledBack {
                    name: name.clone(),
                    from_revision: from,
                    to_revision: 0,
                    seconds: round(one.elapsed().as_secs_f64()),
                });
                continue;
            };
            if cluster::current_template_hash(client, ns, &d).await?.as_deref() == Some(hash.as_str()) {
                // On the previous revision already (an earlier delivery rolled it back).
                continue;
            }
            let Some(target) = cluster::revision_by_hash(client, ns, &d, hash).await? else {
                return Err(Error::Rollback(format!(
                    "Deployment/{name}: the ReplicaSet of its previous revision {} (pod template {hash}) is gone (revisionHistoryLimit)",
                    previous.revision
                )));
            };
            cluster::undo(client, ns, &d, &target, Some(&rollback_strategy())).await?;
            let wait = Duration::from_secs(budget.max(1) * 5);
            let result = cluster::watch_rollout(client, ns, name, self.config.limits(), wait, self.config.poll()).await;
            // The pipeline's strategy again, whatever the watch found (the pod
            // template is unchanged: no new rollout).
            api.patch(name, &PatchParams::default(), &Patch::Merge(json!({"spec": pipeline})))
                .await
                .map_err(ClusterError::api(format!(
                    "cannot restore the strategy of Deployment/{name}"
                )))?;
            if let Err(failure) = result? {
                return Err(Error::Rollback(format!(
                    "Deployment/{name} back to revision {} (pod template {hash}): {failure}",
                    target.number
                )));
            }
            out.deployments.push(RolledBack {
                name: name.clone(),
                from_revision: from,
                to_revision: target.number,
                seconds: round(one.elapsed().as_secs_f64()),
            });
        }
        out.seconds = round(started.elapsed().as_secs_f64());
        out.over_budget = out.seconds > budget as f64;
        if out.over_budget {
            tracing::warn!(run_id = %job.run_id, seconds = out.seconds, budget, "rollback over its budget");
        }
        Ok(out)
    }

    /// The rollback after a failed apply, as the failure's message tells it
    /// (a failed rollback does not hide the failure that called for it).
    async fn undo_after_failure(
        &self,
        job: &StepJob,
        client: &Client,
        ns: &str,
        before: &BTreeMap<String, Previous>,
        strategy: &Strategy,
        budget: u64,
    ) -> String {
        match self.undo(job, client, ns, before, strategy, budget).await {
            Ok(r) => r.summary(),
            Err(e) => format!("and rolling back failed too ({}): {e}", e.code()),
        }
    }

    async fn rollback_replicaset(&self, job: &StepJob) -> Result<RollbackOutputs, Error> {
        let p = Self::params(job)?;
        let strategy = Strategy {
            max_surge: p.max_surge,
            max_unavailable: p.max_unavailable,
            min_ready_seconds: p.min_ready_seconds,
            progress_deadline_seconds: p.progress_deadline_seconds,
        };
        let ns = self.config.namespace(&job.deploy.service);
        let client = cluster::connect(&self.config.kubeconfig).await?;
        // What each Deployment ran before: from the outputs, else (a failed
        // attempt) from the annotations this step put on the Deployments.
        let mut before = BTreeMap::new();
        if let Some(list) = job.own_outputs.get("deployments").and_then(Value::as_array) {
            for d in list {
                let change: DeploymentChange = serde_json::from_value(d.clone()).map_err(|e| Error::Io {
                    what: "the step's outputs".into(),
                    detail: e.to_string(),
                })?;
                before.insert(
                    change.name,
                    Previous {
                        revision: change.revision_before,
                        template_hash: change.template_hash_before,
                    },
                );
            }
        } else if let Some(record) = cluster::read_record(&client, &ns, &record_name(job)).await? {
            let api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
            for e in record.entries.iter().filter(|e| e.kind == "Deployment") {
                let Some(d) = api
                    .get_opt(&e.name)
                    .await
                    .map_err(ClusterError::api(format!("cannot read Deployment/{}", e.name)))?
                else {
                    continue;
                };
                if d.annotations().get(cluster::RUN_ANNOTATION) == Some(&job.run_id.to_string()) {
                    let a = d.annotations();
                    before.insert(
                        e.name.clone(),
                        Previous {
                            revision: a.get(PREVIOUS_REVISION).and_then(|r| r.parse().ok()).unwrap_or(0),
                            template_hash: a.get(PREVIOUS_HASH).filter(|h| !h.is_empty()).cloned(),
                        },
                    );
                }
            }
        } else {
            return Ok(RollbackOutputs {
                budget_seconds: p.rollback_max_seconds,
                note: "the step recorded nothing, so it changed nothing".to_owned(),
                ..RollbackOutputs::default()
            });
        }
        let out = self
            .undo(job, &client, &ns, &before, &strategy, p.rollback_max_seconds)
            .await?;
        if let Some(record) = cluster::read_record(&client, &ns, &record_name(job)).await? {
            let targets: Vec<DynamicObject> = record.entries.iter().map(cluster::RecordEntry::target).collect();
            self.save_left(&client, &ns, job, &targets).await?;
        }
        Ok(out)
    }
}

fn round(secs: f64) -> f64 {
    (secs * 100.0).round() / 100.0
}

impl Role for ProductionApply {
    fn name(&self) -> &str {
        roles::PRODUCTION_APPLY
    }

    fn execute<'a>(&'a self, job: &'a StepJob, _ctx: &'a ExecContext) -> BoxFuture<'a, Outcome> {
        // A cancelled attempt's partial rollout is undone by
        // `rollback-replicaset` (the role declares partial effects), from the
        // annotations and record made before anything changed.
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
    fn the_pipeline_rolling_update_replaces_what_a_manifest_says() {
        let mut objs = cluster::parse_manifests(
            "t",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  minReadySeconds: 5\n  strategy:\n    type: RollingUpdate\n    rollingUpdate: {maxSurge: 25%, maxUnavailable: 0}\n",
        )
        .unwrap();
        let s = Strategy {
            max_surge: 1,
            max_unavailable: 0,
            min_ready_seconds: 30,
            progress_deadline_seconds: 300,
        };
        let w = enforce_strategy(&mut objs, &s);
        assert_eq!(
            w,
            [
                "Deployment/web: spec.strategy.rollingUpdate.maxSurge is \"25%\" in the manifest; set to 1, the pipeline's rolling update",
                "Deployment/web: spec.minReadySeconds is 5 in the manifest; set to 30, the pipeline's rolling update"
            ]
        );
        assert_eq!(objs[0].data.pointer("/spec/progressDeadlineSeconds"), Some(&json!(300)));
        assert_eq!(
            objs[0].data.pointer("/spec/strategy/rollingUpdate/maxSurge"),
            Some(&json!(1))
        );
    }
}
