"""Refusing a TCP port that another program already listens on, before a server binds it.

gRPC and the Prometheus exporter report a taken port with a traceback (and gRPC with a log line
of its own); checking first gives one line that names the flag and the port. The probe sets
SO_REUSEADDR like the servers do (so a port in TIME_WAIT after a restart is free) and never
SO_REUSEPORT (so a port shared by a listener that allows it still counts as taken).
"""

from __future__ import annotations

import errno
import socket


class PortInUse(RuntimeError):
    """The port is taken (or the host cannot be bound); the message names the flag."""


def check_free(host: str, port: int, flag: str) -> None:
    """Raises PortInUse when `host:port` cannot be bound now; port 0 (any free port) always passes."""
    if port == 0:
        return
    bind_host = host.strip("[]") or "0.0.0.0"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(bind_host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise PortInUse(f"{flag}: cannot listen on {host}:{port}: {exc.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(f"port {port} ({flag}) is already in use on {bind_host}: another server "
                                f"listens there; stop it or choose another {flag}") from None
            raise PortInUse(f"port {port} ({flag}): cannot listen on {bind_host}:{port}: {exc.strerror}") from None


def bound_socket(host: str | None, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEADDR (never SO_REUSEPORT), not yet listening;
    the OSError of a failed bind is raised with the socket closed."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock
