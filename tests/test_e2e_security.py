"""End to end through `shardline launch` with TLS, two tenants' API keys and their fair share
(issue 15): one TP=1 server, --max-batch-size 1 (so requests queue),
--max-concurrent-requests-per-tenant 6, --max-priority-per-tenant 2.

The SDK over TLS with a key generates; without a key gRPC and HTTP refuse. Alice floods: her seventh
request gets RESOURCE_EXHAUSTED, Bob's request is admitted and starts after at most one more of
hers (not after her whole queue). Logs name tenants and never keys; /metrics (TLS and key) counts by
tenant; the shard sockets live in a 0700 folder; SIGHUP serves a new certificate on the same port.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import shutil
import signal
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from router_harness import launch_args, launched
from shardline.client import AsyncClient, Client, InvalidRequestError, OverloadedError, UnauthenticatedError
from shardline.client import UnavailableError
from tls_certs import make_pki

pytestmark = pytest.mark.slow

ALICE, BOB, WRONG = "sk-alice-e2e-0000000001", "sk-bob-e2e-0000000002", "sk-wrong-e2e-000000003"
CAP = 6
LONG = {"max_new_tokens": 110, "temperature": 0, "ignore_eos": True}  # each runs long enough to queue behind


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    live, fresh = make_pki(folder / "live", tag="first"), make_pki(folder / "fresh", tag="second")
    return live, fresh


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint_factory, pki):
    live, _ = pki
    work = tmp_path_factory.mktemp("secure")
    keys = work / "keys.txt"
    keys.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    args = launch_args(extra=["--tls-cert-file", str(live.server_cert), "--tls-key-file", str(live.server_key),
                              "--api-key-file", str(keys), "--max-concurrent-requests-per-tenant", str(CAP),
                              "--max-priority-per-tenant", "2", "--max-batch-size", "1",
                              "--max-concurrent-requests", "32"])
    model = checkpoint_factory(arch="llama", num_layers=2)
    with launched(work, *args, model=model, expect_shards=1, http=True, metrics=True) as running:
        running.target = running.target.replace("127.0.0.1", "localhost")
        yield running


def https(url: str, ca: Path, key: str | None = None, body: dict | None = None) -> tuple[int, str]:
    url = url.replace("http://127.0.0.1", "https://localhost")
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body else None, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60, context=ssl.create_default_context(cafile=str(ca))) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        metric, _, value = line.rpartition(" ")
        if metric.split("{")[0] == name and ",".join(sorted(re.findall(r'\w+="[^"]*"', metric))) == want:
            return float(value)
    return 0.0


def test_the_sdk_over_tls_with_a_key_generates(server, pki) -> None:
    with Client(server.target, root_certificates=pki[0].ca_pem, api_key=ALICE) as client:
        result = client.generate("Hello there", max_new_tokens=8, temperature=0, ignore_eos=True)
    assert len(result.token_ids) == 8 and result.finish_reason == "length"


def test_without_a_valid_key_grpc_and_http_refuse(server, pki) -> None:
    ca = pki[0]
    for key in (None, WRONG):
        with Client(server.target, root_certificates=ca.ca_pem, api_key=key, retries=0) as client:
            with pytest.raises(UnauthenticatedError):
                client.generate("Hello", max_new_tokens=2)
        status, body = https(server.http_url + "/completions", ca.ca, key, {"prompt": "Hello", "max_tokens": 2})
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    status, body = https(server.http_url + "/completions", ca.ca, BOB, {"prompt": "Hello", "max_tokens": 2})
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 2
    with Client(server.target, retries=0) as plaintext, pytest.raises(UnavailableError):
        plaintext.generate("Hello", max_new_tokens=2, timeout=10)


def test_the_priority_cap(server, pki) -> None:
    with Client(server.target, root_certificates=pki[0].ca_pem, api_key=ALICE) as client:
        with pytest.raises(InvalidRequestError, match=r"priority 3 is more than tenant 'alice' may ask for "
                                                      r"\(--max-priority-per-tenant=2\)"):
            client.generate("Hello", max_new_tokens=2, priority=3)
        assert len(client.generate("Hello", max_new_tokens=2, priority=2).token_ids) == 2


async def _first_token_at(client: AsyncClient, started: asyncio.Event | None = None) -> float:
    first = None
    async for _ in client.generate_stream("Once upon a time", **LONG):
        if first is None:
            first = time.monotonic()
            if started is not None:
                started.set()
    return first


async def _admitted(server, ca: Path, tenant: str, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, text = await asyncio.to_thread(https, server.metrics_url, ca, ALICE)
        if sample(text, "shardline_tenant_requests_admitted", tenant=tenant) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{tenant} never had {count} requests admitted")


async def _flood(server, ca: bytes, ca_file: Path) -> None:
    """Alice: one request running, CAP - 1 waiting, one more refused; then Bob's one."""
    async with AsyncClient(server.target, root_certificates=ca, api_key=ALICE, retries=0) as alice, \
            AsyncClient(server.target, root_certificates=ca, api_key=BOB, retries=0) as bob:
        running = asyncio.Event()
        flood = [asyncio.create_task(_first_token_at(alice, running))]
        await running.wait()
        flood += [asyncio.create_task(_first_token_at(alice)) for _ in range(CAP - 1)]
        await _admitted(server, ca_file, "alice", CAP)
        bobs = asyncio.create_task(_first_token_at(bob))
        with pytest.raises(OverloadedError, match=rf"tenant 'alice' already has {CAP} requests admitted "
                                                  rf"\(--max-concurrent-requests-per-tenant={CAP}\)"):
            await alice.generate("one too many", max_new_tokens=2)
        await asyncio.gather(*flood, bobs)


