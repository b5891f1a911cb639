"""Offline checks of the Kubernetes manifests (deploy/k8s), run by
scripts/check-k8s. Every overlay and every combination under
deploy/k8s/tests/ is rendered once with `kubectl kustomize`; then:

  validate    every object against the Kubernetes schemas of each supported
              minor version (kubernetes-validate, strict; a kind without a
              schema fails), CRD objects against the vendored CRD schemas,
              KEDA trigger metadata against KEDA's scaler metadata keys
  pss         Pod Security: every pod template against the level its
              namespace enforces; Shoal's namespaces must enforce
              "restricted" and Shoal's pods pass "baseline" and "restricted"
  invariants  images, probes, rollout strategy, spread, grace inequality,
              autoscaler targets, replicas, Services
  netpol      the NetworkPolicy graph: the flows of the shape and DNS
              allowed, every other flow tried denied
  checkov     over the rendered manifests, skips justified in
              deploy/k8s/tests/checkov-skips.yaml
  contract    the binaries started with the manifests' configuration
              (contract.py)

Usage: check.py [--only SECTION ...] [--keep DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import yaml

import netpol
import pss

ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy/k8s"
SCHEMAS = K8S / "tests/schemas"
# Native `preStop.sleep` is on by default from 1.30 (beta); the newest is the
# newest kubernetes-validate knows.
VERSIONS = [f"1.{minor}.0" for minor in range(30, 38)]
SHOAL = {"gateway", "worker", "metrics-aggregator"}
GRACE_MARGIN_SECONDS = 5


class Failures:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, section: str, where: str, message: str) -> None:
        self.items.append(f"[{section}] {where}: {message}")


def targets() -> list[pathlib.Path]:
    overlays = sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
    tests = sorted(
        p for p in (K8S / "tests").iterdir() if (p / "kustomization.yaml").exists() and p.name != "common"
    )
    return overlays + tests


def render(target: pathlib.Path, out: pathlib.Path) -> list[dict]:
    text = subprocess.run(["kubectl", "kustomize", str(target)], check=True, capture_output=True, text=True).stdout
    out.write_text(text)
    return [d for d in yaml.safe_load_all(text) if d]


def name(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind')}/{meta.get('namespace', '-')}/{meta.get('name')}"


def label(target: pathlib.Path) -> str:
    return str(target.relative_to(K8S))


# --- validate -----------------------------------------------------------------


def crd_index() -> dict[str, dict]:
    index = json.loads((SCHEMAS / "index.json").read_text())
    return {key: json.loads((SCHEMAS / entry["file"]).read_text()) for key, entry in index.items()}


def strict_schema(schema):
    """A CRD's structural schema with unknown fields rejected (the API
    server would prune them silently, hiding a typo)."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def validate(rendered: dict[str, list[dict]], failures: Failures) -> str:
    import functools

    import jsonschema
    import kubernetes_validate
    import kubernetes_validate.utils

    # kubernetes-validate reads (multi-megabyte) schema files on every call;
    # the same validation with each file read once.
    kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(
        kubernetes_validate.utils.schema_contents
    )

    crds = {key: jsonschema.Draft7Validator(strict_schema(schema)) for key, schema in crd_index().items()}
    unique: dict[str, tuple[str, dict]] = {}
    for target, docs in rendered.items():
        for obj in docs:
            unique.setdefault(json.dumps(obj, sort_keys=True), (target, obj))
    native = crd = 0
    for target, obj in unique.values():
        key = f"{obj['apiVersion']}/{obj['kind']}"
        if key in crds:
            crd += 1
            meta = obj.get("metadata") or {}
            body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
            for error in crds[key].iter_errors(body):
                failures.add("validate", f"{target} {name(obj)}", f"{key} schema: {error.message} at {list(error.absolute_path)}")
            if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta.get("name", "")):
                failures.add("validate", f"{target} {name(obj)}", "metadata.name is not a DNS label")
            continue
        if "." in obj["apiVersion"].split("/")[0] and not obj["apiVersion"].split("/")[0].endswith("k8s.io"):
            failures.add("validate", f"{target} {name(obj)}", f"no vendored schema for the custom resource {key}")
            continue
        native += 1
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                failures.add("validate", f"{target} {name(obj)}", f"no schema in Kubernetes {version} (a warning is a failure)")
            except kubernetes_validate.ValidationError as error:
                failures.add("validate", f"{target} {name(obj)}", f"Kubernetes {version}: {error.message} at {list(error.path)}")
    keda_metadata(rendered, failures)
    return f"{native} distinct objects x {len(VERSIONS)} versions ({VERSIONS[0]}-{VERSIONS[-1]}), {crd} custom resources"


