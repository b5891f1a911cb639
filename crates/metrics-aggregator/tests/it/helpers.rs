//! `spawn_aggregator` and OTLP push helpers.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use shoal_metrics_aggregator::{Aggregator, Config};
use shoal_proto::aggregator::v1::aggregator_service_client::AggregatorServiceClient;
use shoal_proto::aggregator::v1::{Grouping, InstantRequest, Selector, SeriesValue};
use tonic::transport::Channel;

pub const WAIT: Duration = Duration::from_secs(15);

/// A running aggregator with typed clients; dropped → stopped.
pub struct Spawned {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub query: AggregatorServiceClient<Channel>,
    pub otlp: MetricsServiceClient<Channel>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), shoal_metrics_aggregator::RunError>>>,
}

impl Spawned {
    /// Triggers shutdown and waits for `run` to return.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(10), task).await;
            assert!(matches!(result, Ok(Ok(Ok(())))), "aggregator did not stop cleanly: {result:?}");
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts an aggregator on loopback port 0 with extra flags.
pub async fn spawn_aggregator(extra: &[&str]) -> Spawned {
    shoal_telemetry::init_for_tests();
    let mut args = vec!["shoal-metrics-aggregator", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"];
    args.extend_from_slice(&["--sample-interval", "100ms", "--checkpoint-interval", "100ms"]);
    // Tests push far faster than any SDK; the rate limit has its own test.
    if !extra.contains(&"--max-source-push-rate") {
        args.extend_from_slice(&["--max-source-push-rate", "100000"]);
    }
    args.extend_from_slice(extra);
    let config = Config::try_parse_from(args).expect("valid test config");
    let aggregator = Aggregator::bind(config).await.expect("bind");
    let (grpc, admin) = (aggregator.grpc_addr(), aggregator.admin_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(aggregator.run(async {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{grpc}")).expect("uri").connect().await.expect("connect");
    Spawned {
        grpc,
        admin,
        query: AggregatorServiceClient::new(channel.clone()),
        otlp: MetricsServiceClient::new(channel),
        stop: Some(stop),
        task: Some(task),
    }
}

/// An OpenTelemetry SDK meter provider that pushes over OTLP/gRPC to
/// `endpoint` as `service`/`instance` when flushed.
pub fn sdk_provider(endpoint: &str, service: &str, instance: &str) -> SdkMeterProvider {
    let exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.to_owned())
        .with_timeout(Duration::from_secs(5))
        .build()
        .expect("exporter");
    // Pushes happen on flush; the interval is only a backstop.
    let reader = PeriodicReader::builder(exporter).with_interval(Duration::from_secs(3600)).build();
    let resource = Resource::builder()
        .with_service_name(service.to_owned())
        .with_attribute(KeyValue::new("service.instance.id", instance.to_owned()))
        .build();
    SdkMeterProvider::builder().with_reader(reader).with_resource(resource).build()
}

/// Pushes now (the SDK's flush blocks, so it runs on the blocking pool).
pub async fn flush(provider: &SdkMeterProvider) {
    let provider = provider.clone();
    tokio::task::spawn_blocking(move || provider.force_flush()).await.expect("join").expect("flush");
}

/// The fleet-wide value of `metric` merged over every label set.
pub async fn fleet_value(agg: &mut Spawned, metric: &str) -> Option<SeriesValue> {
    instant(agg, Selector { metric: metric.into(), grouping: Some(Grouping { labels: vec![] }), ..Default::default() })
        .await
        .into_iter()
        .next()
}

pub async fn instant(agg: &mut Spawned, selector: Selector) -> Vec<SeriesValue> {
    agg.query
        .instant(InstantRequest { selector: Some(selector), quantiles: vec![] })
        .await
        .expect("instant")
        .into_inner()
        .series
}
