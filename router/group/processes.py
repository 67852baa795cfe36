"""Spawning and stopping one generation of shard processes on this host.

Each shard is a fresh `python -m shardline.shard --rank R ...` child (never a fork of a
process that has gRPC or CUDA up), listening on a unix socket whose name carries the rank and the
group's generation, joined through a rendezvous port picked fresh for each generation.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shardline.shard.group_network import loopback_interface


@dataclass(frozen=True)
class GroupSpec:
    """What every shard of a locally launched group runs with."""

    model: Path
    tp: int = 1
    pp: int = 1
    device: str = "cpu"
    dtype: str = "auto"
    pp_partition: tuple[int, ...] = ()
    kv_cache_tokens: int = 0
    kv_block_size: int = 16
    kv_memory_fraction: float = 0.8
    attention_backend: str = "auto"
    compile: str = "auto"
    collective_timeout: float = 600.0
    threads: int = 0
    log_format: str = "auto"
    log_level: str = "info"
    socket_dir: Path = Path("/tmp")
    # Extra environment for the shards (NCCL settings); the parent's environment is inherited.
    env: dict[str, str] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ShardProcesses:
    """One generation of the group's processes."""

    def __init__(self, spec: GroupSpec, generation: int):
        self.spec, self.generation = spec, generation
        self.port = free_port()
        self.sockets = [spec.socket_dir / f"shardline-{os.getpid()}-g{generation}-r{rank}.sock"
                        for rank in range(spec.world_size)]
        # A shard that cannot load for good writes its one-line reason here and exits with CONFIG_EXIT.
        self.reason_files = [p.with_suffix(".reason") for p in self.sockets]
        self.procs: list[subprocess.Popen] = []

    @property
    def addresses(self) -> list[str]:
        return [f"unix://{p}" for p in self.sockets]

    def command(self, rank: int) -> list[str]:
        s = self.spec
        cmd = [sys.executable, "-m", "shardline.shard", "--model", str(s.model),
               "--rank", str(rank), "--world-size", str(s.world_size), "--tp", str(s.tp), "--pp", str(s.pp),
               "--local-rank", str(rank), "--local-world-size", str(s.world_size),
               "--master-addr", "127.0.0.1", "--master-port", str(self.port), "--group-interface", loopback_interface(),
               "--listen", self.addresses[rank], "--device", s.device, "--dtype", s.dtype,
               "--kv-cache-tokens", str(s.kv_cache_tokens), "--kv-block-size", str(s.kv_block_size),
               "--kv-memory-fraction", str(s.kv_memory_fraction),
               "--attention-backend", s.attention_backend, "--compile", s.compile,
               "--collective-timeout", str(s.collective_timeout), "--threads", str(s.threads),
               "--parent-pid", str(os.getpid()), "--reason-file", str(self.reason_files[rank]),
               "--log-format", s.log_format, "--log-level", s.log_level]
        return cmd + (["--pp-partition", ",".join(map(str, s.pp_partition))] if s.pp_partition else [])

    def start(self) -> None:
        self.spec.socket_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.spec.env}
        for rank in range(self.spec.world_size):
            # Own session: a terminal's Ctrl-C reaches the router, which stops the shards in order.
            self.procs.append(subprocess.Popen(self.command(rank), env=env, start_new_session=True))

    def exited(self) -> list[tuple[int, int]]:
        """(rank, exit code) of every shard that has exited."""
        return [(rank, p.returncode) for rank, p in enumerate(self.procs) if p.poll() is not None]

    def reasons(self, ranks: list[int]) -> str:
        """The reasons these ranks wrote before exiting, each distinct one once."""
        texts = []
        for rank in ranks:
            try:
                text = self.reason_files[rank].read_text().strip()
            except OSError:
                text = "no reason written"
            if text not in texts:
                texts.append(text)
        return "; ".join(texts)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM every shard, SIGKILL what is left after `grace` seconds, remove the sockets."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for path in self.sockets + self.reason_files:
            path.unlink(missing_ok=True)
