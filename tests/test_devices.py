"""GPU first contact without a GPU (issue 16, items 1-3), against a faked CUDA inventory: which GPU
each local rank takes, what is refused before any shard starts, `--dtype auto`, the P2P decision
per pair of GPUs, and that the router process never initialises CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from shardline.client.cli import build_parser
from shardline.demo import model_dir
from shardline.router.group.processes import GroupSpec, ShardProcesses
from shardline.shard import devices
from shardline.shard.cli import build_parser as shard_parser
from shardline.shard.cli import config_from_args
from shardline.shard.preflight import SettingsError
from shardline.shard.startup import CONFIG_EXIT


# -- --dtype auto --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, device, config, served", [
    ("auto", "cpu", {"dtype": "bfloat16"}, "float32"),
    ("auto", "cuda", {"dtype": "bfloat16"}, "bfloat16"),
    ("auto", "cuda:1", {"torch_dtype": "float16"}, "float16"),
    ("auto", "cuda", {"torch_dtype": "torch.bfloat16"}, "bfloat16"),
    ("auto", "cuda", {}, "float32"),
    ("auto", "cuda", {"dtype": "float64"}, "float32"),
    ("float16", "cuda", {"dtype": "bfloat16"}, "float16"),
    ("bfloat16", "cpu", {"dtype": "float32"}, "bfloat16"),
])
def test_dtype_auto_is_the_checkpoints_on_cuda_and_float32_on_cpu(dtype, device, config, served):
    assert devices.served_dtype(dtype, device, config) == served


def test_auto_is_the_default_dtype_everywhere():
    parser = build_parser()
    for argv in (["launch"], ["shard", "--model", "m"], ["bench"]):
        assert parser.parse_args(argv).dtype == "auto", argv


# -- device assignment ---------------------------------------------------------------------------
def test_local_rank_takes_the_gpu_of_its_index_among_the_visible_ones():
    assert [devices.gpu_for("cuda", r, 4) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert devices.gpu_for("cuda:3", 0, 4) == "cuda:3" and devices.gpu_for("cpu", 5, 0) == "cpu"
    with pytest.raises(SettingsError, match=r"local rank 2 needs GPU 2, but torch sees 2 CUDA device"):
        devices.gpu_for("cuda", 2, 2)


def test_launch_tells_each_shard_its_local_rank_and_the_ranks_of_the_node(tmp_path):
    """The rank -> GPU mapping a launched group uses: rank r is local rank r of tp x pp ranks."""
    procs = ShardProcesses(GroupSpec(model=model_dir(), tp=2, pp=2, device="cuda", socket_dir=tmp_path), 0)
    for rank in range(4):
        command = procs.command(rank)
        assert command[:3] == [sys.executable, "-m", "shardline.shard"], "shards start from their own entry point"
        args = shard_parser().parse_args(command[3:])
        group = config_from_args(args, {}).group
        assert (group.rank, group.local_rank, group.local_world_size) == (rank, rank, 4)


def test_split_shards_default_to_one_local_rank_and_read_torchrun_variables():
    args = build_parser().parse_args(["shard", "--model", str(model_dir()), "--tp", "2"])
    assert (config_from_args(args, {"RANK": "1"}).group.local_rank, config_from_args(args, {}).group.local_world_size) \
        == (0, 1)
    group = config_from_args(args, {"RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}).group
    assert (group.local_rank, group.local_world_size) == (1, 2)
    with pytest.raises(SystemExit, match=r"--local-rank 2 and --local-world-size 2"):
        config_from_args(args, {"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"})


# -- P2P per pair ---------------------------------------------------------------------------------
def test_p2p_stays_on_when_every_pair_reaches_the_other():
    found = devices.p2p_environment("cuda", 3, {}, lambda a, b: True)
    assert found == {"SHARDLINE_P2P": "cuda:0<->cuda:1 p2p, cuda:0<->cuda:2 p2p, cuda:1<->cuda:2 p2p"}


def test_a_pair_without_p2p_turns_it_off_naming_the_pair():
    found = devices.p2p_environment("cuda", 3, {}, lambda a, b: {a, b} != {1, 2})
    assert found["NCCL_P2P_DISABLE"] == "1"
    assert found["SHARDLINE_P2P_OFF_BECAUSE"] == "cuda:1<->cuda:2"
    assert found["SHARDLINE_P2P"] == "cuda:0<->cuda:1 p2p, cuda:0<->cuda:2 p2p, cuda:1<->cuda:2 no p2p"


def test_one_way_access_counts_as_no_p2p():
    found = devices.p2p_environment("cuda", 2, {}, lambda a, b: (a, b) == (0, 1))
    assert found["NCCL_P2P_DISABLE"] == "1" and found["SHARDLINE_P2P_OFF_BECAUSE"] == "cuda:0<->cuda:1"


def test_p2p_is_not_probed_where_it_cannot_matter_or_the_user_decided():
    def never(a: int, b: int) -> bool:
        raise AssertionError("probed")

    for device, ranks, env in (("cpu", 4, {}), ("cuda", 1, {}), ("cuda:0", 2, {}), ("cuda", 2, {"NCCL_P2P_DISABLE": "0"})):
        assert devices.p2p_environment(device, ranks, env, never) == {}, (device, ranks, env)


# -- refusals before any shard starts, and no CUDA in the router ---------------------------------
FAKED = textwrap.dedent("""
    import sys, torch
    torch.cuda.device_count = lambda: {gpus}
    def no_cuda(*args, **kwargs):
        raise AssertionError("the router initialised CUDA")
    torch.cuda._lazy_init = torch.cuda.init = no_cuda
    from shardline.client.cli import build_parser
    from shardline.router.launch import serve as launch, preflight
    from shardline.shard.preflight import SettingsError
    args = build_parser().parse_args(sys.argv[1:])
    try:
        preflight.check_launch(args, args.model)
        launch.shard_environment(args)
    except SettingsError as exc:
        print(f"refused: {{exc}}")
    assert not torch.cuda.is_initialized()
    print("ok")
""")


def router_checks(gpus: int, *argv: str) -> str:
    """What the router's start-up checks say with `gpus` faked CUDA devices (CUDA itself forbidden)."""
    done = subprocess.run([sys.executable, "-c", FAKED.format(gpus=gpus), "launch", "--model", str(model_dir()),
                           "--port", "0", "--http-port", "0", "--metrics-port", "0", "--shm-required-bytes", "0",
                           *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_router_checks_a_cuda_group_without_initialising_cuda():
    assert router_checks(4, "--device", "cuda", "--tp", "2", "--pp", "2") == "ok\n"


@pytest.mark.parametrize("argv, expected", [
    (["--device", "cuda", "--tp", "4", "--pp", "2"], "--tp x --pp = 8 ranks, torch sees 4 CUDA device(s)"),
    (["--device", "cuda:0", "--tp", "2"], "--device cuda:0 puts all 2 ranks on one GPU"),
    (["--device", "cuda:4"], "--device cuda:4: torch sees 4 CUDA device(s), cuda:0 to cuda:3"),
])
def test_more_ranks_than_gpus_or_one_gpu_for_several_ranks_is_refused(argv, expected):
    out = router_checks(4, *argv)
    assert out.startswith("refused: ") and expected in out, out


def test_a_shard_asked_for_more_local_ranks_than_gpus_refuses_in_one_line():
    done = subprocess.run([sys.executable, "-m", "shardline.client.cli", "shard", "--model", str(model_dir()),
                           "--tp", "2", "--device", "cuda", "--local-world-size", "2"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == CONFIG_EXIT, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()] and "no CUDA device" in done.stderr, done.stderr
