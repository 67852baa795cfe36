"""The Prometheus endpoint (--metrics-port), behind the same keys and TLS as the public API.

prometheus_client's WSGI app on a threaded wsgiref server, wrapped so that with --api-key-file
every path needs `Authorization: Bearer <key>` (Prometheus: `authorization: {credentials_file: ...}`
in the scrape config), else 401; with --tls-cert-file it is served over TLS from the router's
reloadable SSL context (mTLS too with --tls-client-ca-file).
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from shardline.router.api.auth import ApiKeys, Unauthenticated


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # no access log (it would go to stderr raw)
        pass


def guarded(app, keys: ApiKeys | None):
    """`app` that answers 401 (OpenAI's error shape) to a request without a valid key."""
    if keys is None:
        return app

    def check(environ, start_response):
        try:
            keys.authenticate(environ.get("HTTP_AUTHORIZATION"))
        except Unauthenticated as exc:
            body = json.dumps({"error": {"message": str(exc), "type": "invalid_request_error", "param": None,
                                         "code": "invalid_api_key"}}).encode()
            start_response("401 Unauthorized", [("Content-Type", "application/json"),
                                                ("WWW-Authenticate", "Bearer"), ("Content-Length", str(len(body)))])
            return [body]
        return app(environ, start_response)
    return check


def serve_metrics(registry: CollectorRegistry, host: str, port: int, keys: ApiKeys | None,
                  context: ssl.SSLContext | None) -> ThreadingWSGIServer:
    """Serves GET /metrics on host:port from a daemon thread; returns the server (its port:
    `server.server_port`)."""
    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    httpd = make_server(host, port, guarded(make_wsgi_app(registry), keys), Server, handler_class=_Quiet)
    if context is not None:
        # The handshake happens on the first read, in the request's own thread, not in accept().
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
    return httpd
