//! The operator's web view, on the API's listener under `/ui`: the runs, each
//! run as a Gantt timeline with its plan, gate verdicts, compensation order and
//! history, and the actions the API offers (approve or reject, cancel, roll
//! back, redeploy, incidents) for those whose token allows them.
//!
//! - Pages are rendered on the server (maud: every spliced value is escaped), the
//!   timeline as inline SVG, so a page is readable without JavaScript. The one
//!   script (`web/app.js`) swaps in fresh server-rendered fragments when the
//!   run's server-sent events say something happened, and keeps the time axis
//!   moving while the run goes on.
//! - Log-in takes an API token and keeps it in an `HttpOnly`, `SameSite=Strict`
//!   cookie (`Secure` with `api.secure_cookies`); roles are the API's. Every
//!   action is a POST carrying a CSRF token derived from the session
//!   (SHA-256 of a label and the session token: unguessable without the token,
//!   and revealing nothing of it).
//! - A strict Content-Security-Policy (no inline script or style, nothing from
//!   another origin); the script and style sheet are embedded in the binary.

use axum::extract::Form;
use axum::http::header;
use axum::response::{Html, Redirect};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use super::*;
use crate::store::{HistoryEntry, RunView, StepView};
use crate::timing;

const COOKIE: &str = "baton_session";
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
const APP_JS: &str = include_str!("../../web/app.js");
const STYLE_CSS: &str = include_str!("../../web/style.css");

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/runs") }))
        .route("/ui", get(|| async { Redirect::to("/ui/runs") }))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/runs", get(runs_page))
        .route("/ui/runs/table", get(runs_table))
        .route("/ui/runs/{id}", get(run_page))
        .route("/ui/runs/{id}/panel", get(run_panel))
        .route("/ui/runs/{id}/live", get(run_live))
        .route("/ui/runs/{id}/{action}", post(run_action))
        .route("/ui/incidents", post(open_incident))
        .route("/ui/incidents/{id}/resolve", post(resolve_incident))
        .route(
            "/ui/static/app.js",
            get(|| async { static_file("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/static/style.css",
            get(|| async { static_file("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .layer(DefaultBodyLimit::max(16 * 1024))
        .layer(axum::middleware::map_response(security_headers))
}

async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    for (name, value) in [
        ("content-security-policy", CSP),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("x-frame-options", "DENY"),
    ] {
        h.insert(name, axum::http::HeaderValue::from_static(value));
    }
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, axum::http::HeaderValue::from_static("no-store"));
    }
    res
}

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

// --- sessions --------------------------------------------------------------

/// A logged-in caller: their token's entry and the CSRF token of the session.
struct Session<'a> {
    entry: &'a TokenEntry,
    csrf: String,
}

impl Session<'_> {
    fn may(&self, needed: Role) -> bool {
        self.entry.role.allows(needed)
    }
}

fn csrf_for(token: &str) -> String {
    hex::encode(Sha256::digest(format!("baton-web-csrf:{token}").as_bytes()))
}

fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        .filter(|v| !v.is_empty())
}

fn session<'a>(s: &'a AppState, headers: &HeaderMap) -> Option<Session<'a>> {
    let token = cookie_token(headers)?;
    let entry = s.authorize_token(token, Role::Viewer).ok()?;
    Some(Session {
        entry,
        csrf: csrf_for(token),
    })
}

/// The session of a POST: logged in, with the session's CSRF token in the form.
fn posting<'a>(s: &'a AppState, headers: &HeaderMap, csrf: &str) -> Result<Session<'a>, Box<Response>> {
    let Some(session) = session(s, headers) else {
        return Err(Box::new(error_page(
            StatusCode::UNAUTHORIZED,
            "Not logged in",
            "Log in with an API token first.",
        )));
    };
    if !constant_time_eq(session.csrf.as_bytes(), csrf.as_bytes()) {
        return Err(Box::new(error_page(
            StatusCode::FORBIDDEN,
            "Refused",
            "The form's CSRF token is missing or wrong: reload the page and try again.",
        )));
    }
    Ok(session)
}

/// The session of a POST that needs `needed`; else the page that says why.
fn acting<'a>(
    s: &'a AppState,
    headers: &HeaderMap,
    csrf: &str,
    needed: Role,
    what: &str,
) -> Result<Session<'a>, Box<Response>> {
    let sess = posting(s, headers, csrf)?;
    if !sess.may(needed) {
        return Err(Box::new(error_page(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "Your role ({}) may not {what}; it needs {}.",
                role_label(sess.entry.role),
                role_label(needed)
            ),
        )));
    }
    Ok(sess)
}

fn cookie(s: &AppState, value: &str, max_age: u64) -> String {
    format!(
        "{COOKIE}={value}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        if s.secure_cookies { "; Secure" } else { "" }
    )
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
}

async fn login_page() -> Response {
    page(
        "Log in",
        None,
        html! {
            h1 { "Log in" }
            p { "Paste an API token (" code { "baton token new" } "). It is kept in a cookie this site's scripts cannot read." }
            (login_form())
        },
    )
}

