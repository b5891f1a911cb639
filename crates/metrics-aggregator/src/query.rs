//! The `shoal.aggregator.v1.AggregatorService` query API: instant values,
//! window aggregates and quantiles, sources, metrics, and a server-streaming
//! watch. Errors map to gRPC statuses in one place, [`QueryError`].

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use shoal_proto::aggregator::v1 as pb;
use shoal_proto::aggregator::v1::aggregator_service_server::AggregatorService;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::fleet::{Fleet, now_ms};
use crate::merge::{Merged, Policy};
use crate::series::{Kind, Labels};
use crate::store::{Answer, GroupKey, Selection};
use crate::window::{HORIZON_MS, WindowError, WindowGroup};

const DEFAULT_QUANTILES: [f64; 3] = [0.5, 0.9, 0.99];
const MAX_QUANTILES: usize = 16;
const DEFAULT_WINDOW_SECONDS: u32 = 60;
const MIN_WATCH_INTERVAL_MS: u32 = 100;
const DEFAULT_WATCH_INTERVAL_MS: u32 = 1000;

/// Why a query cannot be answered. The only place queries meet `Status`.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("selector.metric is required")]
    NoMetric,
    #[error("quantile {0} is outside (0, 1]")]
    Quantile(f64),
    #[error("at most {MAX_QUANTILES} quantiles")]
    TooManyQuantiles,
    #[error("window_seconds {0} is above 3600 (1 h, the longest window kept)")]
    Window(u32),
    #[error(transparent)]
    NotAdditive(#[from] WindowError),
    #[error("too many watches open on this aggregator ({0}); retry later")]
    TooManyWatches(usize),
    #[error("internal error")]
    Internal,
}

impl From<QueryError> for Status {
    fn from(error: QueryError) -> Self {
        let message = error.to_string();
        match error {
            QueryError::NoMetric | QueryError::Quantile(_) | QueryError::TooManyQuantiles | QueryError::Window(_) => {
                Status::invalid_argument(message)
            }
            QueryError::NotAdditive(_) => Status::failed_precondition(message),
            QueryError::TooManyWatches(_) => Status::resource_exhausted(message),
            QueryError::Internal => Status::internal(message),
        }
    }
}

/// Answers queries about the fleet view.
#[derive(Debug, Clone)]
pub(crate) struct QueryService {
    pub(crate) fleet: Arc<Fleet>,
    pub(crate) aggregator_id: String,
    pub(crate) watches: Arc<Semaphore>,
    pub(crate) max_watches: usize,
    /// Cancelled when the aggregator shuts down: open watches end.
    pub(crate) shutdown: CancellationToken,
}

fn selection(selector: Option<pb::Selector>) -> Result<Selection, QueryError> {
    let selector = selector.unwrap_or_default();
    if selector.metric.is_empty() {
        return Err(QueryError::NoMetric);
    }
    let mut labels: Vec<(String, String)> = selector.labels.into_iter().collect();
    labels.sort();
    Ok(Selection {
        metric: selector.metric,
        labels,
        service: Some(selector.service).filter(|s| !s.is_empty()),
        by_service: selector.by_service,
        grouping: selector.grouping.map(|g| g.labels),
    })
}

fn quantiles(asked: Vec<f64>) -> Result<Vec<f64>, QueryError> {
    if asked.is_empty() {
        return Ok(DEFAULT_QUANTILES.to_vec());
    }
    if asked.len() > MAX_QUANTILES {
        return Err(QueryError::TooManyQuantiles);
    }
    match asked.iter().find(|q| !(**q > 0.0 && **q <= 1.0)) {
        Some(q) => Err(QueryError::Quantile(*q)),
        None => Ok(asked),
    }
}

fn window_ms(seconds: u32) -> Result<u64, QueryError> {
    let seconds = if seconds == 0 { DEFAULT_WINDOW_SECONDS } else { seconds };
    if u64::from(seconds) * 1000 > HORIZON_MS {
        return Err(QueryError::Window(seconds));
    }
    Ok(u64::from(seconds) * 1000)
}

fn kind(kind: Kind) -> pb::MetricKind {
    match kind {
        Kind::Counter => pb::MetricKind::Counter,
        Kind::UpDownCounter => pb::MetricKind::UpDownCounter,
        Kind::Gauge => pb::MetricKind::Gauge,
        Kind::Histogram => pb::MetricKind::Histogram,
        Kind::ExponentialHistogram => pb::MetricKind::ExponentialHistogram,
        Kind::Summary => pb::MetricKind::Summary,
    }
}

