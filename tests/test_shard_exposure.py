"""What a shard exposes (issue 21, item 3): its gRPC port needs mutual TLS on TCP, its group's own
sockets listen where --group-interface says, and health Watch streams are bounded.

A TCP --listen without TLS, or with TLS but no client CA, refuses to start (one line naming the
flags) unless --insecure-shard-port says so on purpose, and then a warning says what is exposed;
a shard's mutual-TLS port refuses a client without a certificate; rank 0's rendezvous store
bound to an interface's address is not reachable on the host's other addresses.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router_harness import free_port
from shardline.demo import model_dir
from shardline.shard.config import GroupConfig
from shardline.shard.group_network import InterfaceError, interface_address, loopback_interface, rendezvous_store
from shardline.common.health import BoundedHealth
from shardline.shard.server import listen
from shardline.shard.startup import CONFIG_EXIT
from shardline.common.tls import ServerTls, TlsError, TlsFiles, check_shard_port
from tls_certs import make_pki


def test_a_tcp_port_needs_mutual_tls_unless_insecure_on_purpose(tmp_path) -> None:
    pki = make_pki(tmp_path)
    plain, one_way = TlsFiles(), TlsFiles(pki.server_cert, pki.server_key)
    mutual = TlsFiles(pki.server_cert, pki.server_key, pki.ca)
    for files, what in ((plain, "plaintext"), (one_way, "TLS without client certificates")):
        with pytest.raises(TlsError) as refused:
            check_shard_port("0.0.0.0:9000", files, insecure=False)
        assert f"--listen 0.0.0.0:9000 is a TCP port, served {what}" in str(refused.value)
        assert "--tls-client-ca-file" in str(refused.value) and "--insecure-shard-port" in str(refused.value)
        warning = check_shard_port("0.0.0.0:9000", files, insecure=True)
        assert "anyone who reaches it can call Step, Reset and Warmup" in warning
    assert check_shard_port("0.0.0.0:9000", mutual, insecure=False) is None
    assert check_shard_port("unix:///run/shard.sock", plain, insecure=False) is None


def test_a_tcp_shard_without_tls_refuses_to_start() -> None:
    done = subprocess.run([sys.executable, "-m", "shardline.client.cli", "shard", "--model", str(model_dir()),
                           "--listen", f"127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == CONFIG_EXIT, done.stderr
    line = done.stderr.strip()
    assert line.startswith("shardline: error: --listen 127.0.0.1:") and "served plaintext" in line, line
    assert len(line.splitlines()) == 1, line


def test_a_shard_with_mutual_tls_refuses_a_client_without_a_certificate(tmp_path) -> None:
    pki = make_pki(tmp_path)
    address = f"localhost:{free_port()}"

    async def main() -> tuple[str, str, str]:
        server = grpc.aio.server()
        health = BoundedHealth()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        listen(server, address, ServerTls(TlsFiles(pki.server_cert, pki.server_key, pki.ca)))
        await server.start()
        try:
            with_cert = grpc.ssl_channel_credentials(pki.ca_pem, pki.client_key.read_bytes(),
                                                     pki.client_cert.read_bytes())
            return (await check(address, with_cert), await check(address, grpc.ssl_channel_credentials(pki.ca_pem)),
                    await check(address, None))
        finally:
            await server.stop(0)

    assert asyncio.run(main()) == ("SERVING", "UNAVAILABLE", "UNAVAILABLE")


async def check(address: str, credentials: grpc.ChannelCredentials | None) -> str:
    channel = grpc.aio.secure_channel(address, credentials) if credentials else grpc.aio.insecure_channel(address)
    async with channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_health_watch_streams_are_bounded() -> None:
    async def main() -> tuple[list[str], str]:
        server, port = grpc.aio.server(), free_port()
        health_pb2_grpc.add_HealthServicer_to_server(BoundedHealth(max_watches=2), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                watches = [stub.Watch(health_pb2.HealthCheckRequest()) for _ in range(2)]
                first = [health_pb2.HealthCheckResponse.ServingStatus.Name((await w.read()).status) for w in watches]
                try:
                    await stub.Watch(health_pb2.HealthCheckRequest()).read()
                    third = "served"
                except grpc.aio.AioRpcError as error:
                    third = f"{error.code().name}: {error.details()}"
                for w in watches:
                    w.cancel()
                return first, third
        finally:
            await server.stop(0)

    first, third = asyncio.run(main())
    assert first == ["SERVING", "SERVING"]
    assert third.startswith("RESOURCE_EXHAUSTED: 2 health Watch streams are open"), third


def other_address() -> str | None:
    """An IPv4 address of this host that is not loopback, if there is one."""
    for _, name in socket.if_nameindex():
        try:
            address = interface_address(name)
        except InterfaceError:
            continue
        if not address.startswith("127."):
            return address
    return None


def test_the_rendezvous_store_listens_only_on_the_named_interface() -> None:
    assert interface_address(loopback_interface()) == "127.0.0.1"
    port = free_port()
    group = GroupConfig(rank=0, master_addr="127.0.0.1", master_port=port, bind_address="127.0.0.1",
                        collective_timeout_s=10)
    store = rendezvous_store(group)
    store.set("k", "v")
    assert store.get("k") == b"v"
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    other = other_address()
    if other is None:
        pytest.skip("this host has no address besides loopback to try")
    with pytest.raises(OSError):
        socket.create_connection((other, port), timeout=5).close()


def test_an_unknown_interface_is_refused_naming_the_flag() -> None:
    with pytest.raises(InterfaceError) as refused:
        interface_address("nosuch0")
    assert str(refused.value).startswith("--group-interface nosuch0: no such interface")