fn login_form() -> Markup {
    html! {
        form.login method="post" action="/ui/login" {
            label for="token" { "API token" }
            input #token type="password" name="token" autocomplete="off" required;
            button type="submit" { "Log in" }
        }
    }
}

async fn login(State(s): State<Arc<AppState>>, Form(form): Form<LoginForm>) -> Response {
    let token = form.token.trim();
    // A cookie value must be a cookie-octet: Baton's tokens are; anything else is no token.
    let usable = !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !usable || s.authorize_token(token, Role::Viewer).is_err() {
        let body = html! {
            h1 { "Log in" }
            p.error role="alert" { "Unknown token." }
            (login_form())
        };
        let mut res = page("Log in", None, body);
        *res.status_mut() = StatusCode::UNAUTHORIZED;
        return res;
    }
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, cookie(&s, token, 12 * 3600)),
            (header::LOCATION, "/ui/runs".to_owned()),
        ],
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

async fn logout(State(s): State<Arc<AppState>>, headers: HeaderMap, Form(form): Form<CsrfOnly>) -> Response {
    if let Err(res) = posting(&s, &headers, &form.csrf) {
        return *res;
    }
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, cookie(&s, "", 0)),
            (header::LOCATION, "/ui/login".to_owned()),
        ],
    )
        .into_response()
}

// --- layout ----------------------------------------------------------------

fn page(title: &str, session: Option<&Session>, body: Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Baton" }
                link rel="stylesheet" href="/ui/static/style.css";
                script src="/ui/static/app.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/ui/runs" { "Baton" }
                    @if let Some(sess) = session {
                        span.who { (sess.entry.name) " · " (role_label(sess.entry.role)) }
                        form.inline method="post" action="/ui/logout" {
                            input type="hidden" name="csrf" value=(sess.csrf);
                            button.link type="submit" { "Log out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    };
    Html(markup.into_string()).into_response()
}

fn role_label(role: Role) -> &'static str {
    match role {
        Role::Viewer => "viewer",
        Role::Operator => "operator",
        Role::Approver => "approver",
    }
}

fn error_page(status: StatusCode, title: &str, message: &str) -> Response {
    let mut res = page(
        title,
        None,
        html! {
            h1 { (title) }
            p.error role="alert" { (message) }
            p { a href="/ui/runs" { "Runs" } " · " a href="/ui/login" { "Log in" } }
        },
    );
    *res.status_mut() = status;
    res
}

fn api_error_page(e: ApiError) -> Response {
    let title = e.status.canonical_reason().unwrap_or("Error");
    error_page(e.status, title, &e.message)
}

fn status_badge(status: &str) -> Markup {
    let kind = match status {
        "succeeded" | "pass" => "ok",
        "compensated" | "rolled_back" | "hold" => "warn",
        "failed" | "fail" | "compensation_failed" | "rollback_failed" | "cancelled" => "bad",
        "awaiting_approval" | "queued" | "pending" | "waiting" => "wait",
        "running" | "dispatched" | "compensating" | "rolling_back" => "busy",
        _ => "idle",
    };
    html! { span class={ "badge " (kind) } { (status.replace('_', " ")) } }
}

fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn short(s: &str, n: usize) -> &str {
    s.get(..n.min(s.len())).unwrap_or(s)
}

// --- the runs --------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
struct RunsQuery {
    #[serde(default)]
    service: String,
    #[serde(default)]
    environment: String,
    #[serde(default)]
    status: String,
    /// `1h`, `24h`, `7d`, `30d`, or empty for any time.
    #[serde(default)]
    since: String,
    /// Which page of [`RUNS_PER_PAGE`] runs, newest first, from 1.
    #[serde(default)]
    page: String,
}

/// Runs on a page of the runs list.
const RUNS_PER_PAGE: i64 = 200;

impl RunsQuery {
    fn filter(&self) -> Result<store::RunFilter, String> {
        let opt = |v: &str| Some(v.trim().to_owned()).filter(|v| !v.is_empty());
        if let Some(st) = opt(&self.status) {
            st.parse::<crate::engine::RunStatus>()
                .map_err(|e| format!("status: {e}"))?;
        }
        for (field, v) in [("service", &self.service), ("environment", &self.environment)] {
            if v.contains('\0') {
                return Err(format!("{field} must not contain the NUL character"));
            }
        }
        let since = match self.since.as_str() {
            "" => None,
            "1h" => Some(chrono::Duration::hours(1)),
            "24h" => Some(chrono::Duration::hours(24)),
            "7d" => Some(chrono::Duration::days(7)),
            "30d" => Some(chrono::Duration::days(30)),
            other => return Err(format!("since: {other:?} is not one of 1h, 24h, 7d, 30d")),
        };
        Ok(store::RunFilter {
            status: opt(&self.status),
            environment: opt(&self.environment),
            service: opt(&self.service),
            // One more than a page: whether there is an older page.
            limit: RUNS_PER_PAGE + 1,
            since: since.map(|d| Utc::now() - d),
            offset: (self.page()? - 1) * RUNS_PER_PAGE,
        })
    }

    fn page(&self) -> Result<i64, String> {
        match self.page.trim() {
            "" => Ok(1),
            p => p
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=100_000).contains(n))
                .ok_or_else(|| format!("page: {p:?} is not a page number (1 or more)")),
        }
    }

    /// This query on page `page`.
    fn on_page(&self, page: i64) -> String {
        let page = if page <= 1 { String::new() } else { page.to_string() };
        let mut q = form_urlencoded(&[
            ("service", &self.service),
            ("environment", &self.environment),
            ("status", &self.status),
            ("since", &self.since),
            ("page", &page),
        ]);
        q.insert(0, '?');
        q
    }

    fn query_string(&self) -> String {
        let q = self.on_page(self.page().unwrap_or(1));
        if q == "?" { String::new() } else { q }
    }
}