fn policy(policy: Policy) -> pb::GaugePolicy {
    match policy {
        Policy::Last => pb::GaugePolicy::Last,
        Policy::Sum => pb::GaugePolicy::Sum,
        Policy::Min => pb::GaugePolicy::Min,
        Policy::Max => pb::GaugePolicy::Max,
    }
}

fn label_map(labels: &Labels) -> std::collections::HashMap<String, String> {
    labels.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

fn quantiles_of(value: &Merged, qs: &[f64]) -> Vec<pb::Quantile> {
    let of = |q: f64| match value {
        Merged::Histogram(h) => h.quantile(q),
        Merged::Exponential(e) => e.quantile(q),
        _ => None,
    };
    qs.iter().filter_map(|q| of(*q).map(|value| pb::Quantile { quantile: *q, value })).collect()
}

/// Instant answers in wire form.
pub(crate) fn instant_series(metric: &str, answer: Answer, qs: &[f64]) -> Vec<pb::SeriesValue> {
    answer
        .groups
        .into_iter()
        .map(|(key, group)| {
            let mut out = pb::SeriesValue {
                metric: metric.to_owned(),
                labels: label_map(&key.labels),
                service: key.service.unwrap_or_default(),
                kind: kind(answer.kind) as i32,
                sources: group.sources,
                ..Default::default()
            };
            match &group.value {
                Merged::Counter(v) => out.value = *v,
                Merged::Level(l) => out.value = l.value,
                Merged::Histogram(h) => {
                    (out.value, out.count, out.sum) = (h.count as f64, h.count, h.sum);
                    let bounds = h.bounds.iter().copied().chain([f64::INFINITY]);
                    out.buckets = bounds
                        .zip(&h.counts)
                        .map(|(upper_bound, count)| pb::Bucket { upper_bound, count: *count })
                        .collect();
                }
                Merged::Exponential(e) => (out.value, out.count, out.sum) = (e.count as f64, e.count, e.sum),
                Merged::Summary(s) => (out.value, out.count, out.sum) = (s.count as f64, s.count, s.sum),
            }
            out.quantiles = quantiles_of(&group.value, qs);
            out
        })
        .collect()
}

/// Window answers in wire form.
pub(crate) fn window_series(
    metric: &str,
    metric_kind: Kind,
    groups: BTreeMap<GroupKey, WindowGroup>,
    qs: &[f64],
) -> Vec<pb::WindowSeries> {
    groups
        .into_iter()
        .map(|(key, group)| {
            let (increase, sum_increase) = match &group.increase {
                Merged::Counter(v) => (*v, 0.0),
                Merged::Histogram(h) => (h.count as f64, h.sum),
                Merged::Exponential(e) => (e.count as f64, e.sum),
                Merged::Summary(s) => (s.count as f64, s.sum),
                Merged::Level(l) => (l.value, 0.0),
            };
            let covered_seconds = group.covered_ms as f64 / 1000.0;
            pb::WindowSeries {
                metric: metric.to_owned(),
                labels: label_map(&key.labels),
                service: key.service.unwrap_or_default(),
                kind: kind(metric_kind) as i32,
                increase,
                rate_per_second: if covered_seconds > 0.0 { increase / covered_seconds } else { 0.0 },
                sum_increase,
                quantiles: quantiles_of(&group.increase, qs),
                covered_seconds,
            }
        })
        .collect()
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, QueryError> {
    tokio::task::spawn_blocking(work).await.map_err(|error| {
        tracing::error!(error = %error, "query task failed");
        QueryError::Internal
    })
}

impl QueryService {
    async fn instant(&self, selection: Selection, qs: Vec<f64>) -> Result<Vec<pb::SeriesValue>, QueryError> {
        let fleet = self.fleet.clone();
        blocking(move || match fleet.select(&selection) {
            Some(answer) => instant_series(&selection.metric, answer, &qs),
            None => Vec::new(),
        })
        .await
    }

    async fn window(
        &self,
        selection: Selection,
        window_ms: u64,
        qs: Vec<f64>,
    ) -> Result<Vec<pb::WindowSeries>, QueryError> {
        let fleet = self.fleet.clone();
        blocking(move || {
            Ok(match fleet.window(&selection, window_ms)? {
                Some((kind, groups)) => window_series(&selection.metric, kind, groups, &qs),
                None => Vec::new(),
            })
        })
        .await?
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatorService for QueryService {
    async fn list_sources(
        &self,
        _request: Request<pb::ListSourcesRequest>,
    ) -> Result<Response<pb::ListSourcesResponse>, Status> {
        let sources = self
            .fleet
            .sources()
            .into_iter()
            .map(|s| pb::Source {
                id: s.id.to_string(),
                service_name: s.id.service.clone(),
                last_seen_unix_ms: s.last_seen_ms as i64,
                up: s.up,
                instance_id: s.id.instance.clone(),
                series: s.series as u32,
            })
            .collect();
        Ok(Response::new(pb::ListSourcesResponse { sources, aggregator_id: self.aggregator_id.clone() }))
    }

    async fn list_metrics(
        &self,
        _request: Request<pb::ListMetricsRequest>,
    ) -> Result<Response<pb::ListMetricsResponse>, Status> {
        let metrics = self
            .fleet
            .metrics()
            .into_iter()
            .map(|m| pb::MetricInfo {
                kind: kind(m.kind) as i32,
                policy: if m.kind.is_additive() { pb::GaugePolicy::Unspecified } else { policy(m.policy) } as i32,
                name: m.name,
                description: m.description,
                unit: m.unit,
                series: m.series as u32,
                bounds: m.bounds,
            })
            .collect();
        Ok(Response::new(pb::ListMetricsResponse { metrics, aggregator_id: self.aggregator_id.clone() }))
    }

    async fn instant(&self, request: Request<pb::InstantRequest>) -> Result<Response<pb::InstantResponse>, Status> {
        let request = request.into_inner();
        let selection = selection(request.selector)?;
        let qs = quantiles(request.quantiles)?;
        let series = QueryService::instant(self, selection, qs).await?;
        Ok(Response::new(pb::InstantResponse {
            series,
            at_unix_ms: now_ms() as i64,
            aggregator_id: self.aggregator_id.clone(),
        }))
    }

    async fn window(&self, request: Request<pb::WindowRequest>) -> Result<Response<pb::WindowResponse>, Status> {
        let request = request.into_inner();
        let selection = selection(request.selector)?;
        let qs = quantiles(request.quantiles)?;
        let window = window_ms(request.window_seconds)?;
        let series = QueryService::window(self, selection, window, qs).await?;
        Ok(Response::new(pb::WindowResponse {
            series,
            window_seconds: (window / 1000) as u32,
            at_unix_ms: now_ms() as i64,
            aggregator_id: self.aggregator_id.clone(),
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let selection = selection(request.selector)?;
        let qs = quantiles(request.quantiles)?;
        let window = match request.window_seconds {
            0 => None,
            seconds => Some(window_ms(seconds)?),
        };
        let interval = match request.interval_ms {
            0 => DEFAULT_WATCH_INTERVAL_MS,
            ms => ms.max(MIN_WATCH_INTERVAL_MS),
        };
        let permit =
            self.watches.clone().try_acquire_owned().map_err(|_| QueryError::TooManyWatches(self.max_watches))?;
        // A window on a gauge is refused up front rather than in the stream.
        if let Some(window) = window {
            QueryService::window(self, selection.clone(), window, qs.clone()).await?;
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::WatchResponse, Status>>(2);
        let service = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut ticks = tokio::time::interval(Duration::from_millis(u64::from(interval)));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = service.shutdown.cancelled() => break,
                    () = tx.closed() => break,
                    _ = ticks.tick() => {}
                }
                let mut update = pb::WatchResponse { at_unix_ms: now_ms() as i64, ..Default::default() };
                let result = match window {
                    None => service.instant(selection.clone(), qs.clone()).await.map(|s| update.instant = s),
                    Some(w) => service.window(selection.clone(), w, qs.clone()).await.map(|s| update.window = s),
                };
                let item = result.map(|()| update).map_err(Status::from);
                let failed = item.is_err();
                tokio::select! {
                    () = service.shutdown.cancelled() => break,
                    sent = tx.send(item) => if sent.is_err() || failed { break },
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_queries_say_what_to_fix() {
        assert!(matches!(selection(None), Err(QueryError::NoMetric)));
        assert!(matches!(quantiles(vec![1.5]), Err(QueryError::Quantile(_))));
        assert_eq!(quantiles(vec![]).unwrap(), DEFAULT_QUANTILES.to_vec());
        assert!(matches!(window_ms(7200), Err(QueryError::Window(7200))));
        assert_eq!(window_ms(0).unwrap(), 60_000);
        let status = Status::from(QueryError::Window(7200));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
}
