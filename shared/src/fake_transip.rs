//! A TransIP stand-in at its network boundary, for tests and the demo (feature
//! `testing`): no TransIP is reachable from here, so this speaks its REST API
//! v6 over HTTP on a loopback port and answers DNS for its domains over UDP,
//! as the domains' authoritative nameservers would.
//!
//! - `POST /v6/auth`: the key-pair login. The body's `login` must be the
//!   account's, its `nonce` new; the `Signature` header is the body's RSA
//!   PKCS#1 v1.5 SHA-512 signature, base64, checked against the account's
//!   public key. 201 `{"token": …}`; else 401 `{"error": …}`.
//! - With `Authorization: Bearer <token>`: `GET /v6/domains/{domain}/dns`
//!   (`{"dnsEntries": [{name, expire, type, content}]}`), `POST` (add one,
//!   201), `PATCH` (content of the one entry matching name, expire and type,
//!   204; none or several: 406), `DELETE` (the entry matching all fields, 204),
//!   `PUT` (replace all, 204); `GET /v6/domains/{domain}/nameservers`. An
//!   unknown domain is 404 `{"error": "Domain with name '…' not found"}`; a
//!   bad entry type 406.
//! - **DNS**: each of `nameservers` UDP listeners answers authoritatively from
//!   the entries (A, AAAA, CNAME, TXT, NS, MX), NXDOMAIN with the SOA for
//!   names without entries. A test can make one lag ([`FakeTransip::lag`]): it
//!   keeps answering from the zone as it was, as a nameserver behind on its
//!   zone transfers does.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, NS, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use ring::signature::{KeyPair, RSA_PKCS1_2048_8192_SHA512, RsaKeyPair, UnparsedPublicKey};
use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;
use serde_json::{Value, json};

const TYPES: &[&str] = &[
    "A", "AAAA", "CNAME", "MX", "NS", "TXT", "SRV", "SSHFP", "TLSA", "CAA", "NAPTR", "ALIAS",
];

/// One entry, as the API models it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub expire: u32,
    #[serde(rename = "type")]
    pub kind: String,
    pub content: String,
}

type Zones = BTreeMap<String, Vec<Entry>>;

#[derive(Default)]
struct Inner {
    login: String,
    public_key: Vec<u8>,
    tokens: BTreeSet<String>,
    nonces: BTreeSet<String>,
    zones: Zones,
    /// Per nameserver: the zones it still answers from, while it lags.
    lagging: Vec<Option<Zones>>,
    /// Entry changes made through the API, in order (`POST www A …`).
    changes: Vec<String>,
}

/// A running TransIP stand-in.
pub struct FakeTransip {
    pub api_url: String,
    pub nameservers: Vec<SocketAddr>,
    inner: Arc<Mutex<Inner>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for FakeTransip {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({"error": message}))).into_response()
}

type Shared = Arc<Mutex<Inner>>;

fn authorized(state: &Shared, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if state.lock().expect("fake TransIP state").tokens.contains(token) {
        Ok(())
    } else {
        Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "Your access token has expired.",
        )))
    }
}

async fn auth(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(signature) = headers.get("signature").and_then(|v| v.to_str().ok()) else {
        return error(StatusCode::UNAUTHORIZED, "Please specify a signature in the header");
    };
    let Ok(signature) = base64::engine::general_purpose::STANDARD.decode(signature) else {
        return error(StatusCode::UNAUTHORIZED, "Signature is not valid base64");
    };
    #[derive(Deserialize)]
    struct Login {
        login: String,
        nonce: Option<String>,
    }
    let Ok(login) = serde_json::from_slice::<Login>(&body) else {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "The JSON body is not valid");
    };
    let mut s = state.lock().expect("fake TransIP state");
    let Some(nonce) = login.nonce.filter(|n| !n.is_empty()) else {
        return error(StatusCode::UNAUTHORIZED, "Please specify a nonce in the body");
    };
    if login.login != s.login {
        return error(StatusCode::UNAUTHORIZED, "Authentication failed, unknown user");
    }
    let key = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA512, s.public_key.clone());
    if key.verify(&body, &signature).is_err() {
        return error(StatusCode::UNAUTHORIZED, "Invalid signature");
    }
    if !s.nonces.insert(nonce) {
        return error(StatusCode::UNAUTHORIZED, "Nonce has already been used");
    }
    let token = hex::encode(rand::random::<[u8; 24]>());
    s.tokens.insert(token.clone());
    (StatusCode::CREATED, axum::Json(json!({"token": token}))).into_response()
}

fn domain_missing(domain: &str) -> Response {
    error(StatusCode::NOT_FOUND, &format!("Domain with name '{domain}' not found"))
}

