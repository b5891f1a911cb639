//! Everything a Shoal service needs to be observable, so the services
//! themselves carry none of it:
//!
//! - [`init`]: one call that installs JSON or text logs (with trace and span
//!   ids on every line inside a span), OpenTelemetry tracing (exported over
//!   OTLP only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set) and the metrics
//!   pipeline (pushed over OTLP to the metrics-aggregator only when
//!   `SHOAL_METRICS_PUSH_ENDPOINT` is set); the returned [`Telemetry`] flushes everything on shutdown.
//! - [`propagation`]: W3C trace context across HTTP headers and gRPC metadata.
//! - [`http`] and [`grpc`]: tower layers that give every request a span and
//!   the RED metrics (`http_requests_total`, `grpc_server_requests_total`,
//!   duration histograms in seconds), labelled by route template, never by
//!   raw path.
//! - [`config`]: the telemetry settings and the duration parser.
//!
//! The service lifecycle (main, signals, admin listener, listeners, gRPC
//! serving and the drain) is `shoal-service`'s.

pub mod config;
pub mod grpc;
pub mod http;
mod logging;
pub mod metrics;
pub mod propagation;

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracerProvider, TracerProviderBuilder};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer as _};

pub use config::{LogFormat, TelemetryConfig};
pub use logging::rfc3339_from_unix_ms;

/// Errors while installing telemetry. Each is fatal at start-up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid RUST_LOG filter: {0}")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    #[error("cannot build the OTLP exporter for {endpoint}")]
    Exporter {
        endpoint: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// The installed telemetry pipeline. Call [`Telemetry::shutdown`] last, after
/// the service has drained, to flush spans and metrics.
#[derive(Debug)]
pub struct Telemetry {
    tracer_provider: SdkTracerProvider,
}

impl Telemetry {
    /// Flushes and stops the exporters, waiting at most `timeout`.
    pub fn shutdown(self, timeout: Duration) {
        if let Err(error) = self.tracer_provider.shutdown_with_timeout(timeout) {
            eprintln!("telemetry: trace flush failed: {error}");
        }
        metrics::shutdown(timeout);
    }

    /// The tracer provider, for tests that add their own span processors.
    pub fn tracer_provider(&self) -> &SdkTracerProvider {
        &self.tracer_provider
    }
}

static TEST_INIT: OnceLock<()> = OnceLock::new();

/// Installs logging, tracing and metrics for the service `service_name`.
///
/// Must be called once, inside a Tokio runtime (the OTLP exporter needs one).
///
/// # Errors
///
/// A bad `RUST_LOG`, an OTLP endpoint that cannot be used, or a second call.
pub fn init(service_name: &'static str, config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    if config.otlp_endpoint.is_some() {
        return init_with(service_name, config, |builder| builder);
    }
    // Nowhere to send spans: record none that start here (their ids still
    // exist, so logs carry trace ids and the context still propagates), and
    // honour a caller's sampled parent. Recording spans only to drop them
    // costs about a microsecond per request.
    init_with(service_name, config, |builder| {
        builder.with_sampler(opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
            opentelemetry_sdk::trace::Sampler::AlwaysOff,
        )))
    })
}

/// Like [`init`], letting the caller add to the tracer provider (tests add an
/// in-memory span exporter to inspect spans).
///
/// # Errors
///
/// As [`init`].
pub fn init_with(
    service_name: &'static str,
    config: &TelemetryConfig,
    customize: impl FnOnce(TracerProviderBuilder) -> TracerProviderBuilder,
) -> Result<Telemetry, TelemetryError> {
    let resource = resource(service_name);
    let mut builder = SdkTracerProvider::builder().with_resource(resource.clone());
    if let Some(endpoint) = &config.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| TelemetryError::Exporter { endpoint: endpoint.clone(), source: Box::new(e) })?;
        builder = builder.with_batch_exporter(exporter);
    }
    let tracer_provider = customize(builder).build();
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(tracer_provider.clone());
    let push = match &config.metrics_push_endpoint {
        Some(endpoint) => Some(
            metrics::push_reader(endpoint, config)
                .map_err(|e| TelemetryError::Exporter { endpoint: endpoint.clone(), source: Box::new(e) })?,
        ),
        None => None,
    };
    metrics::install(resource, push);

    let filter = match &config.log_filter {
        Some(directives) => EnvFilter::try_new(directives)?,
        None => EnvFilter::try_new("info")?,
    };
    // Only our own request-level spans become OpenTelemetry spans; the
    // debug-level internals of hyper, h2 and tonic would be noise and cost.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer_provider.tracer(service_name))
        // No source locations, thread names or busy/idle timings on
        // spans: allocations and clock reads on every request for little.
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(LevelFilter::INFO);
    let registry = tracing_subscriber::registry().with(otel);
    let result = match config.log_format {
        LogFormat::Json => {
            let dispatch = logging::DispatchSlot::default();
            registry.with(dispatch.clone()).with(logging::json_layer(dispatch).with_filter(filter)).try_init()
        }
        LogFormat::Text => registry.with(logging::text_layer().with_filter(filter)).try_init(),
    };
    result.map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(Telemetry { tracer_provider })
}

/// Installs quiet telemetry once per process, for tests: spans get real
/// trace ids and metrics are recorded, logs only appear when `RUST_LOG` is set.
pub fn init_for_tests() {
    TEST_INIT.get_or_init(|| {
        let config = TelemetryConfig {
            log_format: LogFormat::Text,
            log_filter: Some(std::env::var("RUST_LOG").unwrap_or_else(|_| "off".into())),
            ..TelemetryConfig::default()
        };
        if let Ok(telemetry) = init("shoal-test", &config) {
            // Kept for the life of the test process.
            std::mem::forget(telemetry);
        }
    });
}

fn resource(service_name: &'static str) -> Resource {
    Resource::builder()
        .with_service_name(service_name)
        .with_attribute(opentelemetry::KeyValue::new("service.instance.id", instance_id().to_owned()))
        .build()
}

/// A per-process identity for this service instance: the pod or host name
/// when known (`HOSTNAME`), else a random id.
pub fn instance_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or_default();
            format!("{}-{:08x}", std::process::id(), nanos)
        })
    })
}
