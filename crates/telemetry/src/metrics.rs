//! The metrics pipeline: OpenTelemetry instruments, read on demand for the
//! Prometheus text exposition on `/metrics` (and, when configured, pushed over
//! OTLP to the metrics-aggregator from the same instruments, so nothing is
//! counted twice).
//!
//! Services create their own instruments with [`meter`]; the request metrics
//! of HTTP and gRPC live here so every service names them the same way.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_otlp::{MetricExporter, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    InstrumentKind, ManualReader, PeriodicReader, Pipeline, SdkMeterProvider, Temporality,
};
use text::{escape_label, format_float, header, sanitize};

pub use opentelemetry::KeyValue;
pub use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter, UpDownCounter};

/// Bucket bounds, in seconds, for request and job durations: 0.5 ms to 60 s.
pub const DURATION_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

struct Pipeline_ {
    provider: SdkMeterProvider,
    reader: Arc<ManualReader>,
}

static PIPELINE: OnceLock<Pipeline_> = OnceLock::new();

/// A [`MetricReader`] that shares one [`ManualReader`] between the provider
/// and the `/metrics` handler.
#[derive(Debug, Clone)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline);
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// The `authorization: Bearer <token>` metadata of a push, the token read
/// (trimmed) from `token_file`; no file: no metadata.
///
/// # Errors
///
/// The file cannot be read, is empty, or the token is not a header value.
pub fn push_metadata(
    token_file: Option<&std::path::Path>,
) -> Result<tonic::metadata::MetadataMap, opentelemetry_otlp::ExporterBuildError> {
    let mut metadata = tonic::metadata::MetadataMap::new();
    let Some(path) = token_file else {
        return Ok(metadata);
    };
    let invalid = |why: String| {
        opentelemetry_otlp::ExporterBuildError::InvalidConfiguration(format!(
            "--metrics-push-token-file {}: {why}",
            path.display()
        ))
    };
    let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(invalid("empty".into()));
    }
    let value = format!("Bearer {token}").parse().map_err(|_| invalid("not a valid header value".into()))?;
    metadata.insert("authorization", value);
    Ok(metadata)
}

/// The push side: an OTLP/gRPC metric exporter to `endpoint` (cumulative
/// temporality, like `/metrics`), read every `--metrics-push-interval`,
/// sending the bearer token of `--metrics-push-token-file` when set, over TLS
/// when `--metrics-push-tls-ca` is set (with the client certificate, when
/// set, re-read at every new connection). Must be called inside a Tokio
/// runtime.
///
/// # Errors
///
/// An endpoint the exporter cannot use, an unusable token file or TLS files.
pub fn push_reader(
    endpoint: &str,
    config: &crate::TelemetryConfig,
) -> Result<PeriodicReader<MetricExporter>, opentelemetry_otlp::ExporterBuildError> {
    use opentelemetry_otlp::WithTonicConfig as _;
    let interval = config.metrics_push_interval;
    let timeout = interval.clamp(Duration::from_secs(1), Duration::from_secs(10));
    let invalid = |why: String| opentelemetry_otlp::ExporterBuildError::InvalidConfiguration(why);
    let mut builder = MetricExporter::builder()
        .with_tonic()
        .with_metadata(push_metadata(config.metrics_push_token_file.as_deref())?)
        .with_endpoint(endpoint.to_owned())
        .with_timeout(timeout);
    if let Some(files) = config.metrics_push_tls().map_err(|e| invalid(e.to_string()))? {
        let tls = shoal_tls::ClientTls::load(&files)
            .map_err(|e| invalid(error_chain(&e)))?
            .reloading(shoal_tls::RELOAD_INTERVAL);
        let uri: http::Uri = endpoint.parse().map_err(|_| invalid(format!("`{endpoint}` is not a URI")))?;
        let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(4317);
        let server_name = config.metrics_push_tls_server_name.clone().unwrap_or_else(|| host.clone());
        let connector = tls.connector(&server_name).map_err(|e| invalid(e.to_string()))?;
        // The connector does the TLS; tonic dials `http://` so it adds none.
        let plain =
            if host.contains(':') { format!("http://[{host}]:{port}") } else { format!("http://{host}:{port}") };
        let channel = tonic::transport::Endpoint::from_shared(plain)
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect_with_connector_lazy(connector);
        builder = builder.with_channel(channel);
    }
    let exporter = builder.with_temporality(Temporality::Cumulative).build()?;
    Ok(PeriodicReader::builder(exporter).with_interval(interval).build())
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(source) = next {
        text.push_str(": ");
        text.push_str(&source.to_string());
        next = source.source();
    }
    text
}

