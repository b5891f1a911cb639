//! The OpenAPI document is served, and it describes routes that exist: every
//! documented path and method reaches a handler (never the 404/405 fallback).

use serde_json::Value;

use crate::helpers::{spawn_gateway, spawn_worker};

#[tokio::test]
async fn every_documented_operation_is_routed() {
    let worker = spawn_worker(&[]).await;
    let gateway = spawn_gateway(&[worker.addr], &[], &[]).await;
    let response = gateway.http.get(format!("{}/openapi.json", gateway.url)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let spec: Value = response.json().await.unwrap();
    assert_eq!(spec["openapi"], "3.1.0");
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
