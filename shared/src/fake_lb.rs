//! A load balancer in front of the cluster's ingresses, for tests and the demo
//! (features `testing` and `kube`): there is no ingress controller here. On
//! its TLS listener it serves each host (by SNI) with the certificate of the
//! Ingress that routes that host, read from the cluster at each handshake as
//! an ingress controller does, and answers the health path with a status per
//! host (200 unless a test says otherwise). Plain HTTP is redirected to HTTPS,
//! except ACME HTTP-01 challenges, which go to a solver when one is given.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::Ingress;
use kube::{Api, Client};
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running load balancer; its tasks end with the runtime.
pub struct LoadBalancer {
    pub https: SocketAddr,
    pub http: SocketAddr,
    status: Arc<Mutex<BTreeMap<String, u16>>>,
}

/// A request's host and path.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<(String, String)> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let host = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("host").then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    Some((host, path))
}

/// The certificate chain and key of the Ingress routing `host` (in one of
/// `namespaces`).
async fn certificate(client: &Client, namespaces: &[String], host: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    for ns in namespaces {
        let ingresses = Api::<Ingress>::namespaced(client.clone(), ns)
            .list(&Default::default())
            .await
            .ok()?;
        for ing in ingresses.items {
            let Some(tls) = ing.spec.and_then(|s| s.tls) else {
                continue;
            };
            for t in tls {
                if t.hosts.unwrap_or_default().iter().any(|h| h == host)
                    && let Some(name) = t.secret_name
                {
                    let secret = Api::<Secret>::namespaced(client.clone(), ns).get(&name).await.ok()?;
                    let data = secret.data?;
                    return Some((data.get("tls.crt")?.0.clone(), data.get("tls.key")?.0.clone()));
                }
            }
        }
    }
    None
}

async fn serve_tls(
    tcp: tokio::net::TcpStream,
    client: Client,
    namespaces: Arc<Vec<String>>,
    status: Arc<Mutex<BTreeMap<String, u16>>>,
) {
    let acceptor = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
    let Ok(start) = acceptor.await else { return };
    let host = start.client_hello().server_name().unwrap_or("").to_owned();
    let Some((crt, key)) = certificate(&client, &namespaces, &host).await else {
        return;
    };
    let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(&crt)
        .filter_map(Result::ok)
        .collect();
    let Ok(key) = rustls::pki_types::PrivateKeyDer::from_pem_slice(&key) else {
        return;
    };
    let Ok(config) = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_no_client_auth())
    else {
        return;
    };
    let Ok(config) = config.with_single_cert(chain, key) else {
        return;
    };
    let Ok(mut stream) = start.into_stream(Arc::new(config)).await else {
        return;
    };
    if read_head(&mut stream).await.is_none() {
        return;
    }
    let code = status
        .lock()
        .expect("load balancer state")
        .get(&host)
        .copied()
        .unwrap_or(200);
    let _ = stream
        .write_all(format!("HTTP/1.1 {code} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").as_bytes())
        .await;
    let _ = stream.shutdown().await;
}

async fn serve_plain(mut s: tokio::net::TcpStream, solver: Option<SocketAddr>) {
    let Some((host, path)) = read_head(&mut s).await else {
        return;
    };
    let answer = match solver {
        Some(solver) if path.starts_with("/.well-known/acme-challenge/") => {
            let Ok(mut up) = tokio::net::TcpStream::connect(solver).await else { return };
            if up
                .write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
            let mut out = Vec::new();
            let _ = up.read_to_end(&mut out).await;
            out
        }
        _ => format!(
            "HTTP/1.1 308 Permanent Redirect\r\nLocation: https://{host}{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .into_bytes(),
    };
    let _ = s.write_all(&answer).await;
    let _ = s.shutdown().await;
}

impl LoadBalancer {
    /// Starts both listeners on loopback for the ingresses of `namespaces`.
    pub async fn start(client: Client, namespaces: Vec<String>, solver: Option<SocketAddr>) -> Self {
        let status: Arc<Mutex<BTreeMap<String, u16>>> = Arc::default();
        let tls = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (https, http) = (tls.local_addr().expect("bound"), plain.local_addr().expect("bound"));
        let namespaces = Arc::new(namespaces);
        let by_host = status.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = tls.accept().await else { continue };
                tokio::spawn(serve_tls(tcp, client.clone(), namespaces.clone(), by_host.clone()));
            }
        });
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = plain.accept().await else { continue };
                tokio::spawn(serve_plain(tcp, solver));
            }
        });
        Self { https, http, status }
    }

    /// From now on `host`'s health path answers `status`.
    pub fn answer(&self, host: &str, status: u16) {
        self.status
            .lock()
            .expect("load balancer state")
            .insert(host.to_owned(), status);
    }
}
