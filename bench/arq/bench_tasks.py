"""The arq side of scripts/bench-jobs: a no-op job and the worker settings.

The worker runs with arq's defaults except `max_jobs` (and `poll_delay`, see below), set to the same number
of concurrent jobs as the Shoal worker (BENCH_JOB_SLOTS), on the same Redis.
"""
import os

from arq.connections import RedisSettings


async def noop(ctx):
    return None


class WorkerSettings:
    functions = [noop]
    redis_settings = RedisSettings(host="127.0.0.1", port=int(os.environ["BENCH_REDIS_PORT"]))
    max_jobs = int(os.environ.get("BENCH_JOB_SLOTS", "16"))
    # arq sleeps poll_delay (0.5 s by default) between polls of the queue;
    # BENCH_ARQ_POLL_DELAY lets the benchmark give arq its best setting.
    poll_delay = float(os.environ.get("BENCH_ARQ_POLL_DELAY", "0.5"))
