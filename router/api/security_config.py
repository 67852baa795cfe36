"""The router's security settings and request limits: TLS, API keys, tenants' fair share, sizes.

`SecurityConfig` is the frozen value (RouterConfig.security); `add_arguments` registers its flags
in three --help groups ("TLS", "API keys and tenants", "request limits"), each flag saying what it
caps and what happens beyond it (connections and failed key attempts too); `from_args` builds the value back from the parsed flags.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from shardline.router.api.auth import KeyFileError, load_keys
from shardline.common.tls import ClientTlsFiles, TlsFiles, add_server_arguments, server_files


@dataclass(frozen=True)
class SecurityConfig:
    tls: TlsFiles = field(default_factory=TlsFiles)
    # TLS of the router's channels to shards started elsewhere (`shardline router` only).
    shard_tls: ClientTlsFiles = field(default_factory=ClientTlsFiles)
    api_key_file: Path | None = None
    # Requests one tenant may have admitted (running + waiting); 0 = only --max-concurrent-requests.
    max_concurrent_requests_per_tenant: int = 0
    # Highest `priority` a tenant may ask for (a key's own max_priority=N wins); None = any.
    max_priority_per_tenant: int | None = None
    # Bytes of one gRPC message either way; 0 = derived from the token limits (at least 16 MiB).
    max_message_bytes: int = 0
    # Bytes of one HTTP request body; 0 = the gRPC message limit.
    max_http_body_bytes: int = 0
    # gRPC metadata entries (HTTP: header lines) of one call.
    max_metadata_entries: int = 64
    # Generations one HTTP request may ask for: n x prompts.
    max_n: int = 16
    # Characters of one stop string.
    max_stop_length: int = 256
    # Open connections of the HTTP API and of the metrics port each (503 beyond).
    max_http_connections: int = 1024
    # Seconds an HTTP/metrics connection may wait for its TLS handshake or its next request.
    http_idle_timeout: float = 5.0
    # Failed API key attempts one client address may make within failed_key_window seconds
    # before it is refused (RESOURCE_EXHAUSTED / 429) until the window passes; 0 = no limit.
    max_failed_key_attempts: int = 10
    failed_key_window: float = 60.0

    def validate(self) -> None:
        """Raises ValueError naming the flag: files that do not load, limits out of range."""
        self.tls.validate()
        self.shard_tls.validate()
        try:
            load_keys(self.api_key_file)
        except KeyFileError as exc:
            raise ValueError(str(exc)) from None
        for flag, value, low in (("--max-concurrent-requests-per-tenant", self.max_concurrent_requests_per_tenant, 0),
                                 ("--max-message-bytes", self.max_message_bytes, 0),
                                 ("--max-http-body-bytes", self.max_http_body_bytes, 0),
                                 ("--max-metadata-entries", self.max_metadata_entries, 1),
                                 ("--max-n", self.max_n, 1), ("--max-stop-length", self.max_stop_length, 1),
                                 ("--max-http-connections", self.max_http_connections, 1),
                                 ("--max-failed-key-attempts", self.max_failed_key_attempts, 0)):
            if value < low:
                raise ValueError(f"{flag} must be >= {low}, got {value}")
        for flag, seconds in (("--http-idle-timeout", self.http_idle_timeout),
                              ("--failed-key-window", self.failed_key_window)):
            if not seconds > 0:
                raise ValueError(f"{flag} must be > 0 seconds, got {seconds}")
        if 0 < self.max_message_bytes < 1024 or 0 < self.max_http_body_bytes < 1024:
            raise ValueError(f"--max-message-bytes and --max-http-body-bytes must be 0 (derived) or at least "
                             f"1024, got {self.max_message_bytes} and {self.max_http_body_bytes}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The public side's flags: TLS, API keys and tenants, request limits."""
    d = SecurityConfig()
    tls = p.add_argument_group("TLS", "certificates of the public ports (gRPC, HTTP API, metrics)")
    add_server_arguments(tls, "the gRPC port, the HTTP API and /metrics")
    keys = p.add_argument_group("API keys and tenants")
    keys.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                      help="require 'authorization: Bearer KEY' on every RPC and HTTP route but health; one "
                           "key per line, '# comments', TENANT:KEY names the key's tenant, a trailing "
                           "max_priority=N caps that tenant's priority; read at start (restart to change it)")
    keys.add_argument("--max-concurrent-requests-per-tenant", type=int, default=d.max_concurrent_requests_per_tenant,
                      metavar="N", help="requests one tenant may have admitted (running + waiting); beyond it "
                                        "that tenant gets RESOURCE_EXHAUSTED; 0 = no per-tenant limit")
    keys.add_argument("--max-priority-per-tenant", type=int, default=d.max_priority_per_tenant, metavar="N",
                      help="highest priority a request may ask for (INVALID_ARGUMENT above it); unset = any")
    keys.add_argument("--max-failed-key-attempts", type=int, default=d.max_failed_key_attempts, metavar="N",
                      help="wrong or missing keys one client address may send within --failed-key-window; "
                           "beyond it that address gets RESOURCE_EXHAUSTED / 429 until the window passes, "
                           "others are unaffected; 0 = no limit")
    keys.add_argument("--failed-key-window", type=float, default=d.failed_key_window, metavar="SECONDS",
                      help="the window of --max-failed-key-attempts")
    _add_limits(p, d)


