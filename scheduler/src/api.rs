//! The scheduler's HTTP API: runs, approvals, cancel and rollback, incidents,
//! locks, a run's live events, the CI and Alertmanager webhooks, health and
//! readiness. The OpenAPI document (`scheduler/openapi.json`) is served at
//! `/openapi.json`; a test checks every route is in it.
//!
//! Every `/v1` route needs a bearer token. Tokens are configured by their
//! SHA-256 only (so config files and memory dumps hold no usable token) and
//! compared in constant time. Roles: `viewer` reads; `operator` also cancels,
//! rolls back and opens or resolves incidents (Alertmanager holds an operator
//! token); `approver` also approves and rejects held steps. The CI webhook
//! authenticates by an HMAC-SHA256 of the raw body instead. Errors are JSON
//! `{code, message}`, never a stack trace, and bodies are limited in size.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use baton_shared::amqp::Broker;
use baton_shared::protocol::{MergeEvent, Message};
use baton_shared::secret::Secret;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub use crate::config::{ApiConfig, Role, TokenEntry};
use crate::pipeline::Pipeline;
use crate::planner;
use crate::relay::Relay;
use crate::store::{self, Ingested, Store, StoreError};

mod web;

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
    alertmanager_environment: String,
    /// The OpenAPI document as served: this scheduler's environments filled in.
    openapi: String,
    /// The web view's trace link template and cookie flag.
    trace_url: String,
    secure_cookies: bool,
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
            e @ (StoreError::Engine(_) | StoreError::Locked { .. } | StoreError::InUse { .. }) => {
                Self::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            StoreError::MergeGate(reason) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "merge_gate", reason),
            e @ StoreError::Unfinished { .. } => Self::new(StatusCode::CONFLICT, "conflict", e.to_string()),
            e @ StoreError::Unplannable(_) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "unplannable", e.to_string()),
            StoreError::Decision(e) => {
                use crate::gates::DecisionError as D;
                let (status, code) = match &e {
                    D::NoSuchStep { .. } => (StatusCode::NOT_FOUND, "not_found"),
                    D::SelfApproval { .. } => (StatusCode::FORBIDDEN, "four_eyes"),
                    D::PlanHash { .. } => (StatusCode::CONFLICT, "plan_hash_mismatch"),
                    D::Subject { .. } => (StatusCode::CONFLICT, "plan_changed"),
                    D::SubjectMissing { .. } => (StatusCode::BAD_REQUEST, "subject_required"),
                    D::NotAwaiting { .. } | D::AlreadyApproved { .. } => (StatusCode::CONFLICT, "conflict"),
                };
                Self::new(status, code, e.to_string())
            }
            e @ (StoreError::NoOpenIncident(_) | StoreError::NoDeadLetter(_) | StoreError::NotLocked { .. }) => {
                Self::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            e @ StoreError::UnverifiedDeadLetter(_) => Self::new(StatusCode::CONFLICT, "unverified", e.to_string()),
            e @ StoreError::WouldBeRefused { .. } => Self::new(StatusCode::CONFLICT, "would_be_refused", e.to_string()),
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
    /// The environments incidents may name: the pipeline's, and Alertmanager's default.
    fn environments(&self) -> Vec<String> {
        let mut envs = self.pipeline.promotion.clone();
        if !envs.contains(&self.alertmanager_environment) {
            envs.push(self.alertmanager_environment.clone());
        }
        envs
    }

    fn knows_environment(&self, environment: &str) -> bool {
        self.environments().iter().any(|e| e == environment)
    }

    /// An environment an incident may name, or the error that lists them.
    fn check_environment(&self, environment: &str) -> ApiResult<()> {
        if self.knows_environment(environment) {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!(
                "environment {environment:?} is not one the pipeline deploys to ({})",
                self.environments().join(", ")
            ),
        ))
    }

    /// The caller's token entry, if it holds at least `needed`.
    fn authorize(&self, headers: &HeaderMap, needed: Role) -> ApiResult<&TokenEntry> {
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let presented = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim_start().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    "a bearer token is required",
                )
            })?;
        self.authorize_token(presented, needed)
    }

    /// The entry of a presented token (a bearer token or the web view's
    /// session), if it holds at least `needed`.
    fn authorize_token(&self, presented: &str, needed: Role) -> ApiResult<&TokenEntry> {
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
    let mut state = AppState {
        store,
        broker,
        relay,
        pipeline,
        tokens,
        webhook_secret: cfg.webhook_secret.clone(),
        alertmanager_environment: cfg.alertmanager_environment.clone(),
        openapi: String::new(),
        trace_url: cfg.trace_url.clone(),
        secure_cookies: cfg.secure_cookies,
    };
    state.openapi = served_openapi(&state.environments());
    let state = Arc::new(state);
    axum::serve(
        listener,
        router(state, cfg.max_body_bytes, cfg.alertmanager_max_body_bytes),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// The OpenAPI document, checked into the repository.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// [`OPENAPI`] with what depends on the configuration stated: the environments
/// an incident may name.
fn served_openapi(environments: &[String]) -> String {
    let mut doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
    if let Some(env) = doc.pointer_mut("/components/schemas/OpenIncident/properties/environment") {
        env["enum"] = json!(environments);
    }
    doc.to_string()
}

/// Every route: (method, path, handler). The OpenAPI test walks this list.
fn routes() -> Vec<(&'static str, &'static str, MethodRouter<Arc<AppState>>)> {
    vec![
        ("get", "/healthz", get(|| async { Json(json!({"status": "ok"})) })),
        ("get", "/readyz", get(readyz)),
        ("get", "/metrics", get(metrics)),
        (
            "get",
            "/openapi.json",
            get(
                |State(s): State<Arc<AppState>>| async move { ([("content-type", "application/json")], s.openapi.clone()) },
            ),
        ),
        ("get", "/v1/runs", get(list_runs)),
        ("get", "/v1/runs/{id}", get(show_run)),
        ("get", "/v1/runs/{id}/events", get(run_events)),
        ("post", "/v1/runs/{id}/rollback", post(rollback)),
        ("post", "/v1/runs/{id}/redeploy", post(redeploy)),
        ("post", "/v1/runs/{id}/cancel", post(cancel)),
        ("post", "/v1/runs/{id}/approve", post(approve)),
        ("post", "/v1/runs/{id}/reject", post(reject)),
        ("get", "/v1/incidents", get(list_incidents)),
        ("post", "/v1/incidents", post(open_incident)),
        ("post", "/v1/incidents/{id}/resolve", post(resolve_incident)),
        ("get", "/v1/locks", get(list_locks)),
        ("post", "/v1/locks/{service}/{environment}/release", post(release_lock)),
        ("get", "/v1/dlq", get(list_dead_letters)),
        ("post", "/v1/dlq/{id}/replay", post(replay_dead_letter)),
        ("post", "/v1/webhooks/ci", post(ci_webhook)),
        ("post", "/v1/webhooks/alertmanager", post(alertmanager_webhook)),
    ]
}

fn router(state: Arc<AppState>, max_body: usize, alertmanager_max_body: usize) -> Router {
    let mut r = Router::new();
    for (_, path, handler) in routes() {
        // Alertmanager sends a whole group at once: it has a limit of its own.
        let handler = if path == "/v1/webhooks/alertmanager" {
            handler.layer(DefaultBodyLimit::max(alertmanager_max_body))
        } else {
            handler
        };
        r = r.route(path, handler);
    }
    r.fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(state.clone(), authenticate_first))
        .layer(axum::middleware::map_response(json_errors))
        // The web view: HTML, with layers of its own (added after the API's, so
        // its errors stay pages rather than JSON).
        .merge(web::routes())
        .with_state(state)
}

/// Every `/v1/` route but the HMAC-signed CI webhook needs a known bearer
/// token: checked here, before the body or query is read, so an
/// unauthenticated request gets 401 whatever else is wrong with it. Each
/// handler still checks the role it needs.
async fn authenticate_first(
    State(s): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    if path.starts_with("/v1/")
        && path != "/v1/webhooks/ci"
        && let Err(e) = s.authorize(req.headers(), Role::Viewer)
    {
        return e.into_response();
    }
    next.run(req).await
}

/// Errors that axum's extractors answer in plain text (an oversize body, a bad
/// query string, a wrong content type) become the documented `{code, message}`.
async fn json_errors(res: Response) -> Response {
    let status = res.status();
    let json = res
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let text = axum::body::to_bytes(res.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => "bad_request",
        _ => "error",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    ApiError::new(status, code, message).into_response()
}

/// Parses a JSON body strictly, naming what is wrong.
fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> ApiResult<T> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let at = e.path().to_string();
        let problem = e.into_inner();
        let message = if at == "." {
            format!("invalid body: {problem}")
        } else {
            format!("invalid body: {at}: {problem}")
        };
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    })?;
    de.end()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("invalid body: {e}")))?;
    Ok(value)
}

