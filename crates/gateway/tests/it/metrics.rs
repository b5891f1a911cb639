//! The admin listener's `/metrics`: request counts by route template.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn requests_are_counted_by_route_template() {
    shoal_telemetry::init_for_tests();
    let worker = spawn_worker(&[]).await;
    let gateway = spawn_gateway(&[worker.addr], &[], &[]).await;
    assert_eq!(gateway.task("echo", json!(1)).await.status(), 200);
    assert_eq!(gateway.task("hash", json!({"data": "x"})).await.status(), 200);
    assert_eq!(gateway.http.get(format!("{}/nowhere/123", gateway.url)).send().await.unwrap().status(), 404);
    for path in ["/healthz", "/readyz", "/metrics"] {
        gateway.http.get(format!("{}{path}", gateway.admin_url)).send().await.unwrap();
    }

    let readiness = gateway.http.get(format!("{}/readyz", gateway.admin_url)).send().await.unwrap();
    assert_eq!(readiness.status(), 200);

    let text = eventually(Duration::from_secs(5), || async {
        let text = gateway.http.get(format!("{}/metrics", gateway.admin_url)).send().await.ok()?.text().await.ok()?;
        text.contains(r#"endpoint="/v1/tasks/{kind}""#).then_some(text)
    })
    .await
    .expect("/metrics shows the task route");
    let requests: Vec<&str> = text.lines().filter(|l| l.starts_with("http_requests_total{")).collect();
    let tasks = requests
        .iter()
        .find(|l| l.contains(r#"endpoint="/v1/tasks/{kind}""#) && l.contains(r#"method="POST""#))
        .expect("a POST /v1/tasks/{kind} series");
    assert!(tasks.ends_with(" 2"), "{tasks}");
    assert!(requests.iter().any(|l| l.contains(r#"endpoint="unmatched""#)), "{requests:?}");
    for raw in ["/v1/tasks/echo", "/nowhere/123", "/metrics", "/healthz", "/readyz"] {
        assert!(!requests.iter().any(|l| l.contains(&format!("endpoint=\"{raw}\""))), "{raw} in {requests:?}");
    }
}
