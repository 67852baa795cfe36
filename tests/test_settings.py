"""Settings that can never work are refused before any shard starts, with one line that names the
flag, the value and the limit, and no traceback (issue 11, item 4).

Most tests run the real CLI (`python -m shardline.client.cli launch|router|shard ...`) in a
subprocess and check that it exits non-zero within seconds, having written exactly one line and no
shard process. The last one lets a shard fail to load for a reason a restart cannot fix (the
checkpoint does not match its config) and checks that `launch` exits once with that reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shardline.demo import model_dir
from shardline.shard import preflight
from shardline.shard.layers import even_part, qkv_parts
from shardline.shard.parallel import ParallelState
from shardline.shard.startup import CONFIG_EXIT

DEMO = model_dir()  # 8 attention heads, 4 KV heads, 4 layers, intermediate_size 512
QUICK = 60.0  # seconds: a refusal reads config.json, it never loads a model


def shardline(*argv: str, timeout: float = QUICK, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs `shardline ARGV` (stdin closed, output captured); asserts it ends within `timeout`."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "shardline.client.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    done.elapsed = time.monotonic() - start
    return done


def refused(*argv: str, env: dict[str, str] | None = None) -> str:
    """The one line `shardline ARGV` was refused with (asserting: non-zero, one line, no traceback)."""
    done = shardline(*argv, env=env)
    lines = done.stderr.splitlines()
    assert done.returncode != 0, (argv, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, f"{argv}: expected one line, got:\n{done.stderr}"
    assert lines[0].startswith("shardline") and "error" in lines[0], lines[0]
    return lines[0]


def launch(*argv: str) -> list[str]:
    return ["launch", "--port", "0", "--http-port", "0", "--metrics-port", "0", *argv]


def checkpoint_with(tmp_path: Path, **config: object) -> Path:
    """The demo checkpoint with config.json fields replaced (weights and tokenizer linked)."""
    out = tmp_path / "model"
    out.mkdir()
    for item in DEMO.iterdir():
        if item.name != "config.json":
            (out / item.name).symlink_to(item)
    data = json.loads((DEMO / "config.json").read_text())
    data.update(config)
    (out / "config.json").write_text(json.dumps(data))
    return out


# -- group sizes against the model -----------------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["--tp", "3"], ["--tp 3", "num_attention_heads = 8", "--tp can be 1, 2, 4, 8"]),
    (["--pp", "9"], ["--pp 9", "num_hidden_layers = 4", "1 to 4"]),
    (["--pp-partition", "1,1"], ["--pp-partition 1,1", "2 stages", "--pp is 1"]),
    (["--pp", "2", "--pp-partition", "2,1"], ["--pp-partition 2,1", "adds up to 3", "num_hidden_layers = 4"]),
    (["--pp", "2", "--pp-partition", "4,0"], ["--pp-partition", "at least one layer", "4,0"]),
    (["--tp", "0"], ["--tp", ">= 1", "got 0"]),
    (["--pp", "-1"], ["--pp", ">= 1", "got -1"]),
])
def test_group_sizes_that_cannot_split_the_model_are_refused_at_once(argv, expected):
    line = refused(*launch(*argv))
    for text in expected:
        assert text in line, (text, line)
    assert "min() arg" not in line


def test_kv_heads_follow_the_rule_the_layers_enforce(tmp_path):
    """2 KV heads: tp 4 replicates them (4 is a multiple of 2); 6 heads, 3 KV heads: tp 2 cannot
    split the KV heads and tp 6 is a multiple of 3, so only tp 1, 3, 6 fit."""
    model = checkpoint_with(tmp_path, num_attention_heads=6, num_key_value_heads=3, head_dim=32,
                            intermediate_size=96)
    line = refused(*launch("--model", str(model), "--tp", "2"))
    assert "--tp 2" in line and "num_key_value_heads = 3" in line and "--tp can be 1, 3, 6" in line, line


@pytest.mark.parametrize("heads, kv_heads, intermediate", [(8, 4, 512), (8, 2, 96), (6, 3, 96), (12, 8, 60),
                                                            (4, 1, 64), (16, 16, 48)])
def test_the_tp_rule_is_the_one_the_layers_enforce(heads, kv_heads, intermediate):
    """For every tp up to 16, the preflight accepts exactly the sizes the shard's layers can build."""
    sizes = {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": intermediate,
             "num_hidden_layers": 2}
    for tp in range(1, 17):
        ps = ParallelState(rank=0, tp_size=tp, pp_size=1, device=torch.device("cpu"), backend="none")
        try:
            qkv_parts(heads, kv_heads, 8, ps)
            even_part(0, intermediate, ps, "intermediate_size")
            even_part(None, heads * 8, ps, "o_proj input")
            builds = True
        except ValueError:
            builds = False
        assert (preflight.tp_problem(sizes, tp) is None) == builds, (heads, kv_heads, intermediate, tp)


