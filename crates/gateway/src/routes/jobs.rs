//! Durable jobs: `POST /v1/jobs`, `GET /v1/jobs/{id}`, `POST /v1/jobs/{id}/cancel`.
//! The worker owns the queue (see `docs/jobs.md`); these handlers validate,
//! call its gRPC jobs API, and shape the answers.
//!
//! - `POST /v1/jobs` with `{"kind": "sleep", "payload": {...}, "max_attempts": 3,
//!   "timeout_ms": 60000}` (only `kind` is required) and an optional
//!   `Idempotency-Key` header → `202 Accepted`, the job, and
//!   `Location: /v1/jobs/{id}`. Repeating the key returns the same job (still
//!   `202`, with `Idempotent-Replayed: true`), never a second one.
//!   `max_attempts` and `timeout_ms` are integers, also when written with a
//!   zero fraction (`3.0`), as JSON Schema's `integer` allows.
//! - `GET /v1/jobs/{id}` → `200` and the job; `404` when unknown or expired.
//! - `POST /v1/jobs/{id}/cancel` → `202` and the job: a queued job is
//!   cancelled at once, a running one is interrupted cooperatively (poll
//!   `GET` until `cancelled`); `409` when it already ended. Cancelling is an
//!   action on the job, not its removal: the job stays readable, so it is a
//!   `POST`, not a `DELETE` (after a `DELETE` a `GET` must be `404`).
//!
//! - `POST /v1/jobs:batch` with `{"jobs": [{"kind": ..., "idempotency_key":
//!   "...", ...}, ...]}` (1 to [`MAX_BATCH_JOBS`] items, each a `POST
//!   /v1/jobs` body plus its own optional key) → `200` and one result per
//!   item, in order: `accepted` or `replayed` (`status` 202, the job and
//!   its `location`), or `problem` (the item's status and an RFC 9457
//!   problem object; a retryable one carries `retry_after` seconds). The
//!   valid items go to the worker in one `SubmitJobs` call. A body that is
//!   not such a document is a `400` problem, more items than the limit a
//!   `413`; the worker unreachable is a `503` for the whole call. Each item
//!   counts as one request against the client's rate: the items past what
//!   its bucket holds are item-level `429 rate-limited` problems.
//!
//! A full queue is `429` with `Retry-After`; Redis or the workers unreachable
//! is `503` with `Retry-After`.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use shoal_proto::worker::v1::{
    self as pb, CancelJobRequest, GetJobRequest, SubmitJobRequest, SubmitJobsRequest, submit_jobs_result,
};

use super::AppState;
use super::tasks::{REQUEST_TIMEOUT, deadline};
use crate::edge::Caller;
use crate::problem::{ApiError, Table};
use crate::upstream::Policy;

/// The header that makes a submission idempotent.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Most jobs in one `POST /v1/jobs:batch` (the worker takes up to 500 per
/// `SubmitJobs`; 100 keeps a batch within one pipelined Redis round trip of
/// its group commit, which holds up to 256 calls).
pub const MAX_BATCH_JOBS: usize = 100;

/// The body of `POST /v1/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    kind: String,
    #[serde(default)]
    payload: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "max_attempts")]
    max_attempts: Option<u64>,
    #[serde(default, deserialize_with = "timeout_ms")]
    timeout_ms: Option<u64>,
}

/// The integer fields, through [`crate::body::whole_number`], named in
/// their errors.
fn max_attempts<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    named(deserializer, "max_attempts")
}

fn timeout_ms<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    named(deserializer, "timeout_ms")
}

fn named<'de, D: serde::Deserializer<'de>>(deserializer: D, name: &str) -> Result<Option<u64>, D::Error> {
    crate::body::whole_number(deserializer).map_err(|error| serde::de::Error::custom(format_args!("{name}: {error}")))
}

/// The body, with every rejection turned into a problem.
pub struct SubmitJson(SubmitBody);

impl FromRequest<AppState> for SubmitJson {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        // Read and checked as every JSON body is (media type, size, syntax,
        // depth, I-JSON), then typed.
        let crate::body::RawJson(text) = crate::body::RawJson::from_request(request, state).await?;
        serde_json::from_str(&text).map(Self).map_err(|error| ApiError::InvalidJson(error.to_string()))
    }
}

/// A job as the API shows it.
#[derive(Debug, Serialize)]
struct JobView {
    id: String,
    kind: String,
    state: &'static str,
    attempts: u32,
    max_attempts: u32,
    progress: u32,
    payload: Box<RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    timeout_ms: u64,
    created_at: String,
    updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_attempt_at: Option<String>,
}

