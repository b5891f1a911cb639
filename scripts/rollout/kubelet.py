"""A kubelet on Docker: runs the pod templates of rendered Kubernetes
manifests (`kubectl kustomize` output) as containers, the way a kubelet
would, and a cluster DNS that serves their Services.

What a pod gets, from its template:

- the image (mapped to the locally built one by name), ``command`` as the
  entrypoint and ``args`` as its arguments, ``workingDir``;
- env: ``envFrom`` (ConfigMap, Secret) first, then ``env`` (``value`` with
  ``$(VAR)`` expansion, ``configMapKeyRef``, ``secretKeyRef``, ``fieldRef``
  for ``metadata.name``/``metadata.namespace``); a missing key is an error
  unless ``optional: true``;
- volumes: Secret and ConfigMap as files (``items``, ``defaultMode``/``mode``,
  owned by ``fsGroup``, read-only), ``emptyDir`` (a fresh directory, or tmpfs
  for ``medium: Memory``), a StatefulSet's ``volumeClaimTemplates`` as a fresh
  directory; ``subPath``;
- securityContext (pod merged with container): ``runAsUser``/``runAsGroup``
  → ``--user``, ``fsGroup``/``supplementalGroups`` → ``--group-add``,
  ``runAsNonRoot`` checked against the user it will run as (the image's when
  not set, and it must be numeric, as the kubelet requires),
  ``readOnlyRootFilesystem`` → ``--read-only``, ``allowPrivilegeEscalation:
  false`` → ``no-new-privileges``, ``capabilities`` → ``--cap-drop``/
  ``--cap-add``, ``privileged`` refused;
- resources: ``limits.cpu`` → ``--cpus``, ``limits.memory`` → ``--memory``
  (no swap), ``requests.cpu`` → ``--cpu-shares``;
- probes (startup, then readiness and liveness) run on their schedule
  (``initialDelaySeconds``, ``periodSeconds``, ``timeoutSeconds``,
  ``successThreshold``, ``failureThreshold``): ``httpGet``, ``tcpSocket`` and
  ``grpc`` (the gRPC health protocol, like the kubelet's);
- termination: the pod leaves its Services' endpoints at once, the
  ``preStop`` hook runs (native ``sleep``, or ``httpGet``), then SIGTERM
  with what is left of ``terminationGracePeriodSeconds`` (``docker stop -t``);
  the result records the exit code and whether it was within the grace.

What it does not model: restarts (a crash, a failed liveness or startup probe
is reported as a failure of the pod), ``exec`` probes and hooks (the images
have no shell), scheduling, the API server. Unsupported fields that would
change how the container runs are errors, not silently ignored.
"""

from __future__ import annotations

import base64
import http.client
import math
import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import yaml

from common import PREFIX, RUN_LABEL, HarnessError, docker, inspect, log, run


class PodSpecError(HarnessError):
    """The pod template uses something this kubelet cannot run faithfully."""


# --- manifests -------------------------------------------------------------------------


class Manifests:
    """The objects of a rendered kustomization, by kind and name."""

    def __init__(self, objects: list[dict]) -> None:
        self.objects = [o for o in objects if o]

    @classmethod
    def load(cls, text: str) -> "Manifests":
        return cls(list(yaml.safe_load_all(text)))

    @classmethod
    def render(cls, kustomization: str) -> "Manifests":
        return cls.load(run(["kubectl", "kustomize", kustomization], timeout=120))

    def add(self, objects: list[dict]) -> None:
        self.objects.extend(objects)

    def namespace(self) -> str:
        """The namespace the workloads were rendered into."""
        for o in self.of_kind("Deployment") + self.of_kind("StatefulSet"):
            if o["metadata"].get("namespace"):
                return o["metadata"]["namespace"]
        return "default"

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o.get("kind") == kind]

    def get(self, kind: str, name: str) -> dict:
        for o in self.of_kind(kind):
            if o["metadata"]["name"] == name:
                return o
        raise PodSpecError(f"{kind} {name!r} is not in the manifests")

    def find(self, kind: str, name: str) -> dict | None:
        try:
            return self.get(kind, name)
        except PodSpecError:
            return None

    def config_data(self, kind: str, name: str) -> dict[str, bytes] | None:
        """A ConfigMap's or Secret's data as bytes, or None when absent."""
        obj = self.find(kind, name)
        if obj is None:
            return None
        data: dict[str, bytes] = {}
        if kind == "Secret":
            for k, v in (obj.get("data") or {}).items():
                data[k] = base64.b64decode(v)
            for k, v in (obj.get("stringData") or {}).items():
                data[k] = str(v).encode()
        else:
            for k, v in (obj.get("data") or {}).items():
                data[k] = str(v).encode()
            for k, v in (obj.get("binaryData") or {}).items():
                data[k] = base64.b64decode(v)
        return data


