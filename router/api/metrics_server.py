"""The Prometheus endpoint (--metrics-port), behind the same keys and TLS as the public API.

prometheus_client's ASGI app served by a second uvicorn server on the router's event loop (no
thread per connection): at most --max-http-connections connections, each dropped after
--http-idle-timeout seconds without a TLS handshake or a request (openai/connections.py).
It sits behind the HTTP API's gate with no open route: with --api-key-file every path needs
`Authorization: Bearer <key>` (Prometheus: `authorization: {credentials_file: ...}` in the scrape
config), else 401, and a peer that keeps failing gets 429; with --tls-cert-file it is served over
TLS from the router's current certificates (mTLS too with --tls-client-ca-file).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

from prometheus_client import CollectorRegistry, make_asgi_app

from shardline.router.api.auth import ApiKeys
from shardline.router.api.key_attempts import FailedAttempts
from shardline.router.api.openai.gate import HttpGate
from shardline.router.api.openai.server import HttpServer


def metrics_server(registry: CollectorRegistry, host: str, port: int, keys: ApiKeys | None,
                   tls: Callable[[], ssl.SSLContext] | None, *, max_headers: int, attempts: FailedAttempts,
                   on_refused: Callable[[str], None], max_connections: int, idle_timeout: float) -> HttpServer:
    """The (not yet started) server of GET /metrics on host:port; `await server.start()` binds it."""
    def gate(inner):
        return HttpGate(inner, keys, max_headers, on_refused, attempts, open_routes=frozenset(), api="metrics")
    return HttpServer(make_asgi_app(registry), host, port, body_limit=64 * 1024, tls=tls, gate=gate,
                      max_connections=max_connections, idle_timeout=idle_timeout, flag="--metrics-port")
