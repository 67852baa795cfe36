"""Nothing crosses a process or host boundary as pickle (issue 15; DESIGN.md's pitfalls).

Read from the syntax trees of every shipped module: no pickle-based serializer is imported (pickle,
cloudpickle, dill, marshal, shelve, multiprocessing's queues and managers), no torch.distributed
object collective (they pickle: broadcast_object_list, all_gather_object, ...) is called, and
torch.load only with weights_only=True. Between processes there is protobuf over gRPC, tensors in
collectives, and safetensors on disk.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("router", "shard", "client", "proto", "demo")
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "multiprocessing", "joblib"}
OBJECT_COLLECTIVES = {"broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
                      "send_object_list", "recv_object_list", "isend_object", "irecv_object"}


def modules() -> list[Path]:
    found = [p for package in PACKAGES for p in (REPO / package).rglob("*.py") if not p.name.endswith("_pb2.py")
             and not p.name.endswith("_pb2_grpc.py")]
    assert len(found) > 40, "the scan found too few modules to mean anything"
    return found


def offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLING_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and node.attr in OBJECT_COLLECTIVES:
            found.append(f"{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            found += [] if safe else ["torch.load without weights_only=True"]
    return found


def test_no_module_pickles_across_a_boundary() -> None:
    assert [f"{path.relative_to(REPO)}: {o}" for path in modules() for o in offences(path)] == []


@pytest.mark.parametrize("source", ["import pickle", "from multiprocessing import Queue",
                                    "dist.broadcast_object_list(x)", "torch.load(f)"])
def test_the_scan_sees_what_it_forbids(tmp_path: Path, source: str) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(source + "\n")
    assert offences(probe)
