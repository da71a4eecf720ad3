//! Logging, and OpenTelemetry trace export over OTLP/gRPC when configured.
//!
//! Export is off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set, and `OTEL_SDK_DISABLED=true` turns it off again; the standard `OTEL_*` variables
//! (headers, timeout, sampler, batch settings, service name, resource attributes) apply as
//! the OpenTelemetry SDK reads them. Each RPC is one server span named after its method
//! (`roster.v1.UserService/GetUser`) with the gRPC semantic-convention attributes, a child of
//! the caller's span when the request carries a W3C `traceparent`.
use std::future::Future;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether RPC spans go to an OTLP collector (so they carry the OpenTelemetry fields).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The log writer and the trace export pipeline; [`Telemetry::shutdown`] flushes both.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    logs: crate::logwriter::LogGuard,
}

impl Telemetry {
    /// Exports the spans still buffered (bounded by the exporter's timeout) and writes the
    /// last log lines. Call it outside the runtime's worker threads, while the runtime is
    /// still alive: the export runs on it.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "flushing traces");
        }
        drop(self.logs);
    }
}

fn otlp_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Installs the global subscriber: logs to stderr (`RUST_LOG`, default `info`; JSON lines with
/// `ROSTER_LOG_FORMAT=json`) and, when `traces` and OTLP is configured, span export. The
/// exporter's network I/O runs on `runtime`.
pub fn init(runtime: &tokio::runtime::Handle, traces: bool) -> anyhow::Result<Telemetry> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // ROSTER_LOG_FORMAT=json: one JSON object per line, with the span fields (method,
    // request_id, project, key) on every line of a call, for log pipelines.
    let json = std::env::var("ROSTER_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    // Lines are written in batches by a thread of their own (see logwriter): no RPC waits on
    // stderr, and a busy server writes many call lines per write(2).
    let (writer, guard) = crate::logwriter::spawn(std::io::stderr())?;
    let logs = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(writer)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(writer)
            .boxed()
    };
    let provider = if traces && otlp_configured() {
        Some(provider(runtime)?)
    } else {
        None
    };
    let spans = provider.as_ref().map(|p| {
        // Roster's own spans only: the libraries' internals are not part of the trace.
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("roster"))
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("roster", tracing::Level::INFO),
            )
    });
    // Per-layer filters: RUST_LOG=warn quiets the logs, not the exported spans.
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(spans)
        .try_init()?;
    if provider.is_some() {
        EXPORTING.store(true, Ordering::Relaxed);
        tracing::info!("exporting traces over OTLP");
    }
    Ok(Telemetry {
        provider,
        logs: guard,
    })
}

fn provider(runtime: &tokio::runtime::Handle) -> anyhow::Result<SdkTracerProvider> {
    // The exporter's lazy channel is made here, so inside the runtime.
    let _entered = runtime.enter();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| anyhow::anyhow!("OTLP trace exporter: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder().with_attribute(
        opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
    );
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("roster");
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(OnRuntime {
            inner: Arc::new(exporter),
            runtime: runtime.clone(),
        })
        .with_resource(resource.build())
        .build())
}

/// The SDK's batch processor exports from a thread of its own with a plain executor, where
/// tonic's transport (which needs the tokio reactor) cannot run; so each export is handed to
/// the server's runtime and only awaited there.
#[derive(Debug)]
struct OnRuntime {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    runtime: tokio::runtime::Handle,
}

impl SpanExporter for OnRuntime {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let inner = self.inner.clone();
        let task = self.runtime.spawn(async move { inner.export(batch).await });
        async move {
            task.await
                .unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(e.to_string())))
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        // Called while the provider is built, before the exporter is shared.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// Makes `span` a child of the caller's span named by the request's `traceparent`.
pub fn adopt_remote_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    let _ = span.set_parent(parent);
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The OpenTelemetry status of a gRPC server span: the codes that are the server's fault.
pub fn is_server_error(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    )
}