def secret(name: str, namespace: str | None, data: dict[str, str]) -> dict:
    """A Secret object, as the operator would `kubectl create secret generic`."""
    meta = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "stringData": data}


def quantity_cpu(text: str | int | float) -> float:
    s = str(text)
    return int(s[:-1]) / 1000 if s.endswith("m") else float(s)


_MEM = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "k": 10**3}


def quantity_bytes(text: str | int) -> int:
    s = str(text)
    for suffix in sorted(_MEM, key=len, reverse=True):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * _MEM[suffix])
    return int(float(s))


# --- the cluster: network, DNS, endpoints ------------------------------------------------


class ClusterDns:
    """Debian's dnsmasq as the cluster DNS: authoritative for ``cluster.local``
    from a hosts file it re-reads on SIGHUP, answers with ``ttl`` seconds,
    never forwards anything (``--no-resolv``, unknown names in the cluster
    domain are NXDOMAIN). Listens on the bridge address of the test's
    network, port 53, so containers reach it with ``--dns``."""

    def __init__(self, listen_ip: str, workdir: str, ttl: int) -> None:
        self.listen_ip, self.ttl = listen_ip, ttl
        self._hosts = os.path.join(workdir, "cluster.hosts")
        self._records: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._write()
        self._proc = subprocess.Popen(
            [
                "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
                f"--addn-hosts={self._hosts}", f"--listen-address={listen_ip}", "--bind-interfaces",
                "--except-interface=lo", "--port=53", f"--local-ttl={ttl}", f"--neg-ttl={ttl}",
                "--local=/cluster.local/", "--domain-needed", "--cache-size=0",
                f"--pid-file={os.path.join(workdir, 'dnsmasq.pid')}", "--user=root", "--group=root",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        time.sleep(0.3)
        if self._proc.poll() is not None:
            raise HarnessError(f"dnsmasq did not start: {self._proc.stderr.read() if self._proc.stderr else ''}")

    def _write(self) -> None:
        tmp = self._hosts + ".tmp"
        with open(tmp, "w") as f:
            for name, ips in sorted(self._records.items()):
                for ip in ips:
                    f.write(f"{ip} {name}\n")
        os.replace(tmp, self._hosts)

    def set(self, name: str, ips: list[str]) -> None:
        with self._lock:
            if self._records.get(name) == sorted(ips):
                return
            self._records[name] = sorted(ips)
            if not ips:
                del self._records[name]
            self._write()
            if hasattr(self, "_proc") and self._proc.poll() is None:
                self._proc.send_signal(1)  # SIGHUP: re-read the hosts file

    def records(self, name: str) -> list[str]:
        with self._lock:
            return list(self._records.get(name, []))

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()


@dataclass
class Cluster:
    """Where pods run: one Docker network, one namespace, one DNS."""

    run_id: str
    network: str
    namespace: str
    workdir: str
    manifests: Manifests
    images: dict[str, str]  # image name (last path part, no tag) -> local image
    dns: ClusterDns | None = None
    # Endpoint changes reach DNS this much later (an EndpointSlice's
    # propagation and a caching resolver's TTL, worst case).
    endpoint_lag: float = 0.0
    pods: list["Pod"] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, run_id: str, workdir: str, manifests: Manifests, images: dict[str, str], namespace: str,
               dns_ttl: int, endpoint_lag: float) -> "Cluster":
        network = f"{PREFIX}-{run_id}"
        docker("network", "create", "--driver", "bridge", "--label", f"{RUN_LABEL}={run_id}", network)
        gateway = docker("network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}", network).strip()
        cluster = cls(run_id, network, namespace, workdir, manifests, images, endpoint_lag=endpoint_lag)
        cluster.dns = ClusterDns(gateway, workdir, dns_ttl)
        return cluster

    def service_name(self, service: str) -> str:
        return f"{service}.{self.namespace}.svc.cluster.local"

    def sync_endpoints(self) -> None:
        """Publishes, for every Service, the addresses of the pods it selects
        that are ready and not terminating (as the EndpointSlice controller
        does), ``endpoint_lag`` seconds later."""
        with self._lock:
            pods = list(self.pods)
        records: dict[str, list[str]] = {}
        for svc in self.manifests.of_kind("Service"):
            name = svc["metadata"]["name"]
            selector = (svc.get("spec") or {}).get("selector") or {}
            if not selector:
                continue
            publish_not_ready = bool(svc["spec"].get("publishNotReadyAddresses"))
            ips = []
            for pod in pods:
                if pod.ip and not pod.terminating and all(pod.labels.get(k) == v for k, v in selector.items()):
                    if pod.ready or publish_not_ready:
                        ips.append(pod.ip)
                    if pod.subdomain == name and (pod.ready or publish_not_ready):
                        records[f"{pod.hostname}.{self.service_name(name)}"] = [pod.ip]
            records[self.service_name(name)] = ips

        def apply() -> None:
            assert self.dns is not None
            for record, ips in records.items():
                self.dns.set(record, ips)

        if self.endpoint_lag > 0:
            timer = threading.Timer(self.endpoint_lag, apply)
            timer.daemon = True
            timer.start()
        else:
            apply()

    def add(self, pod: "Pod") -> None:
        with self._lock:
            self.pods.append(pod)

    def forget(self, pod: "Pod") -> None:
        with self._lock:
            if pod in self.pods:
                self.pods.remove(pod)

    def map_image(self, image: str) -> str:
        name = image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]
        return self.images.get(name, image)


