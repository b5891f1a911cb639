"""Each Pod Security control of pss.py, broken once on an otherwise
compliant pod: exactly that control must report it (and a compliant pod
reports nothing). Run: python3 -m unittest discover -s scripts/k8s"""

from __future__ import annotations

import copy
import unittest

import pss


def compliant() -> tuple[dict, dict]:
    spec = {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
            "sysctls": [{"name": "net.ipv4.ip_local_port_range", "value": "1024 65535"}],
        },
        "volumes": [{"name": "config", "configMap": {"name": "x"}}, {"name": "tmp", "emptyDir": {}}],
        "initContainers": [{"name": "init", "securityContext": _container_context()}],
        "containers": [
            {"name": "app", "ports": [{"containerPort": 8080}], "securityContext": _container_context()}
        ],
    }
    return spec, {"annotations": {pss.APPARMOR_ANNOTATION + "app": "runtime/default"}}


def _container_context() -> dict:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
        "seLinuxOptions": {"type": "container_t"},
        "appArmorProfile": {"type": "RuntimeDefault"},
        "procMount": "Default",
    }


def app(spec: dict) -> dict:
    return spec["containers"][0]


def app_ctx(spec: dict) -> dict:
    return app(spec)["securityContext"]


# (control, how to break it, levels that must report it). Three restricted
# controls tighten a baseline one, so breaking the baseline control breaks
# them too: ALSO_RESTRICTED lists those pairs.
ALSO_RESTRICTED = {
    "Capabilities (baseline)": "Capabilities (restricted)",
    "HostPath Volumes": "Volume Types",
    "Seccomp (baseline)": "Seccomp (restricted)",
}
BREAKS = [
    ("HostProcess", lambda s, m: app_ctx(s).update(windowsOptions={"hostProcess": True}), ("baseline", "restricted")),
    ("Host Namespaces", lambda s, m: s.update(hostNetwork=True), ("baseline", "restricted")),
    ("Host Namespaces", lambda s, m: s.update(hostPID=True), ("baseline", "restricted")),
    ("Host Namespaces", lambda s, m: s.update(hostIPC=True), ("baseline", "restricted")),
    ("Privileged Containers", lambda s, m: s["initContainers"][0]["securityContext"].update(privileged=True), ("baseline", "restricted")),
    ("Capabilities (baseline)", lambda s, m: app_ctx(s)["capabilities"].update(add=["SYS_ADMIN"]), ("baseline", "restricted")),
    ("HostPath Volumes", lambda s, m: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), ("baseline", "restricted")),
    ("Host Ports", lambda s, m: app(s)["ports"][0].update(hostPort=8080), ("baseline", "restricted")),
    ("AppArmor", lambda s, m: m["annotations"].update({pss.APPARMOR_ANNOTATION + "app": "unconfined"}), ("baseline", "restricted")),
    ("AppArmor", lambda s, m: app_ctx(s).update(appArmorProfile={"type": "Unconfined"}), ("baseline", "restricted")),
    ("SELinux", lambda s, m: app_ctx(s).update(seLinuxOptions={"type": "spc_t"}), ("baseline", "restricted")),
    ("SELinux", lambda s, m: s["securityContext"].update(seLinuxOptions={"user": "root"}), ("baseline", "restricted")),
    ("/proc Mount Type", lambda s, m: app_ctx(s).update(procMount="Unmasked"), ("baseline", "restricted")),
    ("Seccomp (baseline)", lambda s, m: app_ctx(s).update(seccompProfile={"type": "Unconfined"}), ("baseline", "restricted")),
    ("Sysctls", lambda s, m: s["securityContext"]["sysctls"].append({"name": "kernel.msgmax", "value": "1"}), ("baseline", "restricted")),
    ("Volume Types", lambda s, m: s["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}}), ("restricted",)),
    ("Privilege Escalation", lambda s, m: app_ctx(s).pop("allowPrivilegeEscalation"), ("restricted",)),
    ("Privilege Escalation", lambda s, m: app_ctx(s).update(allowPrivilegeEscalation=True), ("restricted",)),
    ("Running as Non-root", lambda s, m: s["securityContext"].pop("runAsNonRoot"), ("restricted",)),
    ("Running as Non-root", lambda s, m: app_ctx(s).update(runAsNonRoot=False), ("restricted",)),
    ("Running as Non-root user", lambda s, m: app_ctx(s).update(runAsUser=0), ("restricted",)),
    ("Running as Non-root user", lambda s, m: s["securityContext"].update(runAsUser=0), ("restricted",)),
    ("Seccomp (restricted)", lambda s, m: s["securityContext"].pop("seccompProfile"), ("restricted",)),
    ("Capabilities (restricted)", lambda s, m: app_ctx(s)["capabilities"].update(drop=["NET_RAW"]), ("restricted",)),
    ("Capabilities (restricted)", lambda s, m: app_ctx(s)["capabilities"].update(add=["CHOWN"]), ("restricted",)),
]


def reported(spec: dict, meta: dict, level: str) -> set[str]:
    return {v.split(": ", 1)[0] for v in pss.violations(spec, meta, level)}


class PodSecurity(unittest.TestCase):
    def test_compliant_pod_passes_every_level(self) -> None:
        spec, meta = compliant()
        for level in pss.LEVELS:
            self.assertEqual(pss.violations(spec, meta, level), [], level)

    def test_each_control_is_broken_once_and_caught(self) -> None:
        for control, breaks, levels in BREAKS:
            with self.subTest(control=control):
                spec, meta = copy.deepcopy(compliant())
                breaks(spec, meta)
                for level in ("baseline", "restricted"):
                    expected = {control} if level in levels else set()
                    if level == "restricted" and control in ALSO_RESTRICTED:
                        expected.add(ALSO_RESTRICTED[control])
                    self.assertEqual(reported(spec, meta, level), expected, level)
                self.assertEqual(pss.violations(spec, meta, "privileged"), [])

    def test_every_control_has_a_break(self) -> None:
        self.assertEqual({c for c, _, _ in BREAKS}, set(pss.RESTRICTED))

    def test_container_settings_may_replace_pod_settings(self) -> None:
        spec, meta = compliant()
        spec["securityContext"] = {}
        for c in pss.containers(spec):
            c["securityContext"].update(runAsNonRoot=True, seccompProfile={"type": "Localhost", "localhostProfile": "p"})
        self.assertEqual(pss.violations(spec, meta, "restricted"), [])

    def test_pod_templates_of_workload_kinds(self) -> None:
        spec, meta = compliant()
        template = {"metadata": meta, "spec": spec}
        self.assertEqual(pss.pod_template({"kind": "Deployment", "spec": {"template": template}}), (spec, meta))
        cron = {"kind": "CronJob", "spec": {"jobTemplate": {"spec": {"template": template}}}}
        self.assertEqual(pss.pod_template(cron), (spec, meta))
        self.assertIsNone(pss.pod_template({"kind": "Service", "spec": {}}))


if __name__ == "__main__":
    unittest.main()
