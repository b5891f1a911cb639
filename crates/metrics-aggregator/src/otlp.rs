//! OTLP → the store's points: identifies the source of each resource and
//! checks every data point, so that the merge core only sees valid input.
//!
//! A source is `service.name` + `service.instance.id` from the resource
//! attributes (`host.name` stands in for a missing instance id, then
//! `default`). A resource without `service.name` is rejected. A malformed
//! point (no value, a NaN, a negative counter increment, histogram buckets
//! that do not add up, an unknown temporality, no timestamp, too many or too
//! long labels, a time more than [`MAX_FUTURE_SKEW_MS`] ahead of the
//! aggregator's clock, a start after the time) is rejected and named; the
//! rest of the push is kept. Points flagged "no recorded value" are skipped
//! silently, as the spec asks. A resource whose every point is rejected (or
//! that has none) creates no source: see [`crate::store`].

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, DataPointFlags, ExponentialHistogramDataPoint, HistogramDataPoint, Metric, NumberDataPoint,
    SummaryDataPoint, exponential_histogram_data_point, metric, number_data_point,
};

use crate::exponential::{Buckets, ExpHistogram};
use crate::histogram::Histogram;
use crate::merge::CountSum;
use crate::series::{Kind, Labels};
use crate::source::SourceId;
use crate::store::{MAX_FUTURE_SKEW_MS, MAX_LABEL_LEN, MAX_LABELS, MetricPush, Outcome, Point, SourcePush, Value};

/// Data points in a request (for accounting).
pub fn count_points(request: &ExportMetricsServiceRequest) -> u64 {
    request.resource_metrics.iter().flat_map(|r| &r.scope_metrics).flat_map(|s| &s.metrics).map(metric_points).sum()
}

fn metric_points(metric: &Metric) -> u64 {
    (match &metric.data {
        Some(metric::Data::Gauge(g)) => g.data_points.len(),
        Some(metric::Data::Sum(s)) => s.data_points.len(),
        Some(metric::Data::Histogram(h)) => h.data_points.len(),
        Some(metric::Data::ExponentialHistogram(e)) => e.data_points.len(),
        Some(metric::Data::Summary(s)) => s.data_points.len(),
        None => 0,
    }) as u64
}

/// Decodes a request into one push per source, and the rejected points;
/// `now_ms` is the aggregator's clock (points later than it by more than
/// [`MAX_FUTURE_SKEW_MS`] are rejected).
pub fn decode(request: ExportMetricsServiceRequest, now_ms: u64) -> (Vec<SourcePush>, Outcome) {
    let clock = Clock { max_time: now_ms.saturating_add(MAX_FUTURE_SKEW_MS).saturating_mul(1_000_000) };
    let mut outcome = Outcome::default();
    let mut pushes = Vec::with_capacity(request.resource_metrics.len());
    for resource_metrics in request.resource_metrics {
        let attributes = resource_metrics.resource.map(|r| r.attributes).unwrap_or_default();
        let Some(source) = source_of(&attributes) else {
            for metric in resource_metrics.scope_metrics.iter().flat_map(|s| &s.metrics) {
                outcome.reject(
                    &metric.name,
                    || "the resource has no `service.name` attribute".into(),
                    metric_points(metric),
                );
            }
            continue;
        };
        let mut metrics = Vec::new();
        for metric in resource_metrics.scope_metrics.into_iter().flat_map(|s| s.metrics) {
            if let Some(push) = decode_metric(metric, clock, &mut outcome) {
                metrics.push(push);
            }
        }
        pushes.push(SourcePush { source, metrics });
    }
    (pushes, outcome)
}

fn source_of(attributes: &[KeyValue]) -> Option<SourceId> {
    let get = |key: &str| {
        attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()).map(text).filter(|v| !v.is_empty())
    };
    let service = get("service.name")?;
    let instance = get("service.instance.id").or_else(|| get("host.name")).unwrap_or_else(|| "default".into());
    Some(SourceId::new(truncate(service), truncate(instance)))
}

