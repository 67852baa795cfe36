"""grpc.health.v1 with a bound on Watch streams, for the router's public port and the shards.

grpc's async HealthServicer keeps every Watch stream open for as long as the client likes, and
health needs no API key: without a bound anybody could hold any number of them. Here at most
`max_watches` Watch streams are open at once (across services); one more is refused with
RESOURCE_EXHAUSTED at once, naming the bound. Check is unchanged. Like grpc's servicer it starts
SERVING for every service set later: the servers set NOT_SERVING first.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2

MAX_WATCHES = 64


class BoundedHealth(health.aio.HealthServicer):
    """grpc.health.v1 whose Watch streams are at most `max_watches` at a time."""

    def __init__(self, max_watches: int = MAX_WATCHES) -> None:
        super().__init__()
        self.max_watches, self.watches = max_watches, 0

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        if self.watches >= self.max_watches:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.watches} health Watch streams are open, the most this server keeps "
                                f"({self.max_watches}); use Check, or close a Watch")
        self.watches += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watches -= 1
