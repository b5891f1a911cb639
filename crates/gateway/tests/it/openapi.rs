//! The OpenAPI document is served, and it describes routes that exist: every
//! documented path and method reaches a handler (never the 404/405 fallback),
//! and the bounds the gateway is configured with are the document's.

use serde_json::Value;

use crate::helpers::{expect_problem, spawn_gateway, spawn_worker};

const SHIPPED: &str = include_str!("../../openapi.json");

#[tokio::test]
async fn every_documented_operation_is_routed() {
    let worker = spawn_worker(&[]).await;
    let gateway = spawn_gateway(&[worker.addr], &[], &[]).await;
    let response = gateway.http.get(format!("{}/openapi.json", gateway.url)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let spec: Value = response.json().await.unwrap();
    assert_eq!(spec["openapi"], "3.1.0");
    assert_eq!(spec, serde_json::from_str::<Value>(SHIPPED).unwrap(), "the defaults serve the shipped document");
    let paths = spec["paths"].as_object().unwrap();
    assert!(paths.len() >= 6);
    for (path, item) in paths {
        let concrete = path.replace("{kind}", "echo").replace("{id}", "0190b0a4-7c4e-7bb2-9a55-3f1d2b6c8e01");
        for method in ["get", "post", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            let url = format!("{}{concrete}", gateway.url);
            let request = match method {
                "get" => gateway.http.get(url),
                "post" => gateway.http.post(url).json(&serde_json::json!({"kind": "echo"})),
                _ => gateway.http.delete(url),
            };
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            assert!(
                !body.contains("route-not-found") && !body.contains("method-not-allowed"),
                "{method} {path} is documented but not routed: {status} {body}"
            );
        }
    }
}

#[tokio::test]
async fn the_served_document_states_the_configured_delay_bound() {
    let gateway = spawn_gateway(&[], &[], &["--max-delay", "250ms"]).await;
    let spec: Value =
        gateway.http.get(format!("{}/openapi.json", gateway.url)).send().await.unwrap().json().await.unwrap();
    let delay = &spec["paths"]["/"]["get"]["parameters"][0];
    assert_eq!((delay["name"].as_str(), delay["schema"]["maximum"].as_u64()), (Some("delay_ms"), Some(250)));
    let ok = gateway.http.get(format!("{}/?delay_ms=250", gateway.url)).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let over = gateway.http.get(format!("{}/?delay_ms=251", gateway.url)).send().await.unwrap();
    let problem = expect_problem(over, 400).await;
    assert!(problem["detail"].as_str().unwrap().contains("0 to 250"), "{problem}");
}

#[tokio::test]
async fn jobs_are_linked_to_reading_and_cancelling_them() {
    let spec: Value = serde_json::from_str(SHIPPED).unwrap();
    let links = &spec["paths"]["/v1/jobs"]["post"]["responses"]["202"]["links"];
    assert_eq!(links["GetJob"]["operationId"], "getJob");
    assert_eq!(links["CancelJob"]["operationId"], "cancelJob");
    let cancel = &spec["paths"]["/v1/jobs/{id}/cancel"]["post"];
    assert_eq!(cancel["operationId"], "cancelJob");
    assert_eq!(cancel["responses"]["202"]["links"]["GetJob"]["operationId"], "getJob");
    assert!(spec["paths"]["/v1/jobs/{id}"].get("delete").is_none(), "cancelling keeps the job: not a DELETE");
}
