//! Kubernetes for the roles that deploy (staging-verify, production-apply): a
//! client from a kubeconfig, manifests read and applied with server-side apply,
//! a Deployment's rollout judged as `kubectl rollout status` judges it, pods
//! diagnosed (crash loops, failing readiness) and a rollout undone to an
//! earlier revision (`kubectl rollout undo`).
//!
//! Only APIs stable from Kubernetes 1.20 to today's k3s are used: `apps/v1`,
//! `batch/v1`, `core/v1`, `networking.k8s.io/v1`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::discovery::Scope;
use kube::{Client, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The annotation a Deployment's controller keeps its revision in (on the
/// Deployment and on each of its ReplicaSets).
pub const REVISION: &str = "deployment.kubernetes.io/revision";
/// The label that ties a ReplicaSet's pods to its pod template.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// What went wrong talking to the cluster or reading manifests.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot use kubeconfig {path}: {detail}")]
    Config { path: String, detail: String },
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what}: {problem}")]
    Manifest { what: String, problem: String },
    #[error("{object} was changed by {run} since: putting the earlier version back would undo that; reconcile by hand")]
    Moved { object: String, run: String },
}

impl ClusterError {
    /// Wraps an API error with what was being done.
    pub fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let what = what.into();
        move |source| Self::Api { what, source }
    }

    /// Transient: the API server unreachable, overloaded or a write conflict.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Api { source, .. } => match source {
                kube::Error::Api(s) => s.code >= 500 || s.code == 409 || s.code == 429,
                kube::Error::HyperError(_) | kube::Error::Service(_) => true,
                _ => false,
            },
            _ => false,
        }
    }

    /// Whether the API answered 404.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Api { source: kube::Error::Api(s), .. } if s.code == 404)
    }
}

/// A client for the cluster a kubeconfig names (its current context).
pub async fn connect(kubeconfig: &Path) -> Result<Client, ClusterError> {
    let err = |detail: String| ClusterError::Config {
        path: kubeconfig.display().to_string(),
        detail,
    };
    let file = Kubeconfig::read_from(kubeconfig).map_err(|e| err(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .map_err(|e| err(e.to_string()))?;
    Client::try_from(config).map_err(|e| err(e.to_string()))
}

/// The objects of a multi-document YAML stream (empty documents skipped); each
/// must name its `apiVersion`, `kind` and `metadata.name`.
pub fn parse_manifests(what: &str, yaml: &str) -> Result<Vec<DynamicObject>, ClusterError> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).map_err(|e| ClusterError::Manifest {
        what: what.to_owned(),
        problem: e.to_string(),
    })?;
    let mut objects = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let bad = |problem: String| ClusterError::Manifest {
            what: format!("{what}, document {}", i + 1),
            problem,
        };
        let obj: DynamicObject = serde_json::from_value(doc).map_err(|e| bad(e.to_string()))?;
        let Some(types) = &obj.types else {
            return Err(bad("no apiVersion and kind".to_owned()));
        };
        if types.api_version.is_empty() || types.kind.is_empty() {
            return Err(bad("no apiVersion or kind".to_owned()));
        }
        if obj.metadata.name.as_deref().unwrap_or("").is_empty() {
            return Err(bad(format!("a {} without metadata.name", types.kind)));
        }
        objects.push(obj);
    }
    Ok(objects)
}

/// `kind/name` of an object, as messages name it.
pub fn describe(obj: &DynamicObject) -> String {
    let kind = obj.types.as_ref().map(|t| t.kind.as_str()).unwrap_or("object");
    format!("{kind}/{}", obj.name_any())
}

/// The group, version and kind of a manifest.
pub fn gvk(obj: &DynamicObject) -> Result<GroupVersionKind, ClusterError> {
    let types = obj.types.as_ref().ok_or_else(|| ClusterError::Manifest {
        what: obj.name_any(),
        problem: "no apiVersion and kind".to_owned(),
    })?;
    GroupVersionKind::try_from(types).map_err(|e| ClusterError::Manifest {
        what: describe(obj),
        problem: e.to_string(),
    })
}

/// The object as it can be applied again: without what the server keeps
/// (status, uid, resource version, managed fields, timestamps).
pub fn applicable(obj: &DynamicObject) -> DynamicObject {
    let mut out = obj.clone();
    let m = &mut out.metadata;
    m.uid = None;
    m.resource_version = None;
    m.managed_fields = None;
    m.creation_timestamp = None;
    m.generation = None;
    m.deletion_timestamp = None;
    m.deletion_grace_period_seconds = None;
    m.owner_references = None;
    if let Some(a) = m.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
        a.remove(REVISION);
        if a.is_empty() {
            m.annotations = None;
        }
    }
    if let Some(map) = out.data.as_object_mut() {
        map.remove("status");
    }
    out
}

/// `registry/name` of `registry/name:tag` or `registry/name@sha256:…`.
pub fn repository(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => &image[..i],
        _ => image,
    }
}

