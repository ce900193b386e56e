//! The `network` role: `apply` and the `revert` compensation (see the crate
//! documentation).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use baton_shared::cluster::{self, Applier, RecordEntry};
use baton_shared::git::{self, GitCache};
use baton_shared::kit;
use baton_shared::protocol::{self, Fields, JobKind, StepJob};
use baton_shared::runtime::{BoxFuture, ExecContext, Outcome, Role};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DynamicObject, ListParams, ResourceExt};
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::acme::{self, Acme, CertInfo, Challenges};
use crate::config::NetworkConfig;
use crate::dns::{self, Expect, Server};
use crate::error::Error;
use crate::health::{self, Checked};
use crate::policy;
use crate::spec::{self, Spec};
use crate::transip::{DnsEntry, Transip};

/// The field manager of everything this daemon applies.
pub const MANAGER: &str = "baton-network";
const ACCOUNT_SECRET: &str = "baton-network-acme-account";

/// The step's parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// The network folder, relative to the repository root.
    pub config_dir: String,
    /// How long every authoritative nameserver may take to answer.
    pub propagation_deadline_secs: u64,
    /// Renew a certificate with fewer days left than this (default: the
    /// daemon's `acme.renew_before_days`).
    pub renew_before_days: Option<u32>,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            config_dir: "network".to_owned(),
            propagation_deadline_secs: 300,
            renew_before_days: None,
        }
    }
}

/// A DNS set (a name's entries of one type) before and after the step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsChange {
    pub domain: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub before: Vec<DnsEntry>,
    pub after: Vec<DnsEntry>,
}

impl DnsChange {
    fn describe(&self) -> String {
        format!("{} {} in {}", self.kind, self.name, self.domain)
    }
}

/// What the step recorded before changing anything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StepRecord {
    commit: String,
    dns: Vec<DnsChange>,
    /// Per namespace, the objects as they were.
    objects: BTreeMap<String, Vec<RecordEntry>>,
}

/// What the last step that changed this service's network left: each DNS set
/// it managed and each object's generation. The next apply compares the live
/// state with it ("production changes only through the pipeline": anything
/// else is drift, reported by name).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct LastApplied {
    run: String,
    commit: String,
    dns: Vec<DnsSet>,
    objects: Vec<cluster::LeftAs>,
}

