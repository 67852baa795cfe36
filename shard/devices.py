"""The GPUs of one node: which one each local rank uses, the dtype a checkpoint is served in, and
whether NCCL's peer-to-peer transport works between the GPUs the node's ranks use.

Everything here runs in a shard process (never in the router, which must not open a CUDA
context: it would hold memory on every GPU for its lifetime and block the shards under
EXCLUSIVE_PROCESS). `--device cuda` gives local rank i the i-th GPU torch sees, so
CUDA_VISIBLE_DEVICES chooses and orders them. P2P is decided per pair with
`torch.cuda.can_device_access_peer` (a copy proves nothing: without P2P it is staged through the
host and still arrives); NCCL has one switch per process, so a node turns P2P off when a pair of
its GPUs cannot use it, and says which pair.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from shardline.shard.preflight import SettingsError

DTYPE_NAMES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16",
               "half": "float16"}


def served_dtype(dtype: str, device: str, config: Mapping[str, object]) -> str:
    """The dtype a rank serves in: `auto` is the checkpoint's own (config.json `dtype`, or
    `torch_dtype` in older files) on CUDA and float32 on CPU; a checkpoint that names none, or one
    shardline does not serve (float64, int8), is served in float32."""
    if dtype != "auto":
        return dtype
    if device == "cpu":
        return "float32"
    declared = config.get("dtype") or config.get("torch_dtype")
    return DTYPE_NAMES.get(str(declared).removeprefix("torch."), "float32")


def gpu_for(device: str, local_rank: int, visible: int) -> str:
    """The torch device of one local rank: `cuda` -> the local_rank-th visible GPU (refused when
    there is none), `cuda:N` and `cpu` as given."""
    if device != "cuda":
        return device
    if local_rank >= visible:
        raise SettingsError(f"--device cuda: local rank {local_rank} needs GPU {local_rank}, but torch sees "
                            f"{visible} CUDA device(s) (CUDA_VISIBLE_DEVICES chooses them)")
    return f"cuda:{local_rank}"


def peer_access(gpus: int, can_access: Callable[[int, int], bool]) -> dict[tuple[int, int], bool]:
    """{(a, b): whether GPU a can access GPU b} for every ordered pair of the first `gpus` GPUs."""
    return {(a, b): bool(can_access(a, b)) for a in range(gpus) for b in range(gpus) if a != b}


def describe_pairs(access: Mapping[tuple[int, int], bool]) -> str:
    """One line for Info and the logs: `cuda:0<->cuda:1 p2p, cuda:0<->cuda:2 no p2p`."""
    pairs = sorted({tuple(sorted(p)) for p in access})
    return ", ".join(f"cuda:{a}<->cuda:{b} {'p2p' if access[(a, b)] and access[(b, a)] else 'no p2p'}"
                     for a, b in pairs)


def p2p_environment(device: str, local_world_size: int, env: Mapping[str, str],
                    can_access: Callable[[int, int], bool] | None = None) -> dict[str, str]:
    """The NCCL settings this node's ranks must add for P2P: NCCL_P2P_DISABLE=1 when a pair of the
    GPUs they use cannot reach each other, plus SHARDLINE_P2P (the per-pair result, shown in Info).
    Nothing when there is one local rank, no CUDA, or the user already decided (NCCL_P2P_DISABLE)."""
    if device != "cuda" or local_world_size < 2 or "NCCL_P2P_DISABLE" in env:
        return {}
    if can_access is None:
        import torch

        can_access = torch.cuda.can_device_access_peer
    access = peer_access(local_world_size, can_access)
    found = {"SHARDLINE_P2P": describe_pairs(access)}
    failing = sorted({tuple(sorted(p)) for p, ok in access.items() if not ok})
    if failing:
        found["NCCL_P2P_DISABLE"] = "1"
        found["SHARDLINE_P2P_OFF_BECAUSE"] = ", ".join(f"cuda:{a}<->cuda:{b}" for a, b in failing)
    return found