# --- probes ------------------------------------------------------------------------------


def _port(spec: dict, ports: dict[str, int]) -> int:
    port = spec.get("port")
    if isinstance(port, str) and not port.isdigit():
        if port not in ports:
            raise PodSpecError(f"probe port {port!r} is not a named container port")
        return ports[port]
    return int(port)


class Probe:
    """One probe of a container with its schedule and thresholds."""

    def __init__(self, kind: str, spec: dict, ports: dict[str, int]) -> None:
        self.kind = kind
        self.initial_delay = float(spec.get("initialDelaySeconds", 0))
        self.period = float(spec.get("periodSeconds", 10))
        self.timeout = float(spec.get("timeoutSeconds", 1))
        self.success_threshold = int(spec.get("successThreshold", 1))
        self.failure_threshold = int(spec.get("failureThreshold", 3))
        if "httpGet" in spec:
            h = spec["httpGet"]
            if h.get("scheme", "HTTP") != "HTTP":
                raise PodSpecError(f"{kind} probe: scheme {h['scheme']} is not supported")
            self.action, self.port, self.path = "http", _port(h, ports), h.get("path", "/")
            self.headers = {x["name"]: x["value"] for x in h.get("httpHeaders") or []}
        elif "tcpSocket" in spec:
            self.action, self.port = "tcp", _port(spec["tcpSocket"], ports)
        elif "grpc" in spec:
            self.action, self.port = "grpc", int(spec["grpc"]["port"])
            self.service = spec["grpc"].get("service", "")
        else:
            raise PodSpecError(f"{kind} probe: only httpGet, tcpSocket and grpc are supported ({sorted(spec)})")
        self.successes = self.failures = 0
        self.last_error = ""

    def check(self, ip: str) -> bool:
        try:
            ok = getattr(self, f"_{self.action}")(ip)
            self.last_error = "" if ok else self.last_error
        except Exception as e:  # noqa: BLE001 - any failure is a failed probe
            self.last_error = f"{type(e).__name__}: {e}"
            ok = False
        if ok:
            self.successes, self.failures = self.successes + 1, 0
        else:
            self.successes, self.failures = 0, self.failures + 1
        return ok

    def _http(self, ip: str) -> bool:
        conn = http.client.HTTPConnection(ip, self.port, timeout=self.timeout)
        try:
            conn.request("GET", self.path, headers={"User-Agent": "kube-probe/1.31", **self.headers})
            status = conn.getresponse().status
            self.last_error = f"status {status}"
            return 200 <= status < 400
        finally:
            conn.close()

    def _tcp(self, ip: str) -> bool:
        with socket.create_connection((ip, self.port), timeout=self.timeout):
            return True

    def _grpc(self, ip: str) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"{ip}:{self.port}") as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=self.service), timeout=self.timeout
            )
            self.last_error = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            return answer.status == health_pb2.HealthCheckResponse.SERVING


