//! Network policies: the objects the folder's allow rules become, the
//! default-deny policy every pipeline namespace carries, and the evaluation of
//! declared flows against a whole policy set with Kubernetes' semantics (a pod
//! selected by any policy of a direction accepts only what one of them allows;
//! both ends must allow a flow).

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use crate::spec::{Flow, Labels, Peer, Policy, Rule};

/// The label every namespace carries with its own name.
pub const NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The default-deny policy of a namespace: every pod, both directions, no rule.
pub fn default_deny(namespace: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": crate::DEFAULT_DENY, "namespace": namespace},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
    })
}

fn peer_json(p: &Peer) -> Value {
    let mut out = json!({"podSelector": {"matchLabels": p.pods}});
    if let Some(ns) = &p.namespace {
        out["namespaceSelector"] = json!({"matchLabels": {NAME_LABEL: ns}});
    }
    out
}

fn rules_json(rules: &[Rule], key: &str) -> Value {
    Value::Array(
        rules
            .iter()
            .map(|r| {
                json!({
                    key: r.peers.iter().map(peer_json).collect::<Vec<_>>(),
                    "ports": r.ports.iter().map(|p| json!({"protocol": "TCP", "port": p})).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

/// The NetworkPolicy an allow rule set becomes.
pub fn manifest(p: &Policy) -> Value {
    let mut types = Vec::new();
    if !p.ingress.is_empty() {
        types.push("Ingress");
    }
    if !p.egress.is_empty() {
        types.push("Egress");
    }
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": p.name, "namespace": p.namespace},
        "spec": {
            "podSelector": {"matchLabels": p.pods},
            "policyTypes": types,
            "ingress": rules_json(&p.ingress, "from"),
            "egress": rules_json(&p.egress, "to"),
        },
    })
}

/// Does `selector` select `labels`? (`matchLabels` and `matchExpressions`.)
pub fn selects(selector: &LabelSelector, labels: &Labels) -> bool {
    let by_labels = selector
        .match_labels
        .as_ref()
        .is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let by_expressions = selector.match_expressions.as_ref().is_none_or(|exprs| {
        exprs.iter().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            let have = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => have.is_some_and(|v| values.contains(v)),
                "NotIn" => have.is_none_or(|v| !values.contains(v)),
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                _ => false,
            }
        })
    });
    by_labels && by_expressions
}

/// One end of a flow, resolved: its namespace, the namespace's labels, the
/// pods' labels.
struct End<'a> {
    namespace: &'a str,
    namespace_labels: Labels,
    pods: &'a Labels,
}

fn peer_matches(peer: &NetworkPolicyPeer, policy_ns: &str, other: &End) -> bool {
    if peer.ip_block.is_some() {
        // Address ranges are for traffic from outside the cluster; a flow
        // between pods is not judged by them.
        return false;
    }
    let namespace_ok = match &peer.namespace_selector {
        Some(sel) => selects(sel, &other.namespace_labels),
        None => other.namespace == policy_ns,
    };
    let pods_ok = peer.pod_selector.as_ref().is_none_or(|sel| selects(sel, other.pods));
    namespace_ok && pods_ok
}

fn port_matches(ports: Option<&Vec<NetworkPolicyPort>>, port: u16) -> bool {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return true;
    };
    ports.iter().any(|p| {
        p.protocol.as_deref().unwrap_or("TCP") == "TCP"
            && match &p.port {
                None => true,
                Some(IntOrString::Int(n)) => {
                    let end = p.end_port.unwrap_or(*n);
                    (*n..=end).contains(&i32::from(port))
                }
                // A named port is a container's: not known from here, so it
                // is not counted as allowing the flow.
                Some(IntOrString::String(_)) => false,
            }
    })
}

fn has_type(p: &NetworkPolicy, ty: &str) -> bool {
    let spec = p.spec.as_ref();
    match spec.and_then(|s| s.policy_types.as_ref()) {
        Some(types) => types.iter().any(|t| t == ty),
        None => ty == "Ingress" || spec.is_some_and(|s| s.egress.is_some()),
    }
}

fn name_of(p: &NetworkPolicy) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or(""),
        p.metadata.name.as_deref().unwrap_or("")
    )
}

