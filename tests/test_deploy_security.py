"""deploy/ keeps the shards private (issue 15), checked offline on the rendered manifests.

The NetworkPolicies are evaluated the way Kubernetes reads them (a pod selected by a policy takes
ingress only from what one of its rules allows: peers by podSelector labels, ports by port and
endPort) against the pods the manifests actually run: only the router reaches the shards' gRPC
port, only the group's pods reach the rendezvous port and the rest of the shards' ports, the
public ports stay open. In compose, the shards are on an internal network only and publish
nothing. (Schema validation of both is in test_deploy_manifests.py.)
"""

from __future__ import annotations

from typing import Any

import deploy_files as d
from test_deploy_manifests import COMPOSE_ENV, image, parse, rendered

OUTSIDER = {"app": "something-else"}
PUBLIC = (8500, 8000, 9400)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"this evaluator reads matchLabels only: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _port_ok(rule: dict[str, Any], port: int) -> bool:
    ports = rule.get("ports")
    return ports is None or any(p.get("protocol", "TCP") == "TCP" and p["port"] <= port <= p.get("endPort", p["port"])
                                for p in ports)


def _peer_ok(rule: dict[str, Any], labels: dict[str, str]) -> bool:
    peers = rule.get("from")
    if peers is None:
        return True
    for peer in peers:
        assert set(peer) == {"podSelector"}, f"this evaluator reads podSelector peers only: {peer}"
    return any(_selects(peer["podSelector"], labels) for peer in peers)


def allowed(policies: list[dict[str, Any]], target: dict[str, str], source: dict[str, str], port: int) -> bool:
    """Whether a pod labelled `source` may open TCP `port` on a pod labelled `target`."""
    mine = [p for p in policies if _selects(p["spec"]["podSelector"], target)
            and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not mine:
        return True
    return any(_port_ok(rule, port) and _peer_ok(rule, source) for p in mine for rule in p["spec"].get("ingress", []))


def pod_labels(docs: list[dict[str, Any]], command: str) -> dict[str, str]:
    """The labels of the pods that run `shardline COMMAND` in a render."""
    found = [c for c in d.container_commands("render", docs, image().entrypoint) if c.argv[1] == command]
    assert found, f"no pod runs {command}"
    return found[0].pod["metadata"]["labels"]


def test_only_the_router_reaches_the_shards_and_only_the_group_their_other_ports() -> None:
    docs = rendered()["multi-node"]
    policies = [doc for doc in docs if doc["kind"] == "NetworkPolicy"]
    shard, router = pod_labels(docs, "shard"), pod_labels(docs, "router")
    containers = {c.argv[1]: c for c in d.container_commands("multi-node", docs, image().entrypoint)}
    grpc_port = int(parse(containers["shard"].argv).listen.rpartition(":")[2])
    rendezvous = int(containers["shard"].env["MASTER_PORT"])
    assert allowed(policies, shard, router, grpc_port)
    assert not allowed(policies, shard, shard, grpc_port) and not allowed(policies, shard, OUTSIDER, grpc_port)
    assert allowed(policies, shard, shard, rendezvous)
    assert not allowed(policies, shard, router, rendezvous) and not allowed(policies, shard, OUTSIDER, rendezvous)
    for nccl in (1024, 33000, 60999, 65535):  # gloo / NCCL listen on ephemeral ports between ranks
        assert allowed(policies, shard, shard, nccl) and not allowed(policies, shard, OUTSIDER, nccl)
    for port in PUBLIC:
        assert allowed(policies, router, OUTSIDER, port)
    assert not allowed(policies, router, OUTSIDER, rendezvous)


def test_the_launch_pod_opens_only_its_public_ports() -> None:
    for name in ("base", "overlays/gpu"):
        docs = rendered()[name]
        policies = [doc for doc in docs if doc["kind"] == "NetworkPolicy"]
        server = pod_labels(docs, "launch")
        ports = {p["containerPort"] for c in d.container_commands(name, docs, image().entrypoint) for p in c.spec["ports"]}
        assert ports == set(PUBLIC), name
        for port in PUBLIC:
            assert allowed(policies, server, OUTSIDER, port), (name, port)
        for port in (29500, 9000, 40000):  # the rendezvous, gloo/NCCL: never from another pod
            assert not allowed(policies, server, OUTSIDER, port), (name, port)


def test_compose_keeps_the_shards_on_an_internal_network() -> None:
    model = d.load_compose(d.COMPOSE_DIR / "compose.split.yaml", COMPOSE_ENV)
    networks, services = model["networks"], model["services"]
    shards = {n: s for n, s in services.items() if parse(image().entrypoint + s["command"]).command == "shard"}
    router = services["router"]
    assert shards and all(s["networks"] == ["shards"] and "ports" not in s for s in shards.values())
    assert networks["shards"] == {"internal": True}
    assert "shards" in router["networks"] and any(not networks[n].get("internal") for n in router["networks"])
    hosts = {a.rpartition(":")[0] for a in parse(image().entrypoint + router["command"]).shards.split(",")}
    assert hosts == set(shards)
