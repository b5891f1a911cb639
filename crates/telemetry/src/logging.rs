//! Log output: one JSON object per line for containers, or readable text for
//! a terminal. Every line emitted inside a span carries the OpenTelemetry
//! `trace_id` and `span_id`, so logs and traces join up.

use std::fmt;

use opentelemetry::trace::TraceContextExt as _;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

pub(crate) fn json_layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer().event_format(JsonWithTrace).with_writer(std::io::stdout)
}

pub(crate) fn text_layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer().with_target(true).with_writer(std::io::stdout)
}

/// Formats an event as a JSON object: `timestamp`, `level`, `target`,
/// `message`, the event's fields, the innermost `span`, `trace_id`, `span_id`.
struct JsonWithTrace;

impl<S, N> FormatEvent<S, N> for JsonWithTrace
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        let mut object = Map::new();
        object.insert("timestamp".into(), Value::String(rfc3339_now()));
        object.insert("level".into(), Value::String(meta.level().as_str().to_owned()));
        object.insert("target".into(), Value::String(meta.target().to_owned()));
        let mut visitor = JsonVisitor(&mut object);
        event.record(&mut visitor);

        if let Some(span) = ctx.lookup_current() {
            object.insert("span".into(), Value::String(span.name().to_owned()));
            let id = span.id();
            let context =
                tracing::dispatcher::get_default(|dispatch| tracing_opentelemetry::get_otel_context(&id, dispatch));
            if let Some(context) = context {
                let otel_span = context.span();
                let span_context = otel_span.span_context();
                if span_context.is_valid() {
                    object.insert("trace_id".into(), Value::String(span_context.trace_id().to_string()));
                    object.insert("span_id".into(), Value::String(span_context.span_id().to_string()));
                }
            }
        }
        let line = serde_json::to_string(&object).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl JsonVisitor<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        // `message` is the event's text; any other name is a structured field.
        self.0.insert(field.name().to_owned(), value);
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        self.put(field, Value::String(text));
    }
}

/// UTC time as RFC 3339 with milliseconds, without pulling in a date crate.
fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    rfc3339_from_unix_ms(now.as_millis() as u64)
}

/// A Unix time in milliseconds as RFC 3339 UTC with milliseconds
/// (`2026-11-27T05:33:42.129Z`).
pub fn rfc3339_from_unix_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (hour, minute, second) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    let (year, month, day) = civil_from_days(days as i64);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{:03}Z", ms % 1000)
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn civil_dates_are_right_across_leap_years() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_784), (2026, 11, 27));
    }

    #[test]
    fn unix_milliseconds_format_as_rfc3339() {
        assert_eq!(super::rfc3339_from_unix_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339_from_unix_ms(1_795_757_622_129), "2026-11-27T05:33:42.129Z");
    }
}
