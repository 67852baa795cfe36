"""Configuration of one shard process: where it sits in the group and what it serves.

Built once from the command line (or the standard torch.distributed environment) by `shard/cli.py`
and passed down as a frozen value; nothing below reads the environment itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shardline.shard.preflight import parse_device

# "auto": the checkpoint's dtype on CUDA, float32 on CPU (resolved by shard/devices.py at start).
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "reference", "flex")
COMPILE_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class GroupConfig:
    """The torch.distributed group: sizes, this rank and the rendezvous."""

    rank: int = 0
    tp_size: int = 1
    pp_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    # Explicit layers per pipeline stage, e.g. (3, 2); empty means the default split.
    pp_partition: tuple[int, ...] = ()
    # Seconds a collective may block before the group gives up on it.
    collective_timeout_s: float = 600.0
    # This rank among the ranks of its node (its GPU with --device cuda), and how many there are.
    local_rank: int = 0
    local_world_size: int = 1
    # The local address rank 0's rendezvous store listens on (--group-interface); "" = every interface.
    bind_address: str = ""

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def validate(self) -> None:
        if self.tp_size < 1 or self.pp_size < 1:
            raise ValueError(f"--tp and --pp must be >= 1, got tp={self.tp_size} pp={self.pp_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"--rank {self.rank} is outside the group of world size {self.world_size} "
                f"(tp={self.tp_size} x pp={self.pp_size})")
        if self.pp_partition and len(self.pp_partition) != self.pp_size:
            raise ValueError(
                f"--pp-partition has {len(self.pp_partition)} stages, --pp is {self.pp_size}")
        if any(n < 1 for n in self.pp_partition):
            raise ValueError(f"--pp-partition {','.join(map(str, self.pp_partition))}: every stage needs "
                             f"at least one layer")
        if not 0 <= self.local_rank < self.local_world_size <= self.world_size:
            raise ValueError(f"--local-rank {self.local_rank} and --local-world-size {self.local_world_size} must "
                             f"satisfy 0 <= local rank < local world size <= world size {self.world_size}")
        if not 1 <= self.master_port <= 65535:
            raise ValueError(f"--master-port {self.master_port} is outside 1-65535")


@dataclass(frozen=True)
class ShardConfig:
    """Everything one shard process needs to load its slice and serve it."""

    model_dir: Path
    group: GroupConfig = GroupConfig()
    device: str = "cpu"
    dtype: str = "float32"
    # gRPC listen address: "unix:///path/to.sock" or "host:port".
    listen: str = "unix:///tmp/shardline-shard-0.sock"
    # KV cache budget in tokens; 0 means derive it from free memory at Warmup.
    kv_cache_tokens: int = 0
    # Fraction of free device memory the KV cache may take when kv_cache_tokens is 0.
    kv_memory_fraction: float = 0.8
    # Tokens per KV block (the router allocates whole blocks).
    kv_block_size: int = 16
    # Attention kernels (shard/attention.py): auto, reference or flex.
    attention_backend: str = "auto"
    # torch.compile of the layer stack (shard/compiled.py): auto, on or off.
    compile: str = "auto"
    # Where to write the one-line reason when loading fails for good (read by `shardline launch`).
    reason_file: Path | None = None

    def validate(self) -> None:
        self.group.validate()
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        parse_device(self.device)
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"--attention-backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        if self.kv_cache_tokens < 0:
            raise ValueError(f"--kv-cache-tokens must be >= 0 (0: from free memory), got {self.kv_cache_tokens}")
        if not (0 < self.kv_memory_fraction <= 1):
            raise ValueError(f"--kv-memory-fraction must be in (0, 1], got {self.kv_memory_fraction}")
        if not (self.model_dir / "config.json").is_file():
            raise ValueError(f"--model {self.model_dir} has no config.json")
