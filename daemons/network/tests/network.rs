//! The network role against real parts: a Kubernetes control plane (policies,
//! Services, ingresses, Secrets), pebble issuing real certificates by DNS-01,
//! and the TransIP stand-in (`baton_shared::fake_transip`), whose API checks
//! the key-pair login and whose nameservers answer real DNS queries. The load
//! balancer (`baton_shared::fake_lb`) serves each host with the certificate
//! its ingress names, read from the cluster at each handshake as an ingress
//! controller does, and redirects plain HTTP.

use std::collections::BTreeMap;

use baton_network::config::{AcmeConfig, DnsConfig, LoadBalancerConfig, TransipConfig};
use baton_network::transip::DnsEntry;
use baton_network::{ApplyOutputs, Network, NetworkConfig, RevertOutputs};
use baton_shared::fake_lb::LoadBalancer;
use baton_shared::fake_transip::{Entry, FakeTransip};
use baton_shared::pebble::Pebble;
use baton_shared::protocol::{Fields, JobKind, StepJob};
use baton_shared::secret::Secret;
use baton_shared::test_cluster::TestNamespace;
use baton_shared::testing::{GitRepo, TempDir};
use k8s_openapi::api::core::v1::Secret as KubeSecret;
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use kube::Api;
use serde_json::Value;
use uuid::Uuid;

const DOMAIN: &str = "example.test";
const HOST: &str = "www.example.test";

struct Fixture {
    ns: TestNamespace,
    transip: FakeTransip,
    pebble: Pebble,
    lb: LoadBalancer,
    repo: GitRepo,
    dirs: TempDir,
    network: Network,
}

fn parse<T: serde::de::DeserializeOwned>(fields: Fields) -> T {
    serde_json::from_value(Value::Object(fields)).unwrap()
}

/// The folder of the tests' service: `www` at `ip` with `ttl`, its ingress,
/// pool and policies; the policy into the web pods admits `web_port`.
fn folder(ns: &str, ip: &str, ttl: u32, web_port: u16, hosts: &str) -> String {
    format!(
        r#"
[[record]]
domain = "{DOMAIN}"
name = "www"
type = "A"
content = "{ip}"
ttl = {ttl}

[[ingress]]
name = "web"
namespace = "{ns}"
hosts = [{hosts}]
service = "web"
port = 80
certificate = "web-tls"

[[pool]]
name = "web"
namespace = "{ns}"
selector = {{ app = "web" }}
port = 80
target_port = 8080

[[policy]]
name = "web-in"
namespace = "{ns}"
pods = {{ app = "web" }}
ingress = [{{ from = [{{ pods = {{ app = "lb" }} }}], ports = [{web_port}] }}]

[[policy]]
name = "lb-out"
namespace = "{ns}"
pods = {{ app = "lb" }}
egress = [{{ to = [{{ pods = {{ app = "web" }} }}], ports = [8080] }}]

[[flow]]
from = {{ namespace = "{ns}", pods = {{ app = "lb" }} }}
to = {{ namespace = "{ns}", pods = {{ app = "web" }} }}
port = 8080
"#
    )
}

fn entry(name: &str, ttl: u32, kind: &str, content: &str) -> Entry {
    Entry {
        name: name.into(),
        expire: ttl,
        kind: kind.into(),
        content: content.into(),
    }
}

impl Fixture {
    async fn new(prefix: &str) -> Self {
        Self::with(prefix, false).await
    }

