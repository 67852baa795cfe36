"""What a user sees around a server's life, through the real CLI (issue 11, items 3 and 10):
limits fitted to the model silently unless the user set them, the limits in the ready line, a
router that gave up on its shards turning `liveness` NOT_SERVING, a second Ctrl-C that stops at
once after the first said what it waits for, and `bench` without a server in one line.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from shardline.client import UnavailableError
from supervision_harness import SMALL_LIMITS, alive, free_port, launch, wait_until
from test_settings import shardline

HUGE = str(2**60)  # bytes of /dev/shm no host has: launch stops right after fitting its limits


def fitted(tmp_path: Path, *argv: str) -> list[str]:
    """stderr lines of a launch that stops at the /dev/shm check, just after the limits are fitted."""
    done = shardline("launch", "--port", "0", "--http-port", "0", "--metrics-port", "0",
                     "--shm-check-path", str(tmp_path), "--shm-required-bytes", HUGE, *argv)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert "MiB free" in lines[-1], done.stderr
    return lines[:-1]


def test_limits_the_user_did_not_set_are_fitted_to_the_model_with_one_line(tmp_path):
    """The demo model has max_position_embeddings 1024; the defaults (2048 total, 1024 input) are
    cut to it with one line saying why, and --max-total-tokens 500 alone lowers the default input
    limit without a word (it follows the user's setting, as --help says)."""
    assert fitted(tmp_path) == [
        "shardline: serving with --max-input-tokens 1023 (default 1024), --max-total-tokens 1024 (default 2048): "
        "lowered to fit the model's max_position_embeddings=1024 (prompts stay below the total)"]
    assert fitted(tmp_path, "--max-total-tokens", "500") == []


def test_a_limit_the_user_set_beyond_the_model_gets_one_warning(tmp_path):
    lines = fitted(tmp_path, "--max-total-tokens", "4096")
    assert lines == ["shardline: warning: --max-total-tokens=4096 exceeds what the model's "
                     "max_position_embeddings=1024 allows; serving with --max-total-tokens=1024"], lines


def test_bench_without_a_server_is_one_line():
    target = f"127.0.0.1:{free_port()}"
    done = shardline("bench", "--target", target, "--no-progress")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"shardline: error: no ready server at {target} (--target)"), lines


@pytest.mark.slow
def test_giving_up_on_the_shards_turns_liveness_not_serving(tmp_path):
    """--max-restarts 0 and a killed shard: the router gives up, answers UNAVAILABLE with the reason,
    stays up, and its liveness service says NOT_SERVING so that Kubernetes restarts the pod."""
    with launch(tmp_path / "run", "--tp", "1", *SMALL_LIMITS, "--max-restarts", "0") as server:
        client = server.client()
        assert client.health("liveness", timeout=10)
        server.signal_shard(0, signal.SIGKILL)
        assert wait_until(lambda: "giving up on the shard group" in server.log(), 60), server.log()[-3000:]
        assert wait_until(lambda: not client.health("liveness", timeout=5), 10), "liveness still SERVING"
        with pytest.raises(UnavailableError) as failed:
            client.generate(prompt_token_ids=[5, 6, 7], max_new_tokens=2, timeout=10)
        assert "--max-restarts=0" in failed.value.message and "SIGKILL" in failed.value.message, failed.value.message
        assert server.process.poll() is None, "the router must stay up, answering"
        assert server.terminate(timeout=30) == 0


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_after_the_first_said_what_it_waits_for(tmp_path):
    """A default launch (no limit flags): no warning, the limits in effect in the ready line. With a
    stream running, Ctrl-C says it waits for it (--shutdown-grace is 30 s); a second Ctrl-C ends
    the stream and the server within seconds, leaving no shard behind."""
    with launch(tmp_path / "run", "--tp", "1", "--kv-cache-tokens", "8192") as server:
        log = server.log()
        assert "warning" not in log, log
        assert ("shardline: serving with --max-input-tokens 1023 (default 1024), --max-total-tokens 1024 "
                "(default 2048): lowered to fit the model's max_position_embeddings=1024") in log, log
        limits = (r"\(--max-input-tokens 1023, --max-total-tokens 1024, step budget 256 tokens, KV capacity \d+ tokens: "
                  r"\d+ blocks of \d+\)")
        assert re.search(r"ready on \S+ " + limits, log), log
        chunks, errors = [], []

        def stream() -> None:
            try:
                for chunk in server.client().generate_stream(prompt_token_ids=[5, 6, 7], max_new_tokens=1000,
                                                             temperature=0, ignore_eos=True, timeout=120):
                    chunks.append(chunk)
            except UnavailableError as exc:
                errors.append(exc)

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert wait_until(lambda: chunks, 60), server.log()[-3000:]
        shards = list(server.shards().values())
        os.kill(server.pid, signal.SIGINT)
        waiting = "shardline: stopping: waiting up to 30s (--shutdown-grace) for 1 running request(s) to finish; " \
                  "press Ctrl-C again to stop now"
        assert wait_until(lambda: waiting in server.log(), 10), server.log()[-3000:]
        start = time.monotonic()
        os.kill(server.pid, signal.SIGINT)
        code = server.process.wait(timeout=30)
        elapsed = time.monotonic() - start
        reader.join(10)
        assert code == 130 and elapsed < 5, (code, elapsed, server.log()[-3000:])  # Ctrl-C: 128 + SIGINT
        assert errors and len(chunks) < 1000, "the second Ctrl-C should have cut the stream short"
        assert server.log().count("shardline: stopping") == 1
        assert wait_until(lambda: not any(alive(pid) for pid in shards), 5), "shards outlived the router"
