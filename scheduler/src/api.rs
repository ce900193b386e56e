//! The scheduler's HTTP API: runs, rollback, the CI webhook, health and readiness.
//!
//! Every `/v1` route needs a bearer token. Tokens are configured by their
//! SHA-256 only (so config files and memory dumps hold no usable token) and
//! compared in constant time. Roles: `viewer` reads; `operator` also rolls back;
//! `approver` also approves (gates come later). The CI webhook authenticates by
//! an HMAC-SHA256 of the raw body instead. Errors are JSON `{code, message}`,
//! never a stack trace, and bodies are limited in size.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use baton_shared::amqp::Broker;
use baton_shared::protocol::{MergeEvent, Message};
use baton_shared::secret::Secret;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::pipeline::Pipeline;
use crate::planner;
use crate::service::Relay;
use crate::store::{self, Ingested, Store, StoreError};

/// API settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ApiConfig {
    /// Address to listen on; empty disables the API.
    pub listen: String,
    /// Bearer tokens, by SHA-256 (`baton token new` prints an entry).
    pub tokens: Vec<TokenEntry>,
    /// Shared secret for the CI webhook's HMAC-SHA256 signature (by reference: `file:` or `env:`).
    pub webhook_secret: Option<Secret<String>>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".to_owned(),
            tokens: Vec::new(),
            webhook_secret: None,
            max_body_bytes: 256 * 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenEntry {
    /// Who holds the token, for the audit log.
    pub name: String,
    pub role: Role,
    /// Hex SHA-256 of the token.
    pub sha256: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Approver,
}

impl Role {
    fn allows(self, needed: Role) -> bool {
        self == needed || needed == Role::Viewer
    }
}

impl ApiConfig {
    pub fn validate(&self) -> Result<(), baton_shared::config::ConfigError> {
        use baton_shared::config::ConfigError;
        if !self.listen.is_empty() && self.listen.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::invalid(
                "api.listen",
                format!("{:?} is not host:port", self.listen),
            ));
        }
        for t in &self.tokens {
            if t.sha256.len() != 64 || hex::decode(&t.sha256).is_err() {
                return Err(ConfigError::invalid(
                    "api.tokens",
                    format!("token {:?}: sha256 must be 64 hex characters", t.name),
                ));
            }
        }
        if self.max_body_bytes < 1024 {
            return Err(ConfigError::invalid("api.max_body_bytes", "must be at least 1024"));
        }
        Ok(())
    }
}

/// A new random token and the config entry that admits it.
pub fn new_token(name: &str, role: Role) -> (String, TokenEntry) {
    let raw: [u8; 32] = rand::random();
    let token = format!("baton_{}", hex::encode(raw));
    let entry = TokenEntry {
        name: name.to_owned(),
        role,
        sha256: hex::encode(Sha256::digest(token.as_bytes())),
    };
    (token, entry)
}

/// Equal-length comparison whose time does not depend on where bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

struct AppState {
    store: Store,
    broker: Broker,
    relay: Relay,
    pipeline: Arc<Pipeline>,
    tokens: Vec<(TokenEntry, Vec<u8>)>,
    webhook_secret: Option<Secret<String>>,
}

/// An API error: a status, a stable code and a message.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"code": self.code, "message": self.message}))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(run) => Self::new(StatusCode::NOT_FOUND, "not_found", format!("run {run} not found")),
            e @ (StoreError::Engine(_) | StoreError::Locked { .. }) => {
                Self::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            StoreError::MergeGate(reason) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "merge_gate", reason),
            StoreError::Decision(e) => {
                use crate::gates::DecisionError as D;
                let (status, code) = match &e {
                    D::NoSuchStep { .. } => (StatusCode::NOT_FOUND, "not_found"),
                    D::SelfApproval { .. } => (StatusCode::FORBIDDEN, "four_eyes"),
                    D::PlanHash { .. } => (StatusCode::CONFLICT, "plan_hash_mismatch"),
                    D::NotAwaiting { .. } | D::AlreadyApproved { .. } => (StatusCode::CONFLICT, "conflict"),
                };
                Self::new(status, code, e.to_string())
            }
            e @ StoreError::NoOpenIncident(_) => Self::new(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            e if e.is_unavailable() => {
                tracing::warn!(error = %e, "database unavailable");
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "database unavailable")
            }
            e => {
                tracing::error!(error = %e, "api request failed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; see the scheduler log",
                )
            }
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

