//! The real binary: several aggregator processes push their own metrics
//! through the telemetry crate (`--metrics-push-endpoint`) to another one;
//! SIGTERM drains and exits 0; `kill -9` and a restart with Redis keep the
//! fleet view.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use shoal_proto::aggregator::v1::ListSourcesRequest;
use shoal_testkit::{RedisServer, eventually, free_port};

use crate::helpers::*;
use crate::ingest::{counter, point, request};

struct Process {
    child: Child,
    grpc: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(hostname: &str, extra: &[&str]) -> Process {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_shoal-metrics-aggregator"))
        .args(["--grpc-addr", &format!("127.0.0.1:{port}"), "--admin-addr", "127.0.0.1:0"])
        .args(["--log-format", "text", "--log-filter", "warn"])
        .args(extra)
        .env("HOSTNAME", hostname)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the aggregator binary");
    Process { child, grpc: format!("http://127.0.0.1:{port}") }
}

async fn otlp_client(
    endpoint: &str,
) -> opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient<
    tonic::transport::Channel,
> {
    let endpoint = endpoint.to_owned();
    eventually(WAIT, "the child to listen", || {
        let endpoint = endpoint.clone();
        async move {
            opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient::connect(
                endpoint,
            )
            .await
            .ok()
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn child_processes_push_their_own_metrics_through_telemetry() {
    let mut hub = spawn_aggregator(&[]).await;
    let push = ["--metrics-push-endpoint", &hub.endpoint(), "--metrics-push-interval", "200ms"].map(str::to_owned);
    let push: Vec<&str> = push.iter().map(String::as_str).collect();
    let mut children = vec![start("child-1", &push), start("child-2", &push)];
    // Give each child some traffic of its own.
    for child in &children {
        let mut client = otlp_client(&child.grpc).await;
        client.export(request("app", "a-1", vec![counter("jobs", vec![point(&[], 1, 2, 1.0)])])).await.unwrap();
    }
    let sources = eventually(WAIT, "both children in the fleet", || {
        let mut query = hub.query.clone();
        async move {
            let sources = query.list_sources(ListSourcesRequest {}).await.ok()?.into_inner().sources;
            let ids: Vec<String> = sources.iter().map(|s| s.id.clone()).collect();
            (ids == ["shoal-metrics-aggregator/child-1", "shoal-metrics-aggregator/child-2"]).then_some(sources)
        }
    })
    .await;
    assert!(sources.iter().all(|s| s.up && s.series > 0));
    // Each child's own counter of accepted points, merged: 1 + 1.
    let points = eventually(WAIT, "the children's own counters", || {
        let mut hub_query = hub.query.clone();
        async move {
            let request = shoal_proto::aggregator::v1::InstantRequest {
                selector: Some(shoal_proto::aggregator::v1::Selector {
                    metric: "aggregator_points".into(),
                    labels: [("outcome".to_owned(), "accepted".to_owned())].into(),
                    ..Default::default()
                }),
                quantiles: vec![],
            };
            let series = hub_query.instant(request).await.ok()?.into_inner().series;
            let s = series.into_iter().next()?;
            (s.value == 2.0).then_some(s)
        }
    })
    .await;
    assert_eq!(points.sources, 2);

    // SIGTERM: drains and exits 0, promptly.
    let child = children.remove(0);
    let pid = child.child.id();
    let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill");
    assert!(status.success());
    let mut child = child;
    let exited = eventually(Duration::from_secs(10), "the child to exit", || {
        let status = child.child.try_wait().ok().flatten();
        async move { status }
    })
    .await;
    assert!(exited.success(), "{exited:?}");
    let _ = fleet_value(&mut hub, "aggregator_points").await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_aggregator_restarts_with_its_state_from_redis() {
    let redis = RedisServer::start();
    let url = redis.url();
    let args = ["--redis-url", &url, "--checkpoint-interval", "100ms", "--replica-id", "solo"];
    let first = start("agg", &args);
    let mut client = otlp_client(&first.grpc).await;
    client.export(request("gateway", "gw-1", vec![counter("requests", vec![point(&[], 1, 5, 11.0)])])).await.unwrap();
    let fields = || {
        let url = url.clone();
        async move {
            let client = redis::Client::open(url).ok()?;
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            let n: usize = redis::cmd("HLEN").arg("shoal:aggregator:v1:sources").query_async(&mut conn).await.ok()?;
            (n > 0).then_some(())
        }
    };
    eventually(WAIT, "a checkpoint", fields).await;
    drop(first); // SIGKILL: no final checkpoint, only the periodic ones.

    let second = start("agg", &args);
    let endpoint = second.grpc.clone();
    let value = eventually(WAIT, "the state after a kill -9", || {
        let endpoint = endpoint.clone();
        async move {
            let mut query =
                shoal_proto::aggregator::v1::aggregator_service_client::AggregatorServiceClient::connect(endpoint)
                    .await
                    .ok()?;
            let request = shoal_proto::aggregator::v1::InstantRequest {
                selector: Some(shoal_proto::aggregator::v1::Selector {
                    metric: "requests".into(),
                    ..Default::default()
                }),
                quantiles: vec![],
            };
            query.instant(request).await.ok()?.into_inner().series.into_iter().next()
        }
    })
    .await;
    assert_eq!(value.value, 11.0);
}
