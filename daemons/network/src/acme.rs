//! Certificates from an ACME server (Let's Encrypt) by DNS-01 through
//! TransIP: the challenge's TXT record is added, waited for on every
//! authoritative nameserver, validated by the CA, and removed again. The
//! certificate and its key land in a `kubernetes.io/tls` Secret.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::config::AcmeConfig;

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("certificate issuance failed for {hosts}: {detail}")]
    Issuance { hosts: String, detail: String },
    #[error("the ACME server is unreachable: {0}")]
    Transport(String),
}

impl AcmeError {
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Transport(_))
    }
}

/// What a certificate is, as outputs report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    pub secret: String,
    pub namespace: String,
    pub hosts: Vec<String>,
    pub serial: String,
    pub not_after: String,
    /// Issued by this step (false: the one in place was kept).
    pub issued: bool,
}

/// The first certificate of a PEM chain: its serial, expiry (Unix seconds)
/// and DNS names.
pub fn inspect(chain_pem: &[u8]) -> Result<(String, i64, Vec<String>), String> {
    let der = rustls::pki_types::CertificateDer::pem_slice_iter(chain_pem)
        .next()
        .ok_or("holds no certificate")?
        .map_err(|e| format!("is not PEM: {e}"))?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| format!("is not X.509: {e}"))?;
    let mut names = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for n in &san.general_names {
                if let GeneralName::DNSName(d) = n {
                    names.push(d.to_ascii_lowercase());
                }
            }
        }
    }
    names.sort();
    Ok((
        cert.raw_serial_as_string(),
        cert.validity().not_after.timestamp(),
        names,
    ))
}

use rustls::pki_types::pem::PemObject;

/// RFC 3339 of Unix seconds.
pub fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0).map_or_else(|| secs.to_string(), |t| t.to_rfc3339())
}

/// Does a certificate need (re)issuing: not covering `hosts`, or expiring
/// within `renew_before`? The reason, if so.
pub fn needs_issuing(chain_pem: Option<&[u8]>, hosts: &[String], renew_before: Duration, now: i64) -> Option<String> {
    let Some(pem) = chain_pem else {
        return Some("no certificate yet".to_owned());
    };
    match inspect(pem) {
        Err(e) => Some(format!("the certificate in place {e}")),
        Ok((_, not_after, names)) => {
            let mut want = hosts.to_vec();
            want.sort();
            if names != want {
                Some(format!("the certificate in place covers {} instead", names.join(", ")))
            } else if not_after - now < renew_before.as_secs() as i64 {
                Some(format!("the certificate in place expires {}", rfc3339(not_after)))
            } else {
                None
            }
        }
    }
}

/// Publishes and withdraws challenge responses: for DNS-01 a TXT value at
/// `_acme-challenge.<host>` (waiting until the authoritative servers answer
/// it), for HTTP-01 a key authorization by token.
pub trait Challenges: Send + Sync {
    fn kind(&self) -> ChallengeType;
    fn publish(&self, name: &str, value: &str) -> impl Future<Output = Result<(), String>> + Send;
    fn withdraw(&self, name: &str, value: &str) -> impl Future<Output = Result<(), String>> + Send;
}

