"""Unit tests of check.py's own rules: each is broken once on a small
rendered set and must report it."""

from __future__ import annotations

import copy
import unittest

import check


def deployment(name: str, **spec) -> dict:
    container = {
        "name": name,
        "image": f"shoal-{name}:" + "a" * 40,
        "envFrom": [{"configMapRef": {"name": f"{name}-config"}}],
        "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
        "startupProbe": {}, "readinessProbe": {}, "livenessProbe": {},
        "resources": {"requests": {"cpu": "1", "memory": "1Mi"}, "limits": {"cpu": "1", "memory": "1Mi"}},
    }
    spread = [
        {"topologyKey": key, "matchLabelKeys": ["pod-template-hash"]}
        for key in ("topology.kubernetes.io/zone", "kubernetes.io/hostname")
    ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/part-of": "shoal"}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 45,
                    "topologySpreadConstraints": spread,
                    "containers": [container],
                },
            },
            **spec,
        },
    }


def config(name: str, **data) -> dict:
    return {"kind": "ConfigMap", "metadata": {"name": f"{name}-config"}, "data": {"SHOAL_DRAIN_DELAY": "5s", "SHOAL_SHUTDOWN_GRACE": "25s", **data}}


def scaler(kind: str, target: str, name: str = "s") -> dict:
    return {"kind": kind, "metadata": {"name": name}, "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target}, "triggers": []}}


def rendered() -> dict:
    docs = [deployment("gateway"), config("gateway"), deployment("worker"), config("worker")]
    docs += [scaler("HorizontalPodAutoscaler", "gateway"), scaler("ScaledObject", "worker")]
    return {"overlays/dev": docs, "overlays/staging": [], "overlays/prod": []}


def messages(docs: dict) -> list[str]:
    failures = check.Failures()
    check.invariants(docs, failures)
    return failures.items


class Invariants(unittest.TestCase):
    def test_the_sample_passes(self) -> None:
        self.assertEqual(messages(rendered()), [])

    def test_grace_inequality(self) -> None:
        docs = rendered()
        docs["overlays/dev"][0]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 39
        self.assertTrue(any("terminationGracePeriodSeconds 39 < preStop 5 + drain 5 + grace 25 + margin 5" in m for m in messages(docs)))
        docs = rendered()
        docs["overlays/dev"][1]["data"]["SHOAL_SHUTDOWN_GRACE"] = "31s"
        self.assertTrue(any("terminationGracePeriodSeconds 45" in m for m in messages(docs)))

    def test_rollout_strategy_and_latest_images(self) -> None:
        docs = rendered()
        docs["overlays/dev"][0]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] = 1
        docs["overlays/dev"][2]["spec"]["template"]["spec"]["containers"][0]["image"] = "shoal-worker:latest"
        found = messages(docs)
        self.assertTrue(any("maxUnavailable 0" in m for m in found), found)
        self.assertTrue(any("is :latest" in m for m in found), found)

    def test_deprecated_zone_label_and_missing_spread(self) -> None:
        docs = rendered()
        docs["overlays/dev"][0]["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["topologyKey"] = "failure-domain.beta.kubernetes.io/zone"
        found = messages(docs)
        self.assertTrue(any("deprecated" in m for m in found), found)
        self.assertTrue(any("no topology spread over topology.kubernetes.io/zone" in m for m in found), found)

    def test_autoscalers(self) -> None:
        docs = rendered()
        docs["overlays/dev"].append(scaler("HorizontalPodAutoscaler", "worker", "cpu"))
        self.assertTrue(any("has 2 autoscalers" in m for m in messages(docs)))
        docs = rendered()
        docs["overlays/dev"][4]["spec"]["scaleTargetRef"]["name"] = "worker-typo"
        self.assertTrue(any("not a rendered Deployment" in m for m in messages(docs)))
        docs = rendered()
        docs["overlays/dev"][2]["spec"]["replicas"] = 3
        self.assertTrue(any("sets spec.replicas" in m for m in messages(docs)))

    def test_mount_without_volume(self) -> None:
        docs = rendered()
        docs["overlays/dev"][0]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = [{"name": "x", "mountPath": "/x"}]
        self.assertTrue(any("mounts x, which is no volume" in m for m in messages(docs)))


class Schemas(unittest.TestCase):
    def test_strict_schema_rejects_unknown_fields_but_keeps_free_form_ones(self) -> None:
        import jsonschema

        schema = check.strict_schema({"type": "object", "properties": {"a": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}})
        validator = jsonschema.Draft7Validator(schema)
        self.assertTrue(validator.is_valid({"a": {"anything": 1}}))
        self.assertFalse(validator.is_valid({"b": 1}))

    def test_vendored_crds_catch_a_typo(self) -> None:
        failures = check.Failures()
        obj = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "x", "namespace": "ns"},
               "spec": {"selector": {}, "podMetricsEndpoints": [{"port": "admin", "intervall": "15s"}]}}
        check.validate({"t": [obj]}, failures)
        self.assertTrue(any("intervall" in m for m in failures.items), failures.items)

    def test_native_objects_catch_a_typo_in_every_version(self) -> None:
        failures = check.Failures()
        obj = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"clusterIp": "None"}}
        check.validate({"t": [obj]}, failures)
        self.assertEqual(len(failures.items), len(check.VERSIONS), failures.items)

    def test_keda_trigger_keys(self) -> None:
        failures = check.Failures()
        so = {"kind": "ScaledObject", "metadata": {"name": "w"}, "spec": {"triggers": [
            {"type": "redis-streams", "metadata": {"stream": "s", "consumerGroup": "g", "lagcount": "5"}, "authenticationRef": {"name": "a"}}]}}
        auth = {"kind": "TriggerAuthentication", "metadata": {"name": "a"}, "spec": {"secretTargetRef": [{"parameter": "passwd", "name": "s", "key": "k"}]}}
        check.keda_metadata({"t": [so, auth]}, failures)
        self.assertTrue(any("'lagcount'" in m for m in failures.items), failures.items)
        self.assertTrue(any("'passwd'" in m for m in failures.items), failures.items)


