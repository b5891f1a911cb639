//! Health, reflection and the admin listener.

use std::time::Duration;

use futures::StreamExt as _;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::{execute, spawn_worker};

const WORKER_SERVICE: &str = "shoal.worker.v1.WorkerService";

#[tokio::test]
async fn health_is_serving_while_running() {
    let worker = spawn_worker(&[]).await;
    let mut health = HealthClient::new(worker.channel.clone());
    for service in ["", WORKER_SERVICE] {
        let response = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(response.status(), ServingStatus::Serving, "`{service}`");
    }
    let mut watch = health.watch(HealthCheckRequest { service: WORKER_SERVICE.into() }).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(2), watch.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
}

#[tokio::test]
async fn health_watch_sees_not_serving_when_shutdown_begins() {
    let worker = spawn_worker(&[]).await;
    let mut health = HealthClient::new(worker.channel.clone());
    let mut watch = health.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(2), watch.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let stopping = tokio::spawn(worker.stop());
    let next = tokio::time::timeout(Duration::from_secs(2), watch.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    drop(watch);
    stopping.await.unwrap().expect("clean stop");
}

macro_rules! list_services {
    ($module:ident, $channel:expr) => {{
        use tonic_reflection::pb::$module::ServerReflectionRequest;
        use tonic_reflection::pb::$module::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$module::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$module::server_reflection_response::MessageResponse;

        let mut client = ServerReflectionClient::new($channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = client.server_reflection_info(futures::stream::iter([request])).await.unwrap().into_inner();
        let response = responses.next().await.unwrap().unwrap();
        match response.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                list.service.into_iter().map(|s| s.name).collect::<Vec<String>>()
            }
            other => panic!("unexpected reflection answer {other:?}"),
        }
    }};
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_the_services() {
    let worker = spawn_worker(&[]).await;
    let v1 = list_services!(v1, worker.channel.clone());
    let v1alpha = list_services!(v1alpha, worker.channel.clone());
    for services in [v1, v1alpha] {
        assert!(services.iter().any(|s| s == WORKER_SERVICE), "{services:?}");
        assert!(services.iter().any(|s| s == "grpc.health.v1.Health"), "{services:?}");
    }
}

#[tokio::test]
async fn admin_reports_liveness_readiness_and_request_metrics() {
    let mut worker = spawn_worker(&[]).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    assert_eq!(http.get(worker.admin_url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(http.get(worker.admin_url("/readyz")).send().await.unwrap().status(), 200);

    worker.client.execute(execute("echo", "1", None)).await.unwrap();
    worker.client.execute(execute("nope", "1", None)).await.unwrap_err();
    let mut health = HealthClient::new(worker.channel.clone());
    health.check(HealthCheckRequest { service: String::new() }).await.unwrap();

    let metrics = http.get(worker.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    let has_series = |name: &str, labels: &[&str]| {
        metrics.lines().any(|line| line.starts_with(name) && labels.iter().all(|label| line.contains(label)))
    };
    assert!(
        has_series(
            "grpc_server_requests_total{",
            &[r#"service="shoal.worker.v1.WorkerService""#, r#"method="Execute""#, r#"code="OK""#]
        ),
        "{metrics}"
    );
    assert!(has_series("grpc_server_requests_total{", &[r#"code="INVALID_ARGUMENT""#]), "{metrics}");
    assert!(has_series("worker_tasks_total{", &[r#"kind="echo""#, r#"outcome="ok""#]), "{metrics}");
    assert!(has_series("worker_tasks_total{", &[r#"kind="unknown""#, r#"outcome="invalid""#]), "{metrics}");
    assert!(has_series("worker_task_duration_seconds_count{", &[r#"kind="echo""#]), "{metrics}");
    assert!(has_series("worker_tasks_in_flight", &[]), "{metrics}");
    assert!(!metrics.contains("grpc.health"), "health checks made series:\n{metrics}");
}
