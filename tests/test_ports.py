"""A port that is already taken fails the start at once, with one line naming the port and the
flag, and no traceback (issue 11, item 5): the public --port, --metrics-port, a shard's --listen
and rank 0's rendezvous --master-port. Two shardline servers never share a port.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardline.demo import model_dir
from supervision_harness import launch as launch_process
from test_settings import refused


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    """A port another program listens on (a plain socket: no SO_REUSEPORT) for the block's duration."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_taken_public_port_is_one_line_naming_it():
    with taken_port() as port:
        line = refused("launch", "--host", "127.0.0.1", "--port", str(port), "--http-port", "0", "--metrics-port", "0")
    assert line == (f"shardline: error: port {port} (--port) is already in use on 127.0.0.1: another server "
                    f"listens there; stop it or choose another --port"), line


def test_a_taken_metrics_port_is_one_line_naming_it():
    with taken_port() as port:
        line = refused("launch", "--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--metrics-port", str(port))
    assert f"port {port} (--metrics-port) is already in use" in line, line


def test_a_taken_http_port_is_one_line_naming_it():
    with taken_port() as port:
        line = refused("launch", "--host", "127.0.0.1", "--port", "0", "--http-port", str(port), "--metrics-port", "0")
    assert f"port {port} (--http-port) is already in use" in line, line


def test_the_router_of_a_split_deployment_checks_its_ports_too():
    with taken_port() as port:
        line = refused("router", "--model", str(model_dir()), "--shards", "127.0.0.1:1", "--host", "127.0.0.1",
                       "--port", str(port), "--http-port", "0", "--metrics-port", "0")
    assert f"port {port} (--port) is already in use" in line, line


def test_metrics_on_the_public_port_is_refused():
    line = refused("launch", "--port", "8555", "--http-port", "0", "--metrics-port", "8555")
    assert "--metrics-port 8555 is the same port as --port" in line, line
    line = refused("launch", "--port", "0", "--http-port", "8556", "--metrics-port", "8556")
    assert "--metrics-port 8556 is the same port as --http-port" in line, line


def test_a_shard_listening_on_a_taken_port_says_so():
    with taken_port() as port:
        done = subprocess.run([sys.executable, "-m", "shardline.client.cli", "shard", "--model", str(model_dir()),
                               "--listen", f"127.0.0.1:{port}", "--insecure-shard-port", "--log-level", "error"],
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (f"shardline: error: rank 0: port {port} (--listen) is already in use on "
                                   f"127.0.0.1: another server listens there; stop it or choose another --listen")


def test_rank_0_with_a_taken_rendezvous_port_says_so():
    with taken_port() as port:
        done = subprocess.run([sys.executable, "-m", "shardline.client.cli", "shard", "--model", str(model_dir()),
                               "--tp", "2", "--rank", "0", "--master-port", str(port), "--log-level", "warning"],
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().startswith(f"shardline: error: port {port} (--master-port) is already in use"), \
        done.stderr


@pytest.mark.slow
def test_a_second_launch_on_the_same_port_is_refused(tmp_path: Path):
    """While a first launch holds --port (still loading its shards), a second one is refused at once."""
    with taken_port() as port:
        pass  # a port that was free a moment ago
    with launch_process(tmp_path / "first", "--port", str(port), "--kv-cache-tokens", "4096", ready=False) as first:
        first.wait_listening()
        start = time.monotonic()
        line = refused("launch", "--host", "127.0.0.1", "--port", str(port), "--http-port", "0", "--metrics-port", "0")
        assert time.monotonic() - start < 30
        assert f"port {port} (--port) is already in use" in line, line
        assert first.process.poll() is None
