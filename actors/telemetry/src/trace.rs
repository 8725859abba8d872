//! Logs and traces: one `tracing` subscriber per process, with an OpenTelemetry layer
//! exporting spans over OTLP/gRPC only when an endpoint is configured, and the W3C
//! trace context carried in gRPC metadata on every hop ([`inject`], [`set_remote_parent`]).
//!
//! Without an endpoint no exporter, no OpenTelemetry layer and no background thread
//! exist: spans are plain `tracing` spans and [`inject`] writes nothing, so the fast
//! path pays nothing for a feature that is off.

use std::{sync::Arc, time::Duration};

use opentelemetry::{
    Context, KeyValue,
    propagation::{Extractor, Injector},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    error::{OTelSdkError, OTelSdkResult},
    propagation::TraceContextPropagator,
    trace::{SdkTracerProvider, SpanData, SpanExporter},
};
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

use crate::TelemetryError;

/// Where spans go: `FSB_OTLP_ENDPOINT`, else the standard OpenTelemetry variables
/// (traces-specific first). `None` switches export off.
pub fn otlp_endpoint() -> Option<String> {
    [
        "FSB_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .filter_map(|k| std::env::var(k).ok())
    .map(|v| v.trim().to_owned())
    .find(|v| !v.is_empty())
}

/// How a binary logs.
#[derive(Clone, Copy, Debug)]
pub struct LogOptions {
    /// `RUST_LOG` when unset.
    pub default_filter: &'static str,
    /// Write to stderr (the CLI keeps stdout for its output).
    pub stderr: bool,
    /// Colour codes (only on a terminal).
    pub ansi: bool,
    /// Export spans when an endpoint is configured (off for one-shot CLI commands).
    pub export: bool,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            default_filter: "info",
            stderr: false,
            ansi: std::io::IsTerminal::is_terminal(&std::io::stdout()),
            export: true,
        }
    }
}

/// Keeps the exporter alive; dropping it flushes the spans not yet sent.
#[derive(Debug, Default)]
#[must_use = "dropping the guard stops trace export"]
pub struct TraceGuard {
    provider: Option<SdkTracerProvider>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TraceGuard {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TraceGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("trace export shutdown: {e}");
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Install the process's subscriber: formatted logs filtered by `RUST_LOG`, plus span
/// export to [`otlp_endpoint`] when there is one, as service `service`.
pub fn init(service: &'static str, log: LogOptions) -> Result<TraceGuard, TelemetryError> {
    let filter =
        || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(log.default_filter));
    let fmt = tracing_subscriber::fmt::layer().with_ansi(log.ansi);
    let fmt = if log.stderr {
        fmt.with_writer(std::io::stderr).boxed()
    } else {
        fmt.boxed()
    };
    let Some(endpoint) = otlp_endpoint().filter(|_| log.export) else {
        tracing_subscriber::registry()
            .with(fmt.with_filter(filter()))
            .try_init()
            .map_err(|e| TelemetryError::Trace(e.to_string()))?;
        return Ok(TraceGuard::default());
    };
    let (provider, runtime) = provider(service, &endpoint)?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // Our spans at info whatever RUST_LOG says for logs: a trace missing its agent or
    // containerd layer because logs were turned down would mislead.
    let spans = EnvFilter::new("info");
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service))
        .with_filter(spans);
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter()))
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::Trace(e.to_string()))?;
    tracing::info!(%endpoint, service, "exporting traces over OTLP");
    Ok(TraceGuard {
        provider: Some(provider),
        runtime: Some(runtime),
    })
}

/// A batch exporter to `endpoint` on its own one-thread runtime: the SDK's batch
/// thread has no reactor, and tonic's channel needs one.
fn provider(
    service: &'static str,
    endpoint: &str,
) -> Result<(SdkTracerProvider, tokio::runtime::Runtime), TelemetryError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("fsb-otlp")
        .enable_all()
        .build()
        .map_err(|e| TelemetryError::Trace(format!("OTLP runtime: {e}")))?;
    let exporter = {
        let _in_runtime = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| TelemetryError::Trace(format!("OTLP exporter for {endpoint}: {e}")))?
    };
    let exporter = OnRuntime {
        inner: Arc::new(exporter),
        runtime: runtime.handle().clone(),
    };
    let resource = Resource::builder()
        .with_service_name(service)
        .with_attribute(KeyValue::new("service.namespace", "fast-sandbox"))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    Ok((provider, runtime))
}

/// Runs each export on `runtime`, from the SDK's batch thread.
#[derive(Debug)]
struct OnRuntime {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    runtime: tokio::runtime::Handle,
}

impl SpanExporter for OnRuntime {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let inner = Arc::clone(&self.inner);
        let sent = self.runtime.spawn(async move { inner.export(batch).await });
        async move {
            sent.await
                .unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(e.to_string())))
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// Write the current span's trace context (`traceparent`, `tracestate`) into
/// outgoing gRPC metadata. Writes nothing when no trace is being recorded.
pub fn inject(metadata: &mut MetadataMap) {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(metadata));
    });
}

/// Make `span` continue the trace whose context came in `metadata` (from a client or
/// an upstream hop); a request without one starts a new trace at `span`.
pub fn set_remote_parent(span: &tracing::Span, metadata: &MetadataMap) {
    // Against an empty context: `extract` falls back to the thread's current one, which
    // would make a request without a header look linked to whatever span is active.
    let cx = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract_with_context(&Context::new(), &MetadataExtractor(metadata))
    });
    if cx.span().span_context().is_valid() {
        // Fails only if the span was already started or is disabled: then it simply
        // stays where it is in the trace.
        let _ = span.set_parent(cx);
    }
}

/// The trace id of `span` as 32 hex digits, or `None` when no trace is recorded.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx: Context = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::propagation::TextMapPropagator;

    #[test]
    fn a_traceparent_round_trips_through_grpc_metadata() {
        let propagator = TraceContextPropagator::new();
        let mut incoming = MetadataMap::new();
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        incoming.insert("traceparent", traceparent.parse().unwrap());
        let cx = propagator.extract(&MetadataExtractor(&incoming));
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote());
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );

        let mut outgoing = MetadataMap::new();
        propagator.inject_context(&cx, &mut MetadataInjector(&mut outgoing));
        assert_eq!(outgoing.get("traceparent").unwrap(), traceparent);
    }

    #[test]
    fn without_a_recorded_trace_nothing_is_injected() {
        let mut md = MetadataMap::new();
        inject(&mut md);
        assert!(md.is_empty());
    }

    #[test]
    fn garbage_in_the_header_starts_a_new_trace() {
        let mut md = MetadataMap::new();
        md.insert("traceparent", "00-zz-yy-01".parse().unwrap());
        let cx = TraceContextPropagator::new().extract(&MetadataExtractor(&md));
        assert!(!cx.span().span_context().is_valid());
    }
}