# --- pods --------------------------------------------------------------------------------


@dataclass
class Termination:
    pod: str
    exit_code: int
    seconds: float
    grace: float
    oom_killed: bool

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.oom_killed and self.seconds <= self.grace + 1.0


class Pod:
    """One pod of a workload: a single container (init and sidecar
    containers are refused), its probes and its termination."""

    def __init__(self, cluster: Cluster, name: str, template: dict, *, hostname: str | None = None,
                 subdomain: str | None = None, claims: list[dict] | None = None,
                 on_change: Callable[["Pod"], None] | None = None) -> None:
        self.cluster, self.name = cluster, name
        self.container = f"{PREFIX}-{cluster.run_id}-{name}"
        self.labels = dict((template.get("metadata") or {}).get("labels") or {})
        self.spec = template["spec"]
        self.hostname, self.subdomain = hostname or name, subdomain
        self.claims = claims or []
        self.on_change = on_change
        self.ip = ""
        self.started = self.ready = self.terminating = False
        self.failure = ""
        self.created_at = time.monotonic()
        self.ready_at: float | None = None
        self.ready_after: float | None = None  # seconds from creation to the first ready
        self._stop_probes = threading.Event()
        self._was_ready = False
        self.image = ""
        if self.spec.get("initContainers"):
            raise PodSpecError(f"{name}: init containers are not supported")
        containers = self.spec["containers"]
        if len(containers) != 1:
            raise PodSpecError(f"{name}: exactly one container per pod is supported, not {len(containers)}")
        self.c = containers[0]
        self.ports = {p["name"]: int(p["containerPort"]) for p in self.c.get("ports") or [] if "name" in p}
        self.probes = {
            kind: Probe(kind, self.c[f"{kind}Probe"], self.ports)
            for kind in ("startup", "readiness", "liveness") if self.c.get(f"{kind}Probe")
        }
        self.grace = float(self.spec.get("terminationGracePeriodSeconds", 30))

    # --- docker run ----------------------------------------------------------------

    def _data(self, kind: str, name: str, optional: bool) -> dict[str, bytes] | None:
        data = self.cluster.manifests.config_data(kind, name)
        if data is None and not optional:
            raise PodSpecError(f"{self.name}: {kind} {name!r} does not exist (the pod would not start)")
        return data

    def _env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in self.c.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                if key in source:
                    ref = source[key]
                    data = self._data(kind, ref["name"], bool(ref.get("optional")))
                    for k, v in (data or {}).items():
                        env[prefix + k] = v.decode()
        for var in self.c.get("env") or []:
            name = var["name"]
            if "value" in var:
                env[name] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), str(var["value"]))
                continue
            source = var.get("valueFrom") or {}
            if "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                values = {"metadata.name": self.name, "metadata.namespace": self.cluster.namespace,
                          "spec.nodeName": "shoal-harness-node", "spec.serviceAccountName": self.spec.get("serviceAccountName", "default")}
                if path not in values:
                    raise PodSpecError(f"{self.name}: env {name}: fieldRef {path} is not supported")
                env[name] = values[path]
                continue
            for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                if key in source:
                    ref = source[key]
                    data = self._data(kind, ref["name"], bool(ref.get("optional")))
                    if data is None or ref["key"] not in data:
                        if ref.get("optional"):
                            break
                        raise PodSpecError(f"{self.name}: env {name}: key {ref['key']!r} not in {kind} {ref['name']!r}")
                    env[name] = data[ref["key"]].decode()
                    break
            else:
                if source:
                    raise PodSpecError(f"{self.name}: env {name}: {sorted(source)} is not supported")
        return env

    def _security(self) -> tuple[list[str], int]:
        pod = self.spec.get("securityContext") or {}
        ctr = self.c.get("securityContext") or {}
        merged = {**pod, **ctr}
        args: list[str] = []
        uid, gid = merged.get("runAsUser"), merged.get("runAsGroup")
        image_user = inspect_image_user(self.image)
        if uid is None:
            user = image_user.split(":")[0]
            if merged.get("runAsNonRoot"):
                if not user.isdigit():
                    raise PodSpecError(f"{self.name}: runAsNonRoot and the image's user {user!r} is not numeric")
                if int(user) == 0:
                    raise PodSpecError(f"{self.name}: runAsNonRoot and the image runs as root")
            uid = int(user) if user.isdigit() else None
        elif merged.get("runAsNonRoot") and int(uid) == 0:
            raise PodSpecError(f"{self.name}: runAsNonRoot with runAsUser 0")
        if uid is not None:
            args += ["--user", f"{uid}:{gid if gid is not None else 0}"]
        fs_group = pod.get("fsGroup")
        for group in ([fs_group] if fs_group is not None else []) + list(pod.get("supplementalGroups") or []):
            args += ["--group-add", str(group)]
        if merged.get("privileged"):
            raise PodSpecError(f"{self.name}: privileged containers are not supported")
        if merged.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        if merged.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        caps = merged.get("capabilities") or {}
        for cap in caps.get("drop") or []:
            args += ["--cap-drop", cap]
        for cap in caps.get("add") or []:
            args += ["--cap-add", cap]
        seccomp = (merged.get("seccompProfile") or {}).get("type", "RuntimeDefault")
        if seccomp == "Unconfined":
            args += ["--security-opt", "seccomp=unconfined"]
        elif seccomp != "RuntimeDefault":
            raise PodSpecError(f"{self.name}: seccompProfile {seccomp} is not supported")
        return args, int(fs_group) if fs_group is not None else 0

    def _write_files(self, directory: str, data: dict[str, bytes], items: list[dict] | None, mode: int,
                     group: int) -> None:
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, 0o755)
        chosen = [(i["key"], i["path"], i.get("mode", mode)) for i in items] if items else [(k, k, mode) for k in data]
        for key, path, file_mode in chosen:
            if key not in data:
                raise PodSpecError(f"{self.name}: volume item {key!r} not in its source")
            target = os.path.join(directory, path)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(data[key])
            os.chown(target, 0, group)
            os.chmod(target, file_mode)

    def _volumes(self, fs_group: int) -> list[str]:
        base = os.path.join(self.cluster.workdir, "volumes", self.name)
        sources: dict[str, tuple[str, bool]] = {}  # volume name -> (host path or "tmpfs", read-only)
        for volume in self.spec.get("volumes") or []:
            vname, path = volume["name"], os.path.join(base, volume["name"])
            if "secret" in volume or "configMap" in volume:
                kind, src = ("Secret", volume["secret"]) if "secret" in volume else ("ConfigMap", volume["configMap"])
                ref = src.get("secretName") if kind == "Secret" else src.get("name")
                data = self._data(kind, ref, bool(src.get("optional"))) or {}
                self._write_files(path, data, src.get("items"), int(src.get("defaultMode", 0o644)), fs_group)
                sources[vname] = (path, True)
            elif "emptyDir" in volume:
                if (volume["emptyDir"] or {}).get("medium") == "Memory":
                    sources[vname] = ("tmpfs", False)
                else:
                    os.makedirs(path, exist_ok=True)
                    os.chmod(path, 0o777)
                    sources[vname] = (path, False)
            else:
                raise PodSpecError(f"{self.name}: volume {vname}: only secret, configMap and emptyDir are supported")
        for claim in self.claims:
            cname, path = claim["metadata"]["name"], os.path.join(base, claim["metadata"]["name"])
            os.makedirs(path, exist_ok=True)
            os.chown(path, 0, fs_group)
            os.chmod(path, 0o2775)  # fsGroup: group-owned, setgid, group-writable
            sources[cname] = (path, False)
        args = []
        for mount in self.c.get("volumeMounts") or []:
            if mount["name"] not in sources:
                raise PodSpecError(f"{self.name}: volumeMount {mount['name']!r} has no volume")
            host, read_only = sources[mount["name"]]
            read_only = read_only or bool(mount.get("readOnly"))
            if host == "tmpfs":
                args += ["--mount", f"type=tmpfs,destination={mount['mountPath']},tmpfs-mode=1777"]
                continue
            if mount.get("subPath"):
                host = os.path.join(host, mount["subPath"])
            args += ["--mount", f"type=bind,source={host},destination={mount['mountPath']}" + (",readonly" if read_only else "")]
        return args

    def _resources(self) -> list[str]:
        res = self.c.get("resources") or {}
        limits, requests = res.get("limits") or {}, res.get("requests") or {}
        args = []
        if "cpu" in limits:
            args += ["--cpus", f"{quantity_cpu(limits['cpu']):g}"]
        if "memory" in limits:
            memory = quantity_bytes(limits["memory"])
            args += ["--memory", str(memory), "--memory-swap", str(memory)]
        if "cpu" in requests:
            args += ["--cpu-shares", str(max(2, int(quantity_cpu(requests["cpu"]) * 1024)))]
        return args

    def docker_run_args(self) -> tuple[list[str], dict[str, str]]:
        """The `docker run` arguments for this pod and the environment whose
        names they pass (values stay out of the argument list)."""
        self.image = self.cluster.map_image(self.c["image"])
        security, fs_group = self._security()
        env = self._env()
        args = [
            "run", "-d", "--name", self.container, "--hostname", self.hostname[:63],
            "--label", f"{RUN_LABEL}={self.cluster.run_id}", "--label", f"dev.shoal.harness.pod={self.name}",
            "--network", self.cluster.network, "--restart", "no", "--pull", "never",
            *security, *self._resources(), *self._volumes(fs_group),
        ]
        if self.cluster.dns is not None:
            ns = self.cluster.namespace
            args += ["--dns", self.cluster.dns.listen_ip, "--dns-search", f"{ns}.svc.cluster.local",
                     "--dns-search", "svc.cluster.local", "--dns-search", "cluster.local", "--dns-option", "ndots:5"]
        for name in env:
            args += ["--env", name]  # the value comes from this process's environment, never argv
        if self.c.get("workingDir"):
            args += ["--workdir", self.c["workingDir"]]
        command, cargs = self.c.get("command"), self.c.get("args")
        expand = lambda s: re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), s)  # noqa: E731
        if command:
            args += ["--entrypoint", expand(command[0]), self.image, *map(expand, command[1:]), *map(expand, cargs or [])]
        else:
            args += [self.image, *map(expand, cargs or [])]
        return args, env

    def start(self) -> None:
        args, env = self.docker_run_args()
        self.created_at = time.monotonic()
        done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **env})
        if done.returncode != 0:
            raise HarnessError(f"{self.name}: docker run: {done.stderr.strip()}")
        self.ip = inspect(self.container)["NetworkSettings"]["Networks"][self.cluster.network]["IPAddress"]
        self.cluster.add(self)
        self._thread = threading.Thread(target=self._probe_loop, daemon=True)
        self._thread.start()
        log("kubelet", f"{self.name} started ({self.image}, {self.ip})")

    # --- probes --------------------------------------------------------------------

    def _set_ready(self, ready: bool) -> None:
        if ready == self.ready:
            return
        self.ready = ready
        if ready and self.ready_at is None:
            self.ready_at = time.monotonic()
            self.ready_after = self.ready_at - self.created_at
        first = ready and self.ready_at is not None and self.ready_after is not None and not self._was_ready
        self._was_ready = self._was_ready or ready
        log("kubelet", f"{self.name} {'ready' if ready else 'NOT ready'}" + (f" {self.ready_after:.1f}s after creation" if first else ""))
        self.cluster.sync_endpoints()
        if self.on_change:
            self.on_change(self)

    def _fail(self, why: str) -> None:
        if not self.failure:
            self.failure = why
            log("kubelet", f"{self.name} FAILED: {why}")
        self._set_ready(False)

    def _probe_loop(self) -> None:
        start = self.created_at
        startup = self.probes.get("startup")
        due = {kind: start + p.initial_delay for kind, p in self.probes.items()}
        self.started = startup is None
        last_state_check = 0.0
        while not self._stop_probes.is_set():
            now = time.monotonic()
            if now - last_state_check >= 1.0:
                last_state_check = now
                state = inspect(self.container).get("State", {})
                if not self.terminating and state.get("Status") != "running":
                    self._fail(f"container {state.get('Status')} with exit code {state.get('ExitCode')}"
                               f"{' (OOM killed)' if state.get('OOMKilled') else ''}")
                    return
            for kind, probe in self.probes.items():
                if now < due[kind] or (kind != "startup" and not self.started) or (kind == "startup" and self.started):
                    continue
                due[kind] = now + probe.period
                ok = probe.check(self.ip)
                if kind == "startup":
                    if ok:
                        self.started = True
                        for other in ("readiness", "liveness"):
                            if other in self.probes:
                                due[other] = max(now, start + self.probes[other].initial_delay)
                    elif probe.failures >= probe.failure_threshold:
                        self._fail(f"startup probe failed {probe.failures} times ({probe.last_error})")
                        return
                elif kind == "readiness":
                    if self.terminating:
                        continue
                    if ok and probe.successes >= probe.success_threshold:
                        self._set_ready(True)
                    elif not ok and probe.failures >= probe.failure_threshold:
                        self._set_ready(False)
                elif kind == "liveness" and not ok and probe.failures >= probe.failure_threshold and not self.terminating:
                    self._fail(f"liveness probe failed {probe.failures} times ({probe.last_error}): the kubelet would restart it")
                    return
            if "readiness" not in self.probes and self.started and not self.ready and not self.terminating:
                self._set_ready(True)
            self._stop_probes.wait(0.05)

    # --- termination -----------------------------------------------------------------

    def terminate(self) -> Termination:
        """The kubelet's termination: out of the endpoints at once, preStop,
        SIGTERM with the rest of the grace period."""
        start = time.monotonic()
        self.terminating = True
        self.ready = False
        self.cluster.sync_endpoints()
        if self.on_change:
            self.on_change(self)
        hook = ((self.c.get("lifecycle") or {}).get("preStop")) or {}
        if "sleep" in hook:
            time.sleep(min(float(hook["sleep"]["seconds"]), self.grace))
        elif "httpGet" in hook:
            h = hook["httpGet"]
            conn = http.client.HTTPConnection(self.ip, _port(h, self.ports), timeout=self.grace)
            try:
                conn.request("GET", h.get("path", "/"))
                conn.getresponse().read()
            except OSError:
                pass
            finally:
                conn.close()
        elif hook:
            raise PodSpecError(f"{self.name}: preStop {sorted(hook)} is not supported (exec needs a shell)")
        # The kubelet gives at least 2 s after the hook.
        remaining = max(2.0, self.grace - (time.monotonic() - start))
        docker("stop", "-t", str(math.ceil(remaining)), self.container, timeout=remaining + 30, check=False)
        self._stop_probes.set()
        state = inspect(self.container).get("State", {})
        result = Termination(self.name, int(state.get("ExitCode", -1)), time.monotonic() - start, self.grace,
                             bool(state.get("OOMKilled")))
        self.cluster.forget(self)
        log("kubelet", f"{self.name} terminated: exit {result.exit_code} after {result.seconds:.1f}s "
                       f"(grace {self.grace:.0f}s){'' if result.ok else ' NOT OK'}")
        return result

    def logs(self, lines: int = 40) -> str:
        done = subprocess.run(["docker", "logs", "--tail", str(lines), self.container],
                              capture_output=True, text=True, timeout=30)
        return done.stdout + done.stderr


