"""How the SDK reaches a router: plaintext or TLS, with or without an API key.

`channel_credentials` picks the channel's security (explicit credentials, a CA's PEM bytes, or
`tls=True` for gRPC's default roots); `auth_metadata` is the `authorization: Bearer <key>` entry
sent with every call. `add_arguments` / `client_options` give the CLI commands (generate, bench)
the same `--api-key-file` and `--tls-ca-file` flags.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import grpc

API_KEY_FILE_ENV = "SHARDLINE_API_KEY_FILE"


def channel_credentials(credentials: grpc.ChannelCredentials | None, root_certificates: bytes | None,
                        tls: bool) -> grpc.ChannelCredentials | None:
    """The channel's credentials, None for plaintext. `root_certificates` (PEM bytes of the CA that
    signed the router's certificate) or `tls=True` (gRPC's default roots) make the channel TLS."""
    if credentials is not None:
        if root_certificates is not None:
            raise ValueError("give either credentials or root_certificates, not both")
        return credentials
    if root_certificates is not None or tls:
        return grpc.ssl_channel_credentials(root_certificates=root_certificates)
    return None


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata entry that carries `api_key` (none without a key)."""
    if api_key is None:
        return ()
    if not api_key or any(c.isspace() for c in api_key):
        raise ValueError("api_key must be a non-empty string without whitespace")
    return (("authorization", f"Bearer {api_key}"),)


def read_api_key(path: Path) -> str:
    """The key in a file: its first line that is not blank or a `#` comment; a `TENANT:KEY` line
    (the router's --api-key-file form) gives its KEY."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--api-key-file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if fields:
            return fields[0].rpartition(":")[2]
    raise ValueError(f"--api-key-file {path} holds no key")


def read_ca(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"--tls-ca-file {path}: cannot read it ({exc.strerror})") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--api-key-file, --tls-ca-file and --tls, for commands that talk to a router."""
    parser.add_argument("--api-key-file", type=Path, metavar="FILE", default=os.environ.get(API_KEY_FILE_ENV),
                        help=f"send the key in this file (its first line) with every call (env {API_KEY_FILE_ENV})")
    parser.add_argument("--tls-ca-file", type=Path, metavar="PEM", default=None,
                        help="connect over TLS, trusting the router's certificate if this CA signed it")
    parser.add_argument("--tls", action="store_true", help="connect over TLS, trusting gRPC's default root CAs")


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """Client/AsyncClient keyword arguments of those flags; raises ValueError naming the flag."""
    return {"api_key": read_api_key(args.api_key_file) if args.api_key_file else None,
            "root_certificates": read_ca(args.tls_ca_file) if args.tls_ca_file else None,
            "tls": args.tls}
