"""The pods for real: every pod template of a rendered overlay (default
``deploy/k8s/overlays/dev``) started by the Docker kubelet
(:mod:`kubelet`) on a network this test creates, with the Secrets that
``scripts/k8s-secrets`` makes and a cluster DNS for the Services.

Passes when every pod becomes ready within its startup budget, stays live
and ready for ``--live`` seconds (no probe failure, no exit), a task and a
job go through the gateway, and every pod exits 0 within its
``terminationGracePeriodSeconds`` after ``preStop`` and SIGTERM. This is
what fails when a read-only root file system, a wrong port, a missing
variable or a mode the image's user cannot read would break a real cluster.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field

from common import HarnessError, log
from kubelet import Cluster, Manifests, Pod, Termination, k8s_secrets, startup_budget, workload_pod

# Started in this order, each ready before the next (what the services need
# first: Redis, then the aggregator every service pushes to, then the
# workers the gateway calls).
ORDER = ["StatefulSet/redis", "Deployment/metrics-aggregator", "Deployment/worker", "Deployment/gateway"]


@dataclass
class PodsReport:
    ready_after: dict[str, float] = field(default_factory=dict)
    budgets: dict[str, float] = field(default_factory=dict)
    terminations: list[Termination] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def start_and_wait(cluster: Cluster, pod: Pod, report: PodsReport) -> None:
    budget = startup_budget(pod)
    report.budgets[pod.name] = budget
    pod.start()
    deadline = time.monotonic() + budget
    while not pod.ready and not pod.failure and time.monotonic() < deadline:
        time.sleep(0.1)
    if not pod.ready:
        why = pod.failure or f"not ready within its startup budget of {budget:.0f}s " + ", ".join(
            f"{k}: {p.last_error or 'no answer yet'}" for k, p in pod.probes.items())
        raise HarnessError(f"pod {pod.name}: {why}\n{pod.logs()}")
    assert pod.ready_after is not None
    report.ready_after[pod.name] = pod.ready_after


def gateway_call(ip: str, port: int, method: str, path: str, body: dict | None, headers: dict[str, str]) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(ip, port, timeout=15)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={**headers, "content-type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else {}
    finally:
        conn.close()


def through_the_gateway(gateway: Pod, headers: dict[str, str]) -> str:
    port = gateway.ports.get("http", 8080)
    status, answer = gateway_call(gateway.ip, port, "POST", "/v1/tasks/echo", {"pods": True}, headers)
    if status != 200:
        raise HarnessError(f"POST /v1/tasks/echo through the gateway pod: {status} {answer}")
    worker = answer.get("worker_id", "?")
    status, job = gateway_call(gateway.ip, port, "POST", "/v1/jobs", {"kind": "sleep", "payload": {"ms": 10}}, headers)
    if status != 202:
        raise HarnessError(f"POST /v1/jobs through the gateway pod: {status} {job}")
    deadline = time.monotonic() + 30
    state = "?"
    while time.monotonic() < deadline:
        status, got = gateway_call(gateway.ip, port, "GET", f"/v1/jobs/{job['id']}", None, headers)
        state = got.get("state", f"status {status}")
        if state == "succeeded":
            return f"task answered by {worker}; job {job['id']} succeeded"
        if state in ("failed", "dead", "cancelled"):
            break
        time.sleep(0.2)
    raise HarnessError(f"job {job['id']} through the gateway pod: {state}")


def run_pods(root: str, cluster_factory, overlay: str, live_seconds: float, headers: dict[str, str]) -> PodsReport:
    manifests = Manifests.render(overlay)
    cluster: Cluster = cluster_factory(manifests)
    manifests.add(k8s_secrets(root, cluster.namespace, cluster.workdir))
    report = PodsReport()
    pods: list[Pod] = []
    workloads = {f"{o['kind']}/{o['metadata']['name']}": o for o in manifests.of_kind("Deployment") + manifests.of_kind("StatefulSet")}
    unknown = sorted(set(workloads) - set(ORDER))
    if unknown:
        raise HarnessError(f"workloads this test does not know how to order: {unknown}")
    try:
        for key in ORDER:
            if key not in workloads:
                continue
            workload = workloads[key]
            for ordinal in range(int(workload["spec"].get("replicas", 1))):
                pod = workload_pod(cluster, workload, ordinal)
                pods.append(pod)
                start_and_wait(cluster, pod, report)
        log("pods", "all ready: " + ", ".join(f"{n} {s:.1f}s (budget {report.budgets[n]:.0f}s)"
                                              for n, s in report.ready_after.items()))
        gateway = next(p for p in pods if p.labels.get("app.kubernetes.io/name") == "gateway")
        log("pods", through_the_gateway(gateway, headers))
        log("pods", f"live for {live_seconds:.0f}s: every probe on its schedule")
        end = time.monotonic() + live_seconds
        while time.monotonic() < end:
            for pod in pods:
                if pod.failure:
                    raise HarnessError(f"pod {pod.name}: {pod.failure}\n{pod.logs()}")
                if not pod.ready:
                    raise HarnessError(f"pod {pod.name} became not ready while live: "
                                       + ", ".join(f"{k}: {p.last_error}" for k, p in pod.probes.items()))
            time.sleep(0.5)
        log("pods", through_the_gateway(gateway, headers))
    finally:
        # Every pod terminated at once (as a namespace deletion does), each
        # with its own preStop and grace.
        results: list[Termination] = []
        threads = [threading.Thread(target=lambda p=p: results.append(p.terminate()), daemon=True)
                   for p in pods if p.ip]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        report.terminations = results
    bad = [t for t in report.terminations if not t.ok]
    if bad:
        for t in bad:
            pod = next(p for p in pods if p.name == t.pod)
            log("pods", f"{t.pod}: exit {t.exit_code} after {t.seconds:.1f}s of {t.grace:.0f}s grace\n{pod.logs()}")
        raise HarnessError("pods that did not exit 0 within their grace: " + ", ".join(t.pod for t in bad))
    log("pods", "all exited 0 within their grace: " + ", ".join(f"{t.pod} {t.seconds:.1f}s/{t.grace:.0f}s"
                                                            for t in report.terminations))
    return report
