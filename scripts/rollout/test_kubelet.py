"""Offline tests of the Docker kubelet's translation of a pod template
(no Docker needed): `.venv/bin/python -m unittest discover -s scripts/rollout`."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import unittest

import kubelet
from common import HarnessError
from kubelet import Cluster, Manifests, PodSpecError, secret, startup_budget, workload_pod

TEMPLATE = """
apiVersion: v1
kind: ConfigMap
metadata: {name: worker-config}
data: {SHOAL_WORKER_GRPC_ADDR: "0.0.0.0:50051", RUST_LOG: info}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: worker}
spec:
  template:
    metadata: {labels: {app.kubernetes.io/name: worker}}
    spec:
      terminationGracePeriodSeconds: 45
      securityContext: {runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532, fsGroup: 65532}
      volumes:
        - name: redis-url
          secret: {secretName: shoal-redis-worker, defaultMode: 0440}
        - name: tmp
          emptyDir: {medium: Memory}
      containers:
        - name: worker
          image: registry.example/shoal/shoal-worker:abc123
          args: ["--worker-id", "$(SHOAL_WORKER_ID)"]
          envFrom: [{configMapRef: {name: worker-config}}]
          env:
            - {name: SHOAL_WORKER_ID, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
            - {name: PASSWORD, valueFrom: {secretKeyRef: {name: shoal-redis-worker, key: url}}}
          volumeMounts:
            - {name: redis-url, mountPath: /run/secrets/shoal/redis, readOnly: true}
            - {name: tmp, mountPath: /tmp}
          ports: [{name: grpc, containerPort: 50051}, {name: admin, containerPort: 9091}]
          resources: {requests: {cpu: 250m, memory: 32Mi}, limits: {cpu: "1", memory: 128Mi}}
          startupProbe: {httpGet: {path: /healthz, port: admin}, periodSeconds: 1, failureThreshold: 30}
          readinessProbe: {grpc: {port: 50051, service: shoal.worker.v1.WorkerService}, periodSeconds: 2}
          securityContext:
            readOnlyRootFilesystem: true
            allowPrivilegeEscalation: false
            capabilities: {drop: [ALL]}
"""


class TranslationTest(unittest.TestCase):
    def setUp(self) -> None:
        kubelet._image_users["shoal-harness-worker:t"] = "65532:65532"
        self.workdir = tempfile.mkdtemp(prefix="shoal-harness-test-")
        self.manifests = Manifests.load(TEMPLATE)
        self.manifests.add([secret("shoal-redis-worker", None, {"url": "redis://worker:pw@redis:6379/0\n"})])
        self.cluster = Cluster("t", "net", "shoal-dev", self.workdir, self.manifests,
                               {"shoal-worker": "shoal-harness-worker:t"})

    def tearDown(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def pod(self):
        return workload_pod(self.cluster, self.manifests.get("Deployment", "worker"), 0)

    def test_a_restricted_pod_becomes_a_locked_down_container(self) -> None:
        pod = self.pod()
        args, env = pod.docker_run_args()
        joined = " ".join(args)
        for expected in ("--user 65532:65532", "--group-add 65532", "--read-only", "--security-opt no-new-privileges",
                         "--cap-drop ALL", "--cpus 1", f"--memory {128 * 2**20}", "--cpu-shares 256", "--pull never"):
            self.assertIn(expected, joined)
        self.assertEqual(args[-3:], ["shoal-harness-worker:t", "--worker-id", pod.name])
        self.assertIn("type=tmpfs,destination=/tmp", joined)
        self.assertEqual(env["SHOAL_WORKER_GRPC_ADDR"], "0.0.0.0:50051")
        self.assertEqual(env["PASSWORD"], "redis://worker:pw@redis:6379/0\n")
        self.assertNotIn("redis://", joined, "secret values never go on the command line")
        url = os.path.join(self.workdir, "volumes", pod.name, "redis-url", "url")
        info = os.stat(url)
        self.assertEqual((stat.S_IMODE(info.st_mode), info.st_gid), (0o440, 65532))
        self.assertEqual({k: p.action for k, p in pod.probes.items()}, {"startup": "http", "readiness": "grpc"})
        self.assertEqual(pod.probes["startup"].port, 9091, "a named port resolves to the container port")
        self.assertEqual(startup_budget(pod), 1 + 30 + 2 + 1)

    def test_a_missing_secret_or_key_fails_the_pod(self) -> None:
        self.manifests.objects = [o for o in self.manifests.objects if o["kind"] != "Secret"]
        with self.assertRaises(PodSpecError):
            self.pod().docker_run_args()
        self.manifests.add([secret("shoal-redis-worker", None, {"other": "x"})])
        with self.assertRaises(PodSpecError):
            self.pod().docker_run_args()

    def test_run_as_non_root_with_a_root_image_is_refused(self) -> None:
        template = self.manifests.get("Deployment", "worker")["spec"]["template"]["spec"]
        del template["securityContext"]["runAsUser"]
        kubelet._image_users["shoal-harness-worker:t"] = "0"
        with self.assertRaises(HarnessError):
            self.pod().docker_run_args()

    def test_exec_probes_are_refused_not_ignored(self) -> None:
        container = self.manifests.get("Deployment", "worker")["spec"]["template"]["spec"]["containers"][0]
        container["livenessProbe"] = {"exec": {"command": ["true"]}}
        with self.assertRaises(PodSpecError):
            self.pod()


if __name__ == "__main__":
    unittest.main()
