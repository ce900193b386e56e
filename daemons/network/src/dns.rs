//! Propagation: every authoritative nameserver of a zone is asked directly
//! (no recursion, no cache) until each answers what was declared.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_resolver::Resolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RecordType;
use serde::{Deserialize, Serialize};

/// An authoritative nameserver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    pub name: String,
    pub addr: SocketAddr,
}

/// The record types whose answers are compared over DNS.
pub const CHECKED: &[&str] = &["A", "AAAA", "CNAME", "TXT"];

/// A fully qualified name for a TransIP entry name in `domain`.
pub fn fqdn(name: &str, domain: &str) -> String {
    if name == "@" {
        domain.to_owned()
    } else {
        format!("{name}.{domain}")
    }
}

/// A declared content as DNS answers it (a relative CNAME target is in the
/// domain; names lose their final dot).
pub fn normalize(kind: &str, content: &str, domain: &str) -> String {
    match kind {
        "CNAME" if content.ends_with('.') => content.trim_end_matches('.').to_ascii_lowercase(),
        "CNAME" if content == "@" => domain.to_owned(),
        "CNAME" => format!("{}.{domain}", content.to_ascii_lowercase()),
        "A" | "AAAA" => content
            .parse::<std::net::IpAddr>()
            .map_or_else(|_| content.to_owned(), |ip| ip.to_string()),
        _ => content.to_owned(),
    }
}

fn resolver(server: SocketAddr, timeout: Duration) -> Result<Resolver<TokioRuntimeProvider>, String> {
    let mut conn = ConnectionConfig::udp();
    conn.port = server.port();
    let ns = NameServerConfig::new(server.ip(), true, vec![conn]);
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.recursion_desired = false;
    opts.attempts = 0;
    opts.timeout = timeout;
    opts.preserve_intermediates = false;
    Resolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    )
    .with_options(opts)
    .build()
    .map_err(|e| e.to_string())
}

/// What `server` answers for `name` and `kind` (empty: no such records).
pub async fn query(server: SocketAddr, name: &str, kind: &str, timeout: Duration) -> Result<BTreeSet<String>, String> {
    let rt: RecordType = kind.parse().map_err(|_| format!("unknown record type {kind}"))?;
    let resolver = resolver(server, timeout)?;
    match resolver.lookup(format!("{name}.").as_str(), rt).await {
        Ok(lookup) => Ok(lookup
            .answers()
            .iter()
            .filter(|r| r.record_type() == rt)
            .map(|r| r.data.to_string().trim_end_matches('.').to_owned())
            .map(|s| {
                if rt == RecordType::CNAME {
                    s.to_ascii_lowercase()
                } else {
                    s
                }
            })
            .collect()),
        Err(e) if e.is_no_records_found() || e.is_nx_domain() => Ok(BTreeSet::new()),
        Err(e) => Err(e.to_string()),
    }
}

/// One expectation: `name` of `kind` answers exactly `want`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expect {
    pub name: String,
    pub kind: String,
    pub want: BTreeSet<String>,
    /// Exactly `want` (else: at least `want`, as for a challenge value next
    /// to others).
    pub exact: bool,
}

/// Waits until every server answers every expectation, polling every `poll`
/// until `deadline`. On time: how long it took. Else each lagging server with
/// what it answered.
pub async fn wait(
    servers: &[Server],
    expect: &[Expect],
    deadline: Duration,
    poll: Duration,
) -> Result<Duration, Vec<String>> {
    let start = Instant::now();
    let timeout = poll.clamp(Duration::from_millis(500), Duration::from_secs(3));
    let mut pending: BTreeMap<(usize, usize), String> = BTreeMap::new();
    for (s, _) in servers.iter().enumerate() {
        for (e, _) in expect.iter().enumerate() {
            pending.insert((s, e), String::new());
        }
    }
    loop {
        let keys: Vec<_> = pending.keys().copied().collect();
        for (s, e) in keys {
            let (server, ex) = (&servers[s], &expect[e]);
            match query(server.addr, &ex.name, &ex.kind, timeout).await {
                Ok(got) if got == ex.want || (!ex.exact && ex.want.is_subset(&got)) => {
                    pending.remove(&(s, e));
                }
                Ok(got) => {
                    let got: Vec<_> = got.into_iter().collect();
                    pending.insert(
                        (s, e),
                        format!(
                            "{} ({}) answers {} {} with [{}], not [{}]",
                            server.name,
                            server.addr,
                            ex.kind,
                            ex.name,
                            got.join(", "),
                            ex.want.iter().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    );
                }
                Err(err) => {
                    pending.insert(
                        (s, e),
                        format!(
                            "{} ({}) does not answer {} {}: {err}",
                            server.name, server.addr, ex.kind, ex.name
                        ),
                    );
                }
            }
        }
        if pending.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() + poll > deadline {
            return Err(pending.into_values().collect());
        }
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_are_compared_as_dns_answers_them() {
        assert_eq!(fqdn("@", "example.test"), "example.test");
        assert_eq!(fqdn("www", "example.test"), "www.example.test");
        assert_eq!(normalize("CNAME", "web", "example.test"), "web.example.test");
        assert_eq!(
            normalize("CNAME", "Edge.Example.NET.", "example.test"),
            "edge.example.net"
        );
        assert_eq!(normalize("AAAA", "2001:DB8::0:1", "example.test"), "2001:db8::1");
    }
}
