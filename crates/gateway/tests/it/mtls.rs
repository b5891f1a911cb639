//! Mutual TLS on the internal hops: the gateway reaches workers and
//! aggregators with its certificate; a caller without one is refused by the
//! worker itself, so no gateway limit can be skipped by calling it directly.

use std::time::Duration;

use clap::Parser as _;
use serde_json::json;
use shoal_proto::worker::v1::SubmitJobRequest;
use shoal_proto::worker::v1::worker_service_client::WorkerServiceClient;
use shoal_testkit::certs::{Leaf, TestCa};
use tokio::sync::oneshot;
use tonic::transport::Endpoint;

use crate::helpers::{eventually, spawn_gateway, spawn_worker};

const WORKER: &str = "worker.shoal.svc";
const AGGREGATOR: &str = "aggregator.shoal.svc";

fn server_args<'a>(leaf: &'a Leaf, ca: &'a TestCa) -> Vec<&'a str> {
    vec![
        "--grpc-tls-cert",
        leaf.cert.to_str().unwrap(),
        "--grpc-tls-key",
        leaf.key.to_str().unwrap(),
        "--grpc-tls-client-ca",
        ca.cert.to_str().unwrap(),
    ]
}

async fn spawn_tls_aggregator(args: &[&str]) -> (std::net::SocketAddr, oneshot::Sender<()>) {
    let mut all = vec!["shoal-metrics-aggregator", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let config = shoal_metrics_aggregator::Config::try_parse_from(all).unwrap();
    let aggregator = shoal_metrics_aggregator::Aggregator::bind(config).await.unwrap();
    let addr = aggregator.grpc_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(aggregator.run(async {
        let _ = stopped.await;
    }));
    (addr, stop)
}

/// A direct `SubmitJob` to `addr` over TLS that trusts `ca`, with `identity`.
async fn submit_directly(addr: std::net::SocketAddr, ca: &TestCa, identity: Option<&Leaf>) -> tonic::Status {
    let files = shoal_tls::ClientTlsFiles {
        ca: ca.cert.clone(),
        identity: identity.map(|l| (l.cert.clone(), l.key.clone())),
        flags: "upstream-tls",
    };
    let tls = shoal_tls::ClientTls::load(&files).unwrap();
    let endpoint = tls.endpoint(Endpoint::from_shared(format!("https://{addr}")).unwrap(), WORKER).unwrap();
    let request = SubmitJobRequest { kind: "echo".into(), payload_json: "{}".into(), ..SubmitJobRequest::default() };
    match endpoint.connect().await {
        Err(error) => tonic::Status::from_error(Box::new(error)),
        Ok(channel) => WorkerServiceClient::new(channel).submit_job(request).await.unwrap_err(),
    }
}

/// The text of every error in `status`'s chain.
fn chain(status: &tonic::Status) -> String {
    let mut text = status.to_string();
    let mut next = std::error::Error::source(status);
    while let Some(error) = next {
        text.push_str(": ");
        text.push_str(&error.to_string());
        next = error.source();
    }
    text
}

#[tokio::test]
async fn the_gateway_reaches_workers_and_aggregators_with_its_certificate_and_nobody_else_does() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let worker_cert = ca.issue("worker", &[WORKER]);
    let aggregator_cert = ca.issue("aggregator", &[AGGREGATOR]);
    let gateway_cert = ca.issue("gateway", &["gateway.shoal.svc"]);
    let worker = spawn_worker(&server_args(&worker_cert, &ca)).await;
    let (aggregator, _stop) = spawn_tls_aggregator(&server_args(&aggregator_cert, &ca)).await;

    let ca_path = ca.cert.to_str().unwrap();
    let gateway = spawn_gateway(
        &[worker.addr],
        &[aggregator],
        &[
            "--upstream-tls-ca",
            ca_path,
            "--upstream-tls-cert",
            gateway_cert.cert.to_str().unwrap(),
            "--upstream-tls-key",
            gateway_cert.key.to_str().unwrap(),
            "--worker-tls-server-name",
            WORKER,
            "--aggregator-tls-server-name",
            AGGREGATOR,
        ],
    )
    .await;
    let answered = eventually(Duration::from_secs(10), || async {
        let response = gateway.task("echo", json!({"over": "mtls"})).await;
        (response.status() == 200).then_some(())
    })
    .await;
    assert!(answered.is_some(), "gateway → worker over mutual TLS never answered 200");
    let stats = gateway.http.get(format!("{}/v1/stats?window=300", gateway.url)).send().await.unwrap();
    assert_eq!(stats.status(), 200, "gateway → aggregator over mutual TLS");

    // Straight to the worker, skipping the gateway: no certificate, no call.
    let status = submit_directly(worker.addr, &ca, None).await;
    assert!(chain(&status).contains("CertificateRequired"), "{}", chain(&status));
    let other = TestCa::new(dir.path(), "other");
    let forged = other.issue("forged", &["gateway.shoal.svc"]);
    let status = submit_directly(worker.addr, &ca, Some(&forged)).await;
    assert!(chain(&status).contains("UnknownCA"), "{}", chain(&status));
    // Plaintext is not served at all.
    let plain = Endpoint::from_shared(format!("http://{}", worker.addr)).unwrap().connect().await;
    if let Ok(channel) = plain {
        let refused = WorkerServiceClient::new(channel).submit_job(SubmitJobRequest::default()).await.unwrap_err();
        // A transport failure (the server closed the connection), not an
        // answer of the service.
        assert!(std::error::Error::source(&refused).is_some(), "{}", chain(&refused));
    }
    // The gateway's own certificate works directly too: it is the
    // certificate, not the gateway, that the worker trusts (durable jobs
    // are off here, so the call reaches the service and says so).
    let status = submit_directly(worker.addr, &ca, Some(&gateway_cert)).await;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{}", chain(&status));
    assert!(!chain(&status).contains("alert"), "{}", chain(&status));
}