fn at(ms: i64) -> String {
    shoal_telemetry::rfc3339_from_unix_ms(u64::try_from(ms).unwrap_or(0))
}

impl JobView {
    fn from_proto(job: pb::Job) -> Self {
        let state = match pb::JobState::try_from(job.state).unwrap_or(pb::JobState::Unspecified) {
            pb::JobState::Queued => "queued",
            pb::JobState::Running => "running",
            pb::JobState::Succeeded => "succeeded",
            pb::JobState::Failed => "failed",
            pb::JobState::Dead => "dead",
            pb::JobState::Cancelled => "cancelled",
            pb::JobState::Unspecified => "unknown",
        };
        Self {
            state,
            payload: crate::body::raw(job.payload_json),
            result: job.result_json.map(crate::body::raw),
            error: job.error,
            attempts: job.attempts,
            max_attempts: job.max_attempts,
            progress: job.progress,
            timeout_ms: job.timeout_ms,
            created_at: at(job.created_unix_ms),
            updated_at: at(job.updated_unix_ms),
            started_at: job.started_unix_ms.map(at),
            finished_at: job.finished_unix_ms.map(at),
            next_attempt_at: job.next_attempt_unix_ms.map(at),
            id: job.id,
            kind: job.kind,
        }
    }
}

fn accepted(job: pb::Job, replayed: bool) -> Response {
    let location = format!("/v1/jobs/{}", job.id);
    let mut response = (StatusCode::ACCEPTED, Json(JobView::from_proto(job))).into_response();
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&location) {
        headers.insert(header::LOCATION, value);
    }
    if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// Calls the worker through its one call path with the request's deadline
/// (`Request-Timeout` or the default) and the route's policy.
async fn call<T, F, Fut>(state: &AppState, headers: &HeaderMap, policy: Policy, call: F) -> Result<T, ApiError>
where
    F: Fn(WorkerClient, std::time::Duration) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = deadline(headers.get(REQUEST_TIMEOUT), state.default_timeout, state.max_timeout)?;
    state.worker.call(deadline, policy, |channel, left| call(WorkerClient::new(channel), left)).await
}

type WorkerClient = shoal_proto::worker::v1::worker_service_client::WorkerServiceClient<crate::discovery::GrpcChannel>;

/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 200;

/// A client's `Idempotency-Key`: 1 to [`MAX_IDEMPOTENCY_KEY`] visible ASCII
/// characters (`!` to `~`), as the OpenAPI document says. An empty header is
/// a mistake, not "no key".
fn idempotency_key(value: &HeaderValue) -> Result<String, ApiError> {
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_IDEMPOTENCY_KEY || !bytes.iter().all(u8::is_ascii_graphic) {
        return Err(ApiError::BadRequest(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters (`!` to `~`, no spaces)"
        )));
    }
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// The key the gateway attaches to a submission whose client sent none, for
/// the duration of the call: it makes repeating the call on another worker
/// safe (the queue answers the job the first attempt created).
fn gateway_key() -> String {
    format!("gw-{}", uuid::Uuid::now_v7())
}

fn with_timeout<T>(message: T, deadline: std::time::Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}

/// A submission as the worker takes it, checked as far as the gateway can.
/// `client_key` is the client's idempotency key; without one the gateway's
/// own key makes a retried call safe.
fn to_request(body: SubmitBody, client_key: Option<String>) -> Result<SubmitJobRequest, ApiError> {
    if body.max_attempts == Some(0) {
        return Err(ApiError::BadRequest("max_attempts must be at least 1 (omit it for the default)".into()));
    }
    if body.timeout_ms == Some(0) {
        return Err(ApiError::BadRequest("timeout_ms must be at least 1 (omit it for the default)".into()));
    }
    Ok(SubmitJobRequest {
        kind: body.kind,
        payload_json: body.payload.map_or_else(|| "null".to_owned(), |payload| String::from(Box::<str>::from(payload))),
        // Above u32 is out of the worker's range anyway: it answers the range.
        max_attempts: body.max_attempts.map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
        timeout_ms: body.timeout_ms.unwrap_or(0),
        idempotency_key: client_key.unwrap_or_else(gateway_key),
        owner: None,
    })
}