/// The policies of one direction that select `end`'s pods, and whether one of
/// them allows `other` on `port`.
fn side(policies: &[NetworkPolicy], end: &End, other: &End, port: u16, egress: bool) -> Result<(), Vec<String>> {
    let ty = if egress { "Egress" } else { "Ingress" };
    let selecting: Vec<&NetworkPolicy> = policies
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(end.namespace))
        .filter(|p| has_type(p, ty))
        .filter(|p| {
            p.spec
                .as_ref()
                .is_some_and(|s| s.pod_selector.as_ref().is_none_or(|sel| selects(sel, end.pods)))
        })
        .collect();
    if selecting.is_empty() {
        return Ok(());
    }
    let allowed = selecting.iter().any(|p| {
        let spec = p.spec.as_ref().expect("selected policies have a spec");
        if egress {
            spec.egress.iter().flatten().any(|r| {
                r.to.as_ref()
                    .is_none_or(|to| to.is_empty() || to.iter().any(|x| peer_matches(x, end.namespace, other)))
                    && port_matches(r.ports.as_ref(), port)
            })
        } else {
            spec.ingress.iter().flatten().any(|r| {
                r.from
                    .as_ref()
                    .is_none_or(|from| from.is_empty() || from.iter().any(|x| peer_matches(x, end.namespace, other)))
                    && port_matches(r.ports.as_ref(), port)
            })
        }
    });
    if allowed {
        Ok(())
    } else {
        Err(selecting.iter().map(|p| name_of(p)).collect())
    }
}

/// A declared flow the policy set would block: which direction, and the
/// policies that select the pods there without allowing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub flow: String,
    pub at: String,
    pub direction: &'static str,
    pub policies: Vec<String>,
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (declared at {}): its {} is selected by {} and none of them allows it",
            self.flow,
            self.at,
            self.direction,
            self.policies.join(", ")
        )
    }
}

/// Every declared flow against `policies`; `namespaces` holds the labels of
/// the namespaces that exist (one that does not gets only its name label).
pub fn blocked(flows: &[Flow], policies: &[NetworkPolicy], namespaces: &BTreeMap<String, Labels>) -> Vec<Blocked> {
    let labels = |ns: &str| {
        namespaces
            .get(ns)
            .cloned()
            .unwrap_or_else(|| Labels::from([(NAME_LABEL.to_owned(), ns.to_owned())]))
    };
    let mut out = Vec::new();
    for f in flows {
        let (Some(from_ns), Some(to_ns)) = (f.from.namespace.as_deref(), f.to.namespace.as_deref()) else {
            continue;
        };
        let from = End {
            namespace: from_ns,
            namespace_labels: labels(from_ns),
            pods: &f.from.pods,
        };
        let to = End {
            namespace: to_ns,
            namespace_labels: labels(to_ns),
            pods: &f.to.pods,
        };
        for (direction, result) in [
            ("egress from the source", side(policies, &from, &to, f.port, true)),
            ("ingress to the destination", side(policies, &to, &from, f.port, false)),
        ] {
            if let Err(policies) = result {
                out.push(Blocked {
                    flow: f.describe(),
                    at: f.at.clone(),
                    direction,
                    policies,
                });
            }
        }
    }
    out
}

