//! The `network/` folder of a repository: what a merge declares about DNS,
//! ingress, network policies and load-balancer pools, read from every
//! `*.toml` file in it and checked with messages naming file and line.
//!
//! ```toml
//! [[record]]                      # DNS at TransIP; one entry each
//! domain = "example.com"
//! name = "www"                    # "@" is the domain itself
//! type = "A"
//! content = "203.0.113.10"
//! ttl = 300                       # seconds (TransIP's `expire`)
//!
//! [[ingress]]                     # every host served over TLS
//! name = "web"
//! namespace = "shop"
//! hosts = ["www.example.com"]
//! service = "web"
//! port = 80
//! health_path = "/healthz"
//! certificate = "web-tls"         # the kubernetes.io/tls Secret (Let's Encrypt)
//!
//! [[pool]]                        # a load-balancer backend pool: a Service
//! name = "web"
//! namespace = "shop"
//! selector = { app = "web" }
//! port = 80
//! target_port = 8080
//!
//! [[policy]]                      # an explicit allow rule (default-deny is implied)
//! name = "web-from-ingress"
//! namespace = "shop"
//! pods = { app = "web" }
//! ingress = [{ from = [{ namespace = "ingress", pods = { app = "traefik" } }], ports = [8080] }]
//! egress = [{ to = [{ pods = { app = "db" } }], ports = [5432] }]
//!
//! [[flow]]                        # traffic the policies must let through
//! from = { namespace = "ingress", pods = { app = "traefik" } }
//! to = { namespace = "shop", pods = { app = "web" } }
//! port = 8080
//! ```
//!
//! All records with the same domain, name and type are that name's whole set
//! for the type: the daemon adds what is missing and removes what is not
//! declared. `state = "absent"` (without content) removes a name's entries of
//! a type. Names and types the folder does not mention are left alone.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// TransIP's record types.
pub const RECORD_TYPES: &[&str] = &[
    "A", "AAAA", "CNAME", "MX", "NS", "TXT", "SRV", "SSHFP", "TLSA", "CAA", "NAPTR",
];

/// A mistake in the folder: the file, the line, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {problem}")]
pub struct SpecError {
    pub file: String,
    pub line: usize,
    pub problem: String,
}

/// Labels that select pods (`matchLabels`).
pub type Labels = BTreeMap<String, String>;

/// One DNS entry as declared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub domain: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// None with `absent`.
    pub content: Option<String>,
    pub ttl: u32,
    #[serde(skip)]
    pub at: String,
}

/// An ingress: hosts routed to a Service, over TLS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ingress {
    pub name: String,
    pub namespace: String,
    pub hosts: Vec<String>,
    pub service: String,
    pub port: u16,
    pub health_path: String,
    pub certificate: String,
    #[serde(skip)]
    pub at: String,
}

/// A backend pool: a Service selecting pods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub name: String,
    pub namespace: String,
    pub selector: Labels,
    pub port: u16,
    pub target_port: u16,
    #[serde(skip)]
    pub at: String,
}

/// A peer of a policy rule or a flow: pods (by labels) in a namespace
/// (none: the policy's own namespace).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub namespace: Option<String>,
    #[serde(default)]
    pub pods: Labels,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<u16>,
}

/// An allow rule set for the pods it selects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub pods: Labels,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
    #[serde(skip)]
    pub at: String,
}

/// Traffic that must be allowed (TCP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    pub from: Peer,
    pub to: Peer,
    pub port: u16,
    #[serde(skip)]
    pub at: String,
}

impl Flow {
    pub fn describe(&self) -> String {
        let side = |p: &Peer| {
            let labels: Vec<String> = p.pods.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{}/{{{}}}", p.namespace.as_deref().unwrap_or("?"), labels.join(","))
        };
        format!("{} → {} port {}", side(&self.from), side(&self.to), self.port)
    }
}

/// The whole folder.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub records: Vec<Record>,
    pub ingresses: Vec<Ingress>,
    pub pools: Vec<Pool>,
    pub policies: Vec<Policy>,
    pub flows: Vec<Flow>,
}

impl Spec {
    /// The namespaces the folder's objects live in.
    pub fn namespaces(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        out.extend(self.ingresses.iter().map(|i| i.namespace.clone()));
        out.extend(self.pools.iter().map(|p| p.namespace.clone()));
        out.extend(self.policies.iter().map(|p| p.namespace.clone()));
        out
    }