_image_users: dict[str, str] = {}


def inspect_image_user(image: str) -> str:
    if image not in _image_users:
        _image_users[image] = docker("image", "inspect", "-f", "{{.Config.User}}", image).strip() or "0"
    return _image_users[image]


def pod_template_hash(template: dict) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


# --- workloads ---------------------------------------------------------------------------


def workload_pod(cluster: Cluster, workload: dict, ordinal: int, template: dict | None = None,
                 on_change: Callable[[Pod], None] | None = None) -> Pod:
    """The ``ordinal``-th pod of a Deployment (``<name>-<template hash>-<n>``)
    or StatefulSet (``<name>-<n>``, hostname and subdomain set, one fresh
    volume per claim template)."""
    template = template or workload["spec"]["template"]
    name = workload["metadata"]["name"]
    if workload["kind"] == "StatefulSet":
        return Pod(cluster, f"{name}-{ordinal}", template, hostname=f"{name}-{ordinal}",
                   subdomain=workload["spec"].get("serviceName"),
                   claims=workload["spec"].get("volumeClaimTemplates") or [], on_change=on_change)
    if workload["kind"] != "Deployment":
        raise PodSpecError(f"{workload['kind']} {name}: only Deployments and StatefulSets are run")
    return Pod(cluster, f"{name}-{pod_template_hash(template)}-{ordinal}", template, on_change=on_change)


