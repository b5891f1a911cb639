//! The Redis key names of one queue, all under one hash tag.
//!
//! Every key is `{prefix}:…`: Redis Cluster hashes only the part between
//! the braces, so every key of a queue is in one slot and every script and
//! pipeline touches one node. The scripts also derive keys inside that slot
//! (a job's idempotency key, stored on its record; `{p}:job:` + id), which
//! Cluster allows only because they share the tag.
//!
//! Releases before the tag used `prefix:…` ([`Keys::legacy`]); see
//! [`super::migrate`] for the upgrade.

/// Key names for one queue under a prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    /// `{prefix}` (or, for the old layout, `prefix`).
    base: String,
}

impl Keys {
    /// The consumer group every worker joins.
    pub const GROUP: &'static str = "workers";

    /// Keys under the hash tag `{prefix}` (e.g. `{shoal}:jobs`).
    pub fn new(prefix: impl AsRef<str>) -> Self {
        Self { base: format!("{{{}}}", prefix.as_ref()) }
    }

    /// The names the same prefix had before the hash tag (`shoal:jobs`):
    /// only for migrating a Redis that holds them.
    pub fn legacy(prefix: impl AsRef<str>) -> Self {
        Self { base: prefix.as_ref().to_owned() }
    }

    /// What every key starts with: `{prefix}`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The job stream.
    pub fn stream(&self) -> String {
        format!("{}:jobs", self.base)
    }

    /// The hash of job `id`.
    pub fn job(&self, id: &str) -> String {
        format!("{}:job:{id}", self.base)
    }

    /// The idempotency record for a client key, scoped to its owner (the
    /// owner is hashed, so any text is a safe key part).
    pub fn idempotency(&self, owner: Option<&str>, key: &str) -> String {
        match owner {
            None => format!("{}:idem:{key}", self.base),
            Some(owner) => {
                use sha2::Digest as _;
                let digest = sha2::Sha256::digest(owner.as_bytes());
                format!("{}:idemo:{}:{key}", self.base, hex::encode(&digest[..16]))
            }
        }
    }

    /// The prefix of every job hash (`{p}:job:`).
    pub fn job_prefix(&self) -> String {
        format!("{}:job:", self.base)
    }

    /// Jobs waiting for a retry.
    pub fn delayed(&self) -> String {
        format!("{}:delayed", self.base)
    }

    /// The dead-letter stream.
    pub fn dead(&self) -> String {
        format!("{}:dead", self.base)
    }

    /// The count of jobs not yet terminal.
    pub fn open(&self) -> String {
        format!("{}:open", self.base)
    }

    /// The payload bytes of jobs not yet terminal (the byte budget).
    pub fn open_bytes(&self) -> String {
        format!("{}:open_bytes", self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slot Redis Cluster computes for a key (CRC16/XMODEM of the hash
    /// tag, modulo 16384), as in the cluster specification.
    fn slot(key: &str) -> u16 {
        let bytes = key.as_bytes();
        let hashed = match bytes.iter().position(|&b| b == b'{') {
            Some(open) => match bytes[open + 1..].iter().position(|&b| b == b'}') {
                Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
                _ => bytes,
            },
            None => bytes,
        };
        let mut crc: u16 = 0;
        for &byte in hashed {
            crc ^= u16::from(byte) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
            }
        }
        crc % 16384
    }

    #[test]
    fn every_key_of_a_queue_is_in_one_slot() {
        let keys = Keys::new("shoal");
        let all = [
            keys.stream(),
            keys.job("0190b3c4-aaaa-7bbb-8ccc-123456789abc"),
            keys.idempotency(None, "k"),
            keys.idempotency(Some("client-7"), "k"),
            keys.job_prefix(),
            keys.delayed(),
            keys.dead(),
            keys.open(),
            keys.open_bytes(),
        ];
        assert_eq!(keys.stream(), "{shoal}:jobs");
        let first = slot(&all[0]);
        for key in &all {
            assert!(key.starts_with("{shoal}:"), "{key}");
            assert_eq!(slot(key), first, "{key}");
        }
        // The check is not vacuous: untagged names scatter.
        let legacy = Keys::legacy("shoal");
        assert_eq!(legacy.stream(), "shoal:jobs");
        assert_ne!(slot(&legacy.stream()), slot(&legacy.open()));
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("123456789"), 12739, "the specification's CRC16 check value");
    }
}