async fn list(State(state): State<Shared>, headers: HeaderMap, Path(domain): Path<String>) -> Response {
    if let Err(r) = authorized(&state, &headers) {
        return *r;
    }
    let s = state.lock().expect("fake TransIP state");
    match s.zones.get(&domain) {
        Some(entries) => axum::Json(json!({"dnsEntries": entries})).into_response(),
        None => domain_missing(&domain),
    }
}

async fn list_nameservers(State(state): State<Shared>, headers: HeaderMap, Path(domain): Path<String>) -> Response {
    if let Err(r) = authorized(&state, &headers) {
        return *r;
    }
    let s = state.lock().expect("fake TransIP state");
    if !s.zones.contains_key(&domain) {
        return domain_missing(&domain);
    }
    let servers: Vec<Value> = (0..s.lagging.len())
        .map(|i| json!({"hostname": format!("ns{i}.transip.test"), "ipv4": null, "ipv6": null}))
        .collect();
    axum::Json(json!({"nameservers": servers})).into_response()
}

async fn change(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(domain): Path<String>,
    method: axum::http::Method,
    body: Bytes,
) -> Response {
    if let Err(r) = authorized(&state, &headers) {
        return *r;
    }
    let mut s = state.lock().expect("fake TransIP state");
    if !s.zones.contains_key(&domain) {
        return domain_missing(&domain);
    }
    if method == axum::http::Method::PUT {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct All {
            dns_entries: Vec<Entry>,
        }
        let Ok(all) = serde_json::from_slice::<All>(&body) else {
            return error(StatusCode::NOT_ACCEPTABLE, "The dnsEntries are not valid");
        };
        s.changes.push(format!("PUT {} entries", all.dns_entries.len()));
        s.zones.insert(domain, all.dns_entries);
        return StatusCode::NO_CONTENT.into_response();
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct One {
        dns_entry: Entry,
    }
    let Ok(one) = serde_json::from_slice::<One>(&body) else {
        return error(StatusCode::NOT_ACCEPTABLE, "The dnsEntry is not valid");
    };
    let e = one.dns_entry;
    if !TYPES.contains(&e.kind.as_str()) {
        return error(
            StatusCode::NOT_ACCEPTABLE,
            &format!("Invalid DNS entry type '{}'", e.kind),
        );
    }
    let line = format!("{method} {} {} {} {}", e.name, e.expire, e.kind, e.content);
    let entries = s.zones.get_mut(&domain).expect("checked above");
    let status = match method.as_str() {
        "POST" => {
            entries.push(e);
            StatusCode::CREATED
        }
        "PATCH" => {
            let matching: Vec<usize> = entries
                .iter()
                .enumerate()
                .filter(|(_, x)| x.name == e.name && x.expire == e.expire && x.kind == e.kind)
                .map(|(i, _)| i)
                .collect();
            if matching.len() != 1 {
                return error(
                    StatusCode::NOT_ACCEPTABLE,
                    &format!(
                        "{} matches found for DNS entry '{} {} {}'",
                        matching.len(),
                        e.name,
                        e.expire,
                        e.kind
                    ),
                );
            }
            entries[matching[0]].content = e.content;
            StatusCode::NO_CONTENT
        }
        "DELETE" => match entries.iter().position(|x| *x == e) {
            Some(i) => {
                entries.remove(i);
                StatusCode::NO_CONTENT
            }
            None => return error(StatusCode::NOT_FOUND, "DNS entry not found"),
        },
        _ => return error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed"),
    };
    s.changes.push(line);
    status.into_response()
}

fn name(s: &str) -> Option<Name> {
    Name::from_ascii(if s.ends_with('.') {
        s.to_owned()
    } else {
        format!("{s}.")
    })
    .ok()
}

/// A target as DNS serves it: absolute with a final dot, `@`, or in the domain.
fn target(content: &str, domain: &str) -> Option<Name> {
    if content.ends_with('.') {
        name(content)
    } else if content == "@" {
        name(domain)
    } else {
        name(&format!("{content}.{domain}"))
    }
}

fn rdata(e: &Entry, domain: &str) -> Option<RData> {
    Some(match e.kind.as_str() {
        "A" => RData::A(A(e.content.parse().ok()?)),
        "AAAA" => RData::AAAA(AAAA(e.content.parse().ok()?)),
        "CNAME" => RData::CNAME(CNAME(target(&e.content, domain)?)),
        "NS" => RData::NS(NS(target(&e.content, domain)?)),
        "TXT" => RData::TXT(TXT::new(vec![e.content.clone()])),
        "MX" => {
            let (pref, host) = e.content.split_once(' ')?;
            RData::MX(MX::new(pref.parse().ok()?, target(host, domain)?))
        }
        _ => return None,
    })
}

/// The answer to one DNS query from `zones`.
fn answer(zones: &Zones, query: &[u8]) -> Option<Vec<u8>> {
    let req = Message::from_vec(query).ok()?;
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.authoritative = true;
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.add_queries(req.queries.iter().cloned());
    let q = req.queries.first()?;
    let qname = q.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
    let Some((domain, entries)) = zones
        .iter()
        .filter(|(d, _)| qname == **d || qname.ends_with(&format!(".{d}")))
        .max_by_key(|(d, _)| d.len())
    else {
        resp.metadata.response_code = ResponseCode::Refused;
        return resp.to_vec().ok();
    };
    let rel = if qname == *domain {
        "@".to_owned()
    } else {
        qname[..qname.len() - domain.len() - 1].to_owned()
    };
    let at_name: Vec<&Entry> = entries.iter().filter(|e| e.name.eq_ignore_ascii_case(&rel)).collect();
    let qtype = q.query_type();
    let cname = at_name.iter().find(|e| e.kind == "CNAME");
    let matching: Vec<&&Entry> = match cname {
        Some(c) if qtype != RecordType::CNAME => vec![c],
        _ => at_name.iter().filter(|e| e.kind == qtype.to_string()).collect(),
    };
    for e in matching {
        if let Some(data) = rdata(e, domain) {
            resp.add_answer(Record::from_rdata(q.name().clone(), e.expire, data));
        }
    }
    if resp.answers.is_empty() {
        if at_name.is_empty() {
            resp.metadata.response_code = ResponseCode::NXDomain;
        }
        let zone = name(domain)?;
        resp.add_authority(Record::from_rdata(
            zone.clone(),
            300,
            RData::SOA(SOA::new(
                name("ns0.transip.test")?,
                name(&format!("hostmaster.{domain}"))?,
                1,
                3600,
                600,
                86400,
                300,
            )),
        ));
    }
    resp.to_vec().ok()
}

impl FakeTransip {
    /// Starts the API and `nameservers` DNS listeners for `domains` (empty
    /// zones), for the account `login` whose API key pair's private key is
    /// `private_key_pem` (PKCS#8; the stand-in keeps only its public half).
    pub async fn start(login: &str, private_key_pem: &[u8], domains: &[&str], nameservers: usize) -> Self {
        let der = PrivatePkcs8KeyDer::from_pem_slice(private_key_pem).expect("a PKCS#8 PEM key");
        let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).expect("an RSA key");
        let inner = Arc::new(Mutex::new(Inner {
            login: login.to_owned(),
            public_key: key.public_key().as_ref().to_vec(),
            zones: domains.iter().map(|d| ((*d).to_owned(), Vec::new())).collect(),
            lagging: vec![None; nameservers],
            ..Inner::default()
        }));
        let mut tasks = Vec::new();
        let app = Router::new()
            .route("/v6/auth", post(auth))
            .route(
                "/v6/domains/{domain}/dns",
                get(list).post(change).patch(change).delete(change).put(change),
            )
            .route("/v6/domains/{domain}/nameservers", get(list_nameservers))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let api_url = format!("http://{}/v6", listener.local_addr().expect("bound"));
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
        let mut addrs = Vec::new();
        for i in 0..nameservers {
            let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind UDP");
            addrs.push(socket.local_addr().expect("bound"));
            let inner = inner.clone();
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                        continue;
                    };
                    let reply = {
                        let s = inner.lock().expect("fake TransIP state");
                        let zones = s.lagging[i].as_ref().unwrap_or(&s.zones);
                        answer(zones, &buf[..n])
                    };
                    if let Some(reply) = reply {
                        let _ = socket.send_to(&reply, from).await;
                    }
                }
            }));
        }
        Self {
            api_url,
            nameservers: addrs,
            inner,
            tasks,
        }
    }

    /// The entries of `domain` now.
    pub fn entries(&self, domain: &str) -> Vec<Entry> {
        let s = self.inner.lock().expect("fake TransIP state");
        let mut v = s.zones.get(domain).cloned().unwrap_or_default();
        v.sort();
        v
    }

    /// Sets `domain`'s entries, as made before the test (by hand or earlier).
    pub fn set_entries(&self, domain: &str, entries: Vec<Entry>) {
        self.inner
            .lock()
            .expect("fake TransIP state")
            .zones
            .insert(domain.to_owned(), entries);
    }

    /// Makes nameserver `i` keep answering from the zones as they are now
    /// (`true`), or catch up (`false`).
    pub fn lag(&self, i: usize, lagging: bool) {
        let mut s = self.inner.lock().expect("fake TransIP state");
        s.lagging[i] = lagging.then(|| s.zones.clone());
    }

    /// The entry changes made through the API, in order.
    pub fn changes(&self) -> Vec<String> {
        self.inner.lock().expect("fake TransIP state").changes.clone()
    }
}