#[tokio::test]
async fn a_gateway_without_a_client_certificate_gets_no_serving_worker() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let worker_cert = ca.issue("worker", &[WORKER]);
    let worker = spawn_worker(&server_args(&worker_cert, &ca)).await;
    let gateway = spawn_gateway(
        &[worker.addr],
        &[],
        &["--upstream-tls-ca", ca.cert.to_str().unwrap(), "--worker-tls-server-name", WORKER],
    )
    .await;
    let response = gateway.task("echo", json!({})).await;
    assert_eq!(response.status(), 503, "a worker served a gateway without a certificate");
}

#[tokio::test]
async fn a_renewed_gateway_certificate_is_picked_up_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let other = TestCa::new(dir.path(), "other");
    let worker = spawn_worker(&server_args(&ca.issue("worker", &[WORKER]), &ca)).await;
    // The gateway starts with a certificate the worker does not trust.
    let gateway_cert = other.issue("gateway", &["gateway.shoal.svc"]);
    let gateway = spawn_gateway(
        &[worker.addr],
        &[],
        &[
            "--upstream-tls-ca",
            ca.cert.to_str().unwrap(),
            "--upstream-tls-cert",
            gateway_cert.cert.to_str().unwrap(),
            "--upstream-tls-key",
            gateway_cert.key.to_str().unwrap(),
            "--worker-tls-server-name",
            WORKER,
        ],
    )
    .await;
    assert_eq!(gateway.task("echo", json!({})).await.status(), 503);
    // Renewed in place, as cert-manager does; re-read within 5 s.
    ca.issue_to(&gateway_cert, &["gateway.shoal.svc"]);
    let answered = eventually(Duration::from_secs(20), || async {
        (gateway.task("echo", json!({})).await.status() == 200).then_some(())
    })
    .await;
    assert!(answered.is_some(), "the gateway never used its renewed certificate");
}
