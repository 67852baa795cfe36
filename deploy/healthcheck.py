#!/usr/bin/env python3
"""Container health check: exit 0 when a grpc.health.v1 service reports SERVING, else 1.

    shardline-healthcheck [ADDRESS] [SERVICE]      (defaults: 127.0.0.1:8500 readiness)

Installed in the image as /usr/local/bin/shardline-healthcheck for the Dockerfile's HEALTHCHECK
and the compose files. The router (`launch`, `router`) answers "readiness" (SERVING when every
shard is ready), "liveness" (SERVING while the process runs) and ""; a shard answers "" (SERVING
once its group formed and its slice is loaded). Kubernetes uses its native gRPC probes instead.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 5.0


def check(address: str, service: str) -> tuple[bool, str]:
    """(SERVING?, what was seen) for one health service."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str]) -> int:
    address = argv[1] if len(argv) > 1 else "127.0.0.1:8500"
    service = argv[2] if len(argv) > 2 else "readiness"
    ok, seen = check(address, service)
    print(f"{address} service {service!r}: {seen}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
