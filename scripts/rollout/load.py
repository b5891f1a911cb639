"""The load during a rollout: tasks through `shoal-load` (open loop, corrected
for coordinated omission, failures by class) and durable job submissions
from a small Python driver that keeps every job id and afterwards polls each
job to its end.

Both take extra request headers (``Authorization: Bearer <key>`` once the
gateway wants API keys). Every loop here is bounded in count and in time.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

from common import HarnessError, log

TERMINAL = {"succeeded", "failed", "dead", "cancelled"}


class TaskLoad:
    """`shoal-load run` against ``POST /v1/tasks/echo`` in the background,
    for at most ``max_seconds``; :meth:`stop` ends its schedule early
    (SIGINT) and returns its JSON report."""

    def __init__(
        self,
        shoal_load: str,
        base_url: str,
        *,
        rate: float,
        connections: int,
        max_seconds: float,
        label: str,
        headers: list[str],
        timeout: str = "10s",
    ) -> None:
        args = [
            shoal_load, "run", "--label", label,
            "--url", f"{base_url}/v1/tasks/echo", "--method", "POST", "--body", '{"rollout": true}',
            "--mode", "open", "--rate", str(rate), "--connections", str(connections),
            "--warmup", "0s", "--duration", f"{max_seconds:.0f}s", "--timeout", timeout, "--max-drain", "10s",
        ]
        for header in headers:
            args += ["--header", header]
        self._max_seconds = max_seconds
        self._proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop(self) -> dict:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
        try:
            # In-flight requests end within their timeout, the backlog
            # within --max-drain after the stop.
            out, err = self._proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, err = self._proc.communicate(timeout=10)
        if self._proc.returncode != 0:
            raise HarnessError(f"shoal-load exited {self._proc.returncode}: {err.strip()[-1000:]}")
        log("load", err.strip().splitlines()[-1] if err.strip() else "shoal-load: no summary")
        return json.loads(out)

    def wait(self) -> dict:
        try:
            self._proc.wait(timeout=self._max_seconds + 60)
        except subprocess.TimeoutExpired:
            pass
        return self.stop()


@dataclass
class Submission:
    status: int  # 0: no HTTP answer
    job_id: str = ""
    error: str = ""


@dataclass
class JobReport:
    submitted: int = 0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    succeeded: int = 0
    not_succeeded: dict[str, int] = field(default_factory=dict)
    ran_more_than_once: int = 0
    attempts_max: int = 0

    @property
    def failed(self) -> int:
        return sum(self.rejected.values()) + sum(self.not_succeeded.values())


class _Client:
    """One keep-alive HTTP/1.1 connection to the gateway, reopened after an
    error or a `Connection: close`."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self._host, self._port, self._headers = host, port, headers
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self._host, self._port, timeout=15)
        headers = dict(self._headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        try:
            self._conn.request(method, path, body=data, headers=headers)
            response = self._conn.getresponse()
            raw = response.read()
            if response.will_close:
                self.close()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        try:
            return response.status, json.loads(raw) if raw else {}
        except ValueError:
            return response.status, {"raw": raw[:200].decode(errors="replace")}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def parse_headers(headers: list[str]) -> dict[str, str]:
    parsed = {}
    for header in headers:
        name, sep, value = header.partition(":")
        if not sep:
            raise HarnessError(f"header {header!r}: expected `name: value`")
        parsed[name.strip()] = value.strip()
    return parsed


class JobLoad:
    """Submits ``POST /v1/jobs`` at ``rate`` per second from ``threads``
    connections until :meth:`stop` or ``max_jobs``; then :meth:`finish`
    polls every accepted job until it ends (bounded)."""

    def __init__(
        self, host: str, port: int, *, rate: float, max_jobs: int, headers: list[str], sleep_ms: int = 100,
        threads: int = 4,
    ) -> None:
        self._host, self._port, self._headers = host, port, parse_headers(headers)
        self._rate, self._max_jobs, self._sleep_ms = rate, max_jobs, sleep_ms
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.submissions: list[Submission] = []
        self._start = time.monotonic() + 0.05
        self._threads = [threading.Thread(target=self._submit_loop, daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _slot(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or self._next >= self._max_jobs:
                return None
            self._next += 1
            return self._next - 1

    def _submit_loop(self) -> None:
        client = _Client(self._host, self._port, self._headers)
        while (slot := self._slot()) is not None:
            delay = self._start + slot / self._rate - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            body = {"kind": "sleep", "payload": {"ms": self._sleep_ms}, "max_attempts": 5}
            try:
                status, answer = client.request("POST", "/v1/jobs", body)
                result = Submission(status, str(answer.get("id", "")), "" if status == 202 else str(answer)[:200])
            except (OSError, http.client.HTTPException) as e:
                result = Submission(0, error=f"{type(e).__name__}")
            with self._lock:
                self.submissions.append(result)
        client.close()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def finish(self, deadline_s: float = 120) -> JobReport:
        """Stops submitting, then polls every accepted job until it ends."""
        self.stop()
        report = JobReport(submitted=len(self.submissions))
        pending: list[str] = []
        for sub in self.submissions:
            if sub.status == 202 and sub.job_id:
                report.accepted += 1
                pending.append(sub.job_id)
            else:
                kind = f"status {sub.status}" if sub.status else f"no answer ({sub.error})"
                report.rejected[kind] = report.rejected.get(kind, 0) + 1
        client = _Client(self._host, self._port, self._headers)
        deadline = time.monotonic() + deadline_s
        rounds = 0
        while pending and time.monotonic() < deadline:
            rounds += 1
            still = []
            for job_id in pending:
                try:
                    status, job = client.request("GET", f"/v1/jobs/{job_id}")
                except (OSError, http.client.HTTPException):
                    still.append(job_id)
                    continue
                state = job.get("state") if status == 200 else None
                if state not in TERMINAL:
                    still.append(job_id)
                    continue
                attempts = int(job.get("attempts", 0) or 0)
                report.attempts_max = max(report.attempts_max, attempts)
                if attempts > 1:
                    report.ran_more_than_once += 1
                if state == "succeeded":
                    report.succeeded += 1
                else:
                    report.not_succeeded[state] = report.not_succeeded.get(state, 0) + 1
            pending = still
            if pending:
                time.sleep(0.5)
        if pending:
            report.not_succeeded["unfinished after the polling deadline"] = len(pending)
        client.close()
        log("jobs", f"{report.submitted} submitted, {report.accepted} accepted, {report.succeeded} succeeded, "
                    f"{report.ran_more_than_once} ran more than once, rejected {report.rejected}, "
                    f"not succeeded {report.not_succeeded} ({rounds} polling rounds)")
        return report


def shoal_load_binary(root: str, release: bool) -> str:
    path = os.path.join(root, "target", "release" if release else "debug", "shoal-load")
    if not os.access(path, os.X_OK):
        raise HarnessError(f"{path} missing: cargo build {'--release ' if release else ''}-p shoal-bench --bin shoal-load")
    return path


def task_failures(report: dict) -> int:
    """Requests sent that did not succeed: errors of every class and
    timeouts."""
    return int(report["errors"]) + int(report["timeouts"])


def task_answered(report: dict) -> int:
    """Requests sent and answered (or timed out); the rest of the schedule
    (``unfinished``) was never sent because the machine fell behind it."""
    return int(report["ok"]) + task_failures(report)
