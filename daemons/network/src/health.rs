//! The load balancer's health check: each host's health path requested
//! through the load balancer's address, over TLS with the host's name (the
//! served certificate must chain to a trusted root and name the host), and
//! over plain HTTP, which must only redirect to HTTPS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

/// One request's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checked {
    pub url: String,
    pub status: u16,
    /// For plain HTTP: where it redirects.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub location: String,
}

/// TLS for the health check: the system's roots plus `extra` (PEM files).
pub fn tls(extra: &[Vec<u8>]) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    for pem in extra {
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("a CA file is not PEM: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("a CA certificate is not usable: {e}"))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

async fn get<S>(io: S, host: &str, path: &str) -> Result<(u16, String), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(path)
        .header("Host", host)
        .header("User-Agent", "baton-network health check")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let _ = resp.into_body().collect().await;
    Ok((status, location))
}

/// `https://host/path` through `lb`.
pub async fn https(
    lb: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    host: &str,
    path: &str,
    timeout: Duration,
) -> Result<Checked, String> {
    let url = format!("https://{host}{path}");
    let exchange = async {
        let tcp = TcpStream::connect(lb)
            .await
            .map_err(|e| format!("cannot connect to {lb}: {e}"))?;
        let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host} through {lb} failed: {e}"))?;
        get(stream, host, path).await
    };
    let (status, _) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("{url}: no answer within {} s", timeout.as_secs()))?
        .map_err(|e| format!("{url}: {e}"))?;
    Ok(Checked {
        url,
        status,
        location: String::new(),
    })
}

/// `http://host/path` through `lb`.
pub async fn http(lb: SocketAddr, host: &str, path: &str, timeout: Duration) -> Result<Checked, String> {
    let url = format!("http://{host}{path}");
    let exchange = async {
        let tcp = TcpStream::connect(lb)
            .await
            .map_err(|e| format!("cannot connect to {lb}: {e}"))?;
        get(tcp, host, path).await
    };
    let (status, location) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("{url}: no answer within {} s", timeout.as_secs()))?
        .map_err(|e| format!("{url}: {e}"))?;
    Ok(Checked { url, status, location })
}

/// Is a plain HTTP answer only a redirect to the same host over HTTPS?
pub fn redirects_to_tls(c: &Checked, host: &str) -> bool {
    matches!(c.status, 301 | 302 | 307 | 308)
        && (c.location == format!("https://{host}") || c.location.starts_with(&format!("https://{host}/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_may_only_redirect_to_the_same_host_over_tls() {
        let c = |status, location: &str| Checked {
            url: "http://www.example.test/healthz".into(),
            status,
            location: location.into(),
        };
        assert!(redirects_to_tls(
            &c(308, "https://www.example.test/healthz"),
            "www.example.test"
        ));
        assert!(redirects_to_tls(
            &c(301, "https://www.example.test"),
            "www.example.test"
        ));
        assert!(
            !redirects_to_tls(&c(200, ""), "www.example.test"),
            "served over plain HTTP"
        );
        assert!(!redirects_to_tls(
            &c(302, "http://www.example.test/"),
            "www.example.test"
        ));
        assert!(!redirects_to_tls(
            &c(302, "https://www.example.test.evil/"),
            "www.example.test"
        ));
    }
}