impl AppState {
    /// The caller's token entry, if it holds at least `needed`.
    fn authorize(&self, headers: &HeaderMap, needed: Role) -> ApiResult<&TokenEntry> {
        let presented = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    "a bearer token is required",
                )
            })?;
        let digest = Sha256::digest(presented.trim().as_bytes());
        // Check every entry, so the time taken does not reveal which one matched.
        let mut found = None;
        for (entry, hash) in &self.tokens {
            if constant_time_eq(hash, &digest) && found.is_none() {
                found = Some(entry);
            }
        }
        let entry =
            found.ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", "unknown bearer token"))?;
        if !entry.role.allows(needed) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("role {:?} may not do this; it needs {:?}", entry.role, needed),
            ));
        }
        Ok(entry)
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: &ApiConfig,
    store: Store,
    broker: Broker,
    relay: Relay,
    pipeline: Arc<Pipeline>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let tokens = cfg
        .tokens
        .iter()
        .map(|t| (t.clone(), hex::decode(&t.sha256).unwrap_or_default()))
        .collect();
    let state = Arc::new(AppState {
        store,
        broker,
        relay,
        pipeline,
        tokens,
        webhook_secret: cfg.webhook_secret.clone(),
    });
    axum::serve(listener, router(state, cfg.max_body_bytes))
        .with_graceful_shutdown(shutdown)
        .await
}

fn router(state: Arc<AppState>, max_body: usize) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/runs", get(list_runs))
        .route("/v1/runs/{id}", get(show_run))
        .route("/v1/runs/{id}/rollback", post(rollback))
        .route("/v1/webhooks/ci", post(ci_webhook))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    let db = sqlx::query("select 1").execute(s.store.pool()).await.is_ok();
    let broker = s.broker.is_connected();
    let status = if db && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"database": db, "broker": broker}))).into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    match crate::metrics::render(s.store.pool(), &s.broker, &s.pipeline).await {
        Ok(text) => ([("content-type", "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct RunFilter {
    status: Option<String>,
    environment: Option<String>,
    service: Option<String>,
    limit: Option<i64>,
}

async fn list_runs(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(f): Query<RunFilter>,
) -> ApiResult<Json<Vec<store::RunLine>>> {
    s.authorize(&headers, Role::Viewer)?;
    let limit = f.limit.unwrap_or(50).clamp(1, 1000);
    let runs = store::list_runs(s.store.pool(), 1000).await?;
    let runs = runs
        .into_iter()
        .filter(|r| f.status.as_ref().is_none_or(|v| &r.status == v))
        .filter(|r| f.environment.as_ref().is_none_or(|v| &r.environment == v))
        .filter(|r| f.service.as_ref().is_none_or(|v| &r.service == v))
        .take(limit as usize)
        .collect();
    Ok(Json(runs))
}

async fn show_run(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<store::RunView>> {
    s.authorize(&headers, Role::Viewer)?;
    let id = parse_run_id(&id)?;
    let view = store::run_view(s.store.pool(), id)
        .await?
        .ok_or(StoreError::NotFound(id))?;
    Ok(Json(view))
}

fn parse_run_id(id: &str) -> ApiResult<Uuid> {
    id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{id:?} is not a run id"),
        )
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    reason: String,
}

async fn rollback(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    let who = s.authorize(&headers, Role::Operator)?.name.clone();
    let id = parse_run_id(&id)?;
    let req: RollbackRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("invalid body: {e}")))?;
    if req.reason.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "reason must not be empty",
        ));
    }
    let out = s
        .store
        .request_rollback(id, &format!("{} (by {who})", req.reason))
        .await?;
    s.relay.send(out);
    Ok(Json(json!({"run_id": id, "rollback": "requested"})))
}

/// The CI webhook: `X-Baton-Signature: sha256=<hex HMAC-SHA256 of the raw body>`.
async fn ci_webhook(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> ApiResult<Response> {
    let secret = s.webhook_secret.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "the CI webhook is not configured (api.webhook_secret)",
        )
    })?;
    let given = headers
        .get("x-baton-signature")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("sha256="))
        .and_then(|v| hex::decode(v).ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "X-Baton-Signature: sha256=<hex> is required",
            )
        })?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()).expect("hmac takes any key length");
    mac.update(&body);
    if mac.verify_slice(&given).is_err() {
        let _ = s
            .store
            .record(None, "webhook_refused", json!({"reason": "bad HMAC signature"}))
            .await;
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "signature does not match the body",
        ));
    }
    let event =
        MergeEvent::parse(&body).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?;
    let plan = planner::plan(&event, &s.pipeline)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unplannable", e.to_string()))?;
    let (ingested, out) = s.store.ingest(&event, &plan).await?;
    s.relay.send(out);
    let (status, id, created) = match ingested {
        Ingested::Created(id) => (StatusCode::CREATED, id, true),
        Ingested::Duplicate(id) => (StatusCode::OK, id, false),
    };
    Ok((
        status,
        Json(json!({"run_id": id, "created": created, "plan_hash": plan.hash})),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_for_reading_only() {
        assert!(Role::Operator.allows(Role::Viewer));
        assert!(Role::Approver.allows(Role::Viewer));
        assert!(!Role::Viewer.allows(Role::Operator));
        assert!(!Role::Approver.allows(Role::Operator));
        assert!(!Role::Operator.allows(Role::Approver));
    }

    #[test]
    fn new_tokens_match_their_entry_and_compare_in_constant_time() {
        let (token, entry) = new_token("alice", Role::Operator);
        assert_eq!(hex::encode(Sha256::digest(token.as_bytes())), entry.sha256);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
