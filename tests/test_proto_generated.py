"""The committed generated protobuf/gRPC modules are exactly what protoc makes of the .proto files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from shardline.proto import generate

PROTO_DIR = Path(generate.__file__).resolve().parent
GENERATED = [name for proto in generate.PROTOS for name in generate.generated_names(proto)]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("generated")
    return {path.name: path.read_bytes() for path in generate.generate(out)}


def test_every_proto_is_generated() -> None:
    assert sorted(p.name for p in PROTO_DIR.glob("*.proto")) == sorted(generate.PROTOS)


@pytest.mark.parametrize("name", GENERATED)
def test_committed_module_is_up_to_date(regenerated: dict[str, bytes], name: str) -> None:
    assert name in regenerated
    committed = PROTO_DIR / name
    assert committed.is_file(), f"proto/{name} is missing: run python -m shardline.proto.generate"
    assert committed.read_bytes() == regenerated[name], (
        f"proto/{name} is stale: run python -m shardline.proto.generate")


def test_an_edited_proto_makes_the_committed_modules_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above is byte-exact: adding one field to shard.proto changes what protoc writes."""
    protos = tmp_path / "protos"
    protos.mkdir()
    for proto in generate.PROTOS:
        shutil.copy(PROTO_DIR / proto, protos / proto)
    text = (protos / "shard.proto").read_text()
    (protos / "shard.proto").write_text(text.replace("message HealthRequest {}",
                                                     "message HealthRequest {\n  uint32 extra = 1;\n}"))
    monkeypatch.setattr(generate, "PROTO_DIR", protos)
    out = tmp_path / "out"
    out.mkdir()
    fresh = {path.name: path.read_bytes() for path in generate.generate(out)}
    assert fresh["shard_pb2.py"] != (PROTO_DIR / "shard_pb2.py").read_bytes()
    assert fresh["serving_pb2.py"] == (PROTO_DIR / "serving_pb2.py").read_bytes()