def keda_metadata(rendered: dict[str, list[dict]], failures: Failures) -> None:
    known = json.loads((SCHEMAS / "keda-scaler-metadata.json").read_text())["scalers"]
    for target, docs in rendered.items():
        auths = {o["metadata"]["name"]: o for o in docs if o["kind"] == "TriggerAuthentication"}
        for obj in docs:
            if obj["kind"] != "ScaledObject":
                continue
            for trigger in obj["spec"]["triggers"]:
                scaler = known.get(trigger["type"])
                where = f"{target} {name(obj)} trigger {trigger.get('name', trigger['type'])}"
                if scaler is None:
                    failures.add("validate", where, f"no vendored metadata for the scaler {trigger['type']}")
                    continue
                for key in set(trigger.get("metadata") or {}) - set(scaler.get("triggerMetadata", [])):
                    failures.add("validate", where, f"metadata key {key!r} is not one KEDA's {trigger['type']} scaler reads")
                ref = (trigger.get("authenticationRef") or {}).get("name")
                if ref is None:
                    continue
                if ref not in auths:
                    failures.add("validate", where, f"TriggerAuthentication {ref} is not in the rendered objects")
                    continue
                for entry in auths[ref]["spec"].get("secretTargetRef") or []:
                    if entry["parameter"] not in scaler.get("authParams", []):
                        failures.add("validate", where, f"auth parameter {entry['parameter']!r} is not one the scaler reads")


# --- pss ---------------------------------------------------------------------------


def pod_security(rendered: dict[str, list[dict]], failures: Failures) -> str:
    checked = 0
    for target, docs in rendered.items():
        levels = {
            o["metadata"]["name"]: (o["metadata"].get("labels") or {}).get("pod-security.kubernetes.io/enforce")
            for o in docs
            if o["kind"] == "Namespace"
        }
        for obj in docs:
            found = pss.pod_template(obj)
            if found is None:
                continue
            spec, meta = found
            checked += 1
            namespace = obj["metadata"].get("namespace")
            where = f"{target} {name(obj)}"
            if namespace not in levels:
                failures.add("pss", where, f"its namespace {namespace!r} is not one the manifests create with a Pod Security level")
                continue
            shoal = (meta.get("labels") or {}).get("app.kubernetes.io/part-of") == "shoal"
            enforced = levels[namespace] or "privileged"
            if shoal and enforced != "restricted":
                failures.add("pss", where, f"a Shoal pod in a namespace enforcing {enforced!r}, not restricted")
            for level in ("baseline", "restricted") if shoal else (enforced,):
                for violation in pss.violations(spec, meta, level):
                    failures.add("pss", where, f"{level}: {violation}")
    for target, docs in rendered.items():
        for obj in docs:
            if obj["kind"] == "Namespace":
                labels = obj["metadata"].get("labels") or {}
                if obj["metadata"]["name"] != "shoal-logging":
                    for mode in ("enforce", "warn", "audit"):
                        if labels.get(f"pod-security.kubernetes.io/{mode}") != "restricted":
                            failures.add("pss", f"{target} {name(obj)}", f"{mode} is not restricted")
    return f"{checked} pod templates"


