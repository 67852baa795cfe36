"""Supervision with real processes: dead and hung shards, crash loops, NCCL settings, shutdown.

One TP=2 server (the bundled demo model, gloo on CPU) lives for the module and takes the faults
in turn: a shard SIGKILLed mid-stream, a shard SIGKILLed under 8 concurrent streams, a shard
SIGSTOPped (caught by --step-timeout / the health checks). It runs with every NCCL flag set, so
the same server shows that the settings reach (and survive the restarts of) the shards. Other
tests launch their own: a checkpoint every shard crashes on, /dev/shm too small, three launches
in a row on one port and socket folder, and a router killed with SIGKILL.

Every wait is bounded; stopped or leftover processes are killed on the way out whatever happens
(supervision_harness.launch). Run with `-s` to see the measured cold-start and recovery times.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from shardline.client import ShardlineError
from shardline.client.errors import UnavailableError
from supervision_harness import (
    SMALL_LIMITS,
    Launch,
    alive,
    free_port,
    launch,
    shards_of,
    exit_at_load_env,
    sigbus_at_warmup_env,
    stream_tokens,
    wait_until,
)

pytestmark = pytest.mark.slow

DEMO_VOCAB = 3072
NEW_TOKENS = 96  # ~2 s of decoding at TP=2 on CPU: a kill after the first token lands mid-stream
STEP_TIMEOUT = 3.0
HEALTH_INTERVAL = 2.0
STREAM_BOUND = 60.0  # a stream that survives one restart must end within this (restart ~7-15 s)
NCCL_FLAGS = ("--nccl-shm", "off", "--nccl-p2p", "off", "--nccl-p2p-level", "PIX", "--nccl-ib", "off",
              # also sets GLOO_SOCKET_IFNAME: must name a real interface for gloo on CPU
              "--nccl-socket-ifname", "lo", "--nccl-debug", "WARN")
# The user's own NCCL environment: NCCL_ALGO is kept, the two others are overridden by the flags.
USER_NCCL_ENV = {"NCCL_ALGO": "Ring", "NCCL_P2P_DISABLE": "0", "NCCL_SHM_DISABLE": "0"}


def prompt(seed: int, length: int = 12) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, DEMO_VOCAB) for _ in range(length)]


def report(line: str) -> None:
    print(f"\n[supervision] {line}", file=sys.stderr)


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    args = ("--tp", "2", *SMALL_LIMITS, "--step-timeout", str(STEP_TIMEOUT),
            "--health-interval", str(HEALTH_INTERVAL), "--max-restarts", "10", *NCCL_FLAGS)
    with launch(tmp_path_factory.mktemp("tp2"), *args, env=USER_NCCL_ENV) as server:
        report(f"cold start (launch -> ready, TP=2 demo model): {server.ready_after:.1f}s, of which "
               f"{server.ready_after - server.listening_after:.1f}s from the router listening to ready (the shards)")
        yield server
        code = server.terminate()
        assert code == 0, server.log()[-4000:]


@pytest.fixture(scope="module")
def references(tp2):
    """Uninterrupted greedy runs on the same server, by prompt seed (run together: one batch)."""
    client = tp2.client()
    with ThreadPoolExecutor(8) as pool:
        runs = {seed: pool.submit(stream_tokens, client, prompt(seed), NEW_TOKENS, 60) for seed in range(8)}
        return {seed: run.result(timeout=90)[0] for seed, run in runs.items()}


def restarts(server: Launch) -> int:
    return server.client().info(timeout=10).restarts


def test_sigkill_one_shard_mid_stream_resumes_identically(tp2, references):
    before = restarts(tp2)
    old = tp2.shards()
    killed_at: list[float] = []

    def kill_rank1() -> None:
        killed_at.append(time.monotonic())
        tp2.signal_shard(1, signal.SIGKILL)

    log_start = len(tp2.log())
    start = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(stream_tokens, tp2.client(), prompt(0), NEW_TOKENS, STREAM_BOUND, kill_rank1)
        # Noticed at once (a watcher on the processes), not at the next health check or step timeout.
        noticed = wait_until(lambda: "restarting shard group" in tp2.log()[log_start:], 30, 0.05)
        detected = time.monotonic() - killed_at[0] if killed_at else None
        tokens, times = run.result(timeout=STREAM_BOUND + 10)
    total = time.monotonic() - start

    assert noticed, tp2.log()[-4000:]
    assert detected < 3.0, f"the dead shard was noticed only after {detected:.1f}s"
    assert tokens == references[0]
    assert total < STREAM_BOUND
    # It really was interrupted mid-stream: a pause (the restart) after the kill, then more tokens.
    # (Tokens sampled before the kill may still arrive right after it.)
    gaps = [(b - a, b) for a, b in zip(times, times[1:]) if b > killed_at[0]]
    assert gaps, "the stream had ended before the shard was killed"
    pause, resumed_at = max(gaps)
    assert pause > 1.0, f"no restart pause in the stream (longest gap {pause:.2f}s)"
    resumed = resumed_at - killed_at[0]
    assert restarts(tp2) == before + 1
    new = tp2.shards()
    assert len(new) == 2 and not set(new.values()) & set(old.values())
    assert not any(alive(pid) for pid in old.values())
    report(f"shard SIGKILL mid-stream -> restart began after {detected:.2f}s, next token after {resumed:.1f}s "
           f"(cold start {tp2.ready_after:.1f}s); stream of {len(tokens)} tokens took {total:.1f}s")


def test_every_stream_ends_when_a_shard_dies_under_load(tp2, references):
    """8 concurrent streams, rank 0 SIGKILLed once they run: each completes identically, none hangs."""
    before = restarts(tp2)
    started = threading.Event()
    client = tp2.client()

    def one(seed: int):
        return stream_tokens(client, prompt(seed), NEW_TOKENS, timeout=STREAM_BOUND, on_first=started.set)[0]

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, seed) for seed in range(8)]
        assert started.wait(30), "no stream started"
        time.sleep(0.2)
        tp2.signal_shard(0, signal.SIGKILL)
        outcomes = [f.result(timeout=STREAM_BOUND + 10) for f in futures]
    elapsed = time.monotonic() - start

    assert elapsed < STREAM_BOUND + 10
    # One restart, within --max-restarts: every running stream is re-prefilled and continues exactly.
    assert outcomes == [references[seed] for seed in range(8)]
    assert restarts(tp2) == before + 1
    report(f"8 streams, rank 0 SIGKILLed: 8/8 completed identically within {elapsed:.1f}s")


def test_sigstop_one_shard_detected_and_group_restarted(tp2, references):
    before = restarts(tp2)
    log_start = len(tp2.log())
    stopped: list[tuple[int, float]] = []

    def stop_rank1() -> None:
        stopped.append((tp2.signal_shard(1, signal.SIGSTOP), time.monotonic()))

    def run():
        try:
            return stream_tokens(tp2.client(), prompt(1), NEW_TOKENS, timeout=STREAM_BOUND, on_first=stop_rank1)[0]
        except ShardlineError as exc:
            return exc

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run)
        assert wait_until(lambda: bool(stopped), 30)
        stopped_pid, stopped_at = stopped[0]
        # Detected: the router logs the failed step / restart within about --step-timeout.
        assert wait_until(lambda: "restarting shard group" in tp2.log()[log_start:], STEP_TIMEOUT + 10, 0.05), \
            tp2.log()[-4000:]
        detected = time.monotonic() - stopped_at
        # Restarting (the stopped rank alone takes the 5 s SIGTERM grace to go): not ready, but alive.
        probe = tp2.client()
        during_restart = {s: probe.health(s, timeout=2) for s in ("", "readiness", "liveness")}
        outcome = future.result(timeout=STREAM_BOUND + 10)

    if isinstance(outcome, ShardlineError):
        assert outcome.code == grpc.StatusCode.UNAVAILABLE, outcome
    else:
        assert outcome == references[1]
    assert detected < STEP_TIMEOUT + 5
    assert during_restart == {"": False, "readiness": False, "liveness": True}, during_restart
    assert wait_until(lambda: not alive(stopped_pid), 15), "the stopped shard was not killed"
    assert restarts(tp2) == before + 1
    assert stream_tokens(tp2.client(), prompt(2), 8, timeout=60)[0] == references[2][:8]  # serving again
    report(f"shard SIGSTOP mid-stream (--step-timeout {STEP_TIMEOUT:.0f}s) -> restart logged after "
           f"{detected:.1f}s; request {'completed identically' if not isinstance(outcome, ShardlineError) else outcome}")


def test_nccl_settings_reach_every_shard(tp2):
    """After the restarts above too: each generation gets the same environment."""
    shards = tp2.client().info(timeout=10).shards
    assert len(shards) == 2
    for shard in shards:
        env = shard.environment
        assert env.get("NCCL_SHM_DISABLE") == "1", env  # --nccl-shm off beats the user's 0
        assert env.get("NCCL_P2P_DISABLE") == "1", env  # --nccl-p2p off beats the user's 0
        assert env.get("NCCL_P2P_LEVEL") == "PIX", env
        assert env.get("NCCL_IB_DISABLE") == "1", env
        assert env.get("NCCL_SOCKET_IFNAME") == "lo", env
        assert env.get("GLOO_SOCKET_IFNAME") == "lo", env
        assert env.get("NCCL_DEBUG") == "WARN", env
        assert env.get("NCCL_ALGO") == "Ring", env  # the user's own setting, kept


def test_health_serving_when_ready(tp2):
    client = tp2.client()
    for service in ("", "shardline.v1.Generation", "readiness", "liveness"):
        assert client.health(service, timeout=10), service


def broken_checkpoint(dest: Path) -> Path:
    """The demo model with its safetensors file truncated: the router reads config and tokenizer
    fine, every shard crashes loading the weights."""
    from shardline.demo import model_dir

    src = model_dir()
    dest.mkdir()
    for item in src.iterdir():
        if item.suffix == ".safetensors":
            (dest / item.name).write_bytes(item.read_bytes()[:4096])
        else:
            shutil.copy(item, dest / item.name)
    return dest


def test_crash_loop_stops_at_the_limit_and_router_stays_up(tmp_path):
    """Shards that die while loading, every time (a failure a restart might have fixed; a broken
    checkpoint is refused once instead, see test_settings.py)."""
    with launch(tmp_path / "run", "--tp", "1", *SMALL_LIMITS, "--max-restarts", "2",
                "--restart-window", "120", env=exit_at_load_env(tmp_path / "fault"), ready=False) as server:
        server.wait_listening()
        client = server.client()
        # Loading: the process is alive, not ready.
        assert client.health("liveness", timeout=10)
        assert not client.health("readiness", timeout=10)
        assert not client.health("", timeout=10)

        assert wait_until(lambda: "giving up on the shard group" in server.log(), 120), server.log()[-4000:]
        with pytest.raises(UnavailableError) as failed:
            client.generate(prompt_token_ids=prompt(0), max_new_tokens=4, temperature=0, timeout=10)
        message = failed.value.message
        assert "--max-restarts=2" in message and "failed 3 times" in message, message
        assert "last failure" in message and "exited with exit code 1" in message, message
        with pytest.raises(UnavailableError):  # streams too
            list(client.generate_stream(prompt_token_ids=prompt(0), max_new_tokens=4, timeout=10))

        # Exactly max-restarts + 1 attempts, then no more shards.
        assert server.log().count('"event": "shard group failed"') == 2, server.log()[-4000:]  # + the third: giving up
        assert wait_until(lambda: not server.shards(), 10)
        time.sleep(1.0)
        assert not server.shards()

        # Still up and answering (Tokenize), but liveness NOT_SERVING so an orchestrator restarts it.
        assert server.process.poll() is None
        assert not client.health("liveness", timeout=10)
        for service in ("", "shardline.v1.Generation", "readiness"):
            assert not client.health(service, timeout=10), service
        assert client.tokenize("hello world", timeout=10)

        start = time.monotonic()
        assert server.terminate(timeout=15) == 0, server.log()[-4000:]
        report(f"gave up after 3 failed starts; SIGTERM -> exit 0 in {time.monotonic() - start:.1f}s")


def test_a_truncated_checkpoint_ends_launch_once_without_restarts(tmp_path):
    model = broken_checkpoint(tmp_path / "broken")
    with launch(tmp_path / "run", "--model", str(model), "--tp", "1", *SMALL_LIMITS, "--max-restarts", "5",
                ready=False) as server:
        assert server.process.wait(timeout=120) == 1, server.log()[-4000:]
        errors = [line for line in server.log().splitlines() if line.startswith("shardline: error:")]
        assert len(errors) == 1 and "cannot start, and restarting will not help" in errors[0], server.log()[-4000:]
        assert "Traceback" not in server.log() and "restarting shard group" not in server.log()


def test_shard_killed_by_sigbus_at_warmup_is_retried_then_explained(tmp_path):
    """Shards that load, then die of SIGBUS when warmed up (as NCCL does on a small /dev/shm): the
    group is restarted up to the limit like any failure, and the reason the router gives names
    /dev/shm and the fixes."""
    env = sigbus_at_warmup_env(tmp_path / "fault")
    with launch(tmp_path / "run", "--tp", "1", *SMALL_LIMITS, "--max-restarts", "1", "--restart-window", "120",
                env=env, ready=False) as server:
        server.wait_listening()
        assert wait_until(lambda: "giving up on the shard group" in server.log() or server.process.poll() is not None,
                          120), server.log()[-4000:]
        assert server.process.poll() is None, f"the router exited:\n{server.log()[-4000:]}"
        with pytest.raises(UnavailableError) as failed:
            server.client().generate(prompt_token_ids=prompt(0), max_new_tokens=4, temperature=0, timeout=10)
        message = failed.value.message
        assert "--max-restarts=1" in message and "SIGBUS" in message, message
        for fix in ("/dev/shm", "--shm-size", "medium: Memory", "--nccl-shm off"):
            assert fix in message, (fix, message)
        assert server.terminate(timeout=15) == 0, server.log()[-4000:]


def test_dev_shm_too_small_fails_at_once_with_the_fixes(tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    cmd = [sys.executable, "-m", "shardline.client.cli", "launch", "--tp", "2", "--port", "0", "--metrics-port", "0",
           "--http-port", "0",
           "--socket-dir", str(tmp_path / "sockets"), "--shm-check-path", str(tmp_path),
           "--shm-required-bytes", str(free + 2**40)]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    err = done.stderr
    assert str(tmp_path) in err and "MiB free" in err, err
    for fix in ("--shm-size", "shm_size", "emptyDir", "medium: Memory", "--nccl-shm off"):
        assert fix in err, (fix, err)
    assert "listening" not in err  # refused before serving or spawning anything
    assert not (tmp_path / "sockets").exists() or not any((tmp_path / "sockets").iterdir())
    report(f"/dev/shm check failed the launch in {elapsed:.1f}s")


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def test_start_serve_sigterm_three_times_leaves_nothing_behind(tmp_path):
    port = free_port()
    shm_before = shm_entries()
    ready_times = []
    for attempt in range(3):
        server = Launch(tmp_path, ("--tp", "2", *SMALL_LIMITS, "--port", str(port))).start()
        try:
            target = server.wait_ready()
            assert target.endswith(f":{port}")
            ready_times.append(server.ready_after)
            shards = server.shards()
            assert len(shards) == 2
            tokens, _ = stream_tokens(server.client(), prompt(attempt), 8, timeout=30)
            assert len(tokens) == 8
            assert server.terminate() == 0, server.log()[-4000:]
            assert not shards_of(server.pid), f"attempt {attempt}: shards outlived the launcher"
            assert not any(alive(pid) for pid in shards.values())
            assert not list(server.socket_dir.iterdir()), list(server.socket_dir.iterdir())
        finally:
            server.cleanup()
    # Other test runs may come and go in /dev/shm meanwhile: only entries that stay count.
    assert wait_until(lambda: not (shm_entries() - shm_before), 5), shm_entries() - shm_before
    report("three launches in a row on port %d: ready after %s s" % (port, ", ".join(f"{t:.1f}" for t in ready_times)))


def test_sigkill_router_takes_its_shards_down(tmp_path):
    with launch(tmp_path, "--tp", "2", *SMALL_LIMITS) as server:
        shards = server.shards()
        assert len(shards) == 2
        server.process.kill()
        server.process.wait()
        killed = time.monotonic()
        assert wait_until(lambda: not any(alive(pid) for pid in shards.values()), 15), \
            f"orphaned shards: {[p for p in shards.values() if alive(p)]}"
        gone = time.monotonic() - killed
        assert wait_until(lambda: not list(server.socket_dir.iterdir()), 5), list(server.socket_dir.iterdir())
    report(f"router SIGKILL -> its shards exited within {gone:.1f}s")