/// Pod templates of workload manifests, as mutable JSON.
pub fn pod_specs(obj: &mut DynamicObject) -> Vec<&mut Value> {
    let kind = obj.types.as_ref().map(|t| t.kind.clone()).unwrap_or_default();
    let spec = match kind.as_str() {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            obj.data.pointer_mut("/spec/template/spec")
        }
        "CronJob" => obj.data.pointer_mut("/spec/jobTemplate/spec/template/spec"),
        _ => None,
    };
    spec.into_iter().collect()
}

/// Sets every container running `repo` to `repo@digest`; how many it set.
pub fn set_image(objects: &mut [DynamicObject], repo: &str, digest: &str) -> usize {
    let mut set = 0;
    for obj in objects.iter_mut() {
        for spec in pod_specs(obj) {
            for list in ["containers", "initContainers"] {
                for c in spec.get_mut(list).and_then(Value::as_array_mut).into_iter().flatten() {
                    let matches = c
                        .get("image")
                        .and_then(Value::as_str)
                        .is_some_and(|i| repository(i) == repo);
                    if matches {
                        c["image"] = json!(format!("{repo}@{digest}"));
                        set += 1;
                    }
                }
            }
        }
    }
    set
}

pub fn kind_of(obj: &DynamicObject) -> &str {
    obj.types.as_ref().map(|t| t.kind.as_str()).unwrap_or("")
}

/// The names of the Deployments among `objects`.
pub fn deployments(objects: &[DynamicObject]) -> Vec<String> {
    objects
        .iter()
        .filter(|o| kind_of(o) == "Deployment")
        .map(|o| o.name_any())
        .collect()
}

/// The Deployments among `objects` that run `image` (a full reference):
/// only Deployments are watched, monitored and rolled back, so a release
/// whose image runs in nothing else is refused by the daemons that deploy.
pub fn deployments_running(objects: &[DynamicObject], image: &str) -> Vec<String> {
    objects
        .iter()
        .filter(|o| kind_of(o) == "Deployment")
        .filter(|o| {
            ["containers", "initContainers"].iter().any(|list| {
                o.data
                    .pointer(&format!("/spec/template/spec/{list}"))
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .any(|c| c.get("image").and_then(Value::as_str) == Some(image))
            })
        })
        .map(|o| o.name_any())
        .collect()
}

/// `kubectl kustomize <dir>`: the rendered manifests, or why not.
pub async fn kustomize(kubectl: &Path, dir: &Path) -> Result<String, String> {
    let out = tokio::process::Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", kubectl.display()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    String::from_utf8(out.stdout).map_err(|e| e.to_string())
}

/// Applies objects to one namespace with server-side apply under one field
/// manager, finding each kind's API once.
pub struct Applier {
    client: Client,
    namespace: String,
    manager: String,
    kinds: BTreeMap<String, (ApiResource, bool)>,
}

impl Applier {
    pub fn new(client: Client, namespace: &str, manager: &str) -> Self {
        Self {
            client,
            namespace: namespace.to_owned(),
            manager: manager.to_owned(),
            kinds: BTreeMap::new(),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    async fn api(&mut self, obj: &DynamicObject) -> Result<Api<DynamicObject>, ClusterError> {
        let gvk = gvk(obj)?;
        let key = format!("{}/{}/{}", gvk.group, gvk.version, gvk.kind);
        if !self.kinds.contains_key(&key) {
            let (resource, caps) = kube::discovery::pinned_kind(&self.client, &gvk)
                .await
                .map_err(ClusterError::api(format!("the cluster does not serve {key}")))?;
            self.kinds
                .insert(key.clone(), (resource, caps.scope == Scope::Namespaced));
        }
        let (resource, namespaced) = &self.kinds[&key];
        Ok(if *namespaced {
            Api::namespaced_with(self.client.clone(), &self.namespace, resource)
        } else {
            Api::all_with(self.client.clone(), resource)
        })
    }

    /// The live object of a manifest, if it exists.
    pub async fn get(&mut self, obj: &DynamicObject) -> Result<Option<DynamicObject>, ClusterError> {
        let api = self.api(obj).await?;
        api.get_opt(&obj.name_any())
            .await
            .map_err(ClusterError::api(format!("cannot read {}", describe(obj))))
    }

    /// Server-side apply, taking over fields other managers own (the pipeline
    /// is the only writer of what it deploys).
    pub async fn apply(&mut self, obj: &DynamicObject) -> Result<DynamicObject, ClusterError> {
        let api = self.api(obj).await?;
        let mut obj = obj.clone();
        obj.metadata.namespace = None;
        obj.metadata.managed_fields = None;
        obj.metadata.resource_version = None;
        api.patch(
            &obj.name_any(),
            &PatchParams::apply(&self.manager).force(),
            &Patch::Apply(&obj),
        )
        .await
        .map_err(ClusterError::api(format!("cannot apply {}", describe(&obj))))
    }

    /// Deletes the object a manifest names; gone already is fine.
    pub async fn delete(&mut self, obj: &DynamicObject) -> Result<(), ClusterError> {
        let api = self.api(obj).await?;
        match api.delete(&obj.name_any(), &DeleteParams::foreground()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(ClusterError::api(format!("cannot delete {}", describe(obj)))(e)),
        }
    }
}

/// One object's state before a deploy changed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordEntry {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    /// As it was, ready to apply again; none: the deploy created it.
    pub previous: Option<Value>,
    /// Its revision then, for objects that have one (Deployments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
}

impl RecordEntry {
    /// A manifest naming the entry's object (for reading or deleting it).
    pub fn target(&self) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": self.api_version, "kind": self.kind, "metadata": {"name": self.name}
        }))
        .expect("apiVersion, kind and name make an object")
    }

    /// `kind/name`.
    pub fn describe(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }
}

