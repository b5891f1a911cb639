//! The fleet view as Prometheus text (format 0.0.4), appended to the
//! aggregator's own `/metrics`.
//!
//! Every fleet series is named `fleet_<metric>` (so it never collides with
//! the aggregator's own series of the same name) and carries a `service`
//! label: one series per service and label set, merged across the service's
//! instances by the metric's rule (a label already called `service` becomes
//! `exported_service`). Counters get `_total`; histograms `_bucket`, `_sum`
//! and `_count`; exponential histograms and summaries `_count` and `_sum`
//! only (there is no classic text form for exponential buckets, and summary
//! quantiles cannot be merged). Per source: `fleet_up{service,instance}` and
//! `fleet_source_last_seen_timestamp_seconds{service,instance}`.
//!
//! Names are made unique, since Prometheus rejects a whole scrape over one
//! duplicate: a pushed label whose sanitised name is already taken (`a.b`
//! and `a_b`, or a pushed `exported_service` beside a renamed `service`)
//! gets `exported_` prefixed until it is free; a metric whose sanitised
//! series names are already taken by an earlier metric (by name order, so
//! always the same one) is left out of the text (queries still answer it).

use std::collections::HashSet;

use shoal_telemetry::metrics::text::{escape_label, format_float, header, sanitize};

use crate::merge::Merged;
use crate::series::{Kind, Labels};
use crate::store::{Selection, Store};

/// Renders the fleet view at `now_ms`.
pub fn render(store: &Store, now_ms: u64) -> String {
    let mut out = String::with_capacity(4096);
    let mut taken: HashSet<String> =
        ["fleet_up", "fleet_source_last_seen_timestamp_seconds"].into_iter().map(String::from).collect();
    let sources = store.sources(now_ms);
    if !sources.is_empty() {
        header(&mut out, "fleet_up", "Whether the source pushed within its time-to-live", "gauge");
        for s in &sources {
            let labels = [("service", s.id.service.as_str()), ("instance", s.id.instance.as_str())];
            sample(&mut out, "fleet_up", &labels, &Labels::default(), None, if s.up { 1.0 } else { 0.0 });
        }
        let name = "fleet_source_last_seen_timestamp_seconds";
        header(&mut out, name, "Time of the source's last accepted push", "gauge");
        for s in &sources {
            let labels = [("service", s.id.service.as_str()), ("instance", s.id.instance.as_str())];
            sample(&mut out, name, &labels, &Labels::default(), None, s.last_seen_ms as f64 / 1000.0);
        }
    }
    for metric in store.metrics() {
        let selection = Selection { by_service: true, ..Selection::metric(&metric.name) };
        let Some(answer) = store.select(&selection, now_ms) else {
            continue;
        };
        let base = format!("fleet_{}", sanitize(&metric.name));
        let counter_name = if base.ends_with("_total") { base.clone() } else { format!("{base}_total") };
        let names: Vec<String> = match metric.kind {
            Kind::Counter => vec![counter_name],
            Kind::Gauge | Kind::UpDownCounter => vec![base.clone()],
            Kind::Histogram => ["", "_bucket", "_sum", "_count"].iter().map(|x| format!("{base}{x}")).collect(),
            Kind::ExponentialHistogram | Kind::Summary => {
                ["", "_sum", "_count"].iter().map(|x| format!("{base}{x}")).collect()
            }
        };
        if names.iter().any(|n| taken.contains(n)) {
            continue;
        }
        taken.extend(names);
        match metric.kind {
            Kind::Counter => {
                let name = if base.ends_with("_total") { base.clone() } else { format!("{base}_total") };
                header(&mut out, &name, &metric.description, "counter");
                for (key, group) in &answer.groups {
                    if let Merged::Counter(v) = group.value {
                        sample(&mut out, &name, &service(key.service.as_deref()), &key.labels, None, v);
                    }
                }
            }
            Kind::Gauge | Kind::UpDownCounter => {
                header(&mut out, &base, &metric.description, "gauge");
                for (key, group) in &answer.groups {
                    if let Merged::Level(l) = group.value {
                        sample(&mut out, &base, &service(key.service.as_deref()), &key.labels, None, l.value);
                    }
                }
            }
            Kind::Histogram => {
                header(&mut out, &base, &metric.description, "histogram");
                let bucket = format!("{base}_bucket");
                for (key, group) in &answer.groups {
                    let Merged::Histogram(h) = &group.value else {
                        continue;
                    };
                    let svc = service(key.service.as_deref());
                    let mut cumulative = 0u64;
                    for (bound, count) in h.bounds.iter().zip(&h.counts) {
                        cumulative = cumulative.saturating_add(*count);
                        sample(&mut out, &bucket, &svc, &key.labels, Some(&format_float(*bound)), cumulative as f64);
                    }
                    sample(&mut out, &bucket, &svc, &key.labels, Some("+Inf"), h.count as f64);
                    sample(&mut out, &format!("{base}_sum"), &svc, &key.labels, None, h.sum);
                    sample(&mut out, &format!("{base}_count"), &svc, &key.labels, None, h.count as f64);
                }
            }
            Kind::ExponentialHistogram | Kind::Summary => {
                header(&mut out, &base, &metric.description, "summary");
                for (key, group) in &answer.groups {
                    let (count, sum) = match &group.value {
                        Merged::Exponential(e) => (e.count, e.sum),
                        Merged::Summary(s) => (s.count, s.sum),
                        _ => continue,
                    };
                    let svc = service(key.service.as_deref());
                    sample(&mut out, &format!("{base}_sum"), &svc, &key.labels, None, sum);
                    sample(&mut out, &format!("{base}_count"), &svc, &key.labels, None, count as f64);
                }
            }
        }
    }
    out
}