# -- device ----------------------------------------------------------------------------------------
def test_cuda_without_a_gpu_is_refused_before_any_shard_starts():
    line = refused(*launch("--device", "cuda"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert "--device cuda" in line and "no CUDA device" in line and "--device cpu" in line, line


def test_a_device_torch_cannot_name_is_refused():
    line = refused(*launch("--device", "gpu0"))
    assert "--device 'gpu0'" in line and "cpu, cuda" in line and "cuda:N" in line, line


@pytest.mark.skipif(torch.cuda.device_count() == 0, reason="needs a CUDA device")
def test_more_ranks_than_gpus_is_refused():
    ranks = torch.cuda.device_count() + 1
    line = refused(*launch("--device", "cuda", "--tp", "1", "--pp", str(ranks)))
    assert f"{ranks} ranks" in line and f"torch sees {ranks - 1}" in line, line


# -- sizes and ports -------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, limit", [
    ("--port", "99999", "0-65535"), ("--metrics-port", "70000", "0-65535"), ("--port", "-1", "0-65535"),
    ("--max-concurrent-requests", "0", ">= 1"), ("--max-input-tokens", "0", ">= 1"),
    ("--max-total-tokens", "-5", ">= 2"), ("--max-batch-size", "0", ">= 1"), ("--step-timeout", "0", "> 0"),
    ("--kv-cache-tokens", "-1", ">= 0"), ("--kv-memory-fraction", "1.5", "(0, 1]"),
    ("--max-restarts", "-1", ">= 0"), ("--shutdown-grace", "nan", ">= 0"), ("--threads", "x", "integer"),
])
def test_out_of_range_numbers_are_refused_naming_the_flag_and_the_limit(flag, value, limit):
    line = refused(*launch(flag, value))
    assert f"argument {flag}" in line and value in line and limit in line, line


@pytest.mark.parametrize("argv, expected", [
    (["--rank", "-1"], ["argument --rank", ">= 0"]),
    (["--rank", "4", "--tp", "2"], ["--rank 4", "world size 2"]),
    (["--master-port", "0"], ["argument --master-port", "1-65535"]),
    (["--listen", "127.0.0.1:99999"], ["argument --listen", "99999", "1-65535"]),
    (["--tp", "3"], ["--tp 3", "num_attention_heads = 8"]),
])
def test_shard_refuses_what_can_never_work_with_one_line(argv, expected):
    done = shardline("shard", "--model", str(DEMO), *argv)
    line = done.stderr.strip()
    assert done.returncode in (2, CONFIG_EXIT) and "\n" not in line and "Traceback" not in line, done.stderr
    for text in expected:
        assert text in line, (text, line)


def test_a_refusal_from_the_environment_exits_with_the_config_code():
    """RANK from the environment outside the group: CONFIG_EXIT, so no launcher restarts it."""
    done = shardline("shard", "--model", str(DEMO), "--tp", "2", env={"RANK": "7"})
    assert done.returncode == CONFIG_EXIT, done.stderr
    assert done.stderr.strip() == "shardline: error: --rank 7 is outside the group of world size 2 (tp=2 x pp=1)"


