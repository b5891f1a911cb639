"""NetworkPolicy semantics (networking.k8s.io/v1), evaluated offline: is a
connection from one endpoint to another allowed by a set of policies?

An endpoint is a pod (namespace, labels, container ports by name) or an
address outside the cluster (an IP, no namespace). A connection is allowed
when the source's egress allows it (if any policy selecting the source has
policyTypes Egress) and the destination's ingress allows it (likewise for
Ingress); endpoints outside the cluster are not subject to policies.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Endpoint:
    name: str
    namespace: str | None = None  # None: outside the cluster
    labels: dict = field(default_factory=dict, hash=False, compare=False)
    namespace_labels: dict = field(default_factory=dict, hash=False, compare=False)
    ports: dict = field(default_factory=dict, hash=False, compare=False)  # port name -> (number, protocol)
    ip: str | None = None


def selects(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector: {} matches everything; None matches nothing."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def policy_types(policy: dict) -> set[str]:
    spec = policy["spec"]
    if "policyTypes" in spec:
        return set(spec["policyTypes"])
    return {"Ingress"} | ({"Egress"} if "egress" in spec else set())


def applies(policy: dict, pod: Endpoint) -> bool:
    return (
        pod.namespace is not None
        and policy["metadata"].get("namespace") == pod.namespace
        and selects(policy["spec"].get("podSelector", {}), pod.labels)
    )


def peer_matches(peer: dict, policy_namespace: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        if other.ip is None:
            return False
        address = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(cidr) for cidr in block.get("except") or []
        )
    if other.namespace is None:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], other.namespace_labels):
            return False
    elif other.namespace != policy_namespace:
        return False
    return selects(peer.get("podSelector", {}), other.labels)


def port_matches(rule_ports: list | None, destination: Endpoint, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    for entry in rule_ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True
        wanted = entry["port"]
        if isinstance(wanted, str):
            number, named_protocol = destination.ports.get(wanted, (None, None))
            if number == port and named_protocol == protocol:
                return True
        elif wanted <= port <= entry.get("endPort", wanted):
            return True
    return False


def _direction_allows(policies, pod, other, destination, port, protocol, direction) -> bool:
    kind, peers_key = ("Ingress", "from") if direction == "ingress" else ("Egress", "to")
    selecting = [p for p in policies if applies(p, pod) and kind in policy_types(p)]
    if not selecting:
        return True  # not isolated in this direction
    for policy in selecting:
        for rule in policy["spec"].get(direction) or []:
            peers = rule.get(peers_key)
            namespace = policy["metadata"].get("namespace")
            if peers and not any(peer_matches(peer, namespace, other) for peer in peers):
                continue
            if port_matches(rule.get("ports"), destination, port, protocol):
                return True
    return False


def allowed(policies: list[dict], source: Endpoint, destination: Endpoint, port: int, protocol: str = "TCP") -> bool:
    """Whether ``source`` may open a connection to ``destination:port``."""
    egress = source.namespace is None or _direction_allows(
        policies, source, destination, destination, port, protocol, "egress"
    )
    ingress = destination.namespace is None or _direction_allows(
        policies, destination, source, destination, port, protocol, "ingress"
    )
    return egress and ingress