    /// Declared DNS sets by (domain, name, type): the contents wanted (empty:
    /// none) and their TTL.
    pub fn dns_sets(&self) -> BTreeMap<(String, String, String), (BTreeSet<String>, u32)> {
        let mut out: BTreeMap<_, (BTreeSet<String>, u32)> = BTreeMap::new();
        for r in &self.records {
            let set = out
                .entry((r.domain.clone(), r.name.clone(), r.kind.clone()))
                .or_insert_with(|| (BTreeSet::new(), r.ttl));
            if let Some(c) = &r.content {
                set.0.insert(c.clone());
            }
        }
        out
    }
}

// The files' own shapes (checked for unknown keys by serde).

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    record: Vec<toml::Spanned<RecordIn>>,
    #[serde(default)]
    ingress: Vec<toml::Spanned<IngressIn>>,
    #[serde(default)]
    pool: Vec<toml::Spanned<PoolIn>>,
    #[serde(default)]
    policy: Vec<toml::Spanned<PolicyIn>>,
    #[serde(default)]
    flow: Vec<toml::Spanned<FlowIn>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordIn {
    domain: String,
    name: String,
    #[serde(rename = "type")]
    kind: String,
    content: Option<String>,
    ttl: Option<u32>,
    state: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IngressIn {
    name: String,
    namespace: String,
    hosts: Vec<String>,
    service: String,
    port: u16,
    #[serde(default = "default_health")]
    health_path: String,
    certificate: String,
}

fn default_health() -> String {
    "/healthz".to_owned()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolIn {
    name: String,
    namespace: String,
    selector: Labels,
    port: u16,
    target_port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerIn {
    namespace: Option<String>,
    #[serde(default)]
    pods: Labels,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IngressRuleIn {
    from: Vec<PeerIn>,
    ports: Vec<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EgressRuleIn {
    to: Vec<PeerIn>,
    ports: Vec<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyIn {
    name: String,
    namespace: String,
    pods: Labels,
    #[serde(default)]
    ingress: Vec<IngressRuleIn>,
    #[serde(default)]
    egress: Vec<EgressRuleIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlowIn {
    from: PeerIn,
    to: PeerIn,
    port: u16,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|b| *b == b'\n').count() + 1
}

/// A DNS name (labels of letters, digits and hyphens; `_` allowed for
/// service labels such as `_acme-challenge`).
pub fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn is_label_key(s: &str) -> bool {
    let name = s.rsplit('/').next().unwrap_or(s);
    !name.is_empty() && name.len() <= 63 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn check_labels(what: &str, labels: &Labels, problems: &mut Vec<String>) {
    for (k, v) in labels {
        if !is_label_key(k) || v.len() > 63 || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            problems.push(format!("{what}: {k}={v:?} is not a Kubernetes label"));
        }
    }
}

fn check_object(kind: &str, name: &str, namespace: &str, problems: &mut Vec<String>) {
    use baton_shared::cluster::is_dns_label;
    if !is_dns_label(name) {
        problems.push(format!("{kind} name {name:?} is not a DNS label"));
    }
    if !is_dns_label(namespace) {
        problems.push(format!("{kind} {name}: namespace {namespace:?} is not a DNS label"));
    }
}

fn peer(p: PeerIn, what: &str, problems: &mut Vec<String>) -> Peer {
    if let Some(ns) = &p.namespace
        && !baton_shared::cluster::is_dns_label(ns)
    {
        problems.push(format!("{what}: namespace {ns:?} is not a DNS label"));
    }
    check_labels(what, &p.pods, problems);
    Peer {
        namespace: p.namespace,
        pods: p.pods,
    }
}

fn rule(peers: Vec<PeerIn>, ports: Vec<u16>, what: &str, problems: &mut Vec<String>) -> Rule {
    // Default-deny, explicit allow rules only: a rule without peers or
    // without ports would allow everyone or everything.
    if peers.is_empty() {
        problems.push(format!("{what} names no peers: it would allow every source; name them"));
    }
    if ports.is_empty() || ports.contains(&0) {
        problems.push(format!(
            "{what} names no ports (or port 0): it would allow every port; name them"
        ));
    }
    Rule {
        peers: peers.into_iter().map(|p| peer(p, what, problems)).collect(),
        ports,
    }
}

fn parse_file(file: &str, text: &str, spec: &mut Spec) -> Result<(), SpecError> {
    let parsed: File = toml::from_str(text).map_err(|e| SpecError {
        file: file.to_owned(),
        line: e.span().map_or(1, |s| line_of(text, s.start)),
        problem: e.message().to_owned(),
    })?;
    let fail = |start: usize, problems: Vec<String>| -> Result<(), SpecError> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SpecError {
                file: file.to_owned(),
                line: line_of(text, start),
                problem: problems.join("; "),
            })
        }
    };
    for item in parsed.record {
        let start = item.span().start;
        let at = format!("{file}:{}", line_of(text, start));
        let r = item.into_inner();
        let mut problems = Vec::new();
        let domain = r.domain.trim_end_matches('.').to_ascii_lowercase();
        if !is_hostname(&domain) || !domain.contains('.') {
            problems.push(format!("domain {:?} is not a domain name", r.domain));
        }
        if r.name != "@" && !is_hostname(&r.name) {
            problems.push(format!("name {:?} is neither \"@\" nor a name in the domain", r.name));
        }
        let kind = r.kind.to_ascii_uppercase();
        if !RECORD_TYPES.contains(&kind.as_str()) {
            problems.push(format!(
                "type {:?} is not one of TransIP's ({})",
                r.kind,
                RECORD_TYPES.join(", ")
            ));
        }
        let absent = match r.state.as_deref() {
            None | Some("present") => false,
            Some("absent") => true,
            Some(other) => {
                problems.push(format!("state {other:?} is neither \"present\" nor \"absent\""));
                false
            }
        };
        match (&r.content, absent) {
            (None, false) => problems.push("content is missing".to_owned()),
            (Some(_), true) => problems.push("an absent record has no content".to_owned()),
            (Some(c), false) => {
                let ok = match kind.as_str() {
                    "A" => c.parse::<std::net::Ipv4Addr>().is_ok(),
                    "AAAA" => c.parse::<std::net::Ipv6Addr>().is_ok(),
                    "CNAME" | "NS" => is_hostname(c.trim_end_matches('.')),
                    _ => !c.trim().is_empty(),
                };
                if !ok {
                    problems.push(format!("content {c:?} is not a valid {kind} value"));
                }
            }
            (None, true) => {}
        }
        let ttl = r.ttl.unwrap_or(3600);
        if !(60..=2_592_000).contains(&ttl) {
            problems.push(format!("ttl {ttl} is outside 60..=2592000 seconds"));
        }
        fail(start, problems)?;
        spec.records.push(Record {
            domain,
            name: r.name.to_ascii_lowercase(),
            kind,
            content: r.content,
            ttl,
            at,
        });
    }
    for item in parsed.ingress {
        let start = item.span().start;
        let at = format!("{file}:{}", line_of(text, start));
        let i = item.into_inner();
        let mut problems = Vec::new();
        check_object("ingress", &i.name, &i.namespace, &mut problems);
        if i.hosts.is_empty() {
            problems.push(format!("ingress {} has no hosts", i.name));
        }
        for h in &i.hosts {
            if !is_hostname(h) || h.contains('_') || !h.contains('.') {
                problems.push(format!("host {h:?} is not a host name"));
            }
        }
        if !baton_shared::cluster::is_dns_label(&i.service) {
            problems.push(format!("service {:?} is not a DNS label", i.service));
        }
        if i.port == 0 {
            problems.push("port 0".to_owned());
        }
        if !i.health_path.starts_with('/') {
            problems.push(format!("health_path {:?} does not start with /", i.health_path));
        }
        if !baton_shared::cluster::is_dns_label(&i.certificate) {
            problems.push(format!("certificate {:?} is not a Secret name", i.certificate));
        }
        fail(start, problems)?;
        spec.ingresses.push(Ingress {
            name: i.name,
            namespace: i.namespace,
            hosts: i.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            service: i.service,
            port: i.port,
            health_path: i.health_path,
            certificate: i.certificate,
            at,
        });
    }
    for item in parsed.pool {
        let start = item.span().start;
        let at = format!("{file}:{}", line_of(text, start));
        let p = item.into_inner();
        let mut problems = Vec::new();
        check_object("pool", &p.name, &p.namespace, &mut problems);
        if p.selector.is_empty() {
            problems.push(format!("pool {} selects no pods (selector is empty)", p.name));
        }
        check_labels(&format!("pool {} selector", p.name), &p.selector, &mut problems);
        if p.port == 0 || p.target_port == Some(0) {
            problems.push("port 0".to_owned());
        }
        fail(start, problems)?;
        spec.pools.push(Pool {
            target_port: p.target_port.unwrap_or(p.port),
            name: p.name,
            namespace: p.namespace,
            selector: p.selector,
            port: p.port,
            at,
        });
    }
    for item in parsed.policy {
        let start = item.span().start;
        let at = format!("{file}:{}", line_of(text, start));
        let p = item.into_inner();
        let mut problems = Vec::new();
        check_object("policy", &p.name, &p.namespace, &mut problems);
        if p.name == crate::DEFAULT_DENY {
            problems.push(format!(
                "{} is the daemon's own default-deny policy",
                crate::DEFAULT_DENY
            ));
        }
        if p.pods.is_empty() {
            problems.push(format!(
                "policy {} selects every pod of {} (pods is empty): allow rules name the pods they are for",
                p.name, p.namespace
            ));
        }
        check_labels(&format!("policy {}", p.name), &p.pods, &mut problems);
        if p.ingress.is_empty() && p.egress.is_empty() {
            problems.push(format!("policy {} allows nothing (no ingress or egress rules)", p.name));
        }
        let ingress = p
            .ingress
            .into_iter()
            .enumerate()
            .map(|(n, r)| {
                rule(
                    r.from,
                    r.ports,
                    &format!("policy {} ingress rule {}", p.name, n + 1),
                    &mut problems,
                )
            })
            .collect();
        let egress = p
            .egress
            .into_iter()
            .enumerate()
            .map(|(n, r)| {
                rule(
                    r.to,
                    r.ports,
                    &format!("policy {} egress rule {}", p.name, n + 1),
                    &mut problems,
                )
            })
            .collect();
        fail(start, problems)?;
        spec.policies.push(Policy {
            name: p.name,
            namespace: p.namespace,
            pods: p.pods,
            ingress,
            egress,
            at,
        });
    }
    for item in parsed.flow {
        let start = item.span().start;
        let at = format!("{file}:{}", line_of(text, start));
        let f = item.into_inner();
        let mut problems = Vec::new();
        if f.from.namespace.is_none() || f.to.namespace.is_none() {
            problems.push("a flow names the namespace of both ends".to_owned());
        }
        if f.port == 0 {
            problems.push("port 0".to_owned());
        }
        let from = peer(f.from, "flow from", &mut problems);
        let to = peer(f.to, "flow to", &mut problems);
        fail(start, problems)?;
        spec.flows.push(Flow {
            from,
            to,
            port: f.port,
            at,
        });
    }
    Ok(())
}

/// Reads every `*.toml` file in `dir` (`shown` is how messages name it), in
/// name order, and checks the whole: names unique per kind and namespace, one
/// TTL per DNS set, a host in one ingress only.
pub fn load(dir: &Path, shown: &str) -> Result<Spec, SpecError> {
    let io = |problem: String| SpecError {
        file: shown.to_owned(),
        line: 0,
        problem,
    };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| io(format!("cannot read the folder: {e}")))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    let mut spec = Spec::default();
    for path in files {
        let name = format!("{shown}/{}", path.file_name().unwrap_or_default().to_string_lossy());
        let text = std::fs::read_to_string(&path).map_err(|e| SpecError {
            file: name.clone(),
            line: 0,
            problem: format!("cannot read: {e}"),
        })?;
        parse_file(&name, &text, &mut spec)?;
    }
    check_whole(&spec)?;
    Ok(spec)
}

/// `at` is `file:line`.
fn error_at(at: &str, problem: String) -> SpecError {
    let (file, line) = at.rsplit_once(':').unwrap_or((at, "0"));
    SpecError {
        file: file.to_owned(),
        line: line.parse().unwrap_or(0),
        problem,
    }
}

fn check_whole(spec: &Spec) -> Result<(), SpecError> {
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut unique = |key: String, at: &str| -> Result<(), SpecError> {
        if let Some(first) = seen.get(&key) {
            return Err(error_at(at, format!("{key} is declared twice (first at {first})")));
        }
        seen.insert(key, at.to_owned());
        Ok(())
    };
    for i in &spec.ingresses {
        unique(format!("ingress {}/{}", i.namespace, i.name), &i.at)?;
        for h in &i.hosts {
            unique(format!("host {h}"), &i.at)?;
        }
    }
    for p in &spec.pools {
        unique(format!("pool {}/{}", p.namespace, p.name), &p.at)?;
    }
    for p in &spec.policies {
        unique(format!("policy {}/{}", p.namespace, p.name), &p.at)?;
    }
    let mut ttls: BTreeMap<(String, String, String), (u32, &str, bool)> = BTreeMap::new();
    for r in &spec.records {
        let key = (r.domain.clone(), r.name.clone(), r.kind.clone());
        match ttls.get(&key) {
            Some((ttl, first, absent)) => {
                if *absent || r.content.is_none() {
                    return Err(error_at(
                        &r.at,
                        format!(
                            "{} {} {} is both absent and present (first at {first})",
                            r.kind, r.name, r.domain
                        ),
                    ));
                }
                if *ttl != r.ttl {
                    return Err(error_at(
                        &r.at,
                        format!(
                            "{} {} {} has ttl {} here and {ttl} at {first}: one set, one TTL",
                            r.kind, r.name, r.domain, r.ttl
                        ),
                    ));
                }
            }
            None => {
                ttls.insert(key, (r.ttl, &r.at, r.content.is_none()));
            }
        }
        if r.kind == "CNAME"
            && spec
                .records
                .iter()
                .any(|o| o.domain == r.domain && o.name == r.name && o.kind != "CNAME" && o.content.is_some())
        {
            return Err(error_at(
                &r.at,
                format!("{} {} has a CNAME and other records", r.name, r.domain),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Spec, SpecError> {
        let mut spec = Spec::default();
        parse_file("network/x.toml", text, &mut spec)?;
        check_whole(&spec)?;
        Ok(spec)
    }

    #[test]
    fn a_folder_is_read_with_defaults() {
        let spec = parse(
            r#"
[[record]]
domain = "Example.com."
name = "www"
type = "a"
content = "203.0.113.10"

[[ingress]]
name = "web"
namespace = "shop"
hosts = ["www.example.com"]
service = "web"
port = 80
certificate = "web-tls"

[[policy]]
name = "web-in"
namespace = "shop"
pods = { app = "web" }
ingress = [{ from = [{ namespace = "ingress", pods = { app = "lb" } }], ports = [8080] }]

[[flow]]
from = { namespace = "ingress", pods = { app = "lb" } }
to = { namespace = "shop", pods = { app = "web" } }
port = 8080
"#,
        )
        .unwrap();
        assert_eq!(spec.records[0].domain, "example.com");
        assert_eq!(spec.records[0].kind, "A");
        assert_eq!(spec.records[0].ttl, 3600);
        assert_eq!(spec.records[0].at, "network/x.toml:2");
        assert_eq!(spec.ingresses[0].health_path, "/healthz");
        assert_eq!(spec.policies[0].at, "network/x.toml:16");
        assert_eq!(spec.flows[0].describe(), "ingress/{app=lb} → shop/{app=web} port 8080");
    }

    #[test]
    fn mistakes_name_file_and_line() {
        let e = parse("[[record]]\ndomain = \"example.com\"\nname = \"www\"\ntype = \"A\"\ncontent = \"not-an-ip\"\n")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "network/x.toml:1: content \"not-an-ip\" is not a valid A value"
        );
        let e = parse("\n\n[[policy]]\nname = \"p\"\nnamespace = \"shop\"\npods = { app = \"web\" }\ningress = [{ from = [], ports = [80] }]\n").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.problem.contains("names no peers"), "{e}");
        let e = parse(
            "[[record]]\ndomain = \"example.com\"\nname = \"www\"\ntype = \"A\"\ncontent = \"192.0.2.1\"\ncolour = 1\n",
        )
        .unwrap_err();
        assert!(e.problem.contains("unknown field `colour`"), "{e}");
        assert_eq!(e.line, 6);
        let e = parse("[[record]]\ndomain = \"example.com\"\nname = \"www\"\ntype = \"A\"\ncontent = \"192.0.2.1\"\nttl = 60\n[[record]]\ndomain = \"example.com\"\nname = \"www\"\ntype = \"A\"\ncontent = \"192.0.2.2\"\nttl = 300\n").unwrap_err();
        assert_eq!(e.line, 7);
        assert!(e.problem.contains("one set, one TTL"), "{e}");
    }

    #[test]
    fn dns_sets_group_declared_entries() {
        let spec = parse("[[record]]\ndomain = \"example.com\"\nname = \"@\"\ntype = \"A\"\ncontent = \"192.0.2.1\"\n[[record]]\ndomain = \"example.com\"\nname = \"@\"\ntype = \"A\"\ncontent = \"192.0.2.2\"\n[[record]]\ndomain = \"example.com\"\nname = \"old\"\ntype = \"CNAME\"\nstate = \"absent\"\n").unwrap();
        let sets = spec.dns_sets();
        assert_eq!(sets.len(), 2);
        let key = ("example.com".to_owned(), "@".to_owned(), "A".to_owned());
        assert_eq!(sets[&key].0.len(), 2);
        let key = ("example.com".to_owned(), "old".to_owned(), "CNAME".to_owned());
        assert!(sets[&key].0.is_empty());
    }
}
