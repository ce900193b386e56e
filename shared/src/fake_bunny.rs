//! A bunny.net stand-in at its network boundary, for tests and the demo
//! (feature `testing`): no bunny.net is reachable from here, so this speaks its
//! documented HTTP APIs on three loopback listeners.
//!
//! - **Edge Storage** (`AccessKey`: the storage zone's password):
//!   `PUT /{zone}/{path}` (optional `Checksum`, uppercase SHA-256 hex, checked;
//!   `Override-Content-Type` or `Content-Type`; 201 `{"HttpCode":201,"Message":"File uploaded."}`),
//!   `GET /{zone}/{path}` (404 `{"HttpCode":404,"Message":"Object Not Found"}`),
//!   `GET /{zone}/{dir}/` (a listing: `ObjectName`, `Length`, `Checksum`,
//!   `IsDirectory`, `ContentType`, …; a missing directory lists empty),
//!   `DELETE /{zone}/{path}` (200, or 404).
//! - **Core API** (`AccessKey`: the account key): `GET /pullzone/{id}`,
//!   `POST /pullzone/{id}` (a partial settings body, 200 with the zone),
//!   `POST /pullzone/{id}/edgerules/addOrUpdate` (201 with the saved rule; an
//!   unknown action or trigger type is 400 with `ErrorKey`, `Field`, `Message`),
//!   `DELETE /pullzone/{id}/edgerules/{guid}` (204), `POST /purge?url=` (200).
//!   Errors are `{"ErrorKey","Field","Message"}`; a wrong key is 401.
//! - **The edge**: `GET /{path}` serves the pull zone's storage through a cache
//!   (`CDN-Cache: HIT` or `MISS`, `Server: BunnyCDN-…`), with the zone's
//!   `SetResponseHeader` edge rules applied (triggers `Url` and `UrlExtension`)
//!   and `Cache-Control: public, max-age=180` otherwise. A purge drops the URL
//!   from the cache, unless the test made purges lose their effect
//!   ([`FakeBunny::ignore_purges`]), which is how "cache invalidation
//!   incomplete" looks from outside.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use sha2::Digest;

/// One pull zone and the storage zone it serves.
#[derive(Debug, Clone)]
pub struct ZoneSpec {
    pub pull_zone_id: u64,
    pub storage_zone: String,
    pub storage_password: String,
}

#[derive(Debug, Clone)]
struct Stored {
    bytes: Vec<u8>,
    content_type: String,
}

#[derive(Default)]
struct Inner {
    api_key: String,
    zones: Vec<ZoneSpec>,
    files: BTreeMap<(String, String), Stored>,
    pull_zones: BTreeMap<u64, Value>,
    cache: BTreeMap<String, (Stored, Vec<(String, String)>)>,
    ignore_purges: bool,
    purged: Vec<String>,
}

type Shared = Arc<Mutex<Inner>>;

