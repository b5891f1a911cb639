"""Unit tests of netpol.py's NetworkPolicy semantics."""

from __future__ import annotations

import unittest

from netpol import Endpoint, allowed, selects

NS = {"kubernetes.io/metadata.name": "app"}
A = Endpoint("a", "app", {"role": "a"}, NS, {"web": (8080, "TCP")})
B = Endpoint("b", "app", {"role": "b"}, NS, {"web": (8080, "TCP")})
OTHER = Endpoint("c", "other", {"role": "a"}, {"kubernetes.io/metadata.name": "other"})
OUTSIDE = Endpoint("internet", ip="203.0.113.7")


def policy(spec: dict, namespace: str = "app") -> dict:
    return {"metadata": {"name": "p", "namespace": namespace}, "spec": spec}


DENY_ALL = policy({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})


class Semantics(unittest.TestCase):
    def test_no_policy_allows_everything(self) -> None:
        self.assertTrue(allowed([], A, B, 1))

    def test_default_deny_denies_both_ways(self) -> None:
        self.assertFalse(allowed([DENY_ALL], A, B, 8080))
        self.assertFalse(allowed([DENY_ALL], OUTSIDE, A, 8080))
        self.assertFalse(allowed([DENY_ALL], A, OUTSIDE, 443))

    def test_both_ends_must_allow(self) -> None:
        ingress = policy({"podSelector": {"matchLabels": {"role": "b"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "a"}}}]}]})
        self.assertFalse(allowed([DENY_ALL, ingress], A, B, 8080), "egress of a still denied")
        egress = policy({"podSelector": {"matchLabels": {"role": "a"}}, "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": {"matchLabels": {"role": "b"}}}]}]})
        self.assertTrue(allowed([DENY_ALL, ingress, egress], A, B, 8080))
        self.assertFalse(allowed([DENY_ALL, ingress, egress], B, A, 8080))

    def test_pod_selector_alone_is_the_policys_namespace(self) -> None:
        ingress = policy({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "a"}}}]}]})
        self.assertTrue(allowed([ingress], A, B, 1))
        self.assertFalse(allowed([ingress], OTHER, B, 1))

    def test_namespace_and_pod_selector_together_mean_both(self) -> None:
        peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "other"}}, "podSelector": {"matchLabels": {"role": "a"}}}
        ingress = policy({"podSelector": {}, "ingress": [{"from": [peer]}]})
        self.assertTrue(allowed([ingress], OTHER, B, 1))
        self.assertFalse(allowed([ingress], A, B, 1))

    def test_ports_numbers_names_ranges_protocols(self) -> None:
        def only(ports):
            return [policy({"podSelector": {}, "ingress": [{"ports": ports}]})]
        self.assertTrue(allowed(only([{"port": 8080}]), A, B, 8080))
        self.assertFalse(allowed(only([{"port": 8080}]), A, B, 9090))
        self.assertFalse(allowed(only([{"port": 8080, "protocol": "UDP"}]), A, B, 8080))
        self.assertTrue(allowed(only([{"port": "web"}]), A, B, 8080))
        self.assertFalse(allowed(only([{"port": "admin"}]), A, B, 8080))
        self.assertTrue(allowed(only([{"port": 9000, "endPort": 9100}]), A, B, 9092))

    def test_ip_block_with_except(self) -> None:
        egress = policy({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "203.0.113.0/24", "except": ["203.0.113.7/32"]}}]}]})
        self.assertFalse(allowed([egress], A, OUTSIDE, 443))
        self.assertTrue(allowed([egress], A, Endpoint("x", ip="203.0.113.8"), 443))
        self.assertFalse(allowed([egress], A, B, 443), "an ipBlock matches no pod here")

    def test_policies_of_another_namespace_do_not_apply(self) -> None:
        self.assertTrue(allowed([policy({"podSelector": {}, "policyTypes": ["Ingress"]}, "other")], A, B, 1))

    def test_selector_expressions(self) -> None:
        labels = {"app": "x"}
        self.assertTrue(selects({"matchExpressions": [{"key": "app", "operator": "In", "values": ["x", "y"]}]}, labels))
        self.assertFalse(selects({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["x"]}]}, labels))
        self.assertTrue(selects({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, labels))
        self.assertFalse(selects({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, labels))
        self.assertFalse(selects(None, labels))


if __name__ == "__main__":
    unittest.main()