/// `POST /v1/jobs`.
///
/// # Errors
///
/// Bad input (`400`, `413`, `415`), `429` when the queue is full, the
/// worker's other errors per [`ApiError::from_status`].
pub async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    SubmitJson(body): SubmitJson,
) -> Result<Response, ApiError> {
    let client_key = headers.get(IDEMPOTENCY_KEY).map(idempotency_key).transpose()?;
    let client_sent_key = client_key.is_some();
    let request = SubmitJobRequest { owner: caller.owner(), ..to_request(body, client_key)? };
    let response = call(&state, &headers, Policy::JOB_SUBMIT, |mut worker, deadline| {
        let request = with_timeout(request.clone(), deadline);
        async move { worker.submit_job(request).await }
    })
    .await?;
    let job = response.job.ok_or_else(|| ApiError::BadGateway("worker answered SubmitJob without a job".into()))?;
    // A replay of the gateway's own key is its retry, not the client's.
    Ok(accepted(job, client_sent_key && !response.created))
}

/// The body of `POST /v1/jobs:batch`: the items stay raw until each is
/// parsed on its own, so one bad item is that item's problem only.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    jobs: Vec<Box<RawValue>>,
}

/// One item of a batch: a `POST /v1/jobs` body and its own key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchItem {
    kind: String,
    #[serde(default)]
    payload: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "max_attempts")]
    max_attempts: Option<u64>,
    #[serde(default, deserialize_with = "timeout_ms")]
    timeout_ms: Option<u64>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// The batch body, with every rejection turned into a problem.
pub struct BatchJson(BatchBody);

impl FromRequest<AppState> for BatchJson {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        match Json::<BatchBody>::from_request(request, state).await {
            Ok(Json(body)) => Ok(Self(body)),
            Err(rejection) => Err(ApiError::from_json(rejection, state.max_body_bytes)),
        }
    }
}

/// One item's result in a batch answer.
#[derive(Debug, Serialize)]
struct ItemResult {
    index: usize,
    status: u16,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    location: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<JobView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<serde_json::Value>,
}

impl ItemResult {
    fn submitted(index: usize, job: pb::Job, replayed: bool) -> Self {
        Self {
            index,
            status: StatusCode::ACCEPTED.as_u16(),
            outcome: if replayed { "replayed" } else { "accepted" },
            location: Some(format!("/v1/jobs/{}", job.id)),
            job: Some(JobView::from_proto(job)),
            problem: None,
        }
    }

    fn problem(index: usize, error: &ApiError) -> Self {
        let (status, problem) = error.item_problem(index);
        Self { index, status: status.as_u16(), outcome: "problem", location: None, job: None, problem: Some(problem) }
    }
}

/// The whole answer of `POST /v1/jobs:batch`.
#[derive(Debug, Serialize)]
struct BatchView {
    accepted: usize,
    replayed: usize,
    failed: usize,
    results: Vec<ItemResult>,
}

/// Parses item `index` into a worker request; `Err` is its problem.
fn batch_item(index: usize, raw: &RawValue) -> Result<(SubmitJobRequest, bool), ApiError> {
    let item: BatchItem = serde_json::from_str(raw.get())
        .map_err(|error| ApiError::BadRequest(format!("jobs[{index}] is not a job submission: {error}")))?;
    if let Some(key) = item.idempotency_key.as_deref()
        && (key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY || !key.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(ApiError::BadRequest(format!(
            "jobs[{index}].idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters \
             (`!` to `~`, no spaces; omit it for none)"
        )));
    }
    let BatchItem { kind, payload, max_attempts, timeout_ms, idempotency_key } = item;
    let client_sent_key = idempotency_key.is_some();
    Ok((to_request(SubmitBody { kind, payload, max_attempts, timeout_ms }, idempotency_key)?, client_sent_key))
}

