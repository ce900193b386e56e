//! Packaging, checked offline (no Docker engine or cluster runs here):
//!
//! - `ops/k8s`: every overlay rendered with `kubectl kustomize` and the objects
//!   asserted on (namespaces, tags, probes, limits, default-deny policies, PDBs,
//!   service accounts, secrets by reference, grace periods, scheduler replicas);
//! - `compose.yaml`: every service has an image or build and a health check,
//!   Baton's services the environment and `depends_on` conditions they need; and
//!   `ops/compose/init.sh` run for real, after which every Baton service's
//!   configuration (its file plus its environment) is loaded by the real binary;
//! - `ops/Dockerfile`: pinned base images, a non-root user and a health check in
//!   every runtime image, every binary built and shipped; the health check script
//!   against a real HTTP listener.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use baton_tests::bin;
use serde::Deserialize;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Every document of a YAML stream, as JSON values.
fn yaml_docs(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn s<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn arr<'a>(v: &'a Value, pointer: &str) -> &'a [Value] {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

// ---------------------------------------------------------------------------
// Kubernetes

/// `kubectl`, or None when it is not installed. CI (`CI` set) must have it:
/// `.ci/run` installs Debian's kubernetes-client.
fn kubectl() -> Option<PathBuf> {
    let path = std::env::var_os("BATON_KUBECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("kubectl"));
    match Command::new(&path).args(["version", "--client"]).output() {
        Ok(out) if out.status.success() => Some(path),
        _ if std::env::var_os("CI").is_some() => {
            panic!("kubectl is not installed; .ci/run installs it (Debian package kubernetes-client)")
        }
        _ => {
            eprintln!(
                "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
                 !!! SKIPPED: kubectl is not installed, ops/k8s was NOT checked.       !!!\n\
                 !!! `apt-get install kubernetes-client` (or run .ci/run) to check it.  !!!\n\
                 !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
            );
            None
        }
    }
}

fn render(kubectl: &Path, zone: &str) -> Vec<Value> {
    let dir = root().join("ops/k8s/overlays").join(zone);
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = yaml_docs(&String::from_utf8(out.stdout).unwrap());
    assert!(!docs.is_empty(), "{zone}: rendered nothing");
    docs
}

fn kind(o: &Value) -> &str {
    s(o, "/kind")
}

fn name(o: &Value) -> &str {
    s(o, "/metadata/name")
}

fn namespace(o: &Value) -> &str {
    s(o, "/metadata/namespace")
}

fn id(o: &Value) -> String {
    format!("{} {}/{}", kind(o), namespace(o), name(o))
}

/// Objects with a pod template (or a pod spec: CronJobs and Pods included).
fn pod_spec(o: &Value) -> Option<&Value> {
    ["/spec/template/spec", "/spec/jobTemplate/spec/template/spec", "/spec"]
        .iter()
        .filter_map(|p| o.pointer(p))
        .find(|spec| spec.get("containers").is_some())
}

fn pod_labels(o: &Value) -> BTreeMap<String, String> {
    let labels = o
        .pointer("/spec/template/metadata/labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    labels
        .into_iter()
        .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_owned()))
        .collect()
}

fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let Some(match_labels) = selector.get("matchLabels").and_then(Value::as_object) else {
        return false;
    };
    !match_labels.is_empty()
        && match_labels
            .iter()
            .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
}

/// The effective value of an environment variable of `container`: `env` wins over
/// `envFrom` ConfigMaps (looked up among the rendered objects).
fn container_env(objects: &[Value], ns: &str, container: &Value, var: &str) -> Option<String> {
    if let Some(e) = arr(container, "/env").iter().find(|e| s(e, "/name") == var) {
        return e.get("value").and_then(Value::as_str).map(str::to_owned);
    }
    arr(container, "/envFrom").iter().find_map(|from| {
        let cm = s(from, "/configMapRef/name");
        objects
            .iter()
            .find(|o| kind(o) == "ConfigMap" && namespace(o) == ns && name(o) == cm)
            .and_then(|o| o.pointer(&format!("/data/{var}")))
            .and_then(Value::as_str)
            .map(str::to_owned)
    })
}

/// Names of environment variables that hold secrets, which must be references.
fn is_secret_var(var: &str) -> bool {
    var.ends_with("_URL") && !var.contains("OTLP") && !var.ends_with("TRACE_URL")
        || var.ends_with("SECRET")
        || var.ends_with("PASSWORD")
}

