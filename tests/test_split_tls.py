"""Split deployment over mutual TLS (issue 15): `shardline shard --tls-*` on TCP and
`shardline router --shard-tls-*`, as real processes on loopback.

The shard's port refuses plaintext and TLS clients without a certificate from the CA (nobody else
may call Step or Reset), answers the image's health check given the CA and a client certificate,
and the router, holding such a certificate, forms the group and serves; the router's own public
port needs the API key.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import deploy_files as d
from router_harness import _wait_ready, free_port
from shardline.client import Client, UnauthenticatedError
from tls_certs import make_pki

pytestmark = pytest.mark.slow
KEY = "sk-split-tls-000000001"
ROUTER_LIMITS = ("--max-input-tokens", "64", "--max-total-tokens", "160", "--max-batch-prefill-tokens", "512")


def check(address: str, credentials: grpc.ChannelCredentials | None) -> str:
    """The shard's health as seen by one client: a status name, or the error code's."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@contextlib.contextmanager
def process(argv: list[str], log: Path):
    env = {**d.clean_environment(), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "shardline.client.cli", *argv], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_serving(address: str, credentials, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while check(address, credentials) != "SERVING":
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


@pytest.mark.timeout(600)
def test_router_and_shard_over_mutual_tls(checkpoint_factory, tmp_path: Path) -> None:
    model, pki = checkpoint_factory(arch="llama", num_layers=2), make_pki(tmp_path / "pki")
    keys = tmp_path / "keys"
    keys.write_text(f"ops:{KEY}\n")
    port = free_port()
    address = f"localhost:{port}"
    router_cert = grpc.ssl_channel_credentials(pki.ca_pem, pki.client_key.read_bytes(), pki.client_cert.read_bytes())
    shard = ["shard", "--model", str(model), "--listen", f"127.0.0.1:{port}", "--master-port", str(free_port()),
             "--threads", "1", "--kv-cache-tokens", "4096", "--tls-cert-file", str(pki.server_cert),
             "--tls-key-file", str(pki.server_key), "--tls-client-ca-file", str(pki.ca)]
    with process(shard, tmp_path / "shard.log") as shard_proc:
        wait_serving(address, router_cert, shard_proc, tmp_path / "shard.log")
        assert check(address, None) == "UNAVAILABLE"  # plaintext
        assert check(address, grpc.ssl_channel_credentials(pki.ca_pem)) == "UNAVAILABLE"  # no client certificate
        health = subprocess.run([sys.executable, str(d.DEPLOY / "healthcheck.py"), address, "",
                                 "--tls-ca-file", str(pki.ca), "--tls-cert-file", str(pki.client_cert),
                                 "--tls-key-file", str(pki.client_key)], capture_output=True, text=True, timeout=60)
        assert health.returncode == 0, health.stdout + health.stderr
        router = ["router", "--shards", address, "--model", str(model), "--host", "127.0.0.1", "--port", "0",
                  "--http-port", "0", "--metrics-port", "0", "--api-key-file", str(keys),
                  "--shard-tls-ca-file", str(pki.ca), "--shard-tls-cert-file", str(pki.client_cert),
                  "--shard-tls-key-file", str(pki.client_key), *ROUTER_LIMITS]
        with process(router, tmp_path / "router.log") as router_proc:
            target = _wait_ready(router_proc, tmp_path / "router.log", 240)
            with Client(target, api_key=KEY) as client:
                result = client.generate("Hello", max_new_tokens=4, temperature=0, ignore_eos=True)
            assert len(result.token_ids) == 4
            with Client(target, retries=0) as anonymous, pytest.raises(UnauthenticatedError):
                anonymous.generate("Hello", max_new_tokens=4)