impl LastApplied {
    /// What `job` leaves: each changed set as `side` of its change says
    /// (after an apply, before a revert), and the objects.
    fn of(
        job: &StepJob,
        commit: &str,
        dns: &[DnsChange],
        side: impl Fn(&DnsChange) -> &Vec<DnsEntry>,
        objects: Vec<cluster::LeftAs>,
    ) -> Self {
        Self {
            run: job.run_id.to_string(),
            commit: commit.to_owned(),
            dns: dns
                .iter()
                .map(|c| DnsSet {
                    domain: c.domain.clone(),
                    name: c.name.clone(),
                    kind: c.kind.clone(),
                    entries: side(c).clone(),
                })
                .collect(),
            objects,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct DnsSet {
    domain: String,
    name: String,
    #[serde(rename = "type")]
    kind: String,
    entries: Vec<DnsEntry>,
}

fn last_applied_name(service: &str) -> String {
    format!("baton-network-applied.{service}")
}

fn show(entries: &[DnsEntry]) -> String {
    if entries.is_empty() {
        return "nothing".to_owned();
    }
    entries
        .iter()
        .map(|e| format!("{} (ttl {})", e.content, e.expire))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An object the step applied, with the version it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub object: String,
    pub resource_version: String,
    #[serde(default)]
    pub generation: i64,
}

/// What `apply` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplyOutputs {
    pub commit: String,
    /// Every declared DNS set, before and after (unchanged ones too).
    pub records: Vec<DnsChange>,
    pub changed_records: Vec<String>,
    pub propagation_seconds: f64,
    pub nameservers: Vec<String>,
    /// Declared types not compared over DNS (only A, AAAA, CNAME and TXT are).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_checked_over_dns: Vec<String>,
    pub certificates: Vec<CertInfo>,
    pub applied: Vec<Applied>,
    pub default_deny: Vec<String>,
    pub flows_checked: Vec<String>,
    pub health: Vec<Checked>,
    /// What changed outside the pipeline since the last step that applied
    /// this service's network (found before this one changed anything).
    pub drift: Vec<String>,
}

/// What `revert` reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RevertOutputs {
    pub reverted: bool,
    pub records_restored: Vec<String>,
    pub objects_restored: Vec<String>,
    pub objects_deleted: Vec<String>,
    /// How long resolvers may still serve the reverted values (their TTL).
    pub caches_may_hold_seconds: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// The network role, built from `[network]`.
pub struct Network {
    config: NetworkConfig,
    git: GitCache,
    transip: Transip,
    acme: Acme,
    tls: Arc<rustls::ClientConfig>,
}

fn outputs<T: Serialize>(value: &T) -> Result<Fields, Error> {
    protocol::to_fields(value).map_err(|e| Error::Io {
        what: "outputs".into(),
        detail: e.message,
    })
}

fn record_name(job: &StepJob) -> String {
    format!("baton-network.{}", job.key())
}

fn object(value: Value) -> DynamicObject {
    serde_json::from_value(value).expect("the daemon's manifests are objects")
}

/// `namespace/Kind/name`.
fn describe(ns: &str, obj: &DynamicObject) -> String {
    format!("{ns}/{}", cluster::describe(obj))
}

fn entries_of(all: &[DnsEntry], name: &str, kind: &str) -> Vec<DnsEntry> {
    let mut v: Vec<DnsEntry> = all
        .iter()
        .filter(|e| e.name == name && e.kind == kind)
        .cloned()
        .collect();
    v.sort();
    v
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

struct AcmeDns<'a> {
    net: &'a Network,
    domain: String,
    servers: Vec<Server>,
    deadline: Duration,
}

impl AcmeDns<'_> {
    fn relative(&self, fqdn: &str) -> String {
        fqdn.strip_suffix(&format!(".{}", self.domain))
            .unwrap_or(fqdn)
            .to_owned()
    }

    fn entry(&self, fqdn: &str, value: &str) -> DnsEntry {
        DnsEntry {
            name: self.relative(fqdn),
            expire: 60,
            kind: "TXT".into(),
            content: value.to_owned(),
        }
    }
}

impl Challenges for AcmeDns<'_> {
    fn kind(&self) -> instant_acme::ChallengeType {
        instant_acme::ChallengeType::Dns01
    }

    async fn publish(&self, fqdn: &str, value: &str) -> Result<(), String> {
        self.net
            .transip
            .add(&self.domain, &self.entry(fqdn, value))
            .await
            .map_err(|e| e.to_string())?;
        let expect = [Expect {
            name: fqdn.to_owned(),
            kind: "TXT".into(),
            want: BTreeSet::from([value.to_owned()]),
            exact: false,
        }];
        dns::wait(&self.servers, &expect, self.deadline, self.net.poll())
            .await
            .map(drop)
            .map_err(|lagging| format!("DNS propagation failure: {}", lagging.join("; ")))
    }

    async fn withdraw(&self, fqdn: &str, value: &str) -> Result<(), String> {
        self.net
            .transip
            .remove(&self.domain, &self.entry(fqdn, value))
            .await
            .map_err(|e| e.to_string())
    }
}

impl Network {
    pub fn new(config: NetworkConfig) -> Result<Self, Error> {
        let transip = Transip::new(
            &config.transip.api_url,
            &config.transip.login,
            config.transip.private_key.expose().as_bytes(),
            Duration::from_secs(config.request_timeout_secs),
        )?;
        let mut extra = Vec::new();
        for file in config
            .load_balancer
            .ca_file
            .iter()
            .chain(config.acme.root_ca_file.iter())
        {
            extra.push(std::fs::read(file).map_err(|e| Error::Io {
                what: format!("cannot read {}", file.display()),
                detail: e.to_string(),
            })?);
        }
        let tls = health::tls(&extra).map_err(|detail| Error::Io {
            what: "the health check's TLS roots".into(),
            detail,
        })?;
        Ok(Self {
            git: GitCache::new(config.repos_dir.clone()),
            acme: Acme::new(config.acme.clone()),
            transip,
            tls,
            config,
        })
    }

    fn poll(&self) -> Duration {
        Duration::from_millis(self.config.poll_ms)
    }

