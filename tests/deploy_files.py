"""Reading the files under deploy/ the way Docker, compose and kustomize read them, for tests.

- `dockerfile_image`: the runtime stage of deploy/Dockerfile (parsed by the `dockerfile` package,
  i.e. BuildKit's own Go parser): ENTRYPOINT, CMD, HEALTHCHECK, ENV and what COPY installs where.
- `load_compose`: a compose file after YAML merge keys and `${VAR:-default}` interpolation, the
  form `docker compose config` validates; `compose_schema` is the compose-spec JSON schema that
  check-jsonschema vendors.
- `kustomize`: renders a kustomization with the subset of kustomize the manifests use (resources,
  and RFC 6902 patches with a target), refusing any other field, so that it can't silently render
  something else than kustomize would; the tests compare it with `kubectl kustomize` when present.
- `container_commands`: every container of every pod template in rendered manifests, with its
  argv (image ENTRYPOINT + args) after Kubernetes' `$(VAR)` expansion from env and envFrom.
- `LWS_SCHEMA`: a structural schema of leaderworkerset.x-k8s.io/v1 LeaderWorkerSet (field names and
  enums of its Go API types); its pod templates are validated by kubernetes-validate instead.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE_DIR = DEPLOY / "compose"
KUBERNETES_DIR = DEPLOY / "kubernetes"
KUSTOMIZATIONS = ("base", "overlays/gpu", "multi-node")


# -- Dockerfile ----------------------------------------------------------------------------------

@dataclass
class Image:
    """What the final stage of the Dockerfile puts in the image."""

    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str]  # the CMD of HEALTHCHECK, without "CMD"
    env: dict[str, str]
    copies: dict[str, str]  # destination in the image -> source in the build context
    runs: list[str] = field(default_factory=list)  # RUN lines of every stage

    def script(self, name: str) -> str | None:
        """The build-context source of an executable the image installs on the PATH as `name`."""
        return self.copies.get(f"/usr/local/bin/{name}")


def dockerfile_image(path: Path = DOCKERFILE) -> Image:
    import dockerfile

    commands = dockerfile.parse_file(str(path))
    stages = [i for i, c in enumerate(commands) if c.cmd == "FROM"]
    final = commands[stages[-1]:]
    image = Image([], [], [], {}, {}, [c.value[0] for c in commands if c.cmd == "RUN"])
    for c in final:
        if c.cmd in ("ENTRYPOINT", "CMD"):
            assert c.json, f"{c.cmd} must be in exec (JSON) form, got {c.original}"
            setattr(image, c.cmd.lower(), list(c.value))
        elif c.cmd == "HEALTHCHECK":
            assert c.json and c.value[0] == "CMD", f"HEALTHCHECK must be CMD [...] in exec form: {c.original}"
            image.healthcheck = list(c.value[1:])
        elif c.cmd == "ENV":
            image.env.update(zip(c.value[::2], c.value[1::2]))
        elif c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags):
            *sources, dest = c.value
            image.copies.update({dest: s for s in sources})
    return image


# -- compose -------------------------------------------------------------------------------------

_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\})")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """compose's variable interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        name, op, arg = m.groups()
        if name is None:
            return "$"
        have = env.get(name)
        unset = have is None or (op is not None and op.startswith(":") and have == "")
        if op and op.endswith("?") and unset:
            raise ValueError(f"required variable {name} is missing: {arg}")
        return (arg if op and op.endswith("-") else "") if unset else have

    return _VAR.sub(one, value)


def load_compose(path: Path, env: dict[str, str]) -> dict[str, Any]:
    """The compose model after YAML merge keys (`<<`) and interpolation from `env`."""
    return interpolate(yaml.safe_load(path.read_text()), env)


def compose_schema() -> dict[str, Any]:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def compose_files() -> list[Path]:
    return sorted(COMPOSE_DIR.glob("*.y*ml"))


# -- kustomize -----------------------------------------------------------------------------------

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches"}


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The resources a kustomization renders to (subset: resources + targeted JSON 6902 patches)."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZATION_KEYS
    assert not unknown, f"{directory}: kustomization fields this renderer does not know: {unknown}"
    docs: list[dict[str, Any]] = []
    for entry in k.get("resources", []):
        target = (directory / entry).resolve()
        docs += kustomize(target) if target.is_dir() else load_docs(target)
    for patch in k.get("patches", []):
        assert set(patch) == {"path", "target"}, f"{directory}: only path+target patches are supported"
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        matches = [d for d in docs if _matches(d, patch["target"])]
        assert len(matches) == 1, f"{directory}: patch {patch['path']} matches {len(matches)} resources"
        for op in ops:
            _apply(matches[0], op)
    return docs


def _matches(doc: dict[str, Any], target: dict[str, str]) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    want = {"kind": doc["kind"], "name": doc["metadata"]["name"], "group": group, "version": version}
    return all(want[key] == value for key, value in target.items())


