"""API keys and tenants: the --api-key-file format and the one check every API's gate calls.

The file has one key per line; `#` starts a comment, blank lines are skipped. A line is `KEY` or
`TENANT:KEY`, optionally followed by `max_priority=N` (that tenant's priority cap, instead of
--max-priority-per-tenant). A bare key's tenant is named after its line (`line-7`); several keys
may share a tenant name (key rotation), and then share its limits. Keys hold no `:`, `#` or
whitespace, and have at least 16 characters (shorter ones are guessable). Keys are kept only as SHA-256 digests, compared with `hmac.compare_digest` against
every known key (no early exit, digests of equal length), so neither timing nor logs reveal them:
messages name the file and the line, never a key. Without a key file every caller is `ANONYMOUS`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MIN_KEY_LENGTH = 16
_KEY = re.compile(r"^[^\s:#]{%d,512}$" % MIN_KEY_LENGTH)
MISSING = "missing API key: send the header 'authorization: Bearer <key>'"
INVALID = "invalid API key"


@dataclass(frozen=True)
class Tenant:
    """Who sent a request: a name for logs and metrics, and an optional priority cap of its own."""

    name: str
    max_priority: int | None = None


ANONYMOUS = Tenant("anonymous")
# The tenant of the gRPC call being handled, set by the gate (router/api/grpc_gate.py).
CALLER: ContextVar[Tenant] = ContextVar("shardline_caller", default=ANONYMOUS)


class KeyFileError(ValueError):
    """--api-key-file cannot be used; the message names the line, never the key."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _parse_line(number: int, text: str) -> tuple[str, Tenant] | None:
    """(key, tenant) of one line, or None for a blank or comment line."""
    fields = text.split("#", 1)[0].split()
    if not fields:
        return None
    where = f"--api-key-file line {number}"
    name, sep, key = fields[0].rpartition(":")
    if not sep:
        name = f"line-{number}"
    if not _TENANT.match(name):
        raise KeyFileError(f"{where}: the tenant name must be 1-64 letters, digits, '.', '_' or '-'")
    if not _KEY.match(key):
        raise KeyFileError(f"{where}: a key must be {MIN_KEY_LENGTH}-512 characters without ':', '#' or whitespace "
                           f"(this one has {len(key)})")
    cap = None
    for extra in fields[1:]:
        option, _, value = extra.partition("=")
        if option != "max_priority" or not re.fullmatch(r"-?\d+", value):
            raise KeyFileError(f"{where}: unknown option {option!r} (the only one is max_priority=N)")
        cap = int(value)
    return key, Tenant(name, cap)


class ApiKeys:
    """The keys of --api-key-file, by digest; `authenticate` maps a header to its tenant."""

    def __init__(self, entries: list[tuple[str, Tenant]]) -> None:
        if not entries:
            raise KeyFileError("--api-key-file holds no key: every request would be refused")
        self._keys = [(_digest(key), tenant) for key, tenant in entries]

    @classmethod
    def load(cls, path: Path) -> ApiKeys:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"--api-key-file {path}: cannot read it "
                               f"({getattr(exc, 'strerror', None) or 'not UTF-8 text'})") from None
        entries, seen, caps = [], {}, {}
        for number, text in enumerate(lines, 1):
            parsed = _parse_line(number, text)
            if parsed is None:
                continue
            key, tenant = parsed
            if key in seen:
                raise KeyFileError(f"--api-key-file line {number}: the same key as line {seen[key]}")
            if caps.setdefault(tenant.name, tenant.max_priority) != tenant.max_priority:
                raise KeyFileError(f"--api-key-file line {number}: tenant {tenant.name!r} has another "
                                   f"max_priority on an earlier line")
            seen[key] = number
            entries.append(parsed)
        return cls(entries)

    @property
    def tenants(self) -> list[str]:
        return sorted({tenant.name for _, tenant in self._keys})

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of `authorization` ("Bearer KEY"); raises Unauthenticated with MISSING or INVALID."""
        token = bearer_token(authorization)
        if token is None:
            raise Unauthenticated(MISSING)
        digest, found = _digest(token), None
        for key_digest, tenant in self._keys:  # every key, always: the time does not depend on which
            if hmac.compare_digest(digest, key_digest):
                found = tenant
        if found is None:
            raise Unauthenticated(INVALID)
        return found


class Unauthenticated(Exception):
    """No valid key: the message says which of MISSING or INVALID, without the key."""


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `authorization: Bearer <token>` value (scheme case-insensitive), or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def load_keys(path: Path | None) -> ApiKeys | None:
    """The keys of --api-key-file, or None (no authentication) when it is not given."""
    return None if path is None else ApiKeys.load(path)