    /// Runs a job to its outputs; the `Role` methods wrap this.
    pub async fn run(&self, job: &StepJob) -> Result<Fields, Error> {
        match (job.kind, job.action.as_str()) {
            (JobKind::Execute, "apply") => outputs(&self.apply(job).await?),
            (JobKind::Compensate, "revert") => outputs(&self.revert(job).await?),
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
        p.config_dir = git::check_folder("config_dir", &p.config_dir)?;
        if p.propagation_deadline_secs == 0 {
            return Err(Error::InvalidParam {
                name: "propagation_deadline_secs".into(),
                problem: "must be at least 1".into(),
            });
        }
        Ok(p)
    }

    /// The authoritative nameservers of `domain`: configured, else TransIP's.
    async fn nameservers(&self, domain: &str) -> Result<Vec<Server>, Error> {
        if let Some(addrs) = self.config.dns.nameservers.get(domain) {
            return Ok(addrs
                .iter()
                .map(|a| Server {
                    name: a.to_string(),
                    addr: *a,
                })
                .collect());
        }
        let mut out = Vec::new();
        for ns in self.transip.nameservers(domain).await? {
            let addr = match ns.ipv4.parse::<std::net::Ipv4Addr>() {
                Ok(ip) => std::net::SocketAddr::from((ip, 53)),
                Err(_) => tokio::net::lookup_host((ns.hostname.as_str(), 53))
                    .await
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| Error::Io {
                        what: format!("nameserver {} of {domain}", ns.hostname),
                        detail: "has no address".into(),
                    })?,
            };
            out.push(Server {
                name: ns.hostname,
                addr,
            });
        }
        if out.is_empty() {
            return Err(Error::Refused(format!("{domain} has no nameservers at TransIP")));
        }
        Ok(out)
    }