fn non_empty(field: &str, value: &str) -> ApiResult<()> {
    if value.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{field} must not be empty"),
        ));
    }
    storable(field, value)
}

/// Text the scheduler stores: PostgreSQL refuses the NUL character in text
/// and JSON, so it is refused here, naming the field.
fn storable(field: &str, value: &str) -> ApiResult<()> {
    if value.contains('\0') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{field} must not contain the NUL character"),
        ));
    }
    Ok(())
}

/// A `limit` query parameter: 1 to 1000, or the error says so.
fn limit_in_range(limit: i64) -> ApiResult<i64> {
    if (1..=1000).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("limit must be from 1 to 1000, not {limit}"),
        ))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReasonRequest {
    reason: String,
}

async fn cancel(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    let who = s.authorize(&headers, Role::Operator)?.name.clone();
    let id = parse_run_id(&id)?;
    let req: ReasonRequest = body(&bytes)?;
    non_empty("reason", &req.reason)?;
    let out = s.store.cancel(id, &who, &req.reason).await?;
    s.relay.send(out);
    Ok(Json(json!({"run_id": id, "cancel": "requested"})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionRequest {
    step: String,
    /// The plan the approver looked at: approvals bind to it.
    plan_hash: String,
    /// For a step held by its blast radius, the saved Terraform plan the
    /// approver looked at: required to approve such a step, and it must be
    /// the one the step waits for.
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    comment: String,
}

async fn decide(
    s: &AppState,
    headers: &HeaderMap,
    id: &str,
    bytes: &Bytes,
    decision: crate::gates::Decision,
) -> ApiResult<Json<serde_json::Value>> {
    let who = s.authorize(headers, Role::Approver)?.name.clone();
    let id = parse_run_id(id)?;
    let req: DecisionRequest = body(bytes)?;
    non_empty("step", &req.step)?;
    non_empty("plan_hash", &req.plan_hash)?;
    if decision == crate::gates::Decision::Reject {
        non_empty("comment (why it is rejected)", &req.comment)?;
    }
    storable("comment", &req.comment)?;
    let out = s
        .store
        .decide(
            id,
            crate::gates::Ask {
                step: &req.step,
                plan_hash: &req.plan_hash,
                subject: req.subject.as_deref(),
                who: &who,
                decision,
            },
            &req.comment,
        )
        .await?;
    s.relay.send(out);
    let status = store::run_status(s.store.pool(), id).await?;
    Ok(Json(
        json!({"run_id": id, "step": req.step, "decision": decision, "by": who, "run_status": status}),
    ))
}

async fn approve(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    decide(&s, &headers, &id, &bytes, crate::gates::Decision::Approve).await
}

async fn reject(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    decide(&s, &headers, &id, &bytes, crate::gates::Decision::Reject).await
}

/// Server-sent events: every history entry of the run as it is recorded (event
/// `history`), then one `end` event with the final status when the run is over.
async fn run_events(State(s): State<Arc<AppState>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult<Response> {
    s.authorize(&headers, Role::Viewer)?;
    let id = parse_run_id(&id)?;
    if store::run_status(s.store.pool(), id).await?.is_none() {
        return Err(StoreError::NotFound(id).into());
    }
    Ok(Sse::new(history_events(s.store.pool().clone(), id))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// A run's history as server-sent events: each entry as it is recorded
/// (`history`), then `end` with the final status.
fn history_events(
    pool: sqlx::PgPool,
    id: Uuid,
) -> impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>> + Send + 'static {
    use futures_util::StreamExt;
    futures_util::stream::unfold((0i64, false), move |(after, ended)| {
        let pool = pool.clone();
        async move {
            if ended {
                return None;
            }
            loop {
                // Read the status first: entries written before a terminal status are then all seen.
                let status = store::run_status(&pool, id).await.ok().flatten();
                let entries = store::history_since(&pool, id, after).await.unwrap_or_default();
                if let Some(last) = entries.last() {
                    let events: Vec<Result<Event, std::convert::Infallible>> = entries
                        .iter()
                        .map(|e| {
                            Ok(Event::default()
                                .event("history")
                                .id(e.id.to_string())
                                .data(serde_json::to_string(e).unwrap_or_default()))
                        })
                        .collect();
                    return Some((futures_util::stream::iter(events), (last.id, false)));
                }
                let terminal = status
                    .as_deref()
                    .and_then(|s| s.parse::<crate::engine::RunStatus>().ok())
                    .is_none_or(|s| s.is_terminal());
                if terminal {
                    let end = Event::default()
                        .event("end")
                        .data(json!({"run_id": id, "status": status}).to_string());
                    return Some((futures_util::stream::iter(vec![Ok(end)]), (after, true)));
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        }
    })
    .flatten()
}

#[derive(Debug, Deserialize)]
struct IncidentFilter {
    #[serde(default)]
    all: bool,
}

async fn list_incidents(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(f): Query<IncidentFilter>,
) -> ApiResult<Json<Vec<store::IncidentView>>> {
    s.authorize(&headers, Role::Viewer)?;
    Ok(Json(store::list_incidents(s.store.pool(), f.all).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenIncident {
    environment: String,
    title: String,
}

async fn open_incident(State(s): State<Arc<AppState>>, headers: HeaderMap, bytes: Bytes) -> ApiResult<Response> {
    let who = s.authorize(&headers, Role::Operator)?.name.clone();
    let req: OpenIncident = body(&bytes)?;
    non_empty("environment", &req.environment)?;
    non_empty("title", &req.title)?;
    s.check_environment(&req.environment)?;
    let (view, _) = s
        .store
        .open_incident(&req.environment, &req.title, "operator", None, &who)
        .await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn resolve_incident(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<store::IncidentView>> {
    let who = s.authorize(&headers, Role::Operator)?.name.clone();
    let id: Uuid = id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{id:?} is not an incident id"),
        )
    })?;
    let (view, out) = s.store.resolve_incident(store::IncidentKey::Id(id), &who).await?;
    s.relay.send(out);
    Ok(Json(view))
}

/// Releases an environment held after a failed rollback (operator).
async fn release_lock(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((service, environment)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    let who = s.authorize(&headers, Role::Operator)?.name.clone();
    let req: ReasonRequest = body(&bytes)?;
    non_empty("reason", &req.reason)?;
    let (run, out) = s
        .store
        .release_environment(&service, &environment, &who, &req.reason)
        .await?;
    s.relay.send(out);
    Ok(Json(json!({"run_id": run, "release": "done"})))
}

async fn list_locks(State(s): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult<Json<Vec<store::LockView>>> {
    s.authorize(&headers, Role::Viewer)?;
    Ok(Json(store::list_locks(s.store.pool()).await?))
}

#[derive(Debug, Deserialize)]
struct DlqFilter {
    #[serde(default)]
    all: bool,
    limit: Option<i64>,
}

async fn list_dead_letters(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(f): Query<DlqFilter>,
) -> ApiResult<Json<Vec<store::DeadLetterView>>> {
    s.authorize(&headers, Role::Viewer)?;
    let limit = limit_in_range(f.limit.unwrap_or(100))?;
    Ok(Json(store::list_dead_letters(s.store.pool(), f.all, limit).await?))
}

/// Publishes a dead letter again, as it was first published (same message id, so
/// consumers' idempotency still applies), then marks it replayed.
async fn replay_dead_letter(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let who = s.authorize(&headers, Role::Operator)?.name.clone();
    let id: i64 = id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{id:?} is not a dead letter id"),
        )
    })?;
    let (exchange, routing_key, message_id, body) = store::dead_letter_for_replay(s.store.pool(), id).await?;
    if exchange.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("dead letter {id} does not say where it was published; it cannot be replayed"),
        ));
    }
    let out = baton_shared::amqp::Outgoing {
        message_id: message_id.as_deref().and_then(|m| m.parse().ok()),
        ..Default::default()
    };
    s.broker
        .publish(&exchange, &routing_key, &body, &out)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "broker", format!("replay failed: {e}")))?;
    s.store.mark_replayed(id, &who).await?;
    Ok(Json(
        json!({"id": id, "replayed": true, "exchange": exchange, "routing_key": routing_key}),
    ))
}

/// Alertmanager's webhook payload (version 4). What Baton reads is typed (a
/// field of the wrong type is refused); Alertmanager's other fields are
/// accepted and ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AlertmanagerPayload {
    version: String,
    // Read only to refuse a field of the wrong type (null too), as the document says.
    #[serde(default, deserialize_with = "present_string")]
    #[allow(dead_code)]
    group_key: Option<String>,
    #[serde(default, deserialize_with = "present_string")]
    #[allow(dead_code)]
    status: Option<String>,
    #[serde(default, deserialize_with = "present_string")]
    #[allow(dead_code)]
    receiver: Option<String>,
    /// Alerts Alertmanager left out of this notification (its `max_alerts`).
    #[serde(default, deserialize_with = "count")]
    truncated_alerts: u64,
    alerts: Vec<Alert>,
}

/// An optional field that, when present, is a string (not null).
fn present_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    String::deserialize(d).map(Some)
}

/// A JSON Schema integer from 0 to 2^63-1: `336.0` is one too.
fn count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    let v = match (n.as_u64(), n.as_f64()) {
        (Some(v), _) => Some(v),
        (None, Some(f)) if f >= 0.0 && f.fract() == 0.0 && f < 9.223_372_036_854_775e18 => Some(f as u64),
        _ => None,
    };
    v.filter(|v| i64::try_from(*v).is_ok())
        .ok_or_else(|| serde::de::Error::custom(format!("{n} is not a count from 0 to 2^63-1")))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Alert {
    // Typed as the document says, though only their presence is checked.
    #[serde(default, deserialize_with = "present_string")]
    #[allow(dead_code)]
    starts_at: Option<String>,
    #[serde(default, deserialize_with = "present_string")]
    #[allow(dead_code)]
    ends_at: Option<String>,
    status: String,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
    fingerprint: String,
}

/// Firing alerts open incidents (one per fingerprint, in an environment the
/// pipeline knows); resolved alerts close them and end an operator's
/// acknowledgement. An alert an operator resolved by hand while it fired does
/// not reopen until it resolves.
async fn alertmanager_webhook(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    let who = s.authorize(&headers, Role::Operator)?.name.clone();
    let payload: AlertmanagerPayload = body(&bytes)?;
    if payload.version != "4" {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!(
                "Alertmanager webhook version {:?} is not supported (expected \"4\")",
                payload.version
            ),
        ));
    }
    // Everything is checked before anything is stored.
    for a in &payload.alerts {
        non_empty("alerts[].fingerprint", &a.fingerprint)?;
        for (k, v) in a.labels.iter().chain(&a.annotations) {
            storable(&format!("alerts[].labels or annotations {k:?}"), &format!("{k}{v}"))?;
        }
        if a.status != "firing" && a.status != "resolved" {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("alert status {:?} is neither firing nor resolved", a.status),
            ));
        }
    }
    let (mut opened, mut resolved, mut unchanged, mut acknowledged) = (Vec::new(), Vec::new(), 0, 0);
    let mut ignored = Vec::new();
    let mut touched = Vec::new();
    for a in &payload.alerts {
        let fingerprint = format!("alertmanager:{}", a.fingerprint);
        if a.status == "resolved" {
            let (view, out) = s.store.alert_resolved(&fingerprint, &who, "incident_resolved").await?;
            s.relay.send(out);
            match view {
                Some(v) => resolved.push(v.id),
                None => unchanged += 1,
            }
            continue;
        }
        let environment = a
            .labels
            .get("environment")
            .or_else(|| a.labels.get("env"))
            .cloned()
            .unwrap_or_else(|| s.alertmanager_environment.clone());
        if !s.knows_environment(&environment) {
            // Refusing the notification would make Alertmanager retry it for ever.
            ignored.push(json!({"fingerprint": a.fingerprint, "environment": environment}));
            continue;
        }
        let name = a.labels.get("alertname").map(String::as_str).unwrap_or("alert");
        let title = match a.annotations.get("summary") {
            Some(summary) => format!("{name}: {summary}"),
            None => name.to_owned(),
        };
        let (view, what) = s
            .store
            .open_incident(&environment, &title, "alertmanager", Some(&fingerprint), &who)
            .await?;
        touched.push(fingerprint);
        match what {
            store::Opened::Created => opened.push(view.id),
            store::Opened::AlreadyOpen => unchanged += 1,
            store::Opened::Acknowledged => acknowledged += 1,
        }
    }
    if !ignored.is_empty() {
        let _ = s
            .store
            .record(
                None,
                "alerts_ignored",
                json!({"reason": "environment unknown to the pipeline", "alerts": ignored}),
            )
            .await;
    }
    if payload.truncated_alerts > 0 {
        s.store.note_truncated(&touched, payload.truncated_alerts).await?;
        let _ = s
            .store
            .record(
                None,
                "alerts_truncated",
                json!({"truncated_alerts": payload.truncated_alerts, "received": payload.alerts.len()}),
            )
            .await;
    }
    Ok(Json(json!({
        "opened": opened,
        "resolved": resolved,
        "unchanged": unchanged,
        "acknowledged": acknowledged,
        "ignored": ignored,
        "truncated_alerts": payload.truncated_alerts,
    })))
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