def flood_requests(log: str) -> list[tuple[str, float, float]]:
    """(tenant, arrival, start) on the server's clock of each 110-token request, from its log line."""
    out = []
    for line in log.splitlines():
        if line.startswith("{") and '"event": "request"' in line:
            r = json.loads(line)
            if r["generated_tokens"] == LONG["max_new_tokens"]:
                end = datetime.datetime.fromisoformat(r["timestamp"]).timestamp()
                out.append((r["tenant"], end - r["total_s"], end - r["total_s"] + r["queue_s"]))
    return out


def test_a_flooding_tenant_neither_starves_another_nor_passes_its_cap(server, pki) -> None:
    asyncio.run(_flood(server, pki[0].ca_pem, pki[0].ca))
    requests = flood_requests(server.log())
    (_, arrived, started), = [r for r in requests if r[0] == "bob"]
    waiting = [round(s - arrived, 3) for tenant, _, s in requests if tenant == "alice" and s > arrived]
    assert len(waiting) >= 2, f"too few of Alice's requests waited when Bob came to tell anything: {waiting}"
    # FIFO would start all of them before Bob; round-robin at most one (the turn Alice's tenant
    # has when Bob arrives), whatever the timing.
    assert len([s for s in waiting if s < started - arrived]) <= 1, (waiting, round(started - arrived, 3))


def test_logs_name_tenants_never_keys(server) -> None:
    log = server.log()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    tenants = {line.get("tenant") for line in lines if line.get("event") == "request"}
    assert {"alice", "bob"} <= tenants, tenants
    assert any(line.get("event") == "unauthenticated call" for line in lines)
    for secret in (ALICE, BOB, WRONG):
        assert secret not in log


def test_metrics_by_tenant_over_tls_with_a_key(server, pki) -> None:
    status, _ = https(server.metrics_url, pki[0].ca)
    assert status == 401
    status, text = https(server.metrics_url, pki[0].ca, BOB)
    assert status == 200
    assert sample(text, "shardline_tenant_generated_tokens_total", tenant="alice") >= CAP * LONG["max_new_tokens"]
    assert sample(text, "shardline_tenant_requests_refused_total", tenant="alice", code="RESOURCE_EXHAUSTED") >= 1
    assert sample(text, "shardline_tenant_requests_refused_total", tenant="bob", code="RESOURCE_EXHAUSTED") == 0
    assert sample(text, "shardline_tenant_requests_received_total", tenant="bob", api="http") >= 1
    assert sample(text, "shardline_unauthenticated_requests_total", api="grpc") >= 2


def test_the_shard_sockets_are_in_a_folder_only_this_user_may_enter(server) -> None:
    assert server.socket_dir.stat().st_mode & 0o777 == 0o700
    assert [p.suffix for p in server.socket_dir.iterdir()] == [".sock"]


def test_sighup_serves_a_new_certificate_on_the_same_port(server, pki) -> None:
    live, fresh = pki
    for name in ("server.crt", "server.key"):
        shutil.copy(fresh.ca.parent / name, live.ca.parent / name)
    os.kill(server.process.pid, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while True:
        try:
            with Client(server.target, root_certificates=fresh.ca_pem, api_key=ALICE, retries=0) as client:
                assert client.tokenize("Hello", timeout=5)
            break
        except UnavailableError:
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.2)
    with Client(server.target, root_certificates=live.ca_pem, api_key=ALICE, retries=0) as stale:
        with pytest.raises(UnavailableError):
            stale.tokenize("Hello", timeout=5)
    assert "TLS certificates reloaded" in server.log()
