//! bunny.net's Edge Storage and core APIs, as this daemon uses them.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use sha2::Digest;

use baton_shared::https::{Answer, Http, encode};

/// What a call to bunny.net came to when it did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum BunnyError {
    #[error("{what}: {detail}")]
    Unreachable { what: String, detail: String },
    #[error("{what}: status {status}: {message}")]
    Status { what: String, status: u16, message: String },
}

impl BunnyError {
    /// Transient: bunny.net unreachable, overloaded or failing.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Status { status, .. } => *status >= 500 || *status == 429,
        }
    }
}

/// One entry of a storage directory listing.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Listed {
    pub object_name: String,
    #[serde(default)]
    pub is_directory: bool,
    #[serde(default)]
    pub checksum: Option<String>,
}

pub struct Bunny {
    http: Http,
    api_url: String,
    api_key: String,
    storage_url: String,
}

/// The message of an error body (`Message`, with `Field` if any), or the body.
fn failure(what: String, a: &Answer) -> BunnyError {
    let message = serde_json::from_slice::<Value>(&a.body)
        .ok()
        .and_then(|v| {
            let m = v.get("Message")?.as_str()?.to_owned();
            Some(match v.get("Field").and_then(Value::as_str) {
                Some(f) if !f.is_empty() => format!("{m} ({f})"),
                _ => m,
            })
        })
        .unwrap_or_else(|| String::from_utf8_lossy(&a.body).chars().take(200).collect());
    BunnyError::Status {
        what,
        status: a.status,
        message,
    }
}

/// Uppercase hex SHA-256, as Edge Storage's `Checksum` header wants it.
pub fn checksum(bytes: &[u8]) -> String {
    hex::encode_upper(sha2::Sha256::digest(bytes))
}

impl Bunny {
    pub fn new(api_url: &str, api_key: &str, storage_url: &str, timeout: Duration) -> Result<Self, BunnyError> {
        let http = Http::new(timeout).map_err(|detail| BunnyError::Unreachable {
            what: "an HTTPS client".into(),
            detail,
        })?;
        Ok(Self {
            http,
            api_url: api_url.trim_end_matches('/').to_owned(),
            api_key: api_key.to_owned(),
            storage_url: storage_url.trim_end_matches('/').to_owned(),
        })
    }

    pub fn http(&self) -> &Http {
        &self.http
    }

