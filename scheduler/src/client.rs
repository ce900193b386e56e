//! The CLI's client of the scheduler's HTTP API: operators hold an API token,
//! never database credentials (docs/architecture.md, Interfaces).

use baton_shared::secret::Secret;
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where the CLI finds the API (`[client]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// Base URL of a scheduler's API.
    pub url: String,
    /// The operator's bearer token, by reference (`env:BATON_TOKEN`, `file:/path`).
    pub token: Option<Secret<String>>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8080".to_owned(),
            token: None,
        }
    }
}

/// Why an API call failed; `is_bad_input` separates the caller's mistakes (exit 2)
/// from an unreachable or failing scheduler (exit 3).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no API token: set client.token (e.g. BATON_CLIENT__TOKEN=env:BATON_TOKEN)")]
    NoToken,
    #[error("cannot reach the scheduler API at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{message} ({status}, {code})")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("unexpected answer from {url}: {problem}")]
    Unexpected { url: String, problem: String },
}

impl ClientError {
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::NoToken => true,
            Self::Api { status, .. } => status.is_client_error(),
            _ => false,
        }
    }
}

pub struct Client {
    base: String,
    token: Secret<String>,
    http: reqwest::Client,
}

impl Client {
    pub fn new(cfg: &ClientConfig) -> Result<Self, ClientError> {
        let token = cfg.token.clone().ok_or(ClientError::NoToken)?;
        Ok(Self {
            base: cfg.url.trim_end_matches('/').to_owned(),
            token,
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .map_err(|source| ClientError::Unreachable {
                    url: cfg.url.clone(),
                    source,
                })?,
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.http.get(format!("{}{path}", self.base)), path).await
    }

    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T, ClientError> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body), path)
            .await
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder, path: &str) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let resp = req
            .bearer_auth(self.token.expose())
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|source| ClientError::Unreachable {
            url: url.clone(),
            source,
        })?;
        if !status.is_success() {
            #[derive(Deserialize)]
            struct E {
                code: String,
                message: String,
            }
            let e: E = serde_json::from_slice(&bytes).unwrap_or(E {
                code: "unknown".into(),
                message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            });
            return Err(ClientError::Api {
                status,
                code: e.code,
                message: e.message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Unexpected {
            url,
            problem: e.to_string(),
        })
    }
}