    /// `http01`: certificates by HTTP-01 through the load balancer.
    async fn with(prefix: &str, http01: bool) -> Self {
        let ns = TestNamespace::new(prefix).await;
        let dirs = TempDir::new("network");
        let out = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let key = String::from_utf8(out.stdout).unwrap();
        let transip = FakeTransip::start("shop-ops", key.as_bytes(), &[DOMAIN], 2).await;
        // Someone set up www before Baton managed it.
        transip.set_entries(
            DOMAIN,
            vec![entry("www", 3600, "A", "192.0.2.1"), entry("@", 3600, "MX", "10 mail")],
        );
        let solver = http01.then(|| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        });
        let lb = LoadBalancer::start(ns.client.clone(), vec![ns.name.clone()], solver).await;
        let pebble = Pebble::start(transip.nameservers[0], Some(lb.http.port()), &["blocked.example.test"]).await;
        let config = NetworkConfig {
            kubeconfig: ns.kubeconfig.clone(),
            namespaces: vec![ns.name.clone()],
            record_namespace: ns.name.clone(),
            repos_dir: dirs.path().join("repos"),
            work_dir: dirs.path().join("work"),
            poll_ms: 100,
            transip: TransipConfig {
                api_url: transip.api_url.clone(),
                login: "shop-ops".into(),
                private_key: Secret::new(key),
            },
            dns: DnsConfig {
                nameservers: BTreeMap::from([(DOMAIN.to_owned(), transip.nameservers.clone())]),
            },
            acme: AcmeConfig {
                directory_url: pebble.directory_url.clone(),
                root_ca_file: Some(pebble.listener_ca.clone()),
                timeout_secs: 300,
                http01_listen: solver,
                ..AcmeConfig::default()
            },
            load_balancer: LoadBalancerConfig {
                http: Some(lb.http),
                https: Some(lb.https),
                ca_file: Some(pebble.issuing_root.clone()),
            },
            ..NetworkConfig::default()
        };
        config.validate().unwrap();
        Self {
            network: Network::new(config).unwrap(),
            ns,
            transip,
            pebble,
            lb,
            repo: GitRepo::new(),
            dirs,
        }
    }

    fn commit(&self, ip: &str, ttl: u32, web_port: u16, hosts: &str) -> String {
        self.repo
            .write("network/site.toml", folder(&self.ns.name, ip, ttl, web_port, hosts));
        self.repo.commit(&format!("www at {ip}"))
    }

    fn job(&self, commit: &str, run: Uuid) -> StepJob {
        let mut job = StepJob::example("production", "network", "apply")
            // Long enough for a loaded machine; the propagation test sets its own.
            .with_param("propagation_deadline_secs", 120);
        job.run_id = run;
        job.step_id = "network".to_owned();
        job.deploy.service = "shop".to_owned();
        job.deploy.repository = self.repo.url();
        job.deploy.commit_sha = commit.to_owned();
        job
    }

    async fn apply(&self, job: &StepJob) -> Result<ApplyOutputs, String> {
        self.network
            .run(job)
            .await
            .map(parse)
            .map_err(|e| format!("{}: {e}", e.code()))
    }

    async fn revert(&self, job: &StepJob) -> RevertOutputs {
        let mut job = job.clone();
        job.kind = JobKind::Compensate;
        job.action = "revert".to_owned();
        parse(self.network.run(&job).await.expect("revert"))
    }

    async fn www(&self, server: usize) -> Vec<String> {
        baton_network::dns::query(
            self.transip.nameservers[server],
            HOST,
            "A",
            std::time::Duration::from_secs(5),
        )
        .await
        .unwrap()
        .into_iter()
        .collect()
    }

    async fn policies(&self) -> Vec<String> {
        let mut names: Vec<String> = Api::<NetworkPolicy>::namespaced(self.ns.client.clone(), &self.ns.name)
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            // Not counting those being deleted (foreground deletion).
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| p.metadata.name)
            .collect();
        names.sort();
        names
    }

    async fn ingress(&self) -> Option<Ingress> {
        Api::<Ingress>::namespaced(self.ns.client.clone(), &self.ns.name)
            .get_opt("web")
            .await
            .unwrap()
    }

    /// Whether the ingress is gone once the garbage collector has finished a
    /// foreground deletion (it keeps the object, marked deleted, until then).
    async fn ingress_gone(&self) -> bool {
        use futures_util::TryStreamExt;
        let api = Api::<Ingress>::namespaced(self.ns.client.clone(), &self.ns.name);
        let Some(live) = api.get_opt("web").await.unwrap() else {
            return true;
        };
        if live.metadata.deletion_timestamp.is_none() {
            return false;
        }
        // Watch from the version read: the deletion is an event after it.
        let version = live.metadata.resource_version.unwrap_or_default();
        let params = kube::api::WatchParams::default()
            .fields("metadata.name=web")
            .timeout(290);
        let mut events = Box::pin(api.watch(&params, &version).await.unwrap());
        while let Some(event) = events.try_next().await.unwrap() {
            if let kube::api::WatchEvent::Deleted(_) = event {
                return true;
            }
        }
        false
    }
}