/// What a deploy found before it changed anything, kept in a Secret of the
/// namespace so that a redelivered job finds the first record and a
/// compensation (or an operator) can put everything back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub commit: String,
    pub entries: Vec<RecordEntry>,
}

const RECORD_KEY: &str = "record.json";

/// A record larger than this would not fit in one object (etcd's limit is
/// about 1.5 MiB, the API server's request limit 3 MiB; a Secret is meant to
/// stay under 1 MiB).
const RECORD_MAX_BYTES: usize = 900 * 1024;

/// The JSON kept in Secret `name` by [`keep_json`], if the Secret exists.
pub async fn read_json<T: serde::de::DeserializeOwned>(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<T>, ClusterError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api
        .get_opt(name)
        .await
        .map_err(ClusterError::api(format!("cannot read Secret/{name}")))?;
    secret
        .map(|secret| {
            let bytes = secret
                .data
                .as_ref()
                .and_then(|d| d.get(RECORD_KEY))
                .ok_or_else(|| ClusterError::Manifest {
                    what: format!("Secret/{name}"),
                    problem: format!("has no {RECORD_KEY}"),
                })?;
            serde_json::from_slice(&bytes.0).map_err(|e| ClusterError::Manifest {
                what: format!("Secret/{name} {RECORD_KEY}"),
                problem: e.to_string(),
            })
        })
        .transpose()
}

/// Keeps `value` as JSON in a new Secret `name` (a Secret: what a deploy
/// records may hold Secrets itself). When the Secret exists already (an
/// earlier delivery of the same job), that one stands and is returned.
pub async fn keep_json<T: Serialize + serde::de::DeserializeOwned>(
    client: &Client,
    namespace: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
    value: T,
) -> Result<T, ClusterError> {
    let text = serde_json::to_string(&value).unwrap_or_default();
    if text.len() > RECORD_MAX_BYTES {
        return Err(ClusterError::Manifest {
            what: format!("the record in Secret/{name}"),
            problem: format!(
                "{} KiB, more than one object holds ({} KiB): deploy fewer or smaller objects per step",
                text.len() / 1024,
                RECORD_MAX_BYTES / 1024
            ),
        });
    }
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": name, "labels": labels},
        "stringData": {RECORD_KEY: text},
    }))
    .map_err(|e| ClusterError::Manifest {
        what: format!("Secret/{name}"),
        problem: e.to_string(),
    })?;
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(value),
        // Another delivery of the job recorded first: its record stands.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            read_json(client, namespace, name)
                .await?
                .ok_or_else(|| ClusterError::Manifest {
                    what: format!("Secret/{name}"),
                    problem: "was created and is gone again".to_owned(),
                })
        }
        Err(e) => Err(ClusterError::api(format!(
            "cannot record the previous state in Secret/{name}"
        ))(e)),
    }
}

/// Writes `value` as JSON into Secret `name`, replacing what it held (for
/// state that moves on, unlike a record: the last state a step applied).
pub async fn put_json<T: Serialize>(
    client: &Client,
    namespace: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
    value: &T,
    manager: &str,
) -> Result<(), ClusterError> {
    let text = serde_json::to_string(value).unwrap_or_default();
    if text.len() > RECORD_MAX_BYTES {
        return Err(ClusterError::Manifest {
            what: format!("Secret/{name}"),
            problem: format!("{} KiB, more than one object holds", text.len() / 1024),
        });
    }
    let secret = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": name, "labels": labels},
        "stringData": {RECORD_KEY: text},
    });
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    api.patch(name, &PatchParams::apply(manager).force(), &Patch::Apply(&secret))
        .await
        .map_err(ClusterError::api(format!("cannot write Secret/{name}")))?;
    Ok(())
}

/// The record in Secret `name`, if there is one.
pub async fn read_record(client: &Client, namespace: &str, name: &str) -> Result<Option<Record>, ClusterError> {
    read_json(client, namespace, name).await
}

/// What `obj`'s live object is now, as a record entry.
pub async fn entry_before(applier: &mut Applier, obj: &DynamicObject) -> Result<RecordEntry, ClusterError> {
    let live = applier.get(obj).await?;
    let types = obj.types.clone().unwrap_or_default();
    Ok(RecordEntry {
        api_version: types.api_version,
        kind: types.kind,
        name: obj.name_any(),
        revision: live.as_ref().map(|l| revision_of(l.annotations())).filter(|r| *r > 0),
        previous: live.map(|l| serde_json::to_value(applicable(&l)).unwrap_or(Value::Null)),
    })
}

