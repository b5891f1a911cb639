"""Contract tests tying the rendered manifests to the binaries
(target/debug/shoal-*): for each distinct configuration of the three
services in the renders,

- every environment variable a container sets is one its binary accepts
  (its `--help`; `X_FILE` counts for a setting `X`), save the settings of
  deploy/k8s/tests/pending-settings.yaml while the binary lacks them;
- the binary, started with the container's env and args (ConfigMap and
  Secret values and mounts mapped to files, listen ports remapped onto
  loopback) against a redis-server running the redis component's
  redis.conf and the ACL file scripts/k8s-secrets writes, serves every
  container port, answers every probe (HTTP path and port, TCP, gRPC health
  for the probe's service name, and not for another name), becomes ready
  (the worker's and aggregator's /readyz include their Redis user working);
- a job submitted through the gateway (with an API key from the keys file)
  succeeds on the worker, and KEDA's Redis user then sees the ScaledObject's
  consumer group on the ScaledObject's stream;
- on SIGTERM every process exits 0 within its grace period less the preStop
  sleep.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
PENDING = ROOT / "deploy/k8s/tests/pending-settings.yaml"
SERVICES = ("metrics-aggregator", "worker", "gateway")  # start order
PORT_RANGE = range(25100, 25999)  # the k8s helper's loopback range
READY_BUDGET_SECONDS = 30


# Address variable -> the variable naming the TLS server name to verify.
TLS_SERVER_NAMES = {
    "SHOAL_GATEWAY_WORKER_ADDR": "SHOAL_GATEWAY_WORKER_TLS_SERVER_NAME",
    "SHOAL_GATEWAY_AGGREGATOR_ADDR": "SHOAL_GATEWAY_AGGREGATOR_TLS_SERVER_NAME",
    "SHOAL_METRICS_PUSH_ENDPOINT": "SHOAL_METRICS_PUSH_TLS_SERVER_NAME",
}


def accepted_env(binary: pathlib.Path) -> set[str]:
    text = subprocess.run([str(binary), "--help"], check=True, capture_output=True, text=True).stdout
    return set(re.findall(r"\[env: ([A-Z0-9_]+)=", text))


def is_accepted(variable: str, accepted: set[str]) -> bool:
    return variable in accepted or (variable.endswith("_FILE") and variable[: -len("_FILE")] in accepted)


class Ports:
    def __init__(self) -> None:
        self._next = iter(PORT_RANGE)

    def take(self) -> int:
        for port in self._next:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
        raise RuntimeError("no free port in the k8s range")


def http_get(port: int, path: str, headers: dict | None = None, timeout: float = 2.0) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except OSError as error:
        return 0, str(error)


def http_post(port: int, path: str, body: dict, headers: dict) -> tuple[int, str, dict]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"content-type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace"), dict(error.headers)


def grpc_health(port: int, service: str) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        except grpc.RpcError as error:
            return error.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def tcp_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        return True
    return False


def eventually(check, budget: float, every: float = 0.1):
    deadline = time.monotonic() + budget
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(every)


# --- what the manifests say -------------------------------------------------------


def pods(docs: list[dict]) -> dict[str, dict]:
    """Service name -> {deployment, container, env, ...} for one render."""
    configmaps = {o["metadata"]["name"]: o for o in docs if o["kind"] == "ConfigMap"}
    found = {}
    for obj in docs:
        if obj["kind"] != "Deployment" or obj["metadata"]["name"] not in SERVICES:
            continue
        service = obj["metadata"]["name"]
        spec = obj["spec"]["template"]["spec"]
        (container,) = [c for c in spec["containers"] if c["name"] == service]
        env: list[tuple[str, dict]] = []
        for source in container.get("envFrom") or []:
            for key, value in (configmaps[source["configMapRef"]["name"]].get("data") or {}).items():
                env.append((key, {"value": value}))
        for entry in container.get("env") or []:
            env.append((entry["name"], {k: v for k, v in entry.items() if k != "name"}))
        found[service] = {
            "container": container,
            "env": env,
            "volumes": {v["name"]: v for v in spec.get("volumes") or []},
            "configmaps": configmaps,
            "grace": spec.get("terminationGracePeriodSeconds", 30),
            "pre_stop": ((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0),
        }
    return found


def fingerprint(pod: dict) -> str:
    c = pod["container"]
    keep = {k: c.get(k) for k in ("args", "command", "ports", "startupProbe", "readinessProbe", "livenessProbe", "volumeMounts")}
    return json.dumps({"env": pod["env"], "container": keep, "volumes": pod["volumes"], "grace": pod["grace"]}, sort_keys=True)


# --- running ---------------------------------------------------------------------------


class Group:
    """One render's three services, started together on loopback."""

    def __init__(self, target, docs, pods_, ports, secrets, redis_port, failures, work):
        self.target, self.docs, self.pods, self.failures = target, docs, pods_, failures
        self.secrets, self.redis_port, self.work = secrets, redis_port, work
        self.remap: dict[tuple[str, int], int] = {}
        for service, pod in pods_.items():
            for port in pod["container"].get("ports") or []:
                self.remap[(service, port["containerPort"])] = ports.take()
        self.processes: dict[str, subprocess.Popen] = {}
        self.auth_enforced = False  # set when the gateway binary knows SHOAL_GATEWAY_AUTH

    def fail(self, service: str, message: str) -> None:
        self.failures.add("contract", f"{self.target} {service}", message)

    def port_of(self, service: str, port) -> int:
        ports = self.pods[service]["container"].get("ports") or []
        if isinstance(port, str):
            (number,) = [p["containerPort"] for p in ports if p.get("name") == port] or [None]
            if number is None:
                raise KeyError(f"no container port named {port}")
            port = number
        if (service, port) not in self.remap:
            raise KeyError(f"port {port} is not a container port")
        return self.remap[(service, port)]

    def rewrite(self, value: str) -> str:
        """Listen and peer addresses onto the remapped loopback ports."""
        def address(match):
            host, port = match[1], int(match[2])
            if host == "redis" and port == 6379:
                return f"127.0.0.1:{self.redis_port}"
            service = None if host == "0.0.0.0" else host
            for (owner, number), mapped in self.remap.items():
                if number == port and (service is None or service == owner):
                    return f"127.0.0.1:{mapped}"
            return match[0]
        return re.sub(r"\b(0\.0\.0\.0|gateway|worker|metrics-aggregator|redis):(\d+)\b", address, value)

    def files_for(self, service: str) -> dict[str, pathlib.Path]:
        """mountPath -> a directory holding what the volume would."""
        pod = self.pods[service]
        mounts = {}
        for mount in pod["container"].get("volumeMounts") or []:
            volume = pod["volumes"][mount["name"]]
            directory = self.work / self.target.replace("/", "--") / service / mount["name"]
            directory.mkdir(parents=True, exist_ok=True)
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                if name not in self.secrets:
                    self.fail(service, f"mounts the Secret {name}, which neither scripts/k8s-secrets nor the docs create")
                    continue
                for key, text in self.secrets[name].items():
                    (directory / key).write_text(self.rewrite(text))
            elif "configMap" in volume:
                cm = pod["configmaps"][volume["configMap"]["name"]]
                for key, text in (cm.get("data") or {}).items():
                    (directory / key).write_text(text)
            mounts[mount["mountPath"].rstrip("/")] = directory
        return mounts

    def environment(self, service: str) -> dict[str, str]:
        mounts = self.files_for(service)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RUST_LOG": "warn"}
        for name, entry in self.pods[service]["env"]:
            if "value" in entry:
                value = entry["value"]
            elif "fieldRef" in (entry.get("valueFrom") or {}):
                value = f"{service}-contract-0"
            elif "secretKeyRef" in (entry.get("valueFrom") or {}):
                ref = entry["valueFrom"]["secretKeyRef"]
                value = self.secrets.get(ref["name"], {}).get(ref["key"], "")
            else:
                self.fail(service, f"env {name}: unsupported source {entry}")
                continue
            for path, directory in mounts.items():
                if value == path or value.startswith(path + "/"):
                    value = str(directory) + value[len(path):]
            env[name] = self.rewrite(value)
        env["RUST_LOG"] = env.get("RUST_LOG", "warn") and "warn"
        # The harness dials 127.0.0.1 where a pod dials a Service name, and TLS
        # verifies the certificate against the address's host: name it, as the
        # binary would have from the manifest's address.
        original = {name: entry.get("value", "") for name, entry in self.pods[service]["env"]}
        for address, server_name in TLS_SERVER_NAMES.items():
            host = urllib.parse.urlsplit(original.get(address, "")).hostname
            if host and server_name not in env and not re.fullmatch(r"[\d.]+", host):
                env[server_name] = host
        return env

    def start(self) -> None:
        for service in SERVICES:
            if service not in self.pods:
                continue
            container = self.pods[service]["container"]
            binary = ROOT / "target/debug" / f"shoal-{service}"
            argv = [str(binary), *(container.get("command") or [])[1:], *(container.get("args") or [])]
            log = open(self.work / f"{self.target.replace('/', '--')}-{service}.log", "w")
            self.processes[service] = subprocess.Popen(argv, env=self.environment(service), stdout=log, stderr=subprocess.STDOUT)

    def probe(self, service: str, probe: dict) -> str | None:
        """None when the probe passes, else what it saw."""
        if "httpGet" in probe:
            port = self.port_of(service, probe["httpGet"]["port"])
            status, body = http_get(port, probe["httpGet"].get("path", "/"))
            return None if 200 <= status < 400 else f"GET {probe['httpGet'].get('path')} -> {status} {body[:200]}"
        if "grpc" in probe:
            port = self.port_of(service, probe["grpc"]["port"])
            status = grpc_health(port, probe["grpc"].get("service", ""))
            return None if status == "SERVING" else f"grpc health {probe['grpc'].get('service')!r} -> {status}"
        if "tcpSocket" in probe:
            return None if tcp_open(self.port_of(service, probe["tcpSocket"]["port"])) else "tcp connect refused"
        return f"unsupported probe {sorted(probe)}"

    def check(self) -> None:
        for service, process in self.processes.items():
            container = self.pods[service]["container"]
            readiness = container.get("readinessProbe")
            try:
                ready = eventually(lambda: process.poll() is not None or self.probe(service, readiness) is None, READY_BUDGET_SECONDS)
            except KeyError as error:
                self.fail(service, f"readinessProbe: {error}")
                continue
            if process.poll() is not None:
                self.fail(service, f"exited {process.returncode} at start (log: {self.work})")
                continue
            if not ready:
                self.fail(service, f"not ready within {READY_BUDGET_SECONDS} s: {self.probe(service, readiness)}")
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                if kind in container:
                    try:
                        problem = self.probe(service, container[kind])
                    except KeyError as error:
                        problem = str(error)
                    if problem:
                        self.fail(service, f"{kind}: {problem}")
                    if "grpc" in container[kind]:
                        port = self.port_of(service, container[kind]["grpc"]["port"])
                        if grpc_health(port, "shoal.no.such.v1.Service") != "NOT_FOUND":
                            self.fail(service, "the health service answers for any name: the probe's name proves nothing")
            for port in container.get("ports") or []:
                if not tcp_open(self.remap[(service, port["containerPort"])]):
                    self.fail(service, f"container port {port.get('name')} {port['containerPort']} is not served")
        # Redis users: /readyz includes the worker's Redis and the aggregator's
        # loaded state, whatever the readiness probe is.
        for service in ("worker", "metrics-aggregator"):
            if service in self.processes:
                admin = self.port_of(service, "admin")
                if not eventually(lambda: http_get(admin, "/readyz")[0] == 200, READY_BUDGET_SECONDS):
                    self.fail(service, f"/readyz never 200 with the manifest's Redis: {http_get(admin, '/readyz')}")

    def round_trip(self, api_key: str, keda: dict) -> bool:
        """A job through the gateway; then KEDA's view of its stream."""
        if not {"gateway", "worker"} <= set(self.processes) or any(p.poll() is not None for p in self.processes.values()):
            return False  # a pod that did not start is already a failure
        http = self.port_of("gateway", "http")
        headers = {"authorization": f"Bearer {api_key}"}
        auth = dict(self.pods["gateway"]["env"]).get("SHOAL_GATEWAY_AUTH", {}).get("value")
        if auth == "api-keys" and self.auth_enforced:
            status, body, _ = http_post(http, "/v1/jobs", {"kind": "sleep", "payload": {"ms": 1}}, {})
            if status != 401:
                self.fail("gateway", f"POST /v1/jobs without a key -> {status}, not 401: the keys file is not in force")
        # The pods start together, as in a cluster: until the gateway's health
        # watch sees a worker SERVING it answers 503 with Retry-After, which a
        # client retries. Only a 202 within the start budget passes.
        reply = {}

        def submitted() -> bool:
            try:
                reply["answer"] = http_post(http, "/v1/jobs", {"kind": "sleep", "payload": {"ms": 1}}, headers)
            except OSError as error:
                reply["answer"] = (0, f"no answer: {error}", {})
            return reply["answer"][0] not in (0, 503)

        eventually(submitted, READY_BUDGET_SECONDS, every=0.5)
        status, body, reply_headers = reply["answer"]
        if status != 202:
            self.fail("gateway", f"POST /v1/jobs -> {status} {body[:300]}")
            return False
        location = reply_headers.get("Location") or reply_headers.get("location")
        state = eventually(lambda: json.loads(http_get(http, location, headers)[1] or "{}").get("state") == "succeeded", 20)
        if not state:
            self.fail("worker", f"the job never succeeded: {http_get(http, location, headers)}")
        for obj in self.docs:
            if obj["kind"] != "ScaledObject":
                continue
            for trigger in obj["spec"]["triggers"]:
                if trigger["type"] != "redis-streams":
                    continue
                meta = trigger["metadata"]
                reply = subprocess.run(
                    ["redis-cli", "-p", str(self.redis_port), "--user", keda["username"], "--pass", keda["password"],
                     "--no-auth-warning", "--json", "XINFO", "GROUPS", meta["stream"]],
                    capture_output=True, text=True, timeout=10,
                )
                groups = json.loads(reply.stdout or "null") if reply.returncode == 0 else None
                names = [g.get("name") for g in groups or [] if isinstance(g, dict)]
                if meta["consumerGroup"] not in names:
                    self.failures.add("contract", f"{self.target} {obj['kind']}/{obj['metadata']['name']}",
                                      f"KEDA's user sees no group {meta['consumerGroup']!r} on {meta['stream']!r}: {reply.stdout or reply.stderr}")
                info = subprocess.run(
                    ["redis-cli", "-p", str(self.redis_port), "--user", keda["username"], "--pass", keda["password"],
                     "--no-auth-warning", "INFO", "server"], capture_output=True, text=True, timeout=10)
                if "redis_version:" not in info.stdout:
                    self.failures.add("contract", f"{self.target} ScaledObject", f"KEDA's user cannot read INFO (lagCount needs it): {info.stdout}")
        return True

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for service, process in self.processes.items():
            budget = self.pods[service]["grace"] - self.pods[service]["pre_stop"]
            try:
                code = process.wait(timeout=budget)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                self.fail(service, f"still running {budget} s after SIGTERM (grace less preStop)")
                continue
            if code != 0:
                self.fail(service, f"exited {code} after SIGTERM")

    def kill(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def issue_certificates(docs: list[dict], work: pathlib.Path) -> dict[str, dict[str, str]]:
    """What cert-manager would write for the render's Certificates: a private
    CA (the `isCA` Certificate) and, signed by it, one leaf per Certificate
    with its commonName, dnsNames and usages, as Secrets with `tls.crt`,
    `tls.key` and `ca.crt` (openssl, ECDSA P-256)."""
    certificates = [o for o in docs if o.get("kind") == "Certificate" and o["apiVersion"].startswith("cert-manager.io/")]
    if not certificates:
        return {}
    directory = work / "certificates"
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "ca.key")
    openssl("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=shoal-contract-ca", "-days", "2",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-out", "ca.crt")
    ca = (directory / "ca.crt").read_text()
    usages = {"server auth": "serverAuth", "client auth": "clientAuth"}
    secrets = {}
    for cert in certificates:
        spec, name = cert["spec"], cert["metadata"]["name"]
        if spec.get("isCA"):
            secrets[spec["secretName"]] = {"tls.crt": ca, "tls.key": (directory / "ca.key").read_text(), "ca.crt": ca}
            continue
        eku = ",".join(usages[u] for u in spec.get("usages", []) if u in usages) or "serverAuth"
        san = ",".join(f"DNS:{d}" for d in spec.get("dnsNames", []))
        (directory / f"{name}.ext").write_text(
            f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={eku}\n"
            + (f"subjectAltName={san}\n" if san else ""))
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key")
        openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={spec.get('commonName', name)}", "-out", f"{name}.csr")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt")
        secrets[spec["secretName"]] = {
            "tls.crt": (directory / f"{name}.crt").read_text(),
            "tls.key": (directory / f"{name}.key").read_text(),
            "ca.crt": ca,
        }
    return secrets


