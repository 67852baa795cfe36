"""`shardline shard --ranks-per-node M`: all of one node's ranks from one command, for one pod per
node holding all its GPUs (tensor parallelism inside the node over NVLink, pipeline stages across
nodes).

The command becomes a small supervisor. Node K runs global ranks K*M .. K*M+M-1, one child process
per rank, each started as `shardline shard` with its rank, its local rank (its GPU), the node's
rank count and its own listen address: `host:port` gives local rank i the port `port + i`, and
`unix:///x.sock` gives it `unix:///x-rRANK.sock`. A group cannot lose one rank and go on, so when
one child exits the others are stopped and the command exits with that child's code. The
orchestrator then restarts the pod, and the other nodes' ranks notice the broken group and exit
too (group_watch.py), so the whole group is recreated, as `shardline launch` does on one host.

The node's rank comes from --node-rank, $NODE_RANK or $LWS_WORKER_INDEX (a LeaderWorkerSet with
one pod per node); the node count from --tp x --pp / M, checked against $NNODES or
$LWS_GROUP_SIZE when they are set.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog

from shardline.shard.preflight import SettingsError

log = structlog.get_logger("shardline.shard")
NODE_RANK_SOURCES = ("NODE_RANK", "LWS_WORKER_INDEX")
NODES_SOURCES = ("NNODES", "LWS_GROUP_SIZE")
STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class NodeLayout:
    """Where one node sits in the group: its index and how many ranks each node runs."""

    node_rank: int
    ranks_per_node: int
    world_size: int

    @property
    def nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    @property
    def ranks(self) -> range:
        start = self.node_rank * self.ranks_per_node
        return range(start, start + self.ranks_per_node)


def _env_number(env: Mapping[str, str], names: Sequence[str]) -> tuple[str, int] | None:
    for name in names:
        if env.get(name):
            try:
                return name, int(env[name])
            except ValueError:
                raise SettingsError(f"${name} must be an integer, got {env[name]!r}") from None
    return None


def node_layout(ranks_per_node: int, node_rank: int | None, world_size: int, env: Mapping[str, str]) -> NodeLayout:
    """The node's layout, refused in one line when the numbers cannot form the group."""
    if world_size % ranks_per_node:
        raise SettingsError(f"--ranks-per-node {ranks_per_node} does not divide --tp x --pp = {world_size} ranks")
    nodes = world_size // ranks_per_node
    declared = _env_number(env, NODES_SOURCES)
    if declared is not None and declared[1] != nodes:
        raise SettingsError(f"${declared[0]} = {declared[1]} nodes, but --tp x --pp = {world_size} ranks with "
                            f"--ranks-per-node {ranks_per_node} need {nodes}")
    if node_rank is None:
        found = _env_number(env, NODE_RANK_SOURCES)
        node_rank = found[1] if found else 0
    if not 0 <= node_rank < nodes:
        raise SettingsError(f"node rank {node_rank} is outside the {nodes} nodes of --tp x --pp = {world_size} "
                            f"ranks with --ranks-per-node {ranks_per_node}")
    return NodeLayout(node_rank, ranks_per_node, world_size)


def listen_for(listen: str, local_rank: int, rank: int) -> str:
    """The listen address of one local rank, derived from the node's."""
    if listen.startswith("unix://"):
        path = listen.removeprefix("unix://")
        stem, dot, suffix = path.rpartition(".")
        return f"unix://{stem}-r{rank}.{suffix}" if dot and "/" not in suffix else f"unix://{path}-r{rank}"
    host, _, port = listen.rpartition(":")
    return f"{host}:{int(port) + local_rank}"


def rank_command(argv: Sequence[str], layout: NodeLayout, local_rank: int, listen: str) -> list[str]:
    """The command of one local rank: this command's own arguments with its place appended (the
    last occurrence of a flag wins)."""
    rank = layout.ranks[local_rank]
    return [sys.executable, "-m", "shardline.shard", *argv,
            "--ranks-per-node", "1", "--rank", str(rank), "--world-size", str(layout.world_size),
            "--local-rank", str(local_rank), "--local-world-size", str(layout.ranks_per_node),
            "--listen", listen_for(listen, local_rank, rank), "--parent-pid", str(os.getpid()),
            "--group-watch", "on"]


def run_node(argv: Sequence[str], layout: NodeLayout, listen: str) -> int:
    """Runs the node's ranks until one exits (returns its code) or SIGTERM/SIGINT (returns 0)."""
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    procs = [subprocess.Popen(rank_command(argv, layout, i, listen)) for i in range(layout.ranks_per_node)]
    log.info("node started", node_rank=layout.node_rank, ranks=list(layout.ranks), pids=[p.pid for p in procs])
    code = None
    while code is None and not stopping:
        time.sleep(0.1)
        for rank, proc in zip(layout.ranks, procs):
            if proc.poll() is not None:
                code = proc.returncode
                log.error("a rank of this node exited; stopping the node's other ranks", rank=rank, exit_code=code)
                break
    stop(procs)
    return 0 if code is None else (code if code > 0 else 1)


def stop(procs: Sequence[subprocess.Popen], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM every child still running, SIGKILL after `grace` seconds."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
