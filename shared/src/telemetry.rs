//! Logging and tracing set-up: JSON lines for machines, readable text on a
//! terminal, and OpenTelemetry spans over OTLP/HTTP when an endpoint is set.
//!
//! OTLP goes over HTTP with the blocking client and the batch processor's own
//! thread: the async reqwest client panics under the batch processor ("no
//! reactor running"), see docs/architecture.md, Dependency constraints.

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config_error::ConfigError;

/// How logs are written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    /// `auto` (JSON unless stderr is a terminal), `json` or `text`.
    pub format: String,
    /// A `tracing` filter such as `info` or `baton=debug,lapin=warn`; `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "auto".to_owned(),
            level: "info,lapin=warn,sqlx=warn".to_owned(),
        }
    }
}

/// Where spans go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP endpoint, e.g. `http://collector:4318`; empty turns tracing off.
    pub otlp_endpoint: String,
    /// Share of runs traced, 0.0 to 1.0 (children follow their run's decision).
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            sample_ratio: 1.0,
        }
    }
}

impl TelemetryConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(ConfigError::invalid(
                "telemetry.sample_ratio",
                "must be between 0.0 and 1.0",
            ));
        }
        if !self.otlp_endpoint.is_empty() && !self.otlp_endpoint.starts_with("http") {
            return Err(ConfigError::invalid(
                "telemetry.otlp_endpoint",
                "must be an http:// or https:// URL",
            ));
        }
        Ok(())
    }

    /// The traces URL: the endpoint with `/v1/traces` unless it names a path already.
    pub fn traces_url(&self) -> Option<String> {
        let e = self.otlp_endpoint.trim_end_matches('/');
        if e.is_empty() {
            None
        } else if e.ends_with("/v1/traces") {
            Some(e.to_owned())
        } else {
            Some(format!("{e}/v1/traces"))
        }
    }
}

/// An OTLP/HTTP span exporter for `cfg`, if tracing is on.
pub fn span_exporter(cfg: &TelemetryConfig) -> Option<opentelemetry_otlp::SpanExporter> {
    let url = cfg.traces_url()?;
    match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .with_timeout(Duration::from_secs(10))
        .build()
    {
        Ok(e) => Some(e),
        Err(e) => {
            eprintln!("warning: tracing disabled, cannot build the OTLP exporter: {e}");
            None
        }
    }
}

/// Keeps the tracer provider alive; call [`Telemetry::shutdown`] to flush spans on exit.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            eprintln!("warning: flushing spans failed: {e}");
        }
    }
}

/// Installs logging, and span export when configured. A second call is a no-op.
pub fn init(log: &LogConfig, tel: &TelemetryConfig, service: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    let json = match log.format.as_str() {
        "json" => true,
        "text" => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let provider = span_exporter(tel).map(|exporter| {
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                tel.sample_ratio,
            ))))
            .with_resource(
                Resource::builder()
                    .with_service_name(service.to_owned())
                    .with_attribute(KeyValue::new("service.namespace", "baton"))
                    .build(),
            )
            .build()
    });
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service.to_owned())));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let _ = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init()
    };
    Telemetry { provider }
}

/// Logging only (tools and tests that trace nothing).
pub fn init_logging(cfg: &LogConfig) {
    init(cfg, &TelemetryConfig::default(), "baton");
}

/// A W3C `traceparent` header value.
pub fn traceparent(trace: TraceId, span: SpanId, sampled: bool) -> String {
    format!("00-{trace}-{span}-{}", if sampled { "01" } else { "00" })
}

/// Parses a W3C `traceparent` into a remote span context.
pub fn parse_traceparent(s: &str) -> Option<SpanContext> {
    let mut parts = s.trim().split('-');
    let (Some("00"), Some(trace), Some(span), Some(flags), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let trace = TraceId::from_hex(trace).ok().filter(|t| *t != TraceId::INVALID)?;
    let span = SpanId::from_hex(span).ok().filter(|s| *s != SpanId::INVALID)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(SpanContext::new(
        trace,
        span,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    ))
}

/// An OpenTelemetry context whose parent is the remote span in `traceparent`.
pub fn remote_parent(traceparent: &str) -> Option<Context> {
    use opentelemetry::trace::TraceContextExt;
    parse_traceparent(traceparent).map(|sc| Context::new().with_remote_span_context(sc))
}

/// Fresh random ids.
pub fn new_trace_id() -> TraceId {
    TraceId::from_bytes(rand::random())
}

pub fn new_span_id() -> SpanId {
    SpanId::from_bytes(rand::random())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_junk() {
        let (t, s) = (new_trace_id(), new_span_id());
        let tp = traceparent(t, s, true);
        let sc = parse_traceparent(&tp).unwrap();
        assert_eq!((sc.trace_id(), sc.span_id(), sc.is_sampled()), (t, s, true));
        assert!(sc.is_remote());
        for bad in [
            "",
            "00-xyz",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            &format!("00-{}-{}-01", TraceId::INVALID, s),
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn endpoint_gets_the_traces_path_once() {
        let mut c = TelemetryConfig::default();
        assert_eq!(c.traces_url(), None);
        c.otlp_endpoint = "http://collector:4318/".into();
        assert_eq!(c.traces_url().unwrap(), "http://collector:4318/v1/traces");
        c.otlp_endpoint = "http://collector:4318/v1/traces".into();
        assert_eq!(c.traces_url().unwrap(), "http://collector:4318/v1/traces");
    }
}