/// The record of `objects` as they are before a deploy: the one an earlier
/// delivery of the same job made, else a new one in Secret `name` with
/// `labels`.
pub async fn record_before(
    applier: &mut Applier,
    name: &str,
    labels: &BTreeMap<String, String>,
    commit: &str,
    objects: &[DynamicObject],
) -> Result<Record, ClusterError> {
    let (client, namespace) = (applier.client().clone(), applier.namespace().to_owned());
    if let Some(record) = read_record(&client, &namespace, name).await? {
        return Ok(record);
    }
    let mut entries = Vec::new();
    for obj in objects {
        entries.push(entry_before(applier, obj).await?);
    }
    let record = Record {
        commit: commit.to_owned(),
        entries,
    };
    keep_json(&client, &namespace, name, labels, record).await
}

/// An object as a step left it, to find later what changed outside the
/// pipeline ("production changes only through the pipeline").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeftAs {
    pub api_version: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// Spec changes bump it (status updates do not); 0 for kinds without one.
    pub generation: i64,
    /// For kinds without a generation (ConfigMaps, Secrets, Services).
    pub resource_version: String,
    /// SHA-256 of the object's `spec`, for kinds with one, without `replicas`
    /// when the pipeline's manifest leaves them to an autoscaler: a generation
    /// bumped only by the autoscaler is not a change of what was deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_sha256: Option<String>,
}

/// SHA-256 of `obj`'s `spec`, if it has one; without `replicas` unless a
/// Baton field manager owns them (its manifest set them).
fn spec_digest(obj: &DynamicObject) -> Option<String> {
    use sha2::Digest;
    let mut spec = obj.data.get("spec")?.clone();
    if !baton_owns_replicas(obj)
        && let Some(m) = spec.as_object_mut()
    {
        m.remove("replicas");
    }
    Some(hex::encode(sha2::Sha256::digest(spec.to_string().as_bytes())))
}

/// Whether one of Baton's field managers (`baton…`) owns `spec.replicas`. A
/// manifest that leaves the count to an autoscaler does not set it, and then a
/// changed count is the autoscaler's doing, not a change of what was deployed.
fn baton_owns_replicas(obj: &DynamicObject) -> bool {
    obj.metadata.managed_fields.iter().flatten().any(|m| {
        m.manager.as_deref().is_some_and(|n| n.starts_with("baton"))
            && m.fields_v1
                .as_ref()
                .and_then(|f| f.0.pointer("/f:spec/f:replicas"))
                .is_some()
    })
}

impl LeftAs {
    /// `obj` as read back from namespace `namespace`.
    pub fn of(obj: &DynamicObject, namespace: &str) -> Self {
        let types = obj.types.clone().unwrap_or_default();
        Self {
            api_version: types.api_version,
            kind: types.kind,
            namespace: namespace.to_owned(),
            name: obj.name_any(),
            generation: obj.metadata.generation.unwrap_or_default(),
            resource_version: obj.resource_version().unwrap_or_default(),
            spec_sha256: spec_digest(obj),
        }
    }

    /// `namespace/Kind/name`.
    pub fn describe(&self) -> String {
        format!("{}/{}/{}", self.namespace, self.kind, self.name)
    }
}

/// Each object of `left` (what run `run` left) that was changed or deleted
/// since, by name.
pub async fn changed_since(client: &Client, left: &[LeftAs], run: &str) -> Result<Vec<String>, ClusterError> {
    let mut out = Vec::new();
    for l in left {
        let target: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": l.api_version, "kind": l.kind, "metadata": {"name": l.name}
        }))
        .map_err(|e| ClusterError::Manifest {
            what: l.describe(),
            problem: e.to_string(),
        })?;
        let mut applier = Applier::new(client.clone(), &l.namespace, "baton");
        match applier.get(&target).await? {
            None => out.push(format!("{} was deleted since run {run} left it", l.describe())),
            Some(o) => {
                let generation = o.metadata.generation.unwrap_or_default();
                let rescaled_only = l.spec_sha256.is_some() && l.spec_sha256 == spec_digest(&o);
                if l.generation > 0 && generation != l.generation && !rescaled_only {
                    out.push(format!(
                        "{} was changed since run {run} left it (generation {generation}, then {})",
                        l.describe(),
                        l.generation
                    ));
                } else if l.generation == 0 && o.resource_version().unwrap_or_default() != l.resource_version {
                    out.push(format!("{} was changed since run {run} left it", l.describe()));
                }
            }
        }
    }
    Ok(out)
}

/// The annotation naming the run that last deployed an object.
pub const RUN_ANNOTATION: &str = "baton.dev/run";

/// What [`restore`] put back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Restored {
    pub restored: Vec<String>,
    pub deleted: Vec<String>,
}

/// The run that last deployed an object, by its annotation.
fn deployed_by(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/annotations")
        .and_then(|a| a.get(RUN_ANNOTATION))
        .and_then(Value::as_str)
}