def _apply(doc: dict[str, Any], op: dict[str, Any]) -> None:
    """One RFC 6902 operation (add, replace, remove) on `doc`, in place."""
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if op["op"] == "remove":
        del node[int(last) if isinstance(node, list) else last]
    elif isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if op["op"] == "add":
            node.insert(index, copy.deepcopy(op["value"]))
        else:
            node[index] = copy.deepcopy(op["value"])
    else:
        assert op["op"] == "add" or last in node, f"replace of a missing member {op['path']}"
        assert op["op"] in ("add", "replace"), f"unsupported patch op {op['op']}"
        node[last] = copy.deepcopy(op["value"])


# -- commands in pod templates -------------------------------------------------------------------

@dataclass
class Container:
    source: str  # "<kustomization>: <Kind>/<name>/<container>"
    spec: dict[str, Any]
    pod: dict[str, Any]  # the pod template (metadata + spec)
    owner: dict[str, Any]  # the Deployment / LeaderWorkerSet
    env: dict[str, str]  # env + envFrom ConfigMaps of the same render
    argv: list[str]  # entrypoint + args after $(VAR) expansion


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [doc["spec"]["template"]]
    if doc["kind"] == "LeaderWorkerSet":
        lwt = doc["spec"]["leaderWorkerTemplate"]
        return [lwt[t] for t in ("leaderTemplate", "workerTemplate") if t in lwt]
    return []


def container_env(spec: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in maps, f"envFrom names ConfigMap {name!r}, which this kustomization does not render"
        env.update(maps[name])
    env.update({e["name"]: e["value"] for e in spec.get("env", []) if "value" in e})
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command/args; an unknown variable is an error here
    (Kubernetes would pass it through literally, which is never what a manifest means)."""
    def one(m: re.Match) -> str:
        assert m.group(1) in env, f"$({m.group(1)}) is not in the container's environment"
        return env[m.group(1)]
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, text)


def container_commands(name: str, docs: list[dict[str, Any]], entrypoint: list[str]) -> list[Container]:
    found = []
    for doc in docs:
        for pod in pod_templates(doc):
            for spec in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
                env = container_env(spec, docs)
                argv = [expand(a, env) for a in spec.get("command", entrypoint) + spec.get("args", [])]
                found.append(Container(f"{name}: {doc['kind']}/{doc['metadata']['name']}/{spec['name']}",
                                       spec, pod, doc, env, argv))
    return found


# -- LeaderWorkerSet -----------------------------------------------------------------------------

def _obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_INT_OR_STRING = {"type": ["integer", "string"]}
_POD_TEMPLATE = {"type": "object"}  # validated separately, strictly, as a core/v1 PodTemplateSpec
LWS_SCHEMA = _obj({
    "apiVersion": {"const": "leaderworkerset.x-k8s.io/v1"},
    "kind": {"const": "LeaderWorkerSet"},
    "metadata": _obj({"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                      "namespace": {"type": "string"},
                      "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                      "annotations": {"type": "object", "additionalProperties": {"type": "string"}}},
                     ("name",)),
    "spec": _obj({
        "replicas": {"type": "integer", "minimum": 0},
        "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
        "networkConfig": _obj({"subdomainPolicy": {"enum": ["Shared", "UniquePerReplica"]}}),
        "rolloutStrategy": _obj({
            "type": {"enum": ["RollingUpdate"]},
            "rollingUpdateConfiguration": _obj({"partition": {"type": "integer", "minimum": 0},
                                                "maxUnavailable": _INT_OR_STRING, "maxSurge": _INT_OR_STRING})}),
        "leaderWorkerTemplate": _obj({
            "leaderTemplate": _POD_TEMPLATE,
            "workerTemplate": _POD_TEMPLATE,
            "size": {"type": "integer", "minimum": 1},
            "restartPolicy": {"enum": ["RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None", "Default"]},
            "subGroupPolicy": _obj({"subGroupPolicyType": {"enum": ["LeaderWorker", "LeaderExcluded"]},
                                    "subGroupSize": {"type": "integer", "minimum": 1}}),
            "volumeClaimTemplates": {"type": "array"},
        }, ("workerTemplate",)),
    }, ("leaderWorkerTemplate",)),
}, ("apiVersion", "kind", "metadata", "spec"))


def lws_subgroups(size: int, subgroup_size: int) -> list[list[int]]:
    """Worker indices per subgroup under subGroupPolicyType LeaderWorker (LWS API docs): when
    size - 1 is divisible by subGroupSize the leader is an extra member of subgroup 0."""
    if (size - 1) % subgroup_size == 0:
        return [[0] + list(range(1, 1 + subgroup_size))] + \
            [list(range(s, s + subgroup_size)) for s in range(1 + subgroup_size, size, subgroup_size)]
    return [list(range(s, s + subgroup_size)) for s in range(0, size, subgroup_size)]


def clean_environment() -> dict[str, str]:
    """This process's environment without anything that would steer a shard or a router."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "LWS_", "NCCL_", "GLOO_", "TORCH_NCCL_", "SHARDLINE_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}
