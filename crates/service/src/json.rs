//! JSON input rules shared by every service that reads JSON from a client.

/// Deserializes a non-negative integer written either as a JSON integer
/// (`3`) or as a number with a zero fractional part (`3.0`, `3e0`): JSON
/// Schema's `"type": "integer"`, which the OpenAPI document uses, admits
/// both, so the gateway's bodies and the worker's task payloads do too.
/// `1.5` is an invalid type; `-1` and floats above 2^53 (where a float no
/// longer names one integer) are invalid values.
///
/// # Errors
///
/// The deserializer's error for anything else.
pub fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    deserializer.deserialize_any(WholeNumber)
}

/// The largest float that names exactly one integer, 2^53.
const MAX_EXACT_FLOAT: f64 = 9_007_199_254_740_992.0;

struct WholeNumber;

impl serde::de::Visitor<'_> for WholeNumber {
    type Value = u64;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a non-negative integer")
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<u64, E> {
        if v.fract() != 0.0 || !v.is_finite() {
            Err(E::invalid_type(serde::de::Unexpected::Float(v), &self))
        } else if (0.0..=MAX_EXACT_FLOAT).contains(&v) {
            Ok(v as u64)
        } else {
            Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
        }
    }
}
