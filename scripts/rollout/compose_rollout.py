"""The compose rollout: ``compose.yaml`` under its own project name (core
services only, two workers, the harness's images), steady load through the
gateway's loopback port, then each worker replica ``docker stop``ped
(SIGTERM, its ``stop_grace_period``) and started again in turn, the other
one serving; then ``--scale worker=3`` and back to 2.

Harsher than Kubernetes: a stopped container keeps its DNS name until it
has exited, so only the gateway's health watch and retries keep requests
from reaching a draining worker.
"""

from __future__ import annotations

import copy
import os
import subprocess
import time

from common import HarnessError, docker, inspect, log
from measure import measured

CORE = ["redis", "metrics-aggregator", "worker", "gateway"]


def run_compose(step_id: str, args, root: str, workdir: str, image_map: dict[str, str], shoal_load: str,
                cleanup) -> dict:
    project = f"shoal-harness-{step_id}"
    override = os.path.join(workdir, "compose.harness.yaml")
    with open(override, "w") as f:
        f.write("services:\n")
        for service in ("gateway", "worker", "metrics-aggregator"):
            f.write(f"  {service}:\n    image: {image_map['shoal-' + service]}\n")
            if service == "gateway":
                # The harness is one client (one API key) sending the whole
                # load: its per-client limits (100 req/s by default) are raised
                # above that load, so a 429 here would be a real refusal.
                rate = int(max(1000, 4 * (args.rate + args.job_rate)))
                f.write("    environment:\n"
                        f"      SHOAL_GATEWAY_CLIENT_RATE: \"{rate}\"\n"
                        f"      SHOAL_GATEWAY_CLIENT_BURST: \"{2 * rate}\"\n"
                        "      SHOAL_GATEWAY_CLIENT_MAX_IN_FLIGHT: \"4096\"\n")
    env = {**os.environ, "SHOAL_HTTP_PORT": "", "SHOAL_PROMETHEUS_PORT": "", "SHOAL_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    base = ["docker-compose", "--compatibility", "-p", project, "-f", os.path.join(root, "compose.yaml"), "-f", override]

    def compose(*a: str, timeout: float = 180) -> str:
        done = subprocess.run([*base, *a], capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode != 0:
            raise HarnessError(f"docker-compose {' '.join(a)}: {done.stderr.strip()[-2000:]}")
        return done.stdout

    def down() -> None:
        subprocess.run([*base, "down", "-v", "--remove-orphans", "-t", "5"], capture_output=True, timeout=180, env=env)
        label = f"label=com.docker.compose.project={project}"
        for kind, rm in (("ps -aq", "rm -f -v"), ("network ls -q", "network rm"), ("volume ls -q", "volume rm")):
            ids = docker(*kind.split(), "--filter", label, check=False).split()
            if ids:
                docker(*rm.split(), *ids, check=False, timeout=120)

    cleanup.push(f"compose down {project}", down)
    log("compose", f"up {project}: {', '.join(CORE)} (2 workers)")
    compose("up", "-d", "--no-build", "--scale", "worker=2", *CORE, timeout=300)

    def containers(service: str) -> list[str]:
        return docker("ps", "-q", "--filter", f"label=com.docker.compose.project={project}",
                      "--filter", f"label=com.docker.compose.service={service}").split()

    def healthy(ids: list[str]) -> bool:
        return all(inspect(i).get("State", {}).get("Health", {}).get("Status") == "healthy" for i in ids)

    def wait_healthy(service: str, count: int, timeout: float = 90) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            ids = containers(service)
            if len(ids) == count and healthy(ids):
                return time.monotonic() - start
            time.sleep(0.25)
        raise HarnessError(f"{service}: {count} healthy containers not within {timeout:.0f}s")

    for service in CORE:
        wait_healthy(service, 2 if service == "worker" else 1, timeout=120)
    host_port = compose("port", "gateway", "8080").strip().splitlines()[-1]
    host, port = host_port.rsplit(":", 1)
    log("compose", f"all healthy; gateway at {host}:{port}")
    # compose requires an API key; read the one its `secrets` service generated, as the README does.
    key = compose("run", "--rm", "-T", "--no-deps", "secrets", "cat /secrets/client/api_key", timeout=60).strip()
    if len(key) != 48:
        raise HarnessError(f"the generated API key is {len(key)} characters, expected 48")
    args = copy.copy(args)
    args.header = [*args.header, f"Authorization: Bearer {key}"]

    def rollout() -> dict:
        events: dict = {"restarts": [], "failures": []}
        for cid in containers("worker"):
            name = inspect(cid)["Name"].lstrip("/")
            start = time.monotonic()
            docker("stop", cid, timeout=120)
            stopped = time.monotonic() - start
            code = inspect(cid)["State"]["ExitCode"]
            docker("start", cid)
            ready = wait_healthy("worker", 2)
            events["restarts"].append({"container": name, "stop_seconds": round(stopped, 1), "exit_code": code,
                                       "healthy_after_start_seconds": round(ready, 1)})
            log("compose", f"{name}: stopped in {stopped:.1f}s (exit {code}), healthy again {ready:.1f}s after start")
            if code != 0:
                events["failures"].append(f"{name} exited {code} on docker stop")
        start = time.monotonic()
        compose("up", "-d", "--no-build", "--no-deps", "--no-recreate", "--scale", "worker=3", "worker")
        up = wait_healthy("worker", 3)
        log("compose", f"--scale worker=3: the third healthy after {up:.1f}s")
        start = time.monotonic()
        compose("up", "-d", "--no-build", "--no-deps", "--no-recreate", "--scale", "worker=2", "worker")
        events["scale"] = {"up_seconds": round(up, 1), "down_seconds": round(time.monotonic() - start, 1)}
        log("compose", f"--scale worker=2: back to two in {time.monotonic() - start:.1f}s")
        return events

    return measured("compose", host, int(port), args, shoal_load, rollout)