/// Checks that every recorded object (except the kinds in `skip`) can go back:
/// an object another run has deployed since refuses the whole restore
/// (`ClusterError::Moved`) before anything changes. An object still as
/// recorded (the deploy never reached it, or it was restored already) needs
/// nothing.
async fn check_restore(
    applier: &mut Applier,
    record: &Record,
    run: &str,
    skip: &[&str],
) -> Result<Vec<(RecordEntry, bool)>, ClusterError> {
    let mut plan = Vec::new();
    for entry in record.entries.iter().filter(|e| !skip.contains(&e.kind.as_str())) {
        let live = applier.get(&entry.target()).await?;
        let live_by = live.as_ref().and_then(|l| l.annotations().get(RUN_ANNOTATION).cloned());
        let recorded_by = entry.previous.as_ref().and_then(deployed_by).map(str::to_owned);
        let needed = match (&live, &entry.previous) {
            (None, None) => false,
            (Some(_), _) if live_by.as_deref() == Some(run) => true,
            (Some(_), Some(_)) if live_by == recorded_by => false,
            (None, Some(_)) => {
                return Err(ClusterError::Moved {
                    object: entry.describe(),
                    run: "someone (it was deleted)".to_owned(),
                });
            }
            (Some(_), _) => {
                return Err(ClusterError::Moved {
                    object: entry.describe(),
                    run: live_by.map_or_else(|| "someone outside Baton".to_owned(), |b| format!("run {b}")),
                });
            }
        };
        plan.push((entry.clone(), needed));
    }
    Ok(plan)
}

/// Puts the recorded objects back as they were (deleting those the deploy
/// created), except the kinds in `skip`, after [`check_restore`] found
/// nothing in the way.
pub async fn restore(
    applier: &mut Applier,
    record: &Record,
    run: &str,
    skip: &[&str],
) -> Result<Restored, ClusterError> {
    let plan = check_restore(applier, record, run, skip).await?;
    let mut out = Restored::default();
    for (entry, needed) in plan {
        if !needed {
            continue;
        }
        match &entry.previous {
            Some(previous) => {
                let obj: DynamicObject =
                    serde_json::from_value(previous.clone()).map_err(|e| ClusterError::Manifest {
                        what: format!("the recorded {}", entry.describe()),
                        problem: e.to_string(),
                    })?;
                applier.apply(&obj).await?;
                out.restored.push(entry.describe());
            }
            None => {
                applier.delete(&entry.target()).await?;
                out.deleted.push(entry.describe());
            }
        }
    }
    Ok(out)
}

/// Where a Deployment's rollout stands, as `kubectl rollout status` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rollout {
    /// Still going, and why.
    Waiting(String),
    Complete,
    /// The controller gave up (`ProgressDeadlineExceeded`).
    Failed(String),
}

/// The revision annotation of an object (0 if none).
pub fn revision_of(annotations: &BTreeMap<String, String>) -> u64 {
    annotations.get(REVISION).and_then(|r| r.parse().ok()).unwrap_or(0)
}

/// The rollout state of `d`.
pub fn rollout(d: &Deployment) -> Rollout {
    let generation = d.metadata.generation.unwrap_or(0);
    let Some(status) = &d.status else {
        return Rollout::Waiting("no status yet".to_owned());
    };
    if status.observed_generation.unwrap_or(0) < generation {
        return Rollout::Waiting("the controller has not seen the new spec yet".to_owned());
    }
    if let Some(c) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded"))
    {
        return Rollout::Failed(format!(
            "ProgressDeadlineExceeded: {}",
            c.message.as_deref().unwrap_or("no progress within the deadline")
        ));
    }
    let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let updated = status.updated_replicas.unwrap_or(0);
    let total = status.replicas.unwrap_or(0);
    let ready = status.ready_replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    if updated < desired {
        return Rollout::Waiting(format!("{updated} of {desired} replicas updated"));
    }
    if total > updated {
        return Rollout::Waiting(format!("{} old replicas pending termination", total - updated));
    }
    if ready < updated || available < updated {
        return Rollout::Waiting(format!(
            "{available} of {updated} updated replicas available ({ready} ready)"
        ));
    }
    Rollout::Complete
}

/// The ReplicaSets a Deployment owns, by revision (ascending).
pub async fn replica_sets(client: &Client, namespace: &str, d: &Deployment) -> Result<Vec<ReplicaSet>, ClusterError> {
    let api: Api<ReplicaSet> = Api::namespaced(client.clone(), namespace);
    let uid = d.metadata.uid.clone().unwrap_or_default();
    let mut owned: Vec<ReplicaSet> = api
        .list(&ListParams::default())
        .await
        .map_err(ClusterError::api(format!(
            "cannot list the ReplicaSets of {}",
            d.name_any()
        )))?
        .items
        .into_iter()
        .filter(|rs| rs.owner_references().iter().any(|o| o.uid == uid))
        .collect();
    owned.sort_by_key(|rs| revision_of(rs.annotations()));
    Ok(owned)
}

/// The `pod-template-hash` of the Deployment's current revision (its
/// ReplicaSet's), which stays the same when a rollback renumbers it.
pub async fn current_template_hash(
    client: &Client,
    namespace: &str,
    d: &Deployment,
) -> Result<Option<String>, ClusterError> {
    let revision = revision_of(d.annotations());
    Ok(replica_sets(client, namespace, d)
        .await?
        .iter()
        .find(|rs| revision_of(rs.annotations()) == revision)
        .and_then(|rs| rs.labels().get(POD_TEMPLATE_HASH).cloned()))
}

