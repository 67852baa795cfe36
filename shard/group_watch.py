"""Exit when the shard group breaks, so that an orchestrator recreates it (split deployments).

A torch.distributed group cannot lose one rank and go on, and the survivors of a dead peer notice
nothing while idle: they stay up and SERVING, and a peer restarted alone cannot join them. Under
`shardline launch` the router tears the whole group down; under compose (`restart: always`) or
Kubernetes only a process that exits gets restarted. So a rank that no launcher owns runs a
heartbeat: a one-element all-reduce every `interval` seconds over a gloo group of its own (its own
connections, so it never interleaves with the engine's collectives). When it fails (a peer's
connection closed: at once; a peer hung: after --collective-timeout) the rank logs why and exits
with code 1. The first beat waits for every rank to finish loading, so it gets the same timeout. An engine call that
fails unexpectedly in a multi-rank group ends the rank the same way, after its answer is sent.
"""

from __future__ import annotations

import os
import sys
import threading
from datetime import timedelta

import structlog

log = structlog.get_logger("shardline.shard")
INTERVAL_S = 1.0


def exit_broken(reason: str, rank: int) -> None:
    """Ends this rank at once: its group is unusable and only a new one can serve."""
    log.error("shard group broken; exiting so that the whole group is recreated", reason=reason, rank=rank)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


class GroupWatch:
    """The heartbeat of one rank; every rank constructs it at the same point (that makes a group)."""

    def __init__(self, rank: int, collective_timeout_s: float, interval_s: float = INTERVAL_S):
        import torch.distributed as dist

        self.rank = rank
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=collective_timeout_s))
        self.interval_s = interval_s
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="group-watch", daemon=True)

    def start(self) -> "GroupWatch":
        self.thread.start()
        return self

    def stop(self) -> None:
        """No more heartbeats (before a deliberate shutdown; peers then exit when this rank is gone)."""
        self.stopping.set()

    def _beat(self) -> None:
        import torch
        import torch.distributed as dist

        beat = torch.zeros(1)
        while not self.stopping.wait(self.interval_s):
            try:
                dist.all_reduce(beat, group=self.group)
            except Exception as exc:  # a peer died or hung: the group is gone
                if not self.stopping.is_set():
                    exit_broken(f"heartbeat failed: {str(exc).splitlines()[0][:300]}", self.rank)
                return