def redis_conf(rendered: dict[str, list[dict]]) -> str:
    for docs in rendered.values():
        for obj in docs:
            if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].startswith("redis-config"):
                return obj["data"]["redis.conf"]
    raise RuntimeError("no render has the redis component's redis.conf")


def run(rendered: dict[str, list[dict]], failures) -> str:
    binaries = {s: ROOT / "target/debug" / f"shoal-{s}" for s in SERVICES}
    for service, binary in binaries.items():
        if not binary.exists():
            failures.add("contract", service, f"{binary} missing: run `cargo build --bins` first")
            return "binaries missing"
    accepted = {s: accepted_env(b) for s, b in binaries.items()}
    pending = yaml.safe_load(PENDING.read_text()) or {}
    all_pods = {target: pods(docs) for target, docs in rendered.items()}

    # Every variable a manifest sets is one the binary accepts.
    checked = set()
    for target, found in all_pods.items():
        for service, pod in found.items():
            for name, _ in pod["env"]:
                if (service, name) in checked:
                    continue
                checked.add((service, name))
                if is_accepted(name, accepted[service]):
                    continue
                if name not in pending:
                    failures.add("contract", f"{target} {service}", f"sets {name}, which shoal-{service} --help does not list")
    for name in pending:
        users = [s for s in SERVICES if is_accepted(name, accepted[s])]
        if users:
            failures.add("contract", "pending-settings.yaml", f"{name} is accepted by shoal-{users[0]} now: delete its line")

    groups: dict[str, tuple[str, dict]] = {}
    for target, found in all_pods.items():
        if set(found) == set(SERVICES):
            key = json.dumps({s: fingerprint(found[s]) for s in SERVICES}, sort_keys=True)
            groups.setdefault(key, (target, found))

    work = pathlib.Path(tempfile.mkdtemp(prefix="shoal-k8s-contract-"))
    ports = Ports()
    redis = None
    ok = False
    try:
        subprocess.run([str(ROOT / "scripts/k8s-secrets"), "--namespace", "contract", "--dir", str(work / "secrets")],
                       check=True, capture_output=True)
        s = {p.name: p.read_text() for p in (work / "secrets").iterdir() if p.is_file()}
        # The Secrets exactly as the script would apply them.
        secrets = {
            obj["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
            for obj in yaml.safe_load_all(s["secrets.yaml"])
            if obj
        }
        redis_port = ports.take()
        (work / "redis").mkdir()
        # The StatefulSet's mounts: /data (the PVC) and the ACL Secret.
        conf = redis_conf(rendered).replace("dir /data", f"dir {work / 'redis'}")
        conf = conf.replace("/run/secrets/shoal/redis-acl/users.acl", str(work / "secrets/users.acl"))
        (work / "redis.conf").write_text(conf)
        redis = subprocess.Popen(
            ["redis-server", str(work / "redis.conf"), "--port", str(redis_port), "--bind", "127.0.0.1",
             "--daemonize", "no", "--maxclients", "200"],
            stdout=open(work / "redis.log", "w"), stderr=subprocess.STDOUT,
        )
        if not eventually(lambda: tcp_open(redis_port), 10):
            failures.add("contract", "redis", f"redis-server did not start with the component's redis.conf (log: {work})")
            return "redis failed"
        round_trips = 0
        for target, found in groups.values():
            # cert-manager's Secrets (the mtls component), issued for this render.
            issued = issue_certificates(rendered[target], work / target.replace("/", "--"))
            group = Group(target, rendered[target], found, ports, {**secrets, **issued}, redis_port, failures, work)
            group.auth_enforced = "SHOAL_GATEWAY_AUTH" in accepted["gateway"]
            try:
                group.start()
                group.check()
                round_trips += group.round_trip(s["api-key"].strip(), secrets["shoal-redis-keda"])
                group.stop()
            finally:
                group.kill()
        ok = True
        return (f"{len(checked)} settings against --help, {len(groups)} distinct configurations started "
                f"({', '.join(t for t, _ in groups.values())}), {round_trips} job round trips")
    finally:
        if redis is not None:
            redis.terminate()
            redis.wait(timeout=10)
        if ok and not failures.items:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"contract: logs kept in {work}")