/// A valid Prometheus label name: `[a-zA-Z_][a-zA-Z0-9_]*`, and not one of
/// the reserved `__` names.
fn label_name(key: &str) -> String {
    let name = sanitize(key).replace(':', "_");
    if name.starts_with("__") || name.is_empty() { format!("exported{name}_") } else { name }
}

fn service(name: Option<&str>) -> [(&'static str, &str); 1] {
    [("service", name.unwrap_or(""))]
}

fn sample(out: &mut String, name: &str, fixed: &[(&str, &str)], labels: &Labels, le: Option<&str>, value: f64) {
    out.push_str(name);
    out.push('{');
    let mut first = true;
    let mut pair = |out: &mut String, key: &str, value: &str| {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(key);
        out.push_str("=\"");
        escape_label(out, value);
        out.push('"');
    };
    let mut used: Vec<String> = fixed.iter().map(|(k, _)| (*k).to_owned()).collect();
    used.push("le".to_owned());
    for (k, v) in fixed {
        pair(out, k, v);
    }
    for (k, v) in labels.iter() {
        let mut key = label_name(k);
        while used.contains(&key) {
            key = format!("exported_{key}");
        }
        pair(out, &key, v);
        used.push(key);
    }
    if let Some(le) = le {
        pair(out, "le", le);
    }
    out.push_str("} ");
    out.push_str(&format_float(value));
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::histogram::Histogram;
    use crate::source::SourceId;
    use crate::store::{Limits, MetricPush, Point, Settings, SourcePush, Value};

    #[test]
    fn the_fleet_renders_per_service_with_prefixed_names() {
        let mut store = Store::new(Settings {
            limits: Limits { max_series_per_metric: 10, max_series: 100, max_sources: 10, max_bytes: 1 << 30 },
            ttl_ms: 30_000,
            retention_ms: 3_600_000,
            policies: HashMap::new(),
        });
        for instance in ["a", "b"] {
            store.ingest(
                SourcePush {
                    source: SourceId::new("gw", instance),
                    metrics: vec![
                        MetricPush {
                            name: "http.requests".into(),
                            description: "HTTP requests".into(),
                            unit: String::new(),
                            kind: Kind::Counter,
                            points: vec![Point {
                                labels: Labels::new(vec![("service".into(), "x".into())]),
                                start: 1,
                                time: 2,
                                delta: false,
                                value: Value::Number(3.0),
                            }],
                        },
                        MetricPush {
                            name: "latency".into(),
                            description: String::new(),
                            unit: "s".into(),
                            kind: Kind::Histogram,
                            points: vec![Point {
                                labels: Labels::default(),
                                start: 1,
                                time: 2,
                                delta: false,
                                value: Value::Histogram(Histogram::new(vec![0.1], vec![1, 2], 3, 1.5).unwrap()),
                            }],
                        },
                    ],
                },
                0,
            );
        }
        let text = render(&store, 0);
        assert!(text.contains("# TYPE fleet_http_requests_total counter\n"), "{text}");
        assert!(text.contains("fleet_http_requests_total{service=\"gw\",exported_service=\"x\"} 6\n"), "{text}");
        assert!(text.contains("fleet_latency_bucket{service=\"gw\",le=\"0.1\"} 2\n"), "{text}");
        assert!(text.contains("fleet_latency_bucket{service=\"gw\",le=\"+Inf\"} 6\n"), "{text}");
        assert!(text.contains("fleet_up{service=\"gw\",instance=\"a\"} 1\n"), "{text}");
    }

    #[test]
    fn colliding_names_are_made_unique() {
        let mut store = Store::new(Settings {
            limits: Limits { max_series_per_metric: 10, max_series: 100, max_sources: 10, max_bytes: 1 << 30 },
            ttl_ms: 30_000,
            retention_ms: 3_600_000,
            policies: HashMap::new(),
        });
        let point = |pairs: &[(&str, &str)], value: f64| Point {
            labels: Labels::new(pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
            start: 1,
            time: 2,
            delta: false,
            value: Value::Number(value),
        };
        let metric = |name: &str, kind: Kind, points: Vec<Point>| MetricPush {
            name: name.into(),
            description: String::new(),
            unit: String::new(),
            kind,
            points,
        };
        store.ingest(
            SourcePush {
                source: SourceId::new("gw", "a"),
                metrics: vec![
                    metric(
                        "hits",
                        Kind::Counter,
                        vec![point(&[("a.b", "1"), ("a_b", "2"), ("service", "x"), ("exported_service", "y")], 1.0)],
                    ),
                    metric("up", Kind::Gauge, vec![point(&[], 1.0)]),
                    metric("x.total", Kind::Counter, vec![point(&[], 1.0)]),
                    metric("x_total", Kind::Counter, vec![point(&[], 2.0)]),
                    metric("huge", Kind::Counter, vec![point(&[], f64::MAX), point(&[("k", "v")], f64::MAX)]),
                ],
            },
            0,
        );
        let text = render(&store, 0);
        let line = text.lines().find(|l| l.starts_with("fleet_hits_total{")).unwrap();
        let names: Vec<&str> = line.split(['{', ',']).skip(1).filter_map(|p| p.split('=').next()).collect();
        let unique: HashSet<&str> = names.iter().copied().collect();
        assert_eq!(names.len(), unique.len(), "{line}");
        assert_eq!(names.len(), 5, "{line}");
        // `up` would be `fleet_up`, the sources' family: left out.
        assert_eq!(text.matches("# TYPE fleet_up ").count(), 1, "{text}");
        assert_eq!(text.matches("# TYPE fleet_x_total ").count(), 1, "{text}");
        assert!(!text.contains("inf") && !text.contains("NaN"), "{text}");
    }
}