/// The revision whose ReplicaSet has pod template hash `hash`.
pub async fn revision_by_hash(
    client: &Client,
    namespace: &str,
    d: &Deployment,
    hash: &str,
) -> Result<Option<Revision>, ClusterError> {
    let number = replica_sets(client, namespace, d)
        .await?
        .iter()
        .find(|rs| rs.labels().get(POD_TEMPLATE_HASH).map(String::as_str) == Some(hash))
        .map(|rs| revision_of(rs.annotations()));
    match number {
        Some(n) => revision(client, namespace, d, Some(n)).await,
        None => Ok(None),
    }
}

/// The pods of the Deployment's current ReplicaSet.
pub async fn current_pods(client: &Client, namespace: &str, d: &Deployment) -> Result<Vec<Pod>, ClusterError> {
    let revision = revision_of(d.annotations());
    let sets = replica_sets(client, namespace, d).await?;
    let Some(hash) = sets
        .iter()
        .find(|rs| revision_of(rs.annotations()) == revision)
        .and_then(|rs| rs.labels().get(POD_TEMPLATE_HASH).cloned())
    else {
        return Ok(Vec::new());
    };
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    Ok(api
        .list(&ListParams::default().labels(&format!("{POD_TEMPLATE_HASH}={hash}")))
        .await
        .map_err(ClusterError::api(format!("cannot list the pods of {}", d.name_any())))?
        .items)
}

/// The limits within which a pod counts as healthy.
#[derive(Debug, Clone, Copy)]
pub struct HealthLimits {
    /// A container restarted this often is crash-looping.
    pub max_restarts: i32,
    /// A running pod not ready this long after it started fails its readiness.
    pub readiness_grace: Duration,
}

/// Waiting reasons that never resolve by themselves.
const STUCK: &[&str] = &[
    "CrashLoopBackOff",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// What is wrong with a pod, naming it, the container and the reason; `None`
/// if nothing is (yet).
pub fn pod_problem(pod: &Pod, limits: HealthLimits, now: chrono::DateTime<chrono::Utc>) -> Option<String> {
    let name = pod.name_any();
    let status = pod.status.as_ref()?;
    for c in status.container_statuses.iter().flatten() {
        let waiting = c.state.as_ref().and_then(|s| s.waiting.as_ref());
        if let Some(reason) = waiting.and_then(|w| w.reason.as_deref())
            && STUCK.contains(&reason)
        {
            let message = waiting.and_then(|w| w.message.as_deref()).unwrap_or("");
            return Some(format!(
                "pod {name} container {}: {reason} (restarted {} times){}{message}",
                c.name,
                c.restart_count,
                if message.is_empty() { "" } else { ": " },
            ));
        }
        if c.restart_count >= limits.max_restarts {
            let last = c
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .map(|t| {
                    format!(
                        ", last exit code {} ({})",
                        t.exit_code,
                        t.reason.as_deref().unwrap_or("no reason given")
                    )
                })
                .unwrap_or_default();
            return Some(format!(
                "pod {name} container {}: restarted {} times{last}",
                c.name, c.restart_count
            ));
        }
    }
    if status.phase.as_deref() == Some("Running") {
        let ready = status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let started = status
            .start_time
            .as_ref()
            .and_then(|t| chrono::DateTime::from_timestamp(t.0.as_second(), 0));
        if !ready && let Some(started) = started {
            let waited = now.signed_duration_since(started).to_std().unwrap_or_default();
            if waited >= limits.readiness_grace {
                let unready: Vec<&str> = status
                    .container_statuses
                    .iter()
                    .flatten()
                    .filter(|c| !c.ready)
                    .map(|c| c.name.as_str())
                    .collect();
                return Some(format!(
                    "pod {name} container {}: not ready {} s after it started (readiness probe failing)",
                    if unready.is_empty() {
                        "?".to_owned()
                    } else {
                        unready.join(", ")
                    },
                    waited.as_secs()
                ));
            }
        }
    }
    None
}

/// Restarts summed over the containers of `pods`.
pub fn restarts(pods: &[Pod]) -> i64 {
    pods.iter()
        .filter_map(|p| p.status.as_ref())
        .flat_map(|s| s.container_statuses.iter().flatten())
        .map(|c| i64::from(c.restart_count))
        .sum()
}

/// Whether a namespace name (or any DNS label) is valid.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Watches Deployments that completed their rollout: each must stay
/// complete, its pods healthy and their restart count where it was when the
/// watch began.
pub struct HealthWatch {
    client: Client,
    namespace: String,
    limits: HealthLimits,
    restarts: BTreeMap<String, i64>,
}

impl HealthWatch {
    /// Starts watching `names`, taking their restart counts now.
    pub async fn start(
        client: &Client,
        namespace: &str,
        names: &[String],
        limits: HealthLimits,
    ) -> Result<Self, ClusterError> {
        let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
        let mut restarts = BTreeMap::new();
        for name in names {
            let d = api
                .get(name)
                .await
                .map_err(ClusterError::api(format!("cannot read Deployment/{name}")))?;
            restarts.insert(
                name.clone(),
                self::restarts(&current_pods(client, namespace, &d).await?),
            );
        }
        Ok(Self {
            client: client.clone(),
            namespace: namespace.to_owned(),
            limits,
            restarts,
        })
    }

    /// The first degradation seen now, if any.
    pub async fn check(&self) -> Result<Option<String>, ClusterError> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
        for (name, before) in &self.restarts {
            let d = api
                .get(name)
                .await
                .map_err(ClusterError::api(format!("cannot read Deployment/{name}")))?;
            if let Rollout::Waiting(why) | Rollout::Failed(why) = rollout(&d) {
                return Ok(Some(format!("Deployment/{name} degraded: {why}")));
            }
            let pods = current_pods(&self.client, &self.namespace, &d).await?;
            let now = chrono::Utc::now();
            // Restarts count from the watch's start (below): a pod that
            // restarted before it is not failing now.
            let limits = HealthLimits {
                max_restarts: i32::MAX,
                ..self.limits
            };
            if let Some(problem) = pods.iter().find_map(|pod| pod_problem(pod, limits, now)) {
                return Ok(Some(problem));
            }
            let restarted = restarts(&pods) - before;
            if restarted > 0 {
                return Ok(Some(format!("Deployment/{name}: {restarted} container restarts")));
            }
        }
        Ok(None)
    }
}

