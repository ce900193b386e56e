//! One trace per run, exported from the database.
//!
//! The run span's context is chosen when the run is created and stored with
//! it (`runs.trace_context`); every attempt (execution or compensation) gets its
//! own span id at dispatch, which travels in the job's `traceparent` so the
//! daemon's span becomes its child. Spans are built here from the rows once
//! they are finished and exported over OTLP, then marked exported in the same
//! transaction. So a run that lasts hours never holds an open span in memory,
//! a scheduler restart continues the same trace, and a killed scheduler loses
//! no span (at worst one is exported twice).

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use opentelemetry::trace::{Event, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::StoreError;

fn time(t: DateTime<Utc>) -> SystemTime {
    SystemTime::from(t)
}

fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("baton-scheduler").build()
}

#[allow(clippy::too_many_arguments)]
fn span(
    parent: &SpanContext,
    span_id: SpanId,
    parent_span_id: SpanId,
    name: String,
    kind: SpanKind,
    (start, end): (DateTime<Utc>, DateTime<Utc>),
    attributes: Vec<KeyValue>,
    events: Vec<Event>,
    status: Status,
) -> SpanData {
    SpanData {
        span_context: SpanContext::new(
            parent.trace_id(),
            span_id,
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id,
        parent_span_is_remote: false,
        span_kind: kind,
        name: Cow::Owned(name),
        start_time: time(start),
        end_time: time(end.max(start)),
        attributes,
        dropped_attributes_count: 0,
        events: {
            let mut e = SpanEvents::default();
            e.events = events;
            e
        },
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope(),
    }
}

/// Exports finished spans until `stop`.
pub async fn export_loop(pool: PgPool, mut exporter: opentelemetry_otlp::SpanExporter, stop: CancellationToken) {
    exporter.set_resource(
        &opentelemetry_sdk::Resource::builder()
            .with_service_name("baton-scheduler")
            .with_attribute(KeyValue::new("service.namespace", "baton"))
            .build(),
    );
    let exporter = std::sync::Arc::new(exporter);
    loop {
        match export_once(&pool, &exporter).await {
            Ok(n) if n > 0 => continue,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "span export failed; will retry"),
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    // One last pass so spans finished during shutdown are not left for later.
    let _ = export_once(&pool, &exporter).await;
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("otlp export failed: {0}")]
    Otlp(String),
}

/// Exports one batch; returns how many spans went out.
pub async fn export_once(
    pool: &PgPool,
    exporter: &std::sync::Arc<opentelemetry_otlp::SpanExporter>,
) -> Result<usize, ExportError> {
    let mut tx = pool.begin().await?;
    let attempts = sqlx::query(
        "select a.run_id, a.step_id, a.attempt, a.kind, a.status, a.daemon, a.error->>'code' as code,
                a.error->>'message' as message, a.dispatched_at, a.started_at, a.finished_at, a.span_id,
                s.role, s.zone, r.trace_context, r.service, r.environment, r.commit_sha
           from attempts a
           join steps s on s.run_id = a.run_id and s.step_id = a.step_id
           join runs r on r.id = a.run_id
          where not a.span_exported and a.finished_at is not null
          order by a.finished_at
          limit 200
          for update of a skip locked",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut spans = Vec::new();
    let mut done_attempts: Vec<(Uuid, String, i32)> = Vec::new();
    for r in &attempts {
        let run_id: Uuid = r.try_get("run_id")?;
        let step_id: String = r.try_get("step_id")?;
        let attempt: i32 = r.try_get("attempt")?;
        done_attempts.push((run_id, step_id.clone(), attempt));
        let tc: Option<String> = r.try_get("trace_context")?;
        let span_id: Option<String> = r.try_get("span_id")?;
        let (Some(run_cx), Some(span_id)) = (
            tc.as_deref().and_then(baton_shared::telemetry::parse_traceparent),
            span_id.as_deref().and_then(|s| SpanId::from_hex(s).ok()),
        ) else {
            continue;
        };
        if !run_cx.is_sampled() {
            continue;
        }
        let kind: String = r.try_get("kind")?;
        let status: String = r.try_get("status")?;
        let dispatched: DateTime<Utc> = r.try_get("dispatched_at")?;
        let started: Option<DateTime<Utc>> = r.try_get("started_at")?;
        let finished: DateTime<Utc> = r.try_get("finished_at")?;
        let code: Option<String> = r.try_get("code")?;
        let message: Option<String> = r.try_get("message")?;
        let mut attributes = vec![
            KeyValue::new("baton.run_id", run_id.to_string()),
            KeyValue::new("baton.service", r.try_get::<String, _>("service")?),
            KeyValue::new("baton.environment", r.try_get::<String, _>("environment")?),
            KeyValue::new("baton.commit_sha", r.try_get::<String, _>("commit_sha")?),
            KeyValue::new("baton.step_id", step_id.clone()),
            KeyValue::new("baton.role", r.try_get::<String, _>("role")?),
            KeyValue::new("baton.zone", r.try_get::<String, _>("zone")?),
            KeyValue::new("baton.attempt", i64::from(attempt)),
            KeyValue::new("baton.kind", kind.clone()),
            KeyValue::new("baton.outcome", status.clone()),
        ];
        if let Some(d) = r.try_get::<Option<String>, _>("daemon")? {
            attributes.push(KeyValue::new("baton.daemon", d));
        }
        let mut events = Vec::new();
        if let Some(t) = started {
            events.push(Event::new("started", time(t), vec![], 0));
        }
        if let Some(c) = &code {
            attributes.push(KeyValue::new("baton.error.code", c.clone()));
        }
        let otel_status = if status == "succeeded" {
            Status::Ok
        } else if status == "superseded" {
            // Not an error: a newer run deploys instead.
            Status::Unset
        } else {
            Status::error(format!("{}: {}", code.unwrap_or_default(), message.unwrap_or_default()))
        };
        spans.push(span(
            &run_cx,
            span_id,
            run_cx.span_id(),
            format!("{kind} {step_id}"),
            SpanKind::Producer,
            (dispatched, finished),
            attributes,
            events,
            otel_status,
        ));
    }

    // Runs whose attempts are all exported: the root span, with retries and
    // refusals of the run as events.
    let runs = sqlx::query(
        "select r.id, r.service, r.environment, r.commit_sha, r.status, r.trace_context, r.created_at,
                r.finished_at, r.rollback_reason
           from runs r
          where not r.span_exported and r.finished_at is not null
            and not exists (select 1 from attempts a where a.run_id = r.id and not a.span_exported
                            and not (a.run_id, a.step_id, a.attempt) in (select * from unnest($1::uuid[], $2::text[], $3::int[])))
          limit 50
          for update of r skip locked",
    )
    .bind(done_attempts.iter().map(|a| a.0).collect::<Vec<_>>())
    .bind(done_attempts.iter().map(|a| a.1.clone()).collect::<Vec<_>>())
    .bind(done_attempts.iter().map(|a| a.2).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await?;
    let mut done_runs = Vec::new();
    for r in &runs {
        let id: Uuid = r.try_get("id")?;
        done_runs.push(id);
        let tc: Option<String> = r.try_get("trace_context")?;
        let Some(cx) = tc.as_deref().and_then(baton_shared::telemetry::parse_traceparent) else {
            continue;
        };
        if !cx.is_sampled() {
            continue;
        }
        let status: String = r.try_get("status")?;
        let service: String = r.try_get("service")?;
        let environment: String = r.try_get("environment")?;
        let events = sqlx::query(
            "select at, kind, step_id, detail::text as detail from audit
              where run_id = $1 and kind in ('retry_scheduled', 'stale_result', 'duplicate_result', 'cancel_sent',
                                             'run_status', 'gate', 'gates_passed', 'approved', 'rejected',
                                             'superseded', 'flagged_for_rollback_review')
              order by id",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|e| -> Result<Event, sqlx::Error> {
            let at: DateTime<Utc> = e.try_get("at")?;
            let kind: String = e.try_get("kind")?;
            let mut attrs = vec![KeyValue::new("baton.detail", e.try_get::<String, _>("detail")?)];
            if let Some(s) = e.try_get::<Option<String>, _>("step_id")? {
                attrs.push(KeyValue::new("baton.step_id", s));
            }
            Ok(Event::new(kind, time(at), attrs, 0))
        })
        .collect::<Result<Vec<_>, _>>()?;
        let mut attributes = vec![
            KeyValue::new("baton.run_id", id.to_string()),
            KeyValue::new("baton.service", service.clone()),
            KeyValue::new("baton.environment", environment.clone()),
            KeyValue::new("baton.commit_sha", r.try_get::<String, _>("commit_sha")?),
            KeyValue::new("baton.outcome", status.clone()),
        ];
        if let Some(reason) = r.try_get::<Option<String>, _>("rollback_reason")? {
            attributes.push(KeyValue::new("baton.rollback_reason", reason));
        }
        let otel_status = if status == "succeeded" {
            Status::Ok
        } else if status == "superseded" {
            // Not an error: a newer run deploys instead.
            Status::Unset
        } else {
            Status::error(format!("run {status}"))
        };
        let finished: DateTime<Utc> = r.try_get("finished_at")?;
        spans.extend(wait_spans(&mut tx, &cx, id, finished).await?);
        spans.push(span(
            &cx,
            cx.span_id(),
            SpanId::INVALID,
            format!("run {service} -> {environment}"),
            SpanKind::Internal,
            (r.try_get("created_at")?, r.try_get("finished_at")?),
            attributes,
            events,
            otel_status,
        ));
    }
    let n = spans.len();
    if !spans.is_empty() {
        // The blocking HTTP client must not run on the async runtime's threads.
        let exporter = exporter.clone();
        tokio::task::spawn_blocking(move || block_on(exporter.export(spans)))
            .await
            .map_err(|e| ExportError::Otlp(e.to_string()))?
            .map_err(|e| ExportError::Otlp(e.to_string()))?;
    }
    if !done_attempts.is_empty() {
        sqlx::query(
            "update attempts set span_exported = true
              where (run_id, step_id, attempt) in (select * from unnest($1::uuid[], $2::text[], $3::int[]))",
        )
        .bind(done_attempts.iter().map(|a| a.0).collect::<Vec<_>>())
        .bind(done_attempts.iter().map(|a| a.1.clone()).collect::<Vec<_>>())
        .bind(done_attempts.iter().map(|a| a.2).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    if !done_runs.is_empty() {
        sqlx::query("update runs set span_exported = true where id = any($1)")
            .bind(&done_runs)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(n.max(done_attempts.len() + done_runs.len()))
}

/// One span per gate wait (a step or the whole run held by a gate, from the first
/// hold verdict until the gates pass, the gate fails or the step is cancelled),
/// named `approval wait` when a human approval ends it. Children of the run span;
/// their ids derive from the audit row that opened the wait, so exporting twice
/// sends the same span.
async fn wait_spans(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    run: &SpanContext,
    run_id: Uuid,
    run_finished: DateTime<Utc>,
) -> Result<Vec<SpanData>, sqlx::Error> {
    struct Open {
        audit_id: i64,
        since: DateTime<Utc>,
        gate: String,
        approval: bool,
        events: Vec<Event>,
    }
    let rows = sqlx::query(
        "select id, at, kind, step_id, detail from audit
          where run_id = $1 and kind in ('gate', 'gates_passed', 'step_failed', 'step_cancelled', 'approved', 'rejected')
          order by id",
    )
    .bind(run_id)
    .fetch_all(&mut **tx)
    .await?;
    let mut open: std::collections::BTreeMap<Option<String>, Open> = Default::default();
    let mut out = Vec::new();
    let close = |key: Option<String>, o: Open, end: DateTime<Utc>, outcome: &str, out: &mut Vec<SpanData>| {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(format!("{run_id}/wait/{}", o.audit_id));
        let span_id = SpanId::from_bytes(digest[..8].try_into().expect("8 bytes"));
        let what = if o.approval { "approval wait" } else { "gate wait" };
        let name = match &key {
            Some(step) => format!("{what} {step}"),
            None => format!("{what} run"),
        };
        let mut attributes = vec![
            KeyValue::new("baton.run_id", run_id.to_string()),
            KeyValue::new("baton.gate", o.gate.clone()),
            KeyValue::new("baton.wait.outcome", outcome.to_owned()),
        ];
        if let Some(step) = key {
            attributes.push(KeyValue::new("baton.step_id", step));
        }
        let status = if outcome == "passed" {
            Status::Ok
        } else {
            Status::error(format!("wait ended: {outcome}"))
        };
        out.push(span(
            run,
            span_id,
            run.span_id(),
            name,
            SpanKind::Internal,
            (o.since, end),
            attributes,
            o.events,
            status,
        ));
    };
    for r in rows {
        let id: i64 = r.try_get("id")?;
        let at: DateTime<Utc> = r.try_get("at")?;
        let kind: String = r.try_get("kind")?;
        let step: Option<String> = r.try_get("step_id")?;
        let sqlx::types::Json(detail): sqlx::types::Json<serde_json::Value> = r.try_get("detail")?;
        let verdict = detail["verdict"].as_str().unwrap_or_default();
        let event = |name: &str| {
            let mut attrs = vec![KeyValue::new("baton.detail", detail.to_string())];
            if let Some(g) = detail["gate"].as_str() {
                attrs.push(KeyValue::new("baton.gate", g.to_owned()));
            }
            Event::new(name.to_owned(), time(at), attrs, 0)
        };
        match (kind.as_str(), verdict) {
            ("gate", "hold") => {
                let e = event("hold");
                let o = open.entry(step).or_insert_with(|| Open {
                    audit_id: id,
                    since: at,
                    gate: detail["gate"].as_str().unwrap_or_default().to_owned(),
                    approval: false,
                    events: Vec::new(),
                });
                o.approval |= detail["approval"] == true;
                o.events.push(e);
            }
            ("approved" | "rejected", _) => {
                let e = event(&kind);
                if let Some(o) = open.get_mut(&step) {
                    o.events.push(e);
                }
            }
            ("gate", "fail") | ("step_failed" | "step_cancelled", _) => {
                if let Some(o) = open.remove(&step) {
                    close(step, o, at, "failed", &mut out);
                }
            }
            ("gate", _) | ("gates_passed", _) => {
                if let Some(o) = open.remove(&step) {
                    close(step, o, at, "passed", &mut out);
                }
            }
            _ => {}
        }
    }
    for (step, o) in std::mem::take(&mut open) {
        close(step, o, run_finished, "run ended", &mut out);
    }
    Ok(out)
}

/// Drives a future to completion on this (blocking) thread.
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        match fut.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => return v,
            std::task::Poll::Pending => std::thread::park(),
        }
    }
}