fn truncate(mut text: String) -> String {
    if text.len() > MAX_LABEL_LEN {
        let mut end = MAX_LABEL_LEN;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

fn text(value: &AnyValue) -> String {
    match &value.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BytesValue(b)) => b.iter().map(|x| format!("{x:02x}")).collect(),
        Some(any_value::Value::ArrayValue(a)) => {
            format!("[{}]", a.values.iter().map(text).collect::<Vec<_>>().join(","))
        }
        Some(any_value::Value::KvlistValue(l)) => format!(
            "{{{}}}",
            l.values
                .iter()
                .map(|kv| format!("{}={}", kv.key, kv.value.as_ref().map(text).unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        ),
        // Profiles-only string-table references carry no text here.
        _ => String::new(),
    }
}

fn labels(attributes: Vec<KeyValue>) -> Result<Labels, String> {
    if attributes.len() > MAX_LABELS {
        return Err(format!("more than {MAX_LABELS} labels on a point"));
    }
    let mut pairs = Vec::with_capacity(attributes.len());
    for kv in attributes {
        let value = kv.value.as_ref().map(text).unwrap_or_default();
        if kv.key.len() > MAX_LABEL_LEN || value.len() > MAX_LABEL_LEN {
            return Err(format!("label `{}` is longer than {MAX_LABEL_LEN} bytes", truncate(kv.key)));
        }
        pairs.push((kv.key, value));
    }
    Ok(Labels::new(pairs))
}

fn no_recorded_value(flags: u32) -> bool {
    flags & DataPointFlags::NoRecordedValueMask as u32 != 0
}

fn temporality(raw: i32) -> Result<bool, String> {
    match AggregationTemporality::try_from(raw) {
        Ok(AggregationTemporality::Delta) => Ok(true),
        Ok(AggregationTemporality::Cumulative) => Ok(false),
        _ => Err(format!("aggregation temporality {raw} is neither delta nor cumulative")),
    }
}

/// The latest time accepted, ns.
#[derive(Clone, Copy)]
struct Clock {
    max_time: u64,
}

fn decode_metric(metric: Metric, clock: Clock, outcome: &mut Outcome) -> Option<MetricPush> {
    let Metric { name, description, unit, data, .. } = metric;
    let total = |data: &metric::Data| match data {
        metric::Data::Gauge(g) => g.data_points.len(),
        metric::Data::Sum(s) => s.data_points.len(),
        metric::Data::Histogram(h) => h.data_points.len(),
        metric::Data::ExponentialHistogram(e) => e.data_points.len(),
        metric::Data::Summary(s) => s.data_points.len(),
    } as u64;
    if name.is_empty() || name.len() > MAX_LABEL_LEN {
        let points = data.as_ref().map_or(0, total);
        outcome.reject(&truncate(name), || format!("a metric name must have 1 to {MAX_LABEL_LEN} bytes"), points);
        return None;
    }
    let Some(data) = data else {
        outcome.reject(&name, || "the metric has no data (gauge, sum, histogram, ...)".into(), 0);
        return None;
    };
    let (kind, results): (Kind, Vec<Result<Option<Point>, String>>) = match data {
        metric::Data::Gauge(g) => {
            (Kind::Gauge, g.data_points.into_iter().map(|p| number(p, false, false, clock)).collect())
        }
        metric::Data::Sum(s) => {
            let kind = if s.is_monotonic { Kind::Counter } else { Kind::UpDownCounter };
            match temporality(s.aggregation_temporality) {
                Ok(delta) => {
                    (kind, s.data_points.into_iter().map(|p| number(p, delta, s.is_monotonic, clock)).collect())
                }
                Err(why) => {
                    outcome.reject(&name, || why, s.data_points.len() as u64);
                    return None;
                }
            }
        }
        metric::Data::Histogram(h) => match temporality(h.aggregation_temporality) {
            Ok(delta) => (Kind::Histogram, h.data_points.into_iter().map(|p| histogram(p, delta, clock)).collect()),
            Err(why) => {
                outcome.reject(&name, || why, h.data_points.len() as u64);
                return None;
            }
        },
        metric::Data::ExponentialHistogram(e) => match temporality(e.aggregation_temporality) {
            Ok(delta) => {
                (Kind::ExponentialHistogram, e.data_points.into_iter().map(|p| exponential(p, delta, clock)).collect())
            }
            Err(why) => {
                outcome.reject(&name, || why, e.data_points.len() as u64);
                return None;
            }
        },
        // Summaries are cumulative by definition.
        metric::Data::Summary(s) => (Kind::Summary, s.data_points.into_iter().map(|p| summary(p, clock)).collect()),
    };
    let mut points = Vec::with_capacity(results.len());
    for result in results {
        match result {
            Ok(Some(point)) => points.push(point),
            Ok(None) => {}
            Err(why) => outcome.reject(&name, || format!("malformed point: {why}"), 1),
        }
    }
    Some(MetricPush { name, description: truncate(description), unit: truncate(unit), kind, points })
}

fn times(start: u64, time: u64, clock: Clock) -> Result<(u64, u64), String> {
    if time == 0 {
        return Err("time_unix_nano is 0".into());
    }
    if time > clock.max_time {
        let skew = MAX_FUTURE_SKEW_MS / 1000;
        return Err(format!("time_unix_nano {time} is more than {skew} s ahead of the aggregator's clock"));
    }
    if start > time {
        return Err(format!("start_time_unix_nano {start} is after time_unix_nano {time}"));
    }
    Ok((start, time))
}

fn number(p: NumberDataPoint, delta: bool, monotonic: bool, clock: Clock) -> Result<Option<Point>, String> {
    if no_recorded_value(p.flags) {
        return Ok(None);
    }
    let (start, time) = times(p.start_time_unix_nano, p.time_unix_nano, clock)?;
    let value = match p.value {
        Some(number_data_point::Value::AsDouble(v)) => v,
        Some(number_data_point::Value::AsInt(v)) => v as f64,
        None => return Err("no value".into()),
    };
    if !value.is_finite() {
        return Err(format!("value {value} is not a finite number"));
    }
    if monotonic && value < 0.0 {
        return Err(format!("a monotonic sum cannot be negative ({value})"));
    }
    Ok(Some(Point { labels: labels(p.attributes)?, start, time, delta, value: Value::Number(value) }))
}

fn histogram(p: HistogramDataPoint, delta: bool, clock: Clock) -> Result<Option<Point>, String> {
    if no_recorded_value(p.flags) {
        return Ok(None);
    }
    let (start, time) = times(p.start_time_unix_nano, p.time_unix_nano, clock)?;
    let h =
        Histogram::new(p.explicit_bounds, p.bucket_counts, p.count, p.sum.unwrap_or(0.0)).map_err(|e| e.to_string())?;
    Ok(Some(Point { labels: labels(p.attributes)?, start, time, delta, value: Value::Histogram(h) }))
}

fn exponential(p: ExponentialHistogramDataPoint, delta: bool, clock: Clock) -> Result<Option<Point>, String> {
    if no_recorded_value(p.flags) {
        return Ok(None);
    }
    let (start, time) = times(p.start_time_unix_nano, p.time_unix_nano, clock)?;
    let buckets = |b: Option<exponential_histogram_data_point::Buckets>| {
        b.map(|b| Buckets { offset: b.offset, counts: b.bucket_counts }).unwrap_or_default()
    };
    let e = ExpHistogram::new(
        p.scale,
        p.zero_count,
        p.zero_threshold,
        buckets(p.positive),
        buckets(p.negative),
        p.count,
        p.sum.unwrap_or(0.0),
    )
    .map_err(|e| e.to_string())?;
    Ok(Some(Point { labels: labels(p.attributes)?, start, time, delta, value: Value::Exponential(e) }))
}

fn summary(p: SummaryDataPoint, clock: Clock) -> Result<Option<Point>, String> {
    if no_recorded_value(p.flags) {
        return Ok(None);
    }
    let (start, time) = times(p.start_time_unix_nano, p.time_unix_nano, clock)?;
    if !p.sum.is_finite() {
        return Err("the sum is not a finite number".into());
    }
    let value = Value::Summary(CountSum { count: p.count, sum: p.sum });
    Ok(Some(Point { labels: labels(p.attributes)?, start, time, delta: false, value }))
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::metrics::v1::{ResourceMetrics, ScopeMetrics, Sum};
    use opentelemetry_proto::tonic::resource::v1::Resource;

    use super::*;

    const NOW_MS: u64 = 1_800_000_000_000;

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
            ..Default::default()
        }
    }

    fn request(resource: Vec<KeyValue>, points: Vec<NumberDataPoint>) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource { attributes: resource, ..Default::default() }),
                scope_metrics: vec![ScopeMetrics {
                    metrics: vec![Metric {
                        name: "requests".into(),
                        data: Some(metric::Data::Sum(Sum {
                            data_points: points,
                            aggregation_temporality: AggregationTemporality::Cumulative as i32,
                            is_monotonic: true,
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn point(value: Option<number_data_point::Value>, time: u64) -> NumberDataPoint {
        NumberDataPoint { start_time_unix_nano: 1, time_unix_nano: time, value, ..Default::default() }
    }

    #[test]
    fn the_source_comes_from_the_resource() {
        let req = request(
            vec![kv("service.name", "gw"), kv("service.instance.id", "pod-1")],
            vec![point(Some(number_data_point::Value::AsInt(3)), 5)],
        );
        let (pushes, outcome) = decode(req, NOW_MS);
        assert_eq!(outcome, Outcome::default());
        assert_eq!(pushes[0].source, SourceId::new("gw", "pod-1"));
        assert_eq!(pushes[0].metrics[0].kind, Kind::Counter);
        assert_eq!(pushes[0].metrics[0].points[0].value, Value::Number(3.0));
    }

    #[test]
    fn malformed_points_are_rejected_by_name_and_the_rest_kept() {
        let req = request(
            vec![kv("service.name", "gw")],
            vec![
                point(Some(number_data_point::Value::AsDouble(f64::NAN)), 5),
                point(None, 5),
                point(Some(number_data_point::Value::AsDouble(-1.0)), 5),
                point(Some(number_data_point::Value::AsDouble(1.0)), 0),
                point(Some(number_data_point::Value::AsDouble(2.0)), 5),
            ],
        );
        let (pushes, outcome) = decode(req, NOW_MS);
        assert_eq!(outcome.rejected, 4);
        assert!(outcome.message().starts_with("metric `requests`: malformed point"), "{}", outcome.message());
        assert_eq!(pushes[0].source, SourceId::new("gw", "default"));
        assert_eq!(pushes[0].metrics[0].points.len(), 1);
    }

    #[test]
    fn points_from_the_future_are_rejected_within_the_skew_bound() {
        let now_ns = NOW_MS * 1_000_000;
        let skew_ns = MAX_FUTURE_SKEW_MS * 1_000_000;
        let req = request(
            vec![kv("service.name", "gw")],
            vec![
                point(Some(number_data_point::Value::AsInt(1)), u64::MAX),
                point(Some(number_data_point::Value::AsInt(1)), now_ns + skew_ns + 1),
                point(Some(number_data_point::Value::AsInt(1)), now_ns + skew_ns),
                NumberDataPoint {
                    start_time_unix_nano: now_ns,
                    time_unix_nano: now_ns - 1,
                    value: Some(number_data_point::Value::AsInt(1)),
                    ..Default::default()
                },
            ],
        );
        let (pushes, outcome) = decode(req, NOW_MS);
        assert_eq!(outcome.rejected, 3, "{}", outcome.message());
        assert!(outcome.message().contains("ahead of the aggregator's clock"), "{}", outcome.message());
        assert_eq!(pushes[0].metrics[0].points.len(), 1);
    }

    #[test]
    fn a_resource_without_a_service_name_is_rejected() {
        let req = request(vec![], vec![point(Some(number_data_point::Value::AsInt(3)), 5)]);
        let (pushes, outcome) = decode(req, NOW_MS);
        assert!(pushes.is_empty());
        assert_eq!(outcome.rejected, 1);
        assert!(outcome.message().contains("service.name"));
    }
}
