"""One HTTP connection of the router's uvicorn servers (HTTP API, metrics): TLS and idle timeouts.

uvicorn's own TLS takes one SSLContext for the life of the server, and its h11 protocol waits
forever for the first request of a connection. Here each accepted connection gets:

- TLS from the context current at accept time (`ServerTls.context`, replaced on SIGHUP), wrapped
  by asyncio's own SSL protocol with a handshake timeout: a client that never finishes its
  handshake is dropped after --http-idle-timeout seconds;
- a request timeout: a connection that has not sent a complete request head within
  --http-idle-timeout seconds of opening (or of its last response) is closed; uvicorn's
  keep-alive timeout (the same value) closes it between requests.

Idle connections hold a file descriptor and a little memory, never a thread; uvicorn's
`limit_concurrency` (--max-http-connections) answers 503 beyond the connections it allows.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from collections.abc import Callable

from uvicorn.protocols.http.h11_impl import H11Protocol


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol that closes a connection whose request head does not arrive in time."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._served = self.cycle
        self._start_head_timer()

    def _start_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.timeout_keep_alive, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.cycle is self._served and not self.transport.is_closing():  # still no new request
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not self._served:  # a request head arrived: the app has it now
            self._served = self.cycle
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)


def protocol_factory(tls: Callable[[], ssl.SSLContext] | None, handshake_timeout: float) -> Callable:
    """uvicorn's `http=` value: builds each connection's protocol, inside TLS from `tls()` if given."""
    def make(**kwargs) -> asyncio.BaseProtocol:
        inner = TimedH11Protocol(**kwargs)
        if tls is None:
            return inner
        return sslproto.SSLProtocol(asyncio.get_running_loop(), inner, tls(), None, server_side=True,
                                    ssl_handshake_timeout=handshake_timeout)
    return make
