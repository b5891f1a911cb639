//! The jobs half of `WorkerService`: validates requests at the boundary,
//! calls the [`JobStore`], and shapes the answers. Errors are [`JobError`],
//! mapped to gRPC once in `crate::error`.

use std::time::Duration;

use shoal_proto::worker::v1 as pb;

use super::model::{JobId, JobRecord, JobState, NewJob};
use super::store::{CancelOutcome, JobStore, StoreError, SubmitOutcome};
use crate::config::{JobsConfig, MAX_ATTEMPTS_LIMIT};
use crate::error::JobError;
use crate::tasks::TaskRegistry;

/// Longest accepted idempotency key.
const MAX_IDEMPOTENCY_KEY: usize = 200;
/// Most jobs in one `SubmitJobs` call.
pub const MAX_BATCH_JOBS: usize = 500;
/// Longest accepted owner.
const MAX_OWNER: usize = 256;
/// Bound on every Redis round trip of an API call.
const STORE_DEADLINE: Duration = Duration::from_secs(3);

/// Submission, lookup and cancellation of jobs.
#[derive(Debug, Clone)]
pub struct JobsApi {
    store: Option<JobStore>,
    registry: TaskRegistry,
    default_max_attempts: u32,
    default_timeout: Duration,
    max_timeout: Duration,
}

impl JobsApi {
    /// The API over `store` (`None`: jobs disabled).
    pub fn new(store: Option<JobStore>, registry: TaskRegistry, config: &JobsConfig) -> Self {
        Self {
            store,
            registry,
            default_max_attempts: config.default_max_attempts,
            default_timeout: config.default_job_timeout,
            max_timeout: config.max_job_timeout,
        }
    }

    fn store(&self) -> Result<&JobStore, JobError> {
        self.store.as_ref().ok_or(JobError::Disabled)
    }

    /// Validates and queues a job.
    ///
    /// # Errors
    ///
    /// [`JobError::Invalid`] naming what to fix, [`JobError::QueueFull`],
    /// [`JobError::StoreUnavailable`], [`JobError::Disabled`].
    /// `traceparent` is the submitting call's trace context, stored with the
    /// job so that every attempt continues its trace.
    pub async fn submit(
        &self,
        request: pb::SubmitJobRequest,
        traceparent: Option<String>,
    ) -> Result<pb::SubmitJobResponse, JobError> {
        let store = self.store()?;
        let mut job = self.validate(request)?;
        job.traceparent = traceparent;
        let (record, created) = match bounded(store.submit(&job)).await? {
            SubmitOutcome::Created(record) => {
                tracing::debug!(job_id = %record.id, kind = %record.kind, "job queued");
                (*record, true)
            }
            SubmitOutcome::Existing(id) => {
                let record = bounded(store.get(&id)).await?.ok_or_else(|| JobError::NotFound(id.to_string()))?;
                (record, false)
            }
            SubmitOutcome::KeyMismatch(id) => return Err(JobError::KeyReused { id: id.to_string() }),
            SubmitOutcome::Full { open } => return Err(JobError::QueueFull { open }),
            SubmitOutcome::FullBytes { bytes } => return Err(JobError::QueueBytesFull { bytes }),
        };
        Ok(pb::SubmitJobResponse { job: Some(to_proto(record)), created })
    }

    /// Validates and queues a batch of jobs: each item on its own, all the
    /// valid ones submitted at once (the store's batcher sends them to Redis
    /// in one pipelined round trip when they fit one batch). `owner` applies
    /// to every item.
    ///
    /// # Errors
    ///
    /// [`JobError::Invalid`] for an empty or oversized batch,
    /// [`JobError::Disabled`]; every other failure is one item's result.
    pub async fn submit_many(
        &self,
        request: pb::SubmitJobsRequest,
        traceparent: Option<String>,
    ) -> Result<pb::SubmitJobsResponse, JobError> {
        self.store()?;
        let pb::SubmitJobsRequest { jobs, owner } = request;
        if jobs.is_empty() || jobs.len() > MAX_BATCH_JOBS {
            return Err(JobError::Invalid(format!("a batch holds 1 to {MAX_BATCH_JOBS} jobs, got {}", jobs.len())));
        }
        let submissions = jobs.into_iter().map(|item| {
            let item = pb::SubmitJobRequest { owner: owner.clone(), ..item };
            self.submit(item, traceparent.clone())
        });
        let results = futures::future::join_all(submissions)
            .await
            .into_iter()
            .map(|result| pb::SubmitJobsResult {
                outcome: Some(match result {
                    Ok(submitted) => pb::submit_jobs_result::Outcome::Submitted(submitted),
                    Err(error) => {
                        let status = tonic::Status::from(error);
                        pb::submit_jobs_result::Outcome::Error(pb::ItemError {
                            code: status.code() as i32,
                            message: status.message().to_owned(),
                        })
                    }
                }),
            })
            .collect();
        Ok(pb::SubmitJobsResponse { results })
    }

