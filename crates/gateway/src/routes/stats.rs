//! `GET /v1/stats`: the fleet at a glance, from the metrics-aggregator's
//! query API (`shoal.aggregator.v1.AggregatorService/Window`).
//!
//! Per service, over a rolling window (`?window=60`, seconds, 1..=3600,
//! default 60): HTTP and gRPC request rate, error rate (HTTP `5xx`; gRPC
//! `UNKNOWN`, `INTERNAL`, `UNAVAILABLE`, `DATA_LOSS`, `DEADLINE_EXCEEDED`,
//! `UNIMPLEMENTED`) and latency p50/p90/p99, and job throughput by outcome.
//! The five window queries run in parallel, each with the status timeout.
//!
//! ```json
//! {"window_seconds": 60, "covered_seconds": 58.9,
//!  "services": {"shoal-gateway": {
//!     "http": {"requests_per_second": 812.0, "errors_per_second": 0.0, "error_ratio": 0.0,
//!              "latency_seconds": {"p50": 0.0011, "p90": 0.0023, "p99": 0.0049}},
//!     "grpc": null, "jobs": null}}}
//! ```
//!
//! Errors are problems: `400` for a bad window, `503` when no aggregator is
//! reachable, `504` when it does not answer in time, `502` otherwise.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use shoal_proto::aggregator::v1::aggregator_service_client::AggregatorServiceClient;
use shoal_proto::aggregator::v1::{Grouping, Selector, WindowRequest, WindowSeries};

use super::AppState;
use crate::problem::ApiError;
use crate::upstream::Policy;

const GRPC_SERVER_ERRORS: [&str; 6] =
    ["UNKNOWN", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "DEADLINE_EXCEEDED", "UNIMPLEMENTED"];

#[derive(Debug, Deserialize)]
pub struct StatsQuery {
    window: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct Stats {
    window_seconds: u32,
    covered_seconds: f64,
    services: BTreeMap<String, ServiceStats>,
}

#[derive(Debug, Default, Serialize)]
struct ServiceStats {
    http: Option<Traffic>,
    grpc: Option<Traffic>,
    jobs: Option<Jobs>,
}

#[derive(Debug, Default, Serialize)]
struct Traffic {
    requests_per_second: f64,
    errors_per_second: f64,
    error_ratio: f64,
    latency_seconds: Option<Latency>,
}

#[derive(Debug, Serialize)]
struct Latency {
    p50: f64,
    p90: f64,
    p99: f64,
}

#[derive(Debug, Default, Serialize)]
struct Jobs {
    per_second: f64,
    by_outcome: BTreeMap<String, f64>,
}

fn selector(metric: &str, group_by: Option<&str>) -> Selector {
    Selector {
        metric: metric.into(),
        by_service: true,
        grouping: Some(Grouping { labels: group_by.map(|l| vec![l.to_owned()]).unwrap_or_default() }),
        ..Default::default()
    }
}

/// The fleet view over the window.
///
/// # Errors
///
/// `400` for a window outside 1..=3600; the aggregator's failures as `502`,
/// `503` or `504`.
pub async fn stats(
    State(state): State<AppState>,
    query: Result<Query<StatsQuery>, QueryRejection>,
) -> Result<Json<Stats>, ApiError> {
    let Query(query) = query?;
    let window_seconds = query.window.unwrap_or(60);
    if !(1..=3600).contains(&window_seconds) {
        return Err(ApiError::BadRequest(format!("window must be 1..=3600 seconds, got {window_seconds}")));
    }
    let timeout = state.status_timeout;
    let call = |metric: &'static str, group_by: Option<&'static str>| {
        let message = WindowRequest {
            selector: Some(selector(metric, group_by)),
            window_seconds,
            quantiles: vec![0.5, 0.9, 0.99],
        };
        let aggregator = &state.aggregator;
        async move {
            let response = aggregator
                .call(timeout, Policy::QUERY, |channel, left| {
                    let mut request = tonic::Request::new(message.clone());
                    request.set_timeout(left);
                    async move { AggregatorServiceClient::new(channel).window(request).await }
                })
                .await?;
            Ok::<_, ApiError>(response.series)
        }
    };
    let (http, http_latency, grpc, grpc_latency, jobs) = tokio::join!(
        call("http_requests", Some("status")),
        call("http_request_duration_seconds", None),
        call("grpc_server_requests", Some("code")),
        call("grpc_server_request_duration_seconds", None),
        call("worker_jobs", Some("outcome")),
    );
    let (http, http_latency, grpc, grpc_latency, jobs) = (http?, http_latency?, grpc?, grpc_latency?, jobs?);
    let covered_seconds = [&http, &http_latency, &grpc, &grpc_latency, &jobs]
        .iter()
        .flat_map(|s| s.iter())
        .map(|s| s.covered_seconds)
        .fold(0.0, f64::max);

    let mut services: BTreeMap<String, ServiceStats> = BTreeMap::new();
    traffic(&mut services, &http, "status", |v| v.starts_with('5'), |s| &mut s.http);
    traffic(&mut services, &grpc, "code", |v| GRPC_SERVER_ERRORS.contains(&v), |s| &mut s.grpc);
    latency(&mut services, &http_latency, |s| &mut s.http);
    latency(&mut services, &grpc_latency, |s| &mut s.grpc);
    for series in &jobs {
        let entry = services.entry(series.service.clone()).or_default().jobs.get_or_insert_with(Jobs::default);
        entry.per_second += series.rate_per_second;
        let outcome = series.labels.get("outcome").cloned().unwrap_or_default();
        *entry.by_outcome.entry(outcome).or_default() += series.rate_per_second;
    }
    Ok(Json(Stats { window_seconds, covered_seconds, services }))
}

fn traffic(
    services: &mut BTreeMap<String, ServiceStats>,
    series: &[WindowSeries],
    label: &str,
    is_error: impl Fn(&str) -> bool,
    slot: impl Fn(&mut ServiceStats) -> &mut Option<Traffic>,
) {
    for s in series {
        let t = slot(services.entry(s.service.clone()).or_default()).get_or_insert_with(Traffic::default);
        t.requests_per_second += s.rate_per_second;
        if s.labels.get(label).is_some_and(|v| is_error(v)) {
            t.errors_per_second += s.rate_per_second;
        }
        t.error_ratio = if t.requests_per_second > 0.0 { t.errors_per_second / t.requests_per_second } else { 0.0 };
    }
}

fn latency(
    services: &mut BTreeMap<String, ServiceStats>,
    series: &[WindowSeries],
    slot: impl Fn(&mut ServiceStats) -> &mut Option<Traffic>,
) {
    for s in series {
        let q = |want: f64| s.quantiles.iter().find(|q| q.quantile == want).map(|q| q.value);
        if let (Some(p50), Some(p90), Some(p99)) = (q(0.5), q(0.9), q(0.99)) {
            let t = slot(services.entry(s.service.clone()).or_default()).get_or_insert_with(Traffic::default);
            t.latency_seconds = Some(Latency { p50, p90, p99 });
        }
    }
}
