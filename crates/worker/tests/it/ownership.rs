//! Jobs per client and what the operator sees, over gRPC against an
//! in-process worker and a real Redis: owners (scoped idempotency keys, no
//! leak of another owner's job), idempotency keys bound to their request and
//! living exactly as long as their job, the byte budget, the queue gauges,
//! and a trace that follows a job through the queue into each attempt.

use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use shoal_proto::worker::v1::{CancelJobRequest, GetJobRequest, Job, JobState, SubmitJobRequest};
use shoal_telemetry::{LogFormat, TelemetryConfig};
use shoal_testkit::{RedisServer, eventually};
use tonic::Code;

use crate::helpers::{TestWorker, spawn_worker};

async fn spawn_with_redis(redis: &RedisServer, extra: &[&str]) -> TestWorker {
    let url = redis.url();
    let mut args = vec!["--redis-url", url.as_str(), "--reaper-interval", "100ms"];
    args.extend_from_slice(extra);
    spawn_worker(&args).await
}

fn request(kind: &str, payload: &str, key: &str, owner: Option<&str>) -> SubmitJobRequest {
    SubmitJobRequest {
        kind: kind.into(),
        payload_json: payload.into(),
        idempotency_key: key.into(),
        owner: owner.map(str::to_owned),
        ..Default::default()
    }
}

async fn wait_for_state(worker: &TestWorker, id: &str, state: JobState) -> Job {
    eventually(Duration::from_secs(15), "job reaches the state", || {
        let mut client = worker.client.clone();
        let id = id.to_owned();
        async move {
            let job = client.get_job(GetJobRequest { id, owner: None }).await.ok()?.into_inner();
            (job.state == state as i32).then_some(job)
        }
    })
    .await
}

#[tokio::test]
async fn idempotency_keys_are_per_owner_and_jobs_are_private_to_theirs() {
    let redis = RedisServer::start();
    let worker = spawn_with_redis(&redis, &[]).await;
    let mut client = worker.client.clone();
    let body = r#"{"ms":60000}"#;
    let alice = client.submit_job(request("sleep", body, "order-1", Some("alice"))).await.unwrap().into_inner();
    let bob = client.submit_job(request("sleep", body, "order-1", Some("bob"))).await.unwrap().into_inner();
    let replay = client.submit_job(request("sleep", body, "order-1", Some("alice"))).await.unwrap().into_inner();
    let (alice, bob, replay) = (alice.job.unwrap(), bob.job.unwrap(), replay);
    assert_ne!(alice.id, bob.id, "the same key from two owners names two jobs");
    assert!(!replay.created);
    assert_eq!(replay.job.unwrap().id, alice.id);

    // Another owner's job does not exist, for reads and for cancels.
    let get = |id: &str, owner: Option<&str>| GetJobRequest { id: id.into(), owner: owner.map(str::to_owned) };
    let hidden = client.get_job(get(&alice.id, Some("bob"))).await.unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound);
    let unknown = client.get_job(get("0190b0a4-7c4e-7bb2-9a55-3f1d2b6c8e01", Some("bob"))).await.unwrap_err();
    assert_eq!(
        hidden.message().replace(&alice.id, "ID"),
        unknown.message().replace("0190b0a4-7c4e-7bb2-9a55-3f1d2b6c8e01", "ID"),
        "indistinguishable from a missing job"
    );
    let cancel = CancelJobRequest { id: alice.id.clone(), owner: Some("bob".into()) };
    assert_eq!(client.cancel_job(cancel).await.unwrap_err().code(), Code::NotFound);
    let own = client.get_job(get(&alice.id, Some("alice"))).await.unwrap().into_inner();
    assert!(own.state == JobState::Queued as i32 || own.state == JobState::Running as i32, "bob's cancel did nothing");
    client.cancel_job(CancelJobRequest { id: alice.id.clone(), owner: Some("alice".into()) }).await.unwrap();
    wait_for_state(&worker, &alice.id, JobState::Cancelled).await;
}

