"""Two "nodes" on one host, one pod each in the multi-node layout (issue 16, item 6): each node is
one `shardline shard --ranks-per-node 2` command holding a TP=2 stage, PP=2 across the nodes, on
gloo, with the environment a LeaderWorkerSet gives its pods (LWS_WORKER_INDEX, LWS_GROUP_SIZE,
LWS_LEADER_ADDRESS) and a router in front. Greedy output equals transformers; a killed rank takes
its node down, the other node follows, both are restarted as a kubelet would, and a stream that
was running ends exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from checkpoints import reference_generate
from router_harness import READY_RE
from shardline.client import Client
from supervision_harness import SMALL_LIMITS, cmdline, wait_until

pytestmark = pytest.mark.slow
PROMPT = [17, 42, 99, 5, 250]
NEW_TOKENS = 120
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def free_pair() -> int:
    """A port p with p and p + 1 both free (a node's two ranks listen on them)."""
    while True:
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                with contextlib.suppress(OSError):
                    b.bind(("127.0.0.1", port + 1))
                    return port


class Kubelet:
    """Runs one node's command and starts it again whenever it exits (restartPolicy: Always)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        self.argv, self.env, self.log = argv, env, log
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._keep_running, daemon=True)

    def _keep_running(self) -> None:
        while not self.stopped.is_set():
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)
            self.starts += 1
            self.proc.wait()
            time.sleep(0.2)

    def ranks(self) -> dict[int, int]:
        """{rank: pid} of this node's live rank processes (children of its current command)."""
        found = {}
        for entry in Path("/proc").iterdir():
            args = cmdline(int(entry.name)) if entry.name.isdigit() else []
            if "--parent-pid" in args and self.proc and args[args.index("--parent-pid") + 1] == str(self.proc.pid):
                last = max(i for i, arg in enumerate(args) if arg == "--rank")
                found[int(args[last + 1])] = int(entry.name)
        return found

    def close(self) -> None:
        self.stopped.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@contextlib.contextmanager
def two_nodes(model: Path, workdir: Path) -> Iterator[tuple[list[Kubelet], Client, Path]]:
    bases, master = [free_pair(), free_pair()], free_pair()
    nodes = []
    for index, base in enumerate(bases):
        env = {**ENV, "LWS_WORKER_INDEX": str(index), "LWS_GROUP_SIZE": "2", "LWS_LEADER_ADDRESS": "127.0.0.1",
               "MASTER_PORT": str(master)}
        argv = [sys.executable, "-m", "shardline.client.cli", "shard", "--model", str(model), "--tp", "2", "--pp", "2",
                "--ranks-per-node", "2", "--listen", f"127.0.0.1:{base}", "--insecure-shard-port", "--threads", "1",
                "--kv-cache-tokens", "2048", "--collective-timeout", "60", "--log-level", "warning"]
        nodes.append(Kubelet(argv, env, workdir / f"node{index}.log"))
    shards = ",".join(f"127.0.0.1:{base + i}" for base in bases for i in range(2))
    router_log = workdir / "router.log"
    with open(router_log, "wb") as out:
        router = subprocess.Popen(
            [sys.executable, "-m", "shardline.client.cli", "router", "--model", str(model), "--shards", shards,
             "--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--metrics-port", "0", *SMALL_LIMITS[:6],
             "--health-interval", "2", "--max-restarts", "5", "--log-level", "warning"],
            env=ENV, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        for node in nodes:
            node.thread.start()
        assert wait_until(lambda: READY_RE.search(router_log.read_text()) or router.poll() is not None, 240), \
            router_log.read_text()
        match = READY_RE.search(router_log.read_text())
        assert match, router_log.read_text()
        yield nodes, Client(f"{match.group(1)}:{match.group(2)}", retries=0), router_log
    finally:
        router.kill()
        router.wait()
        for node in nodes:
            node.close()


def test_two_nodes_serve_like_transformers_and_recover_from_a_killed_rank(checkpoint_factory, tmp_path):
    model = checkpoint_factory(arch="llama", num_layers=4)
    expected = reference_generate(model, [PROMPT], NEW_TOKENS)[0]
    with two_nodes(model, tmp_path) as (nodes, client, router_log):
        assert sorted(nodes[0].ranks()) == [0, 1] and sorted(nodes[1].ranks()) == [2, 3]
        got = client.generate(prompt_token_ids=PROMPT, max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True,
                              timeout=120).token_ids
        assert list(got) == expected
        info = client.info(timeout=10)
        assert [(s.rank, s.tp_rank, s.pp_rank) for s in info.shards] == [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]

        chunks: list = []
        errors: list = []

        def stream() -> None:
            try:
                for chunk in client.generate_stream(prompt_token_ids=PROMPT, max_new_tokens=NEW_TOKENS, temperature=0,
                                                    ignore_eos=True, timeout=300):
                    chunks.append(chunk)
                    if len(chunks) == 10:
                        os.kill(nodes[1].ranks()[3], signal.SIGKILL)
            except Exception as exc:  # noqa: BLE001 - shown by the assertion below
                errors.append(exc)

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        reader.join(300)
        assert not errors, f"{errors}\n{router_log.read_text()[-3000:]}"
        assert [c.token_id for c in chunks] == expected, router_log.read_text()[-3000:]
        assert nodes[0].starts >= 2 and nodes[1].starts >= 2, "both nodes should have been recreated"
        assert client.info(timeout=10).restarts >= 1
