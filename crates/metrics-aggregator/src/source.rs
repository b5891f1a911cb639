//! Who pushed: a source is one service instance, named by the OTLP resource
//! attributes `service.name` and `service.instance.id`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One service instance.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SourceId {
    pub service: String,
    pub instance: String,
}

impl SourceId {
    pub fn new(service: impl Into<String>, instance: impl Into<String>) -> Self {
        Self { service: service.into(), instance: instance.into() }
    }

    /// Parses the `service/instance` form of [`fmt::Display`].
    pub fn parse(text: &str) -> Option<Self> {
        let (service, instance) = text.split_once('/')?;
        Some(Self::new(service, instance))
    }
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.service, self.instance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_round_trips_even_with_slashes_in_the_instance() {
        let id = SourceId::new("gateway", "pod-1/abc");
        assert_eq!(SourceId::parse(&id.to_string()), Some(id));
    }
}
