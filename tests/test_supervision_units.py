"""Supervision without processes: exit descriptions, the /dev/shm check, NCCL flags -> environment,
and the Supervisor's restart budget, watcher and failure reasons against a fake group owner."""

from __future__ import annotations

import argparse
import asyncio
import signal
from types import SimpleNamespace

import pytest

from shardline.router.group import nccl, supervisor
from shardline.router.group.supervisor import GroupGaveUp, RestartPolicy, Supervisor, describe_exit

FIXES = ("--shm-size", "shm_size", "emptyDir", "medium: Memory", "--nccl-shm off")


# -- how a shard ended -----------------------------------------------------------------------------
def test_sigbus_is_explained_like_a_small_dev_shm():
    text = describe_exit(-signal.SIGBUS)
    assert "SIGBUS" in text and "/dev/shm" in text
    for fix in FIXES:
        assert fix in text, fix
    assert nccl.SHM_FIXES in text  # the same explanation as the start-up check


def test_other_exits_are_plain():
    assert describe_exit(1) == "exit code 1"
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"
    assert "shm" not in describe_exit(-signal.SIGSEGV).lower()


# -- /dev/shm --------------------------------------------------------------------------------------
def test_check_shm_names_path_sizes_and_fixes(tmp_path):
    import os

    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    with pytest.raises(RuntimeError) as failed:
        nccl.check_shm(tmp_path, free + 2**40)
    message = str(failed.value)
    assert str(tmp_path) in message and "MiB free" in message and "SIGBUS" in message
    for fix in FIXES:
        assert fix in message, fix
    nccl.check_shm(tmp_path, 1)  # enough: no error
    nccl.check_shm(tmp_path / "missing", 0)  # nothing required: not even looked at


def test_check_shm_on_a_missing_path_says_so(tmp_path):
    with pytest.raises(RuntimeError, match="cannot check shared memory"):
        nccl.check_shm(tmp_path / "missing", 1)


def test_required_shm_bytes():
    assert nccl.required_shm_bytes(123, "cuda", 4, {}) == 123  # explicit wins
    assert nccl.required_shm_bytes(None, "cuda", 2, {}) == 2 * nccl.SHM_PER_RANK
    assert nccl.required_shm_bytes(None, "cuda", 2, {"NCCL_SHM_DISABLE": "1"}) == 0
    assert nccl.required_shm_bytes(None, "cuda", 1, {}) == 0
    assert nccl.required_shm_bytes(None, "cpu", 4, {}) == 0


# -- NCCL flags -> environment ---------------------------------------------------------------------
def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    nccl.add_arguments(p)
    return p.parse_args(argv)


def test_every_flag_becomes_its_variable_and_overrides_the_user():
    args = parse("--nccl-shm", "off", "--nccl-p2p", "off", "--nccl-p2p-level", "NVL", "--nccl-ib", "on",
                 "--nccl-socket-ifname", "eth0", "--nccl-debug", "INFO")
    user = {"NCCL_ALGO": "Tree", "NCCL_P2P_DISABLE": "0", "NCCL_DEBUG": "WARN", "PATH": "/bin", "GLOO_X": "1"}
    env = nccl.NcclSettings.from_args(args).environment(user)
    assert env == {"NCCL_ALGO": "Tree", "NCCL_SHM_DISABLE": "1", "NCCL_P2P_DISABLE": "1", "NCCL_P2P_LEVEL": "NVL",
                   "NCCL_IB_DISABLE": "0", "NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0",
                   "NCCL_DEBUG": "INFO"}