fn check_zone(objects: &[Value], zone: &str, namespaces: &[&str]) {
    let expected: BTreeSet<&str> = namespaces.iter().copied().collect();

    // Namespaces: exactly the expected ones, each with the restricted Pod Security level;
    // every namespaced object in one of them.
    let declared: BTreeSet<&str> = objects.iter().filter(|o| kind(o) == "Namespace").map(name).collect();
    assert_eq!(declared, expected, "{zone}: Namespace objects");
    for ns in objects.iter().filter(|o| kind(o) == "Namespace") {
        assert_eq!(
            s(ns, "/metadata/labels/pod-security.kubernetes.io~1enforce"),
            "restricted",
            "{zone}: {} should enforce the restricted Pod Security level",
            id(ns)
        );
    }
    for o in objects.iter().filter(|o| kind(o) != "Namespace") {
        assert!(
            expected.contains(namespace(o)),
            "{zone}: {} is outside the zone's namespaces {expected:?}",
            id(o)
        );
    }

    // No secret values in the manifests: Secrets are created by operators and referenced.
    for o in objects {
        assert_ne!(kind(o), "Secret", "{zone}: {} is a literal Secret", id(o));
        assert!(
            !["Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"].contains(&kind(o)),
            "{zone}: {}: neither existing daemon nor the scheduler needs the Kubernetes API",
            id(o)
        );
    }

    let workloads: Vec<&Value> = objects.iter().filter(|o| pod_spec(o).is_some()).collect();
    assert!(!workloads.is_empty(), "{zone}: no workloads");
    for w in &workloads {
        let ns = namespace(w);
        let spec = pod_spec(w).unwrap();
        let what = id(w);

        // Security context: a non-root pod, no token, no privilege escalation.
        assert_eq!(
            spec.pointer("/securityContext/runAsNonRoot"),
            Some(&Value::Bool(true)),
            "{zone}: {what}: runAsNonRoot"
        );
        assert_eq!(
            spec.get("automountServiceAccountToken"),
            Some(&Value::Bool(false)),
            "{zone}: {what}: automountServiceAccountToken must be false"
        );
        let sa = s(spec, "/serviceAccountName");
        assert!(!sa.is_empty(), "{zone}: {what}: no serviceAccountName");
        let account = objects
            .iter()
            .find(|o| kind(o) == "ServiceAccount" && namespace(o) == ns && name(o) == sa)
            .unwrap_or_else(|| panic!("{zone}: {what}: ServiceAccount {ns}/{sa} is not in the manifests"));
        assert_eq!(
            account.get("automountServiceAccountToken"),
            Some(&Value::Bool(false)),
            "{zone}: ServiceAccount {ns}/{sa}: automountServiceAccountToken must be false"
        );

        // Secrets only by reference: Secret volumes or secretKeyRef, and every
        // secret-bearing variable a file:/env: reference or a secretKeyRef.
        let secret_volumes = arr(spec, "/volumes")
            .iter()
            .filter(|v| v.get("secret").is_some())
            .count();
        let containers: Vec<&Value> = arr(spec, "/containers")
            .iter()
            .chain(arr(spec, "/initContainers"))
            .collect();
        let secret_key_refs = containers
            .iter()
            .flat_map(|c| arr(c, "/env"))
            .filter(|e| e.pointer("/valueFrom/secretKeyRef").is_some())
            .count();
        assert!(
            secret_volumes + secret_key_refs > 0,
            "{zone}: {what}: no Secret is referenced (secrets come from Secrets, by reference)"
        );

        for c in &containers {
            let cname = s(c, "/name");
            let image = s(c, "/image");
            check_image_ref(&format!("{zone}: {what}/{cname}"), image);
            assert_eq!(
                s(c, "/readinessProbe/httpGet/path"),
                "/readyz",
                "{zone}: {what}/{cname}: readiness probe on /readyz"
            );
            assert_eq!(
                s(c, "/livenessProbe/httpGet/path"),
                "/healthz",
                "{zone}: {what}/{cname}: liveness probe on /healthz"
            );
            for key in ["requests/cpu", "requests/memory", "limits/cpu", "limits/memory"] {
                assert!(
                    c.pointer(&format!("/resources/{key}")).is_some(),
                    "{zone}: {what}/{cname}: resources.{} not set",
                    key.replace('/', ".")
                );
            }
            assert_eq!(
                c.pointer("/securityContext/allowPrivilegeEscalation"),
                Some(&Value::Bool(false)),
                "{zone}: {what}/{cname}: allowPrivilegeEscalation"
            );
            assert_eq!(
                c.pointer("/securityContext/readOnlyRootFilesystem"),
                Some(&Value::Bool(true)),
                "{zone}: {what}/{cname}: readOnlyRootFilesystem"
            );
            for e in arr(c, "/env") {
                let var = s(e, "/name");
                if let Some(value) = e.get("value").and_then(Value::as_str) {
                    assert!(
                        !(value.contains("://") && value.contains('@')),
                        "{zone}: {what}/{cname}: {var} holds credentials inline"
                    );
                    if is_secret_var(var) {
                        assert!(
                            value.starts_with("file:") || value.starts_with("env:"),
                            "{zone}: {what}/{cname}: {var} = {value:?} must be a file: or env: reference"
                        );
                    }
                }
            }
        }

        // A PodDisruptionBudget covers every workload.
        let labels = pod_labels(w);
        let pdbs: Vec<&Value> = objects
            .iter()
            .filter(|o| kind(o) == "PodDisruptionBudget" && namespace(o) == ns)
            .filter(|o| o.pointer("/spec/selector").is_some_and(|sel| selects(sel, &labels)))
            .collect();
        assert_eq!(
            pdbs.len(),
            1,
            "{zone}: {what}: expected one PodDisruptionBudget selecting it"
        );
    }

    // Per namespace with workloads: a default-deny policy, the egress the
    // processes need, and ingress only to ports the containers serve.
    for ns in &expected {
        let in_ns: Vec<&&Value> = workloads.iter().filter(|w| namespace(w) == *ns).collect();
        if in_ns.is_empty() {
            continue;
        }
        let policies: Vec<&Value> = objects
            .iter()
            .filter(|o| kind(o) == "NetworkPolicy" && namespace(o) == *ns)
            .collect();
        let default_deny = policies.iter().any(|p| {
            p.pointer("/spec/podSelector")
                .and_then(Value::as_object)
                .is_some_and(|m| m.is_empty())
                && arr(p, "/spec/policyTypes").contains(&Value::from("Ingress"))
                && arr(p, "/spec/policyTypes").contains(&Value::from("Egress"))
                && arr(p, "/spec/ingress").is_empty()
                && arr(p, "/spec/egress").is_empty()
        });
        assert!(default_deny, "{zone}: namespace {ns} has no default-deny NetworkPolicy");

        let egress_ports: BTreeSet<(String, i64)> = policies
            .iter()
            .flat_map(|p| arr(p, "/spec/egress"))
            .flat_map(|rule| arr(rule, "/ports"))
            .map(|p| {
                (
                    p.get("protocol").and_then(Value::as_str).unwrap_or("TCP").to_owned(),
                    p.get("port").and_then(Value::as_i64).unwrap_or(-1),
                )
            })
            .collect();
        for need in [
            ("UDP", 53),
            ("TCP", 53),
            ("TCP", 5672),
            ("TCP", 5671),
            ("TCP", 5432),
            ("TCP", 4318),
        ] {
            assert!(
                egress_ports.contains(&(need.0.to_owned(), need.1)),
                "{zone}: namespace {ns}: no egress allowed to {}/{} (have {egress_ports:?})",
                need.0,
                need.1
            );
        }
        for p in &policies {
            for rule in arr(p, "/spec/egress") {
                assert!(
                    !arr(rule, "/ports").is_empty(),
                    "{zone}: {}: an egress rule without ports allows everything",
                    id(p)
                );
            }
        }

        let served: BTreeSet<i64> = in_ns
            .iter()
            .flat_map(|w| arr(pod_spec(w).unwrap(), "/containers"))
            .flat_map(|c| arr(c, "/ports"))
            .filter_map(|p| p.get("containerPort").and_then(Value::as_i64))
            .collect();
        for p in &policies {
            for rule in arr(p, "/spec/ingress") {
                let ports = arr(rule, "/ports");
                assert!(!ports.is_empty(), "{zone}: {}: an ingress rule without ports", id(p));
                for port in ports {
                    let n = port.get("port").and_then(Value::as_i64).unwrap_or(-1);
                    assert!(
                        served.contains(&n),
                        "{zone}: {}: ingress to port {n}, which no container serves ({served:?})",
                        id(p)
                    );
                }
            }
        }
    }

    // The daemons of this zone: exactly the roles the seed runs there (dev: no
    // pipeline, only the database roles), configured for this zone, with a
    // termination grace period covering their shutdown grace.
    let daemon_ns = format!("baton-{zone}");
    let roles: &[&str] = match zone {
        "staging" => &["db-migration", "backup", "infrastructure", "staging-verify"],
        "production" => &[
            "db-migration",
            "backup",
            "infrastructure",
            "production-apply",
            "network",
            "cdn",
        ],
        _ => &["db-migration", "backup"],
    };
    let deployed: BTreeSet<&str> = objects
        .iter()
        .filter(|o| kind(o) == "Deployment" && namespace(o) == daemon_ns)
        .map(name)
        .collect();
    assert_eq!(deployed, roles.iter().copied().collect(), "{zone}: the zone's daemons");
    for &role in roles {
        let d = objects
            .iter()
            .find(|o| kind(o) == "Deployment" && namespace(o) == daemon_ns && name(o) == role)
            .unwrap_or_else(|| panic!("{zone}: no {role} Deployment in {daemon_ns}"));
        let spec = pod_spec(d).unwrap();
        let c = &arr(spec, "/containers")[0];
        assert_eq!(
            container_env(objects, &daemon_ns, c, "BATON_DAEMON__ZONE").as_deref(),
            Some(zone),
            "{zone}: {role}: BATON_DAEMON__ZONE"
        );
        assert!(
            container_env(objects, &daemon_ns, c, "BATON_DAEMON__HTTP_LISTEN").is_some_and(|l| l.ends_with(":9090")),
            "{zone}: {role}: BATON_DAEMON__HTTP_LISTEN must serve the probed port 9090"
        );
        assert!(
            container_env(objects, &daemon_ns, c, "BATON_AMQP__URL").is_some_and(|u| u.starts_with("file:")),
            "{zone}: {role}: BATON_AMQP__URL must be a file: reference"
        );
        let grace: i64 = container_env(objects, &daemon_ns, c, "BATON_DAEMON__SHUTDOWN_GRACE_SECS")
            .map(|g| g.parse().expect("shutdown grace is a number"))
            .unwrap_or(30);
        let period = spec
            .get("terminationGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(30);
        assert!(
            period >= grace + 10,
            "{zone}: {role}: terminationGracePeriodSeconds {period} < daemon.shutdown_grace_secs {grace} + 10 s hand-back"
        );
    }

    // The scheduler: two replicas, in the production overlay only.
    let schedulers: Vec<&Value> = objects
        .iter()
        .filter(|o| kind(o) == "Deployment" && name(o) == "scheduler")
        .collect();
    if zone == "production" {
        assert_eq!(schedulers.len(), 1, "{zone}: one scheduler Deployment");
        assert_eq!(namespace(schedulers[0]), "baton");
        assert_eq!(
            schedulers[0].pointer("/spec/replicas").and_then(Value::as_i64),
            Some(2),
            "the scheduler runs two replicas"
        );
    } else {
        assert!(
            schedulers.is_empty(),
            "{zone}: the scheduler belongs to the production overlay"
        );
    }
}

/// An image reference names a tag (not `latest`) or a digest.
fn check_image_ref(what: &str, image: &str) {
    assert!(!image.is_empty(), "{what}: no image");
    if image.contains("@sha256:") {
        return;
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    let tag = last.split_once(':').map(|(_, t)| t);
    match tag {
        None => panic!("{what}: image {image:?} has no tag (it would mean latest)"),
        Some("latest") => panic!("{what}: image {image:?} uses the latest tag"),
        Some(t) => assert!(!t.is_empty() && !t.contains('$'), "{what}: image {image:?}"),
    }
}

#[test]
fn kubernetes_overlays_render_and_hold_the_rules() {
    let Some(kubectl) = kubectl() else {
        return;
    };
    for (zone, namespaces) in [
        ("dev", &["baton-dev"][..]),
        ("staging", &["baton-staging"][..]),
        ("production", &["baton-production", "baton"][..]),
    ] {
        let objects = render(&kubectl, zone);
        check_zone(&objects, zone, namespaces);
    }
}

#[test]
fn kubernetes_checks_catch_what_they_claim_to() {
    // The checks above on a deliberately broken rendering: each breakage must fail.
    let Some(kubectl) = kubectl() else {
        return;
    };
    let good = render(&kubectl, "staging");
    type Break = fn(&mut Vec<Value>);
    let breakages: [(&str, Break); 6] = [
        ("latest tag", |objs| {
            let d = objs.iter_mut().find(|o| kind(o) == "Deployment").unwrap();
            d["spec"]["template"]["spec"]["containers"][0]["image"] = Value::from("baton/backup:latest");
        }),
        ("untagged image", |objs| {
            let d = objs.iter_mut().find(|o| kind(o) == "Deployment").unwrap();
            d["spec"]["template"]["spec"]["containers"][0]["image"] = Value::from("baton/backup");
        }),
        ("missing readiness probe", |objs| {
            let d = objs.iter_mut().find(|o| kind(o) == "Deployment").unwrap();
            d["spec"]["template"]["spec"]["containers"][0]
                .as_object_mut()
                .unwrap()
                .remove("readinessProbe");
        }),
        ("missing limits", |objs| {
            let d = objs.iter_mut().find(|o| kind(o) == "Deployment").unwrap();
            d["spec"]["template"]["spec"]["containers"][0]["resources"]
                .as_object_mut()
                .unwrap()
                .remove("limits");
        }),
        ("no default deny", |objs| objs.retain(|o| name(o) != "default-deny")),
        ("no PDB", |objs| objs.retain(|o| kind(o) != "PodDisruptionBudget")),
    ];
    for (what, break_it) in breakages {
        let mut objects = good.clone();
        break_it(&mut objects);
        let caught = std::panic::catch_unwind(|| check_zone(&objects, "staging", &["baton-staging"])).is_err();
        assert!(caught, "the checks did not notice: {what}");
    }
}

// ---------------------------------------------------------------------------
// compose.yaml

/// compose.yaml with `${VAR:-default}` and `${VAR}` replaced as compose does,
/// from `vars` (what the shell or `.env` would set).
fn compose_with(vars: &BTreeMap<&str, String>) -> Value {
    let text = read("compose.yaml");
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(open) = rest.find("${") {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').expect("unclosed ${ in compose.yaml") + open;
        let inner = &rest[open + 2..close];
        let (name, default) = inner.split_once(":-").unwrap_or((inner, ""));
        out.push_str(vars.get(name).map(String::as_str).unwrap_or(default));
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    let docs = yaml_docs(&out);
    assert_eq!(docs.len(), 1, "compose.yaml is one document");
    docs.into_iter().next().unwrap()
}

fn compose() -> Value {
    compose_with(&BTreeMap::new())
}

/// Each (role, zone) of the shipped seed pipeline's steps.
fn seed_daemons() -> BTreeSet<(String, String)> {
    let text = read("scheduler/pipelines/seed.toml");
    let mut pairs = BTreeSet::new();
    let mut role = None;
    for line in text.lines() {
        let value = |l: &str, key: &str| {
            l.strip_prefix(key)
                .and_then(|r| r.trim_start().strip_prefix('='))
                .map(|v| v.trim().trim_matches('"').to_owned())
        };
        if line.starts_with("[[") {
            role = None;
        } else if let Some(r) = value(line, "role") {
            role = Some(r);
        } else if let (Some(z), Some(r)) = (value(line, "zone"), role.as_ref()) {
            pairs.insert((r.clone(), z));
        }
    }
    assert!(pairs.len() >= 8, "seed.toml: read only {pairs:?}");
    pairs
}

fn services(compose: &Value) -> Vec<(&str, &Value)> {
    compose["services"]
        .as_object()
        .expect("services")
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect()
}

fn env_of(service: &Value) -> BTreeMap<String, String> {
    service
        .get("environment")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Services built from ops/Dockerfile (Baton's own), with their build target.
fn baton_services(compose: &Value) -> Vec<(&str, &Value, &str)> {
    services(compose)
        .into_iter()
        .filter_map(|(n, svc)| {
            let target = svc.pointer("/build/target").and_then(Value::as_str)?;
            Some((n, svc, target))
        })
        .collect()
}

/// The eight role daemons, as their Dockerfile targets and `baton-<role>` binaries.
const ROLES: [&str; 8] = [
    "db-migration",
    "backup",
    "container-build",
    "infrastructure",
    "staging-verify",
    "production-apply",
    "network",
    "cdn",
];

/// One-shot or unprobeable services whose health check is switched off on purpose.
const NO_HEALTHCHECK: &[(&str, &str)] = &[
    ("baton-init", "a one-shot; service_completed_successfully is its health"),
    ("otel-collector", "the image has no shell or HTTP client to probe with"),
];

#[test]
fn compose_services_have_images_health_checks_env_and_conditions() {
    let compose = compose();
    let all = services(&compose);
    let names: BTreeSet<&str> = all.iter().map(|(n, _)| *n).collect();
    let stages = dockerfile_stages(&read("ops/Dockerfile"));

    for (n, svc) in &all {
        // An image or a build; images tagged, not latest.
        let image = svc.get("image").and_then(Value::as_str);
        let build = svc.get("build");
        assert!(
            image.is_some() || build.is_some(),
            "service {n}: neither image nor build"
        );
        if let Some(image) = image {
            check_image_ref(&format!("compose service {n}"), image);
        }
        if let Some(build) = build {
            let dockerfile = s(build, "/dockerfile");
            assert!(
                root().join(s(build, "/context")).join(dockerfile).is_file(),
                "service {n}: {dockerfile}"
            );
            let target = s(build, "/target");
            assert!(
                stages.iter().any(|st| st.name == target),
                "service {n}: build target {target:?} is not a stage of {dockerfile}"
            );
        }

        // A health check, or a recorded reason why not (and then nobody waits for it).
        let hc = svc.get("healthcheck");
        if hc.and_then(|h| h.get("disable")) == Some(&Value::Bool(true)) {
            assert!(
                NO_HEALTHCHECK.iter().any(|(s, _)| s == n),
                "service {n}: health check disabled without a reason in NO_HEALTHCHECK"
            );
            for (other, osvc) in &all {
                assert_ne!(
                    osvc.pointer(&format!("/depends_on/{n}/condition"))
                        .and_then(Value::as_str),
                    Some("service_healthy"),
                    "{other} waits for {n} to be healthy, which has no health check"
                );
            }
        } else {
            let test = hc.and_then(|h| h.get("test")).and_then(Value::as_array);
            assert!(test.is_some_and(|t| t.len() > 1), "service {n}: no health check test");
        }

        // depends_on: long form with a condition, on services that exist.
        if let Some(deps) = svc.get("depends_on") {
            let deps = deps
                .as_object()
                .unwrap_or_else(|| panic!("service {n}: depends_on must use the long form with conditions"));
            for (dep, spec) in deps {
                assert!(names.contains(dep.as_str()), "service {n} depends on unknown {dep}");
                assert!(
                    ["service_healthy", "service_completed_successfully", "service_started"]
                        .contains(&s(spec, "/condition")),
                    "service {n}: depends_on {dep} has no condition"
                );
            }
        }

        // Named volumes are declared.
        for v in arr(svc, "/volumes") {
            let spec = v.as_str().expect("short volume syntax");
            let source = spec.split(':').next().unwrap();
            if source.starts_with("./") {
                assert!(
                    root().join(source).exists(),
                    "service {n}: bind mount {source} does not exist"
                );
            } else if source.starts_with('/') {
                // A host path (the node's containerd socket): nothing to check here.
            } else {
                assert!(
                    compose.pointer(&format!("/volumes/{source}")).is_some(),
                    "service {n}: volume {source} is not declared"
                );
            }
        }
    }

    // The broker loads Baton's definitions.
    let rabbit = &compose["services"]["rabbitmq"];
    let mounts: Vec<&str> = arr(rabbit, "/volumes").iter().filter_map(Value::as_str).collect();
    let defs = mounts
        .iter()
        .find(|m| m.starts_with("./ops/rabbitmq/definitions.json:"))
        .expect("rabbitmq mounts ops/rabbitmq/definitions.json");
    let defs_in_container = defs.split(':').nth(1).unwrap();
    let conf = mounts
        .iter()
        .find(|m| m.contains("/etc/rabbitmq/conf.d/"))
        .expect("rabbitmq mounts a conf.d file");
    let conf_text = read(conf.split(':').next().unwrap());
    assert!(
        conf_text
            .lines()
            .any(|l| l.trim() == format!("load_definitions = {defs_in_container}")),
        "the mounted rabbitmq.conf does not load {defs_in_container}"
    );
    assert!(
        s(rabbit, "/image").contains("management"),
        "rabbitmq: the management image"
    );

    // Baton's services: what each needs, for both zones.
    let baton = baton_services(&compose);
    let mut daemons = BTreeSet::new();
    for (n, svc, target) in &baton {
        let env = env_of(svc);
        let deps = svc.get("depends_on").cloned().unwrap_or_default();
        if *target != "baton" {
            for (dep, cond) in [
                ("rabbitmq", "service_healthy"),
                ("postgres", "service_healthy"),
                ("baton-init", "service_completed_successfully"),
            ] {
                assert_eq!(
                    s(&deps, &format!("/{dep}/condition")),
                    cond,
                    "service {n}: depends_on {dep} condition"
                );
            }
            assert!(
                arr(svc, "/healthcheck/test")
                    .iter()
                    .any(|t| t.as_str() == Some("/usr/local/bin/baton-healthcheck")),
                "service {n}: health check through baton-healthcheck"
            );
            assert!(env.contains_key("BATON_AMQP__URL"), "service {n}: BATON_AMQP__URL");
            assert!(
                env.contains_key("BATON_TELEMETRY__OTLP_ENDPOINT"),
                "service {n}: BATON_TELEMETRY__OTLP_ENDPOINT"
            );
            let command: Vec<&str> = arr(svc, "/command").iter().filter_map(Value::as_str).collect();
            assert_eq!(command.first(), Some(&"--config"), "service {n}: --config FILE");
        }
        for (var, value) in &env {
            if is_secret_var(var) {
                assert!(
                    value.starts_with("file:"),
                    "service {n}: {var} must be a file: reference"
                );
            }
        }
        match *target {
            "scheduler" => {
                for var in ["BATON_DATABASE__URL", "BATON_API__LISTEN"] {
                    assert!(env.contains_key(var), "service {n}: {var}");
                }
                assert!(
                    env["BATON_API__LISTEN"].starts_with("0.0.0.0:"),
                    "service {n}: API reachable"
                );
            }
            "baton" => {}
            _ => {
                let zone = env
                    .get("BATON_DAEMON__ZONE")
                    .unwrap_or_else(|| panic!("service {n}: zone"));
                assert_eq!(*n, format!("{target}-{zone}"), "service name says role and zone");
                assert_eq!(
                    env.get("BATON_DAEMON__DECLARE_QUEUE").map(String::as_str),
                    Some("false")
                );
                assert!(
                    env.get("BATON_DAEMON__HTTP_LISTEN")
                        .is_some_and(|l| l.starts_with("0.0.0.0:")),
                    "service {n}: BATON_DAEMON__HTTP_LISTEN"
                );
                let needs: &[&str] = match *target {
                    "db-migration" => &["BATON_MIGRATION__ADMIN_URL"],
                    "backup" => &[
                        "BATON_BACKUP__ADMIN_URL",
                        "BATON_BACKUP__PRIMARY__PATH",
                        "BATON_BACKUP__PRIMARY__REGION",
                        "BATON_BACKUP__COPY__PATH",
                        "BATON_BACKUP__COPY__REGION",
                    ],
                    "infrastructure" => &["BATON_INFRASTRUCTURE__STATE_URL"],
                    _ => &[],
                };
                // Only the database roles run without profile `seed`.
                let profiles: Vec<&str> = arr(svc, "/profiles").iter().filter_map(Value::as_str).collect();
                if ["db-migration", "backup"].contains(target) {
                    assert!(profiles.is_empty(), "service {n}: runs without a profile");
                } else {
                    assert_eq!(profiles, ["seed"], "service {n}: profile seed");
                }
                for var in needs {
                    assert!(env.contains_key(*var), "service {n}: {var}");
                }
                let grace: u64 = env
                    .get("BATON_DAEMON__SHUTDOWN_GRACE_SECS")
                    .map(|g| g.parse().unwrap())
                    .unwrap_or(30);
                let stop = s(svc, "/stop_grace_period");
                let stop_secs: u64 = stop.trim_end_matches('s').parse().unwrap_or(10);
                assert!(
                    stop_secs >= grace + 10,
                    "service {n}: stop_grace_period {stop:?} < shutdown grace {grace} s + 10 s hand-back"
                );
                daemons.insert((target.to_string(), zone.clone()));
            }
        }
    }
    // Every role and zone the seed pipeline sends jobs to has its daemon, and the
    // staging database is backed up daily besides.
    let mut want = seed_daemons();
    want.insert(("backup".into(), "staging".into()));
    assert_eq!(daemons, want, "one daemon per role and zone of the seed pipeline");
    assert!(
        baton.iter().any(|(_, _, t)| *t == "scheduler"),
        "compose runs the scheduler"
    );
}

// --- ops/compose/init.sh and every Baton service's effective configuration

fn output(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("run command");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--print-config` output as `section.key` -> rendered value.
fn printed_keys(text: &str) -> BTreeMap<String, String> {
    let mut section = String::new();
    let mut keys = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some((k, v)) = line.split_once(" = ") {
            let full = if section.is_empty() {
                k.to_owned()
            } else {
                format!("{section}.{k}")
            };
            keys.insert(full, v.to_owned());
        }
    }
    keys
}

/// The host path standing in for a container path, given a service's mounts.
fn host_path(mounts: &[(String, PathBuf)], container_path: &str) -> Option<PathBuf> {
    mounts
        .iter()
        .filter(|(c, _)| container_path == c || container_path.starts_with(&format!("{c}/")))
        .max_by_key(|(c, _)| c.len())
        .map(|(c, h)| h.join(container_path[c.len()..].trim_start_matches('/')))
}

#[test]
fn compose_init_and_every_baton_service_configuration_load() {
    let dir = std::env::temp_dir().join(format!("baton-packaging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let secrets = dir.join("volumes/baton-secrets");
    let path_dir = dir.join("bin");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::create_dir_all(&path_dir).unwrap();
    // The site folder of profile `seed`, with every file its README lists.
    let site = dir.join("site");
    std::fs::create_dir_all(site.join("bin")).unwrap();
    for f in [
        "kubeconfig-staging",
        "kubeconfig-production",
        "transip.key",
        "bunny-api-key",
        "bunny-storage-password",
        "bin/terraform",
        "bin/trivy",
    ] {
        assert!(
            read("ops/compose/site/README.md").contains(&format!("`{f}`")),
            "ops/compose/site/README.md does not list {f}"
        );
        std::fs::write(site.join(f), "site file\n").unwrap();
    }
    let compose = compose_with(&BTreeMap::from([("BATON_SITE", site.display().to_string())]));
    // The images' binaries under their real names.
    let mut binaries = vec![("baton".to_owned(), bin("baton-e2e"))];
    for role in ROLES {
        binaries.push((format!("baton-{role}"), bin(&format!("baton-{role}"))));
    }
    for (name, path) in &binaries {
        std::os::unix::fs::symlink(path, path_dir.join(name)).unwrap();
    }
    let search_path = format!("{}:{}", path_dir.display(), std::env::var("PATH").unwrap_or_default());
    let (_, uid, _) = output(Command::new("id").arg("-u"));

    let run_init = || {
        output(
            Command::new("sh")
                .arg(root().join("ops/compose/init.sh"))
                .env("PATH", &search_path)
                .env("OUT", &secrets)
                .env("BATON_UID", uid.trim())
                .env("RABBITMQ_UID", uid.trim())
                .env("SITE", &site)
                .envs([
                    ("SITE_TRANSIP_LOGIN", "shop-ops"),
                    ("SITE_ACME_CONTACT", "mailto:ops@shop.example"),
                    ("SITE_LB_HTTPS", "203.0.113.10:443"),
                    ("SITE_LB_HTTP", "203.0.113.10:80"),
                    ("SITE_CDN_STORAGE_ZONE", "shop-assets"),
                    ("SITE_CDN_PULL_ZONE_ID", "123456"),
                    ("SITE_CDN_EDGE", "https://assets.shop.example"),
                ]),
        )
    };
    let (code, out, err) = run_init();
    assert_eq!(code, 0, "init.sh failed:\n{out}\n{err}");
    let listing = |d: &Path| -> BTreeMap<String, Vec<u8>> {
        let mut files = BTreeMap::new();
        for sub in [d.to_path_buf(), d.join("broker")] {
            for e in std::fs::read_dir(&sub).unwrap() {
                let p = e.unwrap().path();
                if p.is_file() {
                    files.insert(
                        p.strip_prefix(d).unwrap().display().to_string(),
                        std::fs::read(&p).unwrap(),
                    );
                }
            }
        }
        files
    };
    let first = listing(&secrets);
    let (code, out, err) = run_init();
    assert_eq!(code, 0, "second init.sh run failed:\n{out}\n{err}");
    assert_eq!(first, listing(&secrets), "a second init.sh run changed the secrets");

    // Every broker user of the definitions that compose uses has a password.
    let defs: Value = serde_json::from_str(&read("ops/rabbitmq/definitions.json")).unwrap();
    for user in [
        "baton-scheduler",
        "baton-ci",
        "baton-daemon-ci",
        "baton-daemon-staging",
        "baton-daemon-production",
    ] {
        assert!(
            arr(&defs, "/users").iter().any(|u| s(u, "/name") == user),
            "{user} is not in the definitions"
        );
        let pw = secrets.join(format!("broker/{user}.password"));
        assert!(pw.is_file(), "no password for {user}");
        let url = std::fs::read_to_string(secrets.join(format!("amqp-{user}.url"))).unwrap();
        let password = std::fs::read_to_string(&pw).unwrap();
        assert!(
            url.contains(&format!("{user}:{}@rabbitmq:5672", password.trim())),
            "{user}'s URL"
        );
    }

    let daemon_count = baton_services(&compose)
        .iter()
        .filter(|(_, _, t)| ROLES.contains(t))
        .count();
    for (n, svc, target) in baton_services(&compose) {
        if target == "baton" {
            continue;
        }
        // The service's mounts, on this machine.
        let mut mounts = Vec::new();
        for v in arr(svc, "/volumes").iter().filter_map(Value::as_str) {
            let mut parts = v.split(':');
            let (source, dest) = (parts.next().unwrap(), parts.next().unwrap());
            let host = if let Some(rel) = source.strip_prefix("./") {
                root().join(rel)
            } else if source.starts_with('/') {
                PathBuf::from(source)
            } else {
                let p = dir.join("volumes").join(source);
                std::fs::create_dir_all(&p).unwrap();
                p
            };
            mounts.push((dest.to_owned(), host));
        }
        let localize = |value: &str| -> String {
            let (prefix, path) = match value.strip_prefix("file:") {
                Some(p) => ("file:", p),
                None => ("", value),
            };
            match path.starts_with('/').then(|| host_path(&mounts, path)).flatten() {
                Some(h) => format!("{prefix}{}", h.display()),
                None => value.to_owned(),
            }
        };
        let env = env_of(svc);
        for value in env.values() {
            if let Some(path) = value.strip_prefix("file:") {
                let local =
                    host_path(&mounts, path).unwrap_or_else(|| panic!("service {n}: {path} is on no mounted volume"));
                assert!(local.is_file(), "service {n}: {path} is not written by init.sh");
            }
        }
        let command: Vec<String> = arr(svc, "/command")
            .iter()
            .filter_map(Value::as_str)
            .map(&localize)
            .collect();
        let config = PathBuf::from(&command[1]);
        assert!(
            config.is_file(),
            "service {n}: --config {} is not written by init.sh",
            command[1]
        );

        let program = match target {
            "scheduler" => "baton".to_owned(),
            role if ROLES.contains(&role) => format!("baton-{role}"),
            other => panic!("unexpected target {other}"),
        };
        let program = program.as_str();
        let mut cmd = Command::new(path_dir.join(program));
        cmd.env_clear()
            .env("PATH", &search_path)
            .current_dir(&dir)
            .args(&command)
            .arg("--print-config");
        for (k, v) in &env {
            cmd.env(k, localize(v));
        }
        let (code, out, err) = output(&mut cmd);
        assert_eq!(code, 0, "service {n}: {program} --print-config failed:\n{out}\n{err}");
        let printed = printed_keys(&out);

        // Each BATON_* variable reached the key it names (figment ignores unknown
        // keys, so a misspelt variable would be lost silently).
        for (var, value) in &env {
            let key = var.strip_prefix("BATON_").unwrap().to_lowercase().replace("__", ".");
            let shown = printed
                .get(&key)
                .unwrap_or_else(|| panic!("service {n}: {var} sets no known key ({key}):\n{out}"));
            let expected = if value.starts_with("file:") {
                "\"[redacted]\"".to_owned()
            } else if value.parse::<f64>().is_ok() || value == "true" || value == "false" {
                value.clone()
            } else {
                Value::from(localize(value)).to_string()
            };
            assert_eq!(shown, &expected, "service {n}: {var}");
        }
        assert!(
            !out.contains("@rabbitmq"),
            "service {n}: a broker URL was printed:\n{out}"
        );
        let trusted = printed.get("signing.trusted").cloned().unwrap_or_default();
        let expected_keys = if target == "scheduler" { daemon_count } else { 1 };
        assert_eq!(
            trusted.matches(':').count(),
            expected_keys,
            "service {n}: signing.trusted = {trusted}"
        );

        // baton-backup prints without validating: validate by starting it against a
        // closed broker port. Bad configuration exits 2 at once; a good one gets as
        // far as connecting, where it is stopped.
        if target == "backup" {
            for (_, host) in &mounts {
                std::fs::create_dir_all(host).ok();
            }
            let mut cmd = Command::new(path_dir.join(program));
            cmd.env_clear()
                .env("PATH", &search_path)
                .current_dir(&dir)
                .args(&command)
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            for (k, v) in &env {
                cmd.env(k, localize(v));
            }
            cmd.env("BATON_AMQP__URL", "amqp://nobody:nothing@127.0.0.1:1/%2f")
                .env("BATON_TELEMETRY__OTLP_ENDPOINT", "")
                .env("BATON_DAEMON__HTTP_LISTEN", "");
            let mut child = cmd.spawn().unwrap();
            let start = Instant::now();
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break Some(status);
                }
                if start.elapsed() > Duration::from_secs(3) {
                    child.kill().unwrap();
                    child.wait().unwrap();
                    break None;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            if let Some(status) = status {
                let mut err = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
                assert_ne!(status.code(), Some(2), "service {n}: configuration refused:\n{err}");
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------
// ops/Dockerfile

#[derive(Debug)]
struct Stage {
    name: String,
    /// The image or earlier stage it starts from, ARG defaults substituted.
    from: String,
    lines: Vec<String>,
}

/// Stages of a Dockerfile: continuation lines joined, comments dropped.
fn dockerfile_stages(text: &str) -> Vec<Stage> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            if !current.trim().is_empty() {
                logical.push(current.trim().to_owned());
            }
            current.clear();
        }
    }
    let mut args = BTreeMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical {
        let (instr, rest) = line.split_once(' ').unwrap_or((&line, ""));
        match instr.to_uppercase().as_str() {
            "ARG" if stages.is_empty() => {
                if let Some((k, v)) = rest.split_once('=') {
                    args.insert(k.trim().to_owned(), v.trim().trim_matches('"').to_owned());
                }
            }
            "FROM" => {
                let words: Vec<&str> = rest.split_whitespace().filter(|w| !w.starts_with("--")).collect();
                let mut from = words[0].to_owned();
                for (k, v) in &args {
                    from = from.replace(&format!("${{{k}}}"), v).replace(&format!("${k}"), v);
                }
                let name = match words.get(1) {
                    Some(w) if w.eq_ignore_ascii_case("as") => words[2].to_owned(),
                    _ => format!("#{}", stages.len()),
                };
                stages.push(Stage {
                    name,
                    from,
                    lines: Vec::new(),
                });
            }
            _ => {
                if let Some(stage) = stages.last_mut() {
                    stage.lines.push(line.clone());
                }
            }
        }
    }
    stages
}

/// A stage and the stages it is built on, nearest last.
fn chain<'a>(stages: &'a [Stage], name: &str) -> Vec<&'a Stage> {
    let mut out = Vec::new();
    let mut at = stages.iter().find(|s| s.name == name);
    while let Some(stage) = at {
        out.push(stage);
        at = stages.iter().find(|s| s.name == stage.from);
    }
    out.reverse();
    out
}

fn last_instruction<'a>(chain: &[&'a Stage], instr: &str) -> Option<&'a str> {
    chain
        .iter()
        .flat_map(|s| s.lines.iter())
        .rfind(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case(instr))
        })
        .map(|l| l[instr.len()..].trim())
}

/// `[[bin]]` names of a Cargo manifest.
fn bin_names(manifest: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_bin = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(v) = line.strip_prefix("name") {
            names.push(v.trim_start_matches([' ', '=']).trim().trim_matches('"').to_owned());
        }
    }
    names
}

#[test]
fn dockerfile_pins_bases_runs_as_non_root_and_ships_every_binary() {
    let text = read("ops/Dockerfile");
    let stages = dockerfile_stages(&text);
    let names: BTreeSet<&str> = stages.iter().map(|s| s.name.as_str()).collect();

    // Base images: a tag at least, never latest; digests are reported.
    let mut unpinned = Vec::new();
    for st in stages.iter().filter(|s| !names.contains(s.from.as_str())) {
        check_image_ref(&format!("Dockerfile stage {}", st.name), &st.from);
        if !st.from.contains("@sha256:") {
            unpinned.push(st.from.clone());
        }
    }
    if !unpinned.is_empty() {
        eprintln!(
            "NOTE: base images pinned by tag only: {unpinned:?}. Release builds pin them by digest with \
             ops/docker/pin-base-images.sh (needs registry access; see ops/README.md)."
        );
        assert!(root().join("ops/docker/pin-base-images.sh").is_file());
    }

    // Every workspace binary is built once, in the build stage.
    let mut binaries = bin_names(&read("scheduler/Cargo.toml"));
    for daemon in std::fs::read_dir(root().join("daemons")).unwrap() {
        let manifest = daemon.unwrap().path().join("Cargo.toml");
        if manifest.is_file() {
            binaries.extend(bin_names(&std::fs::read_to_string(manifest).unwrap()));
        }
    }
    assert!(binaries.len() >= 3, "{binaries:?}");
    let build = stages.iter().find(|s| s.name == "build").expect("a build stage");
    let build_text = build.lines.join("\n");
    assert_eq!(
        build.lines.iter().filter(|l| l.contains("cargo build")).count(),
        1,
        "one cargo build"
    );
    for b in &binaries {
        assert!(
            build_text.contains(&format!("target/release/{b} "))
                || build_text.ends_with(&format!("target/release/{b}")),
            "the build stage does not install {b}"
        );
    }

    // Runtime images: one per role plus the all-in-one, none built on the
    // toolchain image, each non-root, health-checked, with its binary as entrypoint.
    let roles = [
        ("scheduler", vec!["baton"]),
        ("db-migration", vec!["baton-db-migration"]),
        ("backup", vec!["baton-backup"]),
        ("container-build", vec!["baton-container-build"]),
        ("infrastructure", vec!["baton-infrastructure"]),
        ("staging-verify", vec!["baton-staging-verify"]),
        ("production-apply", vec!["baton-production-apply"]),
        ("network", vec!["baton-network"]),
        ("cdn", vec!["baton-cdn"]),
        ("baton", binaries.iter().map(String::as_str).collect()),
    ];
    for (target, shipped) in &roles {
        let chain = chain(&stages, target);
        assert!(!chain.is_empty(), "no stage {target}");
        assert_ne!(chain[0].from, build.from, "{target} is built on the toolchain image");
        for st in &chain {
            for l in &st.lines {
                assert!(
                    !l.contains("cargo "),
                    "{target}: runtime stage {} runs cargo: {l}",
                    st.name
                );
                if l.starts_with("COPY --from=") {
                    assert!(
                        l.starts_with("COPY --from=build /out/"),
                        "{target}: copies more than binaries: {l}"
                    );
                }
            }
        }
        let user = last_instruction(&chain, "USER").unwrap_or_else(|| panic!("{target}: no USER"));
        let uid = user.split(':').next().unwrap();
        assert!(
            !["root", "0"].contains(&uid),
            "{target}: runs as {user}, must be a non-root user"
        );
        let health = last_instruction(&chain, "HEALTHCHECK").unwrap_or_else(|| panic!("{target}: no HEALTHCHECK"));
        assert!(!health.eq_ignore_ascii_case("NONE"), "{target}: HEALTHCHECK NONE");
        assert!(health.contains("baton-healthcheck"), "{target}: {health}");
        let copies = chain
            .iter()
            .flat_map(|s| s.lines.iter())
            .filter(|l| l.starts_with("COPY --from=build"))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        for b in shipped {
            assert!(copies.contains(&format!("/out/{b} ")), "{target}: does not ship {b}");
        }
        let entrypoint = last_instruction(&chain, "ENTRYPOINT").unwrap_or_else(|| panic!("{target}: no ENTRYPOINT"));
        assert!(
            entrypoint.contains(&format!("/usr/local/bin/{}\"", shipped[0])),
            "{target}: entrypoint {entrypoint}"
        );
    }

    // The build context leaves out build output and history.
    let ignore = read(".dockerignore");
    for entry in ["target/", ".git/", "**/node_modules/"] {
        assert!(ignore.lines().any(|l| l.trim() == entry), ".dockerignore lacks {entry}");
    }
}

/// A one-connection-at-a-time HTTP server answering `status` to GET /healthz and
/// 404 to anything else, for `requests` connections.
fn http_server(status: &'static str, requests: usize) -> (u16, std::thread::JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for stream in listener.incoming().take(requests) {
            let mut stream = stream.unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            // The request line, then the headers up to the blank line.
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            seen.push(line.trim().to_owned());
            let mut header = String::new();
            while reader.read_line(&mut header).unwrap_or(0) > 0 && !header.trim().is_empty() {
                header.clear();
            }
            let answer = if line.starts_with("GET /healthz ") {
                status
            } else {
                "404 Not Found"
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {answer}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            );
        }
        seen
    });
    (port, handle)
}

fn healthcheck(env: &[(&str, String)]) -> (i32, String) {
    let mut cmd = Command::new("bash");
    cmd.arg(root().join("ops/docker/healthcheck.sh")).env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (code, _, err) = output(&mut cmd);
    (code, err)
}

#[test]
fn the_image_health_check_probes_healthz_on_the_configured_address() {
    let (port, server) = http_server("200 OK", 2);
    let (code, err) = healthcheck(&[("BATON_DAEMON__HTTP_LISTEN", format!("0.0.0.0:{port}"))]);
    assert_eq!(code, 0, "daemon address: {err}");
    let (code, err) = healthcheck(&[("BATON_API__LISTEN", format!("127.0.0.1:{port}"))]);
    assert_eq!(code, 0, "scheduler address: {err}");
    let seen = server.join().unwrap();
    assert!(seen.iter().all(|l| l == "GET /healthz HTTP/1.0"), "{seen:?}");

    let (port, server) = http_server("503 Service Unavailable", 1);
    let (code, err) = healthcheck(&[("BATON_DAEMON__HTTP_LISTEN", format!("127.0.0.1:{port}"))]);
    assert_eq!(code, 1, "a 503 is unhealthy");
    assert!(err.contains("503"), "{err}");
    server.join().unwrap();

    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (code, _) = healthcheck(&[("BATON_DAEMON__HTTP_LISTEN", format!("127.0.0.1:{closed}"))]);
    assert_eq!(code, 1, "nothing listening is unhealthy");
    let (code, err) = healthcheck(&[]);
    assert_eq!(code, 1);
    assert!(err.contains("BATON_DAEMON__HTTP_LISTEN"), "{err}");
}
