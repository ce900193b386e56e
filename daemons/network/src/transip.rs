//! TransIP's REST API v6, the parts DNS needs: the key-pair login (a token
//! requested with a body signed by the account's private key), a domain's DNS
//! entries and its nameservers.

use std::time::{Duration, Instant};

use base64::Engine;
use baton_shared::https::{Answer, Http};
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA512, RsaKeyPair};
use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Mutex;

/// One DNS entry as TransIP models it (`expire` is the TTL in seconds).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DnsEntry {
    pub name: String,
    pub expire: u32,
    #[serde(rename = "type")]
    pub kind: String,
    pub content: String,
}

/// A nameserver of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nameserver {
    pub hostname: String,
    #[serde(default)]
    pub ipv4: String,
    #[serde(default)]
    pub ipv6: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TransipError {
    #[error("the TransIP private key {0}")]
    Key(String),
    #[error("TransIP is unreachable ({what}): {detail}")]
    Transport { what: String, detail: String },
    #[error("TransIP refused {what}: HTTP {status}: {message}")]
    Status { what: String, status: u16, message: String },
    #[error("TransIP's answer to {what} is not what its API documents: {detail}")]
    Shape { what: String, detail: String },
}

impl TransipError {
    /// Transient: unreachable, rate-limited or failing on its side.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

struct Token {
    value: String,
    until: Instant,
}

/// A TransIP account's API client.
pub struct Transip {
    http: Http,
    api_url: String,
    login: String,
    key: RsaKeyPair,
    token: Mutex<Option<Token>>,
}

/// How long a token is asked for; it is renewed a minute before.
const TOKEN_LIFETIME: Duration = Duration::from_secs(30 * 60);

impl Transip {
    /// `private_key_pem`: the key pair TransIP's control panel generates
    /// (PKCS#8, `BEGIN PRIVATE KEY`).
    pub fn new(api_url: &str, login: &str, private_key_pem: &[u8], timeout: Duration) -> Result<Self, TransipError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(private_key_pem)
            .map_err(|e| TransipError::Key(format!("is not a PKCS#8 PEM key (BEGIN PRIVATE KEY): {e}")))?;
        let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|e| TransipError::Key(format!("is not an RSA key ring can sign with: {e}")))?;
        Ok(Self {
            http: Http::new(timeout).map_err(|detail| TransipError::Transport {
                what: "TLS setup".into(),
                detail,
            })?,
            api_url: api_url.trim_end_matches('/').to_owned(),
            login: login.to_owned(),
            key,
            token: Mutex::new(None),
        })
    }

    /// The `Signature` header for a body: RSA PKCS#1 v1.5 over SHA-512, base64.
    pub fn sign(&self, body: &[u8]) -> Result<String, TransipError> {
        let mut sig = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA512, &SystemRandom::new(), body, &mut sig)
            .map_err(|_| TransipError::Key("could not sign the login request".into()))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(sig))
    }

    async fn token(&self) -> Result<String, TransipError> {
        let mut token = self.token.lock().await;
        if let Some(t) = token.as_ref().filter(|t| t.until > Instant::now()) {
            return Ok(t.value.clone());
        }
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let body = serde_json::to_vec(&json!({
            "login": self.login,
            "nonce": nonce,
            "read_only": false,
            "expiration_time": "30 minutes",
            "label": format!("baton-network-{nonce}"),
            "global_key": true,
        }))
        .unwrap_or_default();
        let signature = self.sign(&body)?;
        let answer = self
            .send_raw(
                "POST",
                "/auth",
                &[("Content-Type", "application/json"), ("Signature", &signature)],
                body,
                "the login",
            )
            .await?;
        #[derive(Deserialize)]
        struct Auth {
            token: String,
        }
        let auth: Auth = serde_json::from_slice(&answer.body).map_err(|e| TransipError::Shape {
            what: "the login".into(),
            detail: e.to_string(),
        })?;
        *token = Some(Token {
            value: auth.token.clone(),
            until: Instant::now() + TOKEN_LIFETIME - Duration::from_secs(60),
        });
        Ok(auth.token)
    }

    async fn send_raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
        what: &str,
    ) -> Result<Answer, TransipError> {
        let url = format!("{}{path}", self.api_url);
        let answer = self
            .http
            .send(method, &url, headers, body)
            .await
            .map_err(|detail| TransipError::Transport {
                what: what.to_owned(),
                detail,
            })?;
        if !(200..300).contains(&answer.status) {
            #[derive(Deserialize)]
            struct Failure {
                error: String,
            }
            let message = serde_json::from_slice::<Failure>(&answer.body)
                .map(|f| f.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&answer.body).chars().take(300).collect());
            return Err(TransipError::Status {
                what: what.to_owned(),
                status: answer.status,
                message,
            });
        }
        Ok(answer)
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        what: &str,
    ) -> Result<Answer, TransipError> {
        let token = self.token().await?;
        let auth = format!("Bearer {token}");
        let mut headers = vec![("Authorization", auth.as_str())];
        let body = match body {
            Some(b) => {
                headers.push(("Content-Type", "application/json"));
                serde_json::to_vec(&b).unwrap_or_default()
            }
            None => Vec::new(),
        };
        let result = self.send_raw(method, path, &headers, body, what).await;
        if let Err(TransipError::Status { status: 401, .. }) = &result {
            // The token was revoked or expired early: log in again next time.
            *self.token.lock().await = None;
        }
        result
    }

    /// Every DNS entry of `domain`.
    pub async fn entries(&self, domain: &str) -> Result<Vec<DnsEntry>, TransipError> {
        let what = format!("reading the DNS entries of {domain}");
        let answer = self.send("GET", &format!("/domains/{domain}/dns"), None, &what).await?;
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Entries {
            dns_entries: Vec<DnsEntry>,
        }
        let e: Entries = serde_json::from_slice(&answer.body).map_err(|e| TransipError::Shape {
            what,
            detail: e.to_string(),
        })?;
        Ok(e.dns_entries)
    }

    /// Adds one entry.
    pub async fn add(&self, domain: &str, entry: &DnsEntry) -> Result<(), TransipError> {
        let what = format!("adding {} {} {} to {domain}", entry.kind, entry.name, entry.content);
        self.send(
            "POST",
            &format!("/domains/{domain}/dns"),
            Some(json!({"dnsEntry": entry})),
            &what,
        )
        .await
        .map(drop)
    }

    /// Changes the content of the one entry with `entry`'s name, TTL and type.
    pub async fn update(&self, domain: &str, entry: &DnsEntry) -> Result<(), TransipError> {
        let what = format!(
            "changing {} {} to {} in {domain}",
            entry.kind, entry.name, entry.content
        );
        self.send(
            "PATCH",
            &format!("/domains/{domain}/dns"),
            Some(json!({"dnsEntry": entry})),
            &what,
        )
        .await
        .map(drop)
    }

    /// Removes one entry (matched by all its fields).
    pub async fn remove(&self, domain: &str, entry: &DnsEntry) -> Result<(), TransipError> {
        let what = format!("removing {} {} {} from {domain}", entry.kind, entry.name, entry.content);
        match self
            .send(
                "DELETE",
                &format!("/domains/{domain}/dns"),
                Some(json!({"dnsEntry": entry})),
                &what,
            )
            .await
        {
            // The entry is gone already (a redelivered job, or removed by
            // hand): fine. A missing domain is an error.
            Err(TransipError::Status {
                status: 404, message, ..
            }) if !message.starts_with("Domain with name") => Ok(()),
            other => other.map(drop),
        }
    }

    /// The nameservers of `domain`.
    pub async fn nameservers(&self, domain: &str) -> Result<Vec<Nameserver>, TransipError> {
        let what = format!("reading the nameservers of {domain}");
        let answer = self
            .send("GET", &format!("/domains/{domain}/nameservers"), None, &what)
            .await?;
        #[derive(Deserialize)]
        struct Servers {
            nameservers: Vec<Nameserver>,
        }
        let s: Servers = serde_json::from_slice(&answer.body).map_err(|e| TransipError::Shape {
            what,
            detail: e.to_string(),
        })?;
        Ok(s.nameservers)
    }
}
