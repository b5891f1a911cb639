//! OTLP ingestion with mutual TLS and the push token: only a pusher with a
//! certificate from the fleet's CA *and* the token is counted. The pusher is
//! the one every Shoal service runs (`shoal_telemetry::metrics::push_reader`).

use std::time::Duration;

use clap::Parser as _;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use shoal_metrics_aggregator::{Aggregator, Config};
use shoal_proto::aggregator::v1::aggregator_service_client::AggregatorServiceClient;
use shoal_proto::aggregator::v1::{Grouping, InstantRequest, Selector};
use shoal_telemetry::TelemetryConfig;
use shoal_testkit::certs::{Leaf, TestCa};
use tonic::transport::Endpoint;

const NAME: &str = "metrics-aggregator";

/// A meter provider whose reader is the services' own pusher.
fn pusher(endpoint: &str, config: &TelemetryConfig, instance: &str) -> SdkMeterProvider {
    let reader = shoal_telemetry::metrics::push_reader(endpoint, config).expect("push reader");
    let resource = Resource::builder()
        .with_service_name("pusher")
        .with_attribute(opentelemetry::KeyValue::new("service.instance.id", instance.to_owned()))
        .build();
    SdkMeterProvider::builder().with_reader(reader).with_resource(resource).build()
}

async fn push(provider: &SdkMeterProvider, metric: &'static str) {
    provider.meter("test").u64_counter(metric).build().add(3, &[]);
    let provider = provider.clone();
    // Failures show as a missing series below.
    let _ = tokio::task::spawn_blocking(move || provider.force_flush()).await;
}

fn tls_config(ca: &TestCa, identity: Option<&Leaf>, token: Option<&std::path::Path>) -> TelemetryConfig {
    TelemetryConfig {
        metrics_push_tls_ca: Some(ca.cert.clone()),
        metrics_push_tls_cert: identity.map(|l| l.cert.clone()),
        metrics_push_tls_key: identity.map(|l| l.key.clone()),
        metrics_push_tls_server_name: Some(NAME.into()),
        metrics_push_token_file: token.map(ToOwned::to_owned),
        ..TelemetryConfig::default()
    }
}

#[tokio::test]
async fn only_pushers_with_a_certificate_and_the_token_are_counted() {
    shoal_telemetry::init_for_tests();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let server = ca.issue("aggregator", &[NAME]);
    let client = ca.issue("worker", &["worker"]);
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let config = Config::try_parse_from([
        "shoal-metrics-aggregator",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--max-source-push-rate",
        "100000",
        "--grpc-tls-cert",
        server.cert.to_str().unwrap(),
        "--grpc-tls-key",
        server.key.to_str().unwrap(),
        "--grpc-tls-client-ca",
        ca.cert.to_str().unwrap(),
        "--ingest-token-file",
        token.to_str().unwrap(),
    ])
    .unwrap();
    let aggregator = Aggregator::bind(config).await.unwrap();
    let addr = aggregator.grpc_addr();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(aggregator.run(async {
        let _ = stopped.await;
    }));
    let endpoint = format!("https://{addr}");

    let good = pusher(&endpoint, &tls_config(&ca, Some(&client), Some(&token)), "good");
    push(&good, "pushed_with_cert_and_token").await;
    let no_cert = pusher(&endpoint, &tls_config(&ca, None, Some(&token)), "no-cert");
    push(&no_cert, "pushed_without_cert").await;
    let no_token = pusher(&endpoint, &tls_config(&ca, Some(&client), None), "no-token");
    push(&no_token, "pushed_without_token").await;
    let plain = pusher(&format!("http://{addr}"), &TelemetryConfig::default(), "plain");
    push(&plain, "pushed_in_plaintext").await;

    // Queries need a certificate too.
    let files = shoal_tls::ClientTlsFiles {
        ca: ca.cert.clone(),
        identity: Some((client.cert.clone(), client.key.clone())),
        flags: "upstream-tls",
    };
    let tls = shoal_tls::ClientTls::load(&files).unwrap();
    let channel =
        tls.endpoint(Endpoint::from_shared(endpoint.clone()).unwrap(), NAME).unwrap().connect().await.unwrap();
    let query = AggregatorServiceClient::new(channel);
    shoal_testkit::eventually(Duration::from_secs(10), "the authenticated push is counted", || {
        value(query.clone(), "pushed_with_cert_and_token")
    })
    .await;
    for refused in ["pushed_without_cert", "pushed_without_token", "pushed_in_plaintext"] {
        assert!(value(query.clone(), refused).await.is_none(), "{refused} was counted");
    }
}

/// The fleet-wide series of `metric`, if the aggregator has it.
async fn value(
    mut query: AggregatorServiceClient<tonic::transport::Channel>,
    metric: &'static str,
) -> Option<shoal_proto::aggregator::v1::SeriesValue> {
    let selector =
        Selector { metric: metric.into(), grouping: Some(Grouping { labels: vec![] }), ..Default::default() };
    let request = InstantRequest { selector: Some(selector), quantiles: vec![] };
    query.instant(request).await.ok()?.into_inner().series.into_iter().next()
}
