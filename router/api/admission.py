"""The router's front door, shared by the gRPC API and the OpenAI-compatible HTTP API.

`FrontDoor` owns the path every generation request takes before the batcher and back out of it:
`check` (validate; text and conversations bounded in bytes, then tokenized off the event loop),
`admit` (availability, --max-concurrent-requests, enqueue), and `events` (the request's stream
messages until it finishes, a failure raised as `Refused`, and cancellation when the caller stops
reading). Both APIs call exactly these, so they validate with the same rules and messages and
share one queue and batcher; each only translates `Refused` into its own status (gRPC code, HTTP).

Admission is also where tenants (router/api/auth.py, named by each API's gate) get their share: a
priority above their cap is refused, and so is a request beyond
--max-concurrent-requests-per-tenant, for that tenant alone; metrics count by tenant.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import structlog

from shardline.proto import serving_pb2
from shardline.router.api.auth import ANONYMOUS, Tenant
from shardline.router.api.constraints import ConstraintCompiler
from shardline.router.scheduling.batcher import Batcher, NeverFits, Overloaded
from shardline.router.config import RouterConfig
from shardline.router.scheduling.detokenizer import IncrementalDetokenizer
from shardline.router.metrics import Metrics
from shardline.router.scheduling.request import Failure, RouterRequest
from shardline.router.api.tenants import TenantMetrics
from shardline.router.api.tokenization import PromptTokenizer
from shardline.router.api.validation import (Limits, ValidationError, chat_tools, chat_turns, prompt_text,
                                             validate)
from shardline.router.scheduling.params import ValidRequest

log = structlog.get_logger("shardline.router")


def read_chat_template(path: Path | None) -> str | None:
    """The text of --chat-template FILE (None when not given); one-line error when unreadable."""
    if path is None:
        return None
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise RuntimeError(f"--chat-template {path}: cannot read it ({exc.strerror})") from None


class Refused(Exception):
    """A request ended with a status: `code` (a grpc.StatusCode), the message, and for
    INVALID_ARGUMENT the request field at fault."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


