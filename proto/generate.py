"""Generates the protobuf/gRPC Python modules from the .proto files in this folder.

The generated files are committed; `tests/test_proto_generated.py` regenerates them into a
temporary folder and fails when the committed copies are stale. Run after editing a .proto:

    python -m shardline.proto.generate
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTOS = ("shard.proto", "serving.proto")


def generated_names(proto: str) -> tuple[str, ...]:
    """The module files protoc writes for one .proto file."""
    stem = proto.removesuffix(".proto")
    return (f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Writes the generated modules of every existing .proto into out_dir; returns their paths."""
    from grpc_tools import protoc  # only needed at development time

    with tempfile.TemporaryDirectory() as tmp:
        # Lay the protos out under shardline/proto/ so generated imports are package-qualified.
        root = Path(tmp) / "src"
        pkg = root / "shardline" / "proto"
        pkg.mkdir(parents=True)
        protos = [p for p in PROTOS if (PROTO_DIR / p).exists()]
        for proto in protos:
            shutil.copy(PROTO_DIR / proto, pkg / proto)
        include = Path(protoc.__file__).parent / "_proto"
        args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"]
        args += [f"shardline/proto/{p}" for p in protos]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {protos}")
        written = []
        for proto in protos:
            for name in generated_names(proto):
                target = out_dir / name
                shutil.copy(Path(tmp) / "shardline" / "proto" / name, target)
                written.append(target)
    return written


def main() -> int:
    for path in generate(PROTO_DIR):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