/// `POST /v1/jobs:batch`.
///
/// # Errors
///
/// For the whole call: `400` (not a batch document, or no jobs), `413`
/// (more than [`MAX_BATCH_JOBS`] jobs, or the body limit), `415`, and the
/// worker's whole-call errors per [`ApiError::from_status`] (`503` when no
/// worker serves, `504` past the deadline). Everything else is one item's
/// result.
pub async fn submit_batch(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    BatchJson(body): BatchJson,
) -> Result<Response, ApiError> {
    let items = body.jobs;
    if items.is_empty() {
        return Err(ApiError::BadRequest(format!("`jobs` holds no job; send 1 to {MAX_BATCH_JOBS}")));
    }
    if items.len() > MAX_BATCH_JOBS {
        return Err(ApiError::TooManyJobs { limit: MAX_BATCH_JOBS, got: items.len() });
    }
    let budget = deadline(headers.get(REQUEST_TIMEOUT), state.default_timeout, state.max_timeout)?;
    // The request's own token paid for the first job; each further job takes one.
    let (granted, refusal) = caller.take_more(items.len() - 1);
    let mut results: Vec<Option<ItemResult>> = Vec::with_capacity(items.len());
    let mut sent = Vec::with_capacity(items.len());
    let mut requests = Vec::with_capacity(items.len());
    for (index, raw) in items.iter().enumerate() {
        if let Some(refusal) = refusal
            && index > granted
        {
            results.push(Some(ItemResult::problem(index, &ApiError::RateLimited(refusal))));
            continue;
        }
        match batch_item(index, raw) {
            Ok((request, client_sent_key)) => {
                results.push(None);
                sent.push((index, client_sent_key));
                requests.push(request);
            }
            Err(error) => results.push(Some(ItemResult::problem(index, &error))),
        }
    }
    drop(items);
    if !requests.is_empty() {
        let request = SubmitJobsRequest { jobs: requests, owner: caller.owner() };
        let response = state
            .worker
            .call(budget, Policy::JOB_SUBMIT, |channel, left| {
                let request = with_timeout(request.clone(), left);
                async move { WorkerClient::new(channel).submit_jobs(request).await }
            })
            .await?;
        if response.results.len() != sent.len() {
            return Err(ApiError::BadGateway(format!(
                "worker answered {} results for {} jobs",
                response.results.len(),
                sent.len()
            )));
        }
        for ((index, client_sent_key), result) in sent.into_iter().zip(response.results) {
            let item = match result.outcome {
                Some(submit_jobs_result::Outcome::Submitted(submitted)) => match submitted.job {
                    // A replay of the gateway's own key is its retry, not the client's.
                    Some(job) => ItemResult::submitted(index, job, client_sent_key && !submitted.created),
                    None => ItemResult::problem(index, &ApiError::BadGateway("a submitted item without a job".into())),
                },
                Some(submit_jobs_result::Outcome::Error(error)) => {
                    let status = tonic::Status::new(tonic::Code::from_i32(error.code), error.message);
                    ItemResult::problem(index, &ApiError::from_status(status, budget, state.worker.name(), Table::Job))
                }
                None => ItemResult::problem(index, &ApiError::BadGateway("an item without an outcome".into())),
            };
            results[index] = Some(item);
        }
    }
    let results: Vec<ItemResult> = results.into_iter().flatten().collect();
    let count = |outcome: &str| results.iter().filter(|r| r.outcome == outcome).count();
    let view =
        BatchView { accepted: count("accepted"), replayed: count("replayed"), failed: count("problem"), results };
    Ok((StatusCode::OK, Json(view)).into_response())
}

/// `GET /v1/jobs/{id}`.
///
/// # Errors
///
/// `400` for a malformed id, `404` for an unknown one, the worker's errors.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = id?.0;
    let owner = caller.owner();
    let job = call(&state, &headers, Policy::JOB_READ, |mut worker, deadline| {
        let request = with_timeout(GetJobRequest { id: id.clone(), owner: owner.clone() }, deadline);
        async move { worker.get_job(request).await }
    })
    .await?;
    Ok(Json(JobView::from_proto(job)).into_response())
}

/// `POST /v1/jobs/{id}/cancel`.
///
/// # Errors
///
/// `409` when the job already ended, `404` for an unknown id, the worker's
/// errors.
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = id?.0;
    let owner = caller.owner();
    let job = call(&state, &headers, Policy::JOB_CANCEL, |mut worker, deadline| {
        let request = with_timeout(CancelJobRequest { id: id.clone(), owner: owner.clone() }, deadline);
        async move { worker.cancel_job(request).await }
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(JobView::from_proto(job))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_checked_at_the_boundary() {
        let key = |text: &[u8]| idempotency_key(&HeaderValue::from_bytes(text).unwrap());
        assert_eq!(key(b"order-1").unwrap(), "order-1");
        assert_eq!(key(&[b'k'; 200]).unwrap().len(), 200);
        for bad in [&b""[..], b"a b", &[b'k'; 201], b"caf\xc3\xa9"] {
            assert!(matches!(key(bad), Err(ApiError::BadRequest(_))), "{}", String::from_utf8_lossy(bad));
        }
    }
}