pub(crate) fn install(resource: Resource, push: Option<PeriodicReader<MetricExporter>>) {
    PIPELINE.get_or_init(|| {
        let reader = Arc::new(ManualReader::builder().build());
        let mut builder = SdkMeterProvider::builder().with_resource(resource).with_reader(SharedReader(reader.clone()));
        // One set of instruments, two readers: each keeps its own aggregation
        // state, so pushing never changes what `/metrics` shows.
        if let Some(push) = push {
            builder = builder.with_reader(push);
        }
        let provider = builder.build();
        opentelemetry::global::set_meter_provider(provider.clone());
        Pipeline_ { provider, reader }
    });
}

/// Flushes and stops the metric readers (a final push when pushing).
pub(crate) fn shutdown(timeout: Duration) {
    if let Some(pipeline) = PIPELINE.get() {
        let _ = pipeline.provider.shutdown_with_timeout(timeout);
    }
}

/// A meter for a service's own instruments. Before [`crate::init`] it is a
/// no-op meter.
pub fn meter(name: &'static str) -> Meter {
    match PIPELINE.get() {
        Some(pipeline) => pipeline.provider.meter(name),
        None => opentelemetry::global::meter(name),
    }
}

/// The Prometheus text exposition (format 0.0.4) of every instrument.
pub fn render() -> String {
    let mut out = String::with_capacity(4096);
    let Some(pipeline) = PIPELINE.get() else {
        return out;
    };
    let mut rm = ResourceMetrics::default();
    if pipeline.reader.collect(&mut rm).is_err() {
        return out;
    }
    for scope in rm.scope_metrics() {
        for metric in scope.metrics() {
            let name = sanitize(metric.name());
            match metric.data() {
                AggregatedMetrics::F64(data) => encode(&mut out, &name, metric.description(), data, |v| *v),
                AggregatedMetrics::U64(data) => encode(&mut out, &name, metric.description(), data, |v| *v as f64),
                AggregatedMetrics::I64(data) => encode(&mut out, &name, metric.description(), data, |v| *v as f64),
            }
        }
    }
    out
}

fn encode<T>(out: &mut String, name: &str, help: &str, data: &MetricData<T>, to_f64: impl Fn(&T) -> f64)
where
    T: Copy,
{
    match data {
        MetricData::Sum(sum) if sum.is_monotonic() => {
            let name = if name.ends_with("_total") { name.to_owned() } else { format!("{name}_total") };
            header(out, &name, help, "counter");
            for point in sum.data_points() {
                sample(out, &name, point.attributes(), None, to_f64(&point.value()));
            }
        }
        MetricData::Sum(sum) => {
            header(out, name, help, "gauge");
            for point in sum.data_points() {
                sample(out, name, point.attributes(), None, to_f64(&point.value()));
            }
        }
        MetricData::Gauge(gauge) => {
            header(out, name, help, "gauge");
            for point in gauge.data_points() {
                sample(out, name, point.attributes(), None, to_f64(&point.value()));
            }
        }
        MetricData::Histogram(histogram) => {
            header(out, name, help, "histogram");
            let bucket = format!("{name}_bucket");
            for point in histogram.data_points() {
                let mut cumulative = 0u64;
                let counts: Vec<u64> = point.bucket_counts().collect();
                for (bound, count) in point.bounds().zip(counts.iter()) {
                    cumulative += count;
                    sample(out, &bucket, point.attributes(), Some(&format_float(bound)), cumulative as f64);
                }
                sample(out, &bucket, point.attributes(), Some("+Inf"), point.count() as f64);
                sample(out, &format!("{name}_sum"), point.attributes(), None, to_f64(&point.sum()));
                sample(out, &format!("{name}_count"), point.attributes(), None, point.count() as f64);
            }
        }
        // Exponential histograms have no classic Prometheus text form; the
        // aggregator serves them. Shoal's own instruments never use them.
        MetricData::ExponentialHistogram(_) => {}
    }
}

fn sample<'a>(
    out: &mut String,
    name: &str,
    attributes: impl Iterator<Item = &'a KeyValue>,
    le: Option<&str>,
    value: f64,
) {
    out.push_str(name);
    let mut first = true;
    let mut open = |out: &mut String| {
        out.push(if first { '{' } else { ',' });
        first = false;
    };
    for kv in attributes {
        open(out);
        out.push_str(&sanitize(kv.key.as_str()));
        out.push_str("=\"");
        escape_label(out, &kv.value.as_str());
        out.push('"');
    }
    if let Some(le) = le {
        open(out);
        out.push_str("le=\"");
        out.push_str(le);
        out.push('"');
    }
    if !first {
        out.push('}');
    }
    out.push(' ');
    out.push_str(&format_float(value));
    out.push('\n');
}

