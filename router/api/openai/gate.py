"""The gate of the HTTP API: one ASGI middleware in front of every route, before routing.

Every request first has its header lines counted (more than --max-metadata-entries: 431). The one
open route is `GET`/`HEAD /health` at exactly that path (probes need no key); every other method
and path, known or not, needs `Authorization: Bearer <key>` when --api-key-file is given, or gets
401 in OpenAI's error shape with `WWW-Authenticate: Bearer`, before its body is read. A client
address with too many recent failures (router/api/key_attempts.py) gets 429 with `Retry-After`
before its key is looked at. The metrics port uses the same gate with no open route. Nothing here looks at the
Host header or any other client-chosen routing hint. The caller's tenant goes to the route in
`request.state.tenant`. Refusals are logged with the path and the reason, never the key.
WebSocket connections (the API has no such route) are closed at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import structlog

from shardline.router.api.auth import ANONYMOUS, ApiKeys, Unauthenticated
from shardline.router.api.key_attempts import FailedAttempts, peer_of

log = structlog.get_logger("shardline.router")
OPEN_ROUTES = frozenset({("GET", "/health"), ("HEAD", "/health")})


class HttpGate:
    """ASGI middleware: header cap for all, API keys for all but `open_routes` ((method, path)
    pairs); `on_refused(api)` counts refusals, `api` names the port in logs and metrics."""

    def __init__(self, app, keys: ApiKeys | None, max_headers: int,
                 on_refused: Callable[[str], None] = lambda api: None, attempts: FailedAttempts | None = None,
                 open_routes: frozenset[tuple[str, str]] = OPEN_ROUTES, api: str = "http") -> None:
        self.app, self.keys, self.max_headers, self.on_refused = app, keys, max_headers, on_refused
        self.attempts, self.open_routes, self.api = attempts or FailedAttempts(), open_routes, api

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket":  # the API has none: refused before anything reads it
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        if len(headers) > self.max_headers:
            return await _answer(send, 431, f"the request has {len(headers)} header lines, more than "
                                            f"--max-metadata-entries={self.max_headers}", "too_many_headers")
        tenant = ANONYMOUS
        if self.keys is not None and (scope["method"], scope["path"]) not in self.open_routes:
            peer = peer_of((scope.get("client") or ("unknown", 0))[0])
            wait = self.attempts.retry_after(peer)
            if wait:
                return await _answer(send, 429, self.attempts.message(wait), "too_many_failed_attempts",
                                     [(b"retry-after", str(wait).encode())])
            values = [v for k, v in headers if k.lower() == b"authorization"]
            try:
                if len(values) > 1:
                    raise Unauthenticated("more than one authorization header")
                tenant = self.keys.authenticate(values[0].decode("latin-1") if values else None)
            except Unauthenticated as exc:
                self.attempts.failed(peer)
                log.warning("unauthenticated call", api=self.api, path=scope["path"], peer=peer, reason=str(exc))
                self.on_refused(self.api)
                return await _answer(send, 401, str(exc), "invalid_api_key", [(b"www-authenticate", b"Bearer")])
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


async def _answer(send, status: int, message: str, code: str, headers: list | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
