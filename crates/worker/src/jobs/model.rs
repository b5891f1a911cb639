//! Job domain types, parsed at the boundary so inner code never re-checks
//! strings.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A job's id: a UUID (v7, so ids sort by creation time).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobId(String);

/// The text is not a job id.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a job id (expected a UUID such as 0190b0a4-7c4e-7bb2-9a55-3f1d2b6c8e01)")]
pub struct ParseJobIdError(String);

impl JobId {
    /// A fresh id.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().hyphenated().to_string())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for JobId {
    type Err = ParseJobIdError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(text)
            .map(|id| Self(id.hyphenated().to_string()))
            .map_err(|_| ParseJobIdError(text.chars().take(64).collect()))
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Waiting in the stream, or waiting for a retry.
    Queued,
    /// A worker holds it.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Finished with an error that retrying cannot fix (unknown kind, invalid
    /// payload).
    Failed,
    /// Failed on every allowed attempt; a copy is in the dead-letter stream.
    Dead,
    /// Cancelled by a client before it finished.
    Cancelled,
}

impl JobState {
    /// The wire and storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the job will never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Dead | Self::Cancelled)
    }

    /// Parses a stored state name.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "dead" => Self::Dead,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }
}

/// A job to submit, already validated.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub kind: String,
    /// The payload as JSON text (validated as JSON by the caller).
    pub payload_json: String,
    pub max_attempts: u32,
    /// Bound on one attempt's run time.
    pub timeout: Duration,
    pub idempotency_key: Option<String>,
    /// The client the job belongs to (set by the gateway); `None`: nobody's.
    pub owner: Option<String>,
    /// The W3C `traceparent` of the submitting call, continued by every
    /// attempt's execution span.
    pub traceparent: Option<String>,
}

impl NewJob {
    /// What an idempotency key is bound to: kind, payload and options. The
    /// same key with another fingerprint is a different request.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest as _;
        let mut hash = sha2::Sha256::new();
        for part in [self.kind.as_bytes(), self.payload_json.as_bytes()] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        hash.update(self.max_attempts.to_be_bytes());
        hash.update((self.timeout.as_millis() as u64).to_be_bytes());
        hex::encode(&hash.finalize()[..16])
    }
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: JobId,
    pub kind: String,
    pub payload_json: String,
    pub state: JobState,
    /// Runs of the job's code that ended (succeeded, failed or timed out).
    /// A delivery lost with its worker spends none.
    pub attempts: u32,
    pub max_attempts: u32,
    /// Times a worker started the job (lost deliveries included, hand-backs
    /// on shutdown not).
    pub deliveries: u32,
    pub timeout_ms: u64,
    /// 0–100, as reported by the task.
    pub progress: u32,
    pub result_json: Option<String>,
    pub error: Option<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub next_attempt_ms: Option<u64>,
    /// How many times an outcome was offered for recording (≥ 2 means the job
    /// ran more than once; only the first outcome counts).
    pub completions: u32,
    /// The worker holding it while `running`.
    pub worker: Option<String>,
    /// The client it belongs to.
    pub owner: Option<String>,
}

impl JobRecord {
    /// Builds a record from the job hash; `None` if the hash is empty or
    /// corrupt.
    pub(crate) fn from_hash(id: JobId, mut fields: HashMap<String, String>) -> Option<Self> {
        let state = JobState::parse(fields.get("state")?)?;
        let number =
            |fields: &HashMap<String, String>, name: &str| fields.get(name).and_then(|v| v.parse::<u64>().ok());
        Some(Self {
            kind: fields.remove("kind")?,
            payload_json: fields.remove("payload").unwrap_or_default(),
            state,
            attempts: number(&fields, "attempts").unwrap_or(0) as u32,
            max_attempts: number(&fields, "max_attempts").unwrap_or(1) as u32,
            deliveries: number(&fields, "deliveries").unwrap_or(0) as u32,
            timeout_ms: number(&fields, "timeout_ms").unwrap_or(0),
            progress: number(&fields, "progress").unwrap_or(0).min(100) as u32,
            result_json: fields.remove("result"),
            error: fields.remove("error"),
            created_ms: number(&fields, "created_ms").unwrap_or(0),
            updated_ms: number(&fields, "updated_ms").unwrap_or(0),
            started_ms: number(&fields, "started_ms"),
            finished_ms: number(&fields, "finished_ms"),
            next_attempt_ms: number(&fields, "next_attempt_ms"),
            completions: number(&fields, "completions").unwrap_or(0) as u32,
            worker: fields.remove("worker"),
            owner: fields.remove("owner"),
            id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_parse_only_uuids() {
        let id = JobId::generate();
        assert_eq!(id.as_str().parse::<JobId>().unwrap(), id);
        let error = "../etc/passwd".parse::<JobId>().unwrap_err();
        assert!(error.to_string().contains("not a job id"));
        assert_eq!(
            "0190B0A4-7C4E-7BB2-9A55-3F1D2B6C8E01".parse::<JobId>().unwrap().as_str(),
            "0190b0a4-7c4e-7bb2-9a55-3f1d2b6c8e01"
        );
    }

    #[test]
    fn states_round_trip_and_know_terminality() {
        for state in [
            JobState::Queued,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Dead,
            JobState::Cancelled,
        ] {
            assert_eq!(JobState::parse(state.as_str()), Some(state));
        }
        assert!(!JobState::Running.is_terminal());
        assert!(JobState::Dead.is_terminal());
        assert_eq!(JobState::parse("bogus"), None);
    }

    #[test]
    fn fingerprints_bind_kind_payload_and_options() {
        let job = NewJob {
            kind: "echo".into(),
            payload_json: "{}".into(),
            max_attempts: 3,
            timeout: Duration::from_secs(1),
            idempotency_key: Some("k".into()),
            owner: None,
            traceparent: None,
        };
        let same = NewJob { owner: Some("other".into()), traceparent: Some("t".into()), ..job.clone() };
        assert_eq!(job.fingerprint(), same.fingerprint(), "owner and trace are not part of the request");
        for other in [
            NewJob { kind: "echoo".into(), ..job.clone() },
            NewJob { payload_json: "{ }".into(), ..job.clone() },
            NewJob { max_attempts: 4, ..job.clone() },
            NewJob { timeout: Duration::from_secs(2), ..job.clone() },
        ] {
            assert_ne!(job.fingerprint(), other.fingerprint(), "{other:?}");
        }
    }

    #[test]
    fn a_record_needs_a_state_and_a_kind() {
        let id = JobId::generate();
        assert!(JobRecord::from_hash(id.clone(), HashMap::new()).is_none());
        let fields = HashMap::from([
            ("state".to_owned(), "queued".to_owned()),
            ("kind".to_owned(), "echo".to_owned()),
            ("attempts".to_owned(), "2".to_owned()),
            ("progress".to_owned(), "250".to_owned()),
        ]);
        let record = JobRecord::from_hash(id, fields).unwrap();
        assert_eq!(record.attempts, 2);
        assert_eq!(record.progress, 100);
        assert_eq!(record.state, JobState::Queued);
    }
}