/// A revision a rollout can go back to.
#[derive(Debug, Clone)]
pub struct Revision {
    pub number: u64,
    pub replica_set: String,
    pub template: PodTemplateSpec,
}

/// The pod template of revision `number` of `d` (`None`: the revision before
/// the current one), with the ReplicaSet's `pod-template-hash` label removed,
/// as `kubectl rollout undo` takes it.
pub async fn revision(
    client: &Client,
    namespace: &str,
    d: &Deployment,
    number: Option<u64>,
) -> Result<Option<Revision>, ClusterError> {
    let current = revision_of(d.annotations());
    let sets = replica_sets(client, namespace, d).await?;
    let found = match number {
        Some(n) => sets.iter().find(|rs| revision_of(rs.annotations()) == n),
        None => sets
            .iter()
            .rev()
            .find(|rs| revision_of(rs.annotations()) < current && revision_of(rs.annotations()) > 0),
    };
    Ok(found.and_then(|rs| {
        let mut template = rs.spec.as_ref()?.template.clone()?;
        if let Some(labels) = template.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
            labels.remove(POD_TEMPLATE_HASH);
        }
        Some(Revision {
            number: revision_of(rs.annotations()),
            replica_set: rs.name_any(),
            template,
        })
    }))
}

/// Sets `d`'s pod template to `to`'s (a rollout undo), optionally with a
/// rollout strategy for the way back; returns the Deployment as written.
/// A conflicting write in between fails retryably (409).
pub async fn undo(
    client: &Client,
    namespace: &str,
    d: &Deployment,
    to: &Revision,
    strategy: Option<&Value>,
) -> Result<Deployment, ClusterError> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let mut next = d.clone();
    next.metadata.managed_fields = None;
    if let Some(spec) = next.spec.as_mut() {
        spec.template = to.template.clone();
    }
    let mut value = serde_json::to_value(&next).map_err(|e| ClusterError::Manifest {
        what: d.name_any(),
        problem: e.to_string(),
    })?;
    if let Some(strategy) = strategy
        && let Some(spec) = value.get_mut("spec").and_then(Value::as_object_mut)
    {
        for (k, v) in strategy.as_object().into_iter().flatten() {
            spec.insert(k.clone(), v.clone());
        }
    }
    let next: Deployment = serde_json::from_value(value).map_err(|e| ClusterError::Manifest {
        what: d.name_any(),
        problem: e.to_string(),
    })?;
    api.replace(&d.name_any(), &PostParams::default(), &next)
        .await
        .map_err(ClusterError::api(format!(
            "cannot roll {} back to revision {}",
            d.name_any(),
            to.number
        )))
}

/// Figures of one watched rollout.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RolloutFigures {
    pub deployment: String,
    pub revision: u64,
    pub replicas: i32,
    pub seconds: f64,
}

/// Why watching a rollout ended without it completing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutFailure {
    /// A pod failed (crash loop, readiness), named.
    Pod(String),
    /// The controller's progress deadline passed.
    Deadline(String),
    /// The daemon's own wait ran out.
    Timeout(String),
}

impl std::fmt::Display for RolloutFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pod(s) | Self::Deadline(s) | Self::Timeout(s) => f.write_str(s),
        }
    }
}

