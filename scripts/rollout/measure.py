"""One measured rollout: steady load first (the baseline p99), then the same
load while a disturbance (the rollout) runs, stopped a few seconds after it
ends; job submissions throughout, every job polled to its end afterwards.

Failed requests are everything sent that was not a success: task errors by
class (status, reset, refused), timeouts, job submissions not accepted with
202, and accepted jobs that did not succeed. Task requests of the schedule
that were never sent (the machine fell behind) are reported apart.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Callable

from common import log
from load import JobLoad, TaskLoad, task_answered, task_failures

SETTLE_S = 3.0


def measured(component: str, host: str, port: int, args, shoal_load: str, disturb: Callable[[], dict]) -> dict:
    url = f"http://{host}:{port}"
    # Enough slots for the steady phase and a long rollout; stopped early.
    jobs = JobLoad(host, port, rate=args.job_rate, max_jobs=int(args.job_rate * 900), headers=args.header)
    log(component, f"steady load {args.steady:.0f}s: {args.rate:.0f} tasks/s over {args.connections} connections, "
                   f"{args.job_rate:.0f} job submissions/s")
    steady = TaskLoad(shoal_load, url, rate=args.rate, connections=args.connections, max_seconds=args.steady,
                      label=f"{component} steady", headers=args.header).wait()
    rollout_load = TaskLoad(shoal_load, url, rate=args.rate, connections=args.connections, max_seconds=900,
                            label=f"{component} rollout", headers=args.header)
    start = time.monotonic()
    try:
        events = disturb()
    finally:
        duration = time.monotonic() - start
        time.sleep(SETTLE_S)
        rollout = rollout_load.stop()
    job_report = jobs.finish()
    tasks_failed = task_failures(steady) + task_failures(rollout)
    tasks_total = task_answered(steady) + task_answered(rollout)
    # Scheduled but never sent: the load generator (or the machine) fell
    # behind its schedule. Not a failed request, but reported: a large
    # number means the run measured an overloaded machine.
    not_sent = int(steady["unfinished"]) + int(rollout["unfinished"])
    failed = tasks_failed + job_report.failed
    total = tasks_total + job_report.submitted
    failures = []
    if tasks_failed:
        failures.append(f"{tasks_failed} of {tasks_total} task requests failed: steady {steady['error_kinds']} "
                        f"timeouts {steady['timeouts']}; rollout {rollout['error_kinds']} timeouts {rollout['timeouts']}")
    if job_report.rejected:
        failures.append(f"job submissions not accepted: {job_report.rejected}")
    if job_report.not_succeeded:
        failures.append(f"accepted jobs that did not succeed: {job_report.not_succeeded}")
    if job_report.submitted < args.min_jobs:
        failures.append(f"only {job_report.submitted} job submissions (at least {args.min_jobs} wanted)")
    failures += events.pop("failures", [])
    summary = (f"failed {failed}/{total} (tasks {tasks_failed}/{tasks_total}, jobs {job_report.failed}/"
               f"{job_report.submitted}, {job_report.ran_more_than_once} jobs ran more than once); "
               f"p99 steady {steady['latency']['p99_ms']:.2f} ms, during the rollout {rollout['latency']['p99_ms']:.2f} ms; "
               f"rollout took {duration:.1f}s"
               + (f"; {not_sent} scheduled task requests never sent (the machine fell behind the schedule)" if not_sent else ""))
    log(component, summary)
    return {
        "summary": summary,
        "failed": failed,
        "total": total,
        "tasks_not_sent": not_sent,
        "rollout_seconds": round(duration, 1),
        "p99_ms_steady": steady["latency"]["p99_ms"],
        "p99_ms_rollout": rollout["latency"]["p99_ms"],
        "tasks": {"steady": steady, "rollout": rollout},
        "jobs": asdict(job_report),
        "events": events,
        "failures": failures,
    }
