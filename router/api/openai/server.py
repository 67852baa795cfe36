"""Serving the OpenAI-compatible app with uvicorn inside the router's own event loop.

The listening socket is bound here (no SO_REUSEPORT, so two servers never share a port; a port in
use fails at once with one line naming it and --http-port), and uvicorn is told to leave signals
alone: the router's loop owns SIGTERM/SIGINT and stops this server as part of its shutdown.
Request bodies are capped at --max-http-body-bytes (default: the gRPC API's message limit; 413
above it), before JSON parsing. With `tls` (a callable giving the router's current SSLContext,
common/tls.py) the port speaks only TLS, each new connection with the context of that moment, so a
SIGHUP reload (new certificate, removed client CA) holds for every connection made after it.
Connections are bounded: at most `max_connections` (uvicorn's limit_concurrency; 503 beyond), and
`idle_timeout` seconds for a TLS handshake, a request head, or between requests
(openai/connections.py). Proxy headers (X-Forwarded-*) are not trusted: nothing may claim
another client address.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket
import ssl
from collections.abc import Callable, Iterator

import uvicorn

from shardline.common.ports import bound_socket
from shardline.router.api.openai.connections import protocol_factory


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the router's loop handles signals
        yield


class BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes (declared or streamed); the body
    is read here first (at most `limit` bytes), then handed to the app."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._drain(receive)
            return await self._refuse(send, int(declared))
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.limit:
                await self._drain(receive)
                return await self._refuse(send, seen)
            if not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _drain(self, receive) -> None:
        """Reads and drops the rest of a refused body (up to 8 x the limit), so that the client,
        still sending, reads the 413 instead of a connection reset."""
        dropped = 0
        while dropped <= 8 * self.limit:
            message = await receive()
            dropped += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                return

    async def _refuse(self, send, size: int) -> None:
        body = json.dumps({"error": {"message": f"the request body has {size} bytes, more than the limit of "
                                                f"{self.limit}", "type": "invalid_request_error", "param": None,
                                     "code": "too_large"}})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body.encode()})


def bind(host: str, port: int, flag: str = "--http-port") -> socket.socket:
    """A listening socket on host:port; RuntimeError with one line when the port is taken."""
    try:
        sock = bound_socket(host or None, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise RuntimeError(f"port {port} ({flag}) is already in use on {host}: another server "
                               f"listens there; stop it or choose another {flag} (0 turns it off)") from None
        raise RuntimeError(f"cannot listen on {host}:{port} (--host, {flag}): {exc.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class HttpServer:
    """uvicorn serving `app` on host:port in the running loop until `stop`; `gate` (an ASGI
    middleware factory) is put outside the body limit, so that it answers before any body is read.
    `flag` names the port's flag in messages (--http-port, --metrics-port)."""

    def __init__(self, app, host: str, port: int, body_limit: int, tls: Callable[[], ssl.SSLContext] | None = None,
                 gate: Callable | None = None, max_connections: int = 1024, idle_timeout: float = 5.0,
                 flag: str = "--http-port") -> None:
        self.app, self.host, self.port, self.body_limit = app, host, port, body_limit
        self.tls, self.gate = tls, gate or (lambda inner: inner)
        self.max_connections, self.idle_timeout, self.flag = max_connections, idle_timeout, flag
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Binds, starts serving and returns the bound port."""
        sock = bind(self.host, self.port, self.flag)
        config = uvicorn.Config(self.gate(BodyLimit(self.app, self.body_limit)), log_config=None, log_level="warning",
                                access_log=False, lifespan="off", timeout_graceful_shutdown=1, proxy_headers=False,
                                http=protocol_factory(self.tls, self.idle_timeout),
                                limit_concurrency=self.max_connections, timeout_keep_alive=self.idle_timeout)
        config.load()
        self._server = _Server(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError(f"the HTTP server on {self.host}:{self.port} stopped at start")
            await asyncio.sleep(0.01)
        return sock.getsockname()[1]

    async def stop(self) -> None:
        """Stops accepting, ends open connections (within a second), and returns when done."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