/// `a=b&c=d` of the non-empty pairs, percent-encoded.
fn form_urlencoded(pairs: &[(&str, &String)]) -> String {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

async fn runs_rows(s: &AppState, q: &RunsQuery) -> Result<Markup, Response> {
    let filter = q
        .filter()
        .map_err(|m| error_page(StatusCode::BAD_REQUEST, "Bad filter", &m))?;
    let mut runs = store::list_runs(s.store.pool(), &filter)
        .await
        .map_err(|e| api_error_page(e.into()))?;
    let older = runs.len() as i64 > RUNS_PER_PAGE;
    runs.truncate(RUNS_PER_PAGE as usize);
    let page = q.page().unwrap_or(1);
    let now = Utc::now();
    Ok(html! {
        @if page > 1 || older {
            nav.pages {
                @if page > 1 { a href={ "/ui/runs" (q.on_page(page - 1)) } { "← newer" } " " }
                "page " (page)
                @if older { " " a href={ "/ui/runs" (q.on_page(page + 1)) } { "older →" } }
            }
        }
        table.runs #runs-table data-refresh={ "/ui/runs/table" (q.query_string()) } {
            thead { tr { th { "run" } th { "service" } th { "environment" } th { "status" } th { "commit" } th { "started" } th { "took" } } }
            tbody {
                @if runs.is_empty() {
                    tr { td colspan="7" { "No runs match." } }
                }
                @for r in &runs {
                    tr {
                        td { a href={ "/ui/runs/" (r.id) } { code { (short(&r.id.to_string(), 8)) } } }
                        td { (r.service) }
                        td { (r.environment) }
                        td { (status_badge(&r.status)) }
                        td { code { (short(&r.commit_sha, 12)) } }
                        td { (when(r.created_at)) }
                        td { (timing::duration_text(timing::secs(r.created_at, r.finished_at.unwrap_or(now)))) }
                    }
                }
            }
        }
    })
}