/// The running fake; its listeners stop when it is dropped.
pub struct FakeBunny {
    inner: Shared,
    pub api_url: String,
    pub storage_url: String,
    pub edge_url: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for FakeBunny {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

const TRIGGER_TYPES: u64 = 13;
const ACTION_TYPES: u64 = 34;

fn pull_zone(spec: &ZoneSpec) -> Value {
    json!({
        "Id": spec.pull_zone_id, "Name": format!("{}-pz", spec.storage_zone), "OriginType": 2,
        "StorageZoneId": spec.pull_zone_id + 1000, "Enabled": true, "Suspended": false,
        // A new pull zone routes everywhere, without a shield: the daemon
        // must notice.
        "EnableGeoZoneUS": true, "EnableGeoZoneEU": true, "EnableGeoZoneASIA": true,
        "EnableGeoZoneSA": true, "EnableGeoZoneAF": true,
        "EnableOriginShield": false, "OriginShieldZoneCode": "IL",
        "CacheControlMaxAgeOverride": -1, "Hostnames": [], "EdgeRules": [],
    })
}

impl FakeBunny {
    /// Starts the three listeners on loopback ports.
    pub async fn start(api_key: &str, zones: Vec<ZoneSpec>) -> Self {
        let mut inner = Inner {
            api_key: api_key.to_owned(),
            ..Inner::default()
        };
        for z in &zones {
            inner.pull_zones.insert(z.pull_zone_id, pull_zone(z));
        }
        inner.zones = zones;
        let inner: Shared = Arc::new(Mutex::new(inner));
        let api = Router::new()
            .route("/pullzone/{id}", get(get_zone).post(update_zone))
            .route("/pullzone/{id}/edgerules/addOrUpdate", post(add_rule))
            .route("/pullzone/{id}/edgerules/{guid}", axum::routing::delete(delete_rule))
            .route("/purge", post(purge))
            .with_state(inner.clone());
        let storage = Router::new()
            .route(
                "/{zone}/{*path}",
                get(storage_get).put(storage_put).delete(storage_delete),
            )
            .with_state(inner.clone());
        let edge = Router::new().fallback(edge_get).with_state(inner.clone());
        let mut tasks = Vec::new();
        let mut urls = Vec::new();
        for app in [api, storage, edge] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            urls.push(format!("http://{}", listener.local_addr().expect("addr")));
            tasks.push(tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }));
        }
        Self {
            inner,
            api_url: urls[0].clone(),
            storage_url: urls[1].clone(),
            edge_url: urls[2].clone(),
            tasks,
        }
    }

    /// From now on purges answer 200 and change nothing.
    pub fn ignore_purges(&self, ignore: bool) {
        self.inner.lock().unwrap().ignore_purges = ignore;
    }

    /// The pull zone as the API would return it.
    pub fn pull_zone(&self, id: u64) -> Value {
        self.inner.lock().unwrap().pull_zones[&id].clone()
    }

    /// Sets pull zone settings directly (as someone in bunny's panel would).
    pub fn set_zone(&self, id: u64, settings: Value) {
        let mut g = self.inner.lock().unwrap();
        let zone = g.pull_zones.get_mut(&id).expect("a pull zone");
        for (k, v) in settings.as_object().into_iter().flatten() {
            zone[k] = v.clone();
        }
    }

    /// A stored file's bytes.
    pub fn file(&self, zone: &str, path: &str) -> Option<Vec<u8>> {
        let g = self.inner.lock().unwrap();
        g.files
            .get(&(zone.to_owned(), path.trim_start_matches('/').to_owned()))
            .map(|s| s.bytes.clone())
    }

    /// Puts a file as someone else would (bypassing the API).
    pub fn put_file(&self, zone: &str, path: &str, bytes: &[u8], content_type: &str) {
        self.inner.lock().unwrap().files.insert(
            (zone.to_owned(), path.trim_start_matches('/').to_owned()),
            Stored {
                bytes: bytes.to_vec(),
                content_type: content_type.to_owned(),
            },
        );
    }

    /// URLs purged so far.
    pub fn purged(&self) -> Vec<String> {
        self.inner.lock().unwrap().purged.clone()
    }
}

fn core_error(status: StatusCode, key: &str, field: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"ErrorKey": key, "Field": field, "Message": message})),
    )
        .into_response()
}

fn storage_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"HttpCode": status.as_u16(), "Message": message})),
    )
        .into_response()
}

fn authorized(headers: &HeaderMap, key: &str) -> bool {
    headers.get("AccessKey").and_then(|v| v.to_str().ok()) == Some(key)
}

macro_rules! core_auth {
    ($state:expr, $headers:expr) => {
        if !authorized(&$headers, &$state.lock().unwrap().api_key) {
            return core_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "AccessKey",
                "Authorization has been denied for this request.",
            );
        }
    };
}

async fn get_zone(State(s): State<Shared>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    core_auth!(s, headers);
    match s.lock().unwrap().pull_zones.get(&id) {
        Some(z) => axum::Json(z.clone()).into_response(),
        None => core_error(
            StatusCode::NOT_FOUND,
            "pullZone.not_found",
            "PullZone",
            "The requested Pull Zone was not found",
        ),
    }
}