def add_shard_client_arguments(p: argparse.ArgumentParser) -> None:
    """--shard-tls-*: TLS (and mTLS) of the router's channels to shards started elsewhere."""
    tls = p.add_argument_group("TLS to the shards", "with `shardline shard --tls-*` on every rank")
    tls.add_argument("--shard-tls-ca-file", type=Path, default=None, metavar="PEM",
                     help="connect to the shards over TLS, verifying their certificates with this CA")
    tls.add_argument("--shard-tls-cert-file", type=Path, default=None, metavar="PEM",
                     help="the router's client certificate, for shards that require one (mutual TLS)")
    tls.add_argument("--shard-tls-key-file", type=Path, default=None, metavar="PEM",
                     help="the private key of --shard-tls-cert-file")
    tls.add_argument("--shard-tls-server-name", default="", metavar="NAME",
                     help="the name the shards' certificates carry, when it is not the host in --shards")


def _add_limits(p: argparse.ArgumentParser, d: SecurityConfig) -> None:
    limits = p.add_argument_group("request limits", "every request over one of these is refused; see also "
                                  "--max-request-bytes, --max-input-tokens, --max-total-tokens, --max-stop-sequences")
    limits.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes, metavar="BYTES",
                        help="largest gRPC message either way (RESOURCE_EXHAUSTED above it); 0 = twice what the "
                             "largest valid request or answer needs, at least 16 MiB")
    limits.add_argument("--max-http-body-bytes", type=int, default=d.max_http_body_bytes, metavar="BYTES",
                        help="largest HTTP request body (413 above it); 0 = the gRPC message limit")
    limits.add_argument("--max-metadata-entries", type=int, default=d.max_metadata_entries, metavar="N",
                        help="gRPC metadata entries per call (INVALID_ARGUMENT above it) and HTTP header lines "
                             "per request (431 above it)")
    limits.add_argument("--max-n", type=int, default=d.max_n, metavar="N",
                        help="generations one HTTP request may ask for, n x prompts (400 above it)")
    limits.add_argument("--max-http-connections", type=int, default=d.max_http_connections, metavar="N",
                        help="open connections of the HTTP API, and of the metrics port (503 beyond them)")
    limits.add_argument("--http-idle-timeout", type=float, default=d.http_idle_timeout, metavar="SECONDS",
                        help="an HTTP or metrics connection is closed after this long without finishing its TLS "
                             "handshake or sending its next request")
    limits.add_argument("--max-stop-length", type=int, default=d.max_stop_length, metavar="CHARS",
                        help="characters of one stop string (INVALID_ARGUMENT above it)")


def from_args(args: argparse.Namespace) -> SecurityConfig:
    """The SecurityConfig of parsed flags (those a command does not have keep their defaults)."""
    d = SecurityConfig()
    names = [n for n in SecurityConfig.__dataclass_fields__ if n not in ("tls", "shard_tls")]
    values = {n: getattr(args, n, getattr(d, n)) for n in names}
    shard_tls = ClientTlsFiles(getattr(args, "shard_tls_ca_file", None), getattr(args, "shard_tls_cert_file", None),
                               getattr(args, "shard_tls_key_file", None), getattr(args, "shard_tls_server_name", ""))
    return SecurityConfig(tls=server_files(args), shard_tls=shard_tls, **values)