/// Prometheus text-format helpers (exposition format 0.0.4), shared with the
/// metrics-aggregator's fleet exposition.
pub mod text {
    use std::fmt::Write as _;

    /// Writes the `# HELP` (when `help` is not empty) and `# TYPE` lines.
    pub fn header(out: &mut String, name: &str, help: &str, kind: &str) {
        if !help.is_empty() {
            let _ = writeln!(out, "# HELP {name} {}", help.replace('\\', "\\\\").replace('\n', "\\n"));
        }
        let _ = writeln!(out, "# TYPE {name} {kind}");
    }

    /// Appends a label value, escaped (`\\`, `\"`, `\n`).
    pub fn escape_label(out: &mut String, value: &str) {
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
    }

    /// A sample value as Prometheus writes it (`+Inf`, `NaN`, no `-0`).
    pub fn format_float(value: f64) -> String {
        if value.is_infinite() {
            if value > 0.0 { "+Inf".into() } else { "-Inf".into() }
        } else if value.is_nan() {
            "NaN".into()
        } else {
            let mut s = format!("{value}");
            if s == "-0" {
                s = "0".into();
            }
            s
        }
    }

    /// Maps an OpenTelemetry name (dots allowed) to a Prometheus one.
    pub fn sanitize(name: &str) -> String {
        let mut out: String =
            name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == ':' { c } else { '_' }).collect();
        if out.starts_with(|c: char| c.is_ascii_digit()) {
            out.insert(0, '_');
        }
        out
    }
}

/// The RED instruments of one protocol side: a request counter and a
/// duration histogram in seconds.
#[derive(Debug, Clone)]
pub struct RequestMetrics {
    pub requests: Counter<u64>,
    pub duration: Histogram<f64>,
}

impl RequestMetrics {
    fn new(counter: &'static str, histogram: &'static str, what: &str) -> Self {
        let meter = meter("shoal");
        Self {
            requests: meter.u64_counter(counter).with_description(format!("{what} handled")).build(),
            duration: meter
                .f64_histogram(histogram)
                .with_unit("s")
                .with_description(format!("{what} duration in seconds"))
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
        }
    }

    /// Records one finished request.
    pub fn record(&self, attributes: &[KeyValue], seconds: f64) {
        self.requests.add(1, attributes);
        self.duration.record(seconds, attributes);
    }
}

/// `http_requests_total{method,endpoint,status}` and
/// `http_request_duration_seconds{method,endpoint,status}`.
pub fn http_server() -> &'static RequestMetrics {
    static M: OnceLock<RequestMetrics> = OnceLock::new();
    M.get_or_init(|| RequestMetrics::new("http_requests", "http_request_duration_seconds", "HTTP requests"))
}

/// `grpc_server_requests_total{service,method,code}` and
/// `grpc_server_request_duration_seconds{...}`.
pub fn grpc_server() -> &'static RequestMetrics {
    static M: OnceLock<RequestMetrics> = OnceLock::new();
    M.get_or_init(|| {
        RequestMetrics::new("grpc_server_requests", "grpc_server_request_duration_seconds", "gRPC requests served")
    })
}

/// `grpc_client_requests_total{service,method,code}` and
/// `grpc_client_request_duration_seconds{...}`.
pub fn grpc_client() -> &'static RequestMetrics {
    static M: OnceLock<RequestMetrics> = OnceLock::new();
    M.get_or_init(|| {
        RequestMetrics::new("grpc_client_requests", "grpc_client_request_duration_seconds", "gRPC requests sent")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_push_token_comes_from_its_file() {
        assert!(push_metadata(None).unwrap().is_empty());
        let path = std::env::temp_dir().join(format!("shoal-push-token-{}", std::process::id()));
        std::fs::write(&path, "abc\n").unwrap();
        let metadata = push_metadata(Some(&path)).unwrap();
        assert_eq!(metadata.get("authorization").unwrap(), "Bearer abc");
        std::fs::write(&path, "").unwrap();
        assert!(push_metadata(Some(&path)).is_err());
        std::fs::remove_file(&path).unwrap();
        assert!(push_metadata(Some(&path)).is_err());
    }

    #[test]
    fn names_and_labels_are_prometheus_safe() {
        assert_eq!(sanitize("http.server.duration"), "http_server_duration");
        assert_eq!(sanitize("9lives"), "_9lives");
        let mut out = String::new();
        escape_label(&mut out, "a\"b\\c\nd");
        assert_eq!(out, "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn floats_render_like_prometheus() {
        assert_eq!(format_float(f64::INFINITY), "+Inf");
        assert_eq!(format_float(0.005), "0.005");
        assert_eq!(format_float(3.0), "3");
    }
}