/// Watches `name`'s rollout until it completes, a pod of the new revision
/// fails, the controller reports the deadline passed, or `wait` ends.
pub async fn watch_rollout(
    client: &Client,
    namespace: &str,
    name: &str,
    limits: HealthLimits,
    wait: Duration,
    poll: Duration,
) -> Result<Result<RolloutFigures, RolloutFailure>, ClusterError> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let started = tokio::time::Instant::now();
    loop {
        let d = api
            .get(name)
            .await
            .map_err(ClusterError::api(format!("cannot read Deployment/{name}")))?;
        match rollout(&d) {
            Rollout::Complete => {
                return Ok(Ok(RolloutFigures {
                    deployment: name.to_owned(),
                    revision: revision_of(d.annotations()),
                    replicas: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
                    seconds: started.elapsed().as_secs_f64(),
                }));
            }
            Rollout::Failed(why) => {
                return Ok(Err(RolloutFailure::Deadline(format!("Deployment/{name}: {why}"))));
            }
            Rollout::Waiting(why) => {
                // Until the controller has seen the spec, the revision on the
                // Deployment is the old one, and so are its pods.
                let seen = d.status.as_ref().and_then(|s| s.observed_generation).unwrap_or(0)
                    >= d.metadata.generation.unwrap_or(0);
                let pods = if seen {
                    current_pods(client, namespace, &d).await?
                } else {
                    Vec::new()
                };
                let now = chrono::Utc::now();
                if let Some(problem) = pods.iter().find_map(|p| pod_problem(p, limits, now)) {
                    return Ok(Err(RolloutFailure::Pod(format!("Deployment/{name}: {problem}"))));
                }
                if started.elapsed() >= wait {
                    return Ok(Err(RolloutFailure::Timeout(format!(
                        "Deployment/{name} did not complete its rollout within {} s: {why}",
                        wait.as_secs()
                    ))));
                }
            }
        }
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_matched_by_repository() {
        assert_eq!(repository("registry:5000/shop/web:abc"), "registry:5000/shop/web");
        assert_eq!(repository("registry:5000/shop/web"), "registry:5000/shop/web");
        assert_eq!(repository("shop/web@sha256:00"), "shop/web");
        let mut objs = parse_manifests(
            "t",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    spec:\n      containers:\n      - {name: app, image: 'shop/web:dev'}\n      - {name: side, image: 'envoy:1'}\n",
        )
        .unwrap();
        assert_eq!(set_image(&mut objs, "shop/web", "sha256:ab"), 1);
        assert_eq!(
            objs[0].data.pointer("/spec/template/spec/containers/0/image"),
            Some(&json!("shop/web@sha256:ab"))
        );
        assert_eq!(
            objs[0].data.pointer("/spec/template/spec/containers/1/image"),
            Some(&json!("envoy:1"))
        );
    }

    #[test]
    fn manifests_name_what_they_lack() {
        let objs = parse_manifests(
            "render",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  k: v\n---\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n",
        )
        .unwrap();
        assert_eq!(
            objs.iter().map(describe).collect::<Vec<_>>(),
            ["ConfigMap/a", "Deployment/web"]
        );
        let e = parse_manifests("render", "apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n").unwrap_err();
        assert_eq!(e.to_string(), "render, document 1: a ConfigMap without metadata.name");
        let e = parse_manifests("render", "kind: ConfigMap\nmetadata:\n  name: a\n").unwrap_err();
        assert!(e.to_string().starts_with("render, document 1:"), "{e}");
    }

    #[test]
    fn a_rollout_is_complete_only_when_every_replica_is_updated_and_available() {
        let mut d: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "generation": 2},
            "spec": {"replicas": 3, "selector": {}, "template": {}},
            "status": {"observedGeneration": 2, "replicas": 4, "updatedReplicas": 3,
                       "readyReplicas": 3, "availableReplicas": 3}
        }))
        .unwrap();
        assert_eq!(
            rollout(&d),
            Rollout::Waiting("1 old replicas pending termination".into())
        );
        d.status.as_mut().unwrap().replicas = Some(3);
        assert_eq!(rollout(&d), Rollout::Complete);
        d.metadata.generation = Some(3);
        assert!(matches!(rollout(&d), Rollout::Waiting(_)));
        d.status.as_mut().unwrap().observed_generation = Some(3);
        d.status.as_mut().unwrap().conditions = Some(vec![
            serde_json::from_value(serde_json::json!({
                "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                "message": "ReplicaSet \"web-1\" has timed out progressing."
            }))
            .unwrap(),
        ]);
        assert!(matches!(rollout(&d), Rollout::Failed(m) if m.contains("timed out")));
    }

    #[test]
    fn crash_loops_and_unready_pods_are_named() {
        let limits = HealthLimits {
            max_restarts: 3,
            readiness_grace: Duration::from_secs(30),
        };
        let now = chrono::Utc::now();
        let pod = |status: Value| -> Pod {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "web-1"}, "status": status})).unwrap()
        };
        let looping = pod(serde_json::json!({"phase": "Running", "containerStatuses": [{
            "name": "app", "ready": false, "restartCount": 1, "image": "x", "imageID": "",
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}}}]}));
        assert_eq!(
            pod_problem(&looping, limits, now).unwrap(),
            "pod web-1 container app: CrashLoopBackOff (restarted 1 times): back-off 10s"
        );
        let started = (now - chrono::Duration::seconds(45)).to_rfc3339();
        let unready = pod(serde_json::json!({"phase": "Running", "startTime": started,
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": "app", "ready": false, "restartCount": 0, "image": "x", "imageID": "",
            "state": {"running": {}}}]}));
        assert!(
            pod_problem(&unready, limits, now)
                .unwrap()
                .contains("container app: not ready 45 s")
        );
        let young = Duration::from_secs(60);
        assert_eq!(
            pod_problem(
                &unready,
                HealthLimits {
                    readiness_grace: young,
                    ..limits
                },
                now
            ),
            None
        );
    }
}
