"""The router's front door, shared by the gRPC API and the OpenAI-compatible HTTP API.

`FrontDoor` owns the path every generation request takes before the batcher and back out of it:
`check` (validate; text and conversations bounded in bytes, then tokenized off the event loop),
`admit` (availability, --max-concurrent-requests, enqueue), and `events` (the request's stream
messages until it finishes, a failure raised as `Refused`, and cancellation when the caller stops
reading). Both APIs call exactly these, so they validate with the same rules and messages and
share one queue and batcher; each only translates `Refused` into its own status (gRPC code, HTTP).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import structlog

from shardline.proto import serving_pb2
from shardline.router.batcher import Batcher, NeverFits, Overloaded
from shardline.router.config import RouterConfig
from shardline.router.detokenizer import IncrementalDetokenizer
from shardline.router.request import Failure, RouterRequest
from shardline.router.tokenization import PromptTokenizer
from shardline.router.validation import Limits, ValidationError, ValidRequest, chat_turns, prompt_text, validate

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

    def __init__(self, cfg: RouterConfig, tokenizer, vocab_size: int):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.prompts = PromptTokenizer(tokenizer, chat_template=read_chat_template(cfg.chat_template))
        self.limits = Limits(max_input_tokens=cfg.max_input_tokens, max_total_tokens=cfg.max_total_tokens,
                             vocab_size=vocab_size, max_stop_sequences=cfg.max_stop_sequences,
                             default_max_new_tokens=cfg.default_max_new_tokens,
                             max_request_bytes=cfg.max_request_bytes)
        self.batcher: Batcher | None = None
        self.accepting = True
        self.info: serving_pb2.InfoResponse | None = None
        self.ids = iter(range(1, 2**63))
        self.unavailable_reason = "the shards are still loading"

    async def validate(self, request: serving_pb2.GenerateRequest) -> ValidRequest:
        """The validated request (raises ValidationError); text and conversations are bounded in
        bytes, then tokenized off the event loop."""
        if request.WhichOneof("input") == "messages":
            ids = await self.prompts.encode_chat_async(chat_turns(request, self.limits))
        else:
            text = prompt_text(request, self.limits)
            ids = None if text is None else await self.prompts.encode_async(text)
        return validate(request, self.limits, ids)

    async def check(self, request: serving_pb2.GenerateRequest) -> ValidRequest:
        """`validate`, with a refusal raised as Refused(INVALID_ARGUMENT, message, field)."""
        try:
            return await self.validate(request)
        except ValidationError as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.field) from None

    def admit(self, valid: ValidRequest, *, seed: int | None = None, deadline: float | None = None,
              api: str = "grpc") -> tuple[RouterRequest, Batcher]:
        """Queues one request (its own `seed` when given; `deadline` in time.monotonic()); raises
        Refused: UNAVAILABLE, RESOURCE_EXHAUSTED when full, INVALID_ARGUMENT when it never fits."""
        batcher = self.batcher
        if batcher is None or not self.accepting:
            raise Refused(grpc.StatusCode.UNAVAILABLE, self.unavailable_reason)
        if seed is None:
            seed = valid.seed if valid.seed is not None else secrets.randbits(63)
        req = RouterRequest(
            priority=valid.priority, prompt_len=valid.prompt_len, max_new_tokens=valid.max_new_tokens,
            id=next(self.ids), request_id=secrets.token_hex(8), valid=valid, seed=seed,
            detokenizer=IncrementalDetokenizer(self.tokenizer, valid.stop), deadline=deadline)
        try:
            batcher.submit(req)
        except Overloaded as exc:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        except NeverFits as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        batcher.metrics.received.labels(api).inc()
        return req, batcher

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
            log.info("request", api=api, **req.summary())

    def deadline_in(self, remaining: float | None) -> float | None:
        """The time.monotonic() deadline of a call with `remaining` seconds left (None: none)."""
        return None if remaining is None else time.monotonic() + remaining
