"""Pod Security Standards (https://kubernetes.io/docs/concepts/security/pod-security-standards/),
"baseline" and "restricted" at version "latest" (Kubernetes 1.30+), as the
admission controller applies them to a pod template: every control of both
profiles, each a function that returns its violations.

``violations(pod_spec, metadata, "restricted")`` -> ["control: detail", ...]
(restricted includes every baseline control).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

Spec = dict

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


def containers(spec: Spec) -> Iterator[dict]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        yield from spec.get(field) or []


def contexts(spec: Spec) -> Iterator[tuple[str, dict]]:
    """The pod's securityContext, then every container's (name, context)."""
    yield "pod", spec.get("securityContext") or {}
    for container in containers(spec):
        yield f"container {container.get('name')}", container.get("securityContext") or {}


# --- baseline -------------------------------------------------------------


def host_process(spec: Spec, _meta: dict) -> list[str]:
    return [
        f"{where}: windowsOptions.hostProcess"
        for where, ctx in contexts(spec)
        if (ctx.get("windowsOptions") or {}).get("hostProcess")
    ]


def host_namespaces(spec: Spec, _meta: dict) -> list[str]:
    return [field for field in ("hostNetwork", "hostPID", "hostIPC") if spec.get(field)]


def privileged(spec: Spec, _meta: dict) -> list[str]:
    return [where for where, ctx in contexts(spec) if where != "pod" and ctx.get("privileged")]


def baseline_capabilities(spec: Spec, _meta: dict) -> list[str]:
    return [
        f"container {c.get('name')} adds {cap}"
        for c in containers(spec)
        for cap in ((c.get("securityContext") or {}).get("capabilities") or {}).get("add") or []
        if cap not in BASELINE_CAPABILITIES
    ]


def host_path_volumes(spec: Spec, _meta: dict) -> list[str]:
    return [f"volume {v.get('name')}" for v in spec.get("volumes") or [] if "hostPath" in v]


def host_ports(spec: Spec, _meta: dict) -> list[str]:
    return [
        f"container {c.get('name')} hostPort {p['hostPort']}"
        for c in containers(spec)
        for p in c.get("ports") or []
        if p.get("hostPort")
    ]


def apparmor(spec: Spec, meta: dict) -> list[str]:
    found = [
        f"annotation {key}={value}"
        for key, value in (meta.get("annotations") or {}).items()
        if key.startswith(APPARMOR_ANNOTATION) and not (value == "runtime/default" or value.startswith("localhost/"))
    ]
    found += [
        f"{where}: appArmorProfile {ctx['appArmorProfile'].get('type')}"
        for where, ctx in contexts(spec)
        if "appArmorProfile" in ctx and ctx["appArmorProfile"].get("type") not in ("RuntimeDefault", "Localhost")
    ]
    return found


def selinux(spec: Spec, _meta: dict) -> list[str]:
    found = []
    for where, ctx in contexts(spec):
        options = ctx.get("seLinuxOptions") or {}
        if options.get("type", "") not in SELINUX_TYPES:
            found.append(f"{where}: seLinuxOptions.type {options['type']}")
        found += [f"{where}: seLinuxOptions.{key}" for key in ("user", "role") if options.get(key)]
    return found


def proc_mount(spec: Spec, _meta: dict) -> list[str]:
    return [
        f"{where}: procMount {ctx['procMount']}"
        for where, ctx in contexts(spec)
        if where != "pod" and ctx.get("procMount", "Default") != "Default"
    ]


def seccomp_baseline(spec: Spec, _meta: dict) -> list[str]:
    return [
        f"{where}: seccompProfile Unconfined"
        for where, ctx in contexts(spec)
        if (ctx.get("seccompProfile") or {}).get("type") == "Unconfined"
    ]


def sysctls(spec: Spec, _meta: dict) -> list[str]:
    return [
        f"sysctl {s.get('name')}"
        for s in (spec.get("securityContext") or {}).get("sysctls") or []
        if s.get("name") not in SAFE_SYSCTLS
    ]


# --- restricted -------------------------------------------------------------


def volume_types(spec: Spec, _meta: dict) -> list[str]:
    found = []
    for volume in spec.get("volumes") or []:
        kinds = [key for key in volume if key != "name"]
        found += [f"volume {volume.get('name')}: {kind}" for kind in kinds if kind not in RESTRICTED_VOLUMES]
    return found


def privilege_escalation(spec: Spec, _meta: dict) -> list[str]:
    return [
        f"container {c.get('name')}"
        for c in containers(spec)
        if (c.get("securityContext") or {}).get("allowPrivilegeEscalation") is not False
    ]


def run_as_non_root(spec: Spec, _meta: dict) -> list[str]:
    pod = (spec.get("securityContext") or {}).get("runAsNonRoot")
    found = ["pod: runAsNonRoot false"] if pod is False else []
    for c in containers(spec):
        own = (c.get("securityContext") or {}).get("runAsNonRoot")
        if own is False or (own is None and pod is not True):
            found.append(f"container {c.get('name')}: runAsNonRoot not true")
    return found


def run_as_user(spec: Spec, _meta: dict) -> list[str]:
    return [f"{where}: runAsUser 0" for where, ctx in contexts(spec) if ctx.get("runAsUser") == 0]


def seccomp_restricted(spec: Spec, _meta: dict) -> list[str]:
    allowed = ("RuntimeDefault", "Localhost")
    pod = ((spec.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
    found = [f"pod: seccompProfile {pod}"] if pod is not None and pod not in allowed else []
    for c in containers(spec):
        own = ((c.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
        if own is not None and own not in allowed:
            found.append(f"container {c.get('name')}: seccompProfile {own}")
        elif own is None and pod not in allowed:
            found.append(f"container {c.get('name')}: no seccompProfile (and none on the pod)")
    return found


def restricted_capabilities(spec: Spec, _meta: dict) -> list[str]:
    found = []
    for c in containers(spec):
        caps = (c.get("securityContext") or {}).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            found.append(f"container {c.get('name')}: does not drop ALL")
        found += [f"container {c.get('name')} adds {cap}" for cap in caps.get("add") or [] if cap != "NET_BIND_SERVICE"]
    return found


Control = Callable[[Spec, dict], list[str]]
BASELINE: dict[str, Control] = {
    "HostProcess": host_process,
    "Host Namespaces": host_namespaces,
    "Privileged Containers": privileged,
    "Capabilities (baseline)": baseline_capabilities,
    "HostPath Volumes": host_path_volumes,
    "Host Ports": host_ports,
    "AppArmor": apparmor,
    "SELinux": selinux,
    "/proc Mount Type": proc_mount,
    "Seccomp (baseline)": seccomp_baseline,
    "Sysctls": sysctls,
}
RESTRICTED: dict[str, Control] = {
    **BASELINE,
    "Volume Types": volume_types,
    "Privilege Escalation": privilege_escalation,
    "Running as Non-root": run_as_non_root,
    "Running as Non-root user": run_as_user,
    "Seccomp (restricted)": seccomp_restricted,
    "Capabilities (restricted)": restricted_capabilities,
}
LEVELS = {"privileged": {}, "baseline": BASELINE, "restricted": RESTRICTED}


def violations(spec: Spec, meta: dict, level: str) -> list[str]:
    """Every violation of ``level`` by a pod template's spec and metadata."""
    return [f"{name}: {detail}" for name, control in LEVELS[level].items() for detail in control(spec, meta)]


def pod_template(obj: dict) -> tuple[dict, dict] | None:
    """(spec, metadata) of the pod an object makes, if it makes pods."""
    kind = obj.get("kind")
    if kind == "Pod":
        return obj.get("spec") or {}, obj.get("metadata") or {}
    if kind == "CronJob":
        template = obj["spec"]["jobTemplate"]["spec"]["template"]
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "ReplicationController"):
        template = obj["spec"]["template"]
    else:
        return None
    return template.get("spec") or {}, template.get("metadata") or {}