fn www_entries(t: &FakeTransip) -> Vec<Entry> {
    t.entries(DOMAIN).into_iter().filter(|e| e.name == "www").collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_brings_dns_certificate_policies_and_ingress_about_and_revert_restores_them() {
    let f = Fixture::new("net-apply").await;
    let commit = f.commit("192.0.2.10", 300, 8080, &format!("\"{HOST}\""));
    let run = Uuid::new_v4();
    let job = f.job(&commit, run);
    let out = f
        .apply(&job)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", f.pebble.log()));

    // DNS: the declared set replaced the old one, every nameserver answers it.
    assert_eq!(www_entries(&f.transip), [entry("www", 300, "A", "192.0.2.10")]);
    assert_eq!(f.www(0).await, ["192.0.2.10"]);
    assert_eq!(f.www(1).await, ["192.0.2.10"]);
    assert_eq!(out.changed_records, ["A www in example.test"]);
    assert_eq!(
        out.records[0].before,
        [DnsEntry {
            name: "www".into(),
            expire: 3600,
            kind: "A".into(),
            content: "192.0.2.1".into()
        }]
    );
    // The undeclared MX is left alone; the challenge records are gone again.
    assert!(f.transip.entries(DOMAIN).iter().any(|e| e.kind == "MX"));
    assert!(
        !f.transip
            .entries(DOMAIN)
            .iter()
            .any(|e| e.name.starts_with("_acme-challenge"))
    );

    // A certificate from pebble, in a kubernetes.io/tls Secret, served by the
    // load balancer and verified against pebble's root by the health check.
    assert_eq!(out.certificates.len(), 1);
    let cert = &out.certificates[0];
    assert!(cert.issued);
    assert_eq!(cert.hosts, [HOST]);
    let secret = Api::<KubeSecret>::namespaced(f.ns.client.clone(), &f.ns.name)
        .get("web-tls")
        .await
        .unwrap();
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let https: Vec<_> = out.health.iter().filter(|c| c.url.starts_with("https://")).collect();
    assert_eq!(https.len(), 1);
    assert_eq!(https[0].status, 200);
    let plain = out.health.iter().find(|c| c.url.starts_with("http://")).unwrap();
    assert_eq!(plain.status, 308);

    // Policies: default-deny plus the explicit allow rules, by baton-network.
    assert_eq!(f.policies().await, ["baton-default-deny", "lb-out", "web-in"]);
    assert_eq!(out.default_deny, [format!("{}/baton-default-deny", f.ns.name)]);
    assert_eq!(out.flows_checked.len(), 1);
    let ingress = f.ingress().await.expect("the ingress");
    let managers: Vec<_> = ingress
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(managers.contains(&"baton-network".to_owned()), "{managers:?}");
    let tls = ingress.spec.unwrap().tls.unwrap();
    assert_eq!(tls[0].hosts.as_deref(), Some(&[HOST.to_owned()][..]));

    // A redelivered job finds its record and the certificate in place.
    let again = f.apply(&job).await.unwrap();
    assert_eq!(again.records, out.records);
    assert!(again.changed_records.is_empty());
    assert!(!again.certificates[0].issued);
    assert_eq!(again.certificates[0].serial, cert.serial);

    // Renewal: a certificate with less left than renew_before_days is replaced
    // (pebble's last about five years).
    let renew = f.job(&commit, Uuid::new_v4()).with_param("renew_before_days", 3000);
    let renewed = f.apply(&renew).await.unwrap();
    assert!(renewed.certificates[0].issued);
    assert_ne!(renewed.certificates[0].serial, cert.serial);

    // Revert the first run: the later run applied the same objects, so they
    // are its now and the revert refuses rather than undo it.
    let e = f
        .network
        .run(&{
            let mut j = job.clone();
            j.kind = JobKind::Compensate;
            j.action = "revert".into();
            j
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), "state_moved", "{e}");
    assert_eq!(
        www_entries(&f.transip),
        [entry("www", 300, "A", "192.0.2.10")],
        "nothing changed"
    );

    // Reverting the later run leaves what it found (the first run's state).
    let back = f.revert(&renew).await;
    assert!(back.reverted);
    assert!(back.records_restored.is_empty(), "{back:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn revert_restores_records_and_objects_and_reports_the_ttl() {
    let f = Fixture::new("net-revert").await;
    let commit = f.commit("192.0.2.20", 600, 8080, &format!("\"{HOST}\""));
    let job = f.job(&commit, Uuid::new_v4());
    f.apply(&job)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", f.pebble.log()));
    assert_eq!(f.www(1).await, ["192.0.2.20"]);

    // A content change of a one-entry set with the same TTL is one PATCH.
    let commit = f.commit("192.0.2.21", 600, 8080, &format!("\"{HOST}\""));
    let later = f.job(&commit, Uuid::new_v4());
    f.apply(&later).await.unwrap();
    assert_eq!(f.transip.changes().last().unwrap(), "PATCH www 600 A 192.0.2.21");
    assert_eq!(f.www(1).await, ["192.0.2.21"]);
    let back = f.revert(&later).await;
    assert_eq!(back.records_restored, ["A www in example.test"]);
    assert_eq!(f.www(0).await, ["192.0.2.20"]);

    let back = f.revert(&job).await;
    assert!(back.reverted);
    assert_eq!(back.records_restored, ["A www in example.test"]);
    assert_eq!(back.caches_may_hold_seconds, 600);
    assert_eq!(www_entries(&f.transip), [entry("www", 3600, "A", "192.0.2.1")]);
    assert_eq!(f.www(0).await, ["192.0.2.1"]);
    // The objects the step created are gone; the certificate stays (the old
    // one would have stayed valid; this one may be referenced elsewhere).
    assert!(f.ingress_gone().await);
    assert!(f.policies().await.is_empty());
    assert!(
        back.objects_deleted.iter().any(|o| o.ends_with("Ingress/web")),
        "{back:?}"
    );
    assert!(
        Api::<KubeSecret>::namespaced(f.ns.client.clone(), &f.ns.name)
            .get_opt("web-tls")
            .await
            .unwrap()
            .is_some()
    );
    // A second revert finds everything as recorded.
    let twice = f.revert(&job).await;
    assert!(twice.records_restored.is_empty() && twice.objects_restored.is_empty() && twice.objects_deleted.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_that_blocks_a_declared_flow_is_refused_before_anything_changes() {
    let f = Fixture::new("net-flow").await;
    // The web pods admit 9090; the declared flow is to 8080.
    let commit = f.commit("192.0.2.10", 300, 9090, &format!("\"{HOST}\""));
    let e = f.apply(&f.job(&commit, Uuid::new_v4())).await.unwrap_err();
    assert!(
        e.starts_with("policy_blocks_traffic: network policy blocks required traffic"),
        "{e}"
    );
    assert!(e.contains("{app=lb} → ") && e.contains("port 8080"), "{e}");
    assert!(e.contains("network/site.toml:36"), "{e}");
    assert!(
        e.contains(&format!("{}/web-in", f.ns.name)) && e.contains("baton-default-deny"),
        "{e}"
    );
    assert!(f.transip.changes().is_empty());
    assert!(f.policies().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lagging_nameserver_fails_propagation_naming_it_and_revert_restores() {
    let f = Fixture::new("net-lag").await;
    f.transip.lag(1, true);
    let commit = f.commit("192.0.2.30", 300, 8080, &format!("\"{HOST}\""));
    // The lagging server never catches up, so the deadline decides nothing
    // about timing: it only bounds how long the test waits.
    let job = f
        .job(&commit, Uuid::new_v4())
        .with_param("propagation_deadline_secs", 2);
    let e = f.apply(&job).await.unwrap_err();
    assert!(e.starts_with("dns_propagation_failed: DNS propagation failure"), "{e}");
    let lagging = f.transip.nameservers[1].to_string();
    assert!(
        e.contains(&format!(
            "{lagging} ({lagging}) answers A www.example.test with [192.0.2.1], not [192.0.2.30]"
        )),
        "{e}"
    );
    assert!(
        !e.contains(&f.transip.nameservers[0].to_string()),
        "the server that answers is not named: {e}"
    );
    let back = f.revert(&job).await;
    assert_eq!(back.records_restored, ["A www in example.test"]);
    assert_eq!(www_entries(&f.transip), [entry("www", 3600, "A", "192.0.2.1")]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_issuance_fails_the_step_with_the_cas_reason() {
    let f = Fixture::new("net-acme").await;
    let commit = f.commit("192.0.2.10", 300, 8080, "\"blocked.example.test\"");
    let e = f.apply(&f.job(&commit, Uuid::new_v4())).await.unwrap_err();
    assert!(
        e.starts_with("certificate_issuance_failed: certificate issuance failed for blocked.example.test"),
        "{e}"
    );
    assert!(e.contains("rejectedIdentifier") || e.contains("blocked"), "{e}");
    assert!(f.ingress().await.is_none(), "no ingress without its certificate");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_health_check_fails_the_step_and_revert_restores() {
    let f = Fixture::new("net-health").await;
    f.lb.answer(HOST, 503);
    let commit = f.commit("192.0.2.40", 300, 8080, &format!("\"{HOST}\""));
    let job = f.job(&commit, Uuid::new_v4());
    let e = f.apply(&job).await.unwrap_err();
    assert_eq!(
        e,
        "load_balancer_unhealthy: load balancer health check failure: https://www.example.test/healthz answers HTTP 503"
    );
    let back = f.revert(&job).await;
    assert_eq!(back.records_restored, ["A www in example.test"]);
    assert!(f.ingress_gone().await);
    assert_eq!(www_entries(&f.transip), [entry("www", 3600, "A", "192.0.2.1")]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mistake_in_the_folder_names_file_and_line() {
    let f = Fixture::new("net-spec").await;
    f.repo.write(
        "network/site.toml",
        "[[record]]\ndomain = \"example.test\"\nname = \"www\"\ntype = \"A\"\ncontent = \"192.0.2.999\"\n",
    );
    let commit = f.repo.commit("typo");
    let e = f.apply(&f.job(&commit, Uuid::new_v4())).await.unwrap_err();
    assert_eq!(
        e,
        "network_spec_invalid: the network folder: network/site.toml:1: content \"192.0.2.999\" is not a valid A value; nothing was changed"
    );
    assert!(f.transip.changes().is_empty());
    let _ = &f.dirs;
}

#[tokio::test(flavor = "multi_thread")]
async fn http_01_issues_through_the_load_balancer() {
    let f = Fixture::with("net-http01", true).await;
    // Pebble reaches the host where its record points: this machine, where
    // the load balancer hands challenges to the daemon's solver.
    let commit = f.commit("127.0.0.1", 300, 8080, &format!("\"{HOST}\""));
    let out = f
        .apply(&f.job(&commit, Uuid::new_v4()))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", f.pebble.log()));
    assert!(out.certificates[0].issued);
    assert!(f.pebble.log().contains("validate w/ HTTP"), "{}", f.pebble.log());
    // No challenge went through DNS.
    assert!(!f.transip.changes().iter().any(|c| c.contains("_acme-challenge")));
    assert_eq!(
        out.health
            .iter()
            .find(|c| c.url.starts_with("https://"))
            .unwrap()
            .status,
        200
    );
}

/// "Production changes only through the pipeline": a record or object changed
/// by hand since the last apply is reported, by name, before the next apply
/// changes anything.
#[tokio::test(flavor = "multi_thread")]
async fn changes_outside_the_pipeline_are_reported_before_the_next_apply() {
    let f = Fixture::new("net-drift").await;
    let commit = f.commit("192.0.2.50", 300, 8080, &format!("\"{HOST}\""));
    let first = f.apply(&f.job(&commit, Uuid::new_v4())).await.unwrap();
    assert!(first.drift.is_empty(), "{:?}", first.drift);

    // Someone edits DNS in TransIP's panel and the ingress with kubectl.
    let mut entries = f.transip.entries(DOMAIN);
    entries.retain(|e| e.name != "www");
    entries.push(entry("www", 300, "A", "198.51.100.7"));
    f.transip.set_entries(DOMAIN, entries);
    let ingresses = Api::<Ingress>::namespaced(f.ns.client.clone(), &f.ns.name);
    ingresses
        .patch(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"rules": [{"host": "www.example.test",
                "http": {"paths": [{"path": "/", "pathType": "Prefix",
                    "backend": {"service": {"name": "other", "port": {"number": 80}}}}]}}]}})),
        )
        .await
        .unwrap();

    let second = f.apply(&f.job(&commit, Uuid::new_v4())).await.unwrap();
    let ns = &f.ns.name;
    assert_eq!(second.drift.len(), 2, "{:?}", second.drift);
    assert!(
        second.drift[0].starts_with("DNS A www in example.test is 198.51.100.7 (ttl 300), not what run ")
            && second.drift[0].ends_with("left (192.0.2.50 (ttl 300))"),
        "{:?}",
        second.drift
    );
    assert!(
        second.drift[1].starts_with(&format!("{ns}/Ingress/web was changed since run ")),
        "{:?}",
        second.drift
    );
    // The apply then brought the declared state back.
    assert_eq!(www_entries(&f.transip), [entry("www", 300, "A", "192.0.2.50")]);
    let third = f.apply(&f.job(&commit, Uuid::new_v4())).await.unwrap();
    assert!(third.drift.is_empty(), "{:?}", third.drift);
}
