//! The Redis key names, all under one prefix.

/// Key names for one queue under a prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// The consumer group every worker joins.
    pub const GROUP: &'static str = "workers";

    /// Keys under `prefix` (e.g. `shoal`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }

    /// The job stream.
    pub fn stream(&self) -> String {
        format!("{}:jobs", self.prefix)
    }

    /// The hash of job `id`.
    pub fn job(&self, id: &str) -> String {
        format!("{}:job:{id}", self.prefix)
    }

    /// The idempotency record for a client key.
    pub fn idempotency(&self, key: &str) -> String {
        format!("{}:idem:{key}", self.prefix)
    }

    /// Jobs waiting for a retry.
    pub fn delayed(&self) -> String {
        format!("{}:delayed", self.prefix)
    }

    /// The dead-letter stream.
    pub fn dead(&self) -> String {
        format!("{}:dead", self.prefix)
    }

    /// The count of jobs not yet terminal.
    pub fn open(&self) -> String {
        format!("{}:open", self.prefix)
    }
}
