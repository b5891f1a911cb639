"""The Kubernetes-semantics rollout: the rendered overlay's pods run by the
Docker kubelet (:mod:`kubelet`), the headless worker Service served by the
test's dnsmasq with the cluster's TTL, and the worker Deployment rolled
from one image to another under load the way the Deployment controller
does it:

- a new pod is created while ``old + new < replicas + maxSurge``;
- an old pod is terminated only while ``available - 1 >= replicas -
  maxUnavailable`` (terminating pods do not count; a new pod is available
  once it has been ready for the Deployment's ``minReadySeconds``);
- a terminating pod leaves the Service's addresses when its termination
  starts (as its EndpointSlice entry does), reaching DNS ``endpoint_lag``
  seconds later; then ``preStop``, SIGTERM, the grace period.

The gateway resolves ``worker`` through the test's DNS (container
``--dns``, the cluster's search path and ``ndots:5``); after the rollout a
few tasks must be answered by the new pods only, which proves it did.
"""

from __future__ import annotations

import copy
import math
import threading
import time

from common import HarnessError, log
from images import relabelled
from kubelet import Cluster, Manifests, Pod, Termination, k8s_secrets, startup_budget, workload_pod
from measure import measured
from pods import ORDER, gateway_call, start_and_wait, PodsReport


def rolling_numbers(deployment: dict, replicas: int) -> tuple[int, int]:
    """maxSurge (rounded up) and maxUnavailable (rounded down), as the
    Deployment controller resolves percentages."""
    strategy = deployment["spec"].get("strategy") or {}
    if strategy.get("type", "RollingUpdate") != "RollingUpdate":
        raise HarnessError(f"strategy {strategy.get('type')}: only RollingUpdate is modelled")
    rolling = strategy.get("rollingUpdate") or {}

    def resolve(value, default: str, up: bool) -> int:
        value = default if value is None else value
        if isinstance(value, str) and value.endswith("%"):
            exact = replicas * int(value[:-1]) / 100
            return math.ceil(exact) if up else math.floor(exact)
        return int(value)

    surge = resolve(rolling.get("maxSurge"), "25%", True)
    unavailable = resolve(rolling.get("maxUnavailable"), "25%", False)
    if surge == 0 and unavailable == 0:
        raise HarnessError("maxSurge and maxUnavailable are both 0: the Deployment could never roll")
    return surge, unavailable


def roll(cluster: Cluster, deployment: dict, old: list[Pod], new_template: dict, replicas: int,
         timeout: float) -> dict:
    surge, unavailable = rolling_numbers(deployment, replicas)
    log("k8s", f"rolling {deployment['metadata']['name']}: {replicas} replicas, maxSurge {surge}, "
               f"maxUnavailable {unavailable}")
    old, new = list(old), []
    terminations: list[Termination] = []
    threads: list[threading.Thread] = []
    steps: list[str] = []
    deadline = time.monotonic() + timeout
    ordinal = 0
    min_ready = float(deployment["spec"].get("minReadySeconds", 0))
    while old or len(new) < replicas or not all(available(p, min_ready) for p in new):
        if time.monotonic() > deadline:
            raise HarnessError(f"rollout not done within {timeout:.0f}s: {len(old)} old, "
                               f"{sum(p.ready for p in new)}/{len(new)} new ready")
        for pod in new:
            if pod.failure:
                raise HarnessError(f"new pod {pod.name}: {pod.failure}\n{pod.logs()}")
            if not pod.ready and time.monotonic() - pod.created_at > startup_budget(pod):
                raise HarnessError(f"new pod {pod.name} not ready within its startup budget of {startup_budget(pod):.0f}s")
        # Available, as the controller counts for maxUnavailable: ready for
        # the Deployment's minReadySeconds (old pods were available before).
        ready = sum(p.ready for p in old) + sum(available(p, min_ready) for p in new)
        if len(new) < replicas and len(old) + len(new) < replicas + surge:
            pod = workload_pod(cluster, deployment, ordinal, template=new_template)
            ordinal += 1
            pod.start()
            new.append(pod)
            steps.append(f"+{pod.name}")
            continue
        if old and ready - (1 if old[0].ready else 0) >= replicas - unavailable:
            victim = old.pop(0)
            steps.append(f"-{victim.name}")
            thread = threading.Thread(target=lambda v=victim: terminations.append(v.terminate()), daemon=True)
            thread.start()
            threads.append(thread)
            continue
        time.sleep(0.1)
    for thread in threads:
        thread.join(timeout=120)
    return {"steps": steps, "terminations": terminations, "new": new}