async fn list_runs(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(f): Query<store::RunFilter>,
) -> ApiResult<Json<Vec<store::RunLine>>> {
    s.authorize(&headers, Role::Viewer)?;
    limit_in_range(f.limit)?;
    for (field, value) in [
        ("status", &f.status),
        ("environment", &f.environment),
        ("service", &f.service),
    ] {
        if let Some(v) = value {
            storable(field, v)?;
        }
    }
    Ok(Json(store::list_runs(s.store.pool(), &f).await?))
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
    Ok(Json(view.with_timing(&s.pipeline)))
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
    let req: RollbackRequest = self::body(&body)?;
    non_empty("reason", &req.reason)?;
    let out = s
        .store
        .request_rollback(id, &who, &format!("{} (by {who})", req.reason))
        .await?;
    s.relay.send(out);
    Ok(Json(json!({"run_id": id, "rollback": "requested"})))
}

/// A new run of the run's merge event, linked to it (operator).
async fn redeploy(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let who = s.authorize(&headers, Role::Operator)?.name.clone();
    let id = parse_run_id(&id)?;
    let req: RollbackRequest = self::body(&body)?;
    non_empty("reason", &req.reason)?;
    let (run_id, out) = s.store.redeploy(id, &who, &req.reason, &s.pipeline).await?;
    s.relay.send(out);
    tracing::info!(run_id = %run_id, redeploy_of = %id, by = %who, "redeploy created");
    Ok((StatusCode::CREATED, Json(json!({"run_id": run_id, "redeploy_of": id}))).into_response())
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
    let header = headers.get("x-baton-signature");
    let given = header
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("sha256="))
        .and_then(|v| hex::decode(v).ok());
    let Some(given) = given else {
        let reason = if header.is_none() {
            "no X-Baton-Signature header"
        } else {
            "malformed X-Baton-Signature header"
        };
        let _ = s.store.record(None, "webhook_refused", json!({"reason": reason})).await;
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "X-Baton-Signature: sha256=<hex> is required",
        ));
    };
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
    fn every_route_is_in_the_openapi_document_and_nothing_else_is() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        let paths = doc["paths"].as_object().expect("paths");
        let routes = routes();
        for (method, path, _) in &routes {
            assert!(
                paths.get(*path).and_then(|p| p.get(*method)).is_some(),
                "{method} {path} is missing from scheduler/openapi.json"
            );
        }
        for (path, ops) in paths {
            for method in ops.as_object().expect("operations").keys() {
                assert!(
                    routes.iter().any(|(m, p, _)| m == method && p == path),
                    "openapi.json documents {method} {path}, which is not a route"
                );
            }
        }
    }

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