    async fn send(
        &self,
        what: &str,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Answer, BunnyError> {
        self.http
            .send(method, url, headers, body)
            .await
            .map_err(|detail| BunnyError::Unreachable {
                what: what.to_owned(),
                detail,
            })
    }

    async fn storage(
        &self,
        what: &str,
        method: &str,
        zone: &str,
        path: &str,
        password: &str,
    ) -> Result<Answer, BunnyError> {
        let url = format!("{}/{zone}/{path}", self.storage_url);
        self.send(what, method, &url, &[("AccessKey", password)], Vec::new())
            .await
    }

    /// The files directly in `dir` (`""` for the zone's root; a missing
    /// directory lists empty).
    pub async fn list(&self, zone: &str, password: &str, dir: &str) -> Result<Vec<Listed>, BunnyError> {
        let dir = if dir.is_empty() {
            String::new()
        } else {
            format!("{}/", dir.trim_end_matches('/'))
        };
        let what = format!("listing {zone}/{dir}");
        let a = self.storage(&what, "GET", zone, &dir, password).await?;
        match a.status {
            200 => serde_json::from_slice(&a.body).map_err(|e| BunnyError::Unreachable {
                what,
                detail: format!("not a listing: {e}"),
            }),
            404 => Ok(Vec::new()),
            _ => Err(failure(what, &a)),
        }
    }

    /// A stored file, or `None`.
    pub async fn get(&self, zone: &str, password: &str, path: &str) -> Result<Option<Vec<u8>>, BunnyError> {
        let what = format!("reading {zone}/{path}");
        let a = self.storage(&what, "GET", zone, path, password).await?;
        match a.status {
            200 => Ok(Some(a.body.to_vec())),
            404 => Ok(None),
            _ => Err(failure(what, &a)),
        }
    }

    /// Uploads `bytes` to `path`, checked by Edge Storage against its checksum.
    pub async fn put(
        &self,
        zone: &str,
        password: &str,
        path: &str,
        bytes: &[u8],
        content_type: &str,
    ) -> Result<(), BunnyError> {
        let what = format!("uploading {zone}/{path}");
        let url = format!("{}/{zone}/{path}", self.storage_url);
        let sum = checksum(bytes);
        let headers = [
            ("AccessKey", password),
            ("Checksum", sum.as_str()),
            ("Content-Type", "application/octet-stream"),
            ("Override-Content-Type", content_type),
        ];
        let a = self.send(&what, "PUT", &url, &headers, bytes.to_vec()).await?;
        match a.status {
            200 | 201 => Ok(()),
            _ => Err(failure(what, &a)),
        }
    }

    /// Deletes `path`; gone already is fine.
    pub async fn delete(&self, zone: &str, password: &str, path: &str) -> Result<(), BunnyError> {
        let what = format!("deleting {zone}/{path}");
        let a = self.storage(&what, "DELETE", zone, path, password).await?;
        match a.status {
            200 | 204 | 404 => Ok(()),
            _ => Err(failure(what, &a)),
        }
    }

    async fn core(
        &self,
        what: &str,
        method: &str,
        path: &str,
        body: Option<&Value>,
        ok: &[u16],
    ) -> Result<Value, BunnyError> {
        let url = format!("{}{path}", self.api_url);
        let mut headers = vec![("AccessKey", self.api_key.as_str()), ("Accept", "application/json")];
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        let bytes = body
            .map(|b| serde_json::to_vec(b).unwrap_or_default())
            .unwrap_or_default();
        let a = self.send(what, method, &url, &headers, bytes).await?;
        if !ok.contains(&a.status) {
            return Err(failure(what.to_owned(), &a));
        }
        if a.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&a.body).map_err(|e| BunnyError::Unreachable {
            what: what.to_owned(),
            detail: format!("not JSON: {e}"),
        })
    }

    pub async fn pull_zone(&self, id: u64) -> Result<Value, BunnyError> {
        self.core(
            &format!("reading pull zone {id}"),
            "GET",
            &format!("/pullzone/{id}"),
            None,
            &[200],
        )
        .await
    }

    /// Updates the given settings (a partial body); the zone as it is after.
    pub async fn update_pull_zone(&self, id: u64, settings: &Value) -> Result<Value, BunnyError> {
        self.core(
            &format!("updating pull zone {id}"),
            "POST",
            &format!("/pullzone/{id}"),
            Some(settings),
            &[200, 204],
        )
        .await
    }

    /// Adds or (with its `Guid`) updates an edge rule; the rule as saved.
    pub async fn put_edge_rule(&self, id: u64, rule: &Value) -> Result<Value, BunnyError> {
        self.core(
            &format!("saving an edge rule of pull zone {id}"),
            "POST",
            &format!("/pullzone/{id}/edgerules/addOrUpdate"),
            Some(rule),
            &[200, 201],
        )
        .await
    }

    pub async fn delete_edge_rule(&self, id: u64, guid: &str) -> Result<(), BunnyError> {
        let what = format!("deleting edge rule {guid} of pull zone {id}");
        match self
            .core(
                &what,
                "DELETE",
                &format!("/pullzone/{id}/edgerules/{guid}"),
                None,
                &[200, 204],
            )
            .await
        {
            Err(BunnyError::Status { status: 404, .. }) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Purges one URL from every edge, waiting for it.
    pub async fn purge(&self, url: &str) -> Result<(), BunnyError> {
        self.core(
            &format!("purging {url}"),
            "POST",
            &format!("/purge?url={}&async=false", encode(url)),
            None,
            &[200, 204],
        )
        .await
        .map(|_| ())
    }
}