/// Is `p` a default-deny policy for both directions (every pod, no rule)?
pub fn is_default_deny(p: &NetworkPolicy) -> bool {
    p.spec.as_ref().is_some_and(|s| {
        let all_pods = s.pod_selector.as_ref().is_none_or(|sel| {
            sel.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
                && sel.match_expressions.as_ref().is_none_or(Vec::is_empty)
        });
        all_pods
            && has_type(p, "Ingress")
            && has_type(p, "Egress")
            && s.ingress.as_ref().is_none_or(Vec::is_empty)
            && s.egress.as_ref().is_none_or(Vec::is_empty)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Peer;

    fn policy(v: Value) -> NetworkPolicy {
        serde_json::from_value(v).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn flow(from: (&str, &[(&str, &str)]), to: (&str, &[(&str, &str)]), port: u16) -> Flow {
        Flow {
            from: Peer {
                namespace: Some(from.0.into()),
                pods: labels(from.1),
            },
            to: Peer {
                namespace: Some(to.0.into()),
                pods: labels(to.1),
            },
            port,
            at: "network/policies.toml:9".into(),
        }
    }

    fn web_in(port: u16) -> Policy {
        Policy {
            name: "web-in".into(),
            namespace: "shop".into(),
            pods: labels(&[("app", "web")]),
            ingress: vec![Rule {
                peers: vec![Peer {
                    namespace: Some("ingress".into()),
                    pods: labels(&[("app", "lb")]),
                }],
                ports: vec![port],
            }],
            egress: vec![],
            ..base()
        }
    }

    fn base() -> Policy {
        Policy {
            name: String::new(),
            namespace: String::new(),
            pods: Labels::new(),
            ingress: vec![],
            egress: vec![],
            at: "network/policies.toml:1".into(),
        }
    }

    fn lb_out() -> Policy {
        Policy {
            name: "lb-out".into(),
            namespace: "ingress".into(),
            pods: labels(&[("app", "lb")]),
            ingress: vec![],
            egress: vec![Rule {
                peers: vec![Peer {
                    namespace: Some("shop".into()),
                    pods: labels(&[("app", "web")]),
                }],
                ports: vec![8080],
            }],
            ..base()
        }
    }

    #[test]
    fn default_deny_blocks_until_both_ends_allow() {
        let flows = [flow(("ingress", &[("app", "lb")]), ("shop", &[("app", "web")]), 8080)];
        let none = BTreeMap::new();
        let deny = [policy(default_deny("shop")), policy(default_deny("ingress"))];
        let b = blocked(&flows, &deny, &none);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].policies, ["ingress/baton-default-deny"]);
        assert_eq!(
            b[1].to_string(),
            "ingress/{app=lb} → shop/{app=web} port 8080 (declared at network/policies.toml:9): its ingress to the destination is selected by shop/baton-default-deny and none of them allows it"
        );

        let mut set = deny.to_vec();
        set.push(policy(manifest(&web_in(8080))));
        set.push(policy(manifest(&lb_out())));
        assert!(blocked(&flows, &set, &none).is_empty());

        // The wrong port leaves the destination closed, naming every policy there.
        let mut set = deny.to_vec();
        set.push(policy(manifest(&web_in(80))));
        set.push(policy(manifest(&lb_out())));
        let b = blocked(&flows, &set, &none);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].direction, "ingress to the destination");
        assert_eq!(b[0].policies, ["shop/baton-default-deny", "shop/web-in"]);
    }

    #[test]
    fn selectors_namespaces_and_port_ranges_follow_kubernetes() {
        let flows = [flow(
            ("shop", &[("app", "web"), ("tier", "front")]),
            ("shop", &[("app", "db")]),
            5432,
        )];
        let none = BTreeMap::new();
        // No policy selects either end: allowed.
        assert!(blocked(&flows, &[], &none).is_empty());
        let p = policy(json!({
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {
                "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["db"]}]},
                "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "tier", "operator": "Exists"}]}}],
                             "ports": [{"port": 5000, "endPort": 6000}]}],
            }
        }));
        assert!(blocked(&flows, std::slice::from_ref(&p), &none).is_empty());
        // The same peer in another namespace is not the policy's own namespace's pod.
        let other = [flow(("admin", &[("tier", "x")]), ("shop", &[("app", "db")]), 5432)];
        assert_eq!(blocked(&other, &[p], &none).len(), 1);
        // A namespace selector by label, with the namespace's labels from the cluster.
        let q = policy(json!({
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "ops"}}}]}]}
        }));
        let ns = BTreeMap::from([("admin".to_owned(), labels(&[("team", "ops")]))]);
        assert!(blocked(&other, std::slice::from_ref(&q), &ns).is_empty());
        assert_eq!(blocked(&other, &[q], &none).len(), 1);
        // Named ports are not counted.
        let named = policy(json!({
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": "postgres"}]}]}
        }));
        assert_eq!(blocked(&flows, &[named], &none).len(), 1);
    }

    #[test]
    fn default_deny_is_recognised() {
        assert!(is_default_deny(&policy(default_deny("shop"))));
        assert!(!is_default_deny(&policy(manifest(&web_in(80)))));
        let ingress_only = policy(json!({"metadata": {"name": "d", "namespace": "shop"}, "spec": {"podSelector": {}}}));
        assert!(!is_default_deny(&ingress_only));
    }
}
