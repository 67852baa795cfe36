"""Split deployment (`shardline shard` + `shardline router --shards`): after a step fails, the shard
that survived still holds the old requests. The router clears the shards' state before it resumes,
so the interrupted stream goes on and ends exactly as an uninterrupted one (issue 11, item 9).

The failure is a shard frozen (SIGSTOP) past --step-timeout and then thawed: the orchestrator did
not restart it, so it comes back with everything it held before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from router_harness import READY_RE
from shardline.client import Client
from shardline.demo import model_dir
from supervision_harness import SMALL_LIMITS, wait_until

pytestmark = pytest.mark.slow
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
PROMPT = [5, 6, 7, 8]
NEW_TOKENS = 150


@contextlib.contextmanager
def process(argv: list[str], log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "shardline.client.cli", *argv], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=ENV)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


def test_a_thawed_shard_is_cleared_before_the_stream_resumes(tmp_path: Path):
    sock = tmp_path / "shard-0.sock"
    shard_argv = ["shard", "--model", str(model_dir()), "--listen", f"unix://{sock}", "--threads", "1",
                  "--kv-cache-tokens", "4096", "--log-level", "warning"]
    router_argv = ["router", "--model", str(model_dir()), "--shards", f"unix://{sock}", "--host", "127.0.0.1",
                   "--port", "0", "--metrics-port", "0", *SMALL_LIMITS[:6], "--step-timeout", "2",
                   "--health-interval", "1", "--max-restarts", "3", "--log-level", "warning"]
    with process(shard_argv, tmp_path / "shard.log") as shard, \
            process(router_argv, tmp_path / "router.log") as router:
        log = lambda: (tmp_path / "router.log").read_text(errors="replace")  # noqa: E731
        assert wait_until(lambda: READY_RE.search(log()) or router.poll() is not None, 180), log()
        match = READY_RE.search(log())
        assert match, log()
        client = Client(f"{match.group(1)}:{match.group(2)}", retries=0)
        expected = client.generate(prompt_token_ids=PROMPT, max_new_tokens=NEW_TOKENS, temperature=0,
                                   ignore_eos=True, timeout=60).token_ids
        chunks: list = []
        errors: list = []

        def stream() -> None:
            try:
                for chunk in client.generate_stream(prompt_token_ids=PROMPT, max_new_tokens=NEW_TOKENS,
                                                    temperature=0, ignore_eos=True, timeout=120):
                    chunks.append(chunk)
                    if len(chunks) == 8:
                        os.kill(shard.pid, signal.SIGSTOP)  # frozen mid-stream, holding the request
            except Exception as exc:  # noqa: BLE001 - the assertion below shows it
                errors.append(exc)

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert wait_until(lambda: "restarting shard group" in log() or errors, 60), log()
        time.sleep(1.0)
        os.kill(shard.pid, signal.SIGCONT)
        reader.join(120)
        assert not errors, f"{errors}\n{log()[-3000:]}"
        assert [c.token_id for c in chunks] == list(expected), log()[-3000:]
        assert client.info(timeout=10).restarts >= 1
        assert "already running" not in log(), log()[-3000:]