# -- the checkpoint folder -------------------------------------------------------------------------
def test_a_model_folder_that_is_not_a_checkpoint_says_what_is_missing(tmp_path):
    line = refused(*launch("--model", str(tmp_path)))
    assert f"--model {tmp_path}" in line, line
    for part in ("config.json", "weights (*.safetensors)", "tokenizer"):
        assert part in line, (part, line)
    assert "repo id" not in line.lower() and "sentencepiece" not in line.lower()


def test_a_model_without_its_tokenizer_or_weights_says_which(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text((DEMO / "config.json").read_text())
    (model / "model.safetensors").symlink_to(DEMO / "model.safetensors")
    assert "no tokenizer (tokenizer.json" in refused(*launch("--model", str(model)))
    (model / "model.safetensors").unlink()
    (model / "tokenizer.json").symlink_to(DEMO / "tokenizer.json")
    line = refused(*launch("--model", str(model)))
    assert "no weights (*.safetensors)" in line and "tokenizer" not in line, line
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-2-of-2.safetensors"}}))
    assert "model-2-of-2.safetensors (listed in model.safetensors.index.json)" in refused(*launch("--model", str(model)))
    # The router of a split deployment reads only config.json and the tokenizer: no weights needed.
    line = refused("router", "--model", str(model), "--shards", " , ", "--port", "0", "--http-port", "0",
                   "--metrics-port", "0")
    assert "--shards" in line and "no shard address" in line, line


def test_a_missing_folder_and_a_broken_config_are_one_line(tmp_path):
    assert "does not exist" in refused(*launch("--model", str(tmp_path / "nowhere")))
    model = checkpoint_with(tmp_path)
    (model / "config.json").write_text("{")
    assert "config.json cannot be read as JSON" in refused(*launch("--model", str(model)))
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "num_attention_heads": 4,
                                                   "num_hidden_layers": 2, "intermediate_size": 64}))
    line = refused(*launch("--model", str(model)))
    assert "model_type 'gpt2'" in line and "not supported" in line and "llama" in line, line


# -- a shard that cannot load is not restarted -----------------------------------------------------
@pytest.mark.slow
def test_a_checkpoint_that_does_not_match_its_config_ends_launch_once(tmp_path):
    """intermediate_size 1024 in config.json, 512 in the weights: the shards' loads fail with a shape
    error that no restart fixes. Launch exits non-zero once, saying why, without a restart."""
    model = checkpoint_with(tmp_path, intermediate_size=1024)
    sockets = tmp_path / "sockets"
    done = shardline(*launch("--model", str(model), "--tp", "2", "--socket-dir", str(sockets), "--threads", "1",
                             "--kv-cache-tokens", "4096", "--log-level", "warning"), timeout=240)
    err = done.stderr
    assert done.returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("shardline: error:")]
    assert len(errors) == 1, err
    assert "restarting will not help" in errors[0] and "cannot load the model" in errors[0], errors[0]
    assert str(model) in errors[0] and "mlp" in errors[0] and "but config.json implies" in errors[0] \
        and "1024" in errors[0], errors[0]
    assert "Traceback" not in err and "restarting shard group" not in err and "giving up" not in err, err
    assert not list(sockets.iterdir()), "sockets or reason files left behind"


@pytest.mark.slow
def test_debug_log_level_shows_the_traceback(tmp_path):
    """The same failure at --log-level debug also shows where it happened, for a bug report."""
    model = checkpoint_with(tmp_path, intermediate_size=1024)
    done = shardline(*launch("--model", str(model), "--socket-dir", str(tmp_path / "s"), "--threads", "1",
                             "--kv-cache-tokens", "4096", "--log-level", "debug", "--log-format", "console"),
                     timeout=240)
    assert done.returncode == 1, done.stderr
    assert "Traceback" in done.stderr and "check_shape" in done.stderr, done.stderr[-3000:]
