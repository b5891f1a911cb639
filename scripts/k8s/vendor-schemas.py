"""Vendors the CRD schemas scripts/check-k8s validates against, and KEDA's
scaler metadata keys, from pinned releases of the upstream repositories:
only the CRDs and versions the manifests use, only each version's
openAPIV3Schema without its descriptions, minified JSON (deploy/k8s/tests/schemas/).

    python3 scripts/k8s/vendor-schemas.py --keda ~/src/keda \\
        --prometheus-operator ~/src/prometheus-operator --gateway-api ~/src/gateway-api \\
        --cert-manager ~/src/cert-manager

Each path is a git clone (or bare repository); the files are read at the
pinned tags below with `git show`, so the result does not depend on what
is checked out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess

import yaml

OUT = pathlib.Path(__file__).resolve().parents[2] / "deploy/k8s/tests/schemas"
KEDA_TAG = "v2.20.2"
PROMETHEUS_OPERATOR_TAG = "v0.93.0"
GATEWAY_API_TAG = "v1.6.1"
CERT_MANAGER_TAG = "v1.21.1"

# (repository option, tag, path in the repository, served version used)
CRDS = [
    ("keda", KEDA_TAG, "config/crd/bases/keda.sh_scaledobjects.yaml", "v1alpha1"),
    ("keda", KEDA_TAG, "config/crd/bases/keda.sh_triggerauthentications.yaml", "v1alpha1"),
    ("prometheus_operator", PROMETHEUS_OPERATOR_TAG, "example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml", "v1"),
    ("prometheus_operator", PROMETHEUS_OPERATOR_TAG, "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml", "v1"),
    ("gateway_api", GATEWAY_API_TAG, "config/crd/standard/gateway.networking.k8s.io_httproutes.yaml", "v1"),
    ("cert_manager", CERT_MANAGER_TAG, "deploy/crds/cert-manager.io_certificates.yaml", "v1"),
    ("cert_manager", CERT_MANAGER_TAG, "deploy/crds/cert-manager.io_issuers.yaml", "v1"),
]
# KEDA's scalers declare their metadata as struct tags:
#   `keda:"name=lagCount, order=triggerMetadata, optional"`
KEDA_SCALERS = {
    "redis-streams": ["pkg/scalers/redis_streams_scaler.go", "pkg/scalers/redis_scaler.go"],
    "cpu": ["pkg/scalers/cpu_memory_scaler.go"],
}
TAG = re.compile(r'keda:"name=([^,"]+),\s*order=([^,"]+)')


def show(repo: str, tag: str, path: str) -> str:
    return subprocess.run(["git", "-C", repo, "show", f"{tag}:{path}"], check=True, capture_output=True, text=True).stdout


def scaler_keys(repo: str, files: list[str]) -> dict[str, list[str]]:
    keys: dict[str, set[str]] = {}
    for path in files:
        source = show(repo, KEDA_TAG, path)
        if path.endswith("redis_scaler.go"):
            # Only the connection info the streams scaler embeds.
            source = source[source.index("type redisConnectionInfo struct") :]
            source = source[: source.index("\n}")]
        for names, orders in TAG.findall(source):
            for order in orders.split(";"):
                keys.setdefault(order.strip(), set()).update(n.strip() for n in names.split(";"))
    return {order: sorted(names) for order, names in sorted(keys.items())}


def without_descriptions(schema):
    """The schema less its prose (validation ignores it; it is most of the size)."""
    if isinstance(schema, dict):
        return {k: without_descriptions(v) for k, v in schema.items() if k != "description" or not isinstance(v, str)}
    if isinstance(schema, list):
        return [without_descriptions(v) for v in schema]
    return schema


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keda", required=True)
    parser.add_argument("--prometheus-operator", required=True)
    parser.add_argument("--gateway-api", required=True)
    parser.add_argument("--cert-manager", required=True)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    index = {}
    for option, tag, path, version in CRDS:
        crd = yaml.safe_load(show(getattr(args, option), tag, path))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
        name = f"{kind.lower()}-{group}-{version}.json"
        (OUT / name).write_text(json.dumps(without_descriptions(served["schema"]["openAPIV3Schema"]), separators=(",", ":"), sort_keys=True) + "\n")
        index[f"{group}/{version}/{kind}"] = {"file": name, "source": f"{option.replace('_', '-')} {tag} {path}"}
    keda = {scaler: scaler_keys(args.keda, files) for scaler, files in KEDA_SCALERS.items()}
    (OUT / "keda-scaler-metadata.json").write_text(
        json.dumps({"source": f"kedacore/keda {KEDA_TAG} " + " ".join(sum(KEDA_SCALERS.values(), [])), "scalers": keda}, indent=1, sort_keys=True) + "\n"
    )
    (OUT / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
