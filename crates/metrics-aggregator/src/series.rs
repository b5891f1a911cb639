//! What a series is: a metric name plus a label set, and the kinds of metric
//! the aggregator merges.

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A label set, sorted by key, one value per key. Built only through
/// [`Labels::new`], so two equal sets always compare equal. Cloning shares
/// the pairs: the store, the metric index and the windows hold one copy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels(Arc<[(String, String)]>);

static EMPTY: std::sync::LazyLock<Arc<[(String, String)]>> = std::sync::LazyLock::new(|| Arc::from(Vec::new()));

impl Default for Labels {
    /// The empty set, one shared copy (fleet-wide groups build many).
    fn default() -> Self {
        Self(EMPTY.clone())
    }
}

impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter())
    }
}

impl<'de> Deserialize<'de> for Labels {
    /// Sorted and de-duplicated again: a checkpoint is input too.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<(String, String)>::deserialize(deserializer).map(Self::new)
    }
}

impl Labels {
    /// Sorts by key; for a repeated key the last value wins.
    pub fn new(mut pairs: Vec<(String, String)>) -> Self {
        pairs.reverse();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs.dedup_by(|later, earlier| later.0 == earlier.0);
        Self(pairs.into())
    }

    /// Whether both are the same shared copy (not only equal).
    pub fn shares(&self, other: &Labels) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The address of the shared copy: equal for clones, a cheap identity
    /// where sets are shared (within a metric, see the store).
    pub fn addr(&self) -> usize {
        Arc::as_ptr(&self.0).cast::<()>() as usize
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key)).ok().map(|i| self.0[i].1.as_str())
    }

    /// Whether every `(key, value)` matcher holds.
    pub fn matches<'a>(&self, matchers: impl IntoIterator<Item = (&'a str, &'a str)>) -> bool {
        matchers.into_iter().all(|(k, v)| self.get(k) == Some(v))
    }

    /// Only the labels named in `keep`.
    pub fn project(&self, keep: &[String]) -> Self {
        if keep.is_empty() {
            return Self::default();
        }
        Self(self.0.iter().filter(|(k, _)| keep.iter().any(|w| w == k)).cloned().collect())
    }

    /// Approximate heap size of the one shared copy, for memory accounting.
    pub fn heap_bytes(&self) -> usize {
        16 + self.0.iter().map(|(k, v)| k.len() + v.len() + 48).sum::<usize>()
    }
}

/// The kind of a metric, from its OTLP data type. A metric name keeps the
/// kind it was first seen with; a push with another kind is rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// Monotonic sum.
    Counter,
    /// Non-monotonic sum.
    UpDownCounter,
    Gauge,
    Histogram,
    ExponentialHistogram,
    /// Count and sum only.
    Summary,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::UpDownCounter => "up-down counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
            Kind::ExponentialHistogram => "exponential histogram",
            Kind::Summary => "summary",
        }
    }

    /// Counters, histograms and summaries: values that only add up, so they
    /// have windows and survive their source going stale.
    pub fn is_additive(self) -> bool {
        !matches!(self, Kind::Gauge | Kind::UpDownCounter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Labels::new(pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect())
    }

    #[test]
    fn labels_are_sorted_and_the_last_value_of_a_key_wins() {
        let a = labels(&[("b", "1"), ("a", "2"), ("b", "3")]);
        assert_eq!(a, labels(&[("a", "2"), ("b", "3")]));
        assert_eq!(a.get("b"), Some("3"));
        assert!(a.matches([("a", "2")]));
        assert!(!a.matches([("a", "3")]));
        assert_eq!(a.project(&["b".to_owned()]), labels(&[("b", "3")]));
    }
}
