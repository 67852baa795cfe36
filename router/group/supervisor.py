"""Supervision of the shard group: bring it up, watch it, and restart it whole when it fails.

A group fails when a shard process exits (noticed at once by a watcher, which fails the step in
flight), when health checks fail, or when a step outlasts --step-timeout. A NCCL group cannot lose
one rank and go on, so every shard is torn down (SIGTERM, then SIGKILL) and a new generation is
spawned with a fresh rendezvous port and socket names, then warmed up. More than --max-restarts
failures within --restart-window seconds stop the retries: the router stays up, answers
UNAVAILABLE with the reason, and reports NOT_SERVING.

`LocalGroup` spawns the shards itself (`shardline launch`); `RemoteGroup` only connects to shards
an orchestrator runs (`shardline router --shards ...`) and waits for them to come back.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import deque
from dataclasses import dataclass

import structlog

from shardline.router.group.nccl import SHM_FIXES
from shardline.router.group.processes import GroupSpec, ShardProcesses
from shardline.router.group.shards import ShardGroup
from shardline.common.tls import ClientTlsFiles
from shardline.shard.startup import CONFIG_EXIT

log = structlog.get_logger("shardline.router")


class GroupGaveUp(RuntimeError):
    """The group failed too often; the message says why and what failed last."""


class ShardsCannotLoad(Exception):
    """A shard exited with CONFIG_EXIT (its settings or checkpoint can never work): restarting
    would only repeat it, so the launcher stops with the reason instead. Not a RuntimeError, so
    no retry loop catches it."""


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5
    window_s: float = 300.0
    health_interval_s: float = 5.0
    startup_timeout_s: float = 600.0
    step_timeout_s: float = 60.0


class LocalGroup:
    """Shard processes spawned on this host, one generation at a time."""

    def __init__(self, spec: GroupSpec, policy: RestartPolicy):
        self.spec, self.policy = spec, policy
        self.generation = -1
        self.procs: ShardProcesses | None = None

    async def up(self) -> ShardGroup:
        self.generation += 1
        self.procs = ShardProcesses(self.spec, self.generation)
        self.procs.start()
        log.info("starting shards", generation=self.generation, world_size=self.spec.world_size,
                 pids=[p.pid for p in self.procs.procs])
        group = ShardGroup(self.procs.addresses, self.policy.step_timeout_s)
        deadline = time.monotonic() + self.policy.startup_timeout_s
        while not await group.serving(timeout=1.0):
            self.raise_if_exited()
            if time.monotonic() > deadline:
                raise TimeoutError(f"shards not ready after {self.policy.startup_timeout_s:.0f}s (--startup-timeout)")
            await asyncio.sleep(0.1)
        return group

    def raise_if_exited(self) -> None:
        dead = self.procs.exited() if self.procs else []
        final = [rank for rank, code in dead if code == CONFIG_EXIT]
        if final:
            ranks = ", ".join(map(str, final))
            raise ShardsCannotLoad(f"shard rank {ranks} cannot start, and restarting will not help: "
                                   f"{self.procs.reasons(final)}")
        if dead:
            raise RuntimeError("shard " + ", ".join(f"rank {r} exited with {describe_exit(c)}" for r, c in dead))

    async def down(self, grace: float = 5.0) -> None:
        """Stops the shards: SIGTERM, SIGKILL after `grace` seconds."""
        if self.procs is not None:
            await asyncio.to_thread(self.procs.stop, grace)

    def exit_reason(self) -> str | None:
        try:
            self.raise_if_exited()
        except (RuntimeError, ShardsCannotLoad) as exc:
            return str(exc)
        return None


class RemoteGroup:
    """Shards run by an orchestrator: the router can only wait for them to be back."""

    def __init__(self, addresses: list[str], policy: RestartPolicy, tls: ClientTlsFiles = ClientTlsFiles()):
        self.addresses, self.policy, self.tls = addresses, policy, tls  # tls: --shard-tls-*

    async def up(self) -> ShardGroup:
        group = ShardGroup(self.addresses, self.policy.step_timeout_s, tls=self.tls)
        log.info("waiting for shards", addresses=self.addresses)
        await group.wait_serving(self.policy.startup_timeout_s)
        return group

    async def down(self, grace: float = 5.0) -> None:
        return None

    def exit_reason(self) -> str | None:
        return None


def describe_exit(code: int) -> str:
    """How a shard ended, with the fix when the cause is known (SIGBUS: /dev/shm too small)."""
    if code == CONFIG_EXIT:
        return f"exit code {code} (its settings or checkpoint cannot work)"
    if code >= 0:
        return f"exit code {code}"
    name = signal.Signals(-code).name
    if -code == signal.SIGBUS:
        return (f"signal {name}: NCCL ran out of shared memory in /dev/shm. Fix: {SHM_FIXES}")
    return f"signal {name}"


class Supervisor:
    """Keeps a working shard group available to the batcher, or says plainly why it cannot."""

    def __init__(self, owner: LocalGroup | RemoteGroup, policy: RestartPolicy):
        self.owner, self.policy = owner, policy
        self.group: ShardGroup | None = None
        self.failures: deque[float] = deque()
        self.restarts = 0
        self.lock = asyncio.Lock()

    async def start(self) -> ShardGroup:
        """Brings the group up, retrying failed starts within the restart budget."""
        while True:
            try:
                self.group = await self.owner.up()
                return self.group
            except (RuntimeError, TimeoutError) as exc:
                await self.owner.down()
                self._count_failure(str(exc))
                self.restarts += 1

    async def restart(self, reason: str, counted: bool = True) -> ShardGroup:
        """Tears the whole group down and brings a new one up. `counted`: False when the failure
        was charged to the requests of the failed step, so it does not use up --max-restarts."""
        async with self.lock:
            reason = await self._with_exit(reason)
            log.warning("restarting shard group", reason=reason)
            if self.group is not None:
                self.group.mark_broken(reason)
                await self.group.close()
            await self.owner.down()
            if counted:
                self._count_failure(reason)
            self.restarts += 1
            return await self.start()

    async def _with_exit(self, reason: str, wait_s: float = 0.5) -> str:
        """The failure plus how a shard ended, if one did: a step can fail on the closed connection
        before the watcher has seen the exit, and the exit (say SIGBUS: /dev/shm) is the real news."""
        deadline = time.monotonic() + wait_s
        exited = self.owner.exit_reason()
        while exited is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            exited = self.owner.exit_reason()
        return f"{reason} ({exited})" if exited and exited not in reason else reason

    def _count_failure(self, reason: str) -> None:
        now = time.monotonic()
        self.failures.append(now)
        while self.failures and self.failures[0] < now - self.policy.window_s:
            self.failures.popleft()
        if len(self.failures) > self.policy.max_restarts:
            raise GroupGaveUp(f"the shard group failed {len(self.failures)} times within "
                              f"{self.policy.window_s:.0f}s (--max-restarts={self.policy.max_restarts}); "
                              f"last failure: {reason}")
        log.error("shard group failed", reason=reason, failures_in_window=len(self.failures))

    async def watch(self) -> None:
        """Marks the group broken the moment a shard exits or stops answering health checks."""
        last_health = time.monotonic()
        while True:
            await asyncio.sleep(0.05)
            group = self.group
            if group is None or group.broken.is_set() or self.lock.locked():
                continue
            reason = self.owner.exit_reason()
            if reason is None and time.monotonic() - last_health > self.policy.health_interval_s:
                last_health = time.monotonic()
                if not await group.serving(timeout=self.policy.health_interval_s):
                    reason = "a shard failed its health check"
            if reason is not None and group is self.group:
                group.mark_broken(reason)