    /// The TransIP domain a host is in: its longest suffix TransIP knows.
    async fn domain_of(&self, host: &str, known: &BTreeSet<String>) -> Result<String, Error> {
        let labels: Vec<&str> = host.split('.').collect();
        for i in 0..labels.len().saturating_sub(1) {
            let candidate = labels[i..].join(".");
            if known.contains(&candidate) || self.config.dns.nameservers.contains_key(&candidate) {
                return Ok(candidate);
            }
        }
        for i in 1..labels.len().saturating_sub(1) {
            let candidate = labels[i..].join(".");
            match self.transip.entries(&candidate).await {
                Ok(_) => return Ok(candidate),
                Err(crate::transip::TransipError::Status { status: 404, .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Refused(format!(
            "{host} is in no domain of this TransIP account"
        )))
    }

    /// The folder's objects, as applied per namespace: the default-deny
    /// policy of every pipeline namespace, allow rules, pools, ingresses.
    fn objects(&self, spec: &Spec, job: &StepJob) -> BTreeMap<String, Vec<DynamicObject>> {
        let mut out: BTreeMap<String, Vec<DynamicObject>> = BTreeMap::new();
        for ns in &self.config.namespaces {
            out.entry(ns.clone())
                .or_default()
                .push(object(policy::default_deny(ns)));
        }
        for p in &spec.policies {
            out.entry(p.namespace.clone())
                .or_default()
                .push(object(policy::manifest(p)));
        }
        for p in &spec.pools {
            out.entry(p.namespace.clone()).or_default().push(object(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": p.name},
                "spec": {"selector": p.selector, "ports": [{"name": "http", "protocol": "TCP", "port": p.port, "targetPort": p.target_port}]},
            })));
        }
        for i in &spec.ingresses {
            let mut spec_json = json!({
                "tls": [{"hosts": i.hosts, "secretName": i.certificate}],
                "rules": i.hosts.iter().map(|h| json!({
                    "host": h,
                    "http": {"paths": [{"path": "/", "pathType": "Prefix",
                        "backend": {"service": {"name": i.service, "port": {"number": i.port}}}}]},
                })).collect::<Vec<_>>(),
            });
            if let Some(class) = &self.config.ingress_class {
                spec_json["ingressClassName"] = json!(class);
            }
            out.entry(i.namespace.clone()).or_default().push(object(json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                "metadata": {"name": i.name, "annotations": self.config.ingress_annotations},
                "spec": spec_json,
            })));
        }
        for objs in out.values_mut() {
            for obj in objs.iter_mut() {
                obj.metadata.namespace = None;
                let a = obj.metadata.annotations.get_or_insert_with(Default::default);
                a.insert(cluster::RUN_ANNOTATION.into(), job.run_id.to_string());
                a.insert("baton.dev/step".into(), job.step_id.clone());
                a.insert("baton.dev/commit".into(), job.deploy.commit_sha.clone());
                obj.metadata
                    .labels
                    .get_or_insert_with(Default::default)
                    .insert("app.kubernetes.io/managed-by".into(), MANAGER.into());
            }
        }
        out
    }

    /// Declared flows against the policy set the change would leave.
    async fn check_flows(
        &self,
        client: &Client,
        spec: &Spec,
        objects: &BTreeMap<String, Vec<DynamicObject>>,
    ) -> Result<Vec<String>, Error> {
        if spec.flows.is_empty() {
            return Ok(Vec::new());
        }
        let mut namespaces: BTreeSet<String> = objects.keys().cloned().collect();
        for f in &spec.flows {
            namespaces.extend(f.from.namespace.clone());
            namespaces.extend(f.to.namespace.clone());
        }
        let mut set: Vec<NetworkPolicy> = Vec::new();
        let mut labels = BTreeMap::new();
        let ns_api: Api<Namespace> = Api::all(client.clone());
        for ns in &namespaces {
            if let Some(n) = ns_api
                .get_opt(ns)
                .await
                .map_err(cluster::ClusterError::api(format!("cannot read namespace {ns}")))?
            {
                labels.insert(ns.clone(), n.labels().clone());
            }
            let wanted: Vec<NetworkPolicy> = objects
                .get(ns)
                .into_iter()
                .flatten()
                .filter(|o| cluster::kind_of(o) == "NetworkPolicy")
                .map(|o| {
                    let mut v = serde_json::to_value(o).unwrap_or_default();
                    v["metadata"]["namespace"] = json!(ns);
                    serde_json::from_value(v).expect("a NetworkPolicy the daemon made")
                })
                .collect();
            let live = Api::<NetworkPolicy>::namespaced(client.clone(), ns)
                .list(&ListParams::default())
                .await
                .map_err(cluster::ClusterError::api(format!(
                    "cannot list network policies in {ns}"
                )))?;
            for p in live.items {
                if !wanted.iter().any(|w| w.metadata.name == p.metadata.name) {
                    set.push(p);
                }
            }
            set.extend(wanted);
        }
        let blocked = policy::blocked(&spec.flows, &set, &labels);
        if !blocked.is_empty() {
            return Err(Error::FlowBlocked(blocked.iter().map(ToString::to_string).collect()));
        }
        Ok(spec
            .flows
            .iter()
            .map(|f| format!("{} (allowed)", f.describe()))
            .collect())
    }

    async fn apply(&self, job: &StepJob) -> Result<ApplyOutputs, Error> {
        let p = Self::params(job)?;
        let commit = job.deploy.commit_sha.clone();
        git::check_commit(&commit)?;
        let scratch = git::JobDir::new(&self.config.work_dir, job).map_err(|e| Error::Io {
            what: "cannot create the job's directory".into(),
            detail: e.to_string(),
        })?;
        let folder = scratch.path().join("network");
        self.git
            .export(&job.deploy.repository, &commit, &p.config_dir, &folder)
            .await?;
        let spec = spec::load(&folder, &p.config_dir)?;
        for (kind, name, ns, at) in spec
            .ingresses
            .iter()
            .map(|i| ("ingress", &i.name, &i.namespace, &i.at))
            .chain(spec.pools.iter().map(|x| ("pool", &x.name, &x.namespace, &x.at)))
            .chain(spec.policies.iter().map(|x| ("policy", &x.name, &x.namespace, &x.at)))
        {
            if !self.config.namespaces.contains(ns) {
                return Err(Error::Refused(format!(
                    "{kind} {name} ({at}) is in namespace {ns}, which the pipeline does not deploy to in this zone \
                     (network.namespaces: {})",
                    self.config.namespaces.join(", ")
                )));
            }
        }

        // Everything is checked before anything changes.
        let client = cluster::connect(&self.config.kubeconfig).await?;
        let objects = self.objects(&spec, job);
        let flows_checked = self.check_flows(&client, &spec, &objects).await?;
        let sets = spec.dns_sets();
        let mut live: BTreeMap<String, Vec<DnsEntry>> = BTreeMap::new();
        let mut servers: BTreeMap<String, Vec<Server>> = BTreeMap::new();
        let mut domains: BTreeSet<String> = sets.keys().map(|(d, _, _)| d.clone()).collect();
        let mut cert_domains = BTreeMap::new();
        for i in &spec.ingresses {
            for h in &i.hosts {
                let d = self.domain_of(h, &domains).await?;
                cert_domains.insert(h.clone(), d.clone());
                domains.insert(d);
            }
        }
        for d in &domains {
            live.insert(d.clone(), self.transip.entries(d).await?);
            servers.insert(d.clone(), self.nameservers(d).await?);
        }

        let drift = self.drift(&client, job, &mut live).await?;
        if !drift.is_empty() {
            tracing::warn!(run_id = %job.run_id, drift = ?drift, "changed outside the pipeline since the last apply");
        }

        // The record: the first delivery's stands.
        let mut record = StepRecord {
            commit: commit.clone(),
            dns: Vec::new(),
            objects: BTreeMap::new(),
        };
        for ((domain, name, kind), (contents, ttl)) in &sets {
            let mut after: Vec<DnsEntry> = contents
                .iter()
                .map(|c| DnsEntry {
                    name: name.clone(),
                    expire: *ttl,
                    kind: kind.clone(),
                    content: c.clone(),
                })
                .collect();
            after.sort();
            record.dns.push(DnsChange {
                domain: domain.clone(),
                name: name.clone(),
                kind: kind.clone(),
                before: entries_of(&live[domain], name, kind),
                after,
            });
        }
        for (ns, objs) in &objects {
            let mut applier = Applier::new(client.clone(), ns, MANAGER);
            let mut entries = Vec::new();
            for o in objs {
                entries.push(cluster::entry_before(&mut applier, o).await?);
            }
            record.objects.insert(ns.clone(), entries);
        }
        let labels = BTreeMap::from([
            ("app.kubernetes.io/managed-by".to_owned(), MANAGER.to_owned()),
            ("baton.dev/service".to_owned(), job.deploy.service.clone()),
        ]);
        let record = cluster::keep_json(
            &client,
            &self.config.record_namespace,
            &record_name(job),
            &labels,
            record,
        )
        .await?;

        // DNS: add what is missing, then remove what is not declared.
        let mut changed = Vec::new();
        for change in &record.dns {
            let now = entries_of(&live[&change.domain], &change.name, &change.kind);
            if now == change.after {
                continue;
            }
            self.converge(&change.domain, &now, &change.after).await?;
            changed.push(change.describe());
            tracing::info!(run_id = %job.run_id, domain = %change.domain, name = %change.name, kind = %change.kind, "DNS set changed");
        }
        let mut not_checked = Vec::new();
        let mut waited = Duration::ZERO;
        let deadline = Duration::from_secs(p.propagation_deadline_secs);
        for (domain, list) in &servers {
            let expect: Vec<Expect> = record
                .dns
                .iter()
                .filter(|c| &c.domain == domain)
                .filter_map(|c| {
                    if !dns::CHECKED.contains(&c.kind.as_str()) {
                        not_checked.push(c.describe());
                        return None;
                    }
                    Some(Expect {
                        name: dns::fqdn(&c.name, domain),
                        kind: c.kind.clone(),
                        want: c
                            .after
                            .iter()
                            .map(|e| dns::normalize(&c.kind, &e.content, domain))
                            .collect(),
                        exact: true,
                    })
                })
                .collect();
            if expect.is_empty() {
                continue;
            }
            waited += dns::wait(list, &expect, deadline.saturating_sub(waited), self.poll())
                .await
                .map_err(|lagging| Error::Propagation {
                    deadline_secs: p.propagation_deadline_secs,
                    lagging,
                })?;
        }

        // Certificates, before the ingresses that serve them.
        let renew_before =
            Duration::from_secs(u64::from(p.renew_before_days.unwrap_or(self.config.acme.renew_before_days)) * 86_400);
        let mut certificates = Vec::new();
        let mut account = None;
        for i in &spec.ingresses {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &i.namespace);
            let existing = secrets
                .get_opt(&i.certificate)
                .await
                .map_err(cluster::ClusterError::api(format!(
                    "cannot read Secret/{}",
                    i.certificate
                )))?;
            let crt = existing
                .as_ref()
                .and_then(|s| s.data.as_ref())
                .and_then(|d| d.get("tls.crt"))
                .map(|b| b.0.clone());
            let now = chrono::Utc::now().timestamp();
            let mut hosts = i.hosts.clone();
            hosts.sort();
            let pem = match acme::needs_issuing(crt.as_deref(), &hosts, renew_before, now) {
                None => crt.clone().unwrap_or_default(),
                Some(reason) => {
                    tracing::info!(run_id = %job.run_id, secret = %i.certificate, %reason, "issuing a certificate");
                    if account.is_none() {
                        account = Some(self.account(&client).await?);
                    }
                    let domain = &cert_domains[&hosts[0]];
                    if let Some(other) = hosts.iter().find(|h| &cert_domains[*h] != domain) {
                        return Err(Error::Refused(format!(
                            "ingress {} ({}) has hosts in two domains ({} and {}): one certificate per domain",
                            i.name, i.at, hosts[0], other
                        )));
                    }
                    let account = account.as_ref().expect("set above");
                    let (chain, key) = match self.config.acme.http01_listen {
                        Some(addr) => {
                            let solver = acme::Http01::start(addr).await.map_err(|e| Error::Io {
                                what: format!("cannot serve HTTP-01 challenges on {addr}"),
                                detail: e.to_string(),
                            })?;
                            self.acme.issue(account, &hosts, &solver).await?
                        }
                        None => {
                            let challenges = AcmeDns {
                                net: self,
                                domain: domain.clone(),
                                servers: servers[domain].clone(),
                                deadline,
                            };
                            self.acme.issue(account, &hosts, &challenges).await?
                        }
                    };
                    let mut applier = Applier::new(client.clone(), &i.namespace, MANAGER);
                    applier
                        .apply(&object(json!({
                            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                            "metadata": {"name": i.certificate, "labels": {"app.kubernetes.io/managed-by": MANAGER}},
                            "data": {"tls.crt": b64(chain.as_bytes()), "tls.key": b64(key.as_bytes())},
                        })))
                        .await?;
                    chain.into_bytes()
                }
            };
            let (serial, not_after, _) = acme::inspect(&pem).map_err(|detail| Error::Io {
                what: format!("the certificate in Secret/{}", i.certificate),
                detail,
            })?;
            certificates.push(CertInfo {
                secret: i.certificate.clone(),
                namespace: i.namespace.clone(),
                hosts,
                serial,
                not_after: acme::rfc3339(not_after),
                issued: crt.as_deref() != Some(pem.as_slice()),
            });
        }

        // Objects: default-deny and allow rules, pools, ingresses.
        let mut applied = Vec::new();
        let mut left = Vec::new();
        for (ns, objs) in &objects {
            let mut applier = Applier::new(client.clone(), ns, MANAGER);
            for o in objs {
                let live = applier.apply(o).await?;
                left.push(cluster::LeftAs::of(&live, ns));
                applied.push(Applied {
                    object: describe(ns, o),
                    resource_version: live.resource_version().unwrap_or_default(),
                    generation: live.metadata.generation.unwrap_or_default(),
                });
            }
        }
        let mut default_deny = Vec::new();
        for ns in &self.config.namespaces {
            let live = Api::<NetworkPolicy>::namespaced(client.clone(), ns)
                .list(&ListParams::default())
                .await
                .map_err(cluster::ClusterError::api(format!(
                    "cannot list network policies in {ns}"
                )))?;
            match live.items.iter().find(|p| policy::is_default_deny(p)) {
                Some(p) => default_deny.push(format!("{ns}/{}", p.name_any())),
                None => {
                    return Err(Error::Refused(format!(
                        "namespace {ns} has no default-deny policy after the change"
                    )));
                }
            }
        }

        let health = self.health(&spec).await?;
        let last = LastApplied::of(job, &commit, &record.dns, |c| &c.after, left);
        self.save_last_applied(&client, job, &last).await?;
        tracing::info!(run_id = %job.run_id, records = changed.len(), certificates = certificates.len(), objects = applied.len(), "network applied");
        Ok(ApplyOutputs {
            commit,
            changed_records: changed,
            records: record.dns,
            propagation_seconds: waited.as_secs_f64(),
            nameservers: servers.values().flatten().map(|s| s.name.clone()).collect(),
            not_checked_over_dns: not_checked,
            certificates,
            applied,
            default_deny,
            flows_checked,
            health,
            drift,
        })
    }

    async fn save_last_applied(&self, client: &Client, job: &StepJob, last: &LastApplied) -> Result<(), Error> {
        let labels = BTreeMap::from([
            ("app.kubernetes.io/managed-by".to_owned(), MANAGER.to_owned()),
            ("baton.dev/service".to_owned(), job.deploy.service.clone()),
        ]);
        let name = last_applied_name(&job.deploy.service);
        cluster::put_json(client, &self.config.record_namespace, &name, &labels, last, MANAGER).await?;
        Ok(())
    }

    /// The live DNS sets and objects against what the last step that applied
    /// this service's network left; `live` holds the entries read so far by
    /// domain (more are read as needed).
    async fn drift(
        &self,
        client: &Client,
        job: &StepJob,
        live: &mut BTreeMap<String, Vec<DnsEntry>>,
    ) -> Result<Vec<String>, Error> {
        let Some(last): Option<LastApplied> = cluster::read_json(
            client,
            &self.config.record_namespace,
            &last_applied_name(&job.deploy.service),
        )
        .await?
        else {
            return Ok(Vec::new());
        };
        if last.run == job.run_id.to_string() {
            // A redelivery of the step that wrote it.
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for set in &last.dns {
            if !live.contains_key(&set.domain) {
                live.insert(set.domain.clone(), self.transip.entries(&set.domain).await?);
            }
            let now = entries_of(&live[&set.domain], &set.name, &set.kind);
            if now != set.entries {
                out.push(format!(
                    "DNS {} {} in {} is {}, not what run {} left ({})",
                    set.kind,
                    set.name,
                    set.domain,
                    show(&now),
                    last.run,
                    show(&set.entries)
                ));
            }
        }
        out.extend(cluster::changed_since(client, &last.objects, &last.run).await?);
        Ok(out)
    }

    /// Makes a DNS set `want` from `now`: one entry whose content changes is
    /// changed in place (a name never has two CNAMEs, not even for a moment);
    /// otherwise what is missing is added before what is not wanted goes, so
    /// the name always answers.
    async fn converge(&self, domain: &str, now: &[DnsEntry], want: &[DnsEntry]) -> Result<(), Error> {
        if let ([old], [new]) = (now, want)
            && old.expire == new.expire
        {
            self.transip.update(domain, new).await?;
            return Ok(());
        }
        for e in want.iter().filter(|e| !now.contains(e)) {
            self.transip.add(domain, e).await?;
        }
        for e in now.iter().filter(|e| !want.contains(e)) {
            self.transip.remove(domain, e).await?;
        }
        Ok(())
    }

    /// The ACME account, kept in a Secret of the record namespace.
    async fn account(&self, client: &Client) -> Result<instant_acme::Account, Error> {
        let ns = &self.config.record_namespace;
        let kept: Option<instant_acme::AccountCredentials> = cluster::read_json(client, ns, ACCOUNT_SECRET).await?;
        let (account, created) = self.acme.account(kept).await?;
        if let Some(creds) = created {
            let labels = BTreeMap::from([("app.kubernetes.io/managed-by".to_owned(), MANAGER.to_owned())]);
            // Two deliveries racing both made an account; the one kept first stands next time.
            let _kept = cluster::keep_json(client, ns, ACCOUNT_SECRET, &labels, creds).await?;
        }
        Ok(account)
    }

    /// Every host through the load balancer: its health path over TLS answers
    /// 2xx; plain HTTP only redirects to HTTPS.
    async fn health(&self, spec: &Spec) -> Result<Vec<Checked>, Error> {
        let timeout = Duration::from_secs(self.config.request_timeout_secs);
        let mut checked = Vec::new();
        let mut failures = Vec::new();
        for i in &spec.ingresses {
            for host in &i.hosts {
                if let Some(lb) = self.config.load_balancer.https {
                    match health::https(lb, self.tls.clone(), host, &i.health_path, timeout).await {
                        Ok(c) if (200..300).contains(&c.status) => checked.push(c),
                        Ok(c) => failures.push(format!("{} answers HTTP {}", c.url, c.status)),
                        Err(e) => failures.push(e),
                    }
                }
                if let Some(lb) = self.config.load_balancer.http {
                    match health::http(lb, host, &i.health_path, timeout).await {
                        Ok(c) if health::redirects_to_tls(&c, host) => checked.push(c),
                        Ok(c) => failures.push(format!(
                            "{} answers HTTP {} (location {:?}) instead of redirecting to https://{host}: all traffic TLS",
                            c.url, c.status, c.location
                        )),
                        Err(e) => failures.push(e),
                    }
                }
            }
        }
        if failures.is_empty() {
            Ok(checked)
        } else {
            Err(Error::Health { failures })
        }
    }

    async fn revert(&self, job: &StepJob) -> Result<RevertOutputs, Error> {
        let client = cluster::connect(&self.config.kubeconfig).await?;
        let Some(record): Option<StepRecord> =
            cluster::read_json(&client, &self.config.record_namespace, &record_name(job)).await?
        else {
            return Ok(RevertOutputs {
                note: "the step recorded nothing, so it changed nothing".to_owned(),
                ..RevertOutputs::default()
            });
        };
        let run = job.run_id.to_string();
        // Refuse before changing anything when a DNS set moved on.
        let mut live = BTreeMap::new();
        for c in &record.dns {
            if !live.contains_key(&c.domain) {
                live.insert(c.domain.clone(), self.transip.entries(&c.domain).await?);
            }
            let now = entries_of(&live[&c.domain], &c.name, &c.kind);
            if now != c.after && now != c.before {
                return Err(Error::Moved(format!("DNS {}", c.describe())));
            }
        }
        let mut out = RevertOutputs {
            reverted: true,
            ..RevertOutputs::default()
        };
        // Objects first: each namespace's are checked before any changes.
        for (ns, entries) in &record.objects {
            let mut applier = Applier::new(client.clone(), ns, MANAGER);
            let r = cluster::Record {
                commit: record.commit.clone(),
                entries: entries.clone(),
            };
            let restored = cluster::restore(&mut applier, &r, &run, &[]).await?;
            out.objects_restored
                .extend(restored.restored.iter().map(|o| format!("{ns}/{o}")));
            out.objects_deleted
                .extend(restored.deleted.iter().map(|o| format!("{ns}/{o}")));
        }
        for c in &record.dns {
            let now = entries_of(&live[&c.domain], &c.name, &c.kind);
            if now == c.before {
                continue;
            }
            for e in now.iter().filter(|e| !c.before.contains(e)) {
                out.caches_may_hold_seconds = out.caches_may_hold_seconds.max(e.expire);
            }
            self.converge(&c.domain, &now, &c.before).await?;
            out.records_restored.push(c.describe());
        }
        // What the pipeline left is now what the step found.
        let mut objects = Vec::new();
        for (ns, entries) in &record.objects {
            let mut applier = Applier::new(client.clone(), ns, MANAGER);
            for e in entries {
                if let Some(o) = applier.get(&e.target()).await? {
                    objects.push(cluster::LeftAs::of(&o, ns));
                }
            }
        }
        let last = LastApplied::of(job, &record.commit, &record.dns, |c| &c.before, objects);
        self.save_last_applied(&client, job, &last).await?;
        tracing::info!(run_id = %job.run_id, records = out.records_restored.len(), objects = out.objects_restored.len() + out.objects_deleted.len(), "network reverted");
        Ok(out)
    }
}

impl Role for Network {
    fn name(&self) -> &str {
        baton_shared::roles::NETWORK
    }

    fn execute<'a>(&'a self, job: &'a StepJob, _ctx: &'a ExecContext) -> BoxFuture<'a, Outcome> {
        // A cancelled attempt's partial work is undone by `revert` from the
        // record written before anything changed.
        Box::pin(async move { kit::outcome(job, self.run(job).await) })
    }

    fn compensate<'a>(&'a self, job: &'a StepJob, _ctx: &'a ExecContext) -> BoxFuture<'a, Outcome> {
        Box::pin(async move { kit::outcome(job, self.run(job).await) })
    }
}