    fn validate(&self, request: pb::SubmitJobRequest) -> Result<NewJob, JobError> {
        let pb::SubmitJobRequest { kind, payload_json, max_attempts, timeout_ms, idempotency_key, owner } = request;
        let Some(task) = self.registry.get(&kind) else {
            return Err(JobError::Invalid(crate::error::UnknownKind::job(&kind, self.registry.names()).to_string()));
        };
        let payload_json = if payload_json.trim().is_empty() { "null".to_owned() } else { payload_json };
        if let Err(error) = serde_json::from_str::<serde::de::IgnoredAny>(&payload_json) {
            return Err(JobError::Invalid(format!("payload_json is not valid JSON: {error}")));
        }
        // The kind's own checks, so a payload it cannot take is refused now
        // rather than failing the job when it runs.
        if let Err(error) = task.validate(&payload_json) {
            return Err(JobError::Invalid(format!("kind `{}`: {error}", task.name())));
        }
        let max_attempts = match max_attempts {
            0 => self.default_max_attempts,
            n if n > MAX_ATTEMPTS_LIMIT => {
                return Err(JobError::Invalid(format!(
                    "max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT}, got {n}"
                )));
            }
            n => n,
        };
        let timeout = match timeout_ms {
            0 => self.default_timeout,
            ms if Duration::from_millis(ms) > self.max_timeout => {
                return Err(JobError::Invalid(format!(
                    "timeout_ms must be at most {} (the worker's --max-job-timeout), got {ms}",
                    self.max_timeout.as_millis()
                )));
            }
            ms => Duration::from_millis(ms),
        };
        let idempotency_key = match idempotency_key {
            key if key.is_empty() => None,
            key if key.len() > MAX_IDEMPOTENCY_KEY || !key.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(JobError::Invalid(format!(
                    "idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
                )));
            }
            key => Some(key),
        };
        let owner = match owner {
            Some(owner) if owner.len() > MAX_OWNER => {
                return Err(JobError::Invalid(format!("owner must be at most {MAX_OWNER} bytes")));
            }
            owner => owner.filter(|o| !o.is_empty()),
        };
        Ok(NewJob {
            kind: task.name().to_owned(),
            payload_json,
            max_attempts,
            timeout,
            idempotency_key,
            owner,
            traceparent: None,
        })
    }

    /// The job `id`. With an `owner`, a job of anyone else is
    /// [`JobError::NotFound`] (its existence is not revealed).
    ///
    /// # Errors
    ///
    /// [`JobError::Invalid`] for a malformed id, [`JobError::NotFound`], or a
    /// store failure.
    pub async fn get(&self, id: &str, owner: Option<&str>) -> Result<pb::Job, JobError> {
        let store = self.store()?;
        let id = parse_id(id)?;
        let record = bounded(store.get(&id))
            .await?
            .filter(|record| visible(record, owner))
            .ok_or_else(|| JobError::NotFound(id.to_string()))?;
        Ok(to_proto(record))
    }

    /// Cancels job `id` and returns it as it is now.
    ///
    /// # Errors
    ///
    /// [`JobError::AlreadyEnded`], [`JobError::NotFound`], a malformed id, or a
    /// store failure.
    pub async fn cancel(&self, id: &str, owner: Option<&str>) -> Result<pb::Job, JobError> {
        let store = self.store()?;
        let id = parse_id(id)?;
        let owner = owner.filter(|o| !o.is_empty());
        match bounded(store.cancel(&id, owner)).await? {
            CancelOutcome::Cancelled | CancelOutcome::Requested => {
                tracing::info!(job_id = %id, "job cancellation requested");
            }
            CancelOutcome::AlreadyEnded(state) => {
                return Err(JobError::AlreadyEnded { id: id.to_string(), state: state.as_str() });
            }
            CancelOutcome::NotFound => return Err(JobError::NotFound(id.to_string())),
        }
        let record = bounded(store.get(&id)).await?.ok_or_else(|| JobError::NotFound(id.to_string()))?;
        Ok(to_proto(record))
    }
}

/// Whether a call naming `owner` may see `record`: a call without an owner
/// (an internal caller) sees every job; one with an owner only its own.
fn visible(record: &JobRecord, owner: Option<&str>) -> bool {
    match owner.filter(|o| !o.is_empty()) {
        None => true,
        Some(owner) => record.owner.as_deref() == Some(owner),
    }
}

fn parse_id(id: &str) -> Result<JobId, JobError> {
    id.parse().map_err(|e: super::model::ParseJobIdError| JobError::Invalid(e.to_string()))
}

async fn bounded<T>(operation: impl Future<Output = Result<T, StoreError>>) -> Result<T, JobError> {
    match tokio::time::timeout(STORE_DEADLINE, operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) if error.is_out_of_memory() => {
            tracing::warn!(error = &error as &dyn std::error::Error, "redis is at its memory limit");
            Err(JobError::StoreFull)
        }
        Ok(Err(error)) => {
            tracing::warn!(error = &error as &dyn std::error::Error, "job store call failed");
            Err(JobError::StoreUnavailable)
        }
        Err(_) => {
            tracing::warn!(deadline_ms = STORE_DEADLINE.as_millis() as u64, "job store call timed out");
            Err(JobError::StoreUnavailable)
        }
    }
}

fn to_proto(record: JobRecord) -> pb::Job {
    let state = match record.state {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Dead => pb::JobState::Dead,
        JobState::Cancelled => pb::JobState::Cancelled,
    };
    let ms = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    pb::Job {
        id: record.id.to_string(),
        kind: record.kind,
        state: state as i32,
        attempts: record.attempts,
        max_attempts: record.max_attempts,
        progress: if record.state == JobState::Succeeded { 100 } else { record.progress },
        result_json: record.result_json,
        error: record.error,
        created_unix_ms: ms(record.created_ms),
        updated_unix_ms: ms(record.updated_ms),
        started_unix_ms: record.started_ms.map(ms),
        finished_unix_ms: record.finished_ms.map(ms),
        next_attempt_unix_ms: record.next_attempt_ms.map(ms),
        payload_json: record.payload_json,
        timeout_ms: record.timeout_ms,
    }
}