#[tokio::test]
async fn a_key_reused_for_another_request_is_refused_and_a_key_never_outlives_its_job() {
    let redis = RedisServer::start();
    let worker = spawn_with_redis(&redis, &["--job-ttl", "1s", "--idempotency-ttl", "1s"]).await;
    let mut client = worker.client.clone();
    let first = client.submit_job(request("echo", r#"{"n":1}"#, "k-1", None)).await.unwrap().into_inner();
    let id = first.job.unwrap().id;
    let reused = client.submit_job(request("echo", r#"{"n":2}"#, "k-1", None)).await.unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists, "{reused:?}");
    assert!(reused.message().contains(&id) && reused.message().contains("different"), "{reused:?}");

    // Record and key expire together: a replay after that is a new job,
    // never an answer naming a job that is gone.
    wait_for_state(&worker, &id, JobState::Succeeded).await;
    eventually(Duration::from_secs(10), "the ended job expires", || {
        let mut client = client.clone();
        let id = id.clone();
        async move {
            let gone = client.get_job(GetJobRequest { id, owner: None }).await.err()?;
            (gone.code() == Code::NotFound).then_some(())
        }
    })
    .await;
    let again = client.submit_job(request("echo", r#"{"n":1}"#, "k-1", None)).await.unwrap().into_inner();
    assert!(again.created);
    assert_ne!(again.job.unwrap().id, id);
}

#[tokio::test]
async fn the_byte_budget_refuses_payloads_beyond_it() {
    let redis = RedisServer::start();
    let worker = spawn_with_redis(&redis, &["--max-queued-bytes", "4096", "--job-slots", "1"]).await;
    let mut client = worker.client.clone();
    // A sleep holds the only slot; two echoes of ~1.5 KiB wait and fit; a third is over
    // the 4 KiB budget.
    let pad = "x".repeat(1500);
    let job = |n: u32| request("echo", &format!(r#"{{"n":{n},"pad":"{pad}"}}"#), "", None);
    client.submit_job(request("sleep", r#"{"ms":10000}"#, "", None)).await.unwrap();
    client.submit_job(job(1)).await.unwrap();
    client.submit_job(job(2)).await.unwrap();
    let refused = client.submit_job(job(3)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("byte budget"), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_redis_maxmemory_submissions_are_refused_clearly_and_accepted_jobs_complete() {
    let redis = RedisServer::start();
    let admin = redis::Client::open(redis.url()).unwrap();
    let mut conn = admin.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("24mb").query_async(&mut conn).await.unwrap();
    let _: () =
        redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("noeviction").query_async(&mut conn).await.unwrap();
    let worker = spawn_with_redis(&redis, &["--job-slots", "4"]).await;
    let mut client = worker.client.clone();
    // 80 echo jobs of 512 KiB, each recording an equal result: far more
    // than 24 MiB.
    let pad = "x".repeat(512 * 1024);
    let (mut accepted, mut refused) = (Vec::new(), 0);
    for n in 0..80 {
        match client.submit_job(request("echo", &format!(r#"{{"n":{n},"pad":"{pad}"}}"#), "", None)).await {
            Ok(response) => accepted.push(response.into_inner().job.unwrap().id),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(status.message().contains("out of memory"), "{status:?}");
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "the excess was refused");
    assert!(!accepted.is_empty());
    for id in &accepted {
        wait_for_state(&worker, id, JobState::Succeeded).await;
    }
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");
    eprintln!("{} accepted and completed, {refused} refused at maxmemory", accepted.len());
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(name) && !l.starts_with('#'))?.rsplit(' ').next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_reports_the_oldest_jobs_age_and_whether_redis_is_up() {
    let mut redis = RedisServer::start();
    let worker = spawn_with_redis(&redis, &["--job-slots", "1"]).await;
    let mut client = worker.client.clone();
    client.submit_job(request("sleep", r#"{"ms":20000}"#, "", None)).await.unwrap();
    client.submit_job(request("echo", "{}", "", None)).await.unwrap();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    let url = worker.admin_url("/metrics");
    let scrape = || {
        let (http, url) = (http.clone(), url.clone());
        async move { http.get(url).send().await.ok()?.text().await.ok() }
    };
    let age = eventually(Duration::from_secs(20), "the oldest job is reported at least 1 s old", || async {
        let text = scrape().await?;
        (metric(&text, "worker_redis_up")? == 1.0).then_some(())?;
        metric(&text, "jobs_queue_oldest_age_seconds").filter(|age| *age >= 1.0)
    })
    .await;
    assert!(age < 60.0, "{age}");
    redis.kill();
    eventually(Duration::from_secs(10), "redis down is reported", || async {
        (metric(&scrape().await?, "worker_redis_up")? == 0.0).then_some(())
    })
    .await;
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_continues_the_trace_of_the_submission() {
    let exporter = InMemorySpanExporter::default();
    let config =
        TelemetryConfig { log_format: LogFormat::Text, log_filter: Some("off".into()), ..TelemetryConfig::default() };
    let telemetry =
        shoal_telemetry::init_with("shoal-test", &config, |b| b.with_simple_exporter(exporter.clone())).unwrap();
    let redis = RedisServer::start();
    let worker = spawn_with_redis(&redis, &["--retry-base", "20ms", "--retry-max", "50ms"]).await;

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut submit = tonic::Request::new(SubmitJobRequest {
        kind: "fail".into(),
        payload_json: r#"{"error":"try again"}"#.into(),
        max_attempts: 2,
        ..Default::default()
    });
    submit.metadata_mut().insert("traceparent", format!("00-{trace}-00f067aa0ba902b7-01").parse().unwrap());
    let job = worker.client.clone().submit_job(submit).await.unwrap().into_inner().job.unwrap();
    wait_for_state(&worker, &job.id, JobState::Dead).await;

    let spans = eventually(Duration::from_secs(10), "both attempts' spans are exported", || async {
        let spans = exporter.get_finished_spans().ok()?;
        (spans.iter().filter(|s| s.name == "job.run").count() == 2).then_some(spans)
    })
    .await;
    let trace_id = TraceId::from_hex(trace).unwrap();
    let submission = spans
        .iter()
        .find(|s| s.name.contains("SubmitJob") && s.span_context.trace_id() == trace_id)
        .expect("the SubmitJob server span");
    let mut attempts: Vec<&SpanData> = spans.iter().filter(|s| s.name == "job.run").collect();
    attempts.sort_by_key(|s| attribute(s, "job.attempt"));
    for (n, span) in attempts.iter().enumerate() {
        assert_eq!(span.span_context.trace_id(), trace_id, "attempt {n} is in the submitting trace");
        assert_eq!(span.parent_span_id, submission.span_context.span_id(), "a child of the SubmitJob span");
        assert_ne!(span.parent_span_id, SpanId::INVALID);
        assert_eq!(attribute(span, "job.attempt"), Some((n + 1).to_string()));
        assert_eq!(attribute(span, "worker.id"), Some(worker.worker_id.clone()));
        assert_eq!(attribute(span, "job.id"), Some(job.id.clone()));
    }
    drop(worker);
    telemetry.shutdown(Duration::from_secs(1));
}

#[tokio::test]
async fn a_batch_judges_each_item_on_its_own_and_keeps_their_order() {
    use shoal_proto::worker::v1::submit_jobs_result::Outcome;
    use shoal_proto::worker::v1::{SubmitJobsRequest, SubmitJobsResult};

    let redis = RedisServer::start();
    let worker = spawn_with_redis(&redis, &[]).await;
    let mut client = worker.client.clone();
    client.submit_job(request("echo", r#"{"n":0}"#, "seen", Some("carol"))).await.unwrap();
    let jobs = vec![
        request("echo", r#"{"n":1}"#, "", None),
        request("nope", "{}", "", None),
        request("echo", r#"{"n":0}"#, "seen", None),
        request("echo", r#"{"n":9}"#, "seen", None),
        request("echo", r#"{"n":2}"#, "fresh", Some("ignored: the batch's owner applies")),
    ];
    let results: Vec<SubmitJobsResult> =
        client.submit_jobs(SubmitJobsRequest { jobs, owner: Some("carol".into()) }).await.unwrap().into_inner().results;
    assert_eq!(results.len(), 5);
    let submitted = |r: &SubmitJobsResult| match &r.outcome {
        Some(Outcome::Submitted(s)) => Some((s.created, s.job.clone().unwrap())),
        _ => None,
    };
    let refused = |r: &SubmitJobsResult| match &r.outcome {
        Some(Outcome::Error(e)) => Some((Code::from_i32(e.code), e.message.clone())),
        _ => None,
    };
    let (created, first) = submitted(&results[0]).expect("accepted");
    assert!(created);
    let (code, message) = refused(&results[1]).expect("refused");
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("unknown job kind `nope`"), "{message}");
    assert!(!submitted(&results[2]).expect("replayed").0, "the key named carol's earlier job");
    assert_eq!(refused(&results[3]).expect("refused").0, Code::AlreadyExists, "same key, other payload");
    let (created, last) = submitted(&results[4]).expect("accepted");
    assert!(created);
    for job in [&first, &last] {
        let own = GetJobRequest { id: job.id.clone(), owner: Some("carol".into()) };
        client.get_job(own).await.expect("the batch's owner owns every job");
        wait_for_state(&worker, &job.id, JobState::Succeeded).await;
    }

    for size in [0, shoal_worker::jobs::MAX_BATCH_JOBS + 1] {
        let jobs = vec![request("echo", "{}", "", None); size];
        let status = client.submit_jobs(SubmitJobsRequest { jobs, owner: None }).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{size}: {status:?}");
    }
}
