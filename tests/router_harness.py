"""Runs `shardline launch` as a real subprocess for end-to-end tests, and always cleans it up.

`launched(...)` starts `python -m shardline.client.cli launch --host 127.0.0.1 --port 0 ...` with
its shard sockets under a test's own folder, reads the bound port from the router's
`shardline: ready on HOST:PORT` line (stderr, captured to a log file), and yields a `Server`.
On exit it sends SIGTERM and asserts what DESIGN.md promises of a shutdown: the router exits 0,
no shard child process is left, and no socket file remains. Module-scoped fixtures keep one
server for many tests: starting one costs several seconds on a small machine. The router's
output (info-level JSON logs included) is in `Server.log()`, and is shown when a start fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


READY_RE = re.compile(r"shardline: ready on (\S+):(\d+)")
LISTENING_RE = re.compile(r"shardline: listening on (\S+):(\d+)")
START_TIMEOUT = 180.0  # seconds until ready: shards import torch and load on a busy 2-core machine
STOP_TIMEOUT = 30.0
# Small limits keep Warmup (a full-size prefill) and the KV cache cheap.
SMALL_LIMITS = ("--max-input-tokens", "64", "--max-total-tokens", "160",
                "--max-batch-prefill-tokens", "512", "--kv-cache-tokens", "4096")


@dataclass
class Server:
    """A running `shardline launch`: its process, its public target and where its output goes."""

    process: subprocess.Popen
    target: str
    socket_dir: Path
    log_path: Path
    metrics_url: str | None = None
    http_url: str | None = None  # the OpenAI-compatible API's base URL, ".../v1" (launched(http=True))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def gauge(self, name: str) -> float:
        """The value of an unlabelled Prometheus gauge (needs `launched(..., metrics=True)`)."""
        assert self.metrics_url, "launched without metrics=True"
        text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))

    def children(self) -> list[int]:
        """Pids of the router's live child processes (the shards), read from /proc."""
        return child_pids(self.process.pid)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(parent: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent:
            pids.append(int(entry.name))
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_ready(process: subprocess.Popen, log_path: Path, timeout: float,
                while_loading: Callable[[str], None] | None = None) -> str:
    """The ready line's HOST:PORT; calls `while_loading(target)` once the router listens but before
    it is ready (skipped if it was already ready when first seen)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        match = READY_RE.search(text)
        if match:
            return f"{match.group(1)}:{match.group(2)}"
        listening = LISTENING_RE.search(text)
        if listening and while_loading is not None:
            while_loading(f"{listening.group(1)}:{listening.group(2)}")
            while_loading = None
        if process.poll() is not None:
            raise RuntimeError(f"shardline launch exited with {process.returncode} before ready:\n"
                               + log_path.read_text(errors="replace")[-4000:])
        time.sleep(0.1)
    raise TimeoutError(f"shardline launch not ready after {timeout:.0f}s:\n"
                       + log_path.read_text(errors="replace")[-4000:])


def _stop(server: Server) -> None:
    """SIGTERM, then check: exit 0, shards gone, sockets gone (SIGKILL only as a last resort)."""
    shards = server.children()
    server.process.send_signal(signal.SIGTERM)
    try:
        code = server.process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
        for pid in server.children() + shards:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"shardline launch ignored SIGTERM for {STOP_TIMEOUT:.0f}s:\n{server.log()[-4000:]}")
    left = [pid for pid in shards if alive(pid)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert code == 0, f"shardline launch exited with {code} on SIGTERM:\n{server.log()[-4000:]}"
    assert not left, f"shard processes {left} outlived the router"
    sockets = sorted(p.name for p in server.socket_dir.iterdir())
    assert not sockets, f"files left in the socket folder after shutdown: {sockets}"


@contextlib.contextmanager
def launched(workdir: Path, *args: str, model: Path | None = None, expect_shards: int | None = None,
             timeout: float = START_TIMEOUT, while_loading: Callable[[str], None] | None = None,
             metrics: bool = False, http: bool = False) -> Iterator[Server]:
    """Runs `shardline launch [--model model] *args` until the block ends; see the module docstring.

    `expect_shards` checks that exactly that many shard child processes run once it is ready;
    `while_loading(target)` runs once while the router listens but its shards are still loading;
    `metrics` turns the Prometheus endpoint on (a free port) for `Server.gauge`; `http` turns the
    OpenAI-compatible API on (a free port, `Server.http_url`); both are off otherwise.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    socket_dir = workdir / "sockets"
    socket_dir.mkdir(mode=0o700, exist_ok=True)  # launch refuses a socket folder others may enter
    log_path = workdir / "launch.log"
    cmd: list[str] = [sys.executable, "-m", "shardline.client.cli", "launch", "--host", "127.0.0.1",
                      "--port", "0", "--metrics-port", "0", "--http-port", "0", "--socket-dir", str(socket_dir),
                      "--threads", "1", "--log-format", "json", "--log-level", "info"]
    metrics_url = None
    if metrics:
        port = free_port()
        cmd += ["--metrics-port", str(port)]
        metrics_url = f"http://127.0.0.1:{port}/metrics"
    http_url = None
    if http:
        port = free_port()
        cmd += ["--http-port", str(port)]
        http_url = f"http://127.0.0.1:{port}/v1"
    if model is not None:
        cmd += ["--model", str(model)]
    cmd += list(args)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env)
    server = Server(process, "", socket_dir, log_path, metrics_url, http_url)
    try:
        server.target = _wait_ready(process, log_path, timeout, while_loading)
        if expect_shards is not None:
            assert len(server.children()) == expect_shards, (server.children(), server.log()[-2000:])
    except BaseException:
        process.kill()
        process.wait()
        raise
    try:
        yield server
    finally:
        _stop(server)


def launch_args(*, tp: int = 1, pp: int = 1, extra: Sequence[str] = ()) -> list[str]:
    """Group size plus the small limits every tiny-checkpoint server uses."""
    return ["--tp", str(tp), "--pp", str(pp), *SMALL_LIMITS, *extra]