def startup_budget(pod: Pod) -> float:
    """How long the kubelet lets the pod become ready before it would act:
    the startup probe's whole budget, then one readiness period per needed
    success (plus its initial delay), and a second of slack for `docker run`."""
    budget = 1.0
    if "startup" in pod.probes:
        p = pod.probes["startup"]
        budget += p.initial_delay + p.period * p.failure_threshold
    if "readiness" in pod.probes:
        p = pod.probes["readiness"]
        budget += p.initial_delay + p.period * p.success_threshold + p.timeout
    return budget


def k8s_secrets(root: str, namespace: str, workdir: str) -> list[dict]:
    """The Secrets the operator creates (scripts/k8s-secrets), as objects:
    its ``secrets.yaml`` when it writes one, else built from its files."""
    out = os.path.join(workdir, "secrets")
    run([os.path.join(root, "scripts", "k8s-secrets"), "--namespace", namespace, "--dir", out], timeout=30)
    rendered = os.path.join(out, "secrets.yaml")
    if os.path.exists(rendered):
        with open(rendered) as f:
            return [o for o in yaml.safe_load_all(f) if o and o.get("kind") == "Secret"]
    read = lambda f: open(os.path.join(out, f)).read()  # noqa: E731
    return [
        secret("shoal-redis-acl", namespace, {"users.acl": read("users.acl")}),
        secret("shoal-redis-worker", namespace, {"url": read("worker-url")}),
        secret("shoal-redis-aggregator", namespace, {"url": read("aggregator-url")}),
        secret("shoal-redis-keda", namespace, {"address": read("keda-address"), "username": read("keda-username"),
                                               "password": read("keda-password")}),
    ]
