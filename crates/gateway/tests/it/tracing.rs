//! One trace from the HTTP client through the gateway to the worker.

use std::time::Duration;

use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use serde_json::json;
use shoal_telemetry::{LogFormat, TelemetryConfig};

use crate::helpers::*;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

fn find<'a>(spans: &'a [SpanData], kind: SpanKind, name: &str) -> Option<&'a SpanData> {
    spans.iter().find(|s| s.span_kind == kind && s.name.starts_with(name))
}

#[tokio::test]
async fn one_trace_spans_gateway_and_worker() {
    let exporter = InMemorySpanExporter::default();
    let config =
        TelemetryConfig { log_format: LogFormat::Text, log_filter: Some("off".into()), ..TelemetryConfig::default() };
    let telemetry =
        shoal_telemetry::init_with("shoal-test", &config, |b| b.with_simple_exporter(exporter.clone())).unwrap();

    let worker = spawn_worker(&[]).await;
    let gateway = spawn_gateway(&[worker.addr], &[], &["--trust-traceparent", "true"]).await;
    let response = gateway
        .http
        .post(format!("{}/v1/tasks/echo", gateway.url))
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .json(&json!({"traced": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let rpc = "shoal.worker.v1.WorkerService/Execute";
    let spans = eventually(Duration::from_secs(5), || async {
        let spans = exporter.get_finished_spans().ok()?;
        let all = find(&spans, SpanKind::Server, "POST /v1/tasks/{kind}").is_some()
            && find(&spans, SpanKind::Client, rpc).is_some()
            && find(&spans, SpanKind::Server, rpc).is_some();
        all.then_some(spans)
    })
    .await
    .expect("gateway server, gRPC client and worker server spans are exported");

    let trace_id = TraceId::from_hex(TRACE_ID).unwrap();
    let gateway_span = find(&spans, SpanKind::Server, "POST /v1/tasks/{kind}").unwrap();
    let client_span = find(&spans, SpanKind::Client, rpc).unwrap();
    let worker_span = find(&spans, SpanKind::Server, rpc).unwrap();

    assert_eq!(gateway_span.span_context.trace_id(), trace_id);
    assert_eq!(gateway_span.parent_span_id, SpanId::from_hex(PARENT_ID).unwrap());
    assert_eq!(client_span.span_context.trace_id(), trace_id);
    assert_eq!(client_span.parent_span_id, gateway_span.span_context.span_id());
    assert_eq!(worker_span.span_context.trace_id(), trace_id);
    assert_eq!(worker_span.parent_span_id, client_span.span_context.span_id());

    drop(gateway);
    drop(worker);
    telemetry.shutdown(Duration::from_secs(1));
}

#[tokio::test]
async fn an_untrusted_traceparent_is_dropped_and_the_trace_is_the_gateways_own() {
    let exporter = InMemorySpanExporter::default();
    let config =
        TelemetryConfig { log_format: LogFormat::Text, log_filter: Some("off".into()), ..TelemetryConfig::default() };
    let telemetry =
        shoal_telemetry::init_with("shoal-test", &config, |b| b.with_simple_exporter(exporter.clone())).unwrap();
    let gateway = spawn_gateway(&[], &[], &[]).await;
    let response = gateway
        .http
        .get(format!("{}/v1/no-such-route", gateway.url))
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .send()
        .await
        .unwrap();
    let problem = crate::helpers::expect_problem(response, 404).await;
    let request_id = problem["request_id"].as_str().unwrap().to_owned();
    assert_ne!(request_id, TRACE_ID, "the caller chose the request id");
    let spans = eventually(Duration::from_secs(5), || async {
        let spans = exporter.get_finished_spans().ok()?;
        find(&spans, SpanKind::Server, "GET").is_some().then_some(spans)
    })
    .await
    .expect("the gateway's span is exported");
    let span = find(&spans, SpanKind::Server, "GET").unwrap();
    assert_ne!(span.span_context.trace_id(), TraceId::from_hex(TRACE_ID).unwrap());
    assert_eq!(span.span_context.trace_id().to_string(), request_id);
    assert_eq!(span.parent_span_id, SpanId::INVALID);
    drop(gateway);
    telemetry.shutdown(Duration::from_secs(1));
}