# --- invariants ---------------------------------------------------------------


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value)
    if not match:
        raise ValueError(f"not a duration: {value}")
    number, unit = float(match[1]), match[2]
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def container_env(container: dict, configmaps: dict[str, dict]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        ref = source.get("configMapRef")
        if ref:
            env.update(configmaps[ref["name"]].get("data") or {})
    for entry in container.get("env") or []:
        env[entry["name"]] = entry.get("value", "<from " + next(iter(entry.get("valueFrom", {"?": 0}))) + ">")
    return env


def invariants(rendered: dict[str, list[dict]], failures: Failures) -> str:
    overlays = {t for t in rendered if t.startswith("overlays/")}
    for target, docs in rendered.items():
        configmaps = {o["metadata"]["name"]: o for o in docs if o["kind"] == "ConfigMap"}
        deployments = {o["metadata"]["name"]: o for o in docs if o["kind"] == "Deployment"}
        for obj in docs:
            where = f"{target} {name(obj)}"
            found = pss.pod_template(obj)
            if found:
                spec, meta = found
                ours = (meta.get("labels") or {}).get("app.kubernetes.io/part-of") == "shoal"
                for c in pss.containers(spec):
                    image = c.get("image", "")
                    tag = image.rsplit("/", 1)[-1]
                    if "@sha256:" not in image and (":" not in tag or tag.endswith(":latest")):
                        failures.add("invariants", where, f"image {image!r} has no tag or digest, or is :latest")
                    if target.startswith(("overlays/staging", "overlays/prod")) and c["name"] in SHOAL:
                        if not re.search(r"(:[0-9a-f]{40}|@sha256:[0-9a-f]{64})$", image):
                            failures.add("invariants", where, f"image {image!r} is not pinned to a commit or digest")
                    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                        if ours and probe not in c:
                            failures.add("invariants", where, f"container {c['name']} has no {probe}")
                    resources = c.get("resources") or {}
                    for kind in ("requests", "limits"):
                        for resource in ("cpu", "memory"):
                            if resource not in (resources.get(kind) or {}):
                                failures.add("invariants", where, f"container {c['name']} has no {kind}.{resource}")
                volumes = {v["name"] for v in spec.get("volumes") or []}
                volumes |= {t["metadata"]["name"] for t in obj.get("spec", {}).get("volumeClaimTemplates") or []}
                for c in pss.containers(spec):
                    for mount in c.get("volumeMounts") or []:
                        if mount["name"] not in volumes:
                            failures.add("invariants", where, f"container {c['name']} mounts {mount['name']}, which is no volume of the pod")
                        if mount.get("subPath") and ours:
                            failures.add("invariants", where, f"container {c['name']} mounts {mount['name']} with subPath (a rotated Secret would not reach it)")
                text = json.dumps(spec)
                if "failure-domain.beta.kubernetes.io" in text:
                    failures.add("invariants", where, "uses the deprecated failure-domain.beta.kubernetes.io labels")
            if obj["kind"] == "ServiceAccount" and obj.get("automountServiceAccountToken") is not False:
                failures.add("invariants", where, "automountServiceAccountToken is not false")
            if obj["kind"] != "Deployment" or obj["metadata"]["name"] not in SHOAL:
                continue
            spec = obj["spec"]
            template = spec["template"]["spec"]
            strategy = spec.get("strategy") or {}
            rolling = strategy.get("rollingUpdate") or {}
            if strategy.get("type") != "RollingUpdate" or rolling.get("maxUnavailable") != 0 or rolling.get("maxSurge") != 1:
                failures.add("invariants", where, f"strategy {strategy} is not RollingUpdate maxSurge 1 maxUnavailable 0")
            if template.get("automountServiceAccountToken") is not False:
                failures.add("invariants", where, "the pod mounts a service account token")
            keys = {(t["topologyKey"], tuple(t.get("matchLabelKeys") or ())) for t in template.get("topologySpreadConstraints") or []}
            for key in ("topology.kubernetes.io/zone", "kubernetes.io/hostname"):
                if (key, ("pod-template-hash",)) not in keys:
                    failures.add("invariants", where, f"no topology spread over {key} with matchLabelKeys [pod-template-hash]")
            (container,) = [c for c in template["containers"] if c["name"] == obj["metadata"]["name"]]
            env = container_env(container, configmaps)
            pre_stop = ((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds")
            if pre_stop is None:
                failures.add("invariants", where, "no native preStop sleep")
                pre_stop = 0
            drain = seconds(env.get("SHOAL_DRAIN_DELAY", "0s"))
            grace = seconds(env.get("SHOAL_SHUTDOWN_GRACE", "25s"))
            period = template.get("terminationGracePeriodSeconds", 30)
            if period < pre_stop + drain + grace + GRACE_MARGIN_SECONDS:
                failures.add(
                    "invariants",
                    where,
                    f"terminationGracePeriodSeconds {period} < preStop {pre_stop} + drain {drain:g} + grace {grace:g} + margin {GRACE_MARGIN_SECONDS}",
                )
        # Services: the gateway balances over the worker's and the
        # aggregator's pod addresses, so those Services are headless.
        for obj in docs:
            if obj["kind"] == "Service" and obj["metadata"]["name"] in ("worker", "metrics-aggregator"):
                if obj["spec"].get("clusterIP") != "None":
                    failures.add("invariants", f"{target} {name(obj)}", "not headless")
        autoscalers(target, docs, deployments, failures)
        keda_trigger_matches_the_worker(target, docs, deployments, configmaps, failures)
        for obj in docs:
            if obj["kind"] != "ConfigMap":
                continue
            for key, text in (obj.get("data") or {}).items():
                try:
                    if key.endswith((".yml", ".yaml")):
                        yaml.safe_load(text)
                    elif key.endswith(".json"):
                        json.loads(text)
                except (yaml.YAMLError, ValueError) as error:
                    failures.add("invariants", f"{target} {name(obj)}", f"{key} does not parse: {error}")
    missing = {"overlays/dev", "overlays/staging", "overlays/prod"} - overlays
    for target in sorted(missing):
        failures.add("invariants", target, "overlay missing")
    return f"{len(rendered)} renders"


def rust_format(template: str, *args: str) -> str:
    """A Rust format string with `{}` placeholders and `{{`/`}}` escapes, filled."""
    out, rest, i = [], list(args), 0
    while i < len(template):
        two = template[i : i + 2]
        if two in ("{{", "}}"):
            out.append(two[0])
            i += 2
        elif two == "{}":
            out.append(rest.pop(0))
            i += 2
        else:
            out.append(template[i])
            i += 1
    return "".join(out)


def worker_stream_and_group(prefix: str) -> tuple[str, str]:
    """(the job stream's key for `prefix`, the consumer group), read from the
    worker's source: every key is under the hash tag `{prefix}`."""
    source = (ROOT / "crates/worker/src/jobs/keys.rs").read_text()
    (group,) = re.findall(r'const GROUP: &\'static str = "([^"]+)"', source)
    (base,) = re.findall(r'fn new\(prefix: impl AsRef<str>\) -> Self \{\s*Self \{ base: format!\("([^"]*)", prefix\.as_ref\(\)\) \}', source)
    (stream,) = re.findall(r'fn stream\(&self\) -> String \{\s*format!\("([^"]*)", self\.base\)', source)
    return rust_format(stream, rust_format(base, prefix)), group


def keda_trigger_matches_the_worker(target, docs, deployments, configmaps, failures) -> None:
    """The redis-streams trigger reads the worker's own stream and group,
    and its lagCount is the worker's job slots."""
    for obj in docs:
        if obj["kind"] != "ScaledObject" or obj["spec"]["scaleTargetRef"]["name"] not in deployments:
            continue
        deployment = deployments[obj["spec"]["scaleTargetRef"]["name"]]
        (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "worker"] or [None]
        if container is None:
            continue
        env = container_env(container, configmaps)
        for trigger in obj["spec"]["triggers"]:
            if trigger["type"] != "redis-streams":
                continue
            meta, where = trigger["metadata"], f"{target} {name(obj)}"
            stream, group = worker_stream_and_group(env.get("SHOAL_WORKER_REDIS_PREFIX", "shoal"))
            if meta.get("stream") != stream:
                failures.add("invariants", where, f"stream {meta.get('stream')!r}, the worker's is {stream!r}")
            if meta.get("consumerGroup") != group:
                failures.add("invariants", where, f"consumerGroup {meta.get('consumerGroup')!r}, the worker's is {group!r}")
            if meta.get("lagCount") != env.get("SHOAL_WORKER_JOB_SLOTS", "16"):
                failures.add("invariants", where, f"lagCount {meta.get('lagCount')} is not the worker's job slots {env.get('SHOAL_WORKER_JOB_SLOTS', '16')}")


def autoscalers(target: str, docs: list[dict], deployments: dict[str, dict], failures: Failures) -> None:
    owners: dict[str, list[str]] = {}
    expected = {"HorizontalPodAutoscaler": "gateway", "ScaledObject": "worker"}
    for obj in docs:
        if obj["kind"] not in expected:
            continue
        ref = obj["spec"]["scaleTargetRef"]
        where = f"{target} {name(obj)}"
        if ref.get("kind", "Deployment") != "Deployment" or ref["name"] not in deployments:
            failures.add("invariants", where, f"targets {ref}, which is not a rendered Deployment")
            continue
        if ref["name"] != expected[obj["kind"]]:
            failures.add("invariants", where, f"targets {ref['name']}, expected {expected[obj['kind']]}")
        owners.setdefault(ref["name"], []).append(name(obj))
        if obj["kind"] == "ScaledObject":
            keda_name = obj["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("name", f"keda-hpa-{obj['metadata']['name']}")
            if any(o["kind"] == "HorizontalPodAutoscaler" and o["metadata"]["name"] == keda_name for o in docs):
                failures.add("invariants", where, f"KEDA's HPA name {keda_name} collides with a rendered HPA")
    for deployment, scalers in owners.items():
        if len(scalers) > 1:
            failures.add("invariants", f"{target} Deployment/{deployment}", f"has {len(scalers)} autoscalers: {scalers}")
        if "replicas" in deployments[deployment]["spec"]:
            failures.add("invariants", f"{target} Deployment/{deployment}", "sets spec.replicas although an autoscaler owns the count")


# --- netpol ---------------------------------------------------------------------


def endpoints(docs: list[dict]) -> dict[str, netpol.Endpoint]:
    found: dict[str, netpol.Endpoint] = {}
    namespaces = {o["metadata"]["name"]: o["metadata"].get("labels") or {} for o in docs if o["kind"] == "Namespace"}
    for obj in docs:
        template = pss.pod_template(obj)
        if template is None:
            continue
        spec, meta = template
        namespace = obj["metadata"]["namespace"]
        labels = dict(meta.get("labels") or {})
        ports = {p["name"]: (p["containerPort"], p.get("protocol", "TCP")) for c in spec["containers"] for p in c.get("ports") or [] if "name" in p}
        ns_labels = {**namespaces.get(namespace, {}), "kubernetes.io/metadata.name": namespace}
        found[labels.get("app.kubernetes.io/name", obj["metadata"]["name"])] = netpol.Endpoint(obj["metadata"]["name"], namespace, labels, ns_labels, ports)
    def other(ns, labels, name_):
        return netpol.Endpoint(name_, ns, labels, {"kubernetes.io/metadata.name": ns})
    found["kube-dns"] = other("kube-system", {"k8s-app": "kube-dns"}, "kube-dns")
    found["prometheus"] = other("monitoring", {"app.kubernetes.io/name": "prometheus"}, "prometheus")
    found["keda-operator"] = other("keda", {"app": "keda-operator"}, "keda-operator")
    found["ingress-controller"] = other("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}, "ingress-controller")
    found["other-namespace-pod"] = other("elsewhere", {"app.kubernetes.io/name": "gateway"}, "impostor")
    found["internet"] = netpol.Endpoint("internet", ip="203.0.113.10")
    found["managed-redis"] = netpol.Endpoint("managed-redis", ip="10.20.30.40")
    found["elasticsearch"] = netpol.Endpoint("elasticsearch", ip="10.20.30.50")
    return found


def network_policies(rendered: dict[str, list[dict]], failures: Failures) -> str:
    flows = 0
    for target, docs in rendered.items():
        policies = [o for o in docs if o["kind"] == "NetworkPolicy"]
        if not policies:
            continue
        e = endpoints(docs)
        if not any(p["metadata"]["name"] == "default-deny" for p in policies):
            # Only components/logging's own policy: Shoal's pods are not isolated.
            e = {k: v for k, v in e.items() if k not in SHOAL | {"redis"}}
        in_cluster_redis = "redis" in e and e["redis"].namespace is not None
        redis = "redis" if in_cluster_redis else "managed-redis"
        allow = [
            ("internet", "gateway", 8080, "TCP"),
            ("ingress-controller", "gateway", 8080, "TCP"),
            ("gateway", "worker", 50051, "TCP"),
            ("gateway", "metrics-aggregator", 50052, "TCP"),
            ("worker", "metrics-aggregator", 50052, "TCP"),
            ("worker", redis, 6379, "TCP"),
            ("metrics-aggregator", redis, 6379, "TCP"),
            ("prometheus", "gateway", 9090, "TCP"),
            ("prometheus", "worker", 9091, "TCP"),
            ("prometheus", "metrics-aggregator", 9092, "TCP"),
        ]
        if in_cluster_redis:
            allow.append(("keda-operator", "redis", 6379, "TCP"))
        deny = [
            ("gateway", redis, 6379, "TCP"),
            ("gateway", "redis", 6379, "TCP"),
            ("gateway", "managed-redis", 6379, "TCP"),
            ("internet", "worker", 50051, "TCP"),
            ("internet", "metrics-aggregator", 50052, "TCP"),
            ("internet", "redis", 6379, "TCP"),
            ("ingress-controller", "worker", 50051, "TCP"),
            ("prometheus", "worker", 50051, "TCP"),
            ("worker", "worker", 50051, "TCP"),
            ("metrics-aggregator", "worker", 50051, "TCP"),
            ("other-namespace-pod", "worker", 50051, "TCP"),
            ("other-namespace-pod", "metrics-aggregator", 50052, "TCP"),
            ("gateway", "gateway", 9090, "TCP"),
            ("worker", "internet", 443, "TCP"),
            ("gateway", "internet", 443, "TCP"),
            ("metrics-aggregator", "internet", 443, "TCP"),
            ("worker", "kube-dns", 8080, "TCP"),
        ]
        for service, port in (("gateway", 9090), ("worker", 9091), ("metrics-aggregator", 9092)):
            for source in ("internet", "ingress-controller", "other-namespace-pod", "gateway", "worker"):
                deny.append((source, service, port, "TCP"))
        if in_cluster_redis:
            deny += [("redis", "internet", 443, "TCP"), ("keda-operator", "worker", 50051, "TCP")]
        if "filebeat" in e:
            allow.append(("filebeat", "elasticsearch", 9200, "TCP"))
            allow.append(("filebeat", "kube-dns", 53, "UDP"))
            deny += [("internet", "filebeat", 5066, "TCP"), ("gateway", "filebeat", 5066, "TCP"), ("filebeat", "worker", 50051, "TCP")]
        for pod in SHOAL | ({"redis"} if in_cluster_redis else set()):
            allow += [(pod, "kube-dns", 53, "UDP"), (pod, "kube-dns", 53, "TCP")]
        for expected, cases in ((True, allow), (False, deny)):
            for source, destination, port, protocol in cases:
                if source not in e or destination not in e:
                    continue
                flows += 1
                got = netpol.allowed(policies, e[source], e[destination], port, protocol)
                if got != expected:
                    verdict = "allowed" if got else "denied"
                    failures.add("netpol", target, f"{source} -> {destination}:{port}/{protocol} is {verdict}")
    return f"{flows} flows"


# --- checkov --------------------------------------------------------------------


def checkov(files: list[pathlib.Path], failures: Failures) -> str:
    skips = yaml.safe_load((K8S / "tests/checkov-skips.yaml").read_text())
    for check, entry in skips.items():
        if not (entry or {}).get("why") or "resources" not in entry:
            failures.add("checkov", "checkov-skips.yaml", f"{check} needs `resources` and `why`")
    command = [
        str(ROOT / ".venv/bin/checkov"), "--framework", "kubernetes", "--directory", str(files[0].parent),
        "--output", "json", "--quiet", "--compact", "--skip-download",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    try:
        reports = json.loads(result.stdout)
    except json.JSONDecodeError:
        failures.add("checkov", "run", f"no JSON report (exit {result.returncode}): {result.stderr[-2000:]}")
        return "failed to run"
    reports = reports if isinstance(reports, list) else [reports]
    passed = failed = skipped = 0
    used: set[str] = set()
    for report in reports:
        passed += report.get("summary", {}).get("passed", 0)
        for check in report.get("results", {}).get("failed_checks", []):
            kind, _namespace, resource = (check["resource"].split(".", 2) + ["", ""])[:3]
            entry = skips.get(check["check_id"]) or {}
            scope = entry.get("resources", [])
            if scope == "*" or f"{kind}/{resource}" in scope:
                skipped += 1
                used.add(check["check_id"])
                continue
            failed += 1
            where = f"{pathlib.Path(check['file_path']).name} {check['resource']}"
            failures.add("checkov", where, f"{check['check_id']} {check['check_name']}")
    for stale in sorted(set(skips) - used):
        failures.add("checkov", "checkov-skips.yaml", f"{stale} matches no failure any more: remove it")
    return f"{passed} passed, {failed} failed, {skipped} skipped ({len(skips)} checks, justified)"


# --- main -------------------------------------------------------------------------


SECTIONS = ["generated", "validate", "pss", "invariants", "netpol", "checkov", "contract"]


def main() -> int:
    parser = argparse.ArgumentParser(description="Offline checks of deploy/k8s.")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, default=SECTIONS)
    parser.add_argument("--keep", type=pathlib.Path, help="write the rendered manifests here")
    args = parser.parse_args()
    failures = Failures()
    with tempfile.TemporaryDirectory(prefix="shoal-k8s-") as tmp:
        out = args.keep or pathlib.Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        from concurrent.futures import ThreadPoolExecutor

        paths = {label(t): out / (label(t).replace("/", "--") + ".yaml") for t in targets()}
        with ThreadPoolExecutor(max_workers=4) as pool:
            docs = pool.map(lambda t: render(t, paths[label(t)]), targets())
            rendered = dict(zip(paths, docs))
        files = list(paths.values())
        print(f"== render: {len(rendered)} targets ({', '.join(rendered)}) in {time.monotonic() - started:.1f} s")
        for section in args.only:
            started = time.monotonic()
            before = len(failures.items)
            if section == "generated":
                code = subprocess.run([sys.executable, str(ROOT / "scripts/k8s/generate.py"), "--check"]).returncode
                summary = "up to date" if code == 0 else "stale"
                if code:
                    failures.add("generated", "deploy/k8s/components/monitoring/generated", "stale")
            elif section == "validate":
                summary = validate(rendered, failures)
            elif section == "pss":
                summary = pod_security(rendered, failures)
            elif section == "invariants":
                summary = invariants(rendered, failures)
            elif section == "netpol":
                summary = network_policies(rendered, failures)
            elif section == "checkov":
                summary = checkov(files, failures)
            else:
                import contract

                summary = contract.run(rendered, failures)
            status = "ok" if len(failures.items) == before else f"{len(failures.items) - before} FAILED"
            print(f"== {section}: {summary}: {status} ({time.monotonic() - started:.1f} s)")
    for item in failures.items:
        print(item, file=sys.stderr)
    return 1 if failures.items else 0


if __name__ == "__main__":
    sys.exit(main())
