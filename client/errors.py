"""Client errors: the ShardlineError family, mapping grpc.RpcError to it, and the retry policy.

Shared by the sync `Client` and the `AsyncClient`: both turn every failed RPC into a subclass of
`ShardlineError` with `to_error`, and both decide whether and when to retry with `Attempts`
(only UNAVAILABLE, only before the first streamed token, exponential backoff, one overall deadline).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc


class ShardlineError(Exception):
    """A failed shardline RPC: `.code` is the grpc.StatusCode, `.message` the server's details."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidRequestError(ShardlineError, ValueError):
    """INVALID_ARGUMENT: the request can never succeed as sent; the message names field and limit.

    Raised by the router, by the SDK's own checks before sending (also a ValueError, like any bad
    argument), and for a message larger than gRPC accepts on either side.
    """


class OverloadedError(ShardlineError):
    """RESOURCE_EXHAUSTED: the router already admitted --max-concurrent-requests; try later."""


class UnavailableError(ShardlineError):
    """UNAVAILABLE: server unreachable, shards not ready, or too many shard-group restarts."""


class UnauthenticatedError(ShardlineError):
    """UNAUTHENTICATED: the router requires an API key (--api-key-file) and none or a wrong one was
    sent; pass `api_key=` to the client (CLI: --api-key-file)."""


class DeadlineExceededError(ShardlineError):
    """DEADLINE_EXCEEDED: the call's timeout passed before it finished."""


class RequestCancelledError(ShardlineError):
    """CANCELLED: the call was cancelled (by this client, or the server shutting down)."""


_BY_CODE: dict[grpc.StatusCode, type[ShardlineError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
}

# gRPC's own RESOURCE_EXHAUSTED for a message over the size limit ("SERVER: Received message larger
# than max (N vs. M)"): not an overload, it can never fit.
_TOO_LARGE = "message larger than max"

_NOT_SERVING = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED}
)


def status_of(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """(code, details) of a sync or aio RpcError; UNKNOWN when the error carries no status."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else None
    return code or grpc.StatusCode.UNKNOWN, details or ""


def invalid(message: str) -> InvalidRequestError:
    """The error of a client-side check: INVALID_ARGUMENT, as the router would answer."""
    return InvalidRequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class Channel:
    """What a client knows about its own channel, to name the likely cause of a refusal."""

    tls: bool = False
    api_key: bool = False


def hint(code: grpc.StatusCode, message: str, channel: Channel | None) -> str:
    """"; CAUSE: FIX" for a failure whose likely cause is this client's own setup, else "" (and
    always "" when `channel` is None: unknown). A plaintext channel to a TLS-only router sees the
    socket closed during the HTTP/2 handshake; a TLS channel sees the handshake fail (a certificate
    it does not trust, or a router that is plaintext); a router with --api-key-file refuses a call
    without a key."""
    if channel is None:
        return ""
    if code is grpc.StatusCode.UNAUTHENTICATED and not channel.api_key:
        return "; the router requires an API key: pass --api-key-file FILE (SDK: api_key=...)"
    if not channel.tls and "Socket closed" in message:
        return ("; the router may serve TLS only (--tls-cert-file): connect with --tls-ca-file PEM, "
                "the CA that signed its certificate (SDK: root_certificates=...)")
    if channel.tls and "handshake failed" in message.lower():
        if "CERTIFICATE_VERIFY_FAILED" in message:
            return ("; the router's certificate is not signed by a CA this client trusts: pass "
                    "--tls-ca-file PEM, the CA that signed it (SDK: root_certificates=...)")
        return "; the router may not serve TLS: connect without --tls / --tls-ca-file (SDK: plaintext)"
    return ""


def to_error(error: grpc.RpcError, channel: Channel | None = None) -> ShardlineError:
    """The ShardlineError subclass for `error`'s status code (the base class for other codes).
    With `channel`, a failure this client's setup likely caused says so and names the fix."""
    code, message = status_of(error)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE in message:
        return invalid(f"the message is larger than gRPC accepts ({code.name}: {message})")
    return _BY_CODE.get(code, ShardlineError)(code, message + hint(code, message, channel))


def health_from_error(error: grpc.RpcError) -> bool:
    """False for a health check that failed because the server or the service is not there.

    UNAVAILABLE (nothing listening), NOT_FOUND (unknown service name) and DEADLINE_EXCEEDED mean
    "not serving"; any other status (say UNIMPLEMENTED: no health service) raises its ShardlineError.
    """
    code, _ = status_of(error)
    if code in _NOT_SERVING:
        return False
    raise to_error(error) from error


@dataclass(frozen=True)
class RetryPolicy:
    """Retry UNAVAILABLE up to `retries` times, waiting `backoff * 2**n` seconds before retry n."""

    retries: int = 3
    backoff: float = 0.5

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.backoff < 0:
            raise ValueError(f"backoff must be >= 0, got {self.backoff}")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (0-based)."""
        return self.backoff * (2**retry)


class Attempts:
    """The retry state of one logical call: retries used so far and the overall deadline."""

    def __init__(self, policy: RetryPolicy, timeout: float | None, channel: Channel | None = None) -> None:
        self._policy = policy
        self._channel = channel
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._retries = 0

    def timeout(self) -> float | None:
        """Seconds left for the next attempt (None when the caller set no timeout)."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def backoff_after(self, error: grpc.RpcError, started: bool = False) -> float:
        """Seconds to sleep before retrying after `error`; raises the mapped error to give up.

        Only UNAVAILABLE is retried, only while nothing was received yet (`started` False), only
        `policy.retries` times, and only when the wait still fits before the deadline. A failed TLS
        handshake is not retried: it fails the same way every time.
        """
        code, message = status_of(error)
        if (started or code is not grpc.StatusCode.UNAVAILABLE or self._retries >= self._policy.retries
                or "handshake failed" in message.lower()):
            raise to_error(error, self._channel) from error
        delay = self._policy.delay(self._retries)
        left = self.timeout()
        if left is not None and left <= delay:
            raise to_error(error, self._channel) from error
        self._retries += 1
        return delay