async fn runs_page(State(s): State<Arc<AppState>>, headers: HeaderMap, Query(q): Query<RunsQuery>) -> Response {
    let Some(sess) = session(&s, &headers) else {
        return Redirect::to("/ui/login").into_response();
    };
    let table = match runs_rows(&s, &q).await {
        Ok(t) => t,
        Err(res) => return res,
    };
    let incidents = match store::list_incidents(s.store.pool(), false).await {
        Ok(i) => i,
        Err(e) => return api_error_page(e.into()),
    };
    let statuses = [
        "queued",
        "running",
        "awaiting_approval",
        "rolling_back",
        "succeeded",
        "rolled_back",
        "failed",
        "rollback_failed",
        "cancelled",
    ];
    let body = html! {
        h1 { "Runs" }
        form.filters method="get" action="/ui/runs" {
            label { "service " input type="text" name="service" value=(q.service); }
            label { "environment "
                select name="environment" {
                    option value="" { "any" }
                    @for e in &s.pipeline.promotion {
                        option value=(e) selected[q.environment == *e] { (e) }
                    }
                }
            }
            label { "status "
                select name="status" {
                    option value="" { "any" }
                    @for st in statuses {
                        option value=(st) selected[q.status == st] { (st.replace('_', " ")) }
                    }
                }
            }
            label { "since "
                select name="since" {
                    @for (v, l) in [("", "any time"), ("1h", "1 hour"), ("24h", "24 hours"), ("7d", "7 days"), ("30d", "30 days")] {
                        option value=(v) selected[q.since == v] { (l) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        (table)
        h2 { "Open incidents" }
        @if incidents.is_empty() { p { "None: deploys to production are not blocked by an incident." } }
        ul.incidents {
            @for i in &incidents {
                li {
                    strong { (i.environment) } ": " (i.title) " — opened by " (i.opened_by) " at " (when(i.opened_at))
                    @if sess.may(Role::Operator) {
                        form.inline method="post" action={ "/ui/incidents/" (i.id) "/resolve" } {
                            input type="hidden" name="csrf" value=(sess.csrf);
                            button type="submit" { "Resolve" }
                        }
                    }
                }
            }
        }
        @if sess.may(Role::Operator) {
            form.incident method="post" action="/ui/incidents" {
                input type="hidden" name="csrf" value=(sess.csrf);
                label { "environment "
                    select name="environment" {
                        @for e in s.environments() { option value=(e) { (e) } }
                    }
                }
                label { "title " input type="text" name="title" required; }
                button type="submit" { "Open incident" }
            }
        }
    };
    page("Runs", Some(&sess), body)
}

async fn runs_table(State(s): State<Arc<AppState>>, headers: HeaderMap, Query(q): Query<RunsQuery>) -> Response {
    if session(&s, &headers).is_none() {
        return error_page(StatusCode::UNAUTHORIZED, "Not logged in", "Log in again.");
    }
    match runs_rows(&s, &q).await {
        Ok(t) => Html(t.into_string()).into_response(),
        Err(res) => res,
    }
}

// --- one run ---------------------------------------------------------------

async fn load_run(s: &AppState, id: &str) -> Result<RunView, Response> {
    let id = parse_run_id(id).map_err(api_error_page)?;
    match store::run_view(s.store.pool(), id).await {
        Ok(Some(v)) => Ok(v.with_timing(&s.pipeline)),
        Ok(None) => Err(error_page(StatusCode::NOT_FOUND, "Not found", &format!("No run {id}."))),
        Err(e) => Err(api_error_page(e.into())),
    }
}

async fn run_page(State(s): State<Arc<AppState>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let Some(sess) = session(&s, &headers) else {
        return Redirect::to("/ui/login").into_response();
    };
    let run = match load_run(&s, &id).await {
        Ok(r) => r,
        Err(res) => return res,
    };
    let body = html! {
        p.crumbs { a href="/ui/runs" { "Runs" } " / " code { (run.id) } }
        div #panel
            data-panel={ "/ui/runs/" (run.id) "/panel" }
            data-live=[(!run.is_terminal()).then(|| format!("/ui/runs/{}/live", run.id))] {
            (panel(&s, &sess, &run, Utc::now()))
        }
    };
    page(&format!("{} → {}", run.service, run.environment), Some(&sess), body)
}

async fn run_panel(State(s): State<Arc<AppState>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let Some(sess) = session(&s, &headers) else {
        return error_page(StatusCode::UNAUTHORIZED, "Not logged in", "Log in again.");
    };
    match load_run(&s, &id).await {
        Ok(run) => Html(panel(&s, &sess, &run, Utc::now()).into_string()).into_response(),
        Err(res) => res,
    }
}

/// The run's history as server-sent events, for the page's script (the API's
/// `/v1/runs/{id}/events`, authenticated by the session cookie).
async fn run_live(State(s): State<Arc<AppState>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if session(&s, &headers).is_none() {
        return error_page(StatusCode::UNAUTHORIZED, "Not logged in", "Log in again.");
    }
    let id = match parse_run_id(&id) {
        Ok(id) => id,
        Err(e) => return api_error_page(e),
    };
    Sse::new(history_events(s.store.pool().clone(), id))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Everything on a run's page that changes while it goes on.
fn panel(s: &AppState, sess: &Session, run: &RunView, now: DateTime<Utc>) -> Markup {
    let t = timing::of(run, now);
    let trace = run
        .trace_id
        .as_ref()
        .filter(|_| !s.trace_url.is_empty())
        .map(|id| s.trace_url.replace("{trace_id}", id));
    let held: Vec<&StepView> = run
        .steps
        .iter()
        .filter(|st| st.hold.as_ref().is_some_and(|h| h.approval) && st.finished_at.is_none())
        .collect();
    let verdicts = gate_verdicts(&run.history);
    let mut compensations: Vec<&StepView> = run
        .steps
        .iter()
        .filter(|st| st.compensation_started_at.is_some())
        .collect();
    compensations.sort_by_key(|st| st.compensation_started_at);
    html! {
        section.summary data-running=(if run.is_terminal() { "false" } else { "true" }) {
            h1 { (run.service) " → " (run.environment) " " (status_badge(&run.status)) }
            @if !run.title.is_empty() { p.title { (run.title) } }
            dl {
                dt { "commit" } dd { code { (run.commit_sha) } }
                dt { "risk" } dd { (if run.risk.is_empty() { "—" } else { &run.risk }) }
                dt { "plan" } dd { code.plan-hash { (run.plan_hash) } }
                dt { "took" } dd {
                    @if let Some(a) = t.actual_secs { (timing::duration_text(a)) } @else { "not started" }
                    @if let Some(b) = t.budget_minutes { " of a " (b) " min budget" }
                    @if t.over { " " span.badge.bad { "over budget" } }
                }
                @if let Some(url) = &trace { dt { "trace" } dd { a href=(url) rel="noreferrer" { "open the run's trace" } } }
                @if let Some(r) = run.redeploy_of { dt { "redeploys" } dd { a href={ "/ui/runs/" (r) } { code { (r) } } } }
                @if let Some(r) = &run.rollback_reason { dt { "rollback" } dd { (r) } }
            }
            @if let Some(h) = &run.hold {
                p.hold role="status" { "Held by " strong { (h.gate) } ": " (h.reason) }
            }
            @for st in run.steps.iter().filter(|st| st.hold.is_some() && st.finished_at.is_none()) {
                @if let Some(h) = &st.hold {
                    p.hold role="status" {
                        "Step " code { (st.id) } (if h.approval { " waits for approval" } else { " waits" })
                        " on " strong { (h.gate) } ": " (h.reason)
                    }
                }
            }
        }
        (actions(sess, run, &held))
        section {
            h2 { "Timeline" }
            (gantt(s, run, now))
        }
        section {
            h2 { "Timing" }
            table.timing {
                thead { tr { th { "step" } th { "role" } th { "zone" } th { "typical" } th { "actual" } th { "parallel with" } } }
                tbody {
                    @for st in &t.steps {
                        tr class=[st.over.then_some("over")] {
                            td { code { (st.step) } }
                            td { (st.role) }
                            td { (st.zone) }
                            td { (timing::typical_text(st.typical_minutes)) }
                            td {
                                @match st.actual_secs {
                                    Some(a) => { (timing::duration_text(a)) @if st.running { "…" } }
                                    None => { "—" }
                                }
                                @if st.over { " " span.badge.bad { "over" } }
                            }
                            td { @if st.parallel.is_empty() { "—" } @else { (st.parallel.join(", ")) } }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Gate verdicts" }
            @if verdicts.is_empty() { p { "None yet." } }
            table.verdicts {
                @for v in &verdicts {
                    tr {
                        td { (when(v.at)) }
                        td { @if let Some(st) = &v.step { code { (st) } } @else { "run" } }
                        td { (v.gate) }
                        td { (status_badge(&v.verdict)) }
                        td { (v.reason) }
                    }
                }
            }
        }
        @if !compensations.is_empty() {
            section {
                h2 { "Compensation order" }
                ol.compensations {
                    @for st in &compensations {
                        li {
                            code { (st.id) } " " (st.compensate.as_deref().unwrap_or("compensation")) " on " (st.role) "@" (st.zone) " — " (status_badge(&st.status))
                            @if let (Some(a), Some(b)) = (st.compensation_started_at, st.compensation_finished_at) {
                                " in " (timing::duration_text(timing::secs(a, b)))
                            }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Plan" }
            p { "Plan " code { (run.plan_hash) } ": each step of the pipeline and why it takes part." }
            table.plan {
                thead { tr { th { "step" } th { "role@zone" } th { "action" } th { "needs" } th { "gates" } th { "why" } } }
                tbody {
                    @for st in &run.steps {
                        tr class=[(!st.included).then_some("skipped")] {
                            td { code { (st.id) } }
                            td { (st.role) "@" (st.zone) }
                            td { (st.action) }
                            td { (st.needs.join(", ")) }
                            td { (st.gates.join(", ")) }
                            td { @if !st.included { "skipped: " } (st.reason) }
                        }
                    }
                }
            }
        }
        section {
            h2 { "History" }
            table.history {
                @for e in &run.history {
                    tr {
                        td { (when(e.at)) }
                        td { @if let Some(st) = &e.step_id { code { (st) } } }
                        td { (e.actor) }
                        td { (e.kind) }
                        td.detail { (detail_text(&e.detail)) }
                    }
                }
            }
        }
    }
}

fn detail_text(v: &serde_json::Value) -> String {
    let text = v.to_string();
    if text.chars().count() > 300 {
        let mut t: String = text.chars().take(299).collect();
        t.push('…');
        t
    } else {
        text
    }
}

struct Verdict {
    at: DateTime<Utc>,
    step: Option<String>,
    gate: String,
    verdict: String,
    reason: String,
}

/// Every gate verdict of the history, the incident gate's passes left out.
fn gate_verdicts(history: &[HistoryEntry]) -> Vec<Verdict> {
    let mut out = Vec::new();
    for e in history {
        for v in e.verdicts() {
            let verdict = v["verdict"].as_str().unwrap_or("?");
            out.push(Verdict {
                at: e.at,
                step: e.step_id.clone(),
                gate: v["gate"].as_str().unwrap_or("?").to_owned(),
                verdict: verdict.to_owned(),
                reason: v["reason"].as_str().unwrap_or("").to_owned(),
            });
        }
    }
    out
}

fn actions(sess: &Session, run: &RunView, held: &[&StepView]) -> Markup {
    let terminal = run.is_terminal();
    let approver = sess.may(Role::Approver);
    let operator = sess.may(Role::Operator);
    html! {
        @if !held.is_empty() || operator {
            section.actions {
                h2 { "Actions" }
                @if approver {
                    @for st in held {
                        form.decide method="post" action={ "/ui/runs/" (run.id) "/approve" } {
                            input type="hidden" name="csrf" value=(sess.csrf);
                            input type="hidden" name="step" value=(st.id);
                            input type="hidden" name="plan_hash" value=(run.plan_hash);
                            @let subject = st.hold.as_ref().and_then(|h| h.subject.as_deref());
                            @if let Some(subject) = subject {
                                input type="hidden" name="subject" value=(subject);
                            }
                            p {
                                "Step " code { (st.id) } " on plan " code { (short(&run.plan_hash, 16)) }
                                @if let Some(subject) = subject {
                                    ", applying saved plan " code.subject { (short(subject, 16)) }
                                }
                            }
                            label { "comment " input type="text" name="comment"; }
                            button.approve type="submit" { "Approve " (st.id) }
                            button.reject type="submit" formaction={ "/ui/runs/" (run.id) "/reject" } { "Reject" }
                        }
                    }
                } @else if !held.is_empty() {
                    p { "Waiting for an approver." }
                }
                @if operator && !terminal {
                    form.inline method="post" action={ "/ui/runs/" (run.id) "/cancel" } {
                        input type="hidden" name="csrf" value=(sess.csrf);
                        input type="text" name="reason" placeholder="why" required;
                        button type="submit" { "Cancel the run" }
                    }
                    form.inline method="post" action={ "/ui/runs/" (run.id) "/rollback" } {
                        input type="hidden" name="csrf" value=(sess.csrf);
                        input type="text" name="reason" placeholder="why" required;
                        button type="submit" { "Roll back" }
                    }
                }
                @if operator && terminal {
                    form.inline method="post" action={ "/ui/runs/" (run.id) "/redeploy" } {
                        input type="hidden" name="csrf" value=(sess.csrf);
                        input type="text" name="reason" placeholder="why" required;
                        button type="submit" { "Redeploy" }
                    }
                }
            }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct ActionForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    step: String,
    #[serde(default)]
    plan_hash: String,
    /// The saved plan shown with a blast-radius hold.
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    comment: String,
    #[serde(default)]
    reason: String,
}

async fn run_action(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Response {
    let needed = match action.as_str() {
        "approve" | "reject" => Role::Approver,
        "cancel" | "rollback" | "redeploy" => Role::Operator,
        _ => return error_page(StatusCode::NOT_FOUND, "Not found", "No such action."),
    };
    let sess = match acting(&s, &headers, &form.csrf, needed, &action) {
        Ok(sess) => sess,
        Err(res) => return *res,
    };
    let who = sess.entry.name.clone();
    let result: ApiResult<Uuid> = async {
        let id = parse_run_id(&id)?;
        match action.as_str() {
            "approve" | "reject" => {
                let decision = if action == "approve" {
                    crate::gates::Decision::Approve
                } else {
                    crate::gates::Decision::Reject
                };
                non_empty("step", &form.step)?;
                non_empty("plan_hash", &form.plan_hash)?;
                if decision == crate::gates::Decision::Reject {
                    non_empty("comment (why it is rejected)", &form.comment)?;
                }
                storable("comment", &form.comment)?;
                let out = s
                    .store
                    .decide(
                        id,
                        crate::gates::Ask {
                            step: &form.step,
                            plan_hash: &form.plan_hash,
                            subject: form.subject.as_deref().filter(|s| !s.is_empty()),
                            who: &who,
                            decision,
                        },
                        &form.comment,
                    )
                    .await?;
                s.relay.send(out);
                Ok(id)
            }
            "cancel" => {
                non_empty("reason", &form.reason)?;
                let out = s.store.cancel(id, &who, &form.reason).await?;
                s.relay.send(out);
                Ok(id)
            }
            "rollback" => {
                non_empty("reason", &form.reason)?;
                let out = s
                    .store
                    .request_rollback(id, &who, &format!("{} (by {who})", form.reason))
                    .await?;
                s.relay.send(out);
                Ok(id)
            }
            _ => {
                non_empty("reason", &form.reason)?;
                let (new_id, out) = s.store.redeploy(id, &who, &form.reason, &s.pipeline).await?;
                s.relay.send(out);
                Ok(new_id)
            }
        }
    }
    .await;
    match result {
        Ok(run) => Redirect::to(&format!("/ui/runs/{run}")).into_response(),
        Err(e) => api_error_page(e),
    }
}

#[derive(Debug, Deserialize)]
struct IncidentForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    environment: String,
    #[serde(default)]
    title: String,
}

async fn open_incident(State(s): State<Arc<AppState>>, headers: HeaderMap, Form(form): Form<IncidentForm>) -> Response {
    let sess = match acting(&s, &headers, &form.csrf, Role::Operator, "open an incident") {
        Ok(sess) => sess,
        Err(res) => return *res,
    };
    let result: ApiResult<()> = async {
        non_empty("title", &form.title)?;
        s.check_environment(&form.environment)?;
        s.store
            .open_incident(&form.environment, &form.title, "operator", None, &sess.entry.name)
            .await?;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => Redirect::to("/ui/runs").into_response(),
        Err(e) => api_error_page(e),
    }
}

async fn resolve_incident(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfOnly>,
) -> Response {
    let sess = match acting(&s, &headers, &form.csrf, Role::Operator, "resolve an incident") {
        Ok(sess) => sess,
        Err(res) => return *res,
    };
    let Ok(id) = id.parse::<Uuid>() else {
        return error_page(StatusCode::BAD_REQUEST, "Bad request", "That is not an incident id.");
    };
    match s
        .store
        .resolve_incident(store::IncidentKey::Id(id), &sess.entry.name)
        .await
    {
        Ok((_, out)) => {
            s.relay.send(out);
            Redirect::to("/ui/runs").into_response()
        }
        Err(e) => api_error_page(e.into()),
    }
}

// --- the timeline ----------------------------------------------------------

const WIDTH: f64 = 1100.0;
const LABEL: f64 = 230.0;
const LANE: f64 = 24.0;
const AXIS: f64 = 26.0;

/// Tick spacing in seconds: the smallest of these that gives at most 8 ticks.
fn tick_step(total_secs: f64) -> f64 {
    [
        1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0,
    ]
    .into_iter()
    .find(|s| total_secs / s <= 8.0)
    .unwrap_or(14400.0)
}

/// One bar of the timeline.
struct Bar {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    class: String,
    title: String,
}

/// The bars of one step: the wait before its first dispatch (gates, approval),
/// each attempt and each compensation, and its typical range as a band.
fn bars(run: &RunView, st: &StepView, now: DateTime<Utc>) -> (Vec<Bar>, Option<Bar>) {
    let mut out = Vec::new();
    let finished = |id: &str| run.step(id).and_then(|s| s.finished_at);
    let ready = st
        .needs
        .iter()
        .filter_map(|n| finished(n))
        .max()
        .into_iter()
        .chain(run.started_at)
        .max();
    let first = st
        .attempts
        .iter()
        .filter(|a| a.kind == baton_shared::protocol::JobKind::Execute)
        .map(|a| a.dispatched_at)
        .min();
    // The first time a gate held the step, and whether it waited for a person.
    let held = run
        .history
        .iter()
        .filter(|e| e.step_id.as_deref() == Some(st.id.as_str()) && e.kind == "gate")
        .find(|e| e.detail["verdict"] == "hold")
        .map(|e| {
            (
                e.at,
                e.detail["approval"] == true,
                e.detail["gate"].as_str().unwrap_or("?").to_owned(),
                e.detail["reason"].as_str().unwrap_or("").to_owned(),
            )
        });
    let wait_end = first.or(st.finished_at).unwrap_or(now);
    match (held, ready) {
        (Some((at, approval, gate, reason)), _) => out.push(Bar {
            from: at,
            to: wait_end.max(at),
            class: if approval { "wait approval" } else { "wait" }.to_owned(),
            title: format!(
                "{} {} {} on {gate}: {reason}",
                st.id,
                if first.is_none() && st.finished_at.is_none() {
                    "waits"
                } else {
                    "waited"
                },
                timing::duration_text(timing::secs(at, wait_end.max(at))),
            ),
        }),
        (None, Some(r)) if first.is_some_and(|f| (f - r).num_milliseconds() > 500) => out.push(Bar {
            from: r,
            to: wait_end,
            class: "wait".to_owned(),
            title: format!(
                "{} waited {} to be dispatched",
                st.id,
                timing::duration_text(timing::secs(r, wait_end))
            ),
        }),
        _ => {}
    }
    for a in &st.attempts {
        let from = a.started_at.unwrap_or(a.dispatched_at);
        let to = a.finished_at.unwrap_or(now).max(from);
        let kind = match a.kind {
            baton_shared::protocol::JobKind::Compensate => "compensate",
            _ => "execute",
        };
        out.push(Bar {
            from: a.dispatched_at.min(from),
            to,
            class: format!("{kind} s-{}", a.status),
            title: format!(
                "{} attempt {} ({kind}) {} in {}{}",
                st.id,
                a.attempt,
                a.status,
                timing::duration_text(timing::secs(from, to)),
                a.error
                    .as_ref()
                    .map(|e| format!(": {} {}", e.code, e.message))
                    .unwrap_or_default()
            ),
        });
    }
    let typical = match (st.started_at, st.typical_minutes) {
        (Some(start), Some([low, high])) => Some(Bar {
            from: start + chrono::Duration::minutes(i64::from(low)),
            to: start + chrono::Duration::minutes(i64::from(high)),
            class: "typical".to_owned(),
            title: format!("{} typically takes {}", st.id, timing::typical_text(st.typical_minutes)),
        }),
        _ => None,
    };
    (out, typical)
}

fn gantt(s: &AppState, run: &RunView, now: DateTime<Utc>) -> Markup {
    let t0 = run.created_at;
    let end = run.finished_at.unwrap_or(now);
    let total = timing::secs(t0, end).max(1.0);
    let span = WIDTH - LABEL - 12.0;
    // Bars past the axis's end (a typical range longer than the run) are cut.
    let x = |t: DateTime<Utc>| LABEL + (timing::secs(t0, t) / total).min(1.0) * span;
    // Lanes grouped by zone (ci and other non-environments first, then the
    // promotion order), then role, then pipeline order.
    let rank = |zone: &str| s.pipeline.promotion.iter().position(|e| e == zone).map_or(0, |p| p + 1);
    let mut steps: Vec<(usize, &StepView)> = run.steps.iter().enumerate().collect();
    steps.sort_by(|(pa, a), (pb, b)| (rank(&a.zone), &a.zone, &a.role, pa).cmp(&(rank(&b.zone), &b.zone, &b.role, pb)));
    let mut rows: Vec<(f64, Option<&StepView>, String)> = Vec::new();
    let mut y = AXIS;
    let mut zone: Option<&str> = None;
    for (_, st) in &steps {
        if zone != Some(st.zone.as_str()) {
            zone = Some(st.zone.as_str());
            rows.push((y, None, st.zone.clone()));
            y += LANE * 0.8;
        }
        rows.push((y, Some(*st), format!("{} · {}", st.id, st.role)));
        y += LANE;
    }
    let height = y + 6.0;
    let step = tick_step(total);
    let ticks: Vec<f64> = (0..).map(|i| f64::from(i) * step).take_while(|t| *t <= total).collect();
    let live = !run.is_terminal();
    html! {
        svg.gantt xmlns="http://www.w3.org/2000/svg" viewBox={ "0 0 " (WIDTH) " " (height) }
            role="img" aria-label={ "Timeline of run " (run.id) } data-live=(live) {
            @for t in &ticks {
                @let tx = LABEL + t / total * span;
                line.tick x1=(tx) x2=(tx) y1=(AXIS - 6.0) y2=(height) {}
                text.tick x=(tx + 2.0) y=(AXIS - 10.0) { "+" (timing::duration_text(*t)) }
            }
            @if live {
                line.now x1=(LABEL + span) x2=(LABEL + span) y1=(AXIS - 6.0) y2=(height) {}
            }
            @for (ry, st, label) in &rows {
                @match st {
                    None => {
                        text.zone x="4" y=(ry + LANE * 0.6) { (label) }
                    }
                    Some(st) => {
                        @let (bs, typical) = bars(run, st, now);
                        g.lane.skipped[!st.included] data-step=(st.id) data-status=(st.status) {
                            rect.lane-bg x="0" y=(ry) width=(WIDTH) height=(LANE) {}
                            text.label x="14" y=(ry + LANE * 0.68) { (label) }
                            @if let Some(b) = typical {
                                rect.typical x=(x(b.from)) y=(ry + LANE * 0.72) width=((x(b.to) - x(b.from)).max(1.0)) height=(LANE * 0.16) {
                                    title { (b.title) }
                                }
                            }
                            @for b in &bs {
                                rect class={ "bar " (b.class) } x=(x(b.from)) y=(ry + 4.0)
                                    width=((x(b.to) - x(b.from)).max(2.0)) height=(LANE * 0.55) rx="3" {
                                    title { (b.title) }
                                }
                            }
                        }
                    }
                }
            }
        }
        p.legend {
            span.key.execute {} "step attempt " span.key.compensate {} "compensation "
            span.key.wait {} "gate wait " span.key.approval {} "approval wait " span.key.typical {} "typical range"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_is_bound_to_the_session_and_hides_it() {
        let a = csrf_for("baton_aaa");
        assert_eq!(a, csrf_for("baton_aaa"));
        assert_ne!(a, csrf_for("baton_aab"));
        assert!(!a.contains("aaa"));
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=1; baton_session=baton_xyz; b=2".parse().unwrap());
        assert_eq!(cookie_token(&h), Some("baton_xyz"));
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "baton_session=".parse().unwrap());
        assert_eq!(cookie_token(&h), None);
    }

    #[test]
    fn ticks_are_few() {
        assert_eq!(tick_step(5.0), 1.0);
        assert_eq!(tick_step(100.0), 15.0);
        assert_eq!(tick_step(3600.0), 600.0);
    }

    #[test]
    fn filters_are_checked_and_encoded() {
        let q = RunsQuery {
            status: "sideways".into(),
            ..Default::default()
        };
        assert!(q.filter().unwrap_err().starts_with("status:"));
        let q = RunsQuery {
            since: "3w".into(),
            ..Default::default()
        };
        assert!(q.filter().unwrap_err().contains("3w"));
        let q = RunsQuery {
            service: "a b&c".into(),
            since: "24h".into(),
            ..Default::default()
        };
        assert_eq!(q.query_string(), "?service=a%20b%26c&since=24h");
    }
}
