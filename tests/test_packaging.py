"""The built wheel carries everything a fresh install needs: the demo model, the protos and the
generated modules, and the `shardline` entry point."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

pytestmark = pytest.mark.slow
REQUIRED = [
    "shardline/demo/model/config.json", "shardline/demo/model/model.safetensors",
    "shardline/demo/model/tokenizer.json", "shardline/demo/model/tokenizer_config.json",
    "shardline/demo/model/generation_config.json", "shardline/demo/train.py",
    "shardline/proto/serving.proto", "shardline/proto/shard.proto",
    "shardline/proto/serving_pb2.py", "shardline/proto/shard_pb2_grpc.py",
    "shardline/shard/models/llama.py", "shardline/router/scheduling/batcher.py", "shardline/client/cli.py",
    "shardline/router/api/openai/app.py",
]


def test_wheel_contains_demo_model_and_protos(tmp_path, request):
    root = request.config.rootpath
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("shardline-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        size = zf.getinfo("shardline/demo/model/model.safetensors").file_size
    missing = [n for n in REQUIRED if n not in names]
    assert not missing, f"wheel lacks {missing}"
    assert "shardline = shardline.client.cli:main" in entry_points
    assert size <= 15 * 1024 * 1024, f"demo weights are {size} bytes, more than 15 MB"
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n], "tests leaked into the wheel"