async fn update_zone(State(s): State<Shared>, headers: HeaderMap, Path(id): Path<u64>, body: Bytes) -> Response {
    core_auth!(s, headers);
    let Ok(Value::Object(settings)) = serde_json::from_slice::<Value>(&body) else {
        return core_error(StatusCode::BAD_REQUEST, "validation", "body", "The request is invalid.");
    };
    let mut g = s.lock().unwrap();
    let Some(zone) = g.pull_zones.get_mut(&id) else {
        return core_error(
            StatusCode::NOT_FOUND,
            "pullZone.not_found",
            "PullZone",
            "The requested Pull Zone was not found",
        );
    };
    for (k, v) in settings {
        if matches!(k.as_str(), "Id" | "Name" | "EdgeRules" | "Hostnames") {
            continue;
        }
        if k == "OriginShieldZoneCode" && !matches!(v.as_str(), Some("FR" | "IL")) {
            return core_error(
                StatusCode::BAD_REQUEST,
                "pullZone.validation",
                "OriginShieldZoneCode",
                "The origin shield zone code is invalid.",
            );
        }
        zone[k.as_str()] = v;
    }
    axum::Json(zone.clone()).into_response()
}

async fn add_rule(State(s): State<Shared>, headers: HeaderMap, Path(id): Path<u64>, body: Bytes) -> Response {
    core_auth!(s, headers);
    let Ok(mut rule) = serde_json::from_slice::<Value>(&body) else {
        return core_error(StatusCode::BAD_REQUEST, "validation", "body", "The request is invalid.");
    };
    let action = rule.get("ActionType").and_then(Value::as_u64);
    if action.is_none_or(|a| a > ACTION_TYPES) {
        return core_error(
            StatusCode::BAD_REQUEST,
            "edgerule.validation",
            "ActionType",
            "The action type is invalid.",
        );
    }
    for t in rule.get("Triggers").and_then(Value::as_array).into_iter().flatten() {
        if t.get("Type").and_then(Value::as_u64).is_none_or(|t| t > TRIGGER_TYPES) {
            return core_error(
                StatusCode::BAD_REQUEST,
                "edgerule.validation",
                "Triggers.Type",
                "The trigger type is invalid.",
            );
        }
    }
    let mut g = s.lock().unwrap();
    let Some(zone) = g.pull_zones.get_mut(&id) else {
        return core_error(
            StatusCode::NOT_FOUND,
            "pullZone.not_found",
            "PullZone",
            "The requested Pull Zone was not found",
        );
    };
    let guid = match rule.get("Guid").and_then(Value::as_str) {
        Some(g) if !g.is_empty() => g.to_owned(),
        _ => uuid::Uuid::new_v4().to_string(),
    };
    rule["Guid"] = json!(guid);
    let rules = zone["EdgeRules"].as_array_mut().expect("rules");
    match rules.iter_mut().find(|r| r["Guid"] == json!(guid)) {
        Some(existing) => *existing = rule.clone(),
        None => rules.push(rule.clone()),
    }
    (StatusCode::CREATED, axum::Json(rule)).into_response()
}

async fn delete_rule(State(s): State<Shared>, headers: HeaderMap, Path((id, guid)): Path<(u64, String)>) -> Response {
    core_auth!(s, headers);
    let mut g = s.lock().unwrap();
    let Some(zone) = g.pull_zones.get_mut(&id) else {
        return core_error(
            StatusCode::NOT_FOUND,
            "pullZone.not_found",
            "PullZone",
            "The requested Pull Zone was not found",
        );
    };
    let rules = zone["EdgeRules"].as_array_mut().expect("rules");
    let before = rules.len();
    rules.retain(|r| r["Guid"] != json!(guid));
    if rules.len() == before {
        return core_error(
            StatusCode::NOT_FOUND,
            "edgerule.not_found",
            "EdgeRule",
            "The requested Edge Rule was not found",
        );
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn purge(State(s): State<Shared>, headers: HeaderMap, Query(q): Query<BTreeMap<String, String>>) -> Response {
    core_auth!(s, headers);
    let Some(url) = q.get("url") else {
        return core_error(
            StatusCode::BAD_REQUEST,
            "purge.validation",
            "url",
            "The url is required.",
        );
    };
    let mut g = s.lock().unwrap();
    g.purged.push(url.clone());
    if !g.ignore_purges {
        let path = url
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('/'))
            .map(|(_, p)| format!("/{p}"))
            .unwrap_or_default();
        g.cache.remove(&path);
    }
    StatusCode::OK.into_response()
}

fn storage_zone<'a>(g: &'a Inner, zone: &str) -> Option<&'a ZoneSpec> {
    g.zones.iter().find(|z| z.storage_zone == zone)
}