/// HTTP-01: the daemon answers `/.well-known/acme-challenge/<token>` on its
/// solver address while it issues; the zone's load balancer routes that path
/// of every host, on port 80, to it.
pub struct Http01 {
    tokens: Arc<Mutex<BTreeMap<String, String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Http01 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Http01 {
    pub async fn start(addr: SocketAddr) -> std::io::Result<Self> {
        let tokens: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
        let served = tokens.clone();
        let app = axum::Router::new().route(
            "/.well-known/acme-challenge/{token}",
            axum::routing::get(move |axum::extract::Path(token): axum::extract::Path<String>| {
                let answer = served.lock().expect("solver tokens").get(&token).cloned();
                async move {
                    match answer {
                        Some(a) => (axum::http::StatusCode::OK, a),
                        None => (axum::http::StatusCode::NOT_FOUND, String::new()),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { tokens, task })
    }
}

impl Challenges for Http01 {
    fn kind(&self) -> ChallengeType {
        ChallengeType::Http01
    }

    async fn publish(&self, token: &str, key_authorization: &str) -> Result<(), String> {
        self.tokens
            .lock()
            .expect("solver tokens")
            .insert(token.to_owned(), key_authorization.to_owned());
        Ok(())
    }

    async fn withdraw(&self, token: &str, _: &str) -> Result<(), String> {
        self.tokens.lock().expect("solver tokens").remove(token);
        Ok(())
    }
}

/// An ACME account and how to issue with it.
pub struct Acme {
    config: AcmeConfig,
}

fn transport(e: instant_acme::Error) -> AcmeError {
    AcmeError::Transport(e.to_string())
}

impl Acme {
    pub fn new(config: AcmeConfig) -> Self {
        Self { config }
    }

    fn builder(&self) -> Result<instant_acme::AccountBuilder, AcmeError> {
        match &self.config.root_ca_file {
            Some(root) => Account::builder_with_root(root).map_err(transport),
            None => Account::builder().map_err(transport),
        }
    }

    /// The account of `credentials` (kept by the caller), or a new one.
    pub async fn account(
        &self,
        credentials: Option<AccountCredentials>,
    ) -> Result<(Account, Option<AccountCredentials>), AcmeError> {
        if let Some(c) = credentials {
            return Ok((self.builder()?.from_credentials(c).await.map_err(transport)?, None));
        }
        let contact: Vec<&str> = self.config.contact.iter().map(String::as_str).collect();
        let (account, creds) = self
            .builder()?
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.config.directory_url.clone(),
                None,
            )
            .await
            .map_err(transport)?;
        Ok((account, Some(creds)))
    }

    /// Issues a certificate for `hosts`: the chain and the private key (PEM).
    /// Every challenge value published is withdrawn again, whatever happens.
    pub async fn issue(
        &self,
        account: &Account,
        hosts: &[String],
        dns: &impl Challenges,
    ) -> Result<(String, String), AcmeError> {
        let fail = |detail: String| AcmeError::Issuance {
            hosts: hosts.join(", "),
            detail,
        };
        let ids: Vec<Identifier> = hosts.iter().map(|h| Identifier::Dns(h.clone())).collect();
        let mut order = account
            .new_order(&NewOrder::new(&ids))
            .await
            .map_err(|e| fail(format!("the CA refused the order: {e}")))?;
        let mut published = Vec::new();
        let result = async {
            let mut authorizations = order.authorizations();
            while let Some(a) = authorizations.next().await {
                let mut authz = a.map_err(|e| fail(format!("reading an authorization: {e}")))?;
                match authz.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    s => return Err(fail(format!("an authorization is {s:?}"))),
                }
                let kind = dns.kind();
                let mut ch = authz
                    .challenge(kind.clone())
                    .ok_or_else(|| fail(format!("the CA offers no {kind:?} challenge")))?;
                let Identifier::Dns(domain) = ch.identifier().identifier.clone() else {
                    return Err(fail("an identifier is not a DNS name".into()));
                };
                let (name, value) = match kind {
                    ChallengeType::Http01 => (ch.token.clone(), ch.key_authorization().as_str().to_owned()),
                    _ => (format!("_acme-challenge.{domain}"), ch.key_authorization().dns_value()),
                };
                dns.publish(&name, &value)
                    .await
                    .map_err(|e| fail(format!("publishing {name}: {e}")))?;
                published.push((name, value));
                ch.set_ready()
                    .await
                    .map_err(|e| fail(format!("the challenge of {domain}: {e}")))?;
            }
            let wait = RetryPolicy::new()
                .initial_delay(Duration::from_millis(250))
                .backoff(1.0)
                .timeout(Duration::from_secs(self.config.timeout_secs));
            match order.poll_ready(&wait).await {
                Ok(OrderStatus::Ready) => {}
                Ok(status) => {
                    return Err(fail(format!(
                        "the order is {status:?}: the CA could not validate the challenges"
                    )));
                }
                Err(e) => return Err(fail(format!("the order failed: {e}"))),
            }
            let key = order.finalize().await.map_err(|e| fail(format!("finalizing: {e}")))?;
            let chain = order
                .poll_certificate(&wait)
                .await
                .map_err(|e| fail(format!("downloading the certificate: {e}")))?;
            Ok((chain, key))
        }
        .await;
        for (name, value) in &published {
            if let Err(e) = dns.withdraw(name, value).await {
                tracing::warn!(record = %name, error = %e, "could not withdraw an ACME challenge record");
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_decided_by_names_and_remaining_lifetime() {
        let hosts = vec!["www.example.test".to_owned()];
        let day = Duration::from_secs(86_400);
        assert_eq!(
            needs_issuing(None, &hosts, day, 0).as_deref(),
            Some("no certificate yet")
        );
        assert!(
            needs_issuing(Some(b"junk"), &hosts, day, 0)
                .unwrap()
                .contains("holds no certificate")
        );
    }
}