def available(pod: Pod, min_ready: float) -> bool:
    """Ready, and for at least ``min_ready`` seconds."""
    return pod.ready and pod.ready_at is not None and time.monotonic() - pod.ready_at >= min_ready


def run_k8s(step_id: str, args, root: str, workdir: str, image_map: dict[str, str], shoal_load: str,
            cleanup) -> dict:
    manifests = Manifests.render(args.overlay)
    namespace = manifests.namespace()
    lag = float(args.dns_ttl if args.endpoint_lag is None else args.endpoint_lag)
    # Start-up without the lag (the pods are waited for anyway); the rollout with it.
    cluster = Cluster.create(step_id, workdir, manifests, image_map, namespace, args.dns_ttl, 0.0)
    cleanup.push("stop the cluster DNS", cluster.dns.stop)
    manifests.add(k8s_secrets(root, namespace, workdir))
    deployment = manifests.get("Deployment", "worker")
    workloads = {f"{o['kind']}/{o['metadata']['name']}": o
                 for o in manifests.of_kind("Deployment") + manifests.of_kind("StatefulSet")}
    report = PodsReport()
    pods: dict[str, list[Pod]] = {}
    for key in ORDER:
        if key not in workloads:
            continue
        workload = workloads[key]
        count = args.replicas if key == "Deployment/worker" else int(workload["spec"].get("replicas", 1))
        pods[key] = []
        for ordinal in range(count):
            pod = workload_pod(cluster, workload, ordinal)
            pods[key].append(pod)
            start_and_wait(cluster, pod, report)
    gateway = pods["Deployment/gateway"][0]
    port = gateway.ports.get("http", 8080)
    worker_name = cluster.service_name("worker")
    log("k8s", f"all pods ready; {worker_name} -> {cluster.dns.records(worker_name)} (TTL {args.dns_ttl}s, "
               f"endpoint changes reach DNS after {lag:.0f}s); gateway at {gateway.ip}:{port}")

    old_image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    new_image = relabelled(cluster.map_image(old_image), "v2")
    new_template = copy.deepcopy(deployment["spec"]["template"])
    new_template["spec"]["containers"][0]["image"] = new_image
    rolled: dict = {}
    cluster.endpoint_lag = lag

    def rollout() -> dict:
        rolled.update(roll(cluster, deployment, pods["Deployment/worker"], new_template, args.replicas, timeout=300))
        failures = [f"{t.pod} exited {t.exit_code} after {t.seconds:.1f}s (grace {t.grace:.0f}s)"
                    for t in rolled["terminations"] if not t.ok]
        return {"steps": rolled["steps"], "failures": failures,
                "terminations": [vars(t) for t in rolled["terminations"]]}

    result = measured("k8s", gateway.ip, port, args, shoal_load, rollout)
    # The gateway follows DNS: now only the new pods answer.
    new_names = {p.name for p in rolled.get("new", [])}
    answered: dict[str, int] = {}
    for _ in range(20):
        status, answer = gateway_call(gateway.ip, port, "POST", "/v1/tasks/echo", {"after": True}, {})
        if status == 200:
            answered[answer.get("worker_id", "?")] = answered.get(answer.get("worker_id", "?"), 0) + 1
    result["events"]["answered_after_rollout"] = answered
    if not answered or not set(answered) <= new_names:
        result["failures"].append(f"after the rollout, tasks answered by {answered}, not only the new pods {sorted(new_names)}")
    log("k8s", f"after the rollout tasks were answered by {answered}")
    # Terminate the rest as the kubelet would: every exit 0 within its grace.
    rest = [p for group in pods.values() for p in group if p.ip and not p.terminating] + list(rolled.get("new", []))
    done: list[Termination] = []
    threads = [threading.Thread(target=lambda p=p: done.append(p.terminate()), daemon=True) for p in rest]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    result["failures"] += [f"{t.pod} exited {t.exit_code} after {t.seconds:.1f}s (grace {t.grace:.0f}s)"
                           for t in done if not t.ok]
    return result
