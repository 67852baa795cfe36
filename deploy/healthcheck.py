#!/usr/bin/env python3
"""Container health check: exit 0 when a grpc.health.v1 service reports SERVING, else 1.

    shardline-healthcheck [ADDRESS] [SERVICE]      (defaults: 127.0.0.1:8500 readiness)
        [--tls-ca-file PEM [--tls-cert-file PEM --tls-key-file PEM] [--server-name NAME]]

Installed in the image as /usr/local/bin/shardline-healthcheck for the Dockerfile's HEALTHCHECK
and the compose files. The router (`launch`, `router`) answers "readiness" (SERVING when every
shard is ready), "liveness" (SERVING while the process runs) and ""; a shard answers "" (SERVING
once its group formed and its slice is loaded). Health needs no API key. A server started with
--tls-cert-file speaks only TLS: pass its CA with --tls-ca-file (and a client certificate when it
also has --tls-client-ca-file). Kubernetes uses its native gRPC probes instead, which cannot
speak TLS: with TLS, make the probes `exec` this script (deploy/README.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 5.0


def channel(address: str, args: argparse.Namespace) -> grpc.Channel:
    """Plaintext, or TLS with the given CA (and client certificate)."""
    if args.tls_ca_file is None:
        return grpc.insecure_channel(address)
    key = Path(args.tls_key_file).read_bytes() if args.tls_key_file else None
    chain = Path(args.tls_cert_file).read_bytes() if args.tls_cert_file else None
    credentials = grpc.ssl_channel_credentials(Path(args.tls_ca_file).read_bytes(), key, chain)
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def check(address: str, service: str, args: argparse.Namespace | None = None) -> tuple[bool, str]:
    """(SERVING?, what was seen) for one health service."""
    args = args or parser().parse_args([])
    with channel(address, args) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardline-healthcheck", description="exit 0 when SERVICE is SERVING")
    p.add_argument("address", nargs="?", default="127.0.0.1:8500")
    p.add_argument("service", nargs="?", default="readiness")
    p.add_argument("--tls-ca-file", default=None, help="speak TLS, trusting this CA")
    p.add_argument("--tls-cert-file", default=None, help="client certificate (servers with mutual TLS)")
    p.add_argument("--tls-key-file", default=None, help="its private key")
    p.add_argument("--server-name", default="", help="the name in the server's certificate, if not the address's")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv[1:])
    ok, seen = check(args.address, args.service, args)
    print(f"{args.address} service {args.service!r}: {seen}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
