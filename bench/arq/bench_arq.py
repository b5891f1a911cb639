"""Submits N no-op arq jobs with bounded concurrency while an arq worker runs,
then waits until every job has a result; prints one JSON line like
crates/worker/examples/jobs_load.rs does for Shoal. End-to-end latency: the
client's send time to the job's `finish_time` as arq records it."""
import asyncio
import json
import os
import sys
import time

from arq import create_pool
from arq.connections import RedisSettings


async def main(jobs: int, concurrency: int) -> None:
    port = int(os.environ["BENCH_REDIS_PORT"])
    redis = await create_pool(RedisSettings(host="127.0.0.1", port=port))
    limit = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    sent_jobs = []
    errors = 0

    async def submit() -> None:
        nonlocal errors
        async with limit:
            sent = time.perf_counter()
            sent_at = time.time()
            job = await redis.enqueue_job("noop")
            if job is None:
                errors += 1
            else:
                latencies.append(time.perf_counter() - sent)
                sent_jobs.append((job, sent_at))

    started = time.perf_counter()
    await asyncio.gather(*(submit() for _ in range(jobs)))
    submitted_in = time.perf_counter() - started
    deadline = time.perf_counter() + 300
    while True:
        done = 0
        async for _ in redis.scan_iter(match="arq:result:*", count=10000):
            done += 1
        if done >= jobs - errors:
            break
        if time.perf_counter() > deadline:
            raise SystemExit(f"only {done} arq jobs finished after 300 s")
        await asyncio.sleep(0.01)
    total = time.perf_counter() - started
    latencies.sort()
    e2e: list[float] = []
    for i in range(0, len(sent_jobs), 500):
        chunk = sent_jobs[i:i + 500]
        infos = await asyncio.gather(*(job.result_info() for job, _ in chunk))
        for (_, sent_at), info in zip(chunk, infos):
            if info is None or not info.success:
                errors += 1
            else:
                e2e.append(info.finish_time.timestamp() - sent_at)
    e2e.sort()

    def quantile(q: float, values: list[float] = latencies) -> float:
        if not values:
            return 0.0
        return values[min(int(len(values) * q), len(values) - 1)] * 1000

    print(json.dumps({
        "system": os.environ.get("BENCH_ARQ_LABEL", "arq"),
        "jobs": jobs - errors,
        "errors": errors,
        "concurrency": concurrency,
        "submit_seconds": submitted_in,
        "seconds": total,
        "jobs_per_second": (jobs - errors) / total,
        "submit_p50_ms": quantile(0.50),
        "submit_p99_ms": quantile(0.99),
        "e2e_p50_ms": quantile(0.50, e2e),
        "e2e_p99_ms": quantile(0.99, e2e),
    }))
    await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