if __name__ == "__main__":
    unittest.main()


class Contract(unittest.TestCase):
    def test_file_variants_of_accepted_settings(self) -> None:
        import contract

        self.assertTrue(contract.is_accepted("SHOAL_WORKER_REDIS_URL_FILE", {"SHOAL_WORKER_REDIS_URL"}))
        self.assertTrue(contract.is_accepted("SHOAL_WORKER_REDIS_URL", {"SHOAL_WORKER_REDIS_URL"}))
        self.assertFalse(contract.is_accepted("SHOAL_WORKER_REDIS_URLS", {"SHOAL_WORKER_REDIS_URL"}))
        self.assertFalse(contract.is_accepted("SHOAL_WORKER_ID_FILE", {"SHOAL_WORKER_REDIS_URL"}))

    def test_addresses_are_remapped_onto_loopback(self) -> None:
        import contract

        group = contract.Group.__new__(contract.Group)
        group.remap = {("worker", 50051): 25101, ("worker", 9091): 25102, ("gateway", 9090): 25103}
        group.redis_port = 25100
        self.assertEqual(group.rewrite("0.0.0.0:9091"), "127.0.0.1:25102")
        self.assertEqual(group.rewrite("http://worker:50051"), "http://127.0.0.1:25101")
        self.assertEqual(group.rewrite("redis://worker:pw@redis:6379/0"), "redis://worker:pw@127.0.0.1:25100/0")
        self.assertEqual(group.rewrite("http://elsewhere:50051"), "http://elsewhere:50051")
        self.assertEqual(group.rewrite("http://metrics-aggregator:50052"), "http://metrics-aggregator:50052", "not a container port here")