class FrontDoor:
    """Validation, admission and event streams of generation requests, for every public API.

    The launcher sets `batcher` once the shards are ready (None again when it gives up), `info`,
    `accepting` (False while shutting down) and `unavailable_reason`.
    """

    def __init__(self, cfg: RouterConfig, tokenizer, vocab_size: int, metrics: Metrics | None = None,
                 eos_ids: frozenset[int] | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.metrics = metrics or Metrics()
        self.tenant_metrics = TenantMetrics(self.metrics.registry, lambda: self.batcher)
        self.prompts = PromptTokenizer(tokenizer, chat_template=read_chat_template(cfg.chat_template))
        self.limits = Limits(max_input_tokens=cfg.max_input_tokens, max_total_tokens=cfg.max_total_tokens,
                             vocab_size=vocab_size, max_stop_sequences=cfg.max_stop_sequences,
                             default_max_new_tokens=cfg.default_max_new_tokens,
                             max_request_bytes=cfg.max_request_bytes,
                             max_stop_length=cfg.security.max_stop_length)
        self.constraints = ConstraintCompiler(tokenizer, vocab_size, eos_ids, self.metrics.registry,
                                              cfg.grammar_timeout, cfg.max_grammar_bytes)
        self.structured = True  # False once the shards said no rank can apply grammars
        self.batcher: Batcher | None = None
        self.accepting = True
        self.info: serving_pb2.InfoResponse | None = None
        self.ids = iter(range(1, 2**63))
        self.unavailable_reason = "the shards are still loading"

    async def validate(self, request: serving_pb2.GenerateRequest) -> ValidRequest:
        """The validated request (raises ValidationError); text and conversations are bounded in
        bytes, then tokenized off the event loop."""
        if request.WhichOneof("input") == "messages":
            ids = await self.prompts.encode_chat_async(chat_turns(request, self.limits), chat_tools(request))
        else:
            text = prompt_text(request, self.limits)
            ids = None if text is None else await self.prompts.encode_async(text)
        valid = validate(request, self.limits, ids)
        if not request.HasField("constraint"):
            return valid
        if valid.ignore_eos:
            raise ValidationError("parameters.ignore_eos", "parameters.ignore_eos cannot be combined with a "
                                  "constraint (the end of a complete output is its end-of-sequence token)")
        grammar = await self.constraints.compile(request.constraint)
        if grammar and not self.structured:
            raise ValidationError("constraint", "the shards cannot apply structured output (no rank loaded "
                                                "llguidance with the checkpoint's tokenizer; see the shard logs)")
        return dataclasses.replace(valid, grammar=grammar)

    async def check(self, request: serving_pb2.GenerateRequest) -> ValidRequest:
        """`validate`, with a refusal raised as Refused(INVALID_ARGUMENT, message, field)."""
        try:
            return await self.validate(request)
        except ValidationError as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.field) from None

    def admit(self, valid: ValidRequest, *, seed: int | None = None, deadline: float | None = None,
              api: str = "grpc", tenant: Tenant = ANONYMOUS) -> tuple[RouterRequest, Batcher]:
        """Queues one request of `tenant` (its own `seed` when given; `deadline` in time.monotonic());
        raises Refused: UNAVAILABLE, RESOURCE_EXHAUSTED when full (for all, or for this tenant),
        INVALID_ARGUMENT when it never fits or asks for more priority than the tenant may."""
        try:
            req, batcher = self._enqueue(valid, seed, deadline, tenant)
        except Refused as refused:
            self.tenant_metrics.refused.labels(tenant.name, refused.code.name).inc()
            raise
        batcher.metrics.received.labels(api).inc()
        self.tenant_metrics.received.labels(tenant.name, api).inc()
        return req, batcher

    def _enqueue(self, valid: ValidRequest, seed: int | None, deadline: float | None,
                 tenant: Tenant) -> tuple[RouterRequest, Batcher]:
        batcher = self.batcher
        if batcher is None or not self.accepting:
            raise Refused(grpc.StatusCode.UNAVAILABLE, self.unavailable_reason)
        self._check_tenant(tenant, valid.priority, batcher)
        if seed is None:
            seed = valid.seed if valid.seed is not None else secrets.randbits(63)
        req = RouterRequest(
            priority=valid.priority, prompt_len=valid.prompt_len, max_new_tokens=valid.max_new_tokens,
            id=next(self.ids), request_id=secrets.token_hex(8), valid=valid, seed=seed,
            detokenizer=IncrementalDetokenizer(self.tokenizer, valid.stop), deadline=deadline, tenant=tenant.name)
        try:
            batcher.submit(req)
        except Overloaded as exc:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        except NeverFits as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        return req, batcher

    def _check_tenant(self, tenant: Tenant, priority: int, batcher: Batcher) -> None:
        """The tenant's priority cap (its key's max_priority, else --max-priority-per-tenant) and
        --max-concurrent-requests-per-tenant (counted over the admitted requests themselves)."""
        sec = self.cfg.security
        own = tenant.max_priority is not None
        cap = tenant.max_priority if own else sec.max_priority_per_tenant
        if cap is not None and priority > cap:
            flag = "its max_priority in --api-key-file" if own else "--max-priority-per-tenant"
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"priority {priority} is more than tenant "
                          f"{tenant.name!r} may ask for ({flag}={cap})", "priority")
        limit = sec.max_concurrent_requests_per_tenant
        if limit:
            mine = sum(1 for r in batcher.admitted if r.tenant == tenant.name)
            if mine >= limit:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"tenant {tenant.name!r} already has {mine} "
                              f"requests admitted (--max-concurrent-requests-per-tenant={limit})")

    async def events(self, req: RouterRequest, batcher: Batcher,
                     api: str = "grpc") -> AsyncIterator[serving_pb2.GenerateStreamResponse]:
        """The request's stream messages, the last one carrying its finish reason; a failure is
        raised as Refused. Leaving early (cancel, disconnect) takes the request out of the batch."""
        try:
            while True:
                event = await req.events.get()
                if isinstance(event, Failure):
                    raise Refused(event.code, event.message)
                yield event
                if event.finish_reason:
                    return
        finally:
            if not req.done:
                batcher.cancel(req)
            self.tenant_metrics.ended(req)
            log.info("request", api=api, **req.summary())

    def deadline_in(self, remaining: float | None) -> float | None:
        """The time.monotonic() deadline of a call with `remaining` seconds left (None: none)."""
        return None if remaining is None else time.monotonic() + remaining