fn upper_sha(bytes: &[u8]) -> String {
    hex::encode_upper(sha2::Sha256::digest(bytes))
}

async fn storage_put(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path((zone, path)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let mut g = s.lock().unwrap();
    let ok = storage_zone(&g, &zone).is_some_and(|z| authorized(&headers, &z.storage_password));
    if !ok {
        return storage_error(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    if path.is_empty() || path.ends_with('/') || path.split('/').any(|s| s == "..") {
        return storage_error(StatusCode::BAD_REQUEST, "Invalid path");
    }
    if let Some(sum) = headers.get("Checksum").and_then(|v| v.to_str().ok())
        && sum != upper_sha(&body)
    {
        return storage_error(StatusCode::BAD_REQUEST, "Checksum does not match the uploaded content");
    }
    let content_type = ["Override-Content-Type", "Content-Type"]
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        .unwrap_or("application/octet-stream")
        .to_owned();
    g.files.insert(
        (zone, path),
        Stored {
            bytes: body.to_vec(),
            content_type,
        },
    );
    (
        StatusCode::CREATED,
        axum::Json(json!({"HttpCode": 201, "Message": "File uploaded."})),
    )
        .into_response()
}

async fn storage_get(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path((zone, path)): Path<(String, String)>,
) -> Response {
    let g = s.lock().unwrap();
    let ok = storage_zone(&g, &zone).is_some_and(|z| authorized(&headers, &z.storage_password));
    if !ok {
        return storage_error(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    if path.is_empty() || path.ends_with('/') {
        // A listing: the directory's files and subdirectories.
        let dir = path.clone();
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for ((z, p), f) in &g.files {
            let Some(rest) = p.strip_prefix(&dir).filter(|_| *z == zone) else {
                continue;
            };
            let (name, is_dir) = match rest.split_once('/') {
                Some((d, _)) => (d.to_owned(), true),
                None => (rest.to_owned(), false),
            };
            if !seen.insert(name.clone()) {
                continue;
            }
            out.push(json!({
                "Guid": uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, p.as_bytes()).to_string(),
                "StorageZoneName": zone, "Path": format!("/{zone}/{dir}"), "ObjectName": name,
                "Length": if is_dir { 0 } else { f.bytes.len() }, "IsDirectory": is_dir,
                "LastChanged": "2026-12-06T12:00:00.000", "DateCreated": "2026-12-06T12:00:00.000",
                "ServerId": 1, "ArrayNumber": 0, "UserId": "fake", "StorageZoneId": 1,
                "ContentType": if is_dir { String::new() } else { f.content_type.clone() },
                "Checksum": if is_dir { Value::Null } else { json!(upper_sha(&f.bytes)) },
                "ReplicatedZones": "SE",
            }));
        }
        return axum::Json(Value::Array(out)).into_response();
    }
    match g.files.get(&(zone, path)) {
        Some(f) => {
            let mut r = f.bytes.clone().into_response();
            if let Ok(v) = HeaderValue::from_str(&f.content_type) {
                r.headers_mut().insert("content-type", v);
            }
            r
        }
        None => storage_error(StatusCode::NOT_FOUND, "Object Not Found"),
    }
}

async fn storage_delete(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path((zone, path)): Path<(String, String)>,
) -> Response {
    let mut g = s.lock().unwrap();
    let ok = storage_zone(&g, &zone).is_some_and(|z| authorized(&headers, &z.storage_password));
    if !ok {
        return storage_error(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    match g.files.remove(&(zone, path)) {
        Some(_) => axum::Json(json!({"HttpCode": 200, "Message": "File deleted successfuly."})).into_response(),
        None => storage_error(StatusCode::NOT_FOUND, "Object Not Found"),
    }
}

/// `*` matches any run of characters.
fn wildcard(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let mut rest = text;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else { return false };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    true
}

fn rule_headers(zone: &Value, url: &str, path: &str) -> Vec<(String, String)> {
    let ext = path.rsplit_once('.').map(|(_, e)| e.to_lowercase()).unwrap_or_default();
    let mut out = Vec::new();
    for rule in zone["EdgeRules"].as_array().into_iter().flatten() {
        if rule["Enabled"] != json!(true) || rule["ActionType"] != json!(5) {
            continue;
        }
        let hits: Vec<bool> = rule["Triggers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                let patterns: Vec<&str> = t["PatternMatches"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let matched: Vec<bool> = patterns
                    .iter()
                    .map(|p| match t["Type"].as_u64() {
                        Some(0) => wildcard(p, url),
                        Some(3) => p.trim_start_matches('.').eq_ignore_ascii_case(&ext),
                        _ => false,
                    })
                    .collect();
                match t["PatternMatchingType"].as_u64().unwrap_or(0) {
                    1 => matched.iter().all(|m| *m),
                    2 => !matched.iter().any(|m| *m),
                    _ => matched.iter().any(|m| *m),
                }
            })
            .collect();
        let fires = match rule["TriggerMatchingType"].as_u64().unwrap_or(0) {
            1 => hits.iter().all(|h| *h),
            2 => !hits.iter().any(|h| *h),
            _ => hits.iter().any(|h| *h),
        };
        if fires
            && let (Some(name), Some(value)) = (rule["ActionParameter1"].as_str(), rule["ActionParameter2"].as_str())
        {
            out.push((name.to_owned(), value.to_owned()));
        }
    }
    out
}

async fn edge_get(State(s): State<Shared>, uri: axum::http::Uri, headers: HeaderMap) -> Response {
    let path = uri.path().to_owned();
    let mut g = s.lock().unwrap();
    let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    let url = format!("http://{host}{path}");
    let (stored, extra, hit) = match g.cache.get(&path) {
        Some((f, h)) => (f.clone(), h.clone(), true),
        None => {
            // One pull zone per fake edge: the first configured.
            let Some(spec) = g.zones.first().cloned() else {
                return StatusCode::NOT_FOUND.into_response();
            };
            let Some(f) = g
                .files
                .get(&(spec.storage_zone.clone(), path.trim_start_matches('/').to_owned()))
                .cloned()
            else {
                return (StatusCode::NOT_FOUND, [("CDN-Cache", "MISS")], "404 Not Found").into_response();
            };
            let extra = rule_headers(&g.pull_zones[&spec.pull_zone_id], &url, &path);
            g.cache.insert(path.clone(), (f.clone(), extra.clone()));
            (f, extra, false)
        }
    };
    let mut r = stored.bytes.into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&stored.content_type) {
        h.insert("content-type", v);
    }
    h.insert("cache-control", HeaderValue::from_static("public, max-age=180"));
    h.insert("server", HeaderValue::from_static("BunnyCDN-DE1-1077"));
    h.insert("cdn-cache", HeaderValue::from_static(if hit { "HIT" } else { "MISS" }));
    for (k, v) in extra {
        if let (Ok(k), Ok(v)) = (
            axum::http::HeaderName::from_bytes(k.to_lowercase().as_bytes()),
            HeaderValue::from_str(&v),
        ) {
            h.insert(k, v);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::wildcard;

    #[test]
    fn wildcards_match_as_bunny_documents() {
        assert!(wildcard(
            "https://cdn.example.com/img/*",
            "https://cdn.example.com/img/a/b.png"
        ));
        assert!(wildcard("*.js", "/app.123.js"));
        assert!(!wildcard("*.js", "/app.css"));
        assert!(wildcard("exact", "exact"));
    }
}
