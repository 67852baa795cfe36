"""Real `shardline launch` processes for the supervision tests, and the /proc lookups they need.

`Launch` starts `python -m shardline.client.cli launch ...` (the bundled demo model unless
`--model` is given) with its output in a log file and waits for its `listening` / `ready` lines.
Shards are found by their command line (`shard ... --rank R ... --parent-pid LAUNCHER`), so a test
can signal one rank, and can check that none outlives its launcher. `launch(...)` is a context
manager that always cleans up: SIGCONT to stopped shards, SIGKILL to the launcher and to every shard
still naming it as parent, even when the test failed.
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shardline.client import Client

READY_RE = re.compile(r"shardline: ready on (\S+):(\d+)")
LISTENING_RE = re.compile(r"shardline: listening on (\S+):(\d+)")
START_TIMEOUT = 180.0  # shards import torch and load on a busy 2-core machine
STOP_TIMEOUT = 30.0
# Small limits keep Warmup (one full-size prefill) and the KV cache cheap.
SMALL_LIMITS = ("--max-input-tokens", "64", "--max-total-tokens", "160", "--max-batch-prefill-tokens", "512",
                "--kv-cache-tokens", "4096")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def is_shard(args: list[str]) -> bool:
    """A shard process: `python -m shardline.shard ...` (launch, shard nodes) or `shardline shard ...`."""
    return "shardline.shard" in args or "shard" in args


def shards_of(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the live shard processes started with `--parent-pid launcher_pid`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        args = cmdline(int(entry.name))
        if not is_shard(args) or "--parent-pid" not in args or "--rank" not in args:
            continue
        if args[args.index("--parent-pid") + 1] == str(launcher_pid) and alive(int(entry.name)):
            found[int(args[args.index("--rank") + 1])] = int(entry.name)
    return found


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@dataclass
class Launch:
    """One `shardline launch` process."""

    workdir: Path
    args: Sequence[str]
    env: Mapping[str, str] | None = None
    socket_dir: Path = field(init=False)
    log_path: Path = field(init=False)
    process: subprocess.Popen | None = None
    target: str = ""
    started_at: float = 0.0
    ready_after: float = 0.0  # seconds from start to the ready line
    listening_after: float = 0.0  # seconds from start to the listening line (the router is up)
    stopped: list[int] = field(default_factory=list)  # pids this test SIGSTOPped
    log_offset: int = 0  # where this launch's output starts in a log shared by several launches

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket_dir = self.workdir / "sockets"
        self.log_path = self.workdir / "launch.log"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "shardline.client.cli", "launch", "--host", "127.0.0.1",
                "--metrics-port", "0", "--http-port", "0", "--socket-dir", str(self.socket_dir), "--threads", "1",
                "--log-format", "json", "--log-level", "warning", *self.args]

    def start(self) -> Launch:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(self.env or {})}
        args = self.command()
        if "--port" not in args:
            args += ["--port", "0"]
        with open(self.log_path, "ab") as log_file:
            self.log_offset = log_file.tell()
            self.started_at = time.monotonic()
            self.process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env)
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """This launch's output so far."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace")

    def _wait_line(self, pattern: re.Pattern, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if not self.listening_after and LISTENING_RE.search(text):
                self.listening_after = time.monotonic() - self.started_at
            match = pattern.search(text)
            if match:
                return f"{match.group(1)}:{match.group(2)}"
            if self.process.poll() is not None:
                raise RuntimeError(f"shardline launch exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"no {pattern.pattern!r} after {timeout:.0f}s:\n{self.log()[-4000:]}")

    def wait_listening(self, timeout: float = 60.0) -> str:
        self.target = self._wait_line(LISTENING_RE, timeout)
        return self.target

    def wait_ready(self, timeout: float = START_TIMEOUT) -> str:
        self.target = self._wait_line(READY_RE, timeout)
        self.ready_after = time.monotonic() - self.started_at
        return self.target

    def client(self, **kwargs) -> Client:
        return Client(self.target, **{"retries": 0, **kwargs})

    def shards(self) -> dict[int, int]:
        return shards_of(self.pid)

    def signal_shard(self, rank: int, sig: signal.Signals) -> int:
        pid = self.shards()[rank]
        if sig == signal.SIGSTOP:
            self.stopped.append(pid)
        os.kill(pid, sig)
        return pid

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM; returns the exit code (raises TimeoutError if it does not exit in time)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"shardline launch ignored SIGTERM for {timeout:.0f}s:\n{self.log()[-4000:]}") from None

    def cleanup(self) -> None:
        """Whatever happened: no stopped, orphaned or running process of this launch is left."""
        for pid in self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        shards = self.shards() if self.process is not None else {}
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in [*shards.values(), *self.stopped, *self.shards().values()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def launch(workdir: Path, *args: str, env: Mapping[str, str] | None = None, ready: bool = True,
           timeout: float = START_TIMEOUT) -> Iterator[Launch]:
    """A started launch (ready unless `ready=False`), killed with all its shards on exit."""
    server = Launch(workdir, args, env).start()
    try:
        if ready:
            server.wait_ready(timeout)
        yield server
    finally:
        server.cleanup()


def stream_tokens(client: Client, prompt_ids: Sequence[int], max_new_tokens: int, timeout: float,
                  on_first=None) -> tuple[list[int], list[float]]:
    """Greedy stream: (token ids, arrival time of each); `on_first()` runs after the first token."""
    ids, times = [], []
    for chunk in client.generate_stream(prompt_token_ids=list(prompt_ids), max_new_tokens=max_new_tokens,
                                        temperature=0, ignore_eos=True, timeout=timeout):
        ids.append(chunk.token_id)
        times.append(time.monotonic())
        if len(ids) == 1 and on_first is not None:
            on_first()
    return ids, times


FAULT_SITECUSTOMIZE = '''\
# Written by tests/supervision_harness.py: makes every shard process (not the router) kill itself
# with SIGBUS (what NCCL dies of when /dev/shm is too small) when the router warms it up.
import os
import signal

if {b"shard", b"shardline.shard"} & set(open("/proc/self/cmdline", "rb").read().split(b"\\0")):
    from shardline.shard.engine import Engine

    def _sigbus(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGBUS)

    Engine.warmup = _sigbus
'''


EXIT_AT_LOAD_SITECUSTOMIZE = '''\
# Written by tests/supervision_harness.py: every shard process (not the router) dies with exit
# code 1 while loading its model, a failure a restart might fix (unlike a broken checkpoint).
import os

if {b"shard", b"shardline.shard"} & set(open("/proc/self/cmdline", "rb").read().split(b"\\0")):
    from shardline.shard.engine import Engine

    def _die(self, *args, **kwargs):
        os._exit(1)

    Engine.__init__ = _die
'''


def _fault_env(folder: Path, code: str) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)}


def sigbus_at_warmup_env(folder: Path) -> dict[str, str]:
    """Environment for a launch whose shards load fine, then die of SIGBUS at Warmup."""
    return _fault_env(folder, FAULT_SITECUSTOMIZE)


def exit_at_load_env(folder: Path) -> dict[str, str]:
    """Environment for a launch whose shards exit with code 1 while loading, every time."""
    return _fault_env(folder, EXIT_AT_LOAD_SITECUSTOMIZE)