def test_without_flags_the_users_nccl_environment_is_kept_as_is():
    user = {"NCCL_SHM_DISABLE": "1", "NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "ib0", "HOME": "/root"}
    env = nccl.NcclSettings.from_args(parse()).environment(user)
    assert env == {"NCCL_SHM_DISABLE": "1", "NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "ib0"}


def test_on_off_flags_refuse_other_values(capsys):
    with pytest.raises(SystemExit):
        parse("--nccl-shm", "yes")
    assert "expected on or off" in capsys.readouterr().err


# -- the Supervisor against a fake owner ------------------------------------------------------------
class FakeGroup:
    def __init__(self) -> None:
        self.broken = asyncio.Event()
        self.broken_reason = ""
        self.closed = False
        self.healthy = True

    def mark_broken(self, reason: str) -> None:
        self.broken_reason = reason
        self.broken.set()

    async def close(self) -> None:
        self.closed = True

    async def serving(self, timeout: float = 2.0) -> bool:
        return self.healthy


class FakeOwner:
    """Fails `up()` with the given errors in turn, then succeeds; records every call."""

    def __init__(self, failures=(), exit_reason: str | None = None) -> None:
        self.failures = list(failures)
        self.exit = exit_reason
        self.calls: list[str] = []
        self.groups: list[FakeGroup] = []

    async def up(self) -> FakeGroup:
        self.calls.append("up")
        if self.failures:
            raise self.failures.pop(0)
        self.groups.append(FakeGroup())
        return self.groups[-1]

    async def down(self) -> None:
        self.calls.append("down")

    def exit_reason(self) -> str | None:
        return self.exit


def policy(**kwargs) -> RestartPolicy:
    return RestartPolicy(**{"max_restarts": 2, "window_s": 60.0, "health_interval_s": 0.1, **kwargs})


def test_failed_starts_are_retried_within_the_budget():
    owner = FakeOwner([RuntimeError("shard rank 0 exited with exit code 1"), TimeoutError("slow")])
    sup = Supervisor(owner, policy())
    group = asyncio.run(sup.start())
    assert group is owner.groups[0] and sup.restarts == 2
    assert owner.calls == ["up", "down", "up", "down", "up"]


def test_past_max_restarts_it_gives_up_saying_why():
    owner = FakeOwner([RuntimeError(f"shard rank 0 exited with exit code {i}") for i in range(5)])
    sup = Supervisor(owner, policy())
    with pytest.raises(GroupGaveUp) as gave_up:
        asyncio.run(sup.start())
    message = str(gave_up.value)
    assert "failed 3 times within 60s" in message and "--max-restarts=2" in message
    assert "last failure: shard rank 0 exited with exit code 2" in message
    assert owner.calls.count("up") == 3  # max_restarts + 1 attempts, no more


def test_failures_older_than_the_window_are_forgotten(monkeypatch):
    now = [1000.0]  # the supervisor's clock only: asyncio keeps the real one
    monkeypatch.setattr(supervisor, "time", SimpleNamespace(monotonic=lambda: now[0]))
    sup = Supervisor(FakeOwner(exit_reason="shard rank 0 exited with exit code 1"),
                     policy(max_restarts=1, window_s=10.0))

    async def scenario() -> None:
        await sup.start()
        for _ in range(4):  # one failure every 11 s: never two within the 10 s window
            now[0] += 11.0
            await sup.restart("boom")
        now[0] += 1.0
        with pytest.raises(GroupGaveUp):
            await sup.restart("boom again")  # the second failure within 10 s

    asyncio.run(scenario())
    assert sup.restarts == 4  # the refused fifth is not counted as a restart


def test_restart_tears_down_the_old_group_and_names_the_exit():
    owner = FakeOwner(exit_reason="shard rank 1 exited with signal SIGBUS: ...")
    sup = Supervisor(owner, policy())

    async def scenario() -> str:
        old = await sup.start()
        new = await sup.restart("Decode failed on rank 0: UNAVAILABLE: Socket closed")
        assert old.closed and old.broken.is_set() and new is not old and sup.group is new
        return old.broken_reason

    reason = asyncio.run(scenario())
    assert reason == "Decode failed on rank 0: UNAVAILABLE: Socket closed (shard rank 1 exited with signal SIGBUS: ...)"
    assert owner.calls == ["up", "down", "up"]


def test_watcher_marks_the_group_broken_when_a_shard_exits_or_fails_health():
    async def scenario(owner: FakeOwner, healthy: bool) -> str:
        sup = Supervisor(owner, policy())
        group = await sup.start()
        group.healthy = healthy
        watcher = asyncio.ensure_future(sup.watch())
        try:
            await asyncio.wait_for(group.broken.wait(), 5)
        finally:
            watcher.cancel()
        return group.broken_reason

    assert asyncio.run(scenario(FakeOwner(exit_reason="shard rank 0 exited with signal SIGKILL"), True)) == \
        "shard rank 0 exited with signal SIGKILL"
    assert asyncio.run(scenario(FakeOwner(), False)) == "a shard failed its health check"
